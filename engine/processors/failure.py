"""Failure events: a message the engine could not process becomes an event that holds it.

A pure decision, like a processor's: from the failed message, the error, and the failure
event already made of the same message if any (the writer looks it up by Message-ID and
SHA-256), to what the writer applies in the message's transaction: a new event with the
message attached byte for byte (or what was read of it), or a note on the existing one, so
a message that keeps failing makes one event, not one per arrival.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from engine.errors import MessageError, MessageKept
from engine.model import Attachment, ParsedMessage
from engine.processors import AddNote, NewEvent


@dataclass(frozen=True)
class Failed:
    """A message that could not be processed, as the writer knows it. ``parsed`` is None
    when it could not be parsed (or was never taken whole: ``raw`` is then what was read)."""

    mailbox: str
    team: str | None  # the mailbox's team (a number or name)
    uidl: str
    raw: bytes = field(repr=False)
    parsed: ParsedMessage | None
    message_id: str | None
    sha256: str


def failed(
    mailbox: str, team: str | None, uidl: str, raw: bytes, parsed: ParsedMessage | None
) -> Failed:
    """The failed message, with the identity its failure event is found by."""
    message_id, sha256 = identity(raw, parsed)
    return Failed(mailbox, team, uidl, raw, parsed, message_id, sha256)


def decide(msg: Failed, error: Exception, existing: int | None) -> AddNote | NewEvent:
    """What the failure of ``msg`` becomes: a note on its failure event ``existing``, or a
    new failure event."""
    if existing is not None:
        return AddNote(
            existing,
            f"The same message arrived again in mailbox {msg.mailbox} (UIDL {msg.uidl}) "
            f"and still could not be processed: {error}",
        )
    name, size = "message.eml", f"{len(msg.raw)} bytes"
    attached = "The original message is attached byte for byte (message.eml)."
    if isinstance(error, MessageKept):
        # Never taken whole: what was read of it is all the engine has.
        name, size = "message-start.eml", f"{len(msg.raw)} bytes read of {error.needed}"
        attached = (
            f"The message is still on the server. What was read of it is attached ({name})."
            if msg.raw
            else "The message is still on the server."
        )
    parsed = msg.parsed
    subject = parsed.subject if parsed else raw_header(msg.raw, b"subject")
    sender = parsed.from_addr if parsed else raw_header(msg.raw, b"from")
    reason = cause(error)
    description = (
        f"A message in mailbox {msg.mailbox} could not be turned into a request.\n\n"
        f"What went wrong: {error}\n"
        f"Cause: {reason}\n"
        f"What to do: {getattr(error, 'hint', MessageError.hint)}\n\n"
        f"From: {sender}\nSubject: {subject}\nMessage-ID: {msg.message_id or '(none)'}\n"
        f"UIDL: {msg.uidl}\nSize: {size}\nSHA-256: {msg.sha256}\n\n{attached}"
    )
    return NewEvent(
        kind="message-failure",
        team=msg.team,
        mailbox=msg.mailbox,
        cause=reason,
        subject=f"Mail integration: a message in {msg.mailbox} could not be processed",
        description=description,
        message_id=msg.message_id,
        sha256=msg.sha256,
        attachments=(Attachment(name, "message/rfc822", msg.raw),) if msg.raw else (),
    )


def cause(error: BaseException) -> str:
    """The cause a failure is recorded under (the ledger's ``failed: <cause>``)."""
    return str(getattr(error, "cause", None) or "processor-error")


def identity(raw: bytes, parsed: ParsedMessage | None) -> tuple[str | None, str]:
    """(Message-ID, SHA-256) of a message: the parser's, else read from the raw bytes."""
    if parsed is not None:
        return parsed.message_id, parsed.sha256
    mid = raw_header(raw, b"message-id").strip().strip("<>")
    return mid or None, hashlib.sha256(raw).hexdigest()


def raw_header(raw: bytes, name: bytes) -> str:
    """A header read without the parser (for messages it refused): the first line of the
    first field named ``name`` (lowercase), printable, at most 300 characters."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0][:65536]
    for line in head.splitlines():
        if line.lower().startswith(name + b":"):
            text = line[len(name) + 1 :].decode("utf-8", "replace").strip()
            return "".join(c if c.isprintable() else " " for c in text)[:300]
    return ""
