"""The single writer: the only code that touches the store.

A runner, after GNU Mailman 3's ``core/runner.py``: the loop owns the commit and the safety
net, and each kind of item has one handler (:attr:`Writer.handlers`) that only does its work
inside the transaction it is given. The loop is

1. **gather** (:meth:`Writer._gather`): whatever waits on the queue joins the batch, and while
   messages keep coming a short linger gathers more (group commit);
2. **one transaction** (:class:`TwoPassCommit`): each item's handler, in order, then COMMIT;
   a message that fails becomes a failure event in the same transaction as its ledger row;
3. **acknowledge** (:meth:`Writer.apply`): only after the commit is each item answered
   (``done``); then a message's bytes are let go and its ``on_done`` called.

A session deletes a message from the server only once its answer says the outcome is durable.
The items and their promises are in :mod:`engine.items`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from engine.config import MailboxConfig, directory_needs
from engine.errors import DirectoryError, MessageKept, StoreError
from engine.items import (
    DirectoryCheck,
    Envelope,
    Item,
    Kind,
    KnownQuery,
    OutboxFetch,
    OutboxResult,
    Outcome,
    SessionReport,
)
from engine.keys import imap_key_parts
from engine.model import LedgerRow, Team
from engine.ops import Metrics
from engine.store.base import Store, Transaction

if TYPE_CHECKING:
    from engine import reply
    from engine.processors import (
        AddActivity,
        Context,
        Decision,
        EventDecision,
        NewRequest,
        Refuse,
    )

# engine.processors (its decision types, ~6 ms of imports with the modules the writer uses)
# is imported by the first message or outage, not at start: a cron `once` over mailboxes that
# hold nothing and work makes no decision.

log = logging.getLogger("engine.writer")


@dataclass(frozen=True)
class ReplyLimits:
    """How many automatic replies may be recorded, counted over every mailbox of the store.

    Per address per day: RFC 3834 asks to answer one sender at most once in a while (Znuny
    allows 40 a day; five is plenty for "this mailbox takes no requests"). The address is
    normalized first (case, +tag, quotes, IDNA), or victim+1@, victim+2@... each got five.
    Per domain per hour: a forged campaign at one domain through distinct local parts; 20 is
    more than a desk gets from one company's people in an hour. Per mailbox per hour: what the
    desk may reflect at all, one a minute on average.
    """

    per_address_per_day: int = 5
    per_domain_per_hour: int = 20
    per_mailbox_per_hour: int = 60


@dataclass
class WriterStats:
    transactions: int = 0
    outcomes: Counter[Kind] = field(default_factory=Counter)


@dataclass(eq=False)
class Work:
    """One pass of a transaction, as its handlers see it: the store's transaction, and what
    the writer read ahead for the batch. A rolled-back pass is thrown away whole."""

    tx: Transaction
    # With a savepoint per message (the second pass of TwoPassCommit).
    careful: bool
    # (account, uidl) in the ledger; and those whose message was left on the server (a later
    # session may take it whole: see Writer._ledger).
    recorded: set[tuple[str, str]] = field(default_factory=set)
    kept: dict[tuple[str, str], LedgerRow] = field(default_factory=dict)
    # IMAP messages not in the ledger by key: the keys the ledger holds for their content
    # hash, by (account, sha256) (see _renumbered).
    by_hash: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    replies: int = 0  # automatic replies recorded (the outbox is woken after the commit)
    # The processors' Context of each mailbox (by id: its config outlives the pass) and kind
    # of run: one per batch, not one per message (a frozen dataclass costs ~5 us to make).
    contexts: dict[tuple[int, bool], Context] = field(default_factory=dict)


Handler = Callable[[Work, Any], Awaitable[None]]


class _Decided(NamedTuple):
    """What a processor decided for a message, and the team it decided for."""

    team: Team
    decision: Decision


def _sha256(env: Envelope) -> str:
    return env.parsed.sha256 if env.parsed is not None else hashlib.sha256(env.raw).hexdigest()


async def _read_renumbered(work: Work, batch: list[Item]) -> None:
    """For the batch's IMAP messages whose key the ledger does not hold, the keys it holds
    for their content (one query per account): see :func:`_renumbered`."""
    wanted: dict[str, set[str]] = {}
    for item in batch:
        if (
            isinstance(item, Envelope)
            and not item.dry_run
            and imap_key_parts(item.uidl) is not None
            and (item.account, item.uidl) not in work.recorded
        ):
            wanted.setdefault(item.account, set()).add(_sha256(item))
    for account, shas in wanted.items():
        for sha, keys in (await work.tx.ledger_keys_by_sha256(account, sorted(shas))).items():
            work.by_hash[account, sha] = keys


async def _read_origins(tx: Transaction, batch: list[Item]) -> None:
    """Where the requests came from that the batch's new messages may be a flood or a copy
    of (engine.processors.intake), in one query for the batch. Senders and fingerprints only
    for the messages the flood limit applies to (intake._flooded): with it off, they were
    every request of the batch's senders in the window, read for nothing."""
    boxes: set[str] = set()
    keys: set[str] = set()
    mids: set[str] = set()
    minutes = 0
    for item in batch:
        if isinstance(item, Envelope) and item.parsed is not None and not item.dry_run:
            msg = item.parsed
            handling = item.mailbox.handling
            if handling.flood_messages > 0 and item.historic is None:
                from engine.processors import intake

                boxes.add(item.mailbox.name)
                keys.update((msg.from_addr.lower(), intake.fingerprint(msg)))
                minutes = max(minutes, handling.flood_minutes)
            if msg.message_id:
                mids.add(msg.message_id)
    if boxes or mids:
        await tx.read_ahead_origins(
            boxes, keys, mids, datetime.now(UTC) - timedelta(minutes=minutes + 1)
        )


async def _read_requests(tx: Transaction, batch: list[Item]) -> None:
    """The requests the batch's messages may name: by number in their subjects (one query),
    and by the Message-IDs of their threads and of the messages their bounces return (one
    query on the ledger and one on the outbox, not one or two per Message-ID)."""
    messages = [item.parsed for item in batch if isinstance(item, Envelope) and item.parsed]
    if not messages:
        return
    from engine.processors import referenced

    await tx.read_ahead(
        number
        for item in batch
        if isinstance(item, Envelope) and item.parsed is not None
        if (number := referenced(item.parsed, item.mailbox)) is not None
    )
    await tx.read_ahead_message_ids(
        mid
        for msg in messages
        for mid in (msg.in_reply_to, *msg.references, msg.bounce_message_id)
        if mid
    )


def _older(env: Envelope) -> Outcome | None:
    """A message of a historic import dated before its ``--since``: skipped, left on the
    server, nothing recorded (a later run without --since takes it). A message without a
    date is taken."""
    since = env.historic.since if env.historic is not None else None
    date = env.parsed.date if env.parsed is not None else None
    if since is None or date is None:
        return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    if date >= since:
        return None
    return Outcome(Kind.SKIPPED, f"older than --since {since.isoformat()}")


def _renumbered(work: Work, env: Envelope) -> bool:
    """Whether an IMAP message new by its key is one the ledger holds already under the
    same folder's former UIDVALIDITY, by its content hash: a server that rebuilt the folder
    renumbers every message in it, and none must be processed again. Within one UIDVALIDITY
    a UID is never reused (RFC 3501), so two messages with the same bytes there are two
    deliveries, processed each, as POP3 does with two UIDLs."""
    parts = imap_key_parts(env.uidl)
    if parts is None:
        return False
    folder, validity, _ = parts
    for key in work.by_hash.get((env.account, _sha256(env)), ()):
        old = imap_key_parts(key)
        if old is not None and old[0] == folder and old[1] != validity:
            log.info(
                "mailbox=%s uidl=%s is %s under the folder's former UIDVALIDITY (same "
                "content): not processed again",
                env.mailbox.name,
                env.uidl,
                key,
            )
            return True
    return False


class Writer:
    """Owns the store. Run :meth:`run` in the supervisor's task group."""

    def __init__(
        self,
        store: Store,
        *,
        created_by: str,
        default_team: str | None = None,
        max_batch: int = 256,
        max_batch_seconds: float = 2.0,
        min_batch: int = 128,
        linger: float = 0.02,
        reply_limits: ReplyLimits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.created_by = created_by
        self.default_team = default_team
        self.max_batch = max_batch
        self.max_batch_seconds = max_batch_seconds
        self.min_batch = min_batch
        self.linger = linger
        self.reply_limits = reply_limits or ReplyLimits()
        # Set by the supervisor with leases: mailbox -> (this replica, the lease's epoch).
        self.fences: Callable[[str], tuple[str, int]] | None = None
        # Told whether the store works: the last failure's text, or None after a commit.
        self.on_store: Callable[[str | None], None] | None = None
        self.stats = WriterStats()
        self.metrics = metrics
        # Called after a commit that recorded replies: the outbox's wake-up.
        self.on_reply: Callable[[], None] | None = None
        # The rate limits already logged as reached: (kind, key, window); logged once each.
        self._limits_logged: set[tuple[str, str, str]] = set()
        # The store's reference key (migration 7 made it; it never changes): read once.
        self._reference_key: str | None = None
        self._commit = TwoPassCommit(self)
        # One handler per kind of item: all a kind of item needs of the writer.
        self.handlers: Mapping[type[Item], Handler] = {
            Envelope: self._commit.message,
            KnownQuery: self._known_query,
            DirectoryCheck: self._directory_check,
            SessionReport: self._session_report,
            OutboxFetch: self._outbox_fetch,
            OutboxResult: self._outbox_result,
        }

    # -- the loop: gather -> one transaction -> acknowledge --------------------------------

    async def run(
        self,
        receive: MemoryObjectReceiveStream[Item],
        *,
        task_status: Any = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Drain the channel until every sender has closed its clone, then return."""
        task_status.started()
        async with receive:
            batch: list[Item] = []
            while True:
                if not batch:
                    try:
                        batch.append(await receive.receive())
                    except anyio.EndOfStream:
                        return
                await self._gather(batch, receive)
                if self.metrics is not None:
                    self.metrics.queue_depth.set(receive.statistics().current_buffer_used)
                batch = await self.apply(batch)

    async def _gather(self, batch: list[Item], receive: MemoryObjectReceiveStream[Item]) -> None:
        """Add what is waiting to ``batch``; with messages in it, wait up to ``linger`` for
        more while it is under ``min_batch``.

        A transaction has fixed costs whatever its size (BEGIN, the ledger query, an fsync for
        each attachment file and its folder, the executemany calls, COMMIT's fsync: ~15 ms
        here), so many small ones cost more than a few larger: measured, 2,000 messages went
        in 72-86 transactions of ~26, the commits taking 1.2 s. PostgreSQL's commit_delay is
        the same idea. A session's last message ends the wait: nothing more is coming from it
        (one message polled by the daemon is not held back for the linger).
        """
        deadline = anyio.current_time() + self.linger
        messages = any(isinstance(item, Envelope) and not item.last for item in batch)
        while len(batch) < self.max_batch:
            try:
                item = receive.receive_nowait()
            except anyio.EndOfStream:
                return
            except anyio.WouldBlock:
                remaining = deadline - anyio.current_time()
                if not messages or len(batch) >= self.min_batch or remaining <= 0:
                    return
                with anyio.move_on_after(remaining) as waited:
                    try:
                        item = await receive.receive()
                    except anyio.EndOfStream:
                        return
                if waited.cancelled_caught:
                    return
            batch.append(item)
            if isinstance(item, Envelope):
                messages = not item.last

    async def apply(self, batch: list[Item]) -> list[Item]:
        """One transaction for (the head of) the batch, then the answers; returns the rest
        (see :class:`TwoPassCommit` for the bound on a transaction's time).

        Every item of the transaction is answered, committed or not, cancellation included:
        a session that outlives the writer must never take a rolled-back message for a
        durable one.
        """
        started = time.monotonic()
        batch = self._unleased(batch)
        if not batch:
            return []
        try:
            work, batch, rest = await self._commit(batch, started)
        except BaseException as exc:
            not_committed = StoreError(f"the store could not commit: {exc!r}")
            for item in batch:
                item.failure = not_committed
            _acknowledge(batch)
            if not isinstance(exc, Exception):
                raise
            log.error("transaction of %d item(s) failed, nothing is deleted: %s", len(batch), exc)
            if self.on_store is not None:
                self.on_store(f"{type(exc).__name__}: {exc}")
            return []
        if self.on_store is not None:
            self.on_store(None)
        try:
            self._committed(batch, started)
        finally:
            _acknowledge(batch)
        if work.replies and self.on_reply is not None:
            self.on_reply()  # committed: the outbox may send them now
        return rest

    def _unleased(self, batch: list[Item]) -> list[Item]:
        """Answer at once, "not committed", the messages and reports of mailboxes whose
        lease this replica no longer holds (it knows): they would fail the fence of the whole
        transaction. Their session stops without deleting; the new owner redoes them."""
        if self.fences is None:
            return batch
        fences = self.fences
        keep: list[Item] = []
        for item in batch:
            name = (
                item.mailbox.name
                if isinstance(item, Envelope)
                else item.name
                if isinstance(item, SessionReport)
                else None
            )
            if name is not None and fences(name)[1] < 0:
                item.failure = StoreError(f"the lease of mailbox {name} was lost")
                _acknowledge([item])
            else:
                keep.append(item)
        return keep

    def _committed(self, batch: list[Item], started: float) -> None:
        """Count a committed transaction, and log and count its messages."""
        self.stats.transactions += 1
        if self.metrics is not None:
            self.metrics.transactions.inc()
            self.metrics.batch_size.observe(len(batch))
            self.metrics.commit_seconds.observe(time.monotonic() - started)
        for item in batch:
            if isinstance(item, Envelope):
                self._account(item)

    def _account(self, env: Envelope) -> None:
        """Log and count one committed message."""
        cfg = env.mailbox
        outcome = env.outcome
        assert outcome is not None  # every committed envelope is answered
        kind = outcome.kind
        self.stats.outcomes[kind] += 1
        if outcome.again:
            log.debug("mailbox=%s uidl=%s still left on the server", cfg.name, env.uidl)
            return
        if kind is Kind.SKIPPED:
            log.info(
                "mailbox=%s uidl=%s left on the server: %s", cfg.name, env.uidl, outcome.detail
            )
            return
        if kind in (Kind.FAILED, Kind.KEPT):
            log.warning(
                "mailbox=%s uidl=%s message could not be processed (%s); failure event #%d",
                cfg.name,
                env.uidl,
                env.problem,
                env.request_number,
            )
        elif kind is not Kind.DRY_RUN:
            log.info(
                "mailbox=%s uidl=%s %s #%s",
                cfg.name,
                env.uidl,
                outcome,
                env.request_number if env.request_number else "-",
            )
        if self.metrics is not None and kind not in (Kind.DUPLICATE, Kind.DRY_RUN):
            failed = kind in (Kind.FAILED, Kind.KEPT)
            counter = self.metrics.failed if failed else self.metrics.processed
            counter.labels(cfg.name).inc()

    # -- a pass: what the handlers of a batch share ------------------------------------------

    def fence(self, tx: Transaction, batch: list[Item]) -> None:
        """With leases (several replicas): the transaction commits only if this replica
        still holds the lease of every mailbox whose messages or session report it carries
        (engine/leases.py, step 3)."""
        if self.fences is None:
            return
        names = {item.mailbox.name for item in batch if isinstance(item, Envelope)}
        names.update(item.name for item in batch if isinstance(item, SessionReport))
        for name in sorted(names):
            tx.fence(name, *self.fences(name))

    async def begin(self, tx: Transaction, batch: list[Item], *, careful: bool) -> Work:
        """Read ahead, for the whole batch, what its messages' handlers will ask: the ledger
        rows of their keys (one query per account, not one per message) and the requests
        their subjects name (one query)."""
        work = Work(tx, careful)
        wanted: dict[str, list[str]] = {}
        for item in batch:
            if isinstance(item, Envelope) and not item.dry_run:
                wanted.setdefault(item.account, []).append(item.uidl)
        for account, uidls in wanted.items():
            for uidl, row in (await tx.ledger_rows(account, uidls)).items():
                if row.kept:
                    work.kept[account, uidl] = row
                else:
                    work.recorded.add((account, uidl))
        await _read_renumbered(work, batch)
        await _read_origins(tx, batch)
        await _read_requests(tx, batch)
        return work

    # -- messages: plan (reads only), then write (see TwoPassCommit) ------------------------

    async def plan(self, work: Work, env: Envelope) -> Outcome | _Decided | Exception:
        """What to do with a message, by reading only: a final outcome (nothing to write), a
        processor's decision to write, or the error that makes it a failure event."""
        key = (env.account, env.uidl)
        if not env.dry_run and key in work.recorded:
            return Outcome(Kind.DUPLICATE)
        if not env.dry_run and _renumbered(work, env):
            return Outcome(Kind.DUPLICATE)
        left = work.kept.get(key)
        if (
            left is not None
            and isinstance(env.error, MessageKept)
            and not env.dry_run
            and left.sha256 == hashlib.sha256(env.raw).hexdigest()
        ):
            # Left on the server before, and cut off the same way again (a server without
            # UIDL: it cannot be told before it is read): nothing new to record.
            return Outcome.kept_again(left.request_number)
        if (skipped := _older(env)) is not None:
            return Outcome(Kind.DRY_RUN, note=str(skipped)) if env.dry_run else skipped
        try:
            decided = await self._decide(work, env)
        except self.store.failures:
            raise  # the store itself is failing: the whole batch rolls back
        except Exception as exc:
            if env.dry_run:
                from engine.processors import failure

                note = f"failure event: {failure.cause(exc)}: {exc}"
                return Outcome(Kind.DRY_RUN, note=note)
            return exc
        if env.dry_run:
            from engine.processors import describe

            return Outcome(Kind.DRY_RUN, note=describe(decided.decision))
        return decided

    async def _decide(self, work: Work, env: Envelope) -> _Decided:
        from engine.processors import Context, decide

        if env.error is not None:
            raise env.error
        assert env.parsed is not None
        tx, cfg = work.tx, env.mailbox
        team = await self._team(tx, cfg.team)
        if team is None:
            raise DirectoryError(f"team {cfg.team or self.default_team} is not in the directory")
        key = (id(cfg), env.historic is not None)
        ctx = work.contexts.get(key)
        if ctx is None or ctx.mailbox is not cfg or ctx.team is not team:
            if self._reference_key is None:
                self._reference_key = await tx.engine_key("reference")
            ctx = work.contexts[key] = Context(
                mailbox=cfg,
                team=team,
                historic=key[1],
                reference_key=self._reference_key,
            )
        decision = await decide(env.parsed, ctx, tx.directory)
        return _Decided(team, decision)

    async def write(self, work: Work, env: Envelope, decided: _Decided) -> Outcome:
        """Apply a processor's decision and record the message's ledger row."""
        outcome = await self._apply(work, env, decided.team, decided.decision)
        await self._ledger(work, env, outcome)
        return outcome

    async def fail(self, work: Work, env: Envelope, exc: Exception) -> Outcome:
        """Make (or add to) the message's failure event and record its ledger row."""
        from engine.processors import failure

        msg = failure.failed(env.mailbox.name, env.mailbox.team, env.uidl, env.raw, env.parsed)
        existing = await work.tx.failure_event(msg.message_id, msg.sha256)
        number = await self._event(work.tx, failure.decide(msg, exc, existing))
        problem = f"{failure.cause(exc)}: {exc}"
        if isinstance(exc, MessageKept):
            outcome = Outcome(Kind.KEPT, exc.reason, number, problem)
        else:
            outcome = Outcome(Kind.FAILED, failure.cause(exc), number, problem)
        await self._ledger(work, env, outcome, exc.needed if isinstance(exc, MessageKept) else None)
        return outcome

    async def _event(self, tx: Transaction, d: EventDecision) -> int:
        """Apply a decision about an event the engine raises itself; returns its number."""
        from engine.processors import AddNote, Close, NewEvent

        if isinstance(d, NewEvent):
            team = await self._any_team(tx, d.team)
            number = await tx.create_request(
                team_id=team.id,
                type="event",
                kind=d.kind,
                subject=d.subject,
                description=d.description,
                created_by=self.created_by,
                group=team.default_group,
                mailbox=d.mailbox,
                cause=d.cause,
                message_id=d.message_id,
                sha256=d.sha256,
            )
            if d.attachments:
                await tx.add_attachments(number, None, d.attachments)
            return number
        note = d.body if isinstance(d, AddNote) else d.note
        await tx.add_activity(
            d.number, author="mailintegration", email="", body=note, automatic=True
        )
        if isinstance(d, Close):
            await tx.set_status(d.number, "processed", by=self.created_by, why=d.why)
        return d.number

    async def _ledger(
        self, work: Work, env: Envelope, outcome: Outcome, needed: int | None = None
    ) -> None:
        """The message's ledger row. One left on the server before (kept) and now taken
        whole has its row updated, and its failure event says what became of it."""
        from engine.processors import failure

        tx = work.tx
        key = (env.account, env.uidl)
        text = str(outcome)
        message_id, sha256 = failure.identity(env.raw, env.parsed)
        fields: dict[str, Any] = {
            "message_id": message_id,
            "sha256": sha256,
            "outcome": text,
            "request_number": outcome.request_number,
            "size": env.size,
            "needed": needed,
        }
        before = work.kept.pop(key, None)
        if outcome.kind is Kind.KEPT:
            work.kept[key] = LedgerRow(**fields, deleted_at=None)
        else:
            work.recorded.add(key)
        if before is None:
            await tx.record_ledger(
                account=env.account,
                uidl=env.uidl,
                mailbox=env.mailbox.name,
                arrived=env.arrived,
                **fields,
            )
            return
        await tx.update_ledger(account=env.account, uidl=env.uidl, **fields)
        number = outcome.request_number
        if before.request_number is not None and before.request_number != number:
            await tx.add_activity(
                before.request_number,
                author="mailintegration",
                email="",
                body=f"The message (UIDL {env.uidl}) was taken whole from mailbox "
                f"{env.mailbox.name} by a later session: {text}{f' #{number}' if number else ''}.",
                automatic=True,
            )

    async def _apply(self, work: Work, env: Envelope, team: Team, d: Decision) -> Outcome:
        from engine.processors import AddActivity, NewRequest, Refuse

        if isinstance(d, NewRequest):
            return Outcome(Kind.CREATED, request_number=await self._create(work, env, team, d))
        if isinstance(d, AddActivity):
            return Outcome(Kind.ACTIVITY, request_number=await self._add(work, env, d))
        if isinstance(d, Refuse):
            return Outcome(Kind.REFUSED, await self._refuse(work, env, d))
        if d.request_number is not None and d.also:
            await work.tx.add_history(d.request_number, self.created_by, d.also)
        await self._undeliverable(work, env, d.undeliverable, d.request_number)
        return Outcome(Kind.IGNORED, d.reason, d.request_number)

    async def _undeliverable(
        self,
        work: Work,
        env: Envelope,
        addresses: tuple[tuple[str, str, str], ...],
        number: int | None,
    ) -> None:
        """Record the addresses a permanent bounce named: no automatic reply goes to them."""
        for address, status, reason in addresses:
            await work.tx.mark_undeliverable(
                address, status=status, reason=reason, request_number=number
            )
            log.warning(
                "mailbox=%s uidl=%s %s is undeliverable (%s): no automatic reply goes to it",
                env.mailbox.name,
                env.uidl,
                address,
                status,
            )

    async def _create(self, work: Work, env: Envelope, team: Team, d: NewRequest) -> int:
        """A new request, in the team a routing rule named (checked before the session)."""
        tx = work.tx
        msg = env.parsed
        assert msg is not None
        if d.team is not None:
            team = await tx.team(d.team) or team
        status = env.historic.status if env.historic is not None else None
        number = await tx.create_request(
            status=status or "new",
            team_id=team.id,
            type=d.type,
            subject=d.subject,
            description=d.description,
            html=d.html,
            created_by=self.created_by,
            requester_id=d.requester.id if d.requester else None,
            user_id=d.requester.id if d.requester else None,
            site=d.site,
            group=d.group,
            assignee_id=d.assignee.id if d.assignee else None,
            source=d.source,
            mailbox=env.mailbox.name,
            message_id=msg.message_id,
            sha256=msg.sha256,
            priority=d.priority,
            correlation_key=d.correlation_key,
            alert_state=d.alert_state,
            form=d.form,
        )
        await tx.add_attachments(number, None, d.attachments)
        if status is not None:
            await tx.add_history(number, self.created_by, f"Imported {status} (historic import).")
        if d.origin is not None:
            await tx.record_origin(number, d.origin)
        if d.watchers:
            await tx.add_watchers(number, d.watchers)
        if d.fields or d.tags or d.foreign_numbers:
            await tx.add_request_details(
                number, fields=d.fields, tags=d.tags, foreign_numbers=d.foreign_numbers
            )
        return number

    async def _add(self, work: Work, env: Envelope, d: AddActivity) -> int:
        """An activity; the request reopened by a person's reply or a correlated alert, or
        closed by an alert's recovery; its alert state updated."""
        tx = work.tx
        msg = env.parsed
        assert msg is not None
        number = d.request.number
        activity = await tx.add_activity(
            number,
            author=d.author,
            email=msg.from_addr,
            body=d.body,
            date=msg.date,
            automatic=d.automatic,
            message_id=msg.message_id,
        )
        await tx.add_attachments(number, activity, d.attachments)
        if d.watchers:
            await tx.add_watchers(number, d.watchers)
        await self._undeliverable(work, env, d.undeliverable, number)
        if d.via == "flood":
            log.warning(
                "mailbox=%s uidl=%s flood from %s: added to request #%d instead of a new one",
                env.mailbox.name,
                env.uidl,
                msg.from_addr,
                number,
            )
            if self.metrics is not None:
                self.metrics.flood_collapsed.labels(env.mailbox.name).inc()
        if d.state is not None:
            await tx.set_alert_state(number, d.state)
        if d.close is not None:
            await tx.set_status(number, "processed", by=self.created_by, why=d.close)
        elif d.reopen and env.historic is None and (not d.automatic or d.via == "correlation"):
            status = "new" if d.request.type == "event" else "reopened"
            who = "an alert" if d.via == "correlation" else "a reply"
            await tx.set_status(
                number,
                status,
                by=self.created_by,
                why=f"Reopened by {who} from {msg.from_addr or d.author}.",
            )
        return number

    async def _refuse(self, work: Work, env: Envelope, d: Refuse) -> str:
        """Record the refusal's automatic reply (an outbox row, in this transaction), unless
        it would loop or go over a rate limit. The outbox sends it after the commit.
        Returns the ledger detail of the refusal."""
        msg = env.parsed
        cfg = env.mailbox
        assert msg is not None
        if not d.reply or cfg.smtp is None:
            return f"no reply ({d.no_reply_because or 'no smtp configured'})"
        if env.historic is not None:
            return "no reply (historic import)"
        # Here, not at the top: smtplib and the email package (~9 ms) are for mailboxes that
        # send replies, not for every start.
        from engine import reply
        from engine.processors import failure

        if failure.raw_header(env.raw, b"x-loop").startswith("mailintegration") or (
            msg.message_id or ""
        ).endswith(f".mailintegration@{reply.reply_domain(cfg)}"):
            return "no reply (our own loop header or Message-ID)"
        try:
            out = reply.build_reply(
                mailbox=cfg,
                recipient_address=msg.from_addr,
                sender_name=msg.from_name,
                subject=msg.subject,
                in_reply_to=msg.message_id,
            )
        except ValueError as exc:
            return f"no reply ({exc})"
        if (why := await work.tx.undeliverable(out.to.key)) is not None or (
            out.to.key != out.to.address.lower()
            and (why := await work.tx.undeliverable(out.to.address)) is not None
        ):
            log.info(
                "mailbox=%s uidl=%s no reply: %s is undeliverable (%s)",
                cfg.name,
                env.uidl,
                out.to.address,
                why,
            )
            if self.metrics is not None:
                self.metrics.replies_suppressed.labels(cfg.name, "undeliverable").inc()
            return "no reply (undeliverable address)"
        if await self._over_reply_limit(work.tx, env, out.to):
            return "no reply (rate limit)"
        await work.tx.queue_reply(
            mailbox=cfg.name,
            request_number=None,
            recipient=out.to.address,
            rcpt_key=out.to.key,
            rcpt_domain=out.to.domain,
            message_id=out.message_id,
            message=out.data,
        )
        work.replies += 1
        return "replied"

    async def _over_reply_limit(self, tx: Transaction, env: Envelope, to: reply.Recipient) -> bool:
        """Whether one more reply to ``to`` from this mailbox goes over a limit (logged once
        per limit, key and window: a flood must not become a flood of log lines)."""
        limits = self.reply_limits
        now = datetime.now(UTC)
        day, hour = now - timedelta(days=1), now - timedelta(hours=1)
        for kind, column, key, since, limit, window in (
            ("address", "rcpt_key", to.key, day, limits.per_address_per_day, "day"),
            ("domain", "rcpt_domain", to.domain, hour, limits.per_domain_per_hour, "hour"),
            ("mailbox", "mailbox", env.mailbox.name, hour, limits.per_mailbox_per_hour, "hour"),
        ):
            if await tx.replies_since(column, key, since) < limit:
                continue
            stamp = now.strftime("%Y-%m-%d" if window == "day" else "%Y-%m-%dT%H")
            if (kind, key, stamp) not in self._limits_logged:
                if len(self._limits_logged) > 10_000:
                    self._limits_logged.clear()  # bounded; at worst a limit is logged again
                self._limits_logged.add((kind, key, stamp))
                log.warning(
                    "mailbox=%s uidl=%s no reply: the %s %s already got %d replies in the "
                    "last %s (further replies over this limit are not logged)",
                    env.mailbox.name,
                    env.uidl,
                    kind,
                    key,
                    limit,
                    window,
                )
            return True
        return False

    # -- the other items ---------------------------------------------------------------------

    async def _known_query(self, work: Work, item: KnownQuery) -> None:
        item.known = await work.tx.ledger_rows(item.account, item.uidls)

    async def _outbox_fetch(self, work: Work, item: OutboxFetch) -> None:
        item.due, item.next_due = await work.tx.due_replies(
            item.mailboxes, exclude=item.exclude, limit=item.limit
        )

    async def _outbox_result(self, work: Work, item: OutboxResult) -> None:
        await work.tx.record_attempt(item.reply_id, error=item.error, retry_at=item.retry_at)

    async def _directory_check(self, work: Work, item: DirectoryCheck) -> None:
        item.problem = await self._check_directory(work.tx, item.mailbox)
        item.account = await self._resolve(work.tx, item.mailbox, remember=item.remember)

    async def _resolve(self, tx: Transaction, cfg: MailboxConfig, *, remember: bool) -> str:
        """The account the ledger knows this mailbox by: its own (MailboxConfig.account),
        unless the mailbox used another one before, with the same user name, which has
        ledger rows while the new one has none (the same mailbox, whose messages must not
        be taken again):

        - without ``accountId`` (the server's name changed, say pop.example.com to
          10.0.0.5), the old account is kept, with a warning;
        - with ``accountId``, taken as given, the old account's rows move to it (once: the
          admin named the account, as the XSD tells them to when moving the mailbox).
        """
        new, user = cfg.account, cfg.server.user_name
        last = await tx.mailbox_account(cfg.name)
        if (
            last is not None
            and last[0] != new
            and last[1] == user
            and not await tx.account_has_rows(new)
            and await tx.account_has_rows(last[0])
        ):
            if cfg.server.account_id is None:
                log.warning(
                    "mailbox=%s its account is now %s, a name the ledger does not know; it "
                    "keeps the one it had, %s (set <accountId> to name the account yourself)",
                    cfg.name,
                    new,
                    last[0],
                )
                return last[0]
            if not remember:  # a dry run changes nothing
                return last[0]
            log.warning(
                "mailbox=%s the ledger's entries of account %s now belong to accountId %s",
                cfg.name,
                last[0],
                new,
            )
            await tx.rename_account(last[0], new)
        if remember and last != (new, user):
            await tx.remember_account(cfg.name, new, user)
        return new

    async def _team(self, tx: Transaction, ref: str | None) -> Team | None:
        return await tx.team(ref if ref else self.default_team)

    async def _any_team(self, tx: Transaction, ref: str | None) -> Team:
        """The team an engine-made event goes to: the mailbox's, the default, else the first."""
        team = await self._team(tx, ref) or await tx.team(self.default_team)
        if team is None:
            team = await tx.first_team()
        if team is None:
            raise StoreError("the directory has no team: run 'mailintegration directory import'")
        return team

    async def _check_directory(self, tx: Transaction, cfg: MailboxConfig) -> DirectoryError | None:
        problems = [
            need.missing
            for need in directory_needs(cfg, self.default_team)
            if not await known_entry(tx, need.table, need.name)
        ]
        if not problems:
            return None
        return DirectoryError("; ".join(problems))

    async def _session_report(self, work: Work, rep: SessionReport) -> None:
        """The end of a mailbox session: its outage events, the deletions the server
        confirmed, and its status."""
        tx, error = work.tx, rep.error
        opened = await tx.open_outages(rep.name)
        if error is not None or opened:  # else there is nothing to open, note or close
            await self._outages(tx, rep, opened)
        if rep.warnings:
            await self._warnings(tx, rep)
        if rep.account is not None and rep.deleted:
            await tx.mark_deleted(rep.account, rep.deleted)
        problem = None
        if error is not None:
            from engine.processors import outage

            problem = f"{outage.cause(error)}: {error}"
        await tx.note_session(
            rep.name,
            error=problem,
            fetched=rep.fetched,
            processed=rep.processed,
            failed=rep.failed,
            kept_deleted=rep.kept_deleted,
        )

    async def _outages(self, tx: Transaction, rep: SessionReport, opened: dict[str, int]) -> None:
        """Open, add to or close the mailbox's outage events (engine.processors.outage)."""
        from engine.processors import Close, NewEvent, outage

        error = rep.error
        decisions = outage.decide(
            rep.name,
            error,
            outage.failing(opened),
            team=rep.team,
            config=rep.config,
            file_name=rep.path.name,
            now=datetime.now(UTC),
        )
        for d in decisions:
            number = await self._event(tx, d)
            if isinstance(d, Close):
                log.info("mailbox=%s outage %s (#%d) closed", rep.name, d.cause, number)
            elif isinstance(d, NewEvent):
                log.error("mailbox=%s outage %s opened (#%d): %s", rep.name, d.cause, number, error)
            else:
                cause = None if error is None else outage.cause(error)
                log.warning(
                    "mailbox=%s outage %s goes on (#%d): %s", rep.name, cause, number, error
                )

    async def _warnings(self, tx: Transaction, rep: SessionReport) -> None:
        """Raise each token health warning once (engine.oauth.health)."""
        from engine.processors import outage

        causes = [outage.WARNING_PREFIX + key for key, _ in rep.warnings]
        raised = await tx.outages_by_cause(rep.name, causes)
        now = datetime.now(UTC)
        for d in outage.warn(rep.name, rep.warnings, raised, team=rep.team, now=now):
            number = await self._event(tx, d)
            log.warning("mailbox=%s warning event #%d: %s", rep.name, number, d.subject)


class TwoPassCommit:
    """Handle (the head of) a batch in one transaction, and commit it. The protocol:

    1. **First pass, no savepoints** (each costs two round trips per message). Each item goes
       to its handler, in order. A message is first *planned*, by reading only (the ledger,
       the processor over a read-only directory view); one that fails there, or arrived
       failed, becomes a failure event in place: nothing of it was written.
    2. A message failing **after its first write** cannot be undone alone: the pass is
       rolled back whole, every answer it gave forgotten, and the batch handled again with
       a **savepoint per message**. There, a failure rolls back that message's writes alone,
       and its failure event is written under a savepoint of its own.
    3. **The store failing** (``Store.failures``), a failure event failing in the second pass,
       or a cancellation, rolls everything back; :meth:`Writer.apply` then answers every
       item "not committed", so no session deletes anything of the batch.
    4. **Bounded time**: once ``max_batch_seconds`` have passed since the batch began, the
       items handled so far commit and the rest is returned for the next transaction, so a
       session never waits long for its answer behind a large batch.

    Why it is safe: a message's outcome and its ledger row are written in the same
    transaction, and answers are given only after COMMIT; a pass that did not commit leaves
    no answer behind (:func:`_reset`), and what it wrote is rolled back with it.
    """

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    async def __call__(
        self, batch: list[Item], started: float
    ) -> tuple[Work, list[Item], list[Item]]:
        """Commit (the head of) ``batch``: (the pass that committed, the head, the rest).

        5. **A replica committed first** (``Store.conflicts``: the ledger's unique key, say,
           of a message two replicas raced for): the transaction is done again from the
           start; its reads now see the other's rows, so such a message is a duplicate,
           deleted without being processed. Bounded: the last conflict is a failure.
        """
        for attempt in range(_CONFLICT_REPLAYS + 1):
            try:
                return await self._passes(batch, started)
            except self.writer.store.conflicts as exc:
                if attempt == _CONFLICT_REPLAYS:
                    raise
                log.warning(
                    "another writer committed first what this transaction of %d item(s) "
                    "also wrote (%s): done again",
                    len(batch),
                    type(exc).__name__,
                )
                for item in batch:
                    _reset(item)
        raise AssertionError("unreachable")

    async def _passes(
        self, batch: list[Item], started: float
    ) -> tuple[Work, list[Item], list[Item]]:
        try:
            return await self._pass(batch, started, careful=False)
        except _Replay as replay:
            log.warning(
                "a message failed half-way (%s): the transaction of %d item(s) is "
                "done again with a savepoint per message",
                replay.__cause__,
                len(batch),
            )
        for item in batch:
            _reset(item)
        return await self._pass(batch, started, careful=True)

    async def _pass(
        self, batch: list[Item], started: float, *, careful: bool
    ) -> tuple[Work, list[Item], list[Item]]:
        writer = self.writer
        rest: list[Item] = []
        async with writer.store.transaction() as tx:
            work = await writer.begin(tx, batch, careful=careful)
            handlers = writer.handlers
            for i, item in enumerate(batch):
                await handlers[type(item)](work, item)
                if time.monotonic() - started > writer.max_batch_seconds:
                    batch, rest = batch[: i + 1], batch[i + 1 :]
                    break
            writer.fence(tx, batch)
        return work, batch, rest

    async def message(self, work: Work, env: Envelope) -> None:
        """The handler of a message: plan it, then write it, as the protocol says."""
        writer = self.writer
        plan = await writer.plan(work, env)
        if isinstance(plan, Outcome):
            env.outcome = plan
        elif work.careful:
            await self._carefully(work, env, plan)
        else:
            try:
                if isinstance(plan, Exception):
                    env.outcome = await writer.fail(work, env, plan)
                else:
                    env.outcome = await writer.write(work, env, plan)
            except writer.store.failures:
                raise
            except Exception as exc:
                raise _Replay from exc

    async def _carefully(self, work: Work, env: Envelope, plan: _Decided | Exception) -> None:
        """A message of the second pass: its writes under a savepoint, undone alone if they
        fail; then its failure event under another."""
        writer, tx = self.writer, work.tx
        error = plan if isinstance(plan, Exception) else None
        if not isinstance(plan, Exception):
            try:
                async with tx.savepoint():
                    env.outcome = await writer.write(work, env, plan)
                return
            except writer.store.failures:
                raise
            except Exception as exc:
                error = exc
        assert error is not None
        async with tx.savepoint():
            env.outcome = await writer.fail(work, env, error)


# How many times a transaction is done again after a conflict with another replica.
_CONFLICT_REPLAYS = 3


class _Replay(Exception):
    """Raised by a first pass of :class:`TwoPassCommit` for a message that failed after its
    first write; caught by it to roll back and replay (never leaves it)."""


def _reset(item: Item) -> None:
    """Forget what a rolled-back pass decided for ``item``."""
    if isinstance(item, Envelope):
        item.outcome = None


def _acknowledge(batch: list[Item]) -> None:
    """Answer every item of a transaction that ended (committed, or ``failure`` set)."""
    for item in batch:
        item.done.set()
        if isinstance(item, Envelope):
            # The session needs only the answer now: let the bytes go.
            item.raw, item.parsed = b"", None
            if item.on_done is not None:
                item.on_done()


async def known_entry(tx: Transaction, table: str, name: str | None) -> bool:
    """Whether the directory holds ``name`` in ``table`` (a DirectoryNeed's); a team of no
    name is the only team, if there is just one."""
    if table == "users":
        return name is not None and await tx.user_by_login(name) is not None
    if table == "teams":
        return await tx.team(name) is not None
    return name is not None and await tx.has_name(table, name)
