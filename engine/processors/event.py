"""The event processor (``…EventMailMessageProcessor``): monitoring mail such as SCOM alerts.

Monitoring systems send automated mail by design, so unlike the incident processor an
``Auto-Submitted`` message still creates an event; only the reply rules stay strict.
"""

from __future__ import annotations

from engine.model import DirectoryView, ParsedMessage
from engine.processors import Context, Decision, NewRequest, Refuse
from engine.processors.common import (
    activity_for,
    kept_attachments,
    referenced_request,
    with_notes,
)


async def decide(msg: ParsedMessage, ctx: Context, directory: DirectoryView) -> Decision:
    request, via = await referenced_request(msg, ctx, directory)
    if request is not None:
        return activity_for(msg, ctx, request, via)
    if not ctx.mailbox.create_new_requests:
        return Refuse(
            "new requests are not allowed in this mailbox",
            reply=False,
            no_reply_because="event mailboxes never reply",
        )
    requester = await directory.user_by_email(msg.from_addr)
    if requester is None and ctx.mailbox.fallback_user:
        requester = await directory.user_by_login(ctx.mailbox.fallback_user)
    assignee = await directory.user_by_login(ctx.mailbox.assignee) if ctx.mailbox.assignee else None
    attachments, notes = kept_attachments(msg, ctx)
    return NewRequest(
        type="event",
        subject=msg.subject or "(no subject)",
        description=with_notes(msg.body, (*msg.notes, *notes)),
        html=msg.html,
        requester=requester,
        site=(requester.site if requester else None) or ctx.mailbox.fallback_site,
        group=ctx.mailbox.group or ctx.team.default_group,
        assignee=assignee,
        source=ctx.mailbox.source,
        attachments=attachments,
        notes=notes,
    )
