"""Helpers shared by the tests: the directory, mailbox files, messages, the CLI, the store."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import anyio

from engine.cli import main
from engine.store import open_store

LOGIN = "system"
LOGIN_PASSWORD = "octo-Pa55"

DIRECTORY: dict[str, Any] = {
    "teams": [
        {"number": 1, "name": "IT", "defaultGroup": "Service Desk"},
        {"number": 2, "name": "Facilities", "defaultGroup": "Building Services"},
    ],
    "sites": ["Montréal", "Québec"],
    "groups": ["Service Desk", "Infrastructure", "Building Services", "Monitoring"],
    "sources": ["Email", "SCOM"],
    "priorities": ["Low", "Medium", "High", "Critical"],
    "categories": ["Hardware", "Access"],
    "users": [
        {
            "login": LOGIN,
            "email": "sd@example.com",
            "name": "System",
            "site": "Montréal",
            "password": LOGIN_PASSWORD,
        },
        {"login": "jdoe", "email": "John.Doe@example.com", "name": "John Doe", "site": "Québec"},
        {"login": "asmith", "email": "asmith@example.com", "name": "Alice Smith"},
        {"login": "unknown.user", "name": "Unknown user", "site": "Montréal"},
        {"login": "oncall", "email": "oncall@example.com", "name": "On-call tech"},
    ],
}

INCIDENT = (
    "Octopus.MailIntegration.Processors.EndUserIncidentMailMessageProcessor, "
    "Octopus.MailIntegration"
)
EVENT = "Octopus.MailIntegration.Processors.EventMailMessageProcessor, Octopus.MailIntegration"
GATEWAY = "Octopus.MailIntegration.Gateways.SidePopMailboxGateway, Octopus.MailIntegration"
IMAP_GATEWAY = "Octopus.MailIntegration.Gateways.ImapMailboxGateway, Octopus.MailIntegration"


def mailbox_xml(
    path: Path,
    *,
    port: int,
    user: str,
    password: str,
    host: str = "127.0.0.1",
    processor: str = INCIDENT,
    server_extra: str = "",
    use_ssl: bool = False,
    gateway: str = GATEWAY,
    **elements: str | None,
) -> Path:
    """Write a mailbox file; ``elements`` become root elements (``team="1"`` → <team>1</team>)."""
    defaults: dict[str, str | None] = {
        "team": "1",
        "incidentFallbackSiteName": "Montr&eacute;al",
        "incidentFallbackUserLogon": "unknown.user",
        "incidentGroup": "Service Desk",
        "incidentSource": "Email",
    }
    defaults.update(elements)
    body = "".join(f"  <{k}>{v}</{k}>\n" for k, v in defaults.items() if v is not None)
    path.write_text(
        f"""<?xml version="1.0" encoding="utf-8"?>
<mailIntegration>
  <messageProcessorTypeName>{processor}</messageProcessorTypeName>
  <server>
    <gatewayTypeName>{gateway}</gatewayTypeName>
    <serverName>{host}</serverName>
    <port>{port}</port>
    <useSsl>{"true" if use_ssl else "false"}</useSsl>
    <userName>{user}</userName>
    <password>{password}</password>
    <timeoutSeconds>5</timeoutSeconds>
{server_extra}  </server>
{body}</mailIntegration>
""",
        encoding="utf-8",
    )
    return path


def gateway_elements(dovecot: Any, gateway: str) -> dict[str, Any]:
    """Keyword arguments of :func:`mailbox_xml` that reach ``dovecot`` by ``gateway``:
    plain POP3 (as the tests always did), or IMAP over STARTTLS with the server's CA."""
    if gateway == "pop3":
        return {"port": dovecot.pop3_port}
    tls = f"<startTls>true</startTls><caFile>{dovecot.certificates.ca_file}</caFile>\n"
    return {"port": dovecot.imap_port, "gateway": IMAP_GATEWAY, "server_extra": tls}


def message(
    subject: str,
    *,
    sender: str = "John Doe <john.doe@example.com>",
    body: str = "Hello, it does not work.\n",
    attachments: tuple[tuple[str, str, bytes], ...] = (),
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "support@example.com"
    msg["Subject"] = subject
    msg["Date"] = "Fri, 27 Nov 2026 09:12:44 -0500"
    msg["Message-ID"] = message_id or make_msgid(domain="example.com")
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    # CRLF, as on the wire: what RETR gives back is then byte for byte what was delivered.
    return msg.as_bytes(policy=SMTP)


def cli(*args: str | Path) -> tuple[int, str]:
    """Run the real command line in-process; returns (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def import_directory(data_dir: Path, tmp: Path, directory: dict[str, Any] | None = None) -> None:
    f = tmp / "directory.json"
    f.write_text(json.dumps(directory or DIRECTORY), encoding="utf-8")
    code, _ = cli("directory", "import", f, "--data-dir", data_dir)
    assert code == 0


def mailbox_of(
    tmp_path: Path,
    dovecot: Any,
    pop3_user: tuple[str, str],
    raws: list[bytes],
    **elements: str,
) -> tuple[Path, Path]:
    """A data dir with the directory imported, and a mailbox file for ``pop3_user`` (with
    ``elements``), whose mailbox now holds ``raws``: (data dir, mailbox file)."""
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    user, password = pop3_user
    for raw in raws:
        dovecot.deliver(user, raw)
    cfg = mailbox_xml(
        tmp_path / "m.xml", port=dovecot.pop3_port, user=user, password=password, **elements
    )
    return data, cfg


def once(data_dir: Path, config: Path, *extra: str | Path) -> int:
    flag = "--config-dir" if config.is_dir() else "--config"
    code, _ = cli(
        "once",
        flag,
        config,
        "--data-dir",
        data_dir,
        "--login",
        LOGIN,
        "--password",
        LOGIN_PASSWORD,
        *extra,
    )
    return code


def requests(data_dir: Path, **filters: str) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        store = await open_store(data_dir)
        try:
            rows = await store.list_requests(**filters)
            return [d for r in rows if (d := await store.request_detail(r["number"]))]
        finally:
            await store.close()

    return anyio.run(go)


def ledger(data_dir: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(data_dir / "mailintegration.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM ledger ORDER BY id").fetchall()
    finally:
        db.close()


def attachment_bytes(data_dir: Path, sha256: str) -> bytes:
    return (data_dir / "attachments" / sha256[:2] / sha256).read_bytes()


def engine_argv(*args: str | Path) -> list[str]:
    """The deployed command line, ``python -m engine …``, for the tests that need a process."""
    return [sys.executable, "-m", "engine", *map(str, args)]


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``check`` a bounded number of times within ``timeout``."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        if check():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def count_rows(data: Path, sql: str) -> int:
    """One number from the store, read by another connection (0 while there is none)."""
    path = data / "mailintegration.sqlite3"
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=10)
    try:
        return int(db.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()
