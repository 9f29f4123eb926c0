"""What a message means: pure decisions from a parsed message and a read-only directory view.

A processor never writes. It returns a :data:`Decision`; the writer applies it inside the
batch transaction. That keeps message semantics testable without a store, and lets
``once --dry-run`` print the same decision the real run would apply.

The events the engine raises itself are decided the same way, from what the writer looked
up: a message it could not process (:mod:`engine.processors.failure`) and a mailbox it
cannot read (:mod:`engine.processors.outage`) become :data:`EventDecision` values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from engine.config import MailboxConfig
from engine.model import (
    Attachment,
    DirectoryView,
    Origin,
    ParsedMessage,
    RequestRef,
    Team,
    User,
    Watcher,
)


@dataclass(frozen=True)
class NewRequest:
    type: Literal["incident", "event", "service request"]
    subject: str
    description: str
    html: str | None
    requester: User | None
    site: str | None
    group: str | None
    assignee: User | None
    source: str | None
    attachments: tuple[Attachment, ...]
    notes: tuple[str, ...] = ()
    priority: str | None = None
    # An event's correlation key and alert state (engine.processors.alerts).
    correlation_key: str | None = None
    alert_state: str | None = None
    # A service request's form and its fields, in order.
    form: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    foreign_numbers: tuple[str, ...] = ()
    # Another team than the mailbox's (a routing rule's setTeam: a number or name).
    team: str | None = None
    # The routing rules that matched, by name (for once --dry-run).
    matched_rules: tuple[str, ...] = ()
    # To/Cc addresses kept on the request, and where it came from (engine.processors.intake).
    watchers: tuple[Watcher, ...] = ()
    origin: Origin | None = None


@dataclass(frozen=True)
class AddActivity:
    """An activity on ``request``. ``reopen``: a closed request opens again (by a person's
    reply, or a correlated alert whatever sent it: ``via == "correlation"``); ``close``:
    the request closes (an alert's recovery), saying ``close`` in its history; ``state``:
    the alert state the event now has."""

    request: RequestRef
    author: str
    body: str
    attachments: tuple[Attachment, ...]
    reopen: bool
    automatic: bool = False
    via: str = "subject"
    close: str | None = None
    state: str | None = None
    # The routing rules that matched (not applied: a reply is not routed; for --dry-run).
    matched_rules: tuple[str, ...] = ()
    # To/Cc addresses the reply adds to the request's watchers.
    watchers: tuple[Watcher, ...] = ()
    # Addresses a permanent bounce says cannot receive mail: (address, status, reason).
    undeliverable: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Refuse:
    """No request: new requests are not allowed in this mailbox."""

    reason: str
    reply: bool
    no_reply_because: str | None = None
    matched_rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ignore:
    """Recorded in the ledger only (an auto-reply that answers nothing we know). With
    ``request_number``, the ledger row names that request, and ``also`` goes to its history
    (a copy of a message that request was made of)."""

    reason: str
    matched_rules: tuple[str, ...] = ()
    request_number: int | None = None
    also: str | None = None
    # Addresses a permanent bounce says cannot receive mail: (address, status, reason).
    undeliverable: tuple[tuple[str, str, str], ...] = ()


Decision = NewRequest | AddActivity | Refuse | Ignore


@dataclass(frozen=True)
class NewEvent:
    """An event the engine raises itself. It goes to team ``team`` (a number or name; else
    the engine's default team, else the first team), in that team's default group."""

    kind: Literal["message-failure", "outage"]
    team: str | None
    mailbox: str
    cause: str
    subject: str
    description: str
    message_id: str | None = None
    sha256: str | None = None
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class AddNote:
    """An automatic activity by the engine on request ``number``."""

    number: int
    body: str


@dataclass(frozen=True)
class Close:
    """The engine closes its event ``number`` (status processed): ``note`` as an automatic
    activity, ``why`` in the history. ``cause``: the event's cause, for the log."""

    number: int
    cause: str
    note: str
    why: str


EventDecision = NewEvent | AddNote | Close


@dataclass(frozen=True)
class Context:
    """What the writer resolved for the mailbox before asking the processor."""

    mailbox: MailboxConfig
    team: Team
    extra_attachments: tuple[Attachment, ...] = field(default=())
    # The time decisions are made at (the flapping window); None: now.
    now: datetime | None = None
    # A historic import (once --since): no flood limit.
    historic: bool = False
    # The store's reference key (engine.parse.tokens); None: tokens are not looked for.
    reference_key: str | None = field(default=None, repr=False)


_D = TypeVar("_D", bound=NewRequest | AddActivity)


def replaced(decision: _D, **changes: Any) -> _D:
    """``dataclasses.replace(decision, **changes)``, for the decisions every message's goes
    through (engine.processors.intake): a copy of the instance's fields, changed, without
    ``__init__``. The decision types have no ``__post_init__`` nor ``init=False`` field, so
    it is the same value (a property test holds the two equal); ~1 us a call against ~7."""
    fields = type(decision).__dataclass_fields__
    if not changes.keys() <= fields.keys():
        raise TypeError(f"not fields of {type(decision).__name__}: {sorted(changes)}")
    new = object.__new__(type(decision))
    new.__dict__.update(decision.__dict__, **changes)
    return new


def referenced(msg: ParsedMessage, mailbox: MailboxConfig) -> int | None:
    """The request number a processor will look up for ``msg`` by its subject, if any: the
    writer fetches those of a whole batch in one query instead of one per message."""
    from engine.processors.common import referenced_number

    ref = referenced_number(msg.subject, mailbox.subject_pattern)
    return None if ref is None else ref[0]


async def decide(msg: ParsedMessage, ctx: Context, directory: DirectoryView) -> Decision:
    """Dispatch to the mailbox's processor."""
    # Imported here: the processor modules import this one for the decision types. Each
    # processor only when a mailbox uses it: the event processor and its recognisers (~13
    # patterns compiled) cost an engine of incident mailboxes ~4 ms of its first message.
    from engine.processors import intake, rules

    matched = rules.matching(msg, ctx.mailbox.processing.rules)
    ignoring = next((r for r in matched if r.ignore), None)
    if ignoring is not None:
        names = tuple(r.name for r in matched)
        return Ignore(f"rule {ignoring.name!r} ({ignoring.where})", matched_rules=names)
    decision: Decision
    if ctx.mailbox.processor == "event":
        from engine.processors import event

        decision = await event.decide(msg, ctx, directory)
    elif ctx.mailbox.processor == "service-request":
        from engine.processors import service_request

        decision = await service_request.decide(msg, ctx, directory)
    else:
        from engine.processors import incident

        decision = await incident.decide(msg, ctx, directory)
    decision = await rules.apply(msg, ctx, directory, decision, matched)
    return await intake.apply(msg, ctx, directory, decision)


def _describe_new(d: NewRequest) -> str:
    who = d.requester.login if d.requester else "(no requester)"
    names = ", ".join(a.name for a in d.attachments) or "none"
    if d.notes:
        names += f" ({len(d.notes)} left out over a size limit)"
    return (
        f"new {d.type} {d.subject!r}: requester {who}, site {d.site or '-'}, "
        f"group {d.group or '-'}, assignee {d.assignee.login if d.assignee else '-'}, "
        f"priority {d.priority or '-'}, attachments: {names}" + _extras(d)
    )


def _extras(d: NewRequest) -> str:
    """What else a dry run shows of a new request: its correlation, its rules."""
    out = f", key {d.correlation_key} ({d.alert_state})" if d.correlation_key else ""
    if d.tags:
        out += f", tags: {', '.join(d.tags)}"
    return out + (f", rules matched: {', '.join(d.matched_rules)}" if d.matched_rules else "")


def describe(d: Decision) -> str:
    """One line for ``once --dry-run``."""
    if isinstance(d, NewRequest):
        return _describe_new(d)
    rules = f"; rules matched: {', '.join(d.matched_rules)}" if d.matched_rules else ""
    if isinstance(d, AddActivity):
        extra = " and reopen it" if d.reopen else " and close it" if d.close else ""
        return f"activity on request #{d.request.number} (found by {d.via}){extra}{rules}"
    if isinstance(d, Ignore) and d.request_number is not None:
        return f"no request: {d.reason}{rules}"
    if isinstance(d, Refuse):
        return (
            f"no request ({d.reason}); "
            + ("auto-reply" if d.reply else f"no reply ({d.no_reply_because})")
            + rules
        )
    return f"ignored: {d.reason}{rules}"
