"""What a message means: pure decisions from a parsed message and a read-only directory view.

A processor never writes. It returns a :data:`Decision`; the writer applies it inside the
batch transaction. That keeps message semantics testable without a store, and lets
``once --dry-run`` print the same decision the real run would apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from engine.config import MailboxConfig
from engine.model import Attachment, ParsedMessage, RequestRef, Team, User


class Directory(Protocol):
    """The read-only questions a processor may ask of the store."""

    async def user_by_email(self, email: str) -> User | None: ...
    async def user_by_login(self, login: str) -> User | None: ...
    async def request(self, number: int) -> RequestRef | None: ...
    async def request_by_message_id(self, message_ids: Sequence[str]) -> RequestRef | None: ...


@dataclass(frozen=True)
class NewRequest:
    type: Literal["incident", "event"]
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


@dataclass(frozen=True)
class AddActivity:
    request: RequestRef
    author: str
    body: str
    attachments: tuple[Attachment, ...]
    reopen: bool
    automatic: bool = False
    via: str = "subject"


@dataclass(frozen=True)
class Refuse:
    """No request: new requests are not allowed in this mailbox."""

    reason: str
    reply: bool
    no_reply_because: str | None = None


@dataclass(frozen=True)
class Ignore:
    """Recorded in the ledger only (an auto-reply that answers nothing we know)."""

    reason: str


Decision = NewRequest | AddActivity | Refuse | Ignore


@dataclass(frozen=True)
class Context:
    """What the writer resolved for the mailbox before asking the processor."""

    mailbox: MailboxConfig
    team: Team
    extra_attachments: tuple[Attachment, ...] = field(default=())


def referenced(msg: ParsedMessage, mailbox: MailboxConfig) -> int | None:
    """The request number a processor will look up for ``msg`` by its subject, if any: the
    writer fetches those of a whole batch in one query instead of one per message."""
    from engine.processors.common import referenced_number

    ref = referenced_number(msg.subject, mailbox.subject_pattern)
    return None if ref is None else ref[0]


async def decide(msg: ParsedMessage, ctx: Context, directory: Directory) -> Decision:
    """Dispatch to the mailbox's processor."""
    # Imported here: the processor modules import this one for the decision types.
    from engine.processors import event, incident

    if ctx.mailbox.processor == "event":
        return await event.decide(msg, ctx, directory)
    return await incident.decide(msg, ctx, directory)
