"""The outbox (issue 12, item 15): replies are sent outside the writer's transactions, each
within an overall deadline, retried with a backoff, and kept across restarts. A slow SMTP
server holds up no commit and no other mailbox."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiosmtpd.smtp import AuthResult
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    count_rows,
    engine_argv,
    import_directory,
    ledger,
    mailbox_xml,
    message,
    once,
    smtp_server,
    wait_for,
)

from engine import logs
from engine.store import open_store
from engine.store.schema import MIGRATIONS
from engine.supervisor import Engine, EngineSettings, MailboxSource

ROOT = Path(__file__).resolve().parent.parent


class Trickle:
    """An SMTP server that accepts and then answers one byte every ``pace`` seconds, never a
    whole line: no socket time-out ever fires, only an overall deadline ends a send. Each
    connection is dropped after ``limit`` seconds; everything stops at :meth:`close`."""

    def __init__(self, pace: float = 0.5, limit: float = 40.0) -> None:
        self.pace, self.limit = pace, limit
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._trickle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _trickle(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.limit
        with conn:
            for byte in itertools.cycle(b"220-slow "):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                self._stop.wait(self.pace)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def trickle() -> Iterator[Trickle]:
    server = Trickle()
    try:
        yield server
    finally:
        server.close()


class Answers:
    """An aiosmtpd handler: records each RCPT (time, address) and answers it with ``code``."""

    def __init__(self, code: str = "250 OK") -> None:
        self.code = code
        self.rcpts: list[tuple[float, str]] = []
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpts.append((time.monotonic(), address))
        if self.code.startswith("250"):
            envelope.rcpt_tos.append(address)
        return self.code

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def _accept_login(*_: Any) -> AuthResult:
    return AuthResult(success=True)


def _smtp_server(handler: Answers) -> contextlib.AbstractContextManager[int]:
    """An SMTP server that takes any login."""
    return smtp_server(handler, authenticator=_accept_login, auth_require_tls=False)


@pytest.fixture
def smtp() -> Iterator[tuple[Answers, int]]:
    handler = Answers()
    with _smtp_server(handler) as port:
        yield handler, port


def _smtp_xml(port: int, timeout: int, extra: str = "") -> str:
    return (
        f"<serverName>127.0.0.1</serverName><port>{port}</port>"
        f"<from>Desk &lt;desk@example.com&gt;</from><timeoutSeconds>{timeout}</timeoutSeconds>"
        + extra
    )


def _outbox(data: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(data / "mailintegration.sqlite3", timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM outbox ORDER BY id").fetchall()
    finally:
        db.close()


def _two_mailboxes(
    tmp_path: Path, new_mailbox: Callable[..., Mailbox], smtp_port: int, smtp_timeout: int
) -> tuple[Path, Path, str, str]:
    """A data dir and a folder with `noreq` (refuses, replies through ``smtp_port``) and
    `busy` (creates requests); (data, folder, noreq's user, busy's user)."""
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    smtp = _smtp_xml(smtp_port, smtp_timeout)
    noreq = new_mailbox(conf / "noreq.xml", createNewRequests="false", smtp=smtp)
    busy = new_mailbox(conf / "busy.xml")
    return noreq.data, conf, noreq.user, busy.user


@pytest.mark.dovecot
def test_a_trickling_smtp_server_holds_up_no_commit_and_no_other_mailbox(
    tmp_path: Path, dovecot: Any, new_mailbox: Callable[..., Mailbox], trickle: Trickle
) -> None:
    """The daemon: while a reply is stuck on an SMTP server that answers a byte every half
    second (it kept the writer for as long as the server went on), another mailbox's mail is
    committed and deleted as usual; the send is cut at 3 x timeoutSeconds and recorded."""
    data, conf, noreq, busy = _two_mailboxes(tmp_path, new_mailbox, trickle.port, smtp_timeout=2)
    dovecot.deliver(noreq, message("Please register me"))
    log = tmp_path / "daemon.log"
    env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
    argv = engine_argv("run", "--config-dir", conf, "--data-dir", data, "--http-port", "0")
    argv += ["--poll-interval", "0.5", "--reload-seconds", "0.3"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: trickle.connections == 1, 30, "the reply's SMTP connection")
        started = time.monotonic()
        for i in range(10):
            dovecot.deliver(busy, message(f"Busy {i}"))
        mail = "SELECT count(*) FROM requests WHERE kind = 'mail'"
        wait_for(
            lambda: count_rows(data, mail) == 10 and dovecot.count(busy) == 0,
            5,
            "the other mailbox's mail committed and deleted while the reply is stuck",
        )
        busy_seconds = time.monotonic() - started
        assert count_rows(data, "SELECT count(*) FROM outbox WHERE attempts > 0") == 0
        wait_for(
            lambda: count_rows(data, "SELECT count(*) FROM outbox WHERE attempts = 1") == 1,
            15,
            "the stuck send cut by its deadline and recorded",
        )
        assert busy_seconds < 5
        [row] = _outbox(data)
        assert row["sent_at"] is None and row["failed_at"] is None
        assert "deadline" in row["error"] and row["next_attempt_at"] > row["created_at"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert dovecot.count(noreq) == 0
    assert [r["outcome"] for r in ledger(data) if r["mailbox"] == "noreq"] == ["refused: replied"]


@pytest.mark.dovecot
def test_once_ends_within_the_send_deadline_with_a_trickling_smtp_server(
    tmp_path: Path, dovecot: Any, new_mailbox: Callable[..., Mailbox], trickle: Trickle
) -> None:
    """`once` waits for its replies, but never longer than each send's deadline (3 s here):
    the trickling server kept it for as long as it trickled (40 s)."""
    data, conf, noreq, busy = _two_mailboxes(tmp_path, new_mailbox, trickle.port, smtp_timeout=1)
    dovecot.deliver(noreq, message("Please register me"))
    for i in range(5):
        dovecot.deliver(busy, message(f"Busy {i}"))
    started = time.monotonic()
    assert once(data, conf) == 0
    assert time.monotonic() - started < 12
    assert trickle.connections == 1
    assert dovecot.count(noreq) == 0 and dovecot.count(busy) == 0
    [row] = _outbox(data)
    assert row["attempts"] == 1 and row["sent_at"] is None and "deadline" in row["error"]


@pytest.mark.dovecot
def test_a_reply_left_pending_by_a_killed_run_is_sent_by_the_next_one(
    tmp_path: Path,
    dovecot: Any,
    new_mailbox: Callable[..., Mailbox],
    trickle: Trickle,
    smtp: tuple[Answers, int],
) -> None:
    """SIGKILL while the reply is being sent: the refusal is committed, the reply is not
    recorded as sent. The next `once` sends it (it was never sent at all before)."""
    data, conf, noreq, _ = _two_mailboxes(tmp_path, new_mailbox, trickle.port, smtp_timeout=30)
    dovecot.deliver(noreq, message("Please register me", message_id="<pending-1@example.com>"))
    argv = engine_argv("once", "--config-dir", conf, "--data-dir", data)
    argv += ["--login", LOGIN, "--password", LOGIN_PASSWORD]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: trickle.connections == 1, 30, "the reply's SMTP connection")
        assert count_rows(data, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 1
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    handler, port = smtp
    cfg = conf / "noreq.xml"
    cfg.write_text(cfg.read_text().replace(f"<port>{trickle.port}</port>", f"<port>{port}</port>"))
    assert once(data, conf) == 0
    [(mail_from, rcpts, content)] = handler.received
    assert mail_from in ("", "<>") and rcpts == ["john.doe@example.com"]
    assert b"In-Reply-To: <pending-1@example.com>" in content
    [row] = _outbox(data)
    assert row["sent_at"] is not None and row["attempts"] == 1 and row["error"] is None
    assert [r["outcome"] for r in ledger(data)] == ["refused: replied"]


SMTP_PASSWORD = "smtp-Secret-42"


def _refused_message(tmp_path: Path, port: int, timeout: int = 5) -> tuple[Path, Path, Path]:
    """A data dir, a mailbox that refuses and replies through ``port`` (with SMTP auth), and
    a message file for it: (data, config, message)."""
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    cfg = mailbox_xml(
        tmp_path / "noreq.xml",
        port=110,
        user="noreq",
        password="pop-pw-1",
        createNewRequests="false",
        smtp=_smtp_xml(
            port, timeout, f"<userName>desk</userName><password>{SMTP_PASSWORD}</password>"
        ),
    )
    eml = tmp_path / "ask.eml"
    eml.write_bytes(message("Please register me"))
    return data, cfg, eml


def _ingest(
    data: Path,
    cfg: Path,
    eml: Path,
    *,
    retry_seconds: float = 60.0,
    max_attempts: int = 8,
    drain_seconds: float = 60.0,
) -> str:
    """One `ingest` run of the engine (a process start): the message (a duplicate after the
    first run), then the replies due; returns the message's outcome."""

    async def go() -> str:
        store = await open_store(data)
        try:
            settings = EngineSettings(
                data_dir=data,
                created_by=LOGIN,
                parse_processes=0,
                metrics=False,
                reply_retry_seconds=retry_seconds,
                reply_max_attempts=max_attempts,
                reply_drain_seconds=drain_seconds,
            )
            engine = Engine(store, settings)
            [(_, env)] = await engine.ingest(MailboxSource("noreq", cfg), [eml])
            return str(env.outcome)
        finally:
            await store.close()

    return anyio.run(go)


def test_a_refused_send_is_retried_after_a_growing_backoff_then_given_up(
    tmp_path: Path,
) -> None:
    """A 4xx answer: tried again by the first run after 1 s, then after 2 s more (runs in
    between send nothing), and failed for good after the third attempt. The stored error is
    the server's answer with the SMTP password it echoed scrubbed."""
    handler = Answers(f"451 4.3.0 busy, try later: {SMTP_PASSWORD}")
    logs.register_secret(SMTP_PASSWORD)

    def run() -> int:
        _ingest(data, cfg, eml, retry_seconds=1, max_attempts=3)
        return len(handler.rcpts)

    with _smtp_server(handler) as port:
        data, cfg, eml = _refused_message(tmp_path, port)
        assert _ingest(data, cfg, eml, retry_seconds=1, max_attempts=3) == "refused: replied"
        assert len(handler.rcpts) == 1
        assert run() == 1  # not due yet: the backoff holds
        wait_for(lambda: run() == 2, 10, "the second attempt")
        assert run() == 2
        wait_for(lambda: run() == 3, 10, "the third attempt")
        time.sleep(2.5)
        assert run() == 3  # failed for good: never again
    times = [t for t, _ in handler.rcpts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
    assert handler.received == []
    [row] = _outbox(data)
    assert row["attempts"] == 3 and row["sent_at"] is None and row["failed_at"] is not None
    assert row["error"].startswith("451 4.3.0 busy") and "********" in row["error"]
    assert SMTP_PASSWORD not in row["error"]


def test_a_permanent_refusal_fails_the_reply_at_once(tmp_path: Path) -> None:
    handler = Answers("550 5.1.1 no such user")
    with _smtp_server(handler) as port:
        data, cfg, eml = _refused_message(tmp_path, port)
        _ingest(data, cfg, eml, retry_seconds=0, max_attempts=8)
        _ingest(data, cfg, eml, retry_seconds=0, max_attempts=8)
    assert len(handler.rcpts) == 1
    [row] = _outbox(data)
    assert row["attempts"] == 1 and row["failed_at"] is not None
    assert row["error"] == "550 5.1.1 no such user"


def test_a_ca_file_without_certificates_fails_the_send_as_a_tls_error_retried_later(
    tmp_path: Path,
    data: Path,
) -> None:
    """The SMTP send builds its TLS context as POP3 does (engine.tls): the row says which
    caFile could not be loaded, as a POP3 outage would, and the reply is tried again later
    (the file may be put right meanwhile)."""
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n", encoding="utf-8")
    cfg = mailbox_xml(
        tmp_path / "noreq.xml",
        port=110,
        user="noreq",
        password="pop-pw-1",
        createNewRequests="false",
        smtp=_smtp_xml(1, 5, f"<useSsl>true</useSsl><caFile>{bad}</caFile>"),
    )
    eml = tmp_path / "ask.eml"
    eml.write_bytes(message("Please register me"))
    assert _ingest(data, cfg, eml) == "refused: replied"
    [row] = _outbox(data)
    assert row["attempts"] == 1 and row["sent_at"] is None and row["failed_at"] is None
    assert row["error"].startswith(f"TLSError: cannot load caFile {bad}: [X509: NO_CERTIFICATE")


def test_the_end_of_a_drain_cuts_a_send_under_way(tmp_path: Path, trickle: Trickle) -> None:
    """A run ends within its drain time (2 s here), even when a send under way was allowed
    90 s (3 x timeoutSeconds 30) by itself; the cut attempt is recorded, to be retried."""
    data, cfg, eml = _refused_message(tmp_path, trickle.port, timeout=30)
    started = time.monotonic()
    assert _ingest(data, cfg, eml, drain_seconds=2) == "refused: replied"
    assert time.monotonic() - started < 8
    assert trickle.connections == 1
    [row] = _outbox(data)
    assert row["attempts"] == 1 and row["sent_at"] is None and row["failed_at"] is None
    assert row["error"].startswith("no answer within the deadline of a send")


def test_migration_4_keeps_old_outbox_rows_verdicts(tmp_path: Path) -> None:
    """Rows written before the outbox became a queue: a failed one stays failed, a pending
    one is due now, and each is counted under its lower-cased address and domain."""
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "mailintegration.sqlite3")
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN;{script}PRAGMA user_version = {number};COMMIT;")
    old = "2026-11-27T09:00:00+00:00"
    for recipient, sent, error in [
        ("John@Example.com", None, None),
        ("a@b.example", None, "550 no"),
        ("c@d.example", old, None),
    ]:
        db.execute(
            "INSERT INTO outbox(mailbox, recipient, message_id, message, created_at, sent_at, "
            "error) VALUES ('m', ?, 'x@y', x'00', ?, ?, ?)",
            (recipient, old, sent, error),
        )
    db.commit()
    db.close()

    async def go() -> tuple[list[Any], str | None]:
        store = await open_store(data)
        try:
            async with store.transaction() as tx:
                return await tx.due_replies(["m"], exclude=[], limit=10)
        finally:
            await store.close()

    due, later = anyio.run(go)
    assert [r.recipient for r in due] == ["John@Example.com"] and later is None
    rows = _outbox(data)
    assert [r["rcpt_key"] for r in rows] == ["john@example.com", "a@b.example", "c@d.example"]
    assert [r["rcpt_domain"] for r in rows] == ["example.com", "b.example", "d.example"]
    assert [r["failed_at"] for r in rows] == [None, old, None]
