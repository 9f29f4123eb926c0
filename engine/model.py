"""What flows through the pipeline: parsed messages and the operations decided for them."""

from __future__ import annotations

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
