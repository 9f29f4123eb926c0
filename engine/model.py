"""The shared vocabulary of the pipeline: parsed messages, the directory and the rows the
session and the outbox read. Plain frozen dataclasses: this module imports no pipeline stage,
so every stage (session, parse, processors, writer, store) can use it without importing another.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Attachment:
    """One file taken from a message. ``name`` is already sanitized: safe as a file name."""

    name: str
    content_type: str
    data: bytes = field(repr=False)
    inline: bool = False
    content_id: str | None = None
    # The sha256 hex digest of ``data``, set by the parse stage (engine.parse.with_digests)
    # so that the single writer does not hash every attachment itself; None: not computed
    # (the store hashes the data then). Not an argument: dataclasses.replace() of an
    # attachment, whatever data it is given, makes one without it, never a stale one.
    sha256: str | None = field(default=None, init=False, compare=False, repr=False)


@dataclass(frozen=True)
class ParsedMessage:
    """A message as the processors see it. ``raw`` is the exact bytes received.

    ``notes`` say what the parser left out of this model (each a sentence for the request):
    the addresses of a header beyond ``max_addresses``, an HTML body shown as an attachment.
    """

    raw: bytes = field(repr=False)
    sha256: str
    message_id: str | None
    subject: str
    from_name: str
    from_addr: str
    to: tuple[str, ...]
    date: datetime | None
    in_reply_to: str | None
    references: tuple[str, ...]
    body: str
    html: str | None
    attachments: tuple[Attachment, ...]
    auto_submitted: bool
    auto_reason: str | None
    is_bounce: bool
    notes: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    # The top-level header fields (lower-cased name, value as received: folded, encoded
    # words not decoded; engine.parse.header_text reads one), bounded (see
    # engine.parse.MAX_KEPT_HEADERS): what routing rules, priority mapping and alert
    # recognisers read. Never copied into an outgoing header.
    headers: tuple[tuple[str, str], ...] = ()
    # What a bounce (is_bounce) says, RFC 3464 or plain text (engine.parse.verdicts): the
    # first enhanced status code ("5.1.1": 5 permanent, 4 a delay), the failed recipients
    # (lower-cased) and the Message-ID (without brackets) of the message that bounced.
    bounce_status: str | None = None
    bounce_recipients: tuple[str, ...] = ()
    bounce_message_id: str | None = None
    # Computed by the parse stage, which runs beside the single writer, rather than by the
    # writer: the flood fingerprint (engine.parse.fingerprint; "" when not computed: read
    # it through engine.processors.intake.fingerprint) and when the top Received field
    # says the message arrived (engine.parse.headers.received_at).
    fingerprint: str = ""
    received_at: datetime | None = None

    def header(self, name: str) -> str | None:
        """The first value of header field ``name`` (any case) as received, or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k == wanted), None)


# -- the directory (read by processors through a view, written only by `directory import`) --


@dataclass(frozen=True)
class User:
    """A user of the directory: a requester, a fallback user or an assignee."""

    id: int
    login: str
    email: str | None
    name: str
    site: str | None
    # An agent: a directory user who holds the role "agent" or can sign in (has a password),
    # i.e. desk staff rather than a customer (engine.processors.incident's forwards).
    agent: bool = False


@dataclass(frozen=True)
class Team:
    """A team: every request belongs to one. ``default_group`` is its group by default."""

    id: int
    number: int
    name: str
    default_group: str | None


@dataclass(frozen=True)
class RequestRef:
    """What a processor needs to know of an existing request to add to it."""

    number: int
    team_id: int
    type: str
    status: str
    kind: str


@dataclass(frozen=True)
class CorrelatedEvent:
    """The newest event of a correlation key: its request, its alert state and when it was
    last closed (None while open)."""

    request: RequestRef
    state: str | None
    closed_at: datetime | None


@dataclass(frozen=True)
class Watcher:
    """An address kept on a request besides its requester (from To/Cc): a directory user
    (``user_id``) or an unknown address (``user_id`` None). ``address`` is lower-case."""

    address: str
    user_id: int | None = None


@dataclass(frozen=True)
class Origin:
    """Where a mail request came from: what the flood limit and the several-mailboxes
    policy read. ``sender`` is lower-case; ``fingerprint`` a digest of the subject and body
    (engine.processors.intake.fingerprint)."""

    mailbox: str
    team_id: int
    sender: str
    fingerprint: str
    message_id: str | None


# A reply to a request in one of these states reopens it.
CLOSED_STATUSES = frozenset({"closed", "resolved", "processed"})


# -- rows the session and the outbox read ------------------------------------------------


@dataclass(frozen=True)
class LedgerRow:
    """What the ledger holds of one message. ``size`` is the size the server listed
    (None in rows older than migration 3); ``needed`` the bytes a message left on the
    server needs to be taken whole; ``deleted_at`` when a QUIT confirmed its deletion.
    ``outcome`` is the ledger text (see :class:`engine.items.Outcome`)."""

    size: int | None
    needed: int | None
    message_id: str | None
    sha256: str
    outcome: str
    request_number: int | None
    deleted_at: str | None

    @property
    def kept(self) -> bool:
        """Left on the server, not taken whole (see engine.errors.MessageKept)."""
        return self.outcome.startswith("kept:")


@dataclass(frozen=True)
class PendingReply:
    """An outbox row to send."""

    id: int
    mailbox: str
    recipient: str
    message: bytes = field(repr=False)
    attempts: int


async def _no_event(key: str) -> CorrelatedEvent | None:
    return None


async def _no_request(refs: Sequence[str]) -> RequestRef | None:
    return None


async def _always(table: str, name: str) -> bool:
    return True


async def _no_flood(
    mailbox: str, sender: str, fingerprint: str, since: datetime
) -> tuple[int, int | None]:
    return 0, None


async def _no_origins(message_id: str) -> list[tuple[RequestRef, str]]:
    return []


@dataclass(frozen=True)
class DirectoryView:
    """The read-only questions a processor may ask: users, teams, and the requests a message
    may refer to. The store's transaction makes one (its ``directory``); it holds that
    transaction's read methods and nothing else, so a processor cannot write. Each answer
    sees the transaction's own writes (a request created earlier in the same batch).

    A test builds one from plain functions, without a store.
    """

    user_by_email: Callable[[str], Awaitable[User | None]]
    user_by_login: Callable[[str], Awaitable[User | None]]
    # A team by number or name; with no reference, the only team if there is just one.
    team: Callable[[str | int | None], Awaitable[Team | None]]
    request: Callable[[int], Awaitable[RequestRef | None]]
    # The request a message with one of these Message-IDs created or updated (first match).
    request_by_message_id: Callable[[Sequence[str]], Awaitable[RequestRef | None]]
    # The newest event of a correlation key (see engine.processors.correlation).
    correlated_event: Callable[[str], Awaitable[CorrelatedEvent | None]] = _no_event
    # The newest request that carries one of these foreign ticket numbers.
    request_by_foreign_number: Callable[[Sequence[str]], Awaitable[RequestRef | None]] = _no_request
    # Whether "sites", "groups", "sources" or "priorities" holds a name.
    has_name: Callable[[str, str], Awaitable[bool]] = _always
    # How many requests a mailbox created from a sender or a fingerprint since a time, and
    # the newest (engine.processors.intake).
    flood: Callable[[str, str, str, datetime], Awaitable[tuple[int, int | None]]] = _no_flood
    # The mail requests a Message-ID created, with their mailboxes, oldest first.
    origins: Callable[[str], Awaitable[list[tuple[RequestRef, str]]]] = _no_origins
