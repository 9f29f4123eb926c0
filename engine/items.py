"""What travels on the writer's queue, and the typed outcome of a message.

Every stage that talks to the store does it by sending one of these items on the writer's
queue (one bounded memory channel) and waiting for ``item.done``. The writer's promise, for
every item: ``done`` is set exactly once, only after the transaction that answered it has
committed; if it did not commit, ``failure`` says why and nothing of the answer may be taken
as durable (a session then deletes nothing). See :mod:`engine.writer` for how it keeps it.

This module is the shared vocabulary: plain dataclasses and enums, importing no pipeline stage.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio

from engine.config import MailboxConfig
from engine.errors import DirectoryError, EngineError, MessageError
from engine.model import LedgerRow, ParsedMessage, PendingReply


class Kind(enum.StrEnum):
    """What became of a message. The value is the first word of its ledger text."""

    CREATED = "created"  # a new request
    ACTIVITY = "activity"  # an activity on an existing request
    REFUSED = "refused"  # no request: new requests not allowed here (replied or not)
    IGNORED = "ignored"  # recorded in the ledger only (an auto-reply to nothing known)
    FAILED = "failed"  # a failure event holding the message
    KEPT = "kept"  # a failure event; the message stays on the server (not deleted)
    DUPLICATE = "duplicate"  # already in the ledger: not processed again
    DRY_RUN = "dry-run"  # what would happen; nothing recorded
    SKIPPED = "skipped"  # older than a historic import's --since: left on the server, unrecorded


# The detail of a message left on the server before and read again unchanged: nothing new is
# recorded or counted, and it stays there.
_AS_BEFORE = "as before"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The writer's answer for one message.

    ``str(outcome)`` is the ledger text, byte for byte as the ledger has always stored it:
    ``"created"``, ``"failed: bad-mime"``, ``"refused: no reply (rate limit)"``...
    """

    kind: Kind
    detail: str | None = None  # the ledger text after "kind: " (cause, reason)
    request_number: int | None = None
    note: str | None = None  # for people: why it failed, or the dry-run explanation

    def __str__(self) -> str:
        kind: str = self.kind._value_  # not .value: an enum property, twice the cost here
        return kind if self.detail is None else f"{kind}: {self.detail}"

    @classmethod
    def from_ledger(cls, text: str, request_number: int | None = None) -> Outcome:
        """The outcome a ledger text records (the inverse of ``str``).

        Raises ValueError for a text that names no :class:`Kind`."""
        head, sep, detail = text.partition(": ")
        return cls(Kind(head), detail if sep else None, request_number)

    @classmethod
    def kept_again(cls, request_number: int | None) -> Outcome:
        """A message left on the server before and cut off the same way again."""
        return cls(Kind.KEPT, _AS_BEFORE, request_number)

    @property
    def again(self) -> bool:
        """Left on the server before and read again unchanged: nothing new was recorded."""
        return self.kind is Kind.KEPT and self.detail == _AS_BEFORE

    @property
    def deletes(self) -> bool:
        """Whether the session may delete the message once this answer is final: never one
        left on the server (kept), never in a dry run."""
        return self.kind not in (Kind.KEPT, Kind.DRY_RUN, Kind.SKIPPED)

    @property
    def failed(self) -> bool:
        """Whether it counts as a failure: a failure event (made now, not one from before)."""
        return self.kind is Kind.FAILED or (self.kind is Kind.KEPT and not self.again)


@dataclass(frozen=True)
class Historic:
    """A historic import (``once --since DATE --status closed``): messages dated before
    ``since`` are skipped and left on the server; the others make requests in ``status``
    (None: as usual), without automatic replies, without reopening anything, and without
    the flood limit (a backlog is many messages at once by nature)."""

    since: datetime | None = None
    status: str | None = None


@dataclass(eq=False)
class Item:
    """Something for the writer. ``done`` is set once the answer is final (after commit);
    ``failure`` then says why it is not (the transaction did not commit)."""

    done: anyio.Event = field(default_factory=anyio.Event, init=False)
    failure: BaseException | None = field(default=None, init=False)


@dataclass(eq=False)
class Envelope(Item):
    """One fetched message on its way to the store.

    Two fields are a protocol between the session and the writer's gathering:

    - ``on_done`` is called once, right after ``done`` is set (committed or not), and the
      writer drops ``raw`` and ``parsed`` then: the session's byte budget gets the bytes back
      as soon as the answer is final. It must never block.
    - ``last``: the session sends nothing more until this one is answered, so the writer does
      not wait (linger) for more messages before it commits.
    """

    mailbox: MailboxConfig
    uidl: str
    raw: bytes
    parsed: ParsedMessage | None
    error: MessageError | None = None
    dry_run: bool = False
    # The ledger's account (the one the session resolved; default: the mailbox's own).
    account: str = ""
    # The size the server listed (recorded in the ledger: a known UIDL is checked by it).
    size: int | None = None
    # When the message reached the mail server, as the server or its top Received field says
    # (unchecked: the store bounds it against its clock); None: not known. The ledger keeps
    # it beside processed_at: the lag the console shows.
    arrived: datetime | None = None
    historic: Historic | None = None
    outcome: Outcome | None = field(default=None, init=False)
    on_done: Callable[[], None] | None = field(default=None, init=False, repr=False)
    last: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.account = self.account or self.mailbox.account

    @property
    def request_number(self) -> int | None:
        """The request the message created or updated, or its failure event."""
        return None if self.outcome is None else self.outcome.request_number

    @property
    def explanation(self) -> str | None:
        """In a dry run: what would have happened."""
        o = self.outcome
        return o.note if o is not None and o.kind is Kind.DRY_RUN else None

    @property
    def problem(self) -> str | None:
        """Why it became a failure event (``cause: error``)."""
        o = self.outcome
        return o.note if o is not None and o.kind in (Kind.FAILED, Kind.KEPT) else None


@dataclass(eq=False)
class KnownQuery(Item):
    """Which of these keys the ledger holds, with what it holds of them."""

    account: str
    uidls: list[str]
    known: dict[str, LedgerRow] = field(default_factory=dict, init=False)


@dataclass(eq=False)
class DirectoryCheck(Item):
    """Before a session: does the directory hold what the mailbox config names, and which
    account does the ledger know the mailbox by (``account``; see the writer's handler)?
    ``remember``: record that account for the mailbox (not in a dry run)."""

    mailbox: MailboxConfig
    remember: bool = True
    problem: DirectoryError | None = field(default=None, init=False)
    account: str = field(default="", init=False)


@dataclass(eq=False)
class SessionReport(Item):
    """How a mailbox session ended: opens, updates or closes its outage events.

    ``config`` is the mailbox's configuration when it loaded (None when the file could not be
    read as one): a new outage event attaches it, rebuilt from the model with its passwords
    masked. The writer never reads the mailbox file itself.
    """

    name: str
    path: Path
    team: str | None
    error: EngineError | None
    config: MailboxConfig | None = None
    fetched: int = 0
    processed: int = 0
    failed: int = 0
    # The ledger keys whose deletion the server confirmed (QUIT), under ``account``.
    account: str | None = None
    deleted: list[str] = field(default_factory=list)
    # Messages listed again although their deletion was confirmed before (None: unknown).
    kept_deleted: int | None = None
    # Token health warnings of an OAuth2 mailbox: (key, text), one event per key, ever.
    warnings: tuple[tuple[str, str], ...] = ()


@dataclass(eq=False)
class OutboxFetch(Item):
    """The outbox asks for replies due now (see :mod:`engine.outbox`): of ``mailboxes`` only
    (those it can send for), none of ``exclude`` (being sent), at most ``limit``."""

    mailboxes: tuple[str, ...]
    exclude: tuple[int, ...]
    limit: int
    due: list[PendingReply] = field(default_factory=list, init=False)
    next_due: str | None = field(default=None, init=False)  # the next retry's time, ISO


@dataclass(eq=False)
class OutboxResult(Item):
    """How one send of a reply went: sent (no ``error``), retry at ``retry_at``, or failed."""

    reply_id: int
    mailbox: str
    error: str | None
    retry_at: datetime | None = None
