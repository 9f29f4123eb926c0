"""The store's transaction, against a real SQLite file and a real PostgreSQL database: what
its API promises. Tests taking the ``store`` fixture run against each."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest
import support
from hypothesis import given, settings
from hypothesis import strategies as st
from support import DIRECTORY, open_test_store, store_rows

from engine.model import Attachment, Origin
from engine.parse import with_digests
from engine.store import SqliteStore, Store, Transaction, open_store
from engine.store.sqlite import BLOB_MAX, SqliteTransaction


def run(tmp_path: Path, body: Callable[[Any], Awaitable[Any]]) -> Any:
    """``body`` over the store the test runs against, with the directory imported."""

    async def go() -> Any:
        store = await open_test_store(tmp_path / "data")
        try:
            async with store.transaction() as tx:
                await tx.import_directory(DIRECTORY)
            return await body(store)
        finally:
            await store.close()

    return anyio.run(go)


def rows_of(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in store_rows(tmp_path / "data", sql)]


def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first word of each statement sent to SQLite, executemany marked as such."""
    sent: list[str] = []
    for name in ("execute_fetchall", "executemany", "execute_insert"):
        real: Callable[..., Awaitable[Any]] = getattr(aiosqlite.Connection, name)

        def counted(real: Any = real, name: str = name) -> Any:
            async def call(self: aiosqlite.Connection, sql: str, *args: Any) -> Any:
                sent.append(f"{name}:{sql.split()[0]}")
                return await real(self, sql, *args)

            return call

        monkeypatch.setattr(aiosqlite.Connection, name, counted())
    return sent


async def new_request(tx: Transaction, subject: str, *, kind: str = "mail") -> int:
    team = await tx.team("IT")
    assert team is not None
    return await tx.create_request(
        team_id=team.id,
        type="event",
        kind=kind,
        subject=subject,
        description="d",
        created_by="system",
        mailbox="box",
        cause="timeout" if kind == "outage" else "bad-mime",
        message_id=f"{subject}@example.org",
        sha256="a" * 64,
    )


def test_each_store_implements_the_interface(tmp_path: Path, store: str) -> None:
    async def body(store: Store) -> tuple[bool, bool]:
        async with store.transaction() as tx:
            return isinstance(store, Store), isinstance(tx, Transaction)

    assert run(tmp_path, body) == (True, True)


def test_every_read_of_a_transaction_sees_its_own_writes(tmp_path: Path, store: str) -> None:
    """Whether the rows are still pending in the transaction or already in SQLite is the
    store's business: every read method answers as if each write were done at once."""

    async def body(store: Store) -> dict[str, Any]:
        async with store.transaction() as tx:
            failure = await new_request(tx, "f1", kind="message-failure")
            outage = await new_request(tx, "o1", kind="outage")
            mail = await new_request(tx, "m1")
            await tx.record_ledger(
                account="acct",
                uidl="u1",
                mailbox="box",
                message_id="reply-source@example.org",
                sha256="b" * 64,
                outcome="created",
                request_number=mail,
            )
            await tx.add_activity(mail, author="a", email="", body="b")
            seen: dict[str, Any] = {
                "request": await tx.request(mail),
                "directory.request": await tx.directory.request(mail),
                "by_message_id": await tx.request_by_message_id(["reply-source@example.org"]),
                "failure_event": await tx.failure_event("f1@example.org", "a" * 64),
                "open_outages": await tx.open_outages("box"),
                "ledger_rows": await tx.ledger_rows("acct", ["u1", "u2"]),
                "account_has_rows": await tx.account_has_rows("acct"),
            }
            await tx.set_status(outage, "processed", by="system", why="closed")
            seen["closed"] = await tx.open_outages("box")
            # Open or closed: a warning is raised once per cause (engine.oauth's warnings).
            seen["by_cause"] = await tx.outages_by_cause("box", ["timeout", "timeout", "tls"])
            seen["numbers"] = (failure, outage, mail)
            return seen

    seen = run(tmp_path, body)
    failure, outage, mail = seen["numbers"]
    assert seen["request"].number == mail and seen["request"].status == "new"
    assert seen["directory.request"] == seen["request"]
    assert seen["by_message_id"] == seen["request"]
    assert seen["failure_event"] == failure
    assert seen["open_outages"] == {"timeout": outage}
    assert list(seen["ledger_rows"]) == ["u1"]
    assert seen["ledger_rows"]["u1"].request_number == mail
    assert seen["account_has_rows"] is True
    assert seen["closed"] == {}
    assert seen["by_cause"] == {"timeout": outage}
    assert rows_of(tmp_path, "SELECT count(*) FROM activities") == [(1,)]


def test_a_read_sends_pending_rows_only_of_the_tables_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each statement sent is a round trip to aiosqlite's thread: reads of users, teams, the
    outbox or a request by number leave the pending requests, history and ledger rows where
    they are, and they go in one executemany per table at COMMIT."""

    async def body(store: SqliteStore) -> tuple[list[str], list[str]]:
        async with store.transaction() as tx:
            sent = spy(monkeypatch)
            number = await new_request(tx, "m1")
            await tx.record_ledger(
                account="acct",
                uidl="u1",
                mailbox="box",
                message_id="m1@example.org",
                sha256="b" * 64,
                outcome="created",
                request_number=number,
            )
            await tx.user_by_email("nobody@example.org")
            await tx.user_by_login("nobody")
            await tx.team(2)
            await tx.replies_since("mailbox", "box", datetime(2000, 1, 1, tzinfo=UTC))
            await tx.request(number)
            await tx.request_by_message_id(["m1@example.org", "other@example.org"])
            before_commit = list(sent)
        return before_commit, sent

    before_commit, sent = run(tmp_path, body)
    assert not [s for s in before_commit if s.startswith("executemany")], before_commit
    assert [s for s in sent if s.startswith("executemany")] == ["executemany:INSERT"] * 3


def test_a_savepoint_undoes_its_block_alone(tmp_path: Path, store: str) -> None:
    """A message's error inside ``savepoint()`` undoes what the block wrote, and only that;
    SQLite gives the numbers it used again (no gap in what users see), PostgreSQL's
    sequences leave a gap (never a number twice, across replicas)."""

    async def body(store: Store) -> list[int]:
        numbers = []
        async with store.transaction() as tx:
            numbers.append(await new_request(tx, "kept-1"))
            with pytest.raises(ValueError, match="a message's error"):
                async with tx.savepoint():
                    numbers.append(await new_request(tx, "undone"))
                    raise ValueError("a message's error")
            assert await tx.request(numbers[-1]) is None
            numbers.append(await new_request(tx, "kept-2"))
        return numbers

    last = 2 if store == "sqlite" else 3
    assert run(tmp_path, body) == [1, 2, last]
    assert rows_of(tmp_path, "SELECT number, subject FROM requests ORDER BY number") == [
        (1, "kept-1"),
        (last, "kept-2"),
    ]


def test_a_transaction_that_raises_rolls_back_and_commits_nothing(
    tmp_path: Path, store: str
) -> None:
    async def body(store: Any) -> None:
        with pytest.raises(RuntimeError, match="in the middle"):
            async with store.transaction() as tx:
                number = await new_request(tx, "gone")
                await tx.add_attachments(number, None, [Attachment("a.txt", "text/plain", b"x")])
                raise RuntimeError("in the middle")
        if support.STORE:
            assert not store.conn.is_in_transaction()
        else:
            assert not store.db.in_transaction

    run(tmp_path, body)
    assert rows_of(tmp_path, "SELECT count(*) FROM requests") == [(0,)]
    assert rows_of(tmp_path, "SELECT count(*) FROM attachments") == [(0,)]


def test_the_transaction_writes_its_attachment_files_as_it_goes(tmp_path: Path) -> None:
    """The files start being written (and fsynced) when they are added, in the transaction's
    own task group, not at COMMIT; the commit waits for them."""

    async def body(store: SqliteStore) -> tuple[bool, bool]:
        data = b"attachment bytes " * (BLOB_MAX // 16)  # a file, not a row: larger
        async with store.transaction() as tx:
            number = await new_request(tx, "with a file")
            await tx.add_attachments(number, None, [Attachment("a.bin", "x/y", data)])
            digest = hashlib.sha256(data).hexdigest()
            path = store.files.path_for(digest)
            for _ in range(1000):  # 10 s at most
                if path.exists():
                    break
                await anyio.sleep(0.01)
            before_commit = path.exists() and store.db.in_transaction
        return before_commit, path.read_bytes() == data

    assert run(tmp_path, body) == (True, True)
    assert rows_of(tmp_path, "SELECT count(*) FROM attachments") == [(1,)]


def test_the_commit_waits_for_a_file_started_after_the_earlier_ones_finished(
    tmp_path: Path,
) -> None:
    """A second file added once the first is on disk: COMMIT waits for it too. It did not
    (the transaction's "all written" event was already set), so a crash right after the
    commit left a row citing a file never written: found by the crash harness over IMAP."""
    gate = threading.Event()
    first, second = b"first file " * (BLOB_MAX // 10), b"second file " * (BLOB_MAX // 10)

    committed_first: list[int] = []

    async def body(store: SqliteStore) -> tuple[bool, bool]:
        real = store.files.write

        def write(digest: str, data: bytes) -> None:
            if data == second:
                gate.wait(10)  # held until the timer below lets it go
                # What another connection sees now: nothing, unless COMMIT went first.
                committed_first.extend(n for (n,) in rows_of(tmp_path, COUNT_ATTACHMENTS))
            real(digest, data)

        store.files.write = write  # type: ignore[method-assign]
        one = store.files.path_for(hashlib.sha256(first).hexdigest())
        two = store.files.path_for(hashlib.sha256(second).hexdigest())
        async with store.transaction() as tx:
            number = await new_request(tx, "two files")
            await tx.add_attachments(number, None, [Attachment("1.bin", "x/y", first)])
            for _ in range(1000):  # 10 s at most
                if one.exists():
                    break
                await anyio.sleep(0.01)
            await anyio.sleep(0.2)  # the finished write's bookkeeping runs on the loop
            await tx.add_attachments(number, None, [Attachment("2.bin", "x/y", second)])
            threading.Timer(0.5, gate.set).start()
        return one.exists(), two.exists()

    try:
        assert run(tmp_path, body) == (True, True)
    finally:
        gate.set()
    assert committed_first == [0]
    assert rows_of(tmp_path, COUNT_ATTACHMENTS) == [(2,)]


COUNT_ATTACHMENTS = "SELECT count(*) FROM attachments"


def store_at_version(data: Path, version: int) -> sqlite3.Connection:
    """A new SQLite store in ``data`` as an engine of schema ``version`` left it."""
    from engine.store.schema import MIGRATIONS

    data.mkdir(mode=0o700)
    con = sqlite3.connect(data / "mailintegration.sqlite3", isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    for number, script in enumerate(MIGRATIONS[:version], start=1):
        con.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    return con


def test_migration_6_rebuilds_requests_keeping_numbers_and_references(tmp_path: Path) -> None:
    """A store at version 4 (requests, an activity, a deleted last request): migration 6
    rebuilds the requests table; every row and reference stays, and no number is given
    twice (AUTOINCREMENT's counter is carried over)."""

    from engine.store.schema import MIGRATIONS

    data = tmp_path / "data"
    con = store_at_version(data, 4)
    con.executescript(
        "INSERT INTO teams(number, name) VALUES (1, 'IT');"
        "INSERT INTO requests(team_id, type, status, subject, description, created_at,"
        " created_by) VALUES (1, 'incident', 'new', 's1', 'd', 'now', 'x');"
        "INSERT INTO requests(team_id, type, status, subject, description, created_at,"
        " created_by) VALUES (1, 'event', 'new', 's2', 'd', 'now', 'x');"
        "INSERT INTO activities(request_number, author, email, date, body, created_at)"
        " VALUES (1, 'a', 'e', 'now', 'b', 'now');"
        "DELETE FROM requests WHERE number = 2;"
    )
    con.close()

    async def go() -> int:
        store = await open_store(data)
        try:
            async with store.transaction() as tx:
                team = await tx.team(1)
                assert team is not None
                return await tx.create_request(
                    team_id=team.id,
                    type="service request",
                    subject="s3",
                    description="d",
                    created_by="x",
                    form="New laptop",
                )
        finally:
            await store.close()

    assert anyio.run(go) == 3  # not 2: request 2 existed once
    con = sqlite3.connect(data / "mailintegration.sqlite3")
    # Migrations after 6 run too (the newest is the version the store ends at).
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 6
    assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    assert con.execute("SELECT request_number FROM activities").fetchall() == [(1,)]
    rows = con.execute("SELECT number, type, form FROM requests ORDER BY number").fetchall()
    assert rows == [(1, "incident", None), (3, "service request", "New laptop")]
    con.close()


# ------------------------------------------------------------- small attachments as rows


def test_small_attachments_are_rows_and_large_ones_files_both_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to BLOB_MAX an attachment is a row that the commit makes durable: no file and no
    fsync of its own (issue 18: file and folder fsyncs were half the engine's busy time on
    attachment-heavy mail). Past it, a file as before. Either reads back by content, and
    content already stored (a logo in every signature) is kept once."""
    from engine.store import files as files_module

    small, large = b"logo " * 100, b"L" * (BLOB_MAX + 1)
    fsyncs: list[int] = []
    real_fsync = files_module.os.fsync

    def fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(files_module.os, "fsync", fsync)

    async def body(store: Any) -> tuple[list[int], list[int], bytes | None, bytes | None]:
        async with store.transaction() as tx:
            number = await new_request(tx, "small only")
            await tx.add_attachments(number, None, [Attachment("logo.png", "image/png", small)])
        small_only = list(fsyncs)
        async with store.transaction() as tx:
            number = await new_request(tx, "both")
            await tx.add_attachments(
                number,
                None,
                [
                    Attachment("logo.png", "image/png", small),
                    Attachment("scan.pdf", "application/pdf", large),
                ],
            )
        return (
            small_only,
            list(fsyncs),
            await store.attachment_data(hashlib.sha256(small).hexdigest()),
            await store.attachment_data(hashlib.sha256(large).hexdigest()),
        )

    small_only, after, got_small, got_large = run(tmp_path, body)
    assert small_only == []  # no file, no folder: the commit alone
    assert len(after) >= 2  # the large one: its file, then its folder
    assert (got_small, got_large) == (small, large)
    small_sha, large_sha = (hashlib.sha256(d).hexdigest() for d in (small, large))
    assert rows_of(tmp_path, "SELECT sha256 FROM attachment_blobs") == [(small_sha,)]
    files = [p.name for p in (tmp_path / "data" / "attachments").glob("??/*")]
    assert files == [large_sha]
    assert rows_of(tmp_path, COUNT_ATTACHMENTS) == [(3,)]


def test_a_row_attachment_rolled_back_leaves_nothing(tmp_path: Path) -> None:
    """A row attachment goes with its transaction: rolled back, neither the attachment row
    nor its content stays (a file would have been swept later)."""

    class Abort(Exception):
        pass

    async def body(store: Any) -> bytes | None:
        with pytest.raises(Abort):
            async with store.transaction() as tx:
                number = await new_request(tx, "rolled back")
                await tx.add_attachments(number, None, [Attachment("a.txt", "text/plain", b"a")])
                await tx.flush()  # the rows are in SQLite's transaction, not committed
                raise Abort
        return await store.attachment_data(hashlib.sha256(b"a").hexdigest())

    assert run(tmp_path, body) is None
    assert rows_of(tmp_path, "SELECT count(*) FROM attachment_blobs") == [(0,)]


def test_attachment_files_of_an_older_store_still_read_after_the_migration(
    tmp_path: Path,
) -> None:
    """A store from before attachment rows (version 6) holds every attachment as a file:
    after the upgrade they read back as before, and new small ones become rows."""
    from engine.store.files import FileStore

    data = tmp_path / "data"
    store_at_version(data, 6).close()
    old = b"an attachment from before"
    FileStore(data / "attachments").write(hashlib.sha256(old).hexdigest(), old)

    async def go() -> tuple[bytes | None, bytes | None]:
        store = await open_store(data)
        try:
            return (
                await store.attachment_data(hashlib.sha256(old).hexdigest()),
                await store.attachment_data("0" * 64),
            )
        finally:
            await store.close()

    assert anyio.run(go) == (old, None)


_MIDS = [f"m{i}@example.org" for i in range(5)]
_op = st.one_of(
    st.tuples(st.just("ledger"), st.sampled_from(_MIDS), st.sampled_from([None, 0, 1, 2])),
    st.tuples(st.just("outbox"), st.sampled_from(_MIDS), st.sampled_from([None, 0, 1, 2])),
    st.tuples(st.just("update"), st.sampled_from(_MIDS), st.sampled_from([None, 0, 1, 2])),
    st.tuples(st.just("flush"), st.just(""), st.just(None)),
    st.tuples(st.just("savepoint"), st.sampled_from(_MIDS), st.sampled_from([0, 1, 2])),
)


@given(
    before=st.lists(
        st.tuples(
            st.sampled_from(["ledger", "outbox"]),
            st.sampled_from(_MIDS),
            st.sampled_from([None, 0, 1, 2]),
        ),
        max_size=8,
    ),
    read=st.sets(st.sampled_from(_MIDS)),
    ops=st.lists(_op, max_size=8),
)
@settings(max_examples=40, deadline=None, database=None, derandomize=True)
def test_message_ids_read_ahead_answer_as_the_queries_one_by_one(
    tmp_path_factory: pytest.TempPathFactory,
    before: list[tuple[str, str, int | None]],
    read: set[str],
    ops: list[tuple[str, str, int | None]],
) -> None:
    """request_by_message_id from the batch's read-ahead (one query on the ledger, one on
    the outbox) gives, for every Message-ID, after any writes of the transaction (ledger
    rows, replies queued, a ledger row updated, a flush, a savepoint rolled back), what the
    queries one id at a time give: the newest ledger row, else the first outbox row."""
    data = tmp_path_factory.mktemp("ahead")

    async def write(
        tx: SqliteTransaction, numbers: list[int], op: tuple[str, str, int | None], uidl: str
    ) -> None:
        kind, mid, n = op
        number = None if n is None else numbers[n]
        if kind == "ledger":
            await tx.record_ledger(
                account="a",
                uidl=uidl,
                mailbox="box",
                message_id=mid,
                sha256="b" * 64,
                outcome="created",
                request_number=number,
            )
        elif kind == "outbox":
            await tx.queue_reply(
                mailbox="box",
                request_number=number,
                recipient="x@example.org",
                rcpt_key="x@example.org",
                rcpt_domain="example.org",
                message_id=mid,
                message=b"m",
            )
        elif kind == "update":
            await tx.update_ledger(
                account="a",
                uidl="u0",
                message_id=mid,
                sha256="c" * 64,
                outcome="created",
                request_number=number,
                size=None,
                needed=None,
            )
        elif kind == "flush":
            await tx.flush()
        else:
            with contextlib.suppress(ValueError):
                async with tx.savepoint():
                    await write(tx, numbers, ("ledger", mid, n), uidl + "s")
                    raise ValueError("rolled back")

    async def go() -> None:
        store = await open_store(data)
        try:
            async with store.transaction() as tx:
                await tx.import_directory(DIRECTORY)
                numbers = [await new_request(tx, f"r{i}") for i in range(3)]
                for i, op in enumerate([("ledger", _MIDS[0], None), *before]):
                    await write(tx, numbers, op, f"u{i}")
            async with store.transaction() as tx:
                assert isinstance(tx, SqliteTransaction)
                await tx.read_ahead_message_ids(read)
                for i, op in enumerate([("flush", "", None), *ops]):
                    await write(tx, numbers, op, f"v{i}")
                    for mid in _MIDS:
                        one_by_one = await tx._number_by_message_id(mid)
                        ahead = await tx.request_by_message_id([mid])
                        assert (ahead.number if ahead else None) == one_by_one, (op, mid)
        finally:
            await store.close()

    anyio.run(go)


def test_a_batch_of_bounces_asks_the_ledger_and_the_outbox_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read ahead, the Message-IDs of a batch's bounces and replies cost one query on the
    ledger and one on the outbox (unindexed by message_id: a scan), not two per id."""

    async def body(store: SqliteStore) -> list[str]:
        async with store.transaction() as tx:
            assert isinstance(tx, SqliteTransaction)
            sent = spy(monkeypatch)
            mids = [f"gone{i}@example.org" for i in range(20)]
            await tx.read_ahead_message_ids(mids)
            for mid in mids:
                assert await tx.request_by_message_id([mid]) is None
            return list(sent)

    assert run(tmp_path, body) == ["execute_fetchall:SELECT"] * 2


def test_the_store_takes_the_digest_the_parse_stage_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parsed message's attachments carry their sha256 (engine.parse.with_digests): the
    writer's event loop does not hash them again; an attachment made elsewhere (the raw
    message kept as one) is hashed as before."""
    hashed: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(hashlib, name)

        def sha256(self, data: bytes = b"") -> Any:
            hashed.append(len(data))
            return hashlib.sha256(data)

    monkeypatch.setattr("engine.store.sqlite.hashlib", Counting())
    small, large = b"small log\n", os.urandom(BLOB_MAX + 1)
    parsed = with_digests(
        [Attachment("a.txt", "text/plain", small), Attachment("b.bin", "x/y", large)]
    )
    made = Attachment("m.eml", "message/rfc822", b"raw message")

    async def body(store: SqliteStore) -> None:
        async with store.transaction() as tx:
            number = await new_request(tx, "r1")
            await tx.add_attachments(number, None, (*parsed, made))

    run(tmp_path, body)
    assert hashed == [len(b"raw message")]
    digests = {r[0] for r in rows_of(tmp_path, "SELECT sha256 FROM attachments")}
    assert digests == {hashlib.sha256(d).hexdigest() for d in (small, large, b"raw message")}


def test_the_outbox_is_read_by_message_id_through_an_index(tmp_path: Path, store: str) -> None:
    """A reply or bounce naming one of our auto-replies is looked up in the outbox by its
    Message-ID (every batch's read-ahead): an index, not a scan of every reply ever sent."""

    async def body(store: Store) -> None:
        return None

    run(tmp_path, body)
    query = "SELECT request_number FROM outbox WHERE message_id = 'a@b'"
    if support.STORE:
        import psycopg

        with psycopg.connect(support.STORE) as conn:
            conn.execute("SET enable_seqscan = off")  # a tiny table is scanned anyway
            plan = " ".join(r[0] for r in conn.execute(f"EXPLAIN {query}").fetchall())
    else:
        con = sqlite3.connect(tmp_path / "data" / "mailintegration.sqlite3")
        try:
            plan = " ".join(str(r[-1]) for r in con.execute(f"EXPLAIN QUERY PLAN {query}"))
        finally:
            con.close()
    assert "outbox_message_id" in plan, plan


_ORIGIN = st.tuples(st.sampled_from(["box", "other"]), st.sampled_from([*_MIDS, None]))


@given(
    before=st.lists(_ORIGIN, max_size=6),
    read=st.sets(st.sampled_from(_MIDS)),
    ops=st.lists(st.one_of(_ORIGIN, st.just(("savepoint", _MIDS[0]))), max_size=8),
)
@settings(max_examples=40, deadline=None, database=None, derandomize=True)
def test_origins_read_ahead_answer_as_the_query(
    tmp_path_factory: pytest.TempPathFactory,
    before: list[tuple[str, str | None]],
    read: set[str],
    ops: list[tuple[str, str | None]],
) -> None:
    """origins() from the batch's read-ahead (indexed by Message-ID) gives, after any
    origins the transaction records (or records and rolls back), what the query gives."""
    data = tmp_path_factory.mktemp("origins")

    async def record(tx: Transaction, mailbox: str, mid: str | None) -> None:
        number = await new_request(tx, f"o{mailbox}{mid}")
        await tx.record_origin(number, Origin(mailbox, 1, "s@example.org", "f", mid))

    async def go() -> None:
        store = await open_store(data)
        try:
            async with store.transaction() as tx:
                await tx.import_directory(DIRECTORY)
                for mailbox, mid in before:
                    await record(tx, mailbox, mid)
            async with store.transaction() as tx:
                assert isinstance(tx, SqliteTransaction)
                await tx.read_ahead_origins(["box"], ["s@example.org"], read, datetime.now(UTC))
                for kind, mid in ops:
                    if kind == "savepoint":
                        with contextlib.suppress(ValueError):
                            async with tx.savepoint():
                                await record(tx, "box", mid)
                                raise ValueError("rolled back")
                    else:
                        await record(tx, kind, mid)
                    for m in _MIDS:
                        ahead = [(r.number, box) for r, box in await tx.origins(m)]
                        rows = await tx._all(
                            "SELECT request_number, mailbox FROM request_origins "
                            "WHERE message_id = ? ORDER BY request_number LIMIT 100",
                            (m,),
                        )
                        assert ahead == [(int(n), str(box)) for n, box in rows], (kind, m)
        finally:
            await store.close()

    anyio.run(go)
