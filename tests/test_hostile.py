"""Hostile and broken servers (issue 12): nothing lost, nothing processed twice, every
session bounded in memory and time, and each fault an event, never a mailbox blocked for
good. Servers that misbehave on purpose are scripted (tools/fakepop3.py); Dovecot holds
what a real server can hold (a line of 1.5 MiB; mail the engine does not delete).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    cli,
    import_directory,
    ledger,
    mailbox_xml,
    message,
    once,
    requests,
)

from engine.gateways import pop3
from engine.gateways.pop3 import Pop3Gateway
from engine.items import DirectoryCheck
from engine.keys import uidl_key
from engine.store import open_store
from engine.store.schema import MIGRATIONS
from engine.supervisor import Engine, EngineSettings, MailboxSource
from engine.writer import Writer
from tools.fakepop3 import FakePOP3Server, Script

ROOT = Path(__file__).resolve().parent.parent


def box(tmp_path: Path, fake: FakePOP3Server, *, server_extra: str = "", **elements: Any) -> Path:
    return mailbox_xml(
        tmp_path / "box.xml",
        port=fake.port,
        user="u",
        password="p",
        server_extra=server_extra,
        **elements,
    )


def mail(data: Path) -> list[dict[str, Any]]:
    return [r for r in requests(data) if r["kind"] == "mail"]


def failures(data: Path) -> list[dict[str, Any]]:
    return [r for r in requests(data) if r["kind"] == "message-failure"]


def outages(data: Path) -> list[tuple[str, str]]:
    return [(r["cause"], r["status"]) for r in requests(data) if r["kind"] == "outage"]


def outcomes(data: Path) -> dict[str, str]:
    return {r["uidl"]: r["outcome"] for r in ledger(data)}


def retrs(fake: FakePOP3Server) -> list[str]:
    return [c for c in fake.commands if c.startswith(("RETR", "TOP"))]


# -- 1. UIDLs are keyed injectively; a known UIDL is checked before it is deleted ------------


@pytest.mark.parametrize(
    ("first", "second"),
    [(b"abc x", b"abc y"), (b"id\xff", b"id\xfe")],
    ids=["after-a-space", "8-bit-bytes"],
)
def test_uidls_that_differ_after_a_space_or_in_8bit_bytes_are_two_messages(
    tmp_path: Path, data: Path, first: bytes, second: bytes
) -> None:
    """Cut at the first space and decoded ascii/replace, the second UIDL was the first's key:
    the second message was deleted unfetched, and the run exited 0."""
    a, b = message("First under UIDL"), message("Second under a near UIDL")
    with FakePOP3Server(Script(messages=[a], uidls=[first])) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 0
        fake.add_message(b, second)
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == []
    assert sorted(r["subject"] for r in mail(data)) == [
        "First under UIDL",
        "Second under a near UIDL",
    ]
    assert sorted(outcomes(data)) == sorted([uidl_key(first), uidl_key(second)])


def test_a_server_uidl_never_equals_a_key_the_engine_made(tmp_path: Path, data: Path) -> None:
    """``ingest`` keys a file by "sha256:" and its hash, in the mailbox's account: a server
    listing another message under that very text as its UIDL found it "known" and deleted
    it unfetched. Server UIDLs with a reserved prefix are escaped."""
    replayed = message("Replayed from a file")
    path = tmp_path / "replay.eml"
    path.write_bytes(replayed)
    lookalike = f"sha256:{hashlib.sha256(replayed).hexdigest()}"
    other = message("Listed under a look-alike UIDL")
    with FakePOP3Server(Script(messages=[other], uidls=[lookalike])) as fake:
        cfg = box(tmp_path, fake)
        login = ("--login", LOGIN, "--password", LOGIN_PASSWORD)
        assert cli("ingest", path, "--config", cfg, "--data-dir", data, *login)[0] == 0
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == []
    assert sorted(r["subject"] for r in mail(data)) == [
        "Listed under a look-alike UIDL",
        "Replayed from a file",
    ]
    assert sorted(outcomes(data)) == sorted([lookalike, uidl_key(lookalike.encode())])


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "other-size"])
def test_a_reused_uidl_is_checked_and_its_new_message_processed_once(
    tmp_path: Path, data: Path, same_size: bool
) -> None:
    """A server reusing a UIDL for a new message: the ledger's size and Message-ID (TOP) say
    it is another message; it is fetched, its hash compared, and processed under a key of its
    own. Nothing lost, nothing processed twice, also when the new one is listed again."""
    old = message("Old message AAAA", message_id="<old@example.com>")
    new = message(
        "New message BBBB" if same_size else "New, longer", message_id="<new@example.com>"
    )
    assert (len(old) == len(new)) == same_size
    with FakePOP3Server(Script(messages=[old], uidls=["u1"])) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 0
        fake.add_message(new, "u1")  # the server gives the UIDL to another message
        log = tmp_path / "engine.log"
        assert once(data, cfg, "--log-file", log) == 0
        fake.wait_idle()
        assert fake.remaining == []
        assert ("TOP 1 0" in fake.commands) == same_size  # checked by its header first
    assert sorted(r["subject"] for r in mail(data)) == sorted(
        ["Old message AAAA", "New message BBBB" if same_size else "New, longer"]
    )
    keys = outcomes(data)
    assert keys["u1"] == "created"
    assert keys[f"x-reused:u1:{hashlib.sha256(new).hexdigest()}"] == "created"
    assert "lists another message under this UIDL" in log.read_text()


def test_a_known_message_kept_by_the_server_is_deleted_again_without_fetching(
    tmp_path: Path, data: Path
) -> None:
    """The same size and Message-ID as the ledger's row: deleted again, not even fetched."""
    raws = [message(f"Stays {i}", message_id=f"<stays-{i}@example.com>") for i in range(3)]
    with FakePOP3Server(Script(messages=raws, quit_response="-ERR no", fault_sessions=1)) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 1  # committed, but the QUIT failed: all still there
        before = len(fake.commands)
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == []
        second = fake.commands[before:]
    assert not any(c.startswith("RETR") for c in second)
    assert sorted(c for c in second if c.startswith("TOP")) == ["TOP 1 0", "TOP 2 0", "TOP 3 0"]
    assert len(mail(data)) == 3


# -- 3. One account, whatever the spelling of the server's name --------------------------------


def test_a_change_of_host_spelling_or_port_processes_nothing_twice(
    mailbox: Mailbox, dovecot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a server that keeps mail (here the engine's DELE does nothing, Dovecot holds
    the messages), 127.0.0.1, localhost, LOCALHOST and POP3S on another port are one
    account: 2 requests for 2 messages, not 8."""
    mailbox.deliver(message("Spelling one"), message("Spelling two"))
    monkeypatch.setattr(Pop3Gateway, "dele_many", lambda self, numbers: None)
    data, user = mailbox.data, mailbox.user
    spellings = [
        ("127.0.0.1", dovecot.pop3_port, False),
        ("localhost", dovecot.pop3_port, False),
        ("LOCALHOST", dovecot.pop3_port, False),
        ("localhost", dovecot.pop3s_port, True),
    ]
    for i, (host, port, tls) in enumerate(spellings):
        mailbox.configure(
            host=host,
            port=port,
            use_ssl=tls,
            server_extra=f"    <caFile>{dovecot.ca_file}</caFile>\n" if tls else "",
        )
        assert mailbox.once() == 0, (i, host, port)
        assert dovecot.count(user) == 2
    assert sorted(r["subject"] for r in mail(data)) == ["Spelling one", "Spelling two"]
    assert {r["account"] for r in ledger(data)} == {f"{user}@localhost"}


def test_migration_3_moves_old_ledger_keys_to_the_account_without_port(tmp_path: Path) -> None:
    """Rows keyed user@host:port before migration 3 are found under the new account: the
    session deletes them as known instead of processing them again. Two spellings of one
    message keep one row; no other row is lost."""
    raws = [message("Before the upgrade 1"), message("Before the upgrade 2")]
    db = tmp_path / "old" / "mailintegration.sqlite3"
    db.parent.mkdir()
    con = sqlite3.connect(db, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        con.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    rows = [
        ("u@127.0.0.1:110", "uid-1", raws[0]),
        ("u@LOCALHOST:995", "uid-1", raws[0]),  # the same message, another spelling
        ("u@localhost:995", "uid-2", raws[1]),
        ("a@b@Pop.Example.com.:110", "uid-1", b"other account"),
        ("u@[::1]:110", "uid-9", b"ipv6 loopback"),
    ]
    for account, uidl, raw in rows:
        con.execute(
            "INSERT INTO ledger(account, uidl, mailbox, sha256, outcome, processed_at) "
            "VALUES (?, ?, 'box', ?, 'created', '2026-01-01')",
            (account, uidl, hashlib.sha256(raw).hexdigest()),
        )
    con.close()

    async def migrate() -> None:
        store = await open_store(db.parent)
        await store.close()

    anyio.run(migrate)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    got = sorted(con.execute("SELECT account, uidl FROM ledger").fetchall())
    con.close()
    assert got == [
        ("a@b@pop.example.com", "uid-1"),
        ("u@localhost", "uid-1"),
        ("u@localhost", "uid-2"),
        ("u@localhost", "uid-9"),
    ]
    # And the store in use: a session against the same two messages, as 127.0.0.1.
    import_directory(db.parent, tmp_path)
    with FakePOP3Server(Script(messages=raws)) as fake:
        cfg = box(tmp_path, fake)
        assert once(db.parent, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == []
    assert mail(db.parent) == []  # known: deleted, not processed again


def test_a_mailbox_whose_server_name_changes_keeps_its_ledger_account(tmp_path: Path) -> None:
    """pop.example.com becomes 10.0.0.5 with the same user: the new account has no rows, the
    old one has, so the mailbox keeps the old one (and warns). accountId is taken as given,
    and the first time, the mailbox's rows move to it: nothing known is forgotten."""
    import_directory(tmp_path / "data", tmp_path)

    def cfg(host: str, extra: str = "") -> Any:
        from engine.config import load_mailbox

        path = mailbox_xml(
            tmp_path / "box.xml", host=host, port=110, user="u", password="p", server_extra=extra
        )
        return load_mailbox(path, name="box")

    async def go() -> list[str]:
        store = await open_store(tmp_path / "data")
        writer = Writer(store, created_by=LOGIN)
        got = []
        try:
            for mailbox in (
                cfg("pop.example.com"),
                cfg("10.0.0.5"),
                cfg("10.0.0.5", "    <accountId>desk</accountId>\n"),
            ):
                check = DirectoryCheck(mailbox=mailbox)
                await writer.apply([check])
                got.append(check.account)
                if len(got) == 1:
                    async with store.transaction() as tx:
                        await tx.record_ledger(
                            account=check.account,
                            uidl="uid-1",
                            mailbox="box",
                            message_id=None,
                            sha256="0" * 64,
                            outcome="created",
                            request_number=None,
                        )
        finally:
            await store.close()
        return got

    assert anyio.run(go) == ["u@pop.example.com", "u@pop.example.com", "desk"]
    assert [(r["account"], r["uidl"]) for r in ledger(tmp_path / "data")] == [("desk", "uid-1")]


# -- 10, 11, 13. Messages bounded while they are read; cut-off messages stay on the server ----


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_engine(
    *args: str | Path, timeout: float, kill_above_kib: int
) -> tuple[int | None, int, float, str]:
    """``python -m engine ARGS`` with its peak RSS (VmHWM from /proc, polled every 20 ms);
    killed past ``timeout`` seconds or ``kill_above_kib`` (the unbounded engine would take
    the machine): (exit code or None if killed, peak KiB, seconds, stderr)."""
    env = {**os.environ, "MAILINTEGRATION_LOGIN": LOGIN, "MAILINTEGRATION_PASSWORD": LOGIN_PASSWORD}
    started = time.monotonic()
    err = open(os.devnull, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak, killed = 0, False
    try:
        while proc.poll() is None:
            peak = max(peak, _status_kib(proc.pid, "VmHWM"))
            if peak > kill_above_kib or time.monotonic() - started > timeout:
                proc.kill()
                killed = True
                break
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=30)
    finally:
        err.close()
        if proc.poll() is None:
            proc.kill()
    return (
        None if killed else proc.returncode,
        peak,
        time.monotonic() - started,
        stderr.decode(errors="replace"),
    )


def test_list_sizes_that_lie_do_not_defeat_the_byte_budget(tmp_path: Path, data: Path) -> None:
    """48 messages listed at 10 bytes, really 20 MB each: each is cut off at its read bound
    (twice the listed size and 1 MiB) while it is read, the rest dropped; the byte budget
    counts what is held. Peak RSS of `once` stays under 250 MiB (1.96 GB before). Each
    becomes a failure event and is left on the server."""
    raws = [message(f"Lying size {i}") for i in range(48)]
    ids = range(1, 49)
    script = Script(
        messages=raws,
        list_size_override=dict.fromkeys(ids, 10),
        padding=dict.fromkeys(ids, 20_000_000),
    )
    with FakePOP3Server(script) as fake:
        cfg = box(
            tmp_path, fake, server_extra="    <sessionTimeoutSeconds>120</sessionTimeoutSeconds>\n"
        )
        code, peak, seconds, err = run_engine(
            "once",
            "--config",
            cfg,
            "--data-dir",
            data,
            "--parse-processes",
            "0",
            timeout=110,
            kill_above_kib=600 * 1024,
        )
        fake.wait_idle()
        assert fake.remaining == list(ids) and fake.deleted == []
    assert code == 1, err
    assert peak < 250 * 1024, f"peak RSS {peak / 1024:.0f} MiB"
    print(f"lying LIST sizes: peak RSS {peak / 1024:.0f} MiB, {seconds:.1f} s")
    assert set(outcomes(data).values()) == {"kept: larger-than-listed"}
    assert len(failures(data)) == 48 and mail(data) == []
    sizes = {a["size"] for r in failures(data) for a in r["attachments"]}
    assert max(sizes) <= 20 + 1024 * 1024


def test_a_message_larger_than_listed_is_taken_whole_by_the_next_session(
    tmp_path: Path, data: Path
) -> None:
    """Cut off once (larger than its LIST size said), it is known to need 3 MB, which fits
    maxMessageBytes: the next session reads it whole. Its failure event says so; its ledger
    row becomes the request's."""
    raws = [
        message(
            "Listed small, is big", attachments=(("a.bin", "application/pdf", b"%" * 3_000_000),)
        )
    ]
    with FakePOP3Server(Script(messages=raws, list_size_override={1: 10})) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 1
        assert fake.remaining == [1]
        assert outcomes(data) == {"uid-1": "kept: larger-than-listed"}
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == []
    [created] = mail(data)
    assert created["attachments"][0]["size"] == 3_000_000
    [failure] = failures(data)
    assert any("taken whole" in a["body"] for a in failure["activities"])
    [row] = ledger(data)
    assert (row["outcome"], row["request_number"]) == ("created", created["number"])


def test_a_message_over_max_bytes_is_left_on_the_server_until_the_limit_is_raised(
    tmp_path: Path, data: Path
) -> None:
    """Listed over maxMessageBytes: never RETRed, only its header (TOP n 0) for the failure
    event; it stays on the server and later sessions leave it alone (no RETR, no TOP, no new
    activity). Raised limit: the next session takes it and processes it."""
    big = message("Too big for now", body="x" * 5000 + "\n")
    small = message("Small one")
    with FakePOP3Server(Script(messages=[big, small])) as fake:
        cfg = box(tmp_path, fake, maxMessageBytes="2048")
        assert once(data, cfg) == 1
        fake.wait_idle()
        assert fake.remaining == [1] and "RETR 1" not in fake.commands
        [failure] = failures(data)
        assert failure["cause"] == "limit-exceeded"
        assert (
            "Too big for now" in failure["subject"] or "Too big for now" in failure["description"]
        )
        [head] = failure["attachments"]
        assert head["name"] == "message-start.eml" and head["size"] < 2048
        assert outcomes(data) == {"uid-1": "kept: too-large", "uid-2": "created"}
        before = len(fake.commands)
        assert once(data, cfg) == 0  # left alone: nothing new, nothing to report
        assert not [c for c in fake.commands[before:] if c.startswith(("RETR", "TOP"))]
        assert len(failures(data)[0]["activities"]) == 0
        cfg = box(tmp_path, fake, maxMessageBytes="1048576")
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == []
    assert sorted(r["subject"] for r in mail(data)) == ["Small one", "Too big for now"]
    assert outcomes(data)["uid-1"] == "created"
    assert "taken whole" in failures(data)[0]["activities"][0]["body"]


def test_without_uidl_a_message_left_on_the_server_adds_nothing_on_each_session(
    tmp_path: Path, data: Path
) -> None:
    """A server without UIDL: the message over maxMessageBytes cannot be recognised before
    its header is read, so it is read again each session; found the same, it adds nothing
    (no activity every poll), and it is never deleted."""
    big = message("Big, no UIDL", body="x" * 5000 + "\n")
    with FakePOP3Server(Script(messages=[big], support_uidl=False)) as fake:
        cfg = box(tmp_path, fake, maxMessageBytes="2048")
        assert once(data, cfg) == 1
        for _ in range(2):
            assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == [1] and not any(c.startswith("RETR") for c in fake.commands)
    [failure] = failures(data)
    assert failure["activities"] == []
    assert list(outcomes(data).values()) == ["kept: too-large"]


def test_an_endless_retr_is_bounded_recorded_and_skipped_from_then_on(
    tmp_path: Path, data: Path
) -> None:
    """A RETR that never ends: at most its cap is kept, and once the bytes past it exceed
    the drop limit the session gives up (3 GB in 20 s before). The message is recorded as
    left on the server first, so the next session skips it and takes the others."""
    raws = [message(f"Around the endless one {i}") for i in range(3)]
    with FakePOP3Server(Script(messages=raws, endless_retr=2)) as fake:
        cfg = box(tmp_path, fake)
        code, peak, seconds, err = run_engine(
            "once",
            "--config",
            cfg,
            "--data-dir",
            data,
            timeout=60,
            kill_above_kib=600 * 1024,
        )
        assert code == 1, err
        assert peak < 200 * 1024, f"peak RSS {peak / 1024:.0f} MiB"
        print(f"endless RETR: peak RSS {peak / 1024:.0f} MiB, {seconds:.1f} s")
        assert outages(data) == [("protocol", "new")]
        assert outcomes(data) == {"uid-2": "kept: too-large"}
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == [2]
    assert sorted(r["subject"] for r in mail(data)) == [
        "Around the endless one 0",
        "Around the endless one 2",
    ]
    assert outages(data) == [("protocol", "processed")]


def test_an_endless_listing_is_bounded(tmp_path: Path, data: Path) -> None:
    """A LIST that never ends: the first lines are kept, the rest dropped up to a bound,
    then the session is a protocol outage; memory stays flat."""
    with FakePOP3Server(Script(messages=[message("Listed")], endless_list=True)) as fake:
        cfg = box(tmp_path, fake)
        code, peak, seconds, err = run_engine(
            "once",
            "--config",
            cfg,
            "--data-dir",
            data,
            timeout=90,
            kill_above_kib=600 * 1024,
        )
    assert code == 1, err
    assert peak < 200 * 1024, f"peak RSS {peak / 1024:.0f} MiB"
    print(f"endless LIST: peak RSS {peak / 1024:.0f} MiB, {seconds:.1f} s")
    [(cause, _)] = outages(data)
    assert cause == "protocol"
    assert "without its end" in requests(data)[0]["description"]


def test_a_listing_over_the_session_limit_is_taken_in_parts(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More messages than a session takes (100,000; 5 here): the first ones now, the rest
    in the next session; none lost, none twice."""
    monkeypatch.setattr(pop3, "MAX_LISTED", 5)
    raws = [message(f"Backlog {i}") for i in range(8)]
    with FakePOP3Server(Script(messages=raws)) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == [6, 7, 8]
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == []
    assert sorted(r["subject"] for r in mail(data)) == sorted(f"Backlog {i}" for i in range(8))


def test_a_line_over_the_limit_fails_that_message_only(mailbox: Mailbox) -> None:
    """A message with a 1.5 MiB line (in a real Dovecot) is a failure event with its first
    bytes up to the limit, and stays on the server; the messages around it are processed,
    and later sessions skip it (a protocol outage every run before, and the mailbox blocked)."""
    long_line = b"A" * (1536 * 1024)
    odd = message("Long line").replace(b"Hello, it does not work.", long_line)
    mailbox.deliver(message("Before the long line"), odd, message("After the long line"))
    data = mailbox.data
    assert mailbox.once() == 1
    assert mailbox.left() == 1
    assert sorted(r["subject"] for r in mail(data)) == [
        "After the long line",
        "Before the long line",
    ]
    [failure] = failures(data)
    assert "line longer than 1048576 bytes" in failure["description"]
    [start] = failure["attachments"]
    assert start["name"] == "message-start.eml"
    assert 1024 * 1024 < start["size"] < 1024 * 1024 + 4096
    assert sorted(outcomes(data).values()) == ["created", "created", "kept: line-too-long"]
    assert mailbox.once() == 0
    assert mailbox.left() == 1
    assert len(failures(data)) == 1 and failures(data)[0]["activities"] == []
    assert outages(data) == []


# -- 12. Every session has a deadline -------------------------------------------------------


@pytest.mark.parametrize("where", ["retr", "greeting"])
def test_a_trickling_server_is_cut_off_at_the_session_deadline(
    tmp_path: Path, data: Path, where: str
) -> None:
    """One byte a second meets no per-read timeout: `once` ran past 75 s holding the data
    directory's lock. Now it ends at the deadline (4 s here) plus a little, as a `timeout`
    outage; the rerun against a healthy server takes everything, once."""
    raws = [message(f"Trickle {i}") for i in range(3)]
    fault = {"trickle_retr": 2} if where == "retr" else {"trickle_greeting": True}
    with FakePOP3Server(Script(messages=raws, fault_sessions=1, **fault)) as fake:
        cfg = box(
            tmp_path, fake, server_extra="    <sessionTimeoutSeconds>4</sessionTimeoutSeconds>\n"
        )
        code, _, seconds, err = run_engine(
            "once", "--config", cfg, "--data-dir", data, timeout=40, kill_above_kib=2 << 20
        )
        assert code == 1, err
        assert seconds < 4 + 8, f"{seconds:.1f} s"
        print(f"trickle ({where}): once ended after {seconds:.1f} s")
        assert fake.deleted == []
        assert outages(data) == [("timeout", "new")]
        assert "deadline of 4 s" in requests(data)[0]["description"]
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.remaining == []
    assert sorted(r["subject"] for r in mail(data)) == [f"Trickle {i}" for i in range(3)]
    assert outages(data) == [("timeout", "processed")]


# -- 17c. A server that says +OK to DELE but keeps the mail ---------------------------------


def test_a_server_that_keeps_deleted_mail_is_reported_once_and_nothing_is_processed_twice(
    tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raws = [message(f"Kept by the server {i}") for i in range(3)]
    with FakePOP3Server(Script(messages=raws, dele_keeps=True)) as fake:
        cfg = box(tmp_path, fake)

        async def go() -> list[float]:
            store = await open_store(data)
            engine = Engine(store, EngineSettings(data_dir=data, created_by=LOGIN))
            gauge = []
            try:
                for _ in range(3):
                    [outcome] = await engine.once([MailboxSource("box", cfg)])
                    assert outcome.error is None
                    assert engine.metrics is not None
                    value = engine.metrics.registry.get_sample_value(
                        "mailintegration_server_kept_deleted", {"mailbox": "box"}
                    )
                    gauge.append(value if value is not None else -1.0)
            finally:
                await store.close()
            return gauge

        with caplog.at_level(logging.WARNING, logger="engine.supervisor"):
            assert anyio.run(go) == [0, 3, 3]
        fake.wait_idle()
        assert fake.remaining == [1, 2, 3]
        assert sum(c == "RETR 1" for c in fake.commands) == 1  # checked by TOP since
    warned = [r for r in caplog.records if "keeps deleted mail" in r.getMessage()]
    assert len(warned) == 1 and "box" in warned[0].getMessage()
    assert len(mail(data)) == 3
    assert all(r["deleted_at"] for r in ledger(data))
    code, out = cli("status", "--data-dir", data, "--json")
    assert code == 0 and '"server_kept_deleted": 3' in out
    code, out = cli("status", "--data-dir", data)
    assert re.search(r"server keeps 3 deleted message", out)


# -- Other answers of a session, bounded the same way ---------------------------------------


@pytest.mark.parametrize(
    ("script", "cause", "says"),
    [
        ({"capabilities": [f"X-CAP-{i}" for i in range(5000)]}, "protocol", "without its end"),
        ({"auth_response": "-ERR " + "x" * (2 << 20)}, "protocol", "line over"),
        ({"greeting": "+OK " + "y" * (2 << 20)}, "protocol", "line over"),
    ],
    ids=["endless-capa", "huge-err-line", "huge-greeting"],
)
def test_other_answers_are_bounded_too(
    tmp_path: Path, data: Path, script: dict[str, Any], cause: str, says: str
) -> None:
    with FakePOP3Server(Script(messages=[message("Never reached")], **script)) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 1
        fake.wait_idle()
        assert fake.remaining == [1]
    [outage] = [r for r in requests(data) if r["kind"] == "outage"]
    assert outage["cause"] == cause and says in outage["description"]
    assert len(outage["description"]) < 4000
