"""The writer against a real SQLite store (and, for the tests taking the ``store`` fixture, a
real PostgreSQL database too), without POP3: how it batches, and what it does when a message
fails half-way or the store's disk does."""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest
from support import DIRECTORY, LOGIN, mailbox_xml, open_test_store

from engine.config import MailboxConfig, load_mailbox
from engine.items import Envelope, Item
from engine.model import Attachment, ParsedMessage
from engine.processors import Context
from engine.store import SqliteTransaction, open_store
from engine.store.sqlite import BLOB_MAX
from engine.writer import Writer


def parsed(
    i: int, *, sender: str = "john.doe@example.com", attachments: int = 0, files: bool = False
) -> ParsedMessage:
    """Message ``i``; ``files``: its attachments larger than BLOB_MAX, so the SQLite store
    writes them as files rather than rows."""
    pad = BLOB_MAX + 1 if files else 0
    return ParsedMessage(
        raw=f"message {i}".encode(),
        sha256=f"{i:064x}",
        message_id=f"m{i}@example.com",
        subject=f"Printer {i} is jammed",
        from_name="",
        from_addr=sender,
        to=(),
        date=None,
        in_reply_to=None,
        references=(),
        body=f"body {i}",
        html=None,
        attachments=tuple(
            Attachment(f"log{i}-{k}.txt", "text/plain", f"log {i} {k}".encode().ljust(pad, b"."))
            for k in range(attachments)
        ),
        auto_submitted=False,
        auto_reason=None,
        is_bounce=False,
    )


async def fresh_store(tmp_path: Path) -> tuple[Any, MailboxConfig]:
    """The store the test runs against (SQLite unless the ``store`` fixture says PostgreSQL),
    with the directory imported, and a mailbox."""
    store = await open_test_store(tmp_path / "data")
    async with store.transaction() as tx:
        await tx.import_directory(DIRECTORY)
    cfg = load_mailbox(mailbox_xml(tmp_path / "m.xml", port=110, user="u", password="p"))
    return store, cfg


async def feed(writer: Writer, envelopes: list[Envelope]) -> None:
    """Queue every envelope first, so they share transactions as a busy mailbox's would."""
    send, receive = anyio.create_memory_object_stream[Item](len(envelopes) + 1)
    for env in envelopes:
        send.send_nowait(env)
    send.close()
    await writer.run(receive)


def test_a_message_failing_half_way_is_undone_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Batches run without savepoints; a failure after a message's first write sends the batch
    round again with one savepoint per message, so only that message becomes a failure event
    and none of its half-done writes stay."""

    async def go() -> list[Envelope]:
        store, cfg = await fresh_store(tmp_path)
        real = SqliteTransaction.add_attachments

        async def add_attachments(self: SqliteTransaction, number: int, *args: Any) -> None:
            await real(self, number, *args)
            # The request is not committed yet: only this connection sees it.
            row = await self._one("SELECT subject FROM requests WHERE number = ?", (number,))
            if row is not None and row[0] == "Printer 3 is jammed":
                raise RuntimeError("a processor bug after the first write")

        monkeypatch.setattr(SqliteTransaction, "add_attachments", add_attachments)
        envelopes = [
            Envelope(mailbox=cfg, uidl=f"u{i}", raw=f"message {i}".encode(), parsed=parsed(i))
            for i in range(6)
        ]
        writer = Writer(store, created_by=LOGIN)
        await feed(writer, envelopes)
        await store.close()
        return envelopes

    with caplog.at_level(logging.WARNING, logger="engine.writer"):
        envelopes = anyio.run(go)
    outcomes = [str(e.outcome) for e in envelopes]
    assert outcomes == ["created"] * 3 + ["failed: processor-error"] + ["created"] * 2
    assert all(e.failure is None and e.done.is_set() for e in envelopes)
    subjects = [r[0] for r in rows_of(tmp_path, "SELECT subject FROM requests ORDER BY number")]
    assert "Printer 3 is jammed" not in subjects  # its half-done request was rolled back
    assert sum(s.startswith("Printer") for s in subjects) == 5
    failure = rows_of(
        tmp_path, "SELECT number, description FROM requests WHERE kind = 'message-failure'"
    )
    assert len(failure) == 1 and "a processor bug after the first write" in failure[0][1]
    ledger = rows_of(tmp_path, "SELECT uidl, outcome FROM ledger ORDER BY uidl")
    assert [u for u, _ in ledger] == [f"u{i}" for i in range(6)]
    assert dict(ledger)["u3"] == "failed: processor-error"
    assert "done again with a savepoint per message" in caplog.text
    assert "a message failed half-way (a processor bug after the first write)" in caplog.text
    # The rolled-back request gave its number back: no gap in what users see.
    numbers = [r[0] for r in rows_of(tmp_path, "SELECT number FROM requests ORDER BY number")]
    assert numbers == list(range(1, 7))


def rows_of(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "data" / "mailintegration.sqlite3") as db:
        return db.execute(sql).fetchall()


def count_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each call the store makes into aiosqlite's thread."""
    calls: list[str] = []

    def spy(name: str) -> None:
        real: Callable[..., Awaitable[Any]] = getattr(aiosqlite.Connection, name)

        async def counted(self: aiosqlite.Connection, sql: str, *args: Any) -> Any:
            calls.append(f"{name} {sql.split()[0]} {sql.split()[2] if ' INTO ' in sql else ''}")
            return await real(self, sql, *args)

        monkeypatch.setattr(aiosqlite.Connection, name, counted)

    for name in ("execute_fetchall", "execute_insert", "executemany", "execute"):
        spy(name)
    return calls


def test_a_busy_batch_costs_few_round_trips_per_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call into aiosqlite's thread costs about 0.1 ms of hand-offs, more than SQLite's
    own work for a message: a transaction of new requests from known senders makes a handful
    of calls, whatever the number of messages."""
    count = 200

    async def go() -> tuple[list[Envelope], list[str]]:
        store, cfg = await fresh_store(tmp_path)
        calls = count_round_trips(monkeypatch)
        envelopes = [
            Envelope(
                mailbox=cfg,
                uidl=f"u{i}",
                raw=b"x",
                parsed=parsed(i, attachments=1 if i % 4 == 0 else 0),
            )
            for i in range(count)
        ]
        await feed(Writer(store, created_by=LOGIN), envelopes)
        await store.close()
        return envelopes, calls

    envelopes, calls = anyio.run(go)
    assert all(str(e.outcome) == "created" for e in envelopes)
    assert len(rows_of(tmp_path, "SELECT 1 FROM ledger")) == count
    assert len(rows_of(tmp_path, "SELECT 1 FROM attachments")) == count // 4
    assert len(rows_of(tmp_path, "SELECT 1 FROM history")) == count
    # No call of its own for any message: requests too are numbered by the writer (it holds
    # the write lock) and inserted with the rest, one executemany per statement.
    assert not [c for c in calls if c.startswith("execute_insert")]
    assert len(calls) <= 20, calls
    assert not any(c.split()[1] in ("SAVEPOINT", "RELEASE") for c in calls)


def test_a_batch_gives_the_processors_one_context_per_mailbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the writer resolves for a mailbox (its team, the reference key) is the same for
    every message of a batch: the processors' Context is made once per mailbox and pass,
    not once per message, and each message of each mailbox gets its own mailbox's."""
    import engine.processors

    made: list[Context] = []

    def counted(**fields: Any) -> Context:
        made.append(Context(**fields))
        return made[-1]

    seen: list[tuple[str, str]] = []
    real_decide = engine.processors.decide

    async def spy_decide(msg: ParsedMessage, ctx: Context, directory: Any) -> Any:
        seen.append((msg.message_id or "", ctx.mailbox.name))
        return await real_decide(msg, ctx, directory)

    # The writer imports both from engine.processors when it first decides (not at start).
    monkeypatch.setattr(engine.processors, "Context", counted)
    monkeypatch.setattr(engine.processors, "decide", spy_decide)

    async def go() -> list[Envelope]:
        store, cfg = await fresh_store(tmp_path)
        other = dataclasses.replace(cfg, name="other")
        envelopes = [
            Envelope(mailbox=cfg if i % 2 else other, uidl=f"u{i}", raw=b"x", parsed=parsed(i))
            for i in range(20)
        ]
        await feed(Writer(store, created_by=LOGIN), envelopes)
        await store.close()
        return envelopes

    envelopes = anyio.run(go)
    assert all(str(e.outcome) == "created" for e in envelopes)
    assert len(made) == 2
    assert seen == [(f"m{i}@example.com", "other" if i % 2 == 0 else "m") for i in range(20)]


def test_with_the_flood_limit_off_a_batch_reads_origins_by_message_id_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's read-ahead of request origins asks for senders and fingerprints only
    for the messages the flood limit applies to; the Message-IDs (the several-mailboxes
    policy) are read whatever the limit."""
    asked: list[tuple[set[str], set[str], set[str]]] = []
    real = SqliteTransaction.read_ahead_origins

    async def spy(self: SqliteTransaction, boxes: Any, keys: Any, mids: Any, since: Any) -> None:
        asked.append((set(boxes), set(keys), set(mids)))
        await real(self, boxes, keys, mids, since)

    monkeypatch.setattr(SqliteTransaction, "read_ahead_origins", spy)

    async def go(cfg_of: Callable[[MailboxConfig], MailboxConfig], folder: str) -> None:
        (tmp_path / folder).mkdir()
        store, cfg = await fresh_store(tmp_path / folder)
        cfg = cfg_of(cfg)
        envelopes = [
            Envelope(mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=parsed(i)) for i in (1, 2)
        ]
        await feed(Writer(store, created_by=LOGIN), envelopes)
        await store.close()
        assert all(str(e.outcome) == "created" for e in envelopes)

    anyio.run(go, lambda cfg: cfg, "off")  # the tests' mailboxes have it off
    assert asked == [(set(), set(), {"m1@example.com", "m2@example.com"})]
    asked.clear()
    on = lambda cfg: dataclasses.replace(  # noqa: E731
        cfg, handling=dataclasses.replace(cfg.handling, flood_messages=3)
    )
    anyio.run(go, on, "on")
    assert asked and asked[0][0] == {"m"} and "john.doe@example.com" in asked[0][1]


def test_attachment_files_that_cannot_be_written_commit_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full or broken disk is the store failing, not the message: the whole transaction is
    answered "not committed" (so nothing is deleted from the server) and no failure event is
    made of good messages; once the disk works, the same messages go in."""
    from engine.store.files import FileStore

    def go(envelopes_from: Callable[[MailboxConfig], list[Envelope]]) -> list[Envelope]:
        async def run() -> list[Envelope]:
            store, cfg = await fresh_store(tmp_path)
            envelopes = envelopes_from(cfg)
            await feed(Writer(store, created_by=LOGIN), envelopes)
            await store.close()
            return envelopes

        return anyio.run(run)

    def batch(cfg: MailboxConfig) -> list[Envelope]:
        return [
            Envelope(
                mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=parsed(i, attachments=1, files=True)
            )
            for i in range(5)
        ]

    def broken(self: FileStore, digest: str, data: bytes) -> set[Path]:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(FileStore, "write", broken)
        failed = go(batch)
    assert all(e.outcome is None or e.failure is not None for e in failed)
    assert all("No space left on device" in str(e.failure) for e in failed)
    assert rows_of(tmp_path, "SELECT count(*) FROM requests")[0][0] == 0
    assert rows_of(tmp_path, "SELECT count(*) FROM ledger")[0][0] == 0

    again = go(batch)
    assert [str(e.outcome) for e in again] == ["created"] * 5
    assert rows_of(tmp_path, "SELECT count(*) FROM attachments")[0][0] == 5
    files = [p for p in (tmp_path / "data" / "attachments").glob("??/*")]
    assert len(files) == 5 and not any(p.name.startswith(".tmp-") for p in files)


def test_a_directory_import_beside_the_engine_is_seen_by_its_next_transaction(
    tmp_path: Path,
) -> None:
    """The writer keeps directory lookups across transactions; another connection's commit
    (``directory import`` beside a running daemon) changes PRAGMA data_version and drops them."""

    async def go() -> tuple[str | None, str | None]:
        store, cfg = await fresh_store(tmp_path)
        writer = Writer(store, created_by=LOGIN)
        first = Envelope(mailbox=cfg, uidl="u1", raw=b"x", parsed=parsed(1, sender="new@x.org"))
        await feed(writer, [first])
        other = await open_store(tmp_path / "data")
        async with other.transaction() as tx:
            await tx.import_directory(
                {"users": [{"login": "newbie", "email": "new@x.org", "name": "New Hire"}]}
            )
        await other.close()
        second = Envelope(mailbox=cfg, uidl="u2", raw=b"x", parsed=parsed(2, sender="new@x.org"))
        await feed(writer, [second])
        await store.close()
        return str(first.outcome), str(second.outcome)

    assert anyio.run(go) == ("created", "created")
    requesters = rows_of(
        tmp_path,
        "SELECT u.login FROM requests r JOIN users u ON u.id = r.requester_id "
        "WHERE r.subject LIKE 'Printer%' ORDER BY r.number",
    )
    assert [r[0] for r in requesters] == ["unknown.user", "newbie"]


def test_request_numbers_are_never_used_twice(tmp_path: Path) -> None:
    """The writer numbers requests itself (it holds the write lock); like AUTOINCREMENT, a
    number once used is never handed out again, even after its request was deleted."""

    async def go(first: int, count: int) -> list[int | None]:
        store, cfg = await fresh_store(tmp_path)
        envelopes = [
            Envelope(mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=parsed(i))
            for i in range(first, first + count)
        ]
        await feed(Writer(store, created_by=LOGIN), envelopes)
        await store.close()
        return [e.request_number for e in envelopes]

    assert anyio.run(go, 0, 3) == [1, 2, 3]
    with sqlite3.connect(tmp_path / "data" / "mailintegration.sqlite3") as db:
        db.execute("PRAGMA foreign_keys = OFF")
        for table in ("ledger", "history", "attachments", "activities"):
            db.execute(f"DELETE FROM {table} WHERE request_number = 3")
        db.execute("DELETE FROM requests WHERE number = 3")
    assert anyio.run(go, 3, 2) == [4, 5]


def test_a_reply_in_the_same_batch_finds_the_request_made_just_before_it(
    tmp_path: Path,
) -> None:
    """The writer reads the requests a batch's subjects name in one query, before the batch
    is applied: a number that does not exist yet, created by an earlier message of the same
    batch, must still be found, even after the deferred rows were flushed in between."""

    def envelope(cfg: MailboxConfig, i: int, subject: str) -> Envelope:
        msg = dataclasses.replace(parsed(i), subject=subject)
        return Envelope(mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=msg)

    async def go() -> list[tuple[str | None, int | None]]:
        store, cfg = await fresh_store(tmp_path)
        await feed(Writer(store, created_by=LOGIN), [envelope(cfg, 0, "Old printer")])
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE requests SET status = 'closed' WHERE number = 1")
        batch = [
            envelope(cfg, 1, "New printer"),  # creates #2
            envelope(cfg, 2, "Re: [Incident] #1 Old printer"),  # reopens #1: a flush
            envelope(cfg, 3, "Re: [Incident] #2 New printer"),  # #2, not there at read-ahead
        ]
        await feed(Writer(store, created_by=LOGIN), batch)
        await store.close()
        return [(str(e.outcome), e.request_number) for e in batch]

    assert anyio.run(go) == [("created", 2), ("activity", 1), ("activity", 2)]
    assert rows_of(tmp_path, "SELECT status FROM requests WHERE number = 1") == [("reopened",)]


def test_attachment_files_are_on_disk_before_the_commit_that_cites_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files are written while the transaction goes on, in worker threads; however slow the
    disk, COMMIT waits for every one of them (and their folders) first."""
    from engine.store.files import FileStore

    real_write, real_sync = FileStore.write, FileStore.sync_folder
    synced: list[Path] = []

    def slow_write(self: FileStore, digest: str, data: bytes) -> None:
        time.sleep(0.05)
        real_write(self, digest, data)

    def sync_folder(self: FileStore, folder: Path) -> None:
        real_sync(self, folder)
        synced.append(folder)

    monkeypatch.setattr(FileStore, "write", slow_write)
    monkeypatch.setattr(FileStore, "sync_folder", sync_folder)
    seen_at_commit: list[tuple[int, int]] = []
    real_fetchall = aiosqlite.Connection.execute_fetchall

    async def fetchall(self: aiosqlite.Connection, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            files = [p for p in (tmp_path / "data" / "attachments").glob("??/*")]
            seen_at_commit.append((len(files), len({p.parent for p in files} - set(synced))))
        return await real_fetchall(self, sql, *args)

    async def go() -> list[Envelope]:
        store, cfg = await fresh_store(tmp_path)
        monkeypatch.setattr(aiosqlite.Connection, "execute_fetchall", fetchall)
        envelopes = [
            Envelope(
                mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=parsed(i, attachments=2, files=True)
            )
            for i in range(10)
        ]
        await feed(Writer(store, created_by=LOGIN), envelopes)
        await store.close()
        return envelopes

    envelopes = anyio.run(go)
    assert all(str(e.outcome) == "created" for e in envelopes)
    assert seen_at_commit and seen_at_commit[-1] == (20, 0)  # all 20 there, folders synced


def test_numbers_kept_between_transactions_yield_to_another_connections_commit(
    tmp_path: Path,
) -> None:
    """The writer remembers its last request number from one transaction to the next, but
    not past a commit by another connection (PRAGMA data_version): it then asks again."""

    async def go() -> list[int | None]:
        store, cfg = await fresh_store(tmp_path)
        writer = Writer(store, created_by=LOGIN)
        first = [Envelope(mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=parsed(i)) for i in (0, 1)]
        await feed(writer, first)
        with sqlite3.connect(store.path) as db:  # e.g. an operator's script
            db.execute(
                "INSERT INTO requests(team_id, type, status, kind, subject, description, "
                "created_at, created_by) SELECT team_id, type, status, kind, 'by hand', '', "
                "created_at, created_by FROM requests WHERE number = 1"
            )
        second = [Envelope(mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=parsed(i)) for i in (2, 3)]
        await feed(writer, second)
        await store.close()
        return [e.request_number for e in first + second]

    assert anyio.run(go) == [1, 2, 4, 5]


@pytest.mark.parametrize(("linger", "most"), [(0.05, 4), (0.0, None)])
def test_messages_arriving_close_together_share_a_transaction(
    tmp_path: Path, linger: float, most: int | None, store: str
) -> None:
    """A transaction has fixed costs (fsyncs, the ledger query...): while messages keep
    coming, the writer waits up to ``linger`` to gather more before it begins one."""

    async def go() -> tuple[int, list[Envelope]]:
        store, cfg = await fresh_store(tmp_path)
        writer = Writer(store, created_by=LOGIN, linger=linger)
        send, receive = anyio.create_memory_object_stream[Item](100)
        envelopes = [
            Envelope(mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=parsed(i)) for i in range(40)
        ]

        async def trickle() -> None:
            async with send:
                for env in envelopes:
                    await send.send(env)
                    await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            tg.start_soon(trickle)
            await writer.run(receive)
        await store.close()
        return writer.stats.transactions, envelopes

    transactions, envelopes = anyio.run(go)
    assert all(str(e.outcome) == "created" for e in envelopes)
    if most is not None:
        assert transactions <= most
    elif store == "sqlite":  # without the wait, each message finding the writer idle
        # starts its own (PostgreSQL's slower round trips gather some anyway)
        assert transactions >= 10


@pytest.mark.parametrize("last", [True, False])
def test_a_session_s_last_message_is_not_held_back_for_more(
    tmp_path: Path, last: bool, store: str
) -> None:
    """The linger gathers messages that keep coming; once the fetcher says a message is the
    last it sends before it waits for the answers, nothing more can come, and waiting
    would only delay it (the daemon's one message per poll, the end of every session)."""

    async def go() -> float:
        store, cfg = await fresh_store(tmp_path)
        writer = Writer(store, created_by=LOGIN, linger=30.0)
        send, receive = anyio.create_memory_object_stream[Item](10)
        env = Envelope(mailbox=cfg, uidl="u1", raw=b"x", parsed=parsed(1))
        env.last = last
        answered = 0.0
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            started = time.monotonic()
            await send.send(env)
            with anyio.move_on_after(5):
                await env.done.wait()
                answered = time.monotonic() - started
            await send.aclose()
        await store.close()
        return answered

    answered = anyio.run(go)
    if last:
        assert 0 < answered < 5
    else:  # still inside the 30 s linger when the test gave up at 5 s
        assert answered == 0.0


def test_timestamps_are_the_current_second_in_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """``now`` formats each second once (it is asked several times per message); what it
    returns must still be the clock's second, also across a change of second or day."""
    from datetime import UTC, datetime

    from engine.store import sqlite as store_module

    for second in (1_795_000_000, 1_795_000_000, 1_795_000_001, 1_795_046_399, 1_795_046_400):
        monkeypatch.setattr(store_module.time, "time", lambda s=second: s + 0.999)
        want = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
        assert store_module.now() == want
    monkeypatch.undo()
    before = datetime.now(UTC).isoformat(timespec="seconds")
    got = store_module.now()
    assert got in (before, datetime.now(UTC).isoformat(timespec="seconds"))


def test_a_file_is_durable_under_its_name_when_its_write_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is fsynced before it is renamed into place, then its folder is (and the
    root, for a new shard folder). A file already there is taken as it is, but its folder is
    synced again: the transaction that wrote it may have rolled back before syncing it."""
    import hashlib

    from engine.store.files import FileStore

    files = FileStore(tmp_path / "attachments")
    calls: list[str] = []
    real_fsync, real_sync = os.fsync, FileStore.sync_folder

    in_folder = []

    def fsync(fd: int) -> None:
        if not in_folder:
            calls.append("fsync file")
        real_fsync(fd)

    def sync_folder(self: FileStore, folder: Path) -> None:
        calls.append(f"sync {folder.relative_to(tmp_path)}")
        in_folder.append(folder)
        real_sync(self, folder)
        in_folder.pop()

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(FileStore, "sync_folder", sync_folder)
    data = b"report"
    digest = hashlib.sha256(data).hexdigest()
    files.write(digest, data)
    first = ["sync attachments", "fsync file", f"sync attachments/{digest[:2]}"]
    assert calls == first
    assert files.get(digest) == data
    files.write(digest, data)
    assert calls == [*first, f"sync attachments/{digest[:2]}"]


def test_a_batch_of_bounces_and_thread_replies_asks_the_outbox_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Message-IDs a batch's messages may name a request by (a bounce's returned
    message, a reply's thread) are read ahead in one query on the ledger and one on the
    outbox, which has no index on message_id: before, each one a request was not found
    for cost a query on each, the outbox's a scan of it. A thread found still threads."""
    statements: list[str] = []
    real = aiosqlite.Connection.execute_fetchall

    async def counted(self: aiosqlite.Connection, sql: str, *args: Any) -> Any:
        statements.append(sql)
        return await real(self, sql, *args)

    def bounce(i: int) -> Envelope:
        msg = dataclasses.replace(
            parsed(i, sender="mailer-daemon@example.com"),
            subject="Undelivered Mail Returned to Sender",
            is_bounce=True,
            auto_submitted=True,
            auto_reason="auto-submitted: auto-replied",
            bounce_status="5.1.1",
            bounce_recipients=(f"gone{i}@example.org",),
            bounce_message_id=f"never-sent-{i}@example.org",
        )
        return Envelope(mailbox=cfg, uidl=f"b{i}", raw=msg.raw, parsed=msg)

    def reply(i: int) -> Envelope:
        msg = dataclasses.replace(
            parsed(i), subject="Re: still jammed", in_reply_to="m0@example.com"
        )
        return Envelope(mailbox=cfg, uidl=f"r{i}", raw=msg.raw, parsed=msg)

    async def go() -> list[tuple[str, int | None]]:
        nonlocal cfg
        store, cfg = await fresh_store(tmp_path)
        writer = Writer(store, created_by=LOGIN)
        await feed(writer, [Envelope(mailbox=cfg, uidl="u0", raw=b"x", parsed=parsed(0))])
        monkeypatch.setattr(aiosqlite.Connection, "execute_fetchall", counted)
        batch = [bounce(i) if i % 2 else reply(i) for i in range(1, 21)]
        await feed(writer, batch)
        await store.close()
        assert all(env.outcome is not None for env in batch)
        return [(env.outcome.kind.value, env.outcome.request_number) for env in batch]  # type: ignore[union-attr]

    cfg: MailboxConfig
    outcomes = anyio.run(go)
    outbox = [s for s in statements if "FROM outbox WHERE message_id" in s]
    ledger = [s for s in statements if "FROM ledger WHERE message_id" in s]
    assert (len(outbox), len(ledger)) == (1, 1), statements
    assert outcomes[1::2] == [("activity", 1)] * 10  # the replies: on request 1, by thread
    assert {kind for kind, _ in outcomes[::2]} == {"ignored"}  # the bounces: nothing named
