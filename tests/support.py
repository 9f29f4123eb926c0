"""Helpers shared by the tests: the directory, mailbox files, messages, the CLI, the store."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import secrets
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP, compat32
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine.cli import main
from engine.store import Store, open_store

# The PostgreSQL database the helpers below use instead of the data directory's SQLite
# file; set by the ``store`` fixture (tests/conftest.py) for its "postgresql" run.
STORE: str | None = None


def store_args() -> list[str]:
    """``--store DSN`` when the test runs against PostgreSQL, else nothing."""
    return ["--store", STORE] if STORE else []


async def open_test_store(data_dir: Path) -> Store:
    """The store the test runs against (see STORE)."""
    if STORE:
        from engine.store.postgres import open_postgres

        return await open_postgres(STORE)
    return await open_store(data_dir)


def store_rows(data_dir: Path, sql: str) -> list[dict[str, Any]]:
    """Rows of ``sql`` (portable SQL, no parameters) from the store the test runs against."""
    if STORE:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(STORE, row_factory=dict_row) as conn:
            return list(conn.execute(sql).fetchall())
    db = sqlite3.connect(data_dir / "mailintegration.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql).fetchall()]
    finally:
        db.close()


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


# The root elements every incident mailbox of the tests has, unless told otherwise.
INCIDENT_DEFAULTS: dict[str, str | None] = {
    "team": "1",
    "incidentFallbackSiteName": "Montr&eacute;al",
    "incidentFallbackUserLogon": "unknown.user",
    "incidentGroup": "Service Desk",
    "incidentSource": "Email",
}

# With the defaults, the flood limit (engine.processors.intake) is off: many tests, the crash
# harness and the benchmarks send hundreds of messages from one sender on purpose. Written
# last, so that no other element's line number moves; tests/test_mail_handling.py tests the
# limit, and its default (``mailHandling=None`` leaves the element out).
FLOOD_OFF = "  <mailHandling><floodMessages>0</floodMessages></mailHandling>\n"


def mailbox_text(
    *,
    port: int | None,
    user: str | None,
    password: str | None,
    host: str = "127.0.0.1",
    processor: str = INCIDENT,
    gateway: str = GATEWAY,
    use_ssl: bool | None = False,
    timeout: int | str | None = 5,
    server_extra: str = "",
    root_extra: str = "",
    defaults: bool = True,
    **elements: str | None,
) -> str:
    """The one mailbox XML template of the tests (and of tools/crash.py).

    Each server element on its own line, in this order: gatewayTypeName, serverName, port,
    useSsl, userName, password, timeoutSeconds, then ``server_extra`` as written; a ``None``
    leaves its element out. Root elements: :data:`INCIDENT_DEFAULTS` (unless ``defaults`` is
    false) updated with ``elements`` (``team="1"`` → <team>1</team>, ``None`` removes one),
    then ``root_extra`` as written. Values are not escaped: a test may write an entity or a
    broken value on purpose.
    """
    ssl = None if use_ssl is None else ("true" if use_ssl else "false")
    server = {
        "gatewayTypeName": gateway,
        "serverName": host,
        "port": port,
        "useSsl": ssl,
        "userName": user,
        "password": password,
        "timeoutSeconds": timeout,
    }
    root = dict(INCIDENT_DEFAULTS if defaults else {}) | elements
    last = FLOOD_OFF if defaults and "mailHandling" not in elements else ""
    inner = "".join(f"    <{k}>{v}</{k}>\n" for k, v in server.items() if v is not None)
    body = "".join(f"  <{k}>{v}</{k}>\n" for k, v in root.items() if v is not None)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        "<mailIntegration>\n"
        f"  <messageProcessorTypeName>{processor}</messageProcessorTypeName>\n"
        f"  <server>\n{inner}{server_extra}  </server>\n"
        f"{body}{root_extra}{last}</mailIntegration>\n"
    )


def mailbox_xml(path: Path, **settings: Any) -> Path:
    """Write :func:`mailbox_text` (same keywords) to ``path``; returns ``path``."""
    path.write_text(mailbox_text(**settings), encoding="utf-8")
    return path


# The core, event, failure and outage tests run for both gateways: `@both` on a test that
# uses the `mailbox` fixture (conftest's `gateway` fixture says which one it gets).
both = pytest.mark.parametrize("gateway", ["pop3", "imap"])


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
    code, _ = cli("directory", "import", f, "--data-dir", data_dir, *store_args())
    assert code == 0


def data_dir(tmp_path: Path) -> Path:
    """``tmp_path/data``, a data directory with the tests' :data:`DIRECTORY` imported."""
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    return data


@dataclass
class Mailbox:
    """One test's mailbox on the session's Dovecot, end to end: a fresh user, a data directory
    with the directory imported, and a mailbox file for the user (the conftest ``mailbox``
    fixture). Delivers, runs ``once`` and reads the store; remembers what it delivered, so
    :meth:`assert_exactly_once` knows what the store must hold."""

    dovecot: Any
    user: str
    password: str
    data: Path
    config: Path
    delivered: list[bytes] = field(default_factory=list)
    gateway: str = "pop3"  # how the engine reads it: "pop3", or "imap" (STARTTLS)

    @classmethod
    def create(cls, dovecot: Any, data: Path, config: Path, **settings: Any) -> Mailbox:
        """A new user on ``dovecot`` (unique name, random password), its file ``config``
        written with ``settings``, its mail going to ``data``."""
        user, password = f"user-{uuid.uuid4().hex[:12]}", secrets.token_urlsafe(12)
        dovecot.add_user(user, password)
        box = cls(dovecot, user, password, data, config)
        box.configure(**settings)
        return box

    def configure(self, name: str | None = None, **settings: Any) -> Path:
        """(Re)write the mailbox file: :func:`mailbox_text`'s keywords, this user preset.
        ``name`` renames the mailbox (the file ``NAME.xml`` beside the old one, removed)."""
        if name is not None:
            self.config.unlink(missing_ok=True)
            self.config = self.config.with_name(f"{name}.xml")
        preset = {"user": self.user, "password": self.password}
        preset |= gateway_elements(self.dovecot, self.gateway)
        return mailbox_xml(self.config, **(preset | settings))

    def deliver(self, *raws: bytes) -> None:
        for raw in raws:
            self.dovecot.deliver(self.user, raw)
            self.delivered.append(raw)

    def once(self, *extra: str | Path) -> int:
        return once(self.data, self.config, *extra)

    def requests(self, **filters: str) -> list[dict[str, Any]]:
        return requests(self.data, **filters)

    def mail(self) -> list[dict[str, Any]]:
        """The requests made from mail (no outage or failure events)."""
        return [r for r in requests(self.data) if r["kind"] == "mail"]

    def ledger(self) -> list[sqlite3.Row]:
        return ledger(self.data)

    def left(self) -> int:
        """How many messages are still on the server."""
        return int(self.dovecot.count(self.user))

    def expected(self) -> list[Delivered]:
        """What :meth:`deliver` delivered, for :func:`assert_exactly_once` over several
        mailboxes."""
        return [Delivered.of(raw, self.user) for raw in self.delivered]

    def assert_exactly_once(self, **options: Any) -> None:
        """Everything :meth:`deliver` delivered is in the store once and the mailbox is empty
        (:func:`assert_exactly_once`'s options)."""
        assert_exactly_once(self.data, self.delivered, self.dovecot, user=self.user, **options)


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
        *store_args(),
        *extra,
    )
    return code


def requests(data_dir: Path, **filters: str) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        store = await open_test_store(data_dir)
        try:
            rows = await store.list_requests(**filters)
            return [d for r in rows if (d := await store.request_detail(r["number"]))]
        finally:
            await store.close()

    return anyio.run(go)


def ledger(data_dir: Path) -> list[Any]:
    if STORE:
        return store_rows(data_dir, "SELECT * FROM ledger ORDER BY id")
    db = sqlite3.connect(data_dir / "mailintegration.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM ledger ORDER BY id").fetchall()
    finally:
        db.close()


def free_port() -> int:
    """A loopback TCP port that nobody listens on: bound to port 0, then released.

    For a server the test starts next on it (aiosmtpd's Controller, the daemon's --http-port)
    or for a mailbox whose connection must be refused. The one helper of its kind: the
    architecture test fails on any other test module binding port 0 to learn a free port.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def smtp_server(handler: Any, **options: Any) -> Iterator[int]:
    """aiosmtpd serving ``handler`` on a free loopback port, stopped afterwards; yields the
    port. ``options`` go to its Controller (an authenticator, say)."""
    from aiosmtpd.controller import Controller  # a test dependency: tools and bench import us

    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **options)
    controller.start()
    try:
        yield int(controller.port)
    finally:
        controller.stop()


class SmtpSink:
    """An aiosmtpd handler keeping what it receives: (MAIL FROM, RCPT TOs, content)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def ingest(data: Path, cfg: Path, *files: Path) -> tuple[int, str]:
    """``mailintegration ingest FILES`` as the mailbox of ``cfg``, into ``data`` (or the
    PostgreSQL store of the ``store`` fixture)."""
    return cli(
        "ingest", *files, "--config", cfg, "--data-dir", data, "--login", LOGIN,
        "--password", LOGIN_PASSWORD, *store_args(),
    )  # fmt: skip


def attachment_bytes(data_dir: Path, sha256: str) -> bytes:
    if STORE:
        import psycopg

        with psycopg.connect(STORE) as conn:
            row = conn.execute(
                "SELECT data FROM attachment_blobs WHERE sha256 = %s", (sha256,)
            ).fetchone()
        assert row is not None, sha256
        return bytes(row[0])
    blobs = _sqlite_blobs(data_dir)
    if sha256 in blobs:
        return blobs[sha256]
    return (data_dir / "attachments" / sha256[:2] / sha256).read_bytes()


def stored_digests(data_dir: Path) -> tuple[set[str], set[str]]:
    """The SQLite store's attachment contents by sha256: (rows, files). Small ones are rows,
    large ones files (engine.store.sqlite.BLOB_MAX)."""
    root = data_dir / "attachments"
    files = {p.name for p in root.glob("??/*") if not p.name.startswith(".")}
    return set(_sqlite_blobs(data_dir)), files


def _sqlite_blobs(data_dir: Path) -> dict[str, bytes]:
    """The SQLite store's small attachments, kept as rows (engine.store.sqlite.BLOB_MAX)."""
    db = sqlite3.connect(f"file:{data_dir / 'mailintegration.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT sha256, data FROM attachment_blobs").fetchall()
    except sqlite3.OperationalError:  # a store from before migration 8 (an A/B's "before")
        rows = []
    finally:
        db.close()
    return {str(s): bytes(d) for s, d in rows}


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
    if STORE:
        try:
            rows = store_rows(data, sql)
        except Exception:  # the schema is not there yet
            return 0
        return int(next(iter(rows[0].values()))) if rows else 0
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


# --------------------------------------------------------------------------- exactly once


@dataclass(frozen=True)
class Delivered:
    """A message put in a mailbox, as the store must then hold it: once.

    ``sha256`` (of the delivered bytes) and ``attachments`` (the sha256 of each attachment's
    bytes) are checked when known; ``user`` names the Dovecot mailbox that must end up empty.
    """

    user: str
    message_id: str
    sha256: str | None = None
    attachments: frozenset[str] | None = None

    @classmethod
    def of(cls, raw: bytes, user: str = "") -> Delivered:
        """Read from the delivered bytes themselves (stdlib parser, not the engine's)."""
        header = BytesHeaderParser(policy=compat32).parsebytes(raw).get("Message-ID")
        assert header, "a message without a Message-ID cannot be followed through the store"
        mid = " ".join(str(header).split()).strip("<>")
        return cls(user, mid, hashlib.sha256(raw).hexdigest())


@dataclass
class OnceCheck:
    """What :func:`check_exactly_once` found: losses and duplicates counted, every problem
    in words (empty when all is well)."""

    losses: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)


# Outcomes whose message has one effect, carrying its Message-ID: a request (mail, or a
# failure event holding it) or an activity written from it.
_WITH_EFFECT = ("created", "activity", "failed")


@dataclass
class _Store:
    integrity: list[str]
    ledger: dict[str, list[tuple[str, str]]]  # Message-ID -> [(sha256, outcome kind)]
    keys_twice: list[tuple[str, str]]
    effects: dict[str, list[int]]  # Message-ID -> request numbers (0 for an activity)
    outages: list[tuple[int, str, str]]
    cited: dict[int, set[str]]  # request number -> attachment sha256s


class _PgCursor:
    """Just enough of sqlite3's ``execute`` over psycopg, for :func:`_read_store`."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn)

    def execute(self, sql: str) -> Any:
        if sql.startswith("PRAGMA integrity_check"):
            return [("ok",)]
        return self.conn.execute(sql)

    def close(self) -> None:
        self.conn.close()


def _read_store(data_dir: Path) -> _Store:
    db: Any = (
        _PgCursor(STORE)
        if STORE
        else sqlite3.connect(f"file:{data_dir / 'mailintegration.sqlite3'}?mode=ro", uri=True)
    )
    try:
        store = _Store(
            [str(r[0]) for r in db.execute("PRAGMA integrity_check")],
            collections.defaultdict(list),
            db.execute(
                "SELECT account, uidl FROM ledger GROUP BY account, uidl HAVING count(*) > 1"
            ).fetchall(),
            collections.defaultdict(list),
            db.execute(
                "SELECT number, mailbox, cause FROM requests WHERE kind = 'outage'"
            ).fetchall(),
            collections.defaultdict(set),
        )
        for mid, sha, outcome in db.execute("SELECT message_id, sha256, outcome FROM ledger"):
            store.ledger[str(mid)].append((str(sha), str(outcome).split(":")[0]))
        for number, mid in db.execute(
            "SELECT number, message_id FROM requests WHERE kind IN ('mail', 'message-failure') "
            "UNION ALL SELECT 0, message_id FROM activities WHERE automatic = 0"
        ):
            store.effects[str(mid)].append(int(number))
        for number, sha in db.execute("SELECT request_number, sha256 FROM attachments"):
            store.cited[int(number)].add(str(sha))
    finally:
        db.close()
    return store


def check_exactly_once(
    data_dir: Path,
    delivered: Sequence[Delivered],
    dovecot: Any = None,
    *,
    outcomes: Collection[str] = ("created",),
    outages: bool = False,
    disposal: str = "delete",
    move_folder: str = "Done",
) -> OnceCheck:
    """Compare the store (and, given ``dovecot``, the delivered mailboxes) with what was
    delivered: every Message-ID in the ledger exactly once with the delivered bytes' sha256
    and an outcome of ``outcomes``; one request or activity for each; no ledger key twice,
    no row for a message never delivered, no outage event unless ``outages``; attachment
    files exactly those cited, each hashing to its name; every delivered mailbox as IMAP's
    ``disposal`` leaves it: "delete" (POP3 too) empty, "move" empty with every message in
    ``move_folder``, "keep" holding every message, each with the processed keyword.

    The one exactly-once checker: the tests assert with it, tools/crash.py counts with it.
    """
    check, store = OnceCheck(), _read_store(data_dir)
    problems = check.problems
    if store.integrity != ["ok"]:
        problems.append(f"integrity_check: {store.integrity[:5]}")
    if store.keys_twice:
        problems.append(f"ledger keys recorded twice: {store.keys_twice[:3]}")
    on_server: set[str] = set()
    for user in sorted({d.user for d in delivered}) if dovecot is not None else []:
        mine = sorted(str(d.sha256) for d in delivered if d.user == user)
        on_server |= _check_server(dovecot, user, mine, disposal, move_folder, problems)
    for d in delivered:
        _check_one(check, store, d, on_server, outcomes)
    ids = {d.message_id for d in delivered}
    if unexpected := set(store.ledger) - ids:
        problems.append(f"ledger rows for messages never delivered: {sorted(unexpected)[:3]}")
    if unexpected := set(store.effects) - ids:
        problems.append(f"requests or activities never delivered: {sorted(unexpected)[:3]}")
    if store.outages and not outages:
        problems.append(f"unexpected events: {store.outages[:3]}")
    cited = set().union(*store.cited.values())
    problems.extend(_check_blobs(cited) if STORE else _check_files(data_dir, cited))
    return check


def _check_blobs(referenced: set[str]) -> list[str]:
    """PostgreSQL: every cited attachment's content is there and hashes to its key."""
    import psycopg

    assert STORE is not None
    with psycopg.connect(STORE) as conn:
        rows = conn.execute("SELECT sha256, data FROM attachment_blobs").fetchall()
    found = {str(sha) for sha, _ in rows}
    problems = [
        f"attachment content {sha} does not hash to its key"
        for sha, data in rows
        if hashlib.sha256(bytes(data)).hexdigest() != sha
    ]
    if referenced - found:
        problems.append(f"attachment rows without content: {sorted(referenced - found)[:3]}")
    return problems


PROCESSED_KEYWORD = "$MailIntegrationProcessed"  # what IMAP's "keep" marks a message with


def _check_server(
    dovecot: Any, user: str, mine: list[str], disposal: str, folder: str, problems: list[str]
) -> set[str]:
    """What ``user``'s mailbox holds against what ``disposal`` promises; returns the hashes
    of the messages still in INBOX (not processed yet is not lost)."""
    hashes = sorted(hashlib.sha256(raw).hexdigest() for raw in dovecot.messages(user))
    if disposal == "keep":
        if hashes != mine:
            problems.append(f"{user}: INBOX holds {len(hashes)} of {len(mine)} messages")
        unmarked = [m for m in dovecot.list_messages(user) if PROCESSED_KEYWORD not in m.flags]
        if unmarked:
            problems.append(f"{user}: {len(unmarked)} message(s) without {PROCESSED_KEYWORD}")
        return set(hashes)
    if hashes:
        problems.append(f"{len(hashes)} message(s) left on the server in {user}")
    if disposal == "move":
        there = folder in dovecot.folders(user)
        moved = (
            [hashlib.sha256(r).hexdigest() for r in dovecot.messages(user, folder)] if there else []
        )
        if sorted(moved) != mine:
            problems.append(f"{user}: {folder} holds {len(moved)} of {len(mine)} messages")
    return set(hashes)


def _check_one(
    check: OnceCheck, store: _Store, d: Delivered, on_server: set[str], outcomes: Collection[str]
) -> None:
    seen, made = store.ledger.get(d.message_id, []), store.effects.get(d.message_id, [])
    if not seen:
        # Still on the server is not lost (only not processed yet); gone from both is.
        lost = d.sha256 not in on_server
        check.losses += lost
        what = "lost" if lost else "not processed"
        check.problems.append(f"{what} {d.message_id}: no ledger row, {len(made)} effect(s)")
        return
    if len(seen) > 1 or len(made) > 1:
        check.duplicates += max(len(seen), len(made)) - 1
        check.problems.append(f"duplicated {d.message_id}: ledger {len(seen)}, effects {len(made)}")
    if d.sha256 is not None and any(sha != d.sha256 for sha, _ in seen):
        check.problems.append(f"{d.message_id}: ledger sha256 differs from the delivered bytes")
    kinds = [kind for _, kind in seen]
    if any(kind not in outcomes for kind in kinds):
        check.problems.append(f"{d.message_id}: outcome {kinds}, expected one of {outcomes}")
    if not made and any(kind in _WITH_EFFECT for kind in kinds):
        check.problems.append(f"{d.message_id}: {kinds[0]} without a request or activity")
    if d.attachments is not None and made and store.cited.get(made[0], set()) != d.attachments:
        check.problems.append(f"{d.message_id}: attachments differ from what was delivered")


def _check_files(data_dir: Path, referenced: set[str]) -> list[str]:
    """SQLite: every cited attachment is a row (small) or a file (large) whose content hashes
    to its key; no file that no row cites, nor anything else, under attachments/."""
    root = data_dir / "attachments"
    blobs = _sqlite_blobs(data_dir)
    problems = [
        f"attachment row {sha} does not hash to its key"
        for sha, data in blobs.items()
        if hashlib.sha256(data).hexdigest() != sha
    ]
    found: set[str] = set()
    for path in sorted(root.rglob("*")) if root.is_dir() else []:
        if path.is_dir():
            continue
        rel = path.relative_to(root)
        if len(rel.parts) != 2 or path.name.startswith(".") or rel.parts[0] != path.name[:2]:
            problems.append(f"stray file in attachments/: {rel}")
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            problems.append(f"attachment file {rel} does not hash to its name (torn write?)")
        found.add(path.name)
    if found - referenced:
        problems.append(f"orphan attachment files: {sorted(found - referenced)[:3]}")
    if found & set(blobs):
        problems.append(f"attachments both a row and a file: {sorted(found & set(blobs))[:3]}")
    if missing := referenced - found - set(blobs):
        problems.append(f"attachment rows without content: {sorted(missing)[:3]}")
    return problems


def assert_exactly_once(
    data_dir: Path,
    delivered: Iterable[bytes | Delivered],
    dovecot: Any = None,
    *,
    user: str = "",
    outcomes: Collection[str] = ("created",),
    outages: bool = False,
) -> None:
    """:func:`check_exactly_once`, asserted. Raw bytes are read as :meth:`Delivered.of`
    (delivered to ``user``); ``dovecot`` given, every delivered mailbox must be empty."""
    items = [d if isinstance(d, Delivered) else Delivered.of(d, user) for d in delivered]
    check = check_exactly_once(data_dir, items, dovecot, outcomes=outcomes, outages=outages)
    assert check.problems == [], "\n".join(check.problems)
