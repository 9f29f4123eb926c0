"""Secrets never leak, and attachment names never place a file anywhere.

One canary password is configured in every mailbox of a run that goes through an
authentication failure, config errors (broken files containing the canary), an unreachable
server, a success, a failure event and outage events, in debug mode with a log file, killed once
right after a commit (so that a -wal file is there to be searched) and run again. The canary must
then appear in no log, no stdout or stderr, no database file (-wal and -shm included), no
attachment, no RawMessage file and no error message; only in the config files that hold it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    free_port,
    mailbox_xml,
    message,
    once,
    requests,
    stored_digests,
    wait_for,
)

from engine import logs
from tools.fakepop3 import FakePOP3Server, Script

ROOT = Path(__file__).resolve().parent.parent
CANARY = "Canary-Pw-5e2f91ab"
PASSWORD = LOGIN_PASSWORD
HEX_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}$")


def engine(*args: str | Path, module: tuple[str, ...] = ("engine",)) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", *module, *map(str, args)],
        cwd=ROOT,
        env={
            **os.environ,
            "MAILINTEGRATION_LOGIN": LOGIN,
            "MAILINTEGRATION_PASSWORD": LOGIN_PASSWORD,
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=90,
    )
    return (
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


def hostile_names_message() -> bytes:
    parts = [
        ('filename="../../x"', b"dot dot"),
        ('filename="/etc/cron.d/evil"', b"absolute"),
        ("filename*=utf-8''..%2F..%2Fnul%00byte.txt", b"nul byte"),
        ('filename="CON"', b"device name"),
        ('filename="C:\\Windows\\win.ini"', b"drive letter"),
        ('filename=".."', b"only dots"),
    ]
    body = b"".join(
        b"--b0\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; " + header.encode() + b"\r\n\r\n" + data + b"\r\n"
        for header, data in parts
    )
    return (
        b"From: John Doe <john.doe@example.com>\r\nTo: support@example.com\r\n"
        b"Subject: Hostile names\r\nMessage-ID: <hostile-names@example.com>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
        b"--b0\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n" + body + b"--b0--\r\n"
    )


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def leaks(root: Path, secret: str, *, allowed: set[Path]) -> list[str]:
    found = []
    needle = secret.encode()
    for path, content in files_under(root).items():
        if path not in allowed and needle in content:
            found.append(str(path.relative_to(root)))
    return found


def test_the_canary_password_never_leaks(tmp_path: Path, data: Path) -> None:
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    log_file = logs / "MailIntegration.log"

    big = message("Too big", body="x" * 3000 + "\n")
    good = [message(f"Fine {i}") for i in range(3)] + [big, hostile_names_message()]
    ok_server = FakePOP3Server(Script(messages=good, user="sd", password=CANARY))
    auth_server = FakePOP3Server(Script(messages=[message("Locked out")], password="other"))
    with ok_server, auth_server:
        mailbox_xml(
            conf / "ok.xml",
            port=ok_server.port,
            user="sd",
            password=CANARY,
            maxMessageBytes="2048",
        )
        mailbox_xml(conf / "auth.xml", port=auth_server.port, user="sd", password=CANARY)
        mailbox_xml(conf / "down.xml", port=free_port(), user="sd", password=CANARY)
        (conf / "truncated.xml").write_text(
            "<mailIntegration>\n  <server>\n    <serverName>pop.example.com</serverName>\n"
            f"    <password>{CANARY}</password>\n    <userName>sd"
        )
        mailbox_xml(conf / "invalid.xml", port=110, user="sd", password=CANARY, timeout="soon")
        configs = {p for p in conf.iterdir()}
        assert all(CANARY.encode() in p.read_bytes() for p in configs)

        common = ("--config-dir", conf, "--data-dir", data, "--debug", "--log-file", log_file)
        outputs: list[str] = []
        # 1. Killed right after the first commit of messages: the -wal file is left behind.
        code, out, err = engine(
            "after-commit", "1", "--", "once", *common, module=("tools.crashpoints",)
        )
        assert code == -9, err
        outputs += [out, err]
        wal = data / "mailintegration.sqlite3-wal"
        assert wal.exists() and wal.stat().st_size > 0
        assert leaks(tmp_path, CANARY, allowed=configs) == []
        # 2. The run to the end; 3. again (the outages gain an activity).
        for _ in range(2):
            code, out, err = engine("once", *common)
            assert code == 1, err
            outputs += [out, err]
        # Each config also through `check`, whose errors go to the terminal.
        for cfg in sorted(configs):
            outputs += list(engine("check", "--config", cfg)[1:])
        assert ok_server.wait_idle() and auth_server.wait_idle()
        # The canary was really in play: the servers were sent it.
        assert f"PASS {CANARY}".encode() in bytes(auth_server.received)
        assert f"PASS {CANARY}".encode() in bytes(ok_server.received)

    reqs = requests(data)
    causes = {(r["kind"], r["mailbox"], r["cause"]) for r in reqs if r["kind"] != "mail"}
    assert {
        ("outage", "auth", "authentication"),
        ("outage", "down", "unreachable"),
        ("outage", "truncated", "config"),
        ("outage", "invalid", "config"),
        ("message-failure", "ok", "limit-exceeded"),
    } <= causes
    assert len([r for r in reqs if r["kind"] == "mail"]) == 4
    assert list(logs.glob("RawMessage-*.eml")), "debug mode wrote no RawMessage file"
    assert log_file.stat().st_size > 0
    # Nowhere but in the config files themselves.
    assert leaks(tmp_path, CANARY, allowed=configs) == []
    for text in outputs:
        assert CANARY not in text
    for r in reqs:
        blob = repr(r)
        assert CANARY not in blob
    # The engine's own login password either (only directory.json holds it).
    assert leaks(tmp_path, LOGIN_PASSWORD, allowed={tmp_path / "directory.json"}) == []
    assert all(LOGIN_PASSWORD not in text for text in outputs)


def test_hostile_attachment_names_stay_inside_the_store(tmp_path: Path, data: Path) -> None:
    before = {p for p in tmp_path.parent.rglob("*") if not p.is_relative_to(tmp_path)}
    raw = hostile_names_message()
    with FakePOP3Server(Script(messages=[raw])) as fake:
        cfg = mailbox_xml(
            tmp_path / "box.xml",
            port=fake.port,
            user="u",
            password="p",
            includeRawMessageAsAttachment="true",
        )
        assert once(data, cfg) == 0
        assert fake.deleted == [1]
    [req] = requests(data)
    names = [a["name"] for a in req["attachments"]]
    assert len(names) == 7  # six hostile ones and the raw message
    for name in names:
        assert "/" not in name and "\\" not in name and "\x00" not in name, name
        assert name not in ("", ".", "..") and name.upper() != "CON", name
    # Every file the store wrote is named by its sha256, below data/attachments.
    store = data / "attachments"
    written = files_under(store)
    for path, content in written.items():
        rel = path.relative_to(store).as_posix()
        assert HEX_NAME.match(rel), rel
        assert hashlib.sha256(content).hexdigest() == path.name
    cited = {a["sha256"] for a in req["attachments"]}
    rows, _ = stored_digests(data)
    assert {p.name for p in written} | rows == cited
    # Nothing else anywhere in data/, nor next to it, nor above the test's folder.
    top = {p.name for p in data.iterdir()}
    assert top <= {
        "mailintegration.sqlite3",
        "mailintegration.sqlite3-wal",
        "mailintegration.sqlite3-shm",
        "engine.lock",
        "attachments",
    }, top
    assert {p.name for p in tmp_path.iterdir()} == {"data", "box.xml", "directory.json"}
    after = {p for p in tmp_path.parent.rglob("*") if not p.is_relative_to(tmp_path)}
    assert after == before
    assert not Path("/etc/cron.d/evil").exists()
    db = sqlite3.connect(data / "mailintegration.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("<port>110</port>", "<port>not-a-port</port>", id="bad-port"),
        pytest.param("<userName>u</userName>", "<userName></userName>", id="empty-user"),
        pytest.param(
            f"<password>{CANARY}</password>",
            f"<password>{CANARY}</password><password>{CANARY}</password>",
            id="two-passwords",
        ),
        pytest.param(
            f"<password>{CANARY}</password>",
            f"<password>{CANARY}</password><passwordEnv>NOT_SET_ANYWHERE</passwordEnv>",
            id="two-password-sources",
        ),
        pytest.param("</server>", "<bogus>1</bogus></server>", id="unknown-element"),
        pytest.param(
            f"<password>{CANARY}</password>",
            f"<password>{CANARY}&amp;&lt;x</password><timeoutSeconds>-1</timeoutSeconds>",
            id="escaped-password-and-an-error",
        ),
    ],
)
def test_config_errors_never_echo_the_password(
    tmp_path: Path, data: Path, old: str, new: str
) -> None:
    """A config error names file, line and element, but never the password of that file."""
    cfg = mailbox_xml(tmp_path / "box.xml", port=110, user="u", password=CANARY)
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    code, out, err = engine("check", "--config", cfg)
    assert code == 1
    assert "FAILED" in out
    assert CANARY not in out + err
    code, out, err = engine("once", "--config", cfg, "--data-dir", data)
    assert code == 1
    assert CANARY not in out + err
    [outage] = requests(data)
    assert outage["cause"] == "config"
    assert CANARY not in repr(outage)
    assert leaks(tmp_path, CANARY, allowed={cfg}) == []


ECHO = "Echo-Canary-9d4e27"


def test_a_server_echoing_the_password_leaks_it_nowhere(tmp_path: Path, data: Path) -> None:
    """The server quotes the password in its -ERR. Logs were scrubbed; the store was not: the
    outage's description, its activities and mailbox_status.last_error held it in clear. Now
    the canary is in no database file (-wal and -shm included, looked at while the daemon
    runs), no log, no output and not in /healthz, and the stored texts show it masked."""
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    log_file = logs / "engine.log"
    script = Script(
        messages=[message("Waits on the server")],
        auth_response=f"-ERR [AUTH] invalid password {ECHO} for user sd",
    )
    outputs: list[str] = []
    with FakePOP3Server(script) as server:
        mailbox_xml(conf / "echo.xml", port=server.port, user="sd", password=ECHO)
        common = ("--config-dir", conf, "--data-dir", data, "--log-file", log_file)
        for _ in range(2):
            code, out, err = engine("once", *common)
            assert code == 1, err
            outputs += [out, err]
        port = free_port()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "engine", "run", *map(str, common), "--http-port", str(port)],
            cwd=ROOT,
            env={
                **os.environ,
                "MAILINTEGRATION_LOGIN": LOGIN,
                "MAILINTEGRATION_PASSWORD": LOGIN_PASSWORD,
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            health = _wait_for_failing_health(daemon, port, "echo")
            # The daemon's first session adds the outage's second activity: the -wal holds it.
            wait_for(lambda: _activities(data) >= 2, what="the daemon's session in the store")
            running = files_under(data)
        finally:
            daemon.terminate()
            out_b, err_b = daemon.communicate(timeout=60)
        outputs += [out_b.decode(errors="replace"), err_b.decode(errors="replace")]
        assert f"PASS {ECHO}".encode() in bytes(server.received)
        assert server.deleted == []

    assert any(p.name.endswith("-wal") for p in running)
    assert ECHO not in health
    for path, content in running.items():
        assert ECHO.encode() not in content, path
    assert leaks(tmp_path, ECHO, allowed={conf / "echo.xml"}) == []
    for text in outputs:
        assert ECHO not in text
    [outage] = [r for r in requests(data) if r["kind"] == "outage"]
    assert outage["cause"] == "authentication"
    assert "invalid password ******** for user sd" in outage["description"]
    assert all("invalid password ********" in a["body"] for a in outage["activities"])
    db = sqlite3.connect(data / "mailintegration.sqlite3")
    try:
        [(last_error,)] = db.execute("SELECT last_error FROM mailbox_status").fetchall()
    finally:
        db.close()
    assert "invalid password ******** for user sd" in last_error


def _wait_for_failing_health(daemon: subprocess.Popen[bytes], port: int, name: str) -> str:
    """The body of /healthz once it reports ``name``'s error (bounded: 30 s)."""
    body = ""

    def failing() -> bool:
        nonlocal body
        assert daemon.poll() is None, "the daemon exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                body = r.read().decode()
        except OSError:
            return False
        return bool(json.loads(body)["mailboxes"].get(name, {}).get("last_error"))

    wait_for(failing, what="/healthz to report the failing mailbox")
    return body


def _activities(data: Path) -> int:
    db = sqlite3.connect(data / "mailintegration.sqlite3", timeout=10)
    try:
        return int(db.execute("SELECT count(*) FROM activities").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize(
    "secret", ["p@ss w'rd/%&<é", 'back\\slash"quote', "plain-Secret-42", "tab\there+plus"]
)
def test_scrub_masks_the_forms_a_server_may_echo(
    secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As is, and as Python's repr, JSON, XML/HTML escaping, percent-encoding and base64
    write it: the forms an error message, a JSON log, a proxy or SMTP AUTH LOGIN give it."""
    # This process's own list of secrets, put back afterwards.
    monkeypatch.setattr(logs, "_SECRETS", set())
    monkeypatch.setattr(logs, "_STATE", logs._Scrubber())
    logs.register_secret(secret)
    forms = {
        secret,
        repr(secret),
        json.dumps(secret),
        json.dumps(secret, ensure_ascii=False),
        html.escape(secret),
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        base64.b64encode(secret.encode()).decode(),
    }
    for form in forms:
        masked = logs.scrub(f"-ERR refused {form} here")
        assert "********" in masked and form not in masked and secret not in masked, form
    # Too short to be masked without blanking ordinary words.
    logs.register_secret("abc")
    assert logs.scrub("abc def") == "abc def"


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    secrets=st.lists(
        st.text(alphabet="abcdeé€ -_/", min_size=4, max_size=10), min_size=1, max_size=20
    ),
    filler=st.lists(st.text(alphabet="abcdeé€ xyz", max_size=6), min_size=1, max_size=30),
)
def test_no_registered_secret_survives_a_scrub(
    secrets: list[str], filler: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Property: whatever the secrets (overlapping, prefixes of each other, non-ASCII) and
    however many (a search per form for a few, one automaton pass from eight forms on), no
    whole secret is left in a scrubbed text made of them and other text."""
    monkeypatch.setattr(logs, "_SECRETS", set())
    monkeypatch.setattr(logs, "_STATE", logs._Scrubber())
    for secret in secrets:
        logs.register_secret(secret)
    text = "".join(f + secrets[i % len(secrets)] for i, f in enumerate(filler))
    scrubbed = logs.scrub(text)
    for secret in secrets:
        assert secret not in scrubbed, (secret, scrubbed)
    assert (logs._STATE.automaton is not None) == (len(logs._STATE.needles) >= 8)
