"""POP3 faults, from the scripted fake server: each fault, then a normal rerun, ends with every
message in the store exactly once, and the mailbox empty, or the message left untouched where
the server never confirmed a deletion.

The faults hit only the first session (``fault_sessions=1``): the rerun meets a healthy server.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    assert_exactly_once,
    attachment_bytes,
    ledger,
    mailbox_xml,
    message,
    once,
    requests,
    stored_digests,
)

from tools.fakepop3 import FakePOP3Server, Script


def three() -> list[bytes]:
    return [message(f"Fault case {i}", message_id=f"<fault-{i}@example.com>") for i in range(3)]


def box(tmp_path: Path, fake: FakePOP3Server, *, timeout: int = 5, **elements: Any) -> Path:
    return mailbox_xml(
        tmp_path / "box.xml", port=fake.port, user="u", password="p", timeout=timeout, **elements
    )


def mail(data: Path) -> list[dict[str, Any]]:
    return [r for r in requests(data) if r["kind"] == "mail"]


def outages(data: Path) -> list[tuple[str, str]]:
    return [(r["cause"], r["status"]) for r in requests(data) if r["kind"] == "outage"]


# Every fault here opens an outage event of its own (each test checks which): the exactly-once
# checks below allow them.


def committed_uidls(data: Path) -> set[str]:
    return {r["uidl"] for r in ledger(data)}


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"drop_after_dele": 1}, id="dropped-after-dele-before-quit"),
        pytest.param({"drop_after_quit": True}, id="dropped-after-quit-before-ok"),
        pytest.param({"quit_response": "-ERR [SYS/TEMP] could not expunge"}, id="err-to-quit"),
    ],
)
def test_unconfirmed_deletion_then_rerun(tmp_path: Path, data: Path, fault: dict[str, Any]) -> None:
    raws = three()
    with FakePOP3Server(Script(messages=raws, fault_sessions=1, **fault)) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 1
        fake.wait_idle()
        # The server never confirmed a deletion: every message is still there.
        assert fake.deleted == [] and fake.remaining == [1, 2, 3]
        # Whatever was committed is keyed; nothing was processed twice.
        assert committed_uidls(data) <= {"uid-1", "uid-2", "uid-3"}
        [(cause, status)] = outages(data)
        assert status == "new"
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert sorted(fake.deleted) == [1, 2, 3] and fake.remaining == []
    assert_exactly_once(data, raws, outages=True)
    assert outages(data) == [(cause, "processed")]


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"drop_after_quit": True}, id="dropped-after-quit-before-ok"),
        pytest.param({"quit_response": "-ERR [SYS/TEMP] could not expunge"}, id="err-to-quit"),
    ],
)
def test_with_nothing_deleted_quit_is_sent_and_its_answer_not_awaited(
    tmp_path: Path, data: Path, fault: dict[str, Any]
) -> None:
    """Only a QUIT after DELE has anything to confirm: a session that marked nothing
    deleted (an empty poll, mail already in the ledger is the other case) sends QUIT and
    closes, so whatever the server answers, or not, is no outage. With deletions the answer
    is read (test_unconfirmed_deletion_then_rerun)."""
    with FakePOP3Server(Script(messages=[], fault_sessions=1, **fault)) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert fake.commands[-1] == "QUIT"
    assert outages(data) == []


def test_stall_mid_retr_is_bounded_by_the_timeout(tmp_path: Path, data: Path) -> None:
    raws = three()
    script = Script(messages=raws, stall_on_retr=2, stall_timeout=30, fault_sessions=1)
    with FakePOP3Server(script) as fake:
        cfg = box(tmp_path, fake, timeout=2)
        started = time.monotonic()
        assert once(data, cfg) == 1
        assert time.monotonic() - started < 15  # the 2 s timeout, not the 30 s stall
        fake.wait_idle()
        assert fake.deleted == []
        # Message 2 was never received whole: it cannot be in the ledger.
        assert "uid-2" not in committed_uidls(data)
        assert outages(data) == [("timeout", "new")]
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert sorted(fake.deleted) == [1, 2, 3]
    assert_exactly_once(data, raws, outages=True)
    assert outages(data) == [("timeout", "processed")]


@pytest.mark.parametrize(
    ("response", "cause"),
    [
        ("-ERR [IN-USE] the mailbox is locked by another session", "mailbox-locked"),
        ("-ERR [SYS/TEMP] the index is being rebuilt, retry later", "server-temporary"),
    ],
)
def test_in_use_and_sys_temp_are_outages_then_the_rerun_works(
    tmp_path: Path, data: Path, response: str, cause: str
) -> None:
    raws = three()
    with FakePOP3Server(Script(messages=raws, auth_response=response, fault_sessions=1)) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 1
        fake.wait_idle()
        assert fake.deleted == [] and ledger(data) == []
        assert not any(c.startswith("RETR") for c in fake.commands)
        assert outages(data) == [(cause, "new")]
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert sorted(fake.deleted) == [1, 2, 3]
    assert_exactly_once(data, raws, outages=True)
    assert outages(data) == [(cause, "processed")]


def test_bare_lf_dot_line_is_content_and_keeps_the_session_in_step(
    tmp_path: Path, data: Path
) -> None:
    first, third = message("Before the odd one"), message("After the odd one")
    odd = (
        b"From: John Doe <john.doe@example.com>\r\n"
        b"To: support@example.com\r\n"
        b"Subject: Bare LF dot\r\n"
        b"Message-ID: <bare-lf-dot@example.com>\r\n"
        b"Date: Fri, 27 Nov 2026 09:12:44 -0500\r\n"
        b"\r\n"
        b"line one\n.\nstill the message\r\n"
        b".\nnot the end either\r\n"
        b"..stuffed\r\n"
        b"last line\r\n"
    )
    # On the wire: dot-stuffed at CRLF line starts only, then the real terminator.
    wire = b"+OK message follows\r\n" + odd.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    script = Script(messages=[first, odd, third], raw_retr_override={2: wire})
    with FakePOP3Server(script) as fake:
        cfg = box(tmp_path, fake, includeRawMessageAsAttachment="true")
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert sorted(fake.deleted) == [1, 2, 3]
        assert fake.errors == []
    assert_exactly_once(data, [first, odd, third], outages=True)
    by_subject = {r["subject"]: r for r in mail(data)}
    assert set(by_subject) == {"Before the odd one", "Bare LF dot", "After the odd one"}
    [raw_copy] = [a for a in by_subject["Bare LF dot"]["attachments"] if a["name"].endswith(".eml")]
    assert attachment_bytes(data, raw_copy["sha256"]) == odd
    assert "still the message" in by_subject["Bare LF dot"]["description"]
    assert "last line" in by_subject["Bare LF dot"]["description"]


def test_duplicate_uidl_quarantines_the_mailbox_until_repaired(tmp_path: Path, data: Path) -> None:
    raws = three()
    with FakePOP3Server(Script(messages=raws, uidls=["same", "same", "other"])) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 1
        assert once(data, cfg) == 1  # still broken: still nothing touched
        fake.wait_idle()
        assert fake.deleted == [] and ledger(data) == [] and mail(data) == []
        assert not any(c.startswith(("RETR", "DELE")) for c in fake.commands)
    assert outages(data) == [("duplicate-uidl", "new")]
    # The server's index repaired: the same messages, now with distinct UIDLs.
    with FakePOP3Server(Script(messages=raws, uidls=["a", "b", "c"])) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert sorted(fake.deleted) == [1, 2, 3]
    assert_exactly_once(data, raws, outages=True)
    assert outages(data) == [("duplicate-uidl", "processed")]


@pytest.mark.parametrize(
    "crash",
    [
        pytest.param({"drop_after_dele": 2}, id="dropped-after-dele"),
        pytest.param({"quit_response": "-ERR failed"}, id="err-to-quit"),
    ],
)
def test_without_uidl_messages_are_keyed_by_content_and_a_rerun_duplicates_nothing(
    tmp_path: Path, data: Path, crash: dict[str, Any]
) -> None:
    raws = three()
    script = Script(messages=raws, support_uidl=False, fault_sessions=1, **crash)
    with FakePOP3Server(script) as fake:
        cfg = box(tmp_path, fake)
        log = tmp_path / "engine.log"
        assert once(data, cfg, "--log-file", log) == 1
        fake.wait_idle()
        assert fake.deleted == []
        assert len(ledger(data)) == 3  # all committed, none confirmed deleted
        assert once(data, cfg, "--log-file", log) == 0
        fake.wait_idle()
        assert sorted(fake.deleted) == [1, 2, 3]
    assert_exactly_once(data, raws, outages=True)
    digests = {hashlib.sha256(m).hexdigest() for m in raws}
    assert {r["uidl"] for r in ledger(data)} == {f"x-sha256:{d}" for d in digests}
    text = log.read_text()
    assert "has no UIDL" in text


def test_list_size_unlike_the_retr_size_is_processed_normally(tmp_path: Path, data: Path) -> None:
    raws = three()
    script = Script(messages=raws, list_size_override={1: 10, 2: 10_000_000})
    with FakePOP3Server(script) as fake:
        cfg = box(tmp_path, fake)
        assert once(data, cfg) == 0
        fake.wait_idle()
        assert sorted(fake.deleted) == [1, 2, 3]
    assert_exactly_once(data, raws, outages=True)
    assert outages(data) == []


def test_a_stall_leaves_the_store_consistent(tmp_path: Path, data: Path) -> None:
    """After the stall and the rerun, the database is sound and no file is orphaned."""
    raws = [
        message(f"With file {i}", attachments=(("f.bin", "application/octet-stream", b"%d" % i),))
        for i in range(3)
    ]
    with FakePOP3Server(Script(messages=raws, stall_on_retr=3, fault_sessions=1)) as fake:
        cfg = box(tmp_path, fake, timeout=2)
        assert once(data, cfg) == 1
        assert once(data, cfg) == 0
    db = sqlite3.connect(data / "mailintegration.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        cited = {r[0] for r in db.execute("SELECT sha256 FROM attachments")}
    finally:
        db.close()
    rows, files = stored_digests(data)
    assert rows | files == cited
    assert_exactly_once(data, raws, outages=True)
