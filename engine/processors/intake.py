"""What a new request must pass before it is made, whatever the processor (issue 20):

- **several mailboxes**: a message already made a request in another of our mailboxes
  (same Message-ID). ``onePerTeam``: a copy in a mailbox of the same team makes none;
  ``oneOverall``: a copy anywhere makes none. The copy is recorded against the first
  request (an :class:`~engine.processors.Ignore` naming it).
- **flood**: a sender, or one message fingerprint, that already made ``floodMessages``
  requests in ``floodMinutes`` in this mailbox: the message becomes an activity on the
  newest of them instead of a request.
- **watchers**: the To/Cc addresses of the message, other than the sender and our own
  addresses, kept on the request (and added by a reply).

Pure decisions over the read-only directory view, which reads the store inside the
writer's transaction: the answer is the same whenever the transaction is done again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from engine.model import DirectoryView, Origin, ParsedMessage, Watcher
from engine.processors import AddActivity, Context, Decision, Ignore, NewRequest, replaced
from engine.processors.common import activity_body, sender_label, with_notes

MAX_WATCHERS: Final = 50
"""Watchers taken from one message: a Cc of 20,000 addresses must not become 20,000 rows."""


def fingerprint(msg: ParsedMessage) -> str:
    """A digest of what a message says (engine.parse.fingerprint): the one the parse stage
    computed, else (a message not made by the parser, in tests) computed here."""
    if msg.fingerprint:
        return msg.fingerprint
    from engine.parse import fingerprint as text  # see engine.session's imports of parse

    return text.fingerprint(msg.subject, msg.body)


async def watchers(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView
) -> tuple[Watcher, ...]:
    """The To/Cc addresses to keep on the request, in order, each once, at most
    :data:`MAX_WATCHERS`: a directory user by id, any other address as unknown."""
    handling = ctx.mailbox.handling
    if not handling.watchers:
        return ()
    skip = set(handling.own_addresses) | {msg.from_addr.lower()}
    out: dict[str, Watcher] = {}
    for address in (*msg.to, *msg.cc):
        key = address.strip().lower()
        if "@" not in key or key in skip or key in out or len(key) > 254:
            continue
        user = await directory.user_by_email(key)
        out[key] = Watcher(key, user.id if user is not None else None)
        if len(out) >= MAX_WATCHERS:
            break
    return tuple(out.values())


async def apply(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView, decision: Decision
) -> Decision:
    """The decision after the several-mailboxes policy, the flood limit and the watchers."""
    if isinstance(decision, AddActivity):
        if ctx.mailbox.processor == "event":
            return decision
        return replaced(decision, watchers=await watchers(msg, ctx, directory))
    if not isinstance(decision, NewRequest):
        return decision
    if (copy := await _copy_of(msg, ctx, directory)) is not None:
        return copy
    origin = Origin(
        mailbox=ctx.mailbox.name,
        team_id=ctx.team.id,
        sender=msg.from_addr.lower(),
        fingerprint=fingerprint(msg),
        message_id=msg.message_id,
    )
    if ctx.mailbox.processor == "event":
        # Alerts have their own collapsing (correlation); a monitor may send many.
        return replaced(decision, origin=origin)
    flooded = await _flooded(msg, ctx, directory, origin, decision)
    if flooded is not None:
        return flooded
    found = {w.address: w for w in (*decision.watchers, *await watchers(msg, ctx, directory))}
    return replaced(decision, origin=origin, watchers=tuple(found.values()))


async def _copy_of(msg: ParsedMessage, ctx: Context, directory: DirectoryView) -> Ignore | None:
    if not msg.message_id:
        return None
    policy = ctx.mailbox.handling.several_mailboxes
    for request, mailbox in await directory.origins(msg.message_id):
        if mailbox == ctx.mailbox.name:
            continue
        if policy == "one-overall" or request.team_id == ctx.team.id:
            scope = "of any team" if policy == "one-overall" else "of the same team"
            return Ignore(
                f"already request #{request.number} from mailbox {mailbox} ({scope})",
                request_number=request.number,
                also=f"The same message (Message-ID <{msg.message_id}>) was also delivered "
                f"to mailbox {ctx.mailbox.name}.",
            )
    return None


async def _flooded(
    msg: ParsedMessage,
    ctx: Context,
    directory: DirectoryView,
    origin: Origin,
    decision: NewRequest,
) -> AddActivity | None:
    h = ctx.mailbox.handling
    if h.flood_messages <= 0 or not msg.from_addr or ctx.historic:
        return None
    since = (ctx.now or datetime.now(UTC)) - timedelta(minutes=h.flood_minutes)
    count, newest = await directory.flood(origin.mailbox, origin.sender, origin.fingerprint, since)
    if count < h.flood_messages or newest is None:
        return None
    request = await directory.request(newest)
    if request is None:
        return None
    note = (
        f"(Flood protection: {msg.from_addr} or this same text made {count} requests in the "
        f"last {h.flood_minutes} minutes in mailbox {ctx.mailbox.name}; this message was "
        f"added here instead of making another.)"
    )
    body = f"{note}\n\nSubject: {msg.subject}\n\n{activity_body(msg.body)}"
    return AddActivity(
        request=request,
        author=sender_label(msg),
        body=with_notes(body, msg.notes),
        attachments=decision.attachments,
        reopen=False,
        via="flood",
        matched_rules=decision.matched_rules,
    )
