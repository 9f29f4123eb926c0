"""Outage events: one per mailbox and cause while the mailbox cannot be read.

A pure decision, from how a session of the mailbox ended and the mailbox's open outage
events (the writer looks them up), to what the writer applies:

- the session worked: every open outage event of the mailbox closes, saying so;
- it failed for a cause with an open event: that event gets a note (one event per cause,
  however long it lasts, never one per poll);
- it failed for a new cause: a new event, with the configuration the engine read attached,
  rebuilt from its settings with every password masked (nothing when the file did not load
  as a configuration: it may then hold anything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from engine.config import MailboxConfig, mailbox_copy
from engine.errors import EngineError
from engine.model import Attachment
from engine.processors import AddNote, Close, EventDecision, NewEvent


def decide(
    mailbox: str,
    error: EngineError | None,
    open_events: Mapping[str, int],
    *,
    team: str | None,
    config: MailboxConfig | None,
    file_name: str,
    now: datetime,
) -> list[EventDecision]:
    """What the end of a session of ``mailbox`` does to its outage events. ``open_events``:
    the open ones, by cause; ``team``: the mailbox's team; ``config``: its configuration as
    loaded (None: it did not load); ``file_name``: its file's name."""
    if error is None:
        return [
            Close(
                number,
                cause,
                note=f"Mailbox {mailbox} works again; this {cause} outage is over.",
                why="Closed: the mailbox works again.",
            )
            for cause, number in open_events.items()
        ]
    reason = cause(error)
    stamp = now.isoformat(timespec="seconds")
    if reason in open_events:
        return [AddNote(open_events[reason], f"{stamp}: still failing: {error}")]
    copy: tuple[Attachment, ...] = ()
    if config is not None:
        copy = (Attachment(file_name or "config.xml", "application/xml", mailbox_copy(config)),)
    return [
        NewEvent(
            kind="outage",
            team=team,
            mailbox=mailbox,
            cause=reason,
            subject=f"Mail integration: mailbox {mailbox} cannot be read ({reason})",
            description=(
                f"Since {stamp} the mailbox {mailbox} cannot be read.\n\n"
                f"What went wrong: {error}\nCause: {reason}\n"
                f"What to check: {getattr(error, 'hint', '')}\n\n"
                f"{_copy_note(config)} Messages stay on the server until the "
                "mailbox works again; this event closes by itself then."
            ),
            attachments=copy,
        )
    ]


# The cause of a warning event (engine.oauth.health): an outage event that no working
# session closes, raised once per warning key.
WARNING_PREFIX = "warning:"


def warn(
    mailbox: str,
    warnings: Sequence[tuple[str, str]],
    raised: Mapping[str, int],
    *,
    team: str | None,
    now: datetime,
) -> list[NewEvent]:
    """The warning events to raise: one per warning whose cause (``warning:KEY``) has none
    yet (``raised``: the mailbox's outage events of those causes, open or closed)."""
    stamp = now.isoformat(timespec="seconds")
    return [
        NewEvent(
            kind="outage",
            team=team,
            mailbox=mailbox,
            cause=WARNING_PREFIX + key,
            subject=f"Mail integration: mailbox {mailbox}: OAuth2 sign-in will fail soon",
            description=(
                f"{stamp}: {text}\n\nMail is still read; this warning is raised once, before "
                "the sign-in fails. Close this event once it is done."
            ),
        )
        for key, text in warnings
        if WARNING_PREFIX + key not in raised
    ]


def failing(open_events: Mapping[str, int]) -> dict[str, int]:
    """The open outage events a working session closes: not the warnings."""
    return {c: n for c, n in open_events.items() if not c.startswith(WARNING_PREFIX)}


def cause(error: BaseException) -> str:
    """The cause an outage is opened under: one event per mailbox and cause."""
    return str(getattr(error, "cause", "error"))


def _copy_note(config: MailboxConfig | None) -> str:
    """What an outage event says of the configuration attached, or of why none is."""
    if config is not None:
        return (
            "The mailbox's configuration is attached as the engine read it, rebuilt from its "
            "settings with every password removed."
        )
    return (
        "No copy of the configuration is attached: the file could not be read as a mailbox "
        "configuration, and the engine only ever attaches one it has read (a file that is "
        "not one may hold anything)."
    )
