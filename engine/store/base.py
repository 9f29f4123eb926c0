"""The store's interface: what the writer and the commands need of any store.

Two objects:

- :class:`Store`, one per connection: read-only queries for the commands (``requests``,
  ``status``, the login), and :meth:`Store.transaction`, the only way to write.
- :class:`Transaction`, one ``BEGIN … COMMIT``: ``async with store.transaction() as tx:``
  commits when the block ends and rolls back when it raises (cancellation included). Every
  write is a method of the transaction; every read method of the transaction sees the
  transaction's own writes (how an implementation does it, say by sending its pending rows
  first, is its own business). ``async with tx.savepoint():`` undoes what its block wrote
  when the block raises a message's error, and nothing else.

Numbers are the transaction's to give: :meth:`Transaction.create_request` and
:meth:`Transaction.add_activity` return the request number and activity id they used. A
number is never given twice, even after a rollback or across engines (SQLite: the one writer
holds the write lock and counts; PostgreSQL: sequences). Numbers rolled back may be given
again (SQLite does) or leave a gap (sequences do); nobody may rely on either.

Attachments are content: where their bytes live (files beside SQLite, rows in PostgreSQL)
is the store's business, and they are durable when the transaction that cites them commits.
Every text a store writes goes through :func:`engine.logs.scrub` (no secret in the store).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from engine.errors import StoreError
from engine.model import (
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

if TYPE_CHECKING:
    from engine.passwords import EarlyCheck


@dataclass(frozen=True)
class RequestFilter:
    """What :meth:`Store.find_requests` keeps: each field that is set must match. ``team`` is
    a team's number or name; ``since``/``until`` are days (``YYYY-MM-DD``, both included)."""

    type: str | None = None
    status: str | None = None
    kind: str | None = None
    team: str | None = None
    mailbox: str | None = None
    cause: str | None = None
    since: str | None = None
    until: str | None = None

    def where(self, mark: Callable[[int], str]) -> tuple[str, list[Any]]:
        """The SQL condition over ``requests r JOIN teams t`` and its arguments; ``mark(n)``
        is the n-th placeholder (1-based) in the store's dialect. Never a value in the SQL."""
        parts: list[str] = []
        args: list[Any] = []

        def add(sql: str, *values: Any) -> None:
            marks = [mark(len(args) + i + 1) for i in range(len(values))]
            parts.append(sql.format(*marks))
            args.extend(values)

        for column, value in (
            ("r.type", self.type),
            ("r.status", self.status),
            ("r.kind", self.kind),
            ("r.mailbox", self.mailbox),
            ("r.cause", self.cause),
        ):
            if value:
                add(column + " = {0}", value)
        if self.team:
            team = "(lower(t.name) = lower({0}) OR CAST(t.number AS TEXT) = {1})"
            add(team, self.team, self.team)
        if self.since:
            add("substr(r.created_at, 1, 10) >= {0}", self.since)
        if self.until:
            add("substr(r.created_at, 1, 10) <= {0}", self.until)
        return (" WHERE " + " AND ".join(parts)) if parts else "", args


class Transaction(ABC):
    """One transaction of the store (see the module's docstring for its promises)."""

    @property
    @abstractmethod
    def directory(self) -> DirectoryView:
        """The read-only view of this transaction that processors get."""

    def fence(self, mailbox: str, owner: str, epoch: int) -> None:
        """Commit only if ``owner`` still holds ``mailbox``'s lease at ``epoch`` (see
        engine/leases.py); a lost lease fails the commit with a StoreError. SQLite: nothing
        to check, its data-directory lock makes one engine."""
        del mailbox, owner, epoch

    @abstractmethod
    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """Undo the block's writes alone if it raises an ``Exception`` that is not the store
        failing; a store error or a cancellation leaves the whole transaction to roll back."""

    # -- directory -------------------------------------------------------------------------

    @abstractmethod
    async def user_by_email(self, email: str) -> User | None: ...

    @abstractmethod
    async def user_by_login(self, login: str) -> User | None: ...

    @abstractmethod
    async def team(self, ref: str | int | None) -> Team | None:
        """A team by number or name; with no reference, the only team if there is just one."""

    @abstractmethod
    async def first_team(self) -> Team | None:
        """The team with the lowest number, if any."""

    @abstractmethod
    async def has_name(self, table: str, name: str) -> bool:
        """Whether ``sites``, ``groups``, ``sources``, ``priorities`` or ``categories`` holds
        ``name``."""

    @abstractmethod
    async def import_directory(self, data: Mapping[str, Any]) -> dict[str, int]:
        """Insert or update teams, sites, groups, sources, priorities, categories and users
        (keyed by name/login)."""

    # -- requests and activities -----------------------------------------------------------

    @abstractmethod
    async def read_ahead(self, numbers: Iterable[int]) -> None:
        """A hint: these requests will be asked for (:meth:`request`) in this transaction."""

    @abstractmethod
    async def request(self, number: int) -> RequestRef | None: ...

    async def read_ahead_message_ids(self, message_ids: Iterable[str]) -> None:
        """A hint: :meth:`request_by_message_id` will be asked about these Message-IDs in
        this transaction. A store that pays per round trip reads them in one query."""
        return None

    @abstractmethod
    async def request_by_message_id(self, message_ids: Sequence[str]) -> RequestRef | None:
        """The request a message with one of these Message-IDs created or updated, through
        the ledger (the newest row) or a reply the outbox sent; the first id found wins."""

    @abstractmethod
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
        """A new request, with its history line; returns the number it was given."""

    @abstractmethod
    async def add_request_details(
        self,
        number: int,
        *,
        fields: Sequence[tuple[str, str]] = (),
        tags: Iterable[str] = (),
        foreign_numbers: Iterable[str] = (),
    ) -> None:
        """A service request's form fields (in order), tags and foreign ticket numbers."""

    @abstractmethod
    async def set_alert_state(self, number: int, state: str) -> None:
        """The last alert state an event's monitoring mail reported."""

    @abstractmethod
    async def correlated_event(self, key: str) -> CorrelatedEvent | None:
        """The newest event of correlation key ``key``."""

    @abstractmethod
    async def request_by_foreign_number(self, refs: Sequence[str]) -> RequestRef | None:
        """The newest request carrying one of these foreign ticket numbers."""

    @abstractmethod
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
        """An activity on request ``number``; returns the id it was given."""

    @abstractmethod
    async def set_status(self, number: int, status: str, *, by: str, why: str) -> None:
        """A new status, with its history line; a closing status records when."""

    @abstractmethod
    async def add_attachments(
        self, number: int, activity_id: int | None, attachments: Iterable[Attachment]
    ) -> None:
        """Attachments of a request (``activity_id`` None) or of one of its activities."""

    @abstractmethod
    async def failure_event(self, message_id: str | None, sha256: str) -> int | None:
        """The failure event already made of this message, if any."""

    @abstractmethod
    async def open_outages(self, mailbox: str) -> dict[str, int]:
        """The mailbox's open outage events, by cause."""

    @abstractmethod
    async def outages_by_cause(self, mailbox: str, causes: Iterable[str]) -> dict[str, int]:
        """The mailbox's outage events of these causes, open or not, by cause (the latest):
        a warning is raised once per cause, even after someone closed it."""

    # -- ledger ----------------------------------------------------------------------------

    @abstractmethod
    async def ledger_rows(self, account: str, uidls: Iterable[str]) -> dict[str, LedgerRow]:
        """The ledger rows of these keys that exist, by key (any number of keys)."""

    @abstractmethod
    async def ledger_keys_by_sha256(
        self, account: str, sha256s: Iterable[str]
    ) -> dict[str, list[str]]:
        """The keys of the account's ledger rows whose message has one of these hashes, by
        hash: the content-hash fallback of a folder whose UIDVALIDITY changed."""

    @abstractmethod
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
        """A message's ledger row; (account, uidl) is unique: a second one fails the commit.
        ``arrived``: when it reached the mail server, if known (kept as ``arrived_at``,
        bounded by the time of recording: engine.store.sqlite.arrived_text)."""

    @abstractmethod
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
        """A message left on the server once, now taken (or left again): its row anew."""

    @abstractmethod
    async def mark_deleted(self, account: str, uidls: Iterable[str]) -> None:
        """The server confirmed (QUIT) the deletion of these messages."""

    @abstractmethod
    async def account_has_rows(self, account: str) -> bool: ...

    @abstractmethod
    async def rename_account(self, old: str, new: str) -> None:
        """Every ledger row of account ``old`` now belongs to ``new`` (which has none)."""

    @abstractmethod
    async def mailbox_account(self, mailbox: str) -> tuple[str, str] | None:
        """The account the mailbox last used, and its user name."""

    @abstractmethod
    async def remember_account(self, mailbox: str, account: str, user_name: str) -> None: ...

    # -- issue 20: origins (flood, several mailboxes), watchers, undeliverable addresses ----

    @abstractmethod
    async def engine_key(self, name: str) -> str | None:
        """One of the engine's keys (migration 7: ``reference``), or None."""

    @abstractmethod
    async def add_history(self, number: int, by: str, text: str) -> None:
        """A line of request ``number``'s history."""

    async def read_ahead_origins(
        self,
        mailboxes: Iterable[str],
        keys: Iterable[str],
        message_ids: Iterable[str],
        since: datetime,
    ) -> None:
        """A hint: :meth:`flood` will be asked about these mailboxes and senders or
        fingerprints (``keys``) since ``since`` or later, :meth:`origins` about these
        Message-IDs. A store that pays per round trip reads them in one query."""
        return None

    @abstractmethod
    async def record_origin(self, number: int, origin: Origin) -> None:
        """Where mail request ``number`` came from (what :meth:`flood` and :meth:`origins`
        read)."""

    @abstractmethod
    async def flood(
        self, mailbox: str, sender: str, fingerprint: str, since: datetime
    ) -> tuple[int, int | None]:
        """How many requests ``mailbox`` created since ``since`` from ``sender`` or with
        ``fingerprint``, and the newest one's number."""

    @abstractmethod
    async def origins(self, message_id: str) -> list[tuple[RequestRef, str]]:
        """The mail requests a message with this Message-ID created, oldest first, with
        the mailbox each came from."""

    @abstractmethod
    async def add_watchers(self, number: int, watchers: Iterable[Watcher]) -> None:
        """Watchers of request ``number`` (one already there is left as it is)."""

    @abstractmethod
    async def mark_undeliverable(
        self, address: str, *, status: str, reason: str, request_number: int | None
    ) -> None:
        """Record (or renew) ``address`` as undeliverable (a permanent bounce)."""

    @abstractmethod
    async def undeliverable(self, address: str) -> str | None:
        """Since when and why ``address`` is undeliverable, or None."""

    # -- outbox ----------------------------------------------------------------------------

    @abstractmethod
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
        """Record a reply to send; the outbox sends it once the transaction has committed."""

    @abstractmethod
    async def replies_since(self, by: str, value: str, since: datetime) -> int:
        """Replies recorded since ``since`` for one normalized address (``by="rcpt_key"``),
        domain (``"rcpt_domain"``) or mailbox (``"mailbox"``)."""

    @abstractmethod
    async def due_replies(
        self, mailboxes: Sequence[str], *, exclude: Iterable[int], limit: int
    ) -> tuple[list[PendingReply], str | None]:
        """Up to ``limit`` unsent replies of ``mailboxes`` whose time has come (not those in
        ``exclude``), and when the next of the others is due (ISO 8601, or None)."""

    @abstractmethod
    async def record_attempt(
        self, reply_id: int, *, error: str | None, retry_at: datetime | None = None
    ) -> None:
        """One send of a reply: sent (no ``error``), to be tried again at ``retry_at``, or
        failed for good (an ``error`` and no ``retry_at``)."""

    # -- mailbox status --------------------------------------------------------------------

    @abstractmethod
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
        """How a session of ``mailbox`` went; ``kept_deleted`` None keeps the last count."""


class Store(ABC):
    """A store: read-only queries for the commands, and transactions for the writer."""

    # The exceptions that mean the store itself is failing, not a message: the writer rolls
    # the whole transaction back and answers every item "not committed". A store adds its
    # driver's errors.
    failures: tuple[type[Exception], ...] = (StoreError,)
    # Among the failures, those that mean another writer (a replica) committed first what
    # this transaction also wrote: a ledger key (the unique constraint), an open outage.
    # The writer does the transaction again, and then finds the other's rows (the message is
    # a duplicate, deleted without being processed). SQLite has one writer: none.
    conflicts: tuple[type[Exception], ...] = ()

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """``BEGIN`` (taking the write lock at once), then ``COMMIT`` when the block ends or
        ``ROLLBACK`` when it raises. One transaction at a time per store."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def check_login(self, login: str, password: str, early: EarlyCheck | None = None) -> bool:
        """Whether ``login`` is a user with that password; ``early``, the same check begun
        before the store opened, answers it when it read the same hash."""

    @abstractmethod
    async def list_requests(
        self, *, type: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def reference_token(self, number: int) -> str | None:
        """Request ``number``'s reference token in the default format (engine.parse.tokens)."""

    @abstractmethod
    async def request_detail(self, number: int) -> dict[str, Any] | None:
        """One request with its attachments, activities and history; None: no such request."""

    @abstractmethod
    async def mailbox_status(self) -> list[dict[str, Any]]:
        """Per mailbox: its last sessions' counts and errors, and its open outages."""

    @abstractmethod
    async def attachment_data(self, sha256: str) -> bytes | None:
        """An attachment's bytes, by content (its sha256); None: no such content."""

    @abstractmethod
    async def counts(self) -> dict[str, int]:
        """Rows per table (requests, activities, attachments, ledger, outbox)."""

    # -- the web console's reads (engine/console) ------------------------------------------

    @abstractmethod
    async def find_requests(self, where: RequestFilter, *, limit: int) -> list[dict[str, Any]]:
        """Requests as :meth:`list_requests` gives them, newest first, at most ``limit``."""

    @abstractmethod
    async def attachment(self, attachment_id: int) -> tuple[dict[str, Any], bytes] | None:
        """One attachment's row (request_number, name, content_type, size, sha256) and
        bytes; None: no such attachment, or its content is gone."""

    @abstractmethod
    async def open_outage_events(self) -> list[dict[str, Any]]:
        """Every open outage event: mailbox, cause, number, created_at (since when)."""

    @abstractmethod
    async def messages_since(self, since: str) -> dict[str, int]:
        """Messages recorded in the ledger since ``since`` (ISO 8601), per mailbox."""

    @abstractmethod
    async def flow(self, since: str) -> list[tuple[str, str, int]]:
        """Messages recorded in the ledger since ``since``, per mailbox and minute
        (``YYYY-MM-DDTHH:MM``): (mailbox, minute, count)."""

    @abstractmethod
    async def failures_by_cause(self, since: str) -> dict[str, int]:
        """Failure events created since ``since``, per cause."""

    @abstractmethod
    async def waiting_on_server(self) -> dict[str, tuple[int, str]]:
        """Per mailbox, the messages left on the server waiting to be taken whole (ledger
        outcome ``kept``): how many, and since when the oldest was first seen."""

    @abstractmethod
    async def lag_since(self, since: str) -> dict[str, tuple[int, int, int]]:
        """Per mailbox, over the ledger rows recorded since ``since`` whose arrival is known:
        how long a message waited between reaching the mail server and being recorded
        (processed_at - arrived_at, in whole seconds), as (median, longest, rows counted).
        The median is the lower one of an even count (PostgreSQL's percentile_disc(0.5))."""

    @abstractmethod
    async def failed_ingests(self, sha256: str) -> int:
        """How many ingests of the message with this hash failed (engine.keys.ingest_key)."""

    @abstractmethod
    async def user_roles(self, login: str) -> set[str]:
        """The roles the directory gives ``login`` (none for an unknown login)."""
