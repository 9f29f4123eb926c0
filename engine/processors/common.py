"""Rules both processors share: the subject reference, threading, attachments, activities."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from typing import Final

from engine.model import CLOSED_STATUSES, Attachment, DirectoryView, ParsedMessage, RequestRef
from engine.processors import AddActivity, Context

# The communication types a subject reference may name, by the request type they refer to.
# "[SPAM] 5 offers" must not become an activity on request #5.
REFERENCE_TYPES = {
    "incident": "incident",
    "incidents": "incident",
    "event": "event",
    "events": "event",
    "événement": "event",
    "evenement": "event",
}


def referenced_number(subject: str, pattern: re.Pattern[str]) -> tuple[int, str | None] | None:
    """The request number the subject carries and the request type its bracket names.

    The first match whose bracket names a known type wins; a custom ``subjectPattern``
    without a ``type`` group refers to any type.
    """
    for m in pattern.finditer(subject):
        try:
            number = int(m.group("number"))
        except (IndexError, TypeError, ValueError):
            continue
        kind = m.groupdict().get("type")
        if kind is None:
            return number, None
        wanted = REFERENCE_TYPES.get(kind.strip().casefold())
        if wanted is not None:
            return number, wanted
    return None


async def referenced_request(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView
) -> tuple[RequestRef | None, str]:
    """The team's request this message answers: by subject first, then by its thread headers.

    A reference to another team's request, or to no request, gives ``None``: the original
    product then creates a new request, and so do we.
    """
    ref = referenced_number(msg.subject, ctx.mailbox.subject_pattern)
    if ref is not None:
        number, kind = ref
        found = await directory.request(number)
        if (
            found is not None
            and found.team_id == ctx.team.id
            and (kind is None or kind == found.type)
        ):
            return found, "subject"
        return None, "subject"
    ids = [i for i in (msg.in_reply_to, *reversed(msg.references)) if i]
    if ids:
        found = await directory.request_by_message_id(ids)
        if found is not None and found.team_id == ctx.team.id:
            return found, "thread"
    return await _referenced_by_body(msg, ctx, directory)


async def _referenced_by_body(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView
) -> tuple[RequestRef | None, str]:
    """The team's request a reference token in the body, else a foreign number, names."""
    by_token = referenced_by_token(msg, ctx)
    if by_token is not None:
        found = await directory.request(by_token)
        if found is not None and found.team_id == ctx.team.id:
            return found, "reference token"
    refs = foreign_numbers(msg, ctx)
    if refs:
        found = await directory.request_by_foreign_number(refs)
        if found is not None and found.team_id == ctx.team.id:
            return found, "foreign number"
    return None, ""


def referenced_by_token(msg: ParsedMessage, ctx: Context) -> int | None:
    """The request number a valid reference token in the body names (engine.parse.tokens)."""
    fmt = ctx.mailbox.handling.reference_token
    if fmt is None or ctx.reference_key is None:
        return None
    from engine.parse import tokens

    return tokens.find(msg.body, ctx.reference_key, fmt)


MAX_FOREIGN: Final = 20


def foreign_numbers(msg: ParsedMessage, ctx: Context) -> tuple[str, ...]:
    """The foreign ticket numbers (foreignTicketNumbers patterns) in the subject, in order,
    each once, at most :data:`MAX_FOREIGN`: ``ServiceNow:INC0012345``. Prefixed with the
    system's name, so that two systems' numbers never meet."""
    found: dict[str, None] = {}
    for p in ctx.mailbox.processing.foreign_patterns:
        for m in p.pattern.finditer(msg.subject):
            if m.group(0).strip():
                found[f"{p.system}:{m.group(0).strip()[:100]}"] = None
            if len(found) >= MAX_FOREIGN:
                return tuple(found)
    return tuple(found)


def kept_attachments(
    msg: ParsedMessage, ctx: Context
) -> tuple[tuple[Attachment, ...], tuple[str, ...]]:
    """The attachments to store, and a note for each one left out over a size limit.

    ``ignoredAttachments`` (names or globs, any case) drop silently, as in the original; a
    size limit never drops silently: the request says what was left out and why.
    """
    cfg = ctx.mailbox
    patterns = [p.casefold() for p in cfg.ignored_attachments]
    kept: list[Attachment] = []
    notes: list[str] = []
    total = 0
    for a in msg.attachments:
        if any(fnmatch.fnmatchcase(a.name.casefold(), p) for p in patterns):
            continue
        if ignored_by_content(a, ctx):
            continue
        size = len(a.data)
        if cfg.max_attachment_bytes is not None and size > cfg.max_attachment_bytes:
            notes.append(
                f"Attachment {a.name!r} ({size} bytes) was left out: it is larger than "
                f"maxAttachmentBytes ({cfg.max_attachment_bytes} bytes)."
            )
            continue
        if cfg.max_attachments_bytes is not None and total + size > cfg.max_attachments_bytes:
            notes.append(
                f"Attachment {a.name!r} ({size} bytes) was left out: the message's attachments "
                f"would pass maxAttachmentsBytes ({cfg.max_attachments_bytes} bytes)."
            )
            continue
        total += size
        kept.append(a)
    if cfg.include_raw_message:
        from engine.parse import safe_filename

        name = safe_filename(msg.subject[:80] + ".eml" if msg.subject else None, "message.eml")
        kept.append(Attachment(name=name, content_type="message/rfc822", data=msg.raw))
    return tuple(kept), tuple(notes)


def ignored_by_content(a: Attachment, ctx: Context) -> bool:
    """``ignoredAttachmentRules``: an inline image under the size, or a listed SHA-256."""
    h = ctx.mailbox.handling
    if (
        h.ignored_images_below
        and a.content_id is not None
        and a.inline
        and a.content_type.startswith("image/")
        and len(a.data) < h.ignored_images_below
    ):
        return True
    return bool(h.ignored_sha256) and hashlib.sha256(a.data).hexdigest() in h.ignored_sha256


def with_notes(text: str, notes: tuple[str, ...]) -> str:
    return text + ("\n\n" + "\n".join(notes) if notes else "")


# Where quoted history starts in a reply: a ">" line, the attribution line of most clients
# (English, French, German, Spanish), or Outlook's header block and separator. Searched as
# "\n" plus the line, in "\n" plus the body: a pattern that starts with a literal lets the
# regex engine skip to each newline, where "^" in MULTILINE mode tries every position (2.5
# times slower on the bench mixes' bodies). tests/test_processors.py holds it equal to
# QUOTE_START_LINE, the pattern as an operator would write it.
QUOTE_START_LINE = (
    r"(?:>"
    r"|On .{1,200}wrote:\s*$"
    r"|Le .{1,200}a écrit\s*:\s*$"
    r"|Am .{1,200}schrieb .{0,200}:\s*$"
    r"|El .{1,200}escribió:\s*$"
    r"|-{2,}\s*(?:Original Message|Message d'origine|Ursprüngliche Nachricht)\s*-{2,}"
    r"|_{10,}\s*$"
    r"|(?:From|De|Von):\s.+\n(?:.+\n){0,3}?(?:Sent|Envoyé|Gesendet|Date):\s)"
)
_QUOTE_START = re.compile("\n" + QUOTE_START_LINE, re.IGNORECASE | re.MULTILINE)
QUOTE_SEPARATOR = "\n\n――――― earlier messages (quoted) ―――――\n"


def split_quoted(body: str) -> tuple[str, str]:
    """(new text, quoted history) of a reply. No quote found: all of it is new."""
    m = _QUOTE_START.search("\n" + body)
    if m is None:
        return body.strip("\n"), ""
    start = m.start()  # where the quote's line starts in body (the added "\n" is one char)
    new, quoted = body[:start].rstrip(), body[start:].strip("\n")
    if not new:  # a reply that only quotes (or bottom-posts after the quote) keeps it all
        return body.strip("\n"), ""
    return new, quoted


def activity_body(body: str) -> str:
    """New text first; the quoted history kept, after a separator agents learn to skip."""
    new, quoted = split_quoted(body)
    return new + (QUOTE_SEPARATOR + quoted if quoted else "")


def is_auto_reply(msg: ParsedMessage) -> bool:
    """An out-of-office or other automatic answer (not an alert a monitor generated)."""
    reason = (msg.auto_reason or "").lower()
    return msg.is_bounce or reason.startswith(
        ("auto-submitted: auto-replied", "x-autoreply", "x-autorespond", "precedence: auto_reply")
    )


def sender_label(msg: ParsedMessage) -> str:
    return msg.from_name or msg.from_addr or "(unknown sender)"


def activity_for(msg: ParsedMessage, ctx: Context, request: RequestRef, via: str) -> AddActivity:
    attachments, notes = kept_attachments(msg, ctx)
    return AddActivity(
        request=request,
        author=sender_label(msg),
        body=with_notes(activity_body(msg.body), (*msg.notes, *notes)),
        attachments=attachments,
        reopen=request.status in CLOSED_STATUSES,
        automatic=msg.is_bounce or msg.auto_submitted,
        via=via,
    )
