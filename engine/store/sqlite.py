"""The SQLite store, through aiosqlite. Only the writer coroutine holds a read-write one.

Durability is the point of this module: WAL with ``synchronous=FULL`` (``NORMAL`` may lose the
last commits on power loss, and once the server deleted a message our database holds the only
copy), explicit ``BEGIN IMMEDIATE`` so a transaction never upgrades its lock half-way, and
attachment files fsynced before the commit that refers to them.

Every text the store writes (subjects, descriptions, activity bodies, history, errors,
outcomes, attachment names) goes through :func:`engine.logs.scrub` here, at the write
boundary, so no caller can forget it: a server that echoes a password in its ``-ERR`` has it
masked in the outage event as in the log. Keys (UIDLs, Message-IDs, hashes) are stored as
they are: the ledger must find them again.

Speed comes from two things a :class:`SqliteTransaction` does behind its interface (see
:mod:`engine.store.base`):

- **Write-behind.** The rows of the hot tables (requests, activities, ledger, history,
  attachments) are kept in the transaction (:class:`_Pending`) and go to SQLite in one
  ``executemany`` per statement, just before COMMIT or before a statement that must see them.
  Each call into aiosqlite's thread costs ~0.1 ms of hand-offs, more than SQLite's own work
  for a message. A read sends the pending rows first only when they are in a table it reads;
  the reads the writer makes per message (the request a reply names, the thread's Message-IDs)
  consult the pending rows themselves and never send them.
- **Attachment files written as the transaction goes**, in worker threads of the
  transaction's own task group, and awaited before the rows that cite them.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import anyio.to_thread
from aioitertools.more_itertools import chunked

from engine.errors import StoreError, sole
from engine.keys import ingest_keys_like
from engine.logs import scrub
from engine.model import (
    CLOSED_STATUSES,
    Attachment,
    CorrelatedEvent,
    DirectoryView,
    LedgerRow,
    Origin,
    PendingReply,
    RequestRef,
    Team,
    User,
    Watcher,
)
from engine.passwords import EarlyCheck, hash_password, verify_password
from engine.store.base import RequestFilter, Store, Transaction
from engine.store.files import FileStore
from engine.store.lock import secure_data_dir
from engine.store.schema import (
    ACCOUNTS,
    CATCH_UP,
    MIGRATIONS,
    REBUILDS,
    normalized_account,
)

log = logging.getLogger("engine.store")

# Attachments at least this big are hashed in a worker thread rather than on the event loop.
_HASH_IN_THREAD = 1 << 20


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_second: tuple[int, str] = (0, "")


def now() -> str:
    """The current UTC time to the second, ISO 8601. Formatted once per second: a busy
    transaction asks several times per message."""
    global _second
    second = int(time.time())
    if second != _second[0]:
        _second = (second, datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds"))
    return _second[1]


# A message's arrival may lie ahead of our clock by this much (clocks drift; the mail server
# is another machine): it is then taken as arriving when it was recorded (a lag of 0).
ARRIVAL_SKEW = timedelta(minutes=1)


def arrived_text(arrived: datetime | None, processed_at: str) -> str | None:
    """A message's arrival as the ledger keeps it (UTC, ISO 8601 to the second, as
    processed_at), bounded by when it was recorded: a time later than that by up to
    :data:`ARRIVAL_SKEW` becomes that time; further ahead, it is not believed (None). The
    time is hostile input (a Received field, a server's INTERNALDATE): never a negative lag."""
    if arrived is None:
        return None
    recorded = datetime.fromisoformat(processed_at)
    try:
        at = (arrived if arrived.tzinfo is not None else arrived.replace(tzinfo=UTC)).astimezone(
            UTC
        )
    except (OverflowError, ValueError):  # year 1 in a zone east of UTC
        return None
    if at > recorded + ARRIVAL_SKEW:
        return None
    return min(at, recorded).isoformat(timespec="seconds")


# The columns replies are counted by (each has an index with created_at).
_REPLY_COUNTS = frozenset({"rcpt_key", "rcpt_domain", "mailbox"})


class SqliteStore(Store):
    """The store. Open it with :func:`open_store`; one instance per connection.

    It keeps what stays true from one transaction to the next: the directory lookups and the
    last numbers handed out, while no other connection commits (``PRAGMA data_version``
    tells: a ``directory import`` may run beside the engine).
    """

    failures = (sqlite3.Error, StoreError)

    def __init__(self, db: aiosqlite.Connection, files: FileStore, path: Path) -> None:
        self.db = db
        self.files = files
        self.path = path
        self._data_version: int | None = None
        self._ids: dict[tuple[str, str], int] = {}
        self._teams: dict[str | int | None, Team | None] = {}
        self._users: dict[tuple[str, str], User | None] = {}
        # The last request number and activity id handed out (absent: ask the database).
        self._last_ids: dict[str, int] = {}
        self._io = anyio.CapacityLimiter(8)  # attachment files written at once

    async def close(self) -> None:
        await self.db.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        """``BEGIN IMMEDIATE``, then ``COMMIT`` when the block ends, or ``ROLLBACK`` (shielded
        from cancellation) when it raises. The attachment files the transaction writes run in
        its own task group: started as it goes, awaited before COMMIT."""
        try:
            async with anyio.create_task_group() as files:
                tx = SqliteTransaction(self, files.start_soon)
                try:
                    await tx.begin()
                    yield tx
                    await tx.commit()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await tx.rollback()
                    raise
        except BaseExceptionGroup as group:
            # The task group wraps what the block raised: raise that, with its own cause.
            exc = sole(group)
            if exc is group:
                raise
            raise exc from exc.__cause__

    def forget_directory(self) -> None:
        """Drop the cached directory (it changed, or this connection changed it)."""
        self._ids.clear()
        self._teams.clear()
        self._users.clear()

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(await self.db.execute_fetchall(sql, args))

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self._all(sql, args)
        return rows[0] if rows else None

    async def check_login(self, login: str, password: str, early: EarlyCheck | None = None) -> bool:
        row = await self._one("SELECT password_hash FROM users WHERE login = ?", (login,))
        stored = None if row is None else row[0]
        if early is not None and (ok := await early.answer(stored)) is not None:
            return ok
        # scrypt is deliberately slow: keep it off the event loop.
        return await anyio.to_thread.run_sync(verify_password, password, stored)

    # -- reports ---------------------------------------------------------------------------

    async def mailbox_status(self) -> list[dict[str, Any]]:
        rows = await self._all(
            "SELECT mailbox, last_success, last_error, last_error_at, fetched, processed, "
            "failed, kept_deleted FROM mailbox_status ORDER BY mailbox"
        )
        outages = await self._all(
            "SELECT mailbox, cause FROM requests WHERE kind = 'outage' "
            "AND status NOT IN ('processed', 'closed')"
        )
        causes: dict[str, list[str]] = {}
        for m, c in outages:
            causes.setdefault(m, []).append(c)
        return [
            {
                "mailbox": r[0],
                "last_success": r[1],
                "last_error": r[2],
                "last_error_at": r[3],
                "fetched": r[4],
                "processed": r[5],
                "failed": r[6],
                "server_kept_deleted": r[7],
                "outages": sorted(causes.get(r[0], [])),
            }
            for r in rows
        ]

    async def list_requests(
        self, *, type: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        where, args = [], []
        if type:
            where.append("r.type = ?")
            args.append(type)
        if status:
            where.append("r.status = ?")
            args.append(status)
        sql = _REQUEST_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        rows = await self._all(sql + " ORDER BY r.number", args)
        return [_request_dict(r) for r in rows]

    async def reference_token(self, number: int) -> str | None:
        row = await self._one("SELECT value FROM engine_keys WHERE name = 'reference'")
        from engine.parse import tokens

        return None if row is None else tokens.token(number, str(row[0]))

    async def request_detail(self, number: int) -> dict[str, Any] | None:
        row = await self._one(_REQUEST_SELECT + " WHERE r.number = ?", (number,))
        if row is None:
            return None
        out = _request_dict(row)
        atts = await self._all(
            "SELECT id, activity_id, name, content_type, size, sha256 FROM attachments "
            "WHERE request_number = ? ORDER BY id",
            (number,),
        )

        def att(r: sqlite3.Row) -> dict[str, Any]:
            return {"id": r[0], "name": r[2], "content_type": r[3], "size": r[4], "sha256": r[5]}

        out["attachments"] = [att(a) for a in atts if a[1] is None]
        acts = await self._all(
            "SELECT id, author, email, date, body, automatic FROM activities "
            "WHERE request_number = ? ORDER BY id",
            (number,),
        )
        out["activities"] = [
            {
                "author": a[1],
                "email": a[2],
                "date": a[3],
                "body": a[4],
                "automatic": bool(a[5]),
                "attachments": [att(x) for x in atts if x[1] == a[0]],
            }
            for a in acts
        ]
        hist = await self._all(
            "SELECT at, by, text FROM history WHERE request_number = ? ORDER BY id", (number,)
        )
        out["history"] = [{"at": h[0], "by": h[1], "text": h[2]} for h in hist]
        out.update(await self._details(number))
        return out

    async def _details(self, number: int) -> dict[str, Any]:
        """A request's form fields, tags and foreign ticket numbers."""
        fields = await self._all(
            "SELECT name, value FROM request_fields WHERE request_number = ? ORDER BY id",
            (number,),
        )
        tags = await self._all(
            "SELECT tag FROM request_tags WHERE request_number = ? ORDER BY tag", (number,)
        )
        refs = await self._all(
            "SELECT ref FROM foreign_numbers WHERE request_number = ? ORDER BY id", (number,)
        )
        watchers = await self._all(
            "SELECT w.address, u.login FROM watchers w LEFT JOIN users u ON u.id = w.user_id "
            "WHERE w.request_number = ? ORDER BY w.added_at, w.address",
            (number,),
        )
        return {
            "fields": {f[0]: f[1] for f in fields},
            "tags": [t[0] for t in tags],
            "foreign_numbers": [r[0] for r in refs],
            "watchers": [{"address": w[0], "login": w[1]} for w in watchers],
        }

    async def counts(self) -> dict[str, int]:
        out = {}
        for table in ("requests", "activities", "attachments", "ledger", "outbox"):
            row = await self._one(f"SELECT count(*) FROM {table}")
            out[table] = 0 if row is None else int(row[0])
        return out

    async def referenced_digests(self) -> set[str]:
        return {r[0] for r in await self._all("SELECT DISTINCT sha256 FROM attachments")}

    async def attachment_data(self, sha256: str) -> bytes | None:
        """An attachment's bytes, by content: a row when small, else a file."""
        row = await self._one("SELECT data FROM attachment_blobs WHERE sha256 = ?", (sha256,))
        if row is not None:
            return bytes(row[0])
        try:
            return await anyio.to_thread.run_sync(self.files.get, sha256)
        except (OSError, ValueError):  # gone, unreadable, or not a digest: no content
            return None

    # -- the web console's reads -----------------------------------------------------------

    async def find_requests(self, where: RequestFilter, *, limit: int) -> list[dict[str, Any]]:
        sql, args = where.where(lambda n: "?")
        sql += " ORDER BY r.number DESC LIMIT ?"
        rows = await self._all(_REQUEST_SELECT + sql, [*args, limit])
        return [_request_dict(r) for r in rows]

    async def attachment(self, attachment_id: int) -> tuple[dict[str, Any], bytes] | None:
        row = await self._one(
            "SELECT request_number, name, content_type, size, sha256 FROM attachments WHERE id = ?",
            (attachment_id,),
        )
        if row is None:
            return None
        data = await self.attachment_data(row[4])
        if data is None:
            return None
        keys = ("request_number", "name", "content_type", "size", "sha256")
        return dict(zip(keys, row, strict=True)), data

    async def open_outage_events(self) -> list[dict[str, Any]]:
        rows = await self._all(
            "SELECT mailbox, cause, number, created_at FROM requests WHERE kind = 'outage' "
            "AND status NOT IN ('processed', 'closed') ORDER BY mailbox, number"
        )
        keys = ("mailbox", "cause", "number", "created_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def messages_since(self, since: str) -> dict[str, int]:
        rows = await self._all(
            "SELECT mailbox, count(*) FROM ledger WHERE processed_at >= ? GROUP BY mailbox",
            (since,),
        )
        return {r[0]: int(r[1]) for r in rows}

    async def flow(self, since: str) -> list[tuple[str, str, int]]:
        rows = await self._all(
            "SELECT mailbox, substr(processed_at, 1, 16) AS minute, count(*) FROM ledger "
            "WHERE processed_at >= ? GROUP BY mailbox, minute ORDER BY minute",
            (since,),
        )
        return [(r[0], r[1], int(r[2])) for r in rows]

    async def failures_by_cause(self, since: str) -> dict[str, int]:
        rows = await self._all(
            "SELECT cause, count(*) FROM requests WHERE kind = 'message-failure' "
            "AND created_at >= ? GROUP BY cause ORDER BY cause",
            (since,),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def waiting_on_server(self) -> dict[str, tuple[int, str]]:
        rows = await self._all(
            "SELECT mailbox, count(*), min(processed_at) FROM ledger "
            "WHERE outcome LIKE 'kept%' AND deleted_at IS NULL GROUP BY mailbox"
        )
        return {r[0]: (int(r[1]), str(r[2])) for r in rows}

    async def lag_since(self, since: str) -> dict[str, tuple[int, int, int]]:
        rows = await self._all(LAG_SQL.format(lag=_SQLITE_LAG, at="?"), (since,))
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}

    async def failed_ingests(self, sha256: str) -> int:
        first, retries = ingest_keys_like(sha256)
        row = await self._one(
            "SELECT count(*) FROM ledger WHERE (uidl = ? OR uidl LIKE ?) "
            "AND outcome LIKE 'failed%'",
            (first, retries),
        )
        return 0 if row is None else int(row[0])

    async def user_roles(self, login: str) -> set[str]:
        rows = await self._all(
            "SELECT r.role FROM user_roles r JOIN users u ON u.id = r.user_id WHERE u.login = ?",
            (login,),
        )
        return {r[0] for r in rows}


@dataclass(eq=False)
class _Files:
    """The attachment files of one transaction (or of what is left of it since a flush)."""

    data: dict[str, bytes] = field(default_factory=dict)
    writing: int = 0
    written: anyio.Event = field(default_factory=anyio.Event)
    errors: list[OSError] = field(default_factory=list)

    def started(self) -> None:
        """One more write under way. An Event stays set once set: a write that starts after
        every earlier one has finished needs a new one, or the commit would not wait for it
        (it cited a file that a crash then left unwritten: found by the crash harness)."""
        if not self.writing and self.written.is_set():
            self.written = anyio.Event()
        self.writing += 1


# The lag of each ledger row since a time, ranked per mailbox: the median is the row at the
# middle rank (the lower one of an even count), as PostgreSQL's percentile_disc(0.5) picks
# it; one statement for both stores, each with its own seconds between two ISO times.
# Never below 0: arrived_at is bounded when written, and a negative lag is not one.
LAG_SQL = (
    "WITH l AS (SELECT mailbox, {lag} AS lag FROM ledger "
    "WHERE processed_at >= {at} AND arrived_at IS NOT NULL), "
    "r AS (SELECT mailbox, lag, row_number() OVER (PARTITION BY mailbox ORDER BY lag) AS n, "
    "count(*) OVER (PARTITION BY mailbox) AS c FROM l) "
    "SELECT mailbox, max(CASE WHEN n = (c + 1) / 2 THEN lag END), max(lag), max(c) FROM r "
    "GROUP BY mailbox ORDER BY mailbox"
)
_SQLITE_LAG = (
    "max(0, CAST(round((julianday(processed_at) - julianday(arrived_at)) * 86400) AS INTEGER))"
)


class _LedgerInsert(NamedTuple):
    """A pending ledger row, as it goes to :data:`_INSERT_LEDGER`."""

    account: str
    uidl: str
    mailbox: str
    message_id: str | None
    sha256: str
    outcome: str
    request_number: int | None
    processed_at: str
    size: int | None
    needed: int | None
    arrived_at: str | None


@dataclass(eq=False)
class _Pending:
    """What the transaction wrote that SQLite has not seen yet: rows by table, and the
    attachment files they cite."""

    rows: dict[str, list[Any]] = field(default_factory=dict)  # only non-empty ones
    ledger: list[_LedgerInsert] = field(default_factory=list)  # rows["ledger"], typed
    # The pending requests as reads see them (their rows are in rows["requests"]).
    requests: dict[int, RequestRef] = field(default_factory=dict)
    files: _Files = field(default_factory=_Files)
    blobs: set[str] = field(default_factory=set)  # the digests in rows["attachment_blobs"]

    def add(self, table: str, row: Sequence[Any]) -> None:
        rows = self.rows.get(table)
        if rows is None:
            new: list[Any] = self.ledger if table == "ledger" else []
            self.rows[table] = rows = new
        rows.append(row)

    def holds(self, tables: frozenset[str] | None) -> bool:
        """Whether rows of one of ``tables`` (None: any table) wait to be sent."""
        if not self.rows:
            return False
        return tables is None or not tables.isdisjoint(self.rows)


@dataclass(eq=False)
class _ByMessageId:
    """What :meth:`SqliteTransaction.request_by_message_id` answers from for the Message-IDs
    read ahead (``read``): the request numbers the database held when the transaction began,
    the ledger's newest and the outbox's first row, and those this transaction wrote since
    (newer than any in the database). Dropped whole (None) when a row it cannot follow
    changes: an updated ledger row, a rolled-back savepoint."""

    read: set[str] = field(default_factory=set)
    ledger: dict[str, int] = field(default_factory=dict)
    outbox: dict[str, int] = field(default_factory=dict)
    ledger_since: dict[str, int] = field(default_factory=dict)
    outbox_since: dict[str, int] = field(default_factory=dict)

    def number(self, mid: str) -> int | None:
        """The request of ``mid`` (one of ``read``), as the queries of
        request_by_message_id would find it: the newest ledger row, else the first outbox
        row."""
        for found in (self.ledger_since, self.ledger, self.outbox):
            if mid in found:
                return found[mid]
        return self.outbox_since.get(mid)


_INSERT_ACTIVITY = (
    "INSERT INTO activities(id, request_number, author, email, date, body, automatic, "
    "message_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_INSERT_LEDGER = (
    "INSERT INTO ledger(account, uidl, mailbox, message_id, sha256, outcome, "
    "request_number, processed_at, size, needed, arrived_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_INSERT_REQUEST = (
    "INSERT INTO requests(number, team_id, type, status, kind, subject, description, html, "
    "requester_id, user_id, site_id, group_id, assignee_id, source_id, mailbox, cause, "
    "message_id, sha256, created_at, created_by, priority_id, correlation_key, alert_state, "
    "form) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_INSERT_HISTORY = "INSERT INTO history(request_number, at, by, text) VALUES (?, ?, ?, ?)"

_INSERT_ATTACHMENT = (
    "INSERT INTO attachments(request_number, activity_id, name, content_type, size, sha256) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

# The pending rows' statements by table, in the order a flush sends them: requests and
# activities first, the rows of the other tables refer to them.
_INSERTS = {
    "requests": _INSERT_REQUEST,
    "activities": _INSERT_ACTIVITY,
    "ledger": _INSERT_LEDGER,
    "history": _INSERT_HISTORY,
    "attachments": _INSERT_ATTACHMENT,
    "request_fields": "INSERT INTO request_fields(request_number, name, value) VALUES (?, ?, ?)",
    "request_tags": "INSERT OR IGNORE INTO request_tags(request_number, tag) VALUES (?, ?)",
    "foreign_numbers": ("INSERT OR IGNORE INTO foreign_numbers(ref, request_number) VALUES (?, ?)"),
    "request_origins": (
        "INSERT INTO request_origins(request_number, mailbox, team_id, sender, fingerprint, "
        "message_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    ),
    "watchers": (
        "INSERT OR IGNORE INTO watchers(request_number, address, user_id, added_at) "
        "VALUES (?, ?, ?, ?)"
    ),
    "undeliverable": (
        "INSERT INTO undeliverable(address, status, reason, request_number, since) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(address) DO UPDATE SET status = excluded.status, "
        "reason = excluded.reason, request_number = excluded.request_number, "
        "since = excluded.since"
    ),
    # Content already there (cited by an earlier message) is the same bytes: kept.
    "attachment_blobs": "INSERT OR IGNORE INTO attachment_blobs(sha256, data) VALUES (?, ?)",
}

BLOB_MAX = 64 * 1024
"""Attachments up to this size are rows of ``attachment_blobs``, made durable by the commit
that cites them; larger ones are files, written and fsynced while the transaction goes on.
SQLite reads blobs under ~100 KB faster from the database than from files
(sqlite.org/intern-v-extern-blob.html), and a file costs two fsyncs (file and folder) where
a row costs none of its own; past a few tens of KB a blob doubles the WAL's traffic (written
to the WAL, then checkpointed) for no gain. Measured in BENCHMARKS.md (issue 18)."""


def _tables(*names: str) -> frozenset[str]:
    return frozenset(names)


_NONE: frozenset[str] = frozenset()


class SqliteTransaction(Transaction):
    """One ``BEGIN IMMEDIATE … COMMIT`` of a :class:`SqliteStore` (see
    :meth:`SqliteStore.transaction`). Every read method sees this transaction's writes."""

    def __init__(self, store: SqliteStore, spawn: Callable[..., object]) -> None:
        self._store = store
        self.db = store.db
        self._spawn = spawn  # starts a task in the transaction's task group (file writes)
        self._pending = _Pending()
        # Requests read ahead for this transaction (None: no such request).
        self._read_ahead: dict[int, RequestRef | None] = {}
        # request_origins read ahead for the batch, this transaction's own added (None: not
        # read): what flood() and origins() answer from for what it covers.
        self._origins: list[tuple[int, str, str, str, str | None, str]] | None = None
        self._origins_cover: tuple[frozenset[str], frozenset[str], frozenset[str], str] = (
            frozenset(),
            frozenset(),
            frozenset(),
            "",
        )
        # The same rows' (request number, mailbox) by Message-ID: origins() asks per new
        # request, and a scan of them all was O(batch) each time.
        self._origins_by_mid: dict[str, list[tuple[int, str]]] = {}
        # The requests the batch's thread and bounce Message-IDs name, read ahead (None:
        # not read, or dropped: asked one by one).
        self._by_message_id: _ByMessageId | None = None
        self._savepoints = 0
        self._directory = DirectoryView(
            user_by_email=self.user_by_email,
            user_by_login=self.user_by_login,
            team=self.team,
            request=self.request,
            request_by_message_id=self.request_by_message_id,
            correlated_event=self.correlated_event,
            request_by_foreign_number=self.request_by_foreign_number,
            has_name=self.has_name,
            flood=self.flood,
            origins=self.origins,
        )

    @property
    def directory(self) -> DirectoryView:
        return self._directory

    # -- lifecycle -------------------------------------------------------------------------

    async def begin(self) -> None:
        # The last numbers handed out stay known from one committed transaction to the next
        # (the data-directory lock makes this the only engine) unless another connection
        # committed meanwhile: one query less per transaction.
        store = self._store
        await self.db.execute_fetchall("BEGIN IMMEDIATE")
        row = await self._one("PRAGMA data_version", sees=_NONE)
        version = int(row[0]) if row else None
        if version != store._data_version:
            store._data_version = version
            store.forget_directory()
            store._last_ids.clear()

    async def commit(self) -> None:
        await self.flush()
        try:
            await self.db.execute_fetchall("COMMIT")
        except BaseException:
            self._store._last_ids.clear()  # not known to be in the database
            raise

    async def rollback(self) -> None:
        self._discard()
        if not self.db.in_transaction:
            return
        try:
            await self.db.execute_fetchall("ROLLBACK")
        except sqlite3.Error:
            # The error that brought us here says more; SQLite rolls back on close anyway.
            log.exception("rollback failed")

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """``SAVEPOINT``; ``RELEASE`` when the block ends; ``ROLLBACK TO`` when it raises a
        message's error (an ``Exception`` that is not the store failing)."""
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        await self.flush()  # what is pending was written before the savepoint
        await self.db.execute_fetchall(f"SAVEPOINT {name}")
        try:
            yield
        except (sqlite3.Error, StoreError):
            raise  # the store failing: the whole transaction rolls back
        except Exception:
            # Whatever is pending was written after the savepoint (it flushed).
            self._discard()
            await self.db.execute_fetchall(f"ROLLBACK TO {name}")
            await self.db.execute_fetchall(f"RELEASE {name}")
            raise
        await self.db.execute_fetchall(f"RELEASE {name}")

    async def flush(self) -> None:
        """Send the pending rows and files: files durable first, then their rows."""
        pending = self._pending
        if pending.files.data:
            files, pending.files = pending.files, _Files()
            await self._write_files(files)
        if pending.rows:
            rows = pending.rows
            pending.rows, pending.ledger = {}, []
            pending.requests.clear()
            pending.blobs.clear()
            for table, sql in _INSERTS.items():
                if table in rows:
                    await self.db.executemany(sql, rows[table])

    async def _write_file(self, files: _Files, digest: str, data: bytes) -> None:
        """Write one file durably in a worker thread; never raises (``files`` records)."""
        store = self._store
        try:
            await anyio.to_thread.run_sync(store.files.write, digest, data, limiter=store._io)
        except OSError as exc:
            files.errors.append(exc)
        finally:
            files.writing -= 1
            if not files.writing:
                files.written.set()

    async def _write_files(self, files: _Files) -> None:
        """Wait for the files' writes, started as the transaction went (add_attachments).

        One after the other, each file costs two fsyncs (~2 ms each on a busy virtual disk):
        the commit waited ~10 ms per transaction for them. Written while the transaction
        goes on, they are mostly done when it commits.
        """
        if files.writing:
            await files.written.wait()
        if files.errors:
            # The store failing, never the message: nothing of the batch commits.
            error = files.errors[0]
            raise StoreError(f"cannot write attachment files: {error}") from error

    def _discard(self) -> None:
        """Forget what is pending (rolled back). Writes under way finish on their own; what
        they leave is swept as unreferenced. The numbers rolled back are given again."""
        self._pending = _Pending()
        self._read_ahead.clear()
        self._origins = None
        self._by_message_id = None
        self._store._last_ids.clear()

    # -- small helpers ---------------------------------------------------------------------

    # Each call below is one round trip to aiosqlite's thread (execute, fetch and close in
    # one). ``sees`` names the tables whose pending rows the statement must see (those it
    # reads, changes or refers to; None: any): they are sent first, and only then.

    async def _all(
        self, sql: str, args: Sequence[Any] = (), *, sees: frozenset[str] | None = None
    ) -> list[sqlite3.Row]:
        if self._pending.holds(sees):
            await self.flush()
        return list(await self.db.execute_fetchall(sql, args))

    async def _one(
        self, sql: str, args: Sequence[Any] = (), *, sees: frozenset[str] | None = None
    ) -> sqlite3.Row | None:
        rows = await self._all(sql, args, sees=sees)
        return rows[0] if rows else None

    async def _name_id(self, table: str, name: str | None) -> int | None:
        if not name:
            return None
        ids = self._store._ids
        key = (table, name.casefold())
        if key not in ids:
            row = await self._one(f"SELECT id FROM {table} WHERE name = ?", (name,), sees=_NONE)
            if row is None:
                return None
            ids[key] = int(row[0])
        return ids[key]

    # -- directory -------------------------------------------------------------------------

    async def user_by_email(self, email: str) -> User | None:
        if not email:
            return None
        users = self._store._users
        key = ("email", email.casefold())
        if key not in users:
            users[key] = await self._user("u.email = ?", email)
        return users[key]

    async def user_by_login(self, login: str) -> User | None:
        users = self._store._users
        key = ("login", login)
        if key not in users:
            users[key] = await self._user("u.login = ?", login)
        return users[key]

    async def _user(self, where: str, arg: str) -> User | None:
        # Users and sites are written by import_directory only, never pending.
        row = await self._one(
            "SELECT u.id, u.login, u.email, u.name, s.name, u.password_hash IS NOT NULL "
            "OR EXISTS (SELECT 1 FROM user_roles r WHERE r.user_id = u.id AND r.role = 'agent') "
            f"FROM users u LEFT JOIN sites s ON s.id = u.site_id WHERE {where} "
            "ORDER BY u.id LIMIT 1",
            (arg,),
            sees=_NONE,
        )
        return None if row is None else User(row[0], row[1], row[2], row[3], row[4], bool(row[5]))

    async def has_name(self, table: str, name: str) -> bool:
        assert table in {"sites", "groups", "sources", "priorities", "categories"}
        return await self._name_id(table, name) is not None

    async def team(self, ref: str | int | None) -> Team | None:
        teams = self._store._teams
        if ref not in teams:
            teams[ref] = await self._team(ref)
        return teams[ref]

    async def _team(self, ref: str | int | None) -> Team | None:
        sql = (
            "SELECT t.id, t.number, t.name, g.name FROM teams t "
            "LEFT JOIN groups g ON g.id = t.default_group_id "
        )
        if ref is None or ref == "":
            rows = await self._all(sql + "ORDER BY t.number LIMIT 2", sees=_NONE)
            if len(rows) != 1:
                return None
            row: sqlite3.Row | None = rows[0]
        elif isinstance(ref, int) or str(ref).isdigit():
            row = await self._one(sql + "WHERE t.number = ?", (int(ref),), sees=_NONE)
        else:
            row = await self._one(sql + "WHERE t.name = ?", (ref,), sees=_NONE)
        return None if row is None else Team(row[0], row[1], row[2], row[3])

    async def first_team(self) -> Team | None:
        rows = await self._all(
            "SELECT t.id, t.number, t.name, g.name FROM teams t "
            "LEFT JOIN groups g ON g.id = t.default_group_id ORDER BY t.number LIMIT 1",
            sees=_NONE,
        )
        return Team(rows[0][0], rows[0][1], rows[0][2], rows[0][3]) if rows else None

    async def import_directory(self, data: Mapping[str, Any]) -> dict[str, int]:
        # This connection's own changes leave data_version alone: drop the cache by hand.
        self._store.forget_directory()
        counts = dict.fromkeys(
            ("teams", "sites", "groups", "sources", "priorities", "categories", "users"), 0
        )
        for table in ("sites", "groups", "sources", "priorities", "categories"):
            for name in data.get(table, []):
                await self._all(f"INSERT OR IGNORE INTO {table}(name) VALUES (?)", (name,))
                counts[table] += 1
        for team in data.get("teams", []):
            group = team.get("defaultGroup")
            if group:
                await self._all("INSERT OR IGNORE INTO groups(name) VALUES (?)", (group,))
            group_id = await self._name_id("groups", group)
            await self._all(
                "INSERT INTO teams(number, name, default_group_id) VALUES (?, ?, ?) "
                "ON CONFLICT(number) DO UPDATE SET name = excluded.name, "
                "default_group_id = excluded.default_group_id",
                (int(team["number"]), team["name"], group_id),
            )
            counts["teams"] += 1
        for user in data.get("users", []):
            site = user.get("site")
            if site:
                await self._all("INSERT OR IGNORE INTO sites(name) VALUES (?)", (site,))
            password = user.get("password")
            password_hash = (
                await anyio.to_thread.run_sync(hash_password, password) if password else None
            )
            await self._all(
                "INSERT INTO users(login, email, name, site_id, password_hash) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(login) DO UPDATE SET "
                "email = excluded.email, name = excluded.name, site_id = excluded.site_id, "
                "password_hash = COALESCE(excluded.password_hash, users.password_hash)",
                (
                    user["login"],
                    user.get("email"),
                    user.get("name") or user["login"],
                    await self._name_id("sites", site),
                    password_hash,
                ),
            )
            if "roles" in user:
                await self._set_roles(user["login"], user["roles"])
            counts["users"] += 1
        return counts

    async def _set_roles(self, login: str, roles: Iterable[str]) -> None:
        """The user's roles become exactly ``roles`` (a list in the directory file)."""
        if isinstance(roles, str):
            raise TypeError(f"the roles of user {login!r} must be a list of names")
        await self._all(
            "DELETE FROM user_roles WHERE user_id = (SELECT id FROM users WHERE login = ?)",
            (login,),
        )
        for role in roles:
            await self._all(
                "INSERT OR IGNORE INTO user_roles(user_id, role) "
                "SELECT id, ? FROM users WHERE login = ?",
                (str(role), login),
            )

    # -- ledger ----------------------------------------------------------------------------

    async def ledger_rows(self, account: str, uidls: Iterable[str]) -> dict[str, LedgerRow]:
        found: dict[str, LedgerRow] = {}
        # Chunks stay under SQLite's bound-parameter limit, whatever the mailbox holds.
        async for chunk in chunked(uidls, 500):
            marks = ",".join("?" * len(chunk))
            rows = await self._all(
                "SELECT uidl, size, needed, message_id, sha256, outcome, request_number, "
                f"deleted_at FROM ledger WHERE account = ? AND uidl IN ({marks})",
                (account, *chunk),
                sees=_LEDGER,
            )
            found.update((r[0], LedgerRow(*r[1:])) for r in rows)
        return found

    async def ledger_keys_by_sha256(
        self, account: str, sha256s: Iterable[str]
    ) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        async for chunk in chunked(sha256s, 500):
            marks = ",".join("?" * len(chunk))
            rows = await self._all(
                f"SELECT sha256, uidl FROM ledger WHERE account = ? AND sha256 IN ({marks})",
                (account, *chunk),
                sees=_LEDGER,
            )
            for sha, uidl in rows:
                found.setdefault(sha, []).append(uidl)
        return found

    async def update_ledger(
        self,
        *,
        account: str,
        uidl: str,
        message_id: str | None,
        sha256: str,
        outcome: str,
        request_number: int | None,
        size: int | None,
        needed: int | None,
    ) -> None:
        self._by_message_id = None  # a row of the database changes its Message-ID or request
        await self._all(
            "UPDATE ledger SET message_id = ?, sha256 = ?, outcome = ?, request_number = ?, "
            "size = ?, needed = ?, processed_at = ? WHERE account = ? AND uidl = ?",
            (message_id, sha256, outcome, request_number, size, needed, now(), account, uidl),
            sees=_LEDGER_AND_REQUESTS,
        )

    async def mark_deleted(self, account: str, uidls: Iterable[str]) -> None:
        at = now()
        async for chunk in chunked(uidls, 500):
            marks = ",".join("?" * len(chunk))
            await self._all(
                f"UPDATE ledger SET deleted_at = ? WHERE account = ? AND uidl IN ({marks}) "
                "AND deleted_at IS NULL",
                (at, account, *chunk),
                sees=_LEDGER,
            )

    async def rename_account(self, old: str, new: str) -> None:
        await self._all("UPDATE ledger SET account = ? WHERE account = ?", (new, old), sees=_LEDGER)

    async def account_has_rows(self, account: str) -> bool:
        row = await self._one(
            "SELECT 1 FROM ledger WHERE account = ? LIMIT 1", (account,), sees=_LEDGER
        )
        return row is not None

    async def mailbox_account(self, mailbox: str) -> tuple[str, str] | None:
        row = await self._one(
            "SELECT account, user_name FROM mailbox_account WHERE mailbox = ?",
            (mailbox,),
            sees=_NONE,
        )
        return None if row is None else (str(row[0]), str(row[1]))

    async def remember_account(self, mailbox: str, account: str, user_name: str) -> None:
        await self._all(
            "INSERT INTO mailbox_account(mailbox, account, user_name) VALUES (?, ?, ?) "
            "ON CONFLICT(mailbox) DO UPDATE SET account = excluded.account, "
            "user_name = excluded.user_name",
            (mailbox, account, user_name),
            sees=_NONE,
        )

    async def record_ledger(
        self,
        *,
        account: str,
        uidl: str,
        mailbox: str,
        message_id: str | None,
        sha256: str,
        outcome: str,
        request_number: int | None,
        size: int | None = None,
        needed: int | None = None,
        arrived: datetime | None = None,
    ) -> None:
        at = now()
        ahead = self._by_message_id
        if ahead is not None and message_id is not None and request_number is not None:
            ahead.ledger_since[message_id] = request_number
        self._pending.add(
            "ledger",
            _LedgerInsert(
                account=account,
                uidl=uidl,
                mailbox=mailbox,
                message_id=message_id,
                sha256=sha256,
                outcome=scrub(outcome),
                request_number=request_number,
                processed_at=at,
                size=size,
                needed=needed,
                arrived_at=arrived_text(arrived, at),
            ),
        )

    # -- requests --------------------------------------------------------------------------

    async def read_ahead(self, numbers: Iterable[int]) -> None:
        """Read these requests in one query; :meth:`request` answers from them until the
        transaction ends (a status change updates them)."""
        wanted = {n for n in numbers if n not in self._read_ahead and 0 < n < 2**63}
        async for chunk in chunked(sorted(wanted), 500):
            marks = ",".join("?" * len(chunk))
            # The pending requests need not be sent: request() consults them first.
            rows = await self._all(
                "SELECT number, team_id, type, status, kind FROM requests "
                f"WHERE number IN ({marks})",
                chunk,
                sees=_NONE,
            )
            self._read_ahead.update((n, None) for n in chunk)
            self._read_ahead.update((r[0], RequestRef(r[0], r[1], r[2], r[3], r[4])) for r in rows)

    async def request(self, number: int) -> RequestRef | None:
        # Pending requests are never updated (set_status sends them first).
        if number in self._pending.requests:
            return self._pending.requests[number]
        if number in self._read_ahead:
            return self._read_ahead[number]
        row = await self._one(
            "SELECT number, team_id, type, status, kind FROM requests WHERE number = ?",
            (number,),
            sees=_NONE,  # the pending requests were consulted above
        )
        return None if row is None else RequestRef(row[0], row[1], row[2], row[3], row[4])

    async def read_ahead_message_ids(self, message_ids: Iterable[str]) -> None:
        """Read the requests these Message-IDs name, in one query on the ledger and one on
        the outbox, instead of two per Message-ID: :meth:`request_by_message_id` answers
        from them."""
        wanted = sorted({m for m in message_ids if m})
        if not wanted or len(wanted) > 30_000:
            return  # nothing to read, or over SQLite's variables: asked one by one instead
        ahead = _ByMessageId(read=set(wanted))
        marks = ",".join("?" * len(wanted))
        for table, found, newest in (
            ("ledger", ahead.ledger, True),
            ("outbox", ahead.outbox, False),
        ):
            rows = await self._all(
                f"SELECT message_id, request_number FROM {table} WHERE message_id IN ({marks}) "
                "AND request_number IS NOT NULL ORDER BY id",
                wanted,
                sees=_LEDGER if table == "ledger" else _OUTBOX,
            )
            for mid, number in rows:
                if newest or mid not in found:
                    found[mid] = int(number)
        self._by_message_id = ahead

    async def request_by_message_id(self, message_ids: Sequence[str]) -> RequestRef | None:
        for mid in message_ids:
            ahead = self._by_message_id
            if ahead is not None and mid in ahead.read:
                number = ahead.number(mid)
            else:
                number = await self._number_by_message_id(mid)
            if number is not None:
                return await self.request(number)
        return None

    async def _number_by_message_id(self, mid: str) -> int | None:
        """The request ``mid`` names, asked of the pending rows and the database."""
        # The newest ledger row wins; pending ones are newer than any in the database.
        number = next(
            (
                r.request_number
                for r in reversed(self._pending.ledger)
                if r.message_id == mid and r.request_number is not None
            ),
            None,
        )
        if number is not None:
            return number
        row = await self._one(
            "SELECT request_number FROM ledger WHERE message_id = ? "
            "AND request_number IS NOT NULL ORDER BY id DESC LIMIT 1",
            (mid,),
            sees=_NONE,  # the pending ledger rows were consulted above
        )
        if row is None:
            row = await self._one(
                "SELECT request_number FROM outbox WHERE message_id = ? "
                "AND request_number IS NOT NULL",
                (mid,),
                sees=_OUTBOX,
            )
        return None if row is None else int(row[0])

    async def create_request(
        self,
        *,
        team_id: int,
        type: str,
        subject: str,
        description: str,
        created_by: str,
        status: str = "new",
        kind: str = "mail",
        html: str | None = None,
        requester_id: int | None = None,
        user_id: int | None = None,
        site: str | None = None,
        group: str | None = None,
        assignee_id: int | None = None,
        source: str | None = None,
        mailbox: str | None = None,
        cause: str | None = None,
        message_id: str | None = None,
        sha256: str | None = None,
        priority: str | None = None,
        correlation_key: str | None = None,
        alert_state: str | None = None,
        form: str | None = None,
    ) -> int:
        number = await self._next_id("requests")
        # Also over a read-ahead that found no such number yet (a reply in the same batch).
        self._pending.requests[number] = self._read_ahead[number] = RequestRef(
            number, team_id, type, status, kind
        )
        self._pending.add(
            "requests",
            (
                number,
                team_id,
                type,
                status,
                kind,
                scrub(subject),
                scrub(description),
                None if html is None else scrub(html),
                requester_id,
                user_id,
                await self._name_id("sites", site),
                await self._name_id("groups", group),
                assignee_id,
                await self._name_id("sources", source),
                mailbox,
                cause,
                message_id,
                sha256,
                now(),
                created_by,
                await self._name_id("priorities", priority),
                *(correlation_key, alert_state, None if form is None else scrub(form)),
            ),
        )
        await self.add_history(number, created_by, f"Created from {kind.replace('-', ' ')}.")
        return number

    async def _next_id(self, table: str) -> int:
        """The next request number or activity id. We hold the write lock (BEGIN IMMEDIATE),
        so they are ours to hand out; for requests AUTOINCREMENT's rule holds: never a number
        used before, even by a deleted request."""
        last_ids = self._store._last_ids
        if table not in last_ids:
            if table == "requests":
                sql = (
                    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence "
                    "WHERE name = 'requests'), 0), coalesce((SELECT max(number) FROM requests), 0))"
                )
            else:
                sql = "SELECT coalesce(max(id), 0) FROM activities"
            row = await self._one(sql, sees=_tables(table))
            last_ids[table] = int(row[0]) if row else 0
        last_ids[table] += 1
        return last_ids[table]

    async def add_activity(
        self,
        number: int,
        *,
        author: str,
        email: str,
        body: str,
        date: datetime | None = None,
        automatic: bool = False,
        message_id: str | None = None,
    ) -> int:
        activity = await self._next_id("activities")
        self._pending.add(
            "activities",
            (
                activity,
                number,
                scrub(author),
                scrub(email),
                (date or datetime.now(UTC)).isoformat(timespec="seconds"),
                scrub(body),
                int(automatic),
                message_id,
                now(),
            ),
        )
        return activity

    async def set_status(self, number: int, status: str, *, by: str, why: str) -> None:
        await self._all(
            "UPDATE requests SET status = ?, closed_at = CASE WHEN ? THEN ? ELSE closed_at END "
            "WHERE number = ?",
            (status, status in CLOSED_STATUSES, now(), number),
            sees=_REQUESTS,
        )
        self._read_ahead.pop(number, None)
        await self.add_history(number, by, why)

    async def add_history(self, number: int, by: str, text: str) -> None:
        self._pending.add("history", (number, now(), scrub(by), scrub(text)))

    async def add_attachments(
        self, number: int, activity_id: int | None, attachments: Iterable[Attachment]
    ) -> None:
        for att in attachments:
            # Written and fsynced before the commit that cites it: from now on, in the
            # transaction's task group.
            if att.sha256 is not None:
                digest = att.sha256  # hashed by the parse stage
            elif len(att.data) < _HASH_IN_THREAD:
                digest = hashlib.sha256(att.data).hexdigest()
            else:  # hashlib lets go of the GIL: keep the event loop free meanwhile
                digest = await anyio.to_thread.run_sync(_sha256, att.data)
            pending = self._pending
            if len(att.data) <= BLOB_MAX:
                if digest not in pending.blobs:
                    pending.blobs.add(digest)
                    pending.add("attachment_blobs", (digest, att.data))
            elif digest not in pending.files.data:
                files = pending.files
                files.data[digest] = att.data
                files.started()
                self._spawn(self._write_file, files, digest, att.data)
            self._pending.add(
                "attachments",
                (number, activity_id, scrub(att.name), att.content_type, len(att.data), digest),
            )

    async def add_request_details(
        self,
        number: int,
        *,
        fields: Sequence[tuple[str, str]] = (),
        tags: Iterable[str] = (),
        foreign_numbers: Iterable[str] = (),
    ) -> None:
        for name, value in fields:
            self._pending.add("request_fields", (number, scrub(name), scrub(value)))
        for tag in tags:
            self._pending.add("request_tags", (number, scrub(tag)))
        for ref in foreign_numbers:
            self._pending.add("foreign_numbers", (ref, number))

    async def set_alert_state(self, number: int, state: str) -> None:
        await self._all(
            "UPDATE requests SET alert_state = ? WHERE number = ?",
            (scrub(state), number),
            sees=_REQUESTS,
        )

    async def correlated_event(self, key: str) -> CorrelatedEvent | None:
        row = await self._one(
            "SELECT number, team_id, type, status, kind, alert_state, closed_at FROM requests "
            "WHERE correlation_key = ? ORDER BY number DESC LIMIT 1",
            (key,),
            sees=_REQUESTS,
        )
        if row is None:
            return None
        ref = RequestRef(row[0], row[1], row[2], row[3], row[4])
        closed = datetime.fromisoformat(row[6]) if row[6] and row[3] in CLOSED_STATUSES else None
        return CorrelatedEvent(ref, row[5], closed)

    async def request_by_foreign_number(self, refs: Sequence[str]) -> RequestRef | None:
        for ref in refs:
            row = await self._one(
                "SELECT max(request_number) FROM foreign_numbers WHERE ref = ?",
                (ref,),
                sees=_FOREIGN,
            )
            if row is not None and row[0] is not None:
                return await self.request(int(row[0]))
        return None

    async def read_ahead_origins(
        self,
        mailboxes: Iterable[str],
        keys: Iterable[str],
        message_ids: Iterable[str],
        since: datetime,
    ) -> None:
        boxes, wanted, mids = (
            frozenset(mailboxes),
            frozenset(k.lower() for k in keys),
            frozenset(message_ids),
        )
        if len(boxes) + 2 * len(wanted) + len(mids) > 30_000:
            return  # over SQLite's variables: asked one by one instead
        after = since.isoformat(timespec="seconds")
        b, k, m = (",".join("?" * len(x)) for x in (boxes, wanted, mids))
        rows = await self._all(
            "SELECT request_number, mailbox, sender, fingerprint, message_id, created_at "
            f"FROM request_origins WHERE (mailbox IN ({b}) AND created_at >= ? "
            f"AND (sender IN ({k}) OR fingerprint IN ({k}))) OR message_id IN ({m})",
            (*boxes, after, *wanted, *wanted, *mids),
            sees=_tables("request_origins"),
        )
        self._origins = [(int(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows]
        self._origins_cover = (boxes, wanted, mids, after)
        self._origins_by_mid = {}
        for r in self._origins:
            if r[4] is not None:
                self._origins_by_mid.setdefault(r[4], []).append((r[0], r[1]))

    async def engine_key(self, name: str) -> str | None:
        row = await self._one("SELECT value FROM engine_keys WHERE name = ?", (name,), sees=_NONE)
        return None if row is None else str(row[0])

    async def record_origin(self, number: int, origin: Origin) -> None:
        o = origin
        row = (number, o.mailbox, o.sender.lower(), o.fingerprint, o.message_id, now())
        if self._origins is not None:
            self._origins.append(row)
            if o.message_id is not None:
                self._origins_by_mid.setdefault(o.message_id, []).append((number, o.mailbox))
        self._pending.add("request_origins", (number, o.mailbox, o.team_id, *row[2:]))

    async def flood(
        self, mailbox: str, sender: str, fingerprint: str, since: datetime
    ) -> tuple[int, int | None]:
        after = since.isoformat(timespec="seconds")
        boxes, wanted, _, covered_after = self._origins_cover
        if (
            self._origins is not None
            and mailbox in boxes
            and {sender.lower(), fingerprint} <= wanted
            and after >= covered_after
        ):
            numbers = [
                r[0]
                for r in self._origins
                if r[1] == mailbox
                and r[5] >= after
                and (r[2] == sender.lower() or r[3] == fingerprint)
            ]
            return len(numbers), max(numbers, default=None)
        row = await self._one(
            "SELECT count(*), max(request_number) FROM request_origins WHERE mailbox = ? "
            "AND (sender = ? OR fingerprint = ?) AND created_at >= ?",
            (mailbox, sender.lower(), fingerprint, since.isoformat(timespec="seconds")),
            sees=_tables("request_origins"),
        )
        if row is None or not row[0]:
            return 0, None
        return int(row[0]), int(row[1])

    async def origins(self, message_id: str) -> list[tuple[RequestRef, str]]:
        rows: list[Any]
        if self._origins is not None and message_id in self._origins_cover[2]:
            rows = sorted(self._origins_by_mid.get(message_id, ()))[:100]
        else:
            rows = await self._all(
                "SELECT request_number, mailbox FROM request_origins WHERE message_id = ? "
                "ORDER BY request_number LIMIT 100",
                (message_id,),
                sees=_tables("request_origins"),
            )
        out = []
        for number, mailbox in rows:
            ref = await self.request(int(number))
            if ref is not None:
                out.append((ref, str(mailbox)))
        return out

    async def add_watchers(self, number: int, watchers: Iterable[Watcher]) -> None:
        for w in watchers:
            self._pending.add("watchers", (number, scrub(w.address.lower()), w.user_id, now()))

    async def mark_undeliverable(
        self, address: str, *, status: str, reason: str, request_number: int | None
    ) -> None:
        row = (scrub(address.lower()), scrub(status), scrub(reason), request_number, now())
        self._pending.add("undeliverable", row)

    async def undeliverable(self, address: str) -> str | None:
        row = await self._one(
            "SELECT since, status, reason FROM undeliverable WHERE address = ?",
            (address.lower(),),
            sees=_tables("undeliverable"),
        )
        return None if row is None else f"since {row[0]}: {row[1]} {row[2]}"

    async def failure_event(self, message_id: str | None, sha256: str) -> int | None:
        row = await self._one(
            "SELECT number FROM requests WHERE kind = 'message-failure' AND sha256 = ? "
            "AND (message_id IS ? OR message_id = ?) ORDER BY number LIMIT 1",
            (sha256, message_id, message_id),
            sees=_REQUESTS,
        )
        return None if row is None else int(row[0])

    async def open_outages(self, mailbox: str) -> dict[str, int]:
        rows = await self._all(
            "SELECT cause, number FROM requests WHERE kind = 'outage' AND mailbox = ? "
            "AND status NOT IN ('processed', 'closed')",
            (mailbox,),
            sees=_REQUESTS,
        )
        return {r[0]: int(r[1]) for r in rows}

    async def outages_by_cause(self, mailbox: str, causes: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(causes))
        if not wanted:
            return {}
        marks = ", ".join("?" * len(wanted))
        rows = await self._all(
            "SELECT cause, MAX(number) FROM requests WHERE kind = 'outage' AND mailbox = ? "
            f"AND cause IN ({marks}) GROUP BY cause",
            (mailbox, *wanted),
            sees=_REQUESTS,
        )
        return {r[0]: int(r[1]) for r in rows}

    # -- outbox ----------------------------------------------------------------------------

    async def queue_reply(
        self,
        *,
        mailbox: str,
        request_number: int | None,
        recipient: str,
        rcpt_key: str,
        rcpt_domain: str,
        message_id: str,
        message: bytes,
    ) -> int:
        at = now()
        row = (mailbox, request_number, recipient, rcpt_key, rcpt_domain, message_id, message)
        # The request a reply refers to must be in the table first (a foreign key).
        if self._pending.holds(_REQUESTS):
            await self.flush()
        inserted = await self.db.execute_insert(
            "INSERT INTO outbox(mailbox, request_number, recipient, rcpt_key, rcpt_domain, "
            "message_id, message, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row, at, at),
        )
        assert inserted is not None
        ahead = self._by_message_id
        if ahead is not None and request_number is not None:
            ahead.outbox_since.setdefault(message_id, request_number)
        return int(inserted[0])

    async def replies_since(self, by: str, value: str, since: datetime) -> int:
        if by not in _REPLY_COUNTS:
            raise ValueError(f"cannot count replies by {by!r}")
        row = await self._one(
            f"SELECT count(*) FROM outbox WHERE {by} = ? AND created_at >= ?",
            (value, since.isoformat(timespec="seconds")),
            sees=_OUTBOX,
        )
        return 0 if row is None else int(row[0])

    async def due_replies(
        self, mailboxes: Sequence[str], *, exclude: Iterable[int], limit: int
    ) -> tuple[list[PendingReply], str | None]:
        names = list(mailboxes)
        skip = list(exclude)
        if not names or limit <= 0:
            return [], None
        where = (
            "sent_at IS NULL AND failed_at IS NULL "
            f"AND mailbox IN ({','.join('?' * len(names))}) "
            f"AND id NOT IN ({','.join('?' * len(skip))})"
        )
        at = now()
        rows = await self._all(
            f"SELECT id, mailbox, recipient, message, attempts FROM outbox WHERE {where} "
            "AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
            (*names, *skip, at, limit),
            sees=_OUTBOX,
        )
        later = await self._one(
            f"SELECT min(next_attempt_at) FROM outbox WHERE {where} AND next_attempt_at > ?",
            (*names, *skip, at),
            sees=_OUTBOX,
        )
        due = [PendingReply(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), int(r[4])) for r in rows]
        return due, (str(later[0]) if later is not None and later[0] is not None else None)

    async def record_attempt(
        self, reply_id: int, *, error: str | None, retry_at: datetime | None = None
    ) -> None:
        args: tuple[str, ...]
        if error is None:
            sql, args = "sent_at = ?, error = NULL", (now(),)
        elif retry_at is not None:
            # Rounded up to the second (the precision of every time here): never early.
            retry = retry_at + timedelta(microseconds=-retry_at.microsecond % 1_000_000)
            sql = "error = ?, next_attempt_at = ?"
            args = (scrub(error), retry.isoformat(timespec="seconds"))
        else:
            sql, args = "error = ?, failed_at = ?", (scrub(error), now())
        await self._all(
            f"UPDATE outbox SET attempts = attempts + 1, {sql} WHERE id = ?",
            (*args, reply_id),
            sees=_OUTBOX,
        )

    # -- mailbox status --------------------------------------------------------------------

    async def note_session(
        self,
        mailbox: str,
        *,
        error: str | None,
        fetched: int,
        processed: int,
        failed: int,
        kept_deleted: int | None = None,
    ) -> None:
        at = now()
        await self._all(
            "INSERT INTO mailbox_status(mailbox, last_success, last_error, last_error_at, "
            "fetched, processed, failed, kept_deleted) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(mailbox) DO UPDATE SET "
            "kept_deleted = COALESCE(?, kept_deleted), "
            "last_success = COALESCE(excluded.last_success, last_success), "
            "last_error = CASE WHEN excluded.last_error IS NULL THEN last_error "
            "ELSE excluded.last_error END, "
            "last_error_at = COALESCE(excluded.last_error_at, last_error_at), "
            "fetched = fetched + excluded.fetched, processed = processed + excluded.processed, "
            "failed = failed + excluded.failed",
            (
                mailbox,
                None if error else at,
                None if error is None else scrub(error),
                at if error else None,
                fetched,
                processed,
                failed,
                kept_deleted or 0,
                kept_deleted,
            ),
            sees=_NONE,
        )


_REQUESTS = _tables("requests")
_LEDGER = _tables("ledger")
_LEDGER_AND_REQUESTS = _tables("ledger", "requests")
_OUTBOX = _tables("outbox")
_FOREIGN = _tables("foreign_numbers")


_REQUEST_SELECT = (
    "SELECT r.number, t.number, t.name, r.type, r.status, r.kind, r.subject, r.description, "
    "rq.login, us.login, s.name, g.name, a.login, so.name, r.created_at, r.created_by, "
    "r.mailbox, r.cause, r.html, p.name, r.correlation_key, r.alert_state, r.form, r.closed_at "
    "FROM requests r JOIN teams t ON t.id = r.team_id "
    "LEFT JOIN users rq ON rq.id = r.requester_id LEFT JOIN users us ON us.id = r.user_id "
    "LEFT JOIN sites s ON s.id = r.site_id LEFT JOIN groups g ON g.id = r.group_id "
    "LEFT JOIN users a ON a.id = r.assignee_id LEFT JOIN sources so ON so.id = r.source_id "
    "LEFT JOIN priorities p ON p.id = r.priority_id"
)


def _request_dict(r: sqlite3.Row) -> dict[str, Any]:
    return {
        "number": r[0],
        "team": r[2],
        "team_number": r[1],
        "type": r[3],
        "status": r[4],
        "kind": r[5],
        "subject": r[6],
        "description": r[7],
        "requester": r[8],
        "user": r[9],
        "site": r[10],
        "group": r[11],
        "assignee": r[12],
        "source": r[13],
        "created_at": r[14],
        "created_by": r[15],
        "mailbox": r[16],
        "cause": r[17],
        "html": r[18],
        "priority": r[19],
        "correlation_key": r[20],
        "alert_state": r[21],
        "form": r[22],
        "closed_at": r[23],
    }


async def open_store(
    data_dir: Path, *, sweep: bool = False, read_only: bool = False
) -> SqliteStore:
    """Open (creating and migrating) the store in ``data_dir``.

    Refuses to run with ``synchronous`` below FULL: the ledger is our only copy once the server
    has deleted a message. ``sweep`` removes attachment files no row refers to; only the
    process holding the data-directory lock may ask for it. ``read_only`` opens an existing
    store without changing anything, also in a read-only folder (see :func:`_open_read_only`).
    Every failure is a :class:`StoreError` that says what is wrong with which file.
    """
    path = data_dir / "mailintegration.sqlite3"
    if read_only:
        files = FileStore(data_dir / "attachments", create=False)
        return SqliteStore(await _open_read_only(path), files, path)
    await anyio.to_thread.run_sync(secure_data_dir, data_dir)
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise store_error(exc, path) from exc
    try:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA busy_timeout = 10000")
        await _require_full_sync(db, path)
        await _migrate(db)
        try:
            files = FileStore(data_dir / "attachments")
        except OSError as exc:
            raise StoreError(f"cannot create {data_dir / 'attachments'}: {exc}") from exc
        store = SqliteStore(db, files, path)
        if sweep:
            referenced = await store.referenced_digests()
            await anyio.to_thread.run_sync(store.files.sweep, referenced)
    except sqlite3.Error as exc:
        await db.close()
        raise store_error(exc, path) from exc
    except BaseException:
        await db.close()
        raise
    return store


async def _open_read_only(path: Path) -> aiosqlite.Connection:
    """A read-only connection, which works in a read-only folder too.

    ``mode=ro`` reads a WAL database as long as its -shm file exists or can be created. In a
    read-only folder after a clean shutdown (SQLite removed -wal and -shm), it cannot be
    created: the database file then holds everything, and ``immutable=1`` reads it without
    the -shm. A -wal left without its -shm holds commits only a writer can fold back in.
    """
    uri = f"file:{urllib.parse.quote(str(await anyio.Path(path).absolute()))}"
    db = None
    try:
        db = await aiosqlite.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
        try:
            await db.execute_fetchall("SELECT count(*) FROM sqlite_master")
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_CANTOPEN":
                raise
            await db.close()
            db = None
            wal = path.with_name(path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise StoreError(
                    f"{path} cannot be read without write access: its -wal file holds commits "
                    "that its missing -shm file is needed to read; run any engine command once "
                    "with write access to the data directory"
                ) from None
            db = await aiosqlite.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
        rows = await db.execute_fetchall("PRAGMA user_version")
        version = int(next(iter(rows))[0])
        if version != len(MIGRATIONS):
            newer = version > len(MIGRATIONS)
            raise StoreError(
                f"the store {path} is at schema version {version}, "
                + (
                    f"newer than this engine ({len(MIGRATIONS)}): upgrade the engine"
                    if newer
                    else f"older than this engine's ({len(MIGRATIONS)}): run any engine "
                    "command once with write access to upgrade it"
                )
            )
    except BaseException as exc:
        if db is not None:
            await db.close()
        if isinstance(exc, sqlite3.Error):
            raise store_error(exc, path) from exc
        raise
    return db


def _not_valid(path: Path, why: str) -> str:
    return (
        f"{path} is not a valid database ({why}); restore it from a backup, or move it aside "
        "(with its -wal and -shm files) to start an empty one"
    )


def store_error(exc: sqlite3.Error, path: Path) -> StoreError:
    """A SQLite error, in words that name the file and what to do."""
    name = str(getattr(exc, "sqlite_errorname", ""))
    if name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT"):
        return StoreError(_not_valid(path, str(exc)))
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return StoreError(
            f"cannot use the store {path} ({exc}): engine commands need write access to the "
            f"data directory {path.parent}; 'requests' and 'status' can read a read-only one"
        )
    return StoreError(f"the store {path} failed: {exc}")


async def _require_full_sync(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA synchronous") as cur:
        row = await cur.fetchone()
    async with db.execute("PRAGMA journal_mode") as cur:
        mode = await cur.fetchone()
    # 2 = FULL, 3 = EXTRA; anything less may lose committed messages on power loss.
    if row is None or int(row[0]) < 2 or mode is None or str(mode[0]).lower() != "wal":
        raise StoreError(f"{path}: refusing to run without WAL and synchronous=FULL")


async def _migrate(db: aiosqlite.Connection) -> None:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the store is at schema version {version}, newer than this engine "
            f"({len(MIGRATIONS)}): upgrade the engine"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        if number in REBUILDS:
            await _rebuild(db, script, number)
            continue
        if number != ACCOUNTS:
            # executescript commits first, so the version bump rides in the same script.
            await db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
            )
            continue
        # The script, then Python, in one transaction: a crash leaves version 2 as it was.
        await db.executescript(f"BEGIN IMMEDIATE;\n{script}")
        try:
            await _normalize_accounts(db)
            await db.execute(f"PRAGMA user_version = {number}")
            await db.execute("COMMIT")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.execute("ROLLBACK")
            raise
    await _catch_up(db, version)


async def _catch_up(db: aiosqlite.Connection, version: int) -> None:
    """Run the idempotent scripts of the versions a store recorded while they were a
    reserved no-op (schema.CATCH_UP): their table is missing."""
    for number, table in CATCH_UP.items():
        if version < number:
            continue  # ran just now
        rows = await db.execute_fetchall(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        )
        if not list(rows):
            await db.executescript(f"BEGIN IMMEDIATE;\n{MIGRATIONS[number - 1]}\nCOMMIT;")


async def _rebuild(db: aiosqlite.Connection, script: str, number: int) -> None:
    """A migration that rebuilds a table (SQLite's documented procedure): foreign keys off
    around the transaction, and every reference checked before it commits."""
    await db.execute("PRAGMA foreign_keys = OFF")
    try:
        await db.executescript(f"BEGIN IMMEDIATE;\n{script}")
        try:
            broken = list(await db.execute_fetchall("PRAGMA foreign_key_check"))
            if broken:
                raise StoreError(f"migration {number} would break {len(broken)} reference(s)")
            await db.execute(f"PRAGMA user_version = {number}")
            await db.execute("COMMIT")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.execute("ROLLBACK")
            raise
    finally:
        await db.execute("PRAGMA foreign_keys = ON")


async def _normalize_accounts(db: aiosqlite.Connection) -> None:
    """Migration 3: ledger accounts from ``user@host:port`` to the normalized form without
    port. Where two old accounts become one, a UIDL under both is the same message (the
    same mailbox reached by two spellings): its oldest row stays, the others go. No other
    row is lost."""
    rows = await db.execute_fetchall("SELECT id, account, uidl FROM ledger ORDER BY id")
    first: dict[tuple[str, str], int] = {}
    drop: list[tuple[int]] = []
    move: list[tuple[str, int]] = []
    for row_id, account, uidl in rows:
        new = normalized_account(account)
        if (new, uidl) in first:
            drop.append((row_id,))
            continue
        first[new, uidl] = row_id
        if new != account:
            move.append((new, row_id))
    await db.executemany("DELETE FROM ledger WHERE id = ?", drop)
    await db.executemany("UPDATE ledger SET account = ? WHERE id = ?", move)
