"""The Mailboxes page's lag and oldest waiting message (issue 19): each message's arrival at
the mail server (IMAP's INTERNALDATE, POP3's top Received field) recorded in the ledger
beside processed_at, bounded against our clock; the store's lag per mailbox in SQLite and
PostgreSQL; the daemon's backlog of messages listed and left for a later session."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from support import (
    LOGIN,
    Mailbox,
    both,
    import_directory,
    ledger,
    mailbox_xml,
    message,
    open_test_store,
)
from test_console import CONSOLE_USERS, log_in

from engine.console import Console, create_app
from engine.console.app import duration
from engine.console.security import session_key
from engine.gateways.imap import internal_date
from engine.ops import Health
from engine.parse.headers import RECEIVED_FIELD_BYTES, RECEIVED_SCAN_BYTES, received_at
from engine.store import Store, open_store
from engine.store.sqlite import arrived_text
from engine.supervisor import Engine, EngineSettings, MailboxSource
from tools.fakepop3 import FakePOP3Server, Script

pytestmark = pytest.mark.dovecot


def received(ago: timedelta, raw: bytes) -> bytes:
    """``raw`` as our mail server would hand it on: a Received field on top, dated ``ago``
    before now (negative: in the future)."""
    at = format_datetime(datetime.now(UTC) - ago)
    field = (
        "Received: from mx.example.com (mx [192.0.2.1])\r\n"
        f"\tby mail.example.com with ESMTP id 4Xy; {at}\r\n"
    )
    return field.encode() + raw


def deliver_at(box: Mailbox, raw: bytes, mtime: float) -> None:
    """Deliver ``raw`` with its file's mtime at ``mtime``: Dovecot's maildir takes the file's
    mtime as the message's INTERNALDATE (when it reached the server)."""
    name = box.dovecot.deliver(box.user, raw)
    path = box.dovecot.maildir(box.user) / "new" / name
    os.utime(path, (mtime, mtime))
    box.delivered.append(raw)


async def mailboxes_page(store: Store, data: Path, health: Health | None = None) -> str:
    app = create_app(Console(store, session_key(data), health=health))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
        await log_in(client)
        return (await client.get("/mailboxes")).text


def page_of(data: Path) -> str:
    import_directory(data, data.parent, CONSOLE_USERS)

    async def go() -> str:
        store = await open_test_store(data)
        try:
            return await mailboxes_page(store, data)
        finally:
            await store.close()

    return anyio.run(go)


def row(page: str, mailbox: str) -> str:
    found = re.search(rf'data-mailbox="{mailbox}">(.*?)</tr>', page, re.S)
    assert found, page
    return found.group(1)


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# -- recorded in the ledger and shown ------------------------------------------------------


@both
def test_a_delivered_message_ends_with_its_arrival_and_the_page_shows_the_lag(
    mailbox: Mailbox, gateway: str
) -> None:
    """IMAP records the server's INTERNALDATE (the file's mtime: 7 minutes ago); POP3, which
    has none, the top Received field (5 minutes ago)."""
    seven_ago = time.time() - 7 * 60
    deliver_at(mailbox, received(timedelta(minutes=5), message("Printer jammed")), seven_ago)
    mailbox.once()
    [entry] = ledger(mailbox.data)
    assert entry["outcome"] == "created"
    lag = seconds(entry["processed_at"]) - seconds(entry["arrived_at"])
    expected = 7 * 60 if gateway == "imap" else 5 * 60
    assert expected - 2 <= lag <= expected + 60, (entry["arrived_at"], entry["processed_at"])
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row(page_of(mailbox.data), "m"), re.S)
    minutes = expected // 60
    assert re.match(rf"{minutes} min \d\d s / {minutes} min \d\d s", cells[4]), cells
    assert "(1 message)" in cells[4]


@both
def test_a_message_left_on_the_server_records_its_arrival_too(
    mailbox: Mailbox, gateway: str
) -> None:
    """Over maxMessageBytes: only its header is read, and its arrival comes with it."""
    mailbox.configure(maxMessageBytes="2048")
    mailbox.deliver(received(timedelta(minutes=3), message("Too big", body="x" * 20_000)))
    mailbox.once()
    [entry] = ledger(mailbox.data)
    assert entry["outcome"].startswith("kept")
    assert entry["arrived_at"] is not None
    assert mailbox.left() == 1


def test_a_received_date_in_the_future_never_gives_a_negative_lag(mailbox: Mailbox) -> None:
    """Within a minute ahead of our clock: taken as arriving when recorded (a lag of 0);
    further ahead: not believed (no arrival). The page shows no negative time."""
    mailbox.deliver(
        received(timedelta(seconds=-30), message("Slightly ahead")),
        received(timedelta(hours=-5), message("Far ahead")),
    )
    mailbox.once()
    rows = {r["message_id"]: r for r in ledger(mailbox.data)}
    assert len(rows) == 2
    by_subject = sorted(rows.values(), key=lambda r: r["id"])
    ahead, far = by_subject
    assert ahead["arrived_at"] == ahead["processed_at"]
    assert far["arrived_at"] is None
    cell = re.findall(r"<td[^>]*>(.*?)</td>", row(page_of(mailbox.data), "m"), re.S)[4]
    assert cell.startswith("0 s / 0 s") and "(1 message)" in cell, cell
    assert "-" not in cell


def test_a_message_without_received_has_no_arrival_and_no_crash(mailbox: Mailbox) -> None:
    mailbox.deliver(message("No trace"), b"Received: by nothing in particular\r\n" + message("x"))
    mailbox.once()
    entries = ledger(mailbox.data)
    assert [e["outcome"] for e in entries] == ["created", "created"]
    assert [e["arrived_at"] for e in entries] == [None, None]
    cell = re.findall(r"<td[^>]*>(.*?)</td>", row(page_of(mailbox.data), "m"), re.S)[4]
    assert "no arrival known" in cell


# -- the pieces, on hostile input ----------------------------------------------------------


def test_received_at_reads_only_the_top_field_of_the_header_and_is_bounded() -> None:
    top = received_at(
        b"Return-Path: <a@example.com>\r\n"
        b"Received: from a\r\n by b with ESMTP;\r\n Fri, 04 Dec 2026 21:00:00 +0100\r\n"
        b"Received: from c; Thu, 03 Dec 2026 10:00:00 +0000\r\n"
        b"Subject: x\r\n\r\nbody\r\n"
    )
    assert top == datetime(2026, 12, 4, 20, 0, tzinfo=UTC)
    # In the body only: not a Received field of the message.
    assert (
        received_at(b"Subject: x\r\n\r\nReceived: a; Fri, 04 Dec 2026 21:00:00 +0000\r\n") is None
    )
    assert received_at(b"\r\nReceived: a; Fri, 04 Dec 2026 21:00:00 +0000\r\n") is None
    for bad in (
        b"Received: a; not a date at all\r\n\r\n",
        b"Received: no semicolon, Fri, 04 Dec 2026 21:00:00 +0000\r\n\r\n",
        b"Received: a; Fri, 31 Feb 2026 21:00:00 +0000\r\n\r\n",
        b"Received: a; Fri, 04 Dec 99999 21:00:00 +0000\r\n\r\n",
        b"Received: a; \xff\xfe\x00\r\n\r\n",
        b"",
    ):
        assert received_at(bad) is None, bad
    # Beyond the bytes it reads: not found, not read.
    late = b"X-Filler: " + b"y" * RECEIVED_SCAN_BYTES + b"\r\n"
    assert received_at(late + b"Received: a; Fri, 04 Dec 2026 21:00:00 +0000\r\n\r\n") is None
    folded = b"Received: a\r\n" + b" x\r\n" * RECEIVED_FIELD_BYTES
    assert received_at(folded + b" ; Fri, 04 Dec 2026 21:00:00 +0000\r\n\r\n") is None


def test_internal_date_reads_rfc3501_date_time_and_refuses_nonsense() -> None:
    line = b'* 3 FETCH (UID 9 INTERNALDATE " 4-Dec-2026 21:00:00 -0130" BODY[] {120}\r\n'
    assert internal_date(line) == datetime(2026, 12, 4, 22, 30, tzinfo=UTC)
    for bad in (
        b'INTERNALDATE "31-Feb-2026 21:00:00 +0000"',
        b'INTERNALDATE "04-Dex-2026 21:00:00 +0000"',
        b'INTERNALDATE "04-Dec-2026 21:00:00 +9900"',
        b"* 3 FETCH (UID 9 BODY[] {120}",
    ):
        assert internal_date(bad) is None, bad


def test_an_arrival_is_bounded_by_the_time_it_is_recorded() -> None:
    at = "2026-12-04T21:00:00+00:00"
    recorded = datetime.fromisoformat(at)
    assert arrived_text(None, at) is None
    assert arrived_text(recorded - timedelta(minutes=5), at) == "2026-12-04T20:55:00+00:00"
    assert arrived_text(recorded + timedelta(seconds=59), at) == at
    assert arrived_text(recorded + timedelta(seconds=61), at) is None
    # No zone: UTC; another zone: converted.
    assert arrived_text(datetime(2026, 12, 4, 20, 0), at) == "2026-12-04T20:00:00+00:00"
    east = datetime(
        2026, 12, 4, 21, 30, tzinfo=datetime.fromisoformat("2026-01-01T00:00+01:00").tzinfo
    )
    assert arrived_text(east, at) == "2026-12-04T20:30:00+00:00"
    assert arrived_text(datetime(1, 1, 1, 0, 0, tzinfo=east.tzinfo), at) is None


def test_duration_reads_as_a_short_lag() -> None:
    assert [duration(s) for s in (0, 42, 303, 7500, 273600, -5)] == [
        "0 s",
        "42 s",
        "5 min 03 s",
        "2 h 05 min",
        "3 d 04 h",
        "0 s",
    ]


# -- the store's read, in both stores ------------------------------------------------------


def test_the_lag_reads_agree_in_sqlite_and_postgresql(store: str, mailbox: Mailbox) -> None:
    """Median (the lower one of an even count) and longest, over the rows whose arrival is
    known, as computed here from the ledger's own rows."""
    agos = (
        timedelta(seconds=100),
        timedelta(seconds=200),
        timedelta(seconds=400),
        timedelta(hours=3),
    )
    mailbox.deliver(*(received(a, message(f"Lag {i}")) for i, a in enumerate(agos)))
    mailbox.deliver(message("No arrival"), received(timedelta(hours=-2), message("Ahead")))
    mailbox.once()
    entries = ledger(mailbox.data)
    assert len(entries) == 6
    lags = sorted(
        round(seconds(e["processed_at"]) - seconds(e["arrived_at"]))
        for e in entries
        if e["arrived_at"] is not None
    )
    assert len(lags) == 4 and 100 <= lags[0] <= 160 and lags[-1] >= 3 * 3600

    async def reads() -> tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]]]:
        st = await open_test_store(mailbox.data)
        try:
            return await st.lag_since("2000-01-01"), await st.lag_since("2999-01-01")
        finally:
            await st.close()

    since_ever, since_future = anyio.run(reads)
    assert since_ever == {"m": (lags[1], lags[-1], 4)}
    assert since_future == {}


# -- the daemon's backlog ------------------------------------------------------------------


def test_the_daemons_page_shows_a_backlog_left_part_way_until_a_session_takes_it(
    tmp_path: Path, data: Path
) -> None:
    """A session that lost its server after listing 3 messages leaves them waiting: the
    daemon's page says how many and since when; the next session takes them and it clears.
    Without the daemon's health, only the kept messages are known."""
    import_directory(data, tmp_path, CONSOLE_USERS)
    raws = [message(f"Backlog {i}") for i in range(3)]
    script = Script(messages=raws, drop_after_dele=1, fault_sessions=1)

    async def go() -> tuple[str, str, str, Any]:
        store = await open_store(data, sweep=True)
        try:
            engine = Engine(store, EngineSettings(data_dir=data, created_by=LOGIN))
            with FakePOP3Server(script) as fake:
                cfg = mailbox_xml(
                    tmp_path / "backlog.xml", port=fake.port, user="u", password="p", timeout=2
                )
                src = MailboxSource("backlog", cfg)
                before = time.time()
                [first] = await engine.once([src])
                failed = await mailboxes_page(store, data, engine.health)
                standalone = await mailboxes_page(store, data)
                [second] = await engine.once([src])
                taken = await mailboxes_page(store, data, engine.health)
                left = fake.remaining
            return failed, standalone, taken, (first, second, before, left)
        finally:
            await store.close()

    failed, standalone, taken, (first, second, before, left) = anyio.run(go)
    assert first.error is not None and first.result.listed == 3 and first.result.deleted == 0
    found = re.search(r"3 not taken yet, since (\S+ \S+) UTC", row(failed, "backlog"))
    assert found, row(failed, "backlog")
    since = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert before - 1 <= since.timestamp() <= time.time()
    assert "not taken yet" not in standalone
    assert "only the kept messages are known" in standalone
    assert 'title="How long a message waited between reaching the mail server' in standalone
    assert "title=\"Messages still on the server. 'Not taken yet'" in standalone.replace(
        "&#39;", "'"
    )
    assert second.error is None and left == []
    assert "not taken yet" not in taken and "none known" in row(taken, "backlog")
