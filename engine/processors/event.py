"""The event processor (``…EventMailMessageProcessor``): monitoring mail such as SCOM alerts.

Monitoring systems send automated mail by design, so unlike the incident processor an
``Auto-Submitted`` message still creates an event; only the reply rules stay strict.

Alert correlation (Zammad's monitoring mode, Znuny's SystemMonitoring): mail a recogniser
of :mod:`engine.processors.alerts` reads is keyed by (source, host, service or alert id), and
there is at most one open event per key:

- a problem with an open event adds an activity to it (a repeat);
- a recovery closes the open event with an activity that says so; a recovery with nothing
  open opens nothing and is recorded in the ledger (``ignored: recovery …``);
- an acknowledgement adds an activity to the open event (recorded only if none is open);
- a problem within ``flappingMinutes`` of the key's last recovery reopens that event
  (``flapping`` reopen) or adds an activity to it while it stays closed (activity), so a
  flapping check makes one event, not hundreds;
- any other problem opens a new event carrying the key and the state.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from engine.model import CLOSED_STATUSES, CorrelatedEvent, DirectoryView, ParsedMessage
from engine.processors import AddActivity, Context, Decision, Ignore, NewRequest, Refuse
from engine.processors.alerts import Alert, recognise
from engine.processors.common import (
    activity_body,
    activity_for,
    foreign_numbers,
    kept_attachments,
    referenced_request,
    sender_label,
    with_notes,
)


async def decide(msg: ParsedMessage, ctx: Context, directory: DirectoryView) -> Decision:
    correlation = ctx.mailbox.processing.correlation
    alert = recognise(msg, correlation.recognisers) if correlation.enabled else None
    if alert is not None:
        return await correlate(msg, ctx, directory, alert)
    request, via = await referenced_request(msg, ctx, directory)
    if request is not None:
        return activity_for(msg, ctx, request, via)
    return await new_event(msg, ctx, directory)


async def new_event(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView, alert: Alert | None = None
) -> Decision:
    """A new event (correlated: carrying the alert's key and state)."""
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
        priority=ctx.mailbox.processing.priority,
        foreign_numbers=foreign_numbers(msg, ctx),
        correlation_key=None if alert is None else alert.key,
        alert_state=None if alert is None else alert.state,
    )


async def correlate(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView, alert: Alert
) -> Decision:
    """What an alert does to the events of its key (see the module's docstring)."""
    found = await directory.correlated_event(alert.key)
    is_open = found is not None and found.request.status not in CLOSED_STATUSES
    if found is not None and found.request.team_id != ctx.team.id:
        found, is_open = None, False  # another team's event is not ours to touch
    if alert.phase == "recovery":
        if found is None or not is_open:
            return Ignore(f"recovery with no open event ({alert.key})")
        return _activity(msg, ctx, found, alert, close=f"Recovered: {alert.describe()}.")
    if found is not None and is_open:
        return _activity(msg, ctx, found, alert)
    if alert.phase == "acknowledgement":
        return Ignore(f"acknowledgement with no open event ({alert.key})")
    if found is not None and _flapping(found, ctx):
        reopen = ctx.mailbox.processing.correlation.flapping == "reopen"
        return _activity(msg, ctx, found, alert, reopen=reopen)
    return await new_event(msg, ctx, directory, alert)


def _flapping(found: CorrelatedEvent, ctx: Context) -> bool:
    """Whether the key's event closed within the flapping window."""
    minutes = ctx.mailbox.processing.correlation.flapping_minutes
    if not minutes or found.closed_at is None:
        return False
    now = ctx.now or datetime.now(UTC)
    closed = found.closed_at if found.closed_at.tzinfo else found.closed_at.replace(tzinfo=UTC)
    return now - closed <= timedelta(minutes=minutes)


def _activity(
    msg: ParsedMessage,
    ctx: Context,
    found: CorrelatedEvent,
    alert: Alert,
    *,
    close: str | None = None,
    reopen: bool = False,
) -> AddActivity:
    attachments, notes = kept_attachments(msg, ctx)
    what = {
        "problem": "Still a problem",
        "recovery": "Recovered",
        "acknowledgement": "Acknowledged",
        "info": "Update",
    }[alert.phase]
    head = f"{what}: {alert.describe()} (correlation key {alert.key})."
    return AddActivity(
        request=found.request,
        author=sender_label(msg),
        body=with_notes(head + "\n\n" + activity_body(msg.body), (*msg.notes, *notes)),
        attachments=attachments,
        reopen=reopen,
        automatic=True,
        via="correlation",
        close=close,
        state=alert.state,
    )
