"""What a session does with each message a server lists, given what the ledger holds of it.

Pure decisions over a listing and ledger rows (:func:`plan_session`), the same whatever the
gateway. A message the ledger already holds is disposed of again only once it is known to be
the same message: the same listed size, and the same Message-ID in its header
(:func:`header_message_id`) where the server can send the header alone; otherwise it is
fetched and its hash compared, and a different message under a reused key is processed under
a key of its own. A message that cannot be taken whole (over ``maxMessageBytes``, larger than
listed, a line over the limit) is left on the server, and later sessions leave it alone.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from engine.config import MailboxConfig
from engine.gateways import HEADER_BYTES, Listed, Request, read_cap
from engine.model import LedgerRow

# The fetcher's logger, as before the session had a module of its own: operators filter on it.
log = logging.getLogger("engine.session")


@dataclass(frozen=True)
class Todo:
    """A listed message to read: its request (None: nothing to read, see plan_session) and,
    for a key the ledger already holds, that row, to tell the same message from another
    one under a reused key once it is read."""

    listed: Listed
    request: Request | None
    verify: LedgerRow | None = None
    needed: int = 0  # what an earlier session found it needs, when more than listed

    @property
    def expected(self) -> int:
        """The bytes it should bring: its listed size (or what it was found to need), at
        most its cap. Windows, the byte budget and the session deadline count on it."""
        if self.request is None:
            return 0
        return min(max(self.listed.size, self.needed), self.request.cap)


@dataclass
class Plan:
    """What a session does with each listed message, given what the ledger holds."""

    todo: list[Todo] = field(default_factory=list)
    # Known, and the same by their listed size: disposed of without being fetched.
    delete: list[tuple[Listed, LedgerRow]] = field(default_factory=list)
    # Known, the same size: disposed of once their header's Message-ID matches the ledger's.
    by_header: list[tuple[Listed, LedgerRow]] = field(default_factory=list)
    # Known and left alone: left on the server before (still too large, a line too long),
    # or now listed over maxMessageBytes.
    skipped: int = 0


def plan_session(
    cfg: MailboxConfig, listing: list[Listed], known: dict[str, LedgerRow], *, top: bool | None
) -> Plan:
    """Sort the listing (``top``: whether the server can send a header alone; None if a
    POP3 server has no CAPA, and then TOP is never sent: an -ERR to it would end every
    session)."""
    plan = Plan()
    for m in listing:
        row = known.get(m.uidl) if m.uidl is not None else None
        if row is None:
            _plan_new(plan, m, cfg.max_message_bytes, top)
        else:
            _plan_known(plan, cfg, m, row, top)
    return plan


def _plan_new(plan: Plan, m: Listed, limit: int, top: bool | None) -> None:
    """A message the ledger does not hold: read it, or only its header when it is listed
    over ``limit`` (for its failure event; it stays on the server)."""
    if m.size <= limit:
        plan.todo.append(Todo(m, Request(m.number, read_cap(m.size, limit))))
    else:
        header = Request(m.number, HEADER_BYTES, headers_only=True)
        plan.todo.append(Todo(m, header if top else None))


def _plan_known(
    plan: Plan, cfg: MailboxConfig, m: Listed, row: LedgerRow, top: bool | None
) -> None:
    """A message whose key the ledger holds: left alone, taken whole at last, disposed of
    once known to be the same, or read to compare its hash."""
    limit = cfg.max_message_bytes
    if row.kept and row.size == m.size:
        if row.outcome == "kept: line-too-long" or max(row.needed or 0, m.size) > limit:
            plan.skipped += 1
        else:  # maxMessageBytes was raised, or it was larger than listed: take it whole
            plan.todo.append(Todo(m, Request(m.number, limit), needed=row.needed or 0))
    elif m.size > limit:
        log.warning(
            "mailbox=%s uidl=%s is in the ledger, but listed at %d bytes, over "
            "maxMessageBytes (%d): it cannot be checked, and is left on the server",
            cfg.name,
            m.uidl,
            m.size,
            limit,
        )
        plan.skipped += 1
    elif row.size == m.size and not row.kept:
        (plan.by_header if top else plan.delete).append((m, row))
    else:  # another size, or a row older than sizes: fetch it and compare its hash
        plan.todo.append(Todo(m, Request(m.number, read_cap(m.size, limit)), row))


_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*((?:.*)(?:\r?\n[ \t].*)*)")
_ANGLE_ID = re.compile(rb"<([^<>\s]{1,998})>")


def header_message_id(head: bytes) -> str | None:
    """The Message-ID of a message's header block (``TOP n 0``), as the parser reads one
    (an id in angle brackets): compared with the ledger's before a known message is deleted
    unfetched. A spelling the two read differently costs a RETR, nothing more."""
    block = head.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    field_ = _MESSAGE_ID.search(block)
    ident = _ANGLE_ID.search(field_.group(1)) if field_ else None
    return ident.group(1).decode("utf-8", "replace") if ident else None
