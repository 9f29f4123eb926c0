"""The end-user incident processor (``…EndUserIncidentMailMessageProcessor``)."""

from __future__ import annotations

from engine.errors import MessageError
from engine.model import DirectoryView, ParsedMessage, User, Watcher
from engine.parse import forwards
from engine.processors import Context, Decision, Ignore, NewRequest, Refuse, bounces
from engine.processors.common import (
    activity_for,
    foreign_numbers,
    is_auto_reply,
    kept_attachments,
    referenced_request,
    sender_label,
    with_notes,
)


class UnknownFallbackUser(MessageError):
    cause = "unknown-fallback-user"
    hint = (
        "The sender is not a user of the directory and incidentFallbackUserLogon names no "
        "user either. Import the user, or fix incidentFallbackUserLogon in the mailbox config."
    )


async def before_new_request(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView
) -> Decision | None:
    """What an end-user mailbox (incident or service request) decides before a new request
    is even considered: an activity on the request the mail refers to, an auto-reply ignored,
    or a refusal where new requests are not allowed; None when a new request it is."""
    if (bounce := await bounces.decide(msg, ctx, directory)) is not None:
        return bounce
    request, via = await referenced_request(msg, ctx, directory)
    if request is not None:
        return activity_for(msg, ctx, request, via)
    if is_auto_reply(msg):
        # A bounce or out-of-office answer to nothing we know must never become a ticket.
        return Ignore("auto-reply")
    if not ctx.mailbox.create_new_requests:
        return refuse(msg, ctx)
    return None


async def decide(msg: ParsedMessage, ctx: Context, directory: DirectoryView) -> Decision:
    if (early := await before_new_request(msg, ctx, directory)) is not None:
        return early
    original = await forwarded(msg, ctx, directory)
    user = await requester(msg, ctx, directory, original[1] if original else None)
    assignee = await directory.user_by_login(ctx.mailbox.assignee) if ctx.mailbox.assignee else None
    attachments, notes = kept_attachments(msg, ctx)
    watchers: tuple[Watcher, ...] = ()
    if original is not None:
        forwarder = await directory.user_by_email(msg.from_addr)
        watchers = (Watcher(msg.from_addr.lower(), forwarder.id if forwarder else None),)
        notes = (
            *notes,
            f"Forwarded by {sender_label(msg)} <{msg.from_addr}>; the requester "
            f"is the original sender, {original[1]}.",
        )
    return NewRequest(
        type="incident",
        subject=msg.subject or "(no subject)",
        description=with_notes(msg.body, (*msg.notes, *notes)),
        watchers=watchers,
        html=msg.html,
        requester=user,
        site=user.site or ctx.mailbox.fallback_site,
        group=ctx.mailbox.group or ctx.team.default_group,
        assignee=assignee,
        source=ctx.mailbox.source,
        attachments=attachments,
        notes=notes,
        priority=ctx.mailbox.processing.priority,
        foreign_numbers=foreign_numbers(msg, ctx),
    )


def refuse(msg: ParsedMessage, ctx: Context) -> Refuse:
    """No new request here: an automatic reply says so, unless it would answer a machine."""
    reason = "new requests are not allowed in this mailbox"
    if msg.auto_submitted or not msg.from_addr:
        return Refuse(reason, reply=False, no_reply_because=msg.auto_reason or "no sender")
    return Refuse(reason, reply=ctx.mailbox.smtp is not None, no_reply_because=None)


async def requester(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView, address: str | None = None
) -> User:
    """The sender (or ``address``: a forward's original sender) as a user of the directory,
    else the mailbox's fallback user."""
    address = address or msg.from_addr
    user = await directory.user_by_email(address)
    if user is None:
        login = ctx.mailbox.fallback_user
        user = await directory.user_by_login(login) if login else None
        if user is None:
            raise UnknownFallbackUser(
                f"the sender {address or '(none)'} is unknown and the fallback user "
                f"{login or '(not configured)'} does not exist"
            )
    return user


async def forwarded(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView
) -> tuple[str, str] | None:
    """(name, address) of the original sender when ``msg`` forwards a message and the
    mailbox takes forwards from its sender (``mailHandling/forwards``: by default only from
    agents, the directory's users who can sign in); else None."""
    mode = ctx.mailbox.handling.forwards
    if mode == "off" or not msg.from_addr:
        return None
    if mode == "agents":
        # Asked first: the directory lookup is cached (requester() makes it anyway), the
        # search for a forward block in the body is not, and most senders are not agents.
        sender = await directory.user_by_email(msg.from_addr)
        if sender is None or not sender.agent:
            return None
    found = forwards.original_sender(msg.subject, msg.body, msg.attachments)
    if found is None or found[1] == msg.from_addr.lower():
        return None
    return found
