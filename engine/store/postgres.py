"""The PostgreSQL store, through asyncpg: the same interface as the SQLite store, for several
engine replicas sharing one database.

Why asyncpg rather than psycopg 3: the store's work is many small statements inside one
transaction; ``bench/pg_driver.py`` measured, on this machine in one run, 2,000 single-row
``INSERT … RETURNING`` in 133 ms against psycopg's 287 ms (2.2×) and an ``executemany`` of
2,000 rows in 12 ms against 42 ms (3.5×). asyncpg has no type hints: its few calls used here
are typed at this boundary.

What differs from SQLite, behind the same interface (see :mod:`engine.store.base`):

- **Numbers from sequences** (``bigserial``): request numbers and activity ids are unique
  across replicas; a rolled-back number leaves a gap.
- **Attachments are rows** of ``attachment_blobs``, keyed by their sha256 (content-addressed,
  one row per content), written in the transaction that cites them: no shared disk.
- **Migrations under an advisory lock**: of several replicas starting at once, one migrates,
  the others wait for the lock and then find the schema done (:func:`migrate`).
- **Fencing**: a transaction that carries messages of a leased mailbox checks, just before
  COMMIT and under a row lock, that the lease is still this replica's with the same epoch
  (:meth:`PostgresTransaction.fence`); a paused replica whose lease was taken over commits
  nothing.

Speed: each statement is a round trip to the server (~0.1 ms here, more under load), so a
message costs about two: its request (with its first history line, one statement) or activity,
and its attachments (content and row, one statement each). The ledger rows go in one
``executemany`` at COMMIT, or before a statement that reads or changes the ledger; the
directory lookups are kept from one transaction to the next while the ``directory_version``
sequence (bumped by every import, read at BEGIN) stands.

Robustness: every statement is bounded (``command_timeout``), so a connection gone silent
fails its transaction instead of hanging it; a connection that failed is dropped, and the next
transaction reconnects. Every text written goes through :func:`engine.logs.scrub`, as in
SQLite. The DSN's password never appears in an error: errors name it without (:func:`safe_dsn`).
"""

from __future__ import annotations

import hashlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncpg

from engine.errors import StoreError
from engine.keys import ingest_keys_like
from engine.logs import register_secret, scrub
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
from engine.parse import tokens
from engine.passwords import EarlyCheck, hash_password, verify_password
from engine.store.base import RequestFilter, Store, Transaction
from engine.store.schema import CATCH_UP, POSTGRES_MIGRATIONS
from engine.store.sqlite import LAG_SQL, arrived_text, now

log = logging.getLogger("engine.store")

# pg_advisory_lock's key for migrations: any constant the engine alone uses ("MI-MIGR").
_MIGRATION_LOCK = 0x4D492D4D49475200
_REPLY_COUNTS = frozenset({"rcpt_key", "rcpt_domain", "mailbox"})
# Attachments at least this big are hashed in a worker thread rather than on the event loop.
_HASH_IN_THREAD = 1 << 20
_CONNECT_TIMEOUT = 10.0


class LeaseLost(StoreError):
    """A transaction's mailbox lease is no longer this replica's: it must not commit."""


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for errors and logs."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "postgresql://…"
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def is_postgres(store: str | None) -> bool:
    """Whether ``--store`` names a PostgreSQL database."""
    return bool(store) and str(store).startswith(("postgresql://", "postgres://"))


def read_password(path: Path | None) -> str | None:
    """The store's password from a file (its first line), if a file is named."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read the store's password file {path}: {exc}") from None
    password = text.splitlines()[0] if text else ""
    register_secret(password)
    return password


class PostgresStore(Store):
    """A store on one asyncpg connection. Open it with :func:`open_postgres`."""

    failures = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, StoreError)
    conflicts = (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError)

    def __init__(self, conn: asyncpg.Connection, connect: _Connect) -> None:
        self.conn = conn
        self._connect = connect
        # Directory lookups, kept while the directory's version stays the one they were
        # read at (a `directory import` by any process bumps it): most of a message's
        # statements otherwise.
        self.directory_cache: dict[tuple[str, str], Any] = {}
        self._directory_version: int | None = None

    async def _check_directory_version(self) -> None:
        version = int(await self.conn.fetchval("SELECT last_value FROM directory_version"))
        if version != self._directory_version:
            self.directory_cache.clear()
            self._directory_version = version

    async def close(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self.conn.close()
        if not self.conn.is_closed():
            self.conn.terminate()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        """``BEGIN``, then the fences and ``COMMIT`` when the block ends; ``ROLLBACK``
        (shielded from cancellation) when it raises."""
        if self.conn.is_closed():
            # The connection was lost (a restarted server, a cut network, a session the
            # server ended): the transaction that met it failed; this one reconnects.
            self.conn = await self._connect()
            log.warning("store: reconnected to %s", self._connect.where)
        tx = PostgresTransaction(self)
        outer = self.conn.transaction()
        await outer.start()
        try:
            await self._check_directory_version()
            yield tx
            await tx.flush()
            await tx.check_fences()
            await outer.commit()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if isinstance(exc, OSError | asyncpg.InterfaceError):
                    # A statement timed out (a half-open connection) or the socket failed:
                    # the connection cannot be trusted; the next transaction reconnects.
                    self.conn.terminate()
                else:
                    await _rollback(outer)
            raise

    async def _all(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(sql, *args))

    async def check_login(self, login: str, password: str, early: EarlyCheck | None = None) -> bool:
        # ``early`` is SQLite's alone (engine.passwords): no check starts before this one.
        row = await self.conn.fetchrow(
            "SELECT password_hash FROM users WHERE lower(login) = lower($1)", login
        )
        stored = None if row is None else row[0]
        return await anyio.to_thread.run_sync(verify_password, password, stored)

    async def mailbox_status(self) -> list[dict[str, Any]]:
        rows = await self._all(
            "SELECT s.mailbox, s.last_success, s.last_error, s.last_error_at, s.fetched, "
            "s.processed, s.failed, s.kept_deleted, l.owner, l.expires_at > now() "
            "FROM mailbox_status s LEFT JOIN leases l ON l.mailbox = s.mailbox "
            "ORDER BY s.mailbox"
        )
        outages = await self._all(
            "SELECT mailbox, cause FROM requests WHERE kind = 'outage' "
            "AND status NOT IN ('processed', 'closed')"
        )
        causes: dict[str, list[str]] = {}
        for m, c in outages:
            causes.setdefault(m, []).append(c)
        return [_status_dict(r, causes) for r in rows]

    async def list_requests(
        self, *, type: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        rows = await self._all(
            _REQUEST_SELECT + " WHERE ($1::text IS NULL OR r.type = $1) "
            "AND ($2::text IS NULL OR r.status = $2) ORDER BY r.number",
            type or None,
            status or None,
        )
        return [_request_dict(r) for r in rows]

    async def reference_token(self, number: int) -> str | None:
        value = await self.conn.fetchval("SELECT value FROM engine_keys WHERE name = 'reference'")
        return None if value is None else tokens.token(number, str(value))

    async def request_detail(self, number: int) -> dict[str, Any] | None:
        row = await self.conn.fetchrow(_REQUEST_SELECT + " WHERE r.number = $1", number)
        if row is None:
            return None
        out = _request_dict(row)
        atts = await self._all(
            "SELECT id, activity_id, name, content_type, size, sha256 FROM attachments "
            "WHERE request_number = $1 ORDER BY id",
            number,
        )

        def att(r: asyncpg.Record) -> dict[str, Any]:
            return {"id": r[0], "name": r[2], "content_type": r[3], "size": r[4], "sha256": r[5]}

        out["attachments"] = [att(a) for a in atts if a[1] is None]
        acts = await self._all(
            "SELECT id, author, email, date, body, automatic FROM activities "
            "WHERE request_number = $1 ORDER BY id",
            number,
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
            "SELECT at, by, text FROM history WHERE request_number = $1 ORDER BY id", number
        )
        out["history"] = [{"at": h[0], "by": h[1], "text": h[2]} for h in hist]
        out.update(await self._details(number))
        return out

    async def _details(self, number: int) -> dict[str, Any]:
        """A request's form fields, tags and foreign ticket numbers."""
        fields = await self._all(
            "SELECT name, value FROM request_fields WHERE request_number = $1 ORDER BY id", number
        )
        tags = await self._all(
            "SELECT tag FROM request_tags WHERE request_number = $1 ORDER BY tag", number
        )
        refs = await self._all(
            "SELECT ref FROM foreign_numbers WHERE request_number = $1 ORDER BY id", number
        )
        watchers = await self._all(
            "SELECT w.address, u.login FROM watchers w LEFT JOIN users u ON u.id = w.user_id "
            "WHERE w.request_number = $1 ORDER BY w.added_at, w.address",
            number,
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
            out[table] = int(await self.conn.fetchval(f"SELECT count(*) FROM {table}"))
        return out

    async def attachment_data(self, sha256: str) -> bytes | None:
        """An attachment's bytes, by content."""
        data = await self.conn.fetchval(
            "SELECT data FROM attachment_blobs WHERE sha256 = $1", sha256
        )
        return None if data is None else bytes(data)

    # -- the web console's reads -----------------------------------------------------------

    async def find_requests(self, where: RequestFilter, *, limit: int) -> list[dict[str, Any]]:
        sql, args = where.where(lambda n: f"${n}::text")
        rows = await self._all(
            _REQUEST_SELECT + sql + f" ORDER BY r.number DESC LIMIT ${len(args) + 1}",
            *args,
            limit,
        )
        return [_request_dict(r) for r in rows]

    async def attachment(self, attachment_id: int) -> tuple[dict[str, Any], bytes] | None:
        row = await self.conn.fetchrow(
            "SELECT a.request_number, a.name, a.content_type, a.size, a.sha256, b.data "
            "FROM attachments a JOIN attachment_blobs b ON b.sha256 = a.sha256 WHERE a.id = $1",
            attachment_id,
        )
        if row is None:
            return None
        keys = ("request_number", "name", "content_type", "size", "sha256")
        return {k: row[i] for i, k in enumerate(keys)}, bytes(row[5])

    async def open_outage_events(self) -> list[dict[str, Any]]:
        rows = await self._all(
            "SELECT mailbox, cause, number, created_at FROM requests WHERE kind = 'outage' "
            "AND status NOT IN ('processed', 'closed') ORDER BY mailbox, number"
        )
        return [dict(r) for r in rows]

    async def messages_since(self, since: str) -> dict[str, int]:
        rows = await self._all(
            "SELECT mailbox, count(*) FROM ledger WHERE processed_at >= $1 GROUP BY mailbox",
            since,
        )
        return {r[0]: int(r[1]) for r in rows}

    async def flow(self, since: str) -> list[tuple[str, str, int]]:
        rows = await self._all(
            "SELECT mailbox, substr(processed_at, 1, 16) AS minute, count(*) FROM ledger "
            "WHERE processed_at >= $1 GROUP BY mailbox, minute ORDER BY minute",
            since,
        )
        return [(r[0], r[1], int(r[2])) for r in rows]

    async def failures_by_cause(self, since: str) -> dict[str, int]:
        rows = await self._all(
            "SELECT cause, count(*) FROM requests WHERE kind = 'message-failure' "
            "AND created_at >= $1 GROUP BY cause ORDER BY cause",
            since,
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def waiting_on_server(self) -> dict[str, tuple[int, str]]:
        rows = await self._all(
            "SELECT mailbox, count(*), min(processed_at) FROM ledger "
            "WHERE outcome LIKE 'kept%' AND deleted_at IS NULL GROUP BY mailbox"
        )
        return {r[0]: (int(r[1]), str(r[2])) for r in rows}

    async def lag_since(self, since: str) -> dict[str, tuple[int, int, int]]:
        rows = await self._all(LAG_SQL.format(lag=_POSTGRES_LAG, at="$1"), since)
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}

    async def failed_ingests(self, sha256: str) -> int:
        first, retries = ingest_keys_like(sha256)
        return int(
            await self.conn.fetchval(
                "SELECT count(*) FROM ledger WHERE (uidl = $1 OR uidl LIKE $2) "
                "AND outcome LIKE 'failed%'",
                first,
                retries,
            )
        )

    async def user_roles(self, login: str) -> set[str]:
        rows = await self._all(
            "SELECT r.role FROM user_roles r JOIN users u ON u.id = r.user_id "
            "WHERE lower(u.login) = lower($1)",
            login,
        )
        return {r[0] for r in rows}


async def _rollback(tx: Any) -> None:
    try:
        await tx.rollback()
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        # The error that brought us here says more; the server rolls back a lost session.
        log.warning("rollback failed: %s", type(exc).__name__)


def _status_dict(r: asyncpg.Record, causes: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "mailbox": r[0],
        "last_success": r[1],
        "last_error": r[2],
        "last_error_at": r[3],
        "fetched": r[4],
        "processed": r[5],
        "failed": r[6],
        "server_kept_deleted": r[7],
        "outages": sorted(causes.get(r[0], [])),
        "owner": r[8] if r[9] else None,
    }


class PostgresTransaction(Transaction):
    """One ``BEGIN … COMMIT`` of a :class:`PostgresStore`. Statements go at once (a read sees
    the transaction's writes because they are already in PostgreSQL)."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self.conn = store.conn
        self._fences: dict[str, tuple[str, int]] = {}
        self._read_ahead: dict[int, RequestRef | None] = {}
        # Ledger rows not sent yet: one executemany at COMMIT (or before a statement that
        # reads or changes the ledger) instead of a round trip per message.
        self._ledger: list[tuple[Any, ...]] = []
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

    async def flush(self) -> None:
        """Send the pending ledger rows (a row another replica committed fails here)."""
        if self._ledger:
            rows, self._ledger = self._ledger, []
            await self.conn.executemany(_INSERT_LEDGER, rows)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        await self.flush()  # what is pending was written before the savepoint
        sp = self.conn.transaction()
        await sp.start()
        try:
            yield
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, StoreError):
            raise  # the store failing: the whole transaction rolls back
        except Exception:
            self._read_ahead.clear()
            self._ledger = []  # written inside the block: undone with it
            await sp.rollback()
            raise
        await sp.commit()

    def fence(self, mailbox: str, owner: str, epoch: int) -> None:
        """Commit only if ``owner`` still holds ``mailbox``'s lease at ``epoch``."""
        self._fences[mailbox] = (owner, epoch)

    async def check_fences(self) -> None:
        """Just before COMMIT: every fenced lease is still ours, locked until COMMIT so no
        replica can take it over in between."""
        if not self._fences:
            return
        names = sorted(self._fences)
        rows = await self.conn.fetch(
            "SELECT mailbox, owner, epoch FROM leases WHERE mailbox = ANY($1::text[]) "
            "AND expires_at > now() FOR SHARE",
            names,
        )
        held = {r[0]: (r[1], int(r[2])) for r in rows}
        lost = [n for n in names if held.get(n) != self._fences[n]]
        if lost:
            raise LeaseLost(f"the lease of {', '.join(lost)} was lost: nothing is committed")

    # -- directory -------------------------------------------------------------------------

    async def _one(self, sql: str, *args: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self.conn.fetchrow(sql, *args)
        return row

    async def _all(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(sql, *args))

    async def _cached(self, key: tuple[str, str], read: Callable[[], Awaitable[Any]]) -> Any:
        """A directory lookup, from the store's cache while the directory is unchanged."""
        cache = self._store.directory_cache
        if key not in cache:
            cache[key] = await read()
        return cache[key]

    async def _name_id(self, table: str, name: str | None) -> int | None:
        if not name:
            return None

        async def read() -> int | None:
            value = await self.conn.fetchval(
                f"SELECT id FROM {table} WHERE lower(name) = lower($1)", name
            )
            return None if value is None else int(value)

        found: int | None = await self._cached((table, name.casefold()), read)
        return found

    async def user_by_email(self, email: str) -> User | None:
        if not email:
            return None
        found: User | None = await self._cached(
            ("email", email.casefold()), lambda: self._user("lower(u.email) = lower($1)", email)
        )
        return found

    async def user_by_login(self, login: str) -> User | None:
        found: User | None = await self._cached(
            ("login", login.casefold()), lambda: self._user("lower(u.login) = lower($1)", login)
        )
        return found

    async def _user(self, where: str, arg: str) -> User | None:
        row = await self._one(
            "SELECT u.id, u.login, u.email, u.name, s.name, u.password_hash IS NOT NULL "
            "OR EXISTS (SELECT 1 FROM user_roles r WHERE r.user_id = u.id AND r.role = 'agent') "
            f"FROM users u LEFT JOIN sites s ON s.id = u.site_id WHERE {where} "
            "ORDER BY u.id LIMIT 1",
            arg,
        )
        return None if row is None else User(row[0], row[1], row[2], row[3], row[4], bool(row[5]))

    async def has_name(self, table: str, name: str) -> bool:
        assert table in {"sites", "groups", "sources", "priorities", "categories"}
        return await self._name_id(table, name) is not None

    async def team(self, ref: str | int | None) -> Team | None:
        found: Team | None = await self._cached(("team", repr(ref)), lambda: self._team(ref))
        return found

    async def _team(self, ref: str | int | None) -> Team | None:
        sql = (
            "SELECT t.id, t.number, t.name, g.name FROM teams t "
            "LEFT JOIN groups g ON g.id = t.default_group_id "
        )
        if ref is None or ref == "":
            rows = await self._all(sql + "ORDER BY t.number LIMIT 2")
            row = rows[0] if len(rows) == 1 else None
        elif isinstance(ref, int) or str(ref).isdigit():
            row = await self._one(sql + "WHERE t.number = $1", int(ref))
        else:
            row = await self._one(sql + "WHERE lower(t.name) = lower($1)", ref)
        return None if row is None else Team(row[0], row[1], row[2], row[3])

    async def first_team(self) -> Team | None:
        row = await self._one(
            "SELECT t.id, t.number, t.name, g.name FROM teams t "
            "LEFT JOIN groups g ON g.id = t.default_group_id ORDER BY t.number LIMIT 1"
        )
        return None if row is None else Team(row[0], row[1], row[2], row[3])

    async def _add_name(self, table: str, name: str) -> None:
        await self.conn.execute(
            f"INSERT INTO {table}(name) VALUES ($1) ON CONFLICT (lower(name)) DO NOTHING", name
        )

    async def import_directory(self, data: Mapping[str, Any]) -> dict[str, int]:
        # Every replica's directory cache is stale from the commit of this on.
        await self.conn.execute("SELECT nextval('directory_version')")
        self._store.directory_cache.clear()
        counts = dict.fromkeys(
            ("teams", "sites", "groups", "sources", "priorities", "categories", "users"), 0
        )
        for table in ("sites", "groups", "sources", "priorities", "categories"):
            for name in data.get(table, []):
                await self._add_name(table, name)
                counts[table] += 1
        for team in data.get("teams", []):
            group = team.get("defaultGroup")
            if group:
                await self._add_name("groups", group)
            await self.conn.execute(
                "INSERT INTO teams(number, name, default_group_id) VALUES ($1, $2, $3) "
                "ON CONFLICT (number) DO UPDATE SET name = excluded.name, "
                "default_group_id = excluded.default_group_id",
                int(team["number"]),
                team["name"],
                await self._name_id("groups", group),
            )
            counts["teams"] += 1
        for user in data.get("users", []):
            await self._import_user(user)
            counts["users"] += 1
        return counts

    async def _import_user(self, user: Mapping[str, Any]) -> None:
        site = user.get("site")
        if site:
            await self._add_name("sites", site)
        password = user.get("password")
        password_hash = (
            await anyio.to_thread.run_sync(hash_password, password) if password else None
        )
        await self.conn.execute(
            "INSERT INTO users(login, email, name, site_id, password_hash) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (lower(login)) DO UPDATE SET "
            "email = excluded.email, name = excluded.name, site_id = excluded.site_id, "
            "password_hash = COALESCE(excluded.password_hash, users.password_hash)",
            user["login"],
            user.get("email"),
            user.get("name") or user["login"],
            await self._name_id("sites", site),
            password_hash,
        )
        roles = user.get("roles")
        if roles is not None:
            if isinstance(roles, str):
                raise TypeError(f"the roles of user {user['login']!r} must be a list of names")
            user_id = "(SELECT id FROM users WHERE lower(login) = lower($1))"
            await self.conn.execute(
                f"DELETE FROM user_roles WHERE user_id = {user_id}", user["login"]
            )
            for role in roles:
                await self.conn.execute(
                    f"INSERT INTO user_roles(user_id, role) SELECT {user_id}, $2 "
                    "ON CONFLICT DO NOTHING",
                    user["login"],
                    str(role),
                )

    # -- ledger ----------------------------------------------------------------------------

    async def ledger_rows(self, account: str, uidls: Iterable[str]) -> dict[str, LedgerRow]:
        await self.flush()
        rows = await self._all(
            "SELECT uidl, size, needed, message_id, sha256, outcome, request_number, "
            "deleted_at FROM ledger WHERE account = $1 AND uidl = ANY($2::text[])",
            account,
            list(uidls),
        )
        return {r[0]: LedgerRow(*r[1:]) for r in rows}

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
        # Sent at COMMIT (flush): a row another replica committed meanwhile fails it, and
        # with it the transaction; see engine/writer.py's conflicts.
        at = now()
        self._ledger.append(
            (
                account,
                uidl,
                mailbox,
                message_id,
                sha256,
                scrub(outcome),
                request_number,
                at,
                size,
                needed,
                arrived_text(arrived, at),
            )
        )

    async def ledger_keys_by_sha256(
        self, account: str, sha256s: Iterable[str]
    ) -> dict[str, list[str]]:
        await self.flush()
        rows = await self._all(
            "SELECT sha256, uidl FROM ledger WHERE account = $1 AND sha256 = ANY($2::text[])",
            account,
            list(sha256s),
        )
        found: dict[str, list[str]] = {}
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
        await self.flush()
        await self.conn.execute(
            "UPDATE ledger SET message_id = $1, sha256 = $2, outcome = $3, "
            "request_number = $4, size = $5, needed = $6, processed_at = $7 "
            "WHERE account = $8 AND uidl = $9",
            message_id,
            sha256,
            scrub(outcome),
            request_number,
            size,
            needed,
            now(),
            account,
            uidl,
        )

    async def mark_deleted(self, account: str, uidls: Iterable[str]) -> None:
        await self.flush()
        await self.conn.execute(
            "UPDATE ledger SET deleted_at = $1 WHERE account = $2 AND uidl = ANY($3::text[]) "
            "AND deleted_at IS NULL",
            now(),
            account,
            list(uidls),
        )

    async def account_has_rows(self, account: str) -> bool:
        await self.flush()
        return (
            await self._one("SELECT 1 FROM ledger WHERE account = $1 LIMIT 1", account) is not None
        )

    async def rename_account(self, old: str, new: str) -> None:
        await self.flush()
        await self.conn.execute("UPDATE ledger SET account = $1 WHERE account = $2", new, old)

    async def mailbox_account(self, mailbox: str) -> tuple[str, str] | None:
        row = await self._one(
            "SELECT account, user_name FROM mailbox_account WHERE mailbox = $1", mailbox
        )
        return None if row is None else (str(row[0]), str(row[1]))

    async def remember_account(self, mailbox: str, account: str, user_name: str) -> None:
        await self.conn.execute(
            "INSERT INTO mailbox_account(mailbox, account, user_name) VALUES ($1, $2, $3) "
            "ON CONFLICT (mailbox) DO UPDATE SET account = excluded.account, "
            "user_name = excluded.user_name",
            mailbox,
            account,
            user_name,
        )

    # -- requests --------------------------------------------------------------------------

    async def read_ahead(self, numbers: Iterable[int]) -> None:
        wanted = [n for n in set(numbers) if n not in self._read_ahead and 0 < n < 2**63]
        if not wanted:
            return
        rows = await self._all(
            "SELECT number, team_id, type, status, kind FROM requests "
            "WHERE number = ANY($1::bigint[])",
            wanted,
        )
        self._read_ahead.update((n, None) for n in wanted)
        self._read_ahead.update((r[0], RequestRef(r[0], r[1], r[2], r[3], r[4])) for r in rows)

    async def request(self, number: int) -> RequestRef | None:
        if number in self._read_ahead:
            return self._read_ahead[number]
        if not 0 < number < 2**63:
            return None
        row = await self._one(
            "SELECT number, team_id, type, status, kind FROM requests WHERE number = $1", number
        )
        return None if row is None else RequestRef(row[0], row[1], row[2], row[3], row[4])

    async def request_by_message_id(self, message_ids: Sequence[str]) -> RequestRef | None:
        await self.flush()
        for mid in message_ids:
            number = await self.conn.fetchval(
                "SELECT request_number FROM ledger WHERE message_id = $1 "
                "AND request_number IS NOT NULL ORDER BY id DESC LIMIT 1",
                mid,
            )
            if number is None:
                number = await self.conn.fetchval(
                    "SELECT request_number FROM outbox WHERE message_id = $1 "
                    "AND request_number IS NOT NULL LIMIT 1",
                    mid,
                )
            if number is not None:
                return await self.request(int(number))
        return None

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
        number = int(
            await self.conn.fetchval(
                _INSERT_REQUEST,
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
                scrub(created_by),
                scrub(f"Created from {kind.replace('-', ' ')}."),
                await self._name_id("priorities", priority),
                correlation_key,
                alert_state,
                None if form is None else scrub(form),
            )
        )
        self._read_ahead[number] = RequestRef(number, team_id, type, status, kind)
        return number

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
        value = await self.conn.fetchval(
            "INSERT INTO activities(request_number, author, email, date, body, automatic, "
            "message_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            number,
            scrub(author),
            scrub(email),
            (date or datetime.now(UTC)).isoformat(timespec="seconds"),
            scrub(body),
            int(automatic),
            message_id,
            now(),
        )
        return int(value)

    async def set_status(self, number: int, status: str, *, by: str, why: str) -> None:
        await self.conn.execute(
            "UPDATE requests SET status = $1, "
            "closed_at = CASE WHEN $2 THEN $3 ELSE closed_at END WHERE number = $4",
            status,
            status in CLOSED_STATUSES,
            now(),
            number,
        )
        self._read_ahead.pop(number, None)
        await self.add_history(number, by, why)

    async def add_request_details(
        self,
        number: int,
        *,
        fields: Sequence[tuple[str, str]] = (),
        tags: Iterable[str] = (),
        foreign_numbers: Iterable[str] = (),
    ) -> None:
        rows = [(number, scrub(name), scrub(value)) for name, value in fields]
        if rows:
            await self.conn.executemany(
                "INSERT INTO request_fields(request_number, name, value) VALUES ($1, $2, $3)",
                rows,
            )
        tag_rows = [(number, scrub(tag)) for tag in tags]
        if tag_rows:
            await self.conn.executemany(
                "INSERT INTO request_tags(request_number, tag) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                tag_rows,
            )
        refs = [(ref, number) for ref in foreign_numbers]
        if refs:
            await self.conn.executemany(
                "INSERT INTO foreign_numbers(ref, request_number) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                refs,
            )

    async def set_alert_state(self, number: int, state: str) -> None:
        await self.conn.execute(
            "UPDATE requests SET alert_state = $1 WHERE number = $2", scrub(state), number
        )

    async def correlated_event(self, key: str) -> CorrelatedEvent | None:
        row = await self._one(
            "SELECT number, team_id, type, status, kind, alert_state, closed_at FROM requests "
            "WHERE correlation_key = $1 ORDER BY number DESC LIMIT 1",
            key,
        )
        if row is None:
            return None
        ref = RequestRef(row[0], row[1], row[2], row[3], row[4])
        closed = datetime.fromisoformat(row[6]) if row[6] and row[3] in CLOSED_STATUSES else None
        return CorrelatedEvent(ref, row[5], closed)

    async def request_by_foreign_number(self, refs: Sequence[str]) -> RequestRef | None:
        for ref in refs:
            number = await self.conn.fetchval(
                "SELECT max(request_number) FROM foreign_numbers WHERE ref = $1", ref
            )
            if number is not None:
                return await self.request(int(number))
        return None

    async def engine_key(self, name: str) -> str | None:
        value = await self.conn.fetchval("SELECT value FROM engine_keys WHERE name = $1", name)
        return None if value is None else str(value)

    async def record_origin(self, number: int, origin: Origin) -> None:
        o = origin
        await self.conn.execute(
            "INSERT INTO request_origins(request_number, mailbox, team_id, sender, fingerprint, "
            "message_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            number,
            o.mailbox,
            o.team_id,
            o.sender.lower(),
            o.fingerprint,
            o.message_id,
            now(),
        )

    async def flood(
        self, mailbox: str, sender: str, fingerprint: str, since: datetime
    ) -> tuple[int, int | None]:
        row = await self.conn.fetchrow(
            "SELECT count(*), max(request_number) FROM request_origins WHERE mailbox = $1 "
            "AND (sender = $2 OR fingerprint = $3) AND created_at >= $4",
            mailbox,
            sender.lower(),
            fingerprint,
            since.isoformat(timespec="seconds"),
        )
        if row is None or not row[0]:
            return 0, None
        return int(row[0]), int(row[1])

    async def origins(self, message_id: str) -> list[tuple[RequestRef, str]]:
        rows = await self._all(
            "SELECT request_number, mailbox FROM request_origins WHERE message_id = $1 "
            "ORDER BY request_number LIMIT 100",
            message_id,
        )
        out = []
        for number, mailbox in rows:
            ref = await self.request(int(number))
            if ref is not None:
                out.append((ref, str(mailbox)))
        return out

    async def add_watchers(self, number: int, watchers: Iterable[Watcher]) -> None:
        rows = [(number, scrub(w.address.lower()), w.user_id, now()) for w in watchers]
        if rows:
            await self.conn.executemany(
                "INSERT INTO watchers(request_number, address, user_id, added_at) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                rows,
            )

    async def mark_undeliverable(
        self, address: str, *, status: str, reason: str, request_number: int | None
    ) -> None:
        await self.conn.execute(
            "INSERT INTO undeliverable(address, status, reason, request_number, since) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (address) DO UPDATE SET "
            "status = excluded.status, reason = excluded.reason, "
            "request_number = excluded.request_number, since = excluded.since",
            scrub(address.lower()),
            scrub(status),
            scrub(reason),
            request_number,
            now(),
        )

    async def undeliverable(self, address: str) -> str | None:
        row = await self.conn.fetchrow(
            "SELECT since, status, reason FROM undeliverable WHERE address = $1",
            address.lower(),
        )
        return None if row is None else f"since {row[0]}: {row[1]} {row[2]}"

    async def add_history(self, number: int, by: str, text: str) -> None:
        await self.conn.execute(
            "INSERT INTO history(request_number, at, by, text) VALUES ($1, $2, $3, $4)",
            number,
            now(),
            scrub(by),
            scrub(text),
        )

    async def add_attachments(
        self, number: int, activity_id: int | None, attachments: Iterable[Attachment]
    ) -> None:
        for att in attachments:
            if att.sha256 is not None:
                digest = att.sha256  # hashed by the parse stage
            elif len(att.data) < _HASH_IN_THREAD:
                digest = _sha256(att.data)
            else:  # hashlib lets go of the GIL: keep the event loop free meanwhile
                digest = await anyio.to_thread.run_sync(_sha256, att.data)
            # Content-addressed: the same bytes are stored once, whoever cites them; the
            # content and the row citing it in one round trip.
            await self.conn.execute(
                "WITH b AS (INSERT INTO attachment_blobs(sha256, data) VALUES ($6, $7) "
                "ON CONFLICT (sha256) DO NOTHING) "
                "INSERT INTO attachments(request_number, activity_id, name, content_type, "
                "size, sha256) VALUES ($1, $2, $3, $4, $5, $6)",
                number,
                activity_id,
                scrub(att.name),
                att.content_type,
                len(att.data),
                digest,
                att.data,
            )

    async def failure_event(self, message_id: str | None, sha256: str) -> int | None:
        value = await self.conn.fetchval(
            "SELECT number FROM requests WHERE kind = 'message-failure' AND sha256 = $1 "
            "AND message_id IS NOT DISTINCT FROM $2 ORDER BY number LIMIT 1",
            sha256,
            message_id,
        )
        return None if value is None else int(value)

    async def open_outages(self, mailbox: str) -> dict[str, int]:
        rows = await self._all(
            "SELECT cause, number FROM requests WHERE kind = 'outage' AND mailbox = $1 "
            "AND status NOT IN ('processed', 'closed')",
            mailbox,
        )
        return {r[0]: int(r[1]) for r in rows}

    async def outages_by_cause(self, mailbox: str, causes: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(causes))
        if not wanted:
            return {}
        rows = await self._all(
            "SELECT cause, MAX(number) FROM requests WHERE kind = 'outage' AND mailbox = $1 "
            "AND cause = ANY($2::text[]) GROUP BY cause",
            mailbox,
            wanted,
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
        value = await self.conn.fetchval(
            "INSERT INTO outbox(mailbox, request_number, recipient, rcpt_key, rcpt_domain, "
            "message_id, message, created_at, next_attempt_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            mailbox,
            request_number,
            recipient,
            rcpt_key,
            rcpt_domain,
            message_id,
            message,
            at,
            at,
        )
        return int(value)

    async def replies_since(self, by: str, value: str, since: datetime) -> int:
        if by not in _REPLY_COUNTS:
            raise ValueError(f"cannot count replies by {by!r}")
        count = await self.conn.fetchval(
            f"SELECT count(*) FROM outbox WHERE {by} = $1 AND created_at >= $2",
            value,
            since.isoformat(timespec="seconds"),
        )
        return int(count)

    async def due_replies(
        self, mailboxes: Sequence[str], *, exclude: Iterable[int], limit: int
    ) -> tuple[list[PendingReply], str | None]:
        names, skip = list(mailboxes), list(exclude)
        if not names or limit <= 0:
            return [], None
        where = (
            "sent_at IS NULL AND failed_at IS NULL AND mailbox = ANY($1::text[]) "
            "AND NOT (id = ANY($2::bigint[]))"
        )
        at = now()
        rows = await self._all(
            f"SELECT id, mailbox, recipient, message, attempts FROM outbox WHERE {where} "
            "AND next_attempt_at <= $3 ORDER BY next_attempt_at, id LIMIT $4",
            names,
            skip,
            at,
            limit,
        )
        later = await self.conn.fetchval(
            f"SELECT min(next_attempt_at) FROM outbox WHERE {where} AND next_attempt_at > $3",
            names,
            skip,
            at,
        )
        due = [PendingReply(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), int(r[4])) for r in rows]
        return due, (None if later is None else str(later))

    async def record_attempt(
        self, reply_id: int, *, error: str | None, retry_at: datetime | None = None
    ) -> None:
        args: tuple[str, ...]
        if error is None:
            sql, args = "sent_at = $1, error = NULL", (now(),)
        elif retry_at is not None:
            retry = retry_at + timedelta(microseconds=-retry_at.microsecond % 1_000_000)
            sql = "error = $1, next_attempt_at = $2"
            args = (scrub(error), retry.isoformat(timespec="seconds"))
        else:
            sql, args = "error = $1, failed_at = $2", (scrub(error), now())
        await self.conn.execute(
            f"UPDATE outbox SET attempts = attempts + 1, {sql} WHERE id = ${len(args) + 1}",
            *args,
            reply_id,
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
        await self.conn.execute(
            "INSERT INTO mailbox_status AS s (mailbox, last_success, last_error, "
            "last_error_at, fetched, processed, failed, kept_deleted) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, 0)) "
            "ON CONFLICT (mailbox) DO UPDATE SET "
            "kept_deleted = COALESCE($8, s.kept_deleted), "
            "last_success = COALESCE(excluded.last_success, s.last_success), "
            "last_error = COALESCE(excluded.last_error, s.last_error), "
            "last_error_at = COALESCE(excluded.last_error_at, s.last_error_at), "
            "fetched = s.fetched + excluded.fetched, "
            "processed = s.processed + excluded.processed, failed = s.failed + excluded.failed",
            mailbox,
            None if error else at,
            None if error is None else scrub(error),
            at if error else None,
            fetched,
            processed,
            failed,
            kept_deleted,
        )


# Seconds between two ISO times of the ledger, whole, never below 0 (engine/store/sqlite.py's
# LAG_SQL says why).
_POSTGRES_LAG = (
    "greatest(0, round(extract(epoch FROM processed_at::timestamptz - arrived_at::timestamptz))"
    "::bigint)"
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The request and its first history line in one round trip.
_INSERT_LEDGER = (
    "INSERT INTO ledger(account, uidl, mailbox, message_id, sha256, outcome, request_number, "
    "processed_at, size, needed, arrived_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)

_INSERT_REQUEST = (
    "WITH r AS (INSERT INTO requests(team_id, type, status, kind, subject, description, html, "
    "requester_id, user_id, site_id, group_id, assignee_id, source_id, mailbox, cause, "
    "message_id, sha256, created_at, created_by, priority_id, correlation_key, alert_state, "
    "form) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, "
    "$18, $19, $22, $23, $24, $25) RETURNING number), "
    "h AS (INSERT INTO history(request_number, at, by, text) SELECT number, $18, $20, $21 "
    "FROM r) SELECT number FROM r"
)

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


def _request_dict(r: asyncpg.Record) -> dict[str, Any]:
    return dict(zip(_REQUEST_KEYS, r, strict=True))


_REQUEST_KEYS = (
    *("number", "team_number", "team", "type", "status", "kind", "subject", "description"),
    *("requester", "user", "site", "group", "assignee", "source", "created_at", "created_by"),
    *("mailbox", "cause", "html", "priority", "correlation_key", "alert_state", "form"),
    "closed_at",
)


# -- opening and migrating -------------------------------------------------------------------


class _Connect:
    """How to open a connection to the store again (the DSN and password kept in memory,
    never in an error: ``where`` is the DSN without the password)."""

    def __init__(
        self, dsn: str, password: str | None, settings: dict[str, str], command_seconds: float
    ) -> None:
        self.dsn, self.password, self.settings = dsn, password, settings
        self.command_seconds = command_seconds
        self.where = safe_dsn(dsn)

    async def __call__(self) -> asyncpg.Connection:
        try:
            # command_timeout bounds every statement: a connection whose peer vanished
            # without a reset (a cut network, a frozen server) would otherwise wait for ever.
            return await asyncpg.connect(
                self.dsn,
                password=self.password,
                timeout=_CONNECT_TIMEOUT,
                command_timeout=self.command_seconds,
                server_settings=self.settings,
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreError(f"cannot connect to the store {self.where}: {_reason(exc)}") from None


async def open_postgres(
    dsn: str,
    *,
    password: str | None = None,
    idle_in_transaction_seconds: float = 15.0,
    command_seconds: float = 60.0,
) -> PostgresStore:
    """Connect, migrate (under the advisory lock) and return the store.

    ``idle_in_transaction_seconds``: the server ends a session that sits in a transaction
    that long (a replica paused mid-transaction must not hold its row locks, and so its
    leases, for ever). ``command_seconds`` bounds each statement (the migrations' included).
    Every failure is a :class:`StoreError` naming the DSN without its password.
    """
    register_secret(password)
    register_secret(urllib.parse.urlsplit(dsn).password if "://" in dsn else None)
    connect = _Connect(
        dsn,
        password,
        {
            "application_name": "mailintegration",
            "idle_in_transaction_session_timeout": str(int(idle_in_transaction_seconds * 1000)),
        },
        command_seconds,
    )
    conn = await connect()
    try:
        await migrate(conn)
    except BaseException as exc:
        conn.terminate()
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
            raise StoreError(f"cannot migrate the store {connect.where}: {_reason(exc)}") from None
        raise
    return PostgresStore(conn, connect)


def _reason(exc: BaseException) -> str:
    """What failed, scrubbed (a server may echo what it was sent)."""
    return scrub(f"{type(exc).__name__}: {exc}")


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the versions not yet applied, each in its own transaction, holding the
    migration advisory lock: of replicas starting at once, one migrates and the others
    wait, then find nothing left to do. Returns the versions this call applied."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {int(r[0]) for r in await conn.fetch("SELECT version FROM schema_versions")}
        newer = [v for v in done if v not in POSTGRES_MIGRATIONS]
        if newer:
            raise StoreError(
                f"the store has schema version(s) {sorted(newer)} this engine does not know: "
                "upgrade the engine"
            )
        applied = []
        for version in sorted(set(POSTGRES_MIGRATIONS) - done):
            async with conn.transaction():
                await conn.execute(POSTGRES_MIGRATIONS[version])
                await conn.execute("INSERT INTO schema_versions(version) VALUES ($1)", version)
            log.info("store: migrated to version %d", version)
            applied.append(version)
        for version, table in CATCH_UP.items():
            # Recorded while it was a reserved no-op: its idempotent script runs now.
            if version in done and await conn.fetchval("SELECT to_regclass($1)", table) is None:
                async with conn.transaction():
                    await conn.execute(POSTGRES_MIGRATIONS[version])
        return applied
    finally:
        with anyio.CancelScope(shield=True):
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


class PostgresLeases:
    """The lease table, on a connection of its own (a renewal never waits behind the
    writer's transaction). Times are the database's (``now()``): replicas' clocks may
    disagree, the server's is the one they share. See :mod:`engine.leases`."""

    def __init__(self, conn: asyncpg.Connection, connect: _Connect) -> None:
        self.conn = conn
        self._connect = connect

    async def close(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self.conn.close()
        if not self.conn.is_closed():
            self.conn.terminate()

    async def heartbeat(self, replica: str, ttl: float) -> int:
        """This replica is alive; returns how many are (seen within one lease period).
        The first call of a tick: it reconnects a lost connection."""
        if self.conn.is_closed():
            self.conn = await self._connect()
        async with self.conn.transaction():
            await self.conn.execute(
                "INSERT INTO replicas(id, seen_at, started_at) VALUES ($1, now(), now()) "
                "ON CONFLICT (id) DO UPDATE SET seen_at = now()",
                replica,
            )
            await self.conn.execute(
                "DELETE FROM replicas WHERE seen_at < now() - make_interval(secs => $1)",
                ttl * 10,
            )
            live = await self.conn.fetchval(
                "SELECT count(*) FROM replicas WHERE seen_at > now() - make_interval(secs => $1)",
                ttl,
            )
        return int(live)

    def reset(self) -> None:
        """A tick failed: drop the connection (it may be half-open); the next reconnects."""
        self.conn.terminate()

    async def register(self, mailboxes: Sequence[str]) -> None:
        await self.conn.execute(
            "INSERT INTO leases(mailbox) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            list(mailboxes),
        )

    async def renew(self, replica: str, ttl: float) -> dict[str, int]:
        """Extend every lease still ours (a lease another replica took is no longer)."""
        rows = await self.conn.fetch(
            "UPDATE leases SET expires_at = now() + make_interval(secs => $2) "
            "WHERE owner = $1 RETURNING mailbox, epoch",
            replica,
            ttl,
        )
        return {r[0]: int(r[1]) for r in rows}

    async def claim(
        self, replica: str, ttl: float, names: Sequence[str], count: int
    ) -> dict[str, int]:
        """Take up to ``count`` of ``names`` that nobody holds (or whose lease expired), each
        with a new epoch; rows another replica is claiming are skipped, not waited for."""
        if count <= 0 or not names:
            return {}
        rows = await self.conn.fetch(
            "UPDATE leases l SET owner = $1, epoch = l.epoch + 1, "
            "expires_at = now() + make_interval(secs => $2) "
            "FROM (SELECT mailbox FROM leases WHERE mailbox = ANY($3::text[]) "
            "AND (owner IS NULL OR expires_at <= now()) ORDER BY random() LIMIT $4 "
            "FOR UPDATE SKIP LOCKED) free WHERE l.mailbox = free.mailbox "
            "RETURNING l.mailbox, l.epoch",
            replica,
            ttl,
            list(names),
            count,
        )
        return {r[0]: int(r[1]) for r in rows}

    async def release(self, replica: str, names: Sequence[str] | None = None) -> None:
        """Give leases back at once (all of them: ``names`` None), for another to take."""
        await self.conn.execute(
            "UPDATE leases SET owner = NULL, expires_at = now() WHERE owner = $1 "
            "AND ($2::text[] IS NULL OR mailbox = ANY($2::text[]))",
            replica,
            None if names is None else list(names),
        )
        if names is None:
            await self.conn.execute("DELETE FROM replicas WHERE id = $1", replica)


async def open_leases(
    dsn: str, *, password: str | None = None, command_seconds: float = 10.0
) -> PostgresLeases:
    """A second connection, for the leases (the store's was opened and migrated first).
    ``command_seconds``: keep it under the lease period, or a stalled renewal outlives it."""
    connect = _Connect(
        dsn, password, {"application_name": "mailintegration-leases"}, command_seconds
    )
    return PostgresLeases(await connect(), connect)
