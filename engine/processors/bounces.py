"""Bounces (issue 20): a bounce, a structured DSN or a plain one, that names a request
becomes an automatic activity on it, and a permanent failure (5.x.x) marks its recipients
undeliverable, so that no automatic reply goes to them again.

A bounce names a request by (first match wins): the subject's reference or its thread
headers (as any reply, :func:`~engine.processors.common.referenced_request`); the
Message-ID of the message that bounced, when a message we processed or a reply we sent
had it (the ledger, the outbox); a request reference in the bounce's text (the returned
message's subject). Whatever parsed the message as a bounce (``ParsedMessage.is_bounce``)
is enough: the details are read by :func:`engine.parse.dsn.read`.
"""

from __future__ import annotations

import dataclasses

from engine.model import DirectoryView, ParsedMessage, RequestRef
from engine.parse import dsn
from engine.processors import Context, Decision, Ignore
from engine.processors.common import activity_for, referenced_number, referenced_request

_BODY_CHARS = 65_536  # where a plain bounce quotes the returned message's subject


async def decide(msg: ParsedMessage, ctx: Context, directory: DirectoryView) -> Decision | None:
    """The decision on a bounce; None for a message that is not one. Besides what the
    parser calls a bounce, an automatic message (a system or null sender, say) whose text
    gives an enhanced status code is one: a plain bounce from an MTA without RFC 3464."""
    if not (msg.is_bounce or msg.auto_submitted):
        return None
    bounce = _what_it_says(msg)
    if not msg.is_bounce and bounce.status is None:
        return None
    marks: tuple[tuple[str, str, str], ...] = ()
    if bounce.permanent and bounce.status is not None:
        reason = (bounce.diagnostic or "permanent delivery failure")[:200]
        marks = tuple((a, bounce.status, reason) for a in bounce.recipients)
    request, via = await _request(msg, bounce, ctx, directory)
    if request is None:
        if not marks:
            return Ignore("auto-reply")
        return Ignore(
            f"bounce {bounce.status}: {len(marks)} address(es) undeliverable", undeliverable=marks
        )
    activity = activity_for(msg, ctx, request, via)
    failed = ", ".join(bounce.recipients) or "(recipient not given)"
    head = f"Delivery failed ({bounce.status or 'status not given'}) for {failed}."
    if marks:
        head += " No automatic reply will be sent to this address again."
    return dataclasses.replace(activity, body=f"{head}\n\n{activity.body}", undeliverable=marks)


def _what_it_says(msg: ParsedMessage) -> dsn.Bounce:
    """The parser's reading of a bounce (``bounce_*`` fields) first, what engine.parse.dsn
    reads of the raw message for what the parser left unsaid."""
    read = dsn.read(msg.raw)
    return dsn.Bounce(
        status=msg.bounce_status or read.status,
        recipients=msg.bounce_recipients or read.recipients,
        original_message_id=msg.bounce_message_id or read.original_message_id,
        diagnostic=read.diagnostic,
    )


async def _request(
    msg: ParsedMessage, bounce: dsn.Bounce, ctx: Context, directory: DirectoryView
) -> tuple[RequestRef | None, str]:
    request, via = await referenced_request(msg, ctx, directory)
    if request is not None:
        return request, via
    if bounce.original_message_id is not None:
        found = await directory.request_by_message_id([bounce.original_message_id])
        if found is not None and found.team_id == ctx.team.id:
            return found, "bounced Message-ID"
    ref = referenced_number(msg.body[:_BODY_CHARS], ctx.mailbox.subject_pattern)
    if ref is not None:
        found = await directory.request(ref[0])
        if found is not None and found.team_id == ctx.team.id and ref[1] in (None, found.type):
            return found, "bounce text"
    return None, ""
