"""One mailbox session, as named steps: the exactly-once path.

:func:`run_session` is the session; :meth:`_Session.run` reads as its list of steps:

1. **check the directory** and learn the mailbox's ledger account (a DirectoryCheck for the
   writer: this module never touches the store, it sends items on the writer's queue);
2. **open** the gateway (:mod:`engine.gateways`: connect, TLS, authenticate);
3. **list** the messages the server holds;
4. **ask the ledger** what it holds of their keys (a KnownQuery);
5. **plan** what to do with each (:mod:`engine.plan`): read it, leave it, or dispose of it
   unread once it is known to be the same message as its ledger row;
6. **fetch windows and hand them over** to the writer, in fetch order, parsed in threads or
   in worker processes (:mod:`engine.parsers`), the bytes held meanwhile bounded by the
   shared budget (:mod:`engine.budget`, which writes the protocol with the writer down);
7. **settle**: wait for the writer's answers, and dispose of each message whose outcome is
   committed (POP3: DELE), never one left on the server;
8. **quit**, which makes the disposals final; or, on any error, **abort**, which undoes them.

The order is the whole point: read → parse → hand to the writer → wait for the answer that
the outcome is committed → dispose → quit. A message whose answer never comes (crash,
cancellation, failed commit) is never disposed of; the next session finds it again, and the
ledger makes sure it is not processed twice.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from engine.budget import ByteBudget
from engine.config import MailboxConfig
from engine.errors import FetchError, FetchTimeout, MessageError, MessageKept, StoreError, sole
from engine.gateways import (
    HEADER_BYTES,
    MAX_LINE,
    Answer,
    Gateway,
    Listed,
    Request,
    gateway_for,
    read_cap,
)
from engine.items import DirectoryCheck, Envelope, Historic, Item, Kind, KnownQuery, Outcome
from engine.keys import content_key, reused_key
from engine.model import LedgerRow, ParsedMessage
from engine.oauth.broker import TokenBroker
from engine.parsers import Parsers
from engine.plan import Plan, Todo, header_message_id, plan_session

# engine.parse (~25 ms of imports, a tenth of a `once`) is imported where a message is parsed,
# here and in the store and processors: a `once` over empty mailboxes, the usual cron run,
# never needs it.

# The name it had as the fetcher: operators' log filters know it.
log = logging.getLogger("engine.session")

T = TypeVar("T")


@dataclass
class SessionResult:
    """How far a session got, counted as it goes (the supervisor reports it)."""

    listed: int = 0
    fetched: int = 0
    processed: int = 0
    failed: int = 0
    deleted: int = 0
    # Left on the server on purpose: too large, a line too long (failure events of their own).
    kept: int = 0
    # The ledger's account for the mailbox, and the keys whose disposal a QUIT confirmed.
    account: str | None = None
    deleted_keys: list[str] = field(default_factory=list)
    # Listed again although the server had confirmed their deletion (None: not listed).
    kept_deleted: int | None = None
    # IMAP: the first folder's UIDNEXT when listed (the daemon's push starts from it).
    mark: int | None = None

    @property
    def waiting(self) -> int:
        """Listed but neither disposed of after its commit nor left on the server on purpose:
        what the next session still has to take (a session stopped or failed part way)."""
        return max(0, self.listed - self.deleted - self.kept)


@dataclass(frozen=True)
class FetchOptions:
    """How the supervisor runs sessions: shared limits and resources, and what to do."""

    limiter: anyio.CapacityLimiter | None = None
    dry_run: bool = False
    historic: Historic | None = None
    debug_dir: Path | None = None
    on_envelope: Callable[[Envelope], None] | None = None
    # Once set, no further message is fetched: the session settles what it has and quits.
    stop: anyio.Event | None = None
    # Messages per pipelined exchange (a window), and the most bytes one may announce.
    window: int = 48
    window_bytes: int = 4 * 1024 * 1024
    # Shared by every session: bytes of messages between read and answer (engine.budget).
    budget: ByteBudget | None = None
    # Worker processes for parsing, shared by every session (None: parse in threads). Worth
    # the trip only for sessions with many messages, and only for windows of small ones: a
    # large message is parsed in a thread rather than copied to a process.
    processes: Parsers | None = None
    # OAuth2 access tokens for mailboxes that sign in with them (engine.oauth.broker).
    tokens: TokenBroker | None = None
    process_threshold: int = 64
    process_message_bytes: int = 1024 * 1024


def make_envelope(cfg: MailboxConfig, uidl: str | None, raw: bytes) -> Envelope:
    """Parse one message (CPU work: runs in a worker thread, off the event loop)."""
    from engine.parse import parse_raw

    return envelope_for(cfg, uidl, raw, parse_raw(raw, cfg.max_message_bytes))


def envelope_for(
    cfg: MailboxConfig,
    uidl: str | None,
    raw: bytes,
    result: ParsedMessage | MessageError,
    *,
    account: str = "",
    size: int | None = None,
    arrived: datetime | None = None,
) -> Envelope:
    if isinstance(result, ParsedMessage):
        key = uidl or content_key(result.sha256)
        return Envelope(cfg, key, raw, result, account=account, size=size, arrived=arrived)
    key = uidl or content_key(hashlib.sha256(raw).hexdigest())
    return Envelope(cfg, key, raw, None, error=result, account=account, size=size, arrived=arrived)


def kept_error(cfg: MailboxConfig, t: Todo, answer: Answer) -> MessageKept | None:
    """Why the message of ``answer`` was not taken whole, if it was not."""
    m, limit, got = t.listed, cfg.max_message_bytes, len(answer.data)
    if t.request is None or t.request.headers_only:
        return MessageKept(
            "too-large",
            m.size,
            f"the server lists it at {m.size} bytes, over maxMessageBytes ({limit}): it "
            "was not fetched"
            + (" (only its header, with TOP)" if answer.data else " (the server has no TOP)"),
        )
    if answer.cut == "line":
        return MessageKept(
            "line-too-long",
            answer.octets,
            f"it has a line longer than {MAX_LINE} bytes: cut off there, after {got} of its "
            f"{answer.octets} bytes",
        )
    if answer.cut is None:
        return None
    if answer.octets > limit:
        return MessageKept(
            "too-large",
            answer.octets,
            f"it is {answer.octets} bytes, over maxMessageBytes ({limit}), though listed at "
            f"{m.size}: cut off after {got} bytes",
        )
    return MessageKept(
        "larger-than-listed",
        answer.octets,
        f"it is {answer.octets} bytes though the server listed it at {m.size}: cut off "
        f"after {got} bytes (twice the listed size and 1 MiB); the next session takes it whole",
    )


def answer_envelope(
    cfg: MailboxConfig,
    account: str,
    t: Todo,
    answer: Answer,
    result: ParsedMessage | MessageError | None,
) -> Envelope:
    """The envelope of a message as read: a failure event that leaves it on the server if
    it was not taken whole (:func:`kept_error`), else its parsing ``result``. It arrived
    when the server says (IMAP's INTERNALDATE), else when the top Received field says (POP3:
    the field our own mail server added)."""
    from engine.parse.headers import received_at

    kept = kept_error(cfg, t, answer)
    if kept is not None or result is None:
        result = kept or MessageError("internal error: not parsed")
    arrived = answer.arrived or (
        result.received_at if isinstance(result, ParsedMessage) else received_at(answer.data)
    )
    return envelope_for(
        cfg,
        t.listed.uidl,
        answer.data,
        result,
        account=account,
        size=t.listed.size,
        arrived=arrived,
    )


async def submit(send: MemoryObjectSendStream[Item], item: Item) -> Item:
    """Send an item to the writer and wait for its answer; a failed commit raises
    :class:`StoreError` (the writer's promise for every item: see engine.items)."""
    await send.send(item)
    await item.done.wait()
    if item.failure is not None:
        raise StoreError(str(item.failure))
    return item


async def _send(send: MemoryObjectSendStream[Item], item: Item) -> None:
    """``send.send`` without its checkpoint while the queue has room. With it, and with
    ``done.wait()`` on answers already there, each message cost two trips round the event
    loop: 5,203 iterations for a session of 2,000 messages, 1,618 without them."""
    try:
        send.send_nowait(item)
    except anyio.WouldBlock:
        await send.send(item)


async def run_session(
    cfg: MailboxConfig,
    send: MemoryObjectSendStream[Item],
    opts: FetchOptions,
    result: SessionResult | None = None,
) -> SessionResult:
    """One pass over the mailbox. Raises an :class:`EngineError` when the mailbox can't be read.

    ``result``, when given, is counted into as the session goes: a session that fails still
    tells how far it got.

    The whole session is bounded by its deadline (engine.gateways.session_seconds), here as
    in the thread that talks to the server, which checks it before every read: past it, a
    thread still blocked is abandoned, its socket shut down (nothing is disposed of), and
    the session ends as a ``timeout`` outage.
    """
    account = await check_directory(cfg, send, opts)
    gateway = gateway_for(cfg.server, opts.tokens)
    with anyio.CancelScope() as scope:
        result = SessionResult() if result is None else result
        result.account = account
        await _Session(cfg, send, opts, gateway, result, scope).run()
        return result
    raise FetchTimeout(
        f"the session with {cfg.server.host}:{cfg.server.port} went over its deadline of "
        f"{gateway.seconds:.0f} s and was dropped"
    )


async def check_directory(
    cfg: MailboxConfig, send: MemoryObjectSendStream[Item], opts: FetchOptions
) -> str:
    """Step 1: the directory holds what the mailbox names (else the session is a
    ``directory`` outage), and the ledger's account for the mailbox (recorded unless dry)."""
    check = DirectoryCheck(mailbox=cfg, remember=not opts.dry_run)
    await submit(send, check)
    if check.problem is not None:
        raise check.problem
    return check.account


class _Session:
    """The state one session carries from step to step."""

    def __init__(
        self,
        cfg: MailboxConfig,
        send: MemoryObjectSendStream[Item],
        opts: FetchOptions,
        gateway: Gateway,
        result: SessionResult,
        scope: anyio.CancelScope,
    ) -> None:
        self.cfg = cfg
        self.send = send
        self.opts = opts
        self.gateway = gateway
        self.result = result
        self.scope = scope
        self.account = result.account or cfg.account  # as the writer resolved it
        self.by_number: dict[int, Listed] = {}
        # Messages still to fetch, in order.
        self.todo: list[Todo] = []
        # Windows fetched and not yet handed to the writer, oldest first: each holds its grant
        # of the byte budget until its last envelope is sent (the writer then gives it back).
        self.inflight: deque[_Window] = deque()
        # Messages handed over (or answered at once), in order, not yet disposed of.
        self.pending: list[tuple[int, Envelope]] = []
        self.follow()

    def follow(self) -> None:
        """Bound the session from outside by the gateway's deadline, a little later than the
        gateway's own check, whose error says more."""
        self.scope.deadline = anyio.current_time() + self.gateway.deadline - time.monotonic() + 2

    async def thread(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking call in a worker thread. A thread cannot be cancelled; on
        cancellation it is abandoned and its socket shut (:func:`_interrupt`), which ends it
        at once. Without QUIT the server deletes nothing (RFC 1939)."""
        return await anyio.to_thread.run_sync(
            fn, *args, limiter=self.opts.limiter, abandon_on_cancel=True
        )

    async def run(self) -> None:
        """The steps, in order (step 1 ran before: :func:`check_directory`)."""
        await self.open()
        try:
            listing = await self.list_messages()
            known = await self.ask_ledger(listing)
            plan = self.plan(listing, known)
            await self.dispose_known(plan)
            await self.fetch_and_hand_over(plan)
            await self.settle_rest()
            await self.quit()
        except anyio.get_cancelled_exc_class():
            self.give_back()
            await _interrupt(self.gateway)
            raise
        except BaseException as exc:
            await self.abort(exc)
            raise

    async def open(self) -> None:
        """Step 2: connect, TLS, authenticate."""
        try:
            await self.thread(self.gateway.open)
        except anyio.get_cancelled_exc_class():
            await _interrupt(self.gateway)  # or the abandoned thread logs in and leaks it
            raise

    async def list_messages(self) -> list[Listed]:
        """Step 3: what the server holds."""
        listing = await self.thread(self.gateway.listing)
        self.result.listed = len(listing)
        self.result.mark = getattr(self.gateway, "mark", None)  # a gateway that has one
        self.by_number.update((m.number, m) for m in listing)
        return listing

    async def ask_ledger(self, listing: list[Listed]) -> dict[str, LedgerRow]:
        """Step 4: what the ledger holds of the listed keys."""
        query = KnownQuery(account=self.account, uidls=[m.uidl for m in listing if m.uidl])
        await submit(self.send, query)
        return query.known

    def plan(self, listing: list[Listed], known: dict[str, LedgerRow]) -> Plan:
        """Step 5: what to do with each message; the deadline now counts what to fetch."""
        plan = plan_session(self.cfg, listing, known, top=self.gateway.top)
        self.gateway.extend(sum(t.expected for t in plan.todo) + HEADER_BYTES * len(plan.by_header))
        self.follow()
        return plan

    async def dispose_known(self, plan: Plan) -> None:
        """Step 5, on the server: dispose of the messages the ledger holds already, once sure
        each is the same message; the others join ``plan.todo``, to be fetched and compared."""
        cfg, result = self.cfg, self.result
        if plan.by_header:
            same = await self.thread(
                same_by_header, self.gateway, plan.by_header, self.opts.window_bytes
            )
            for m, row in plan.by_header:
                if m.number in same:
                    plan.delete.append((m, row))
                else:
                    request = Request(m.number, read_cap(m.size, cfg.max_message_bytes))
                    plan.todo.insert(0, Todo(m, request, row))
        result.kept_deleted = sum(row.deleted_at is not None for _, row in plan.delete)
        result.kept += plan.skipped
        if plan.skipped:
            log.info(
                "mailbox=%s %d message(s) left on the server as before", cfg.name, plan.skipped
            )
        if plan.delete and not self.opts.dry_run:
            count = len(plan.delete)
            log.info("mailbox=%s %d message(s) already in the ledger: deleting", cfg.name, count)
            # Those whose ledger row is a failure event go where failure events' mail goes.
            failed = [m.number for m, row in plan.delete if row.outcome.startswith("failed")]
            await self.thread(self.gateway.dispose, [m.number for m, _ in plan.delete], failed)
            result.deleted += len(plan.delete)
            result.deleted_keys += [key for m, _ in plan.delete if (key := m.uidl) is not None]

    async def fetch_and_hand_over(self, plan: Plan) -> None:
        """Step 6: fetch window after window and hand each over, in fetch order.

        With many messages, windows are parsed apart (worker processes) while the next is
        fetched; up to one window per process is then in flight."""
        opts = self.opts
        self.todo = [t for t in plan.todo if t.request is not None]
        self.queue_unread([t for t in plan.todo if t.request is None])
        window = opts.window if self.gateway.pipelining else 1
        parsers = opts.processes if len(self.todo) >= opts.process_threshold else None
        depth = int(parsers.limiter.total_tokens) if parsers is not None else 0
        try:
            async with anyio.create_task_group() as tg:
                while self.todo and not self.stopping():
                    await self.fetch_next_window(window, parsers, tg)
                    await self.deliver_parsed(depth)
                while self.inflight:
                    await self.deliver_next()
        except BaseExceptionGroup as group:
            raise sole(group) from None

    def queue_unread(self, unread: list[Todo]) -> None:
        """Messages listed over maxMessageBytes on a server that cannot send their header
        alone: failure events made without reading them, handed over first."""
        if unread:
            w = _Window(unread, envelopes=_unread(self.cfg, self.account, unread))
            w.parsed.set()
            self.inflight.append(w)

    def stopping(self) -> bool:
        """Whether to fetch no more (the engine is stopping): the session then settles what
        it has and quits. Not while answers are still to be read: they come first."""
        stop = self.opts.stop
        if stop is None or not stop.is_set() or self.gateway.mid_exchange:
            return False
        log.info("mailbox=%s stopping: the rest stays on the server", self.cfg.name)
        return True

    async def fetch_next_window(self, window: int, parsers: Parsers | None, tg: TaskGroup) -> None:
        """Fetch the next window: at most ``window`` messages and ``window_bytes`` announced,
        once the byte budget grants them (engine.budget, 1 and 2); parse it here, or start
        parsing it apart."""
        opts, budget = self.opts, self.opts.budget
        take, size = self.window_size(window)
        if budget is not None and not budget.available(size):
            # The windows in flight hold budget the writer gives back only once they reach
            # it: hand them over before waiting for more.
            while self.inflight:
                await self.deliver_next()
        w = _Window(self.todo[:take])
        self.inflight.append(w)
        w.held = await budget.acquire(size) if budget else 0
        grant = w.held if budget else math.inf
        # Once the processes are up, a window waits for one rather than be parsed in a
        # thread (meanwhile the next is fetched): a thread parsing holds the GIL, and every
        # handover the writer and SQLite's thread make then waits for it. With 16 sessions
        # parsing in threads, the writer took 0.53 ms per message inside its transactions
        # instead of 0.2; one process parses ~3,500 messages a second here, more than the
        # writer commits.
        apart = (
            parsers is not None
            and parsers.use()
            and all(t.listed.size <= opts.process_message_bytes for t in w.todo)
        )
        g, cfg, debug = self.gateway, self.cfg, opts.debug_dir
        if apart:
            answers = await self.thread(retr_window, g, cfg, w.todo, grant, debug)
        else:
            answers, w.envelopes = await self.thread(
                fetch_window, g, cfg, self.account, w.todo, grant, debug
            )
        # Read fewer than asked (the server's sizes were below the truth): the rest, already
        # asked for, comes first in the next window.
        w.todo, self.todo = w.todo[: len(answers)], self.todo[len(answers) :]
        if budget is not None:
            w.held = budget.settle(w.held, sum(len(a.data) for a in answers))
        if apart:
            assert parsers is not None
            tg.start_soon(self.parse_apart, w, answers, parsers)
        else:
            w.parsed.set()

    def window_size(self, window: int) -> tuple[int, int]:
        """How many messages the next window takes, and the bytes they announce: at most
        ``window`` of them, and no more than ``window_bytes`` unless it is one message."""
        todo, limit = self.todo, self.opts.window_bytes
        take, size = 1, todo[0].expected
        while take < min(window, len(todo)) and size + todo[take].expected <= limit:
            size += todo[take].expected
            take += 1
        return take, size

    async def parse_apart(self, w: _Window, answers: list[Answer], parsers: Parsers) -> None:
        """Parse a fetched window in a worker process, then mark it parsed. A message not
        taken whole is not parsed at all."""
        cfg = self.cfg
        whole = [
            i
            for i, (t, a) in enumerate(zip(w.todo, answers, strict=True))
            if kept_error(cfg, t, a) is None
        ]
        raws = [answers[i].data for i in whole]
        parsed = await parsers.parse(raws, cfg.max_message_bytes, self.thread, cfg.name)
        results: list[ParsedMessage | MessageError | None] = [None] * len(answers)
        for i, result in zip(whole, parsed, strict=True):
            results[i] = result
        w.envelopes = [
            answer_envelope(cfg, self.account, t, a, r)
            for t, a, r in zip(w.todo, answers, results, strict=True)
        ]
        w.parsed.set()

    async def deliver_parsed(self, depth: int) -> None:
        """Hand over the oldest windows as they are parsed, and whatever keeps more than
        ``depth`` windows (one per parsing process) in flight."""
        inflight = self.inflight
        while inflight and (len(inflight) > depth or inflight[0].parsed.is_set()):
            await self.deliver_next()

    async def deliver_next(self) -> None:
        """Hand the oldest window in flight over."""
        await self.deliver(self.inflight[0])
        self.inflight.popleft()

    async def deliver(self, w: _Window) -> None:
        """Hand a parsed window to the writer, in fetch order (engine.budget, 3 and 5);
        dispose of what is answered already."""
        await w.parsed.wait()
        self.result.fetched += len(w.envelopes)
        final = not self.todo and len(self.inflight) == 1  # nothing more to send after it
        mine = [
            env
            for t, env in zip(w.todo, w.envelopes, strict=True)
            if not _known(t, env, self.result)
        ]
        await self.hand_over(w, mine[-1] if mine else None, final)
        budget = self.opts.budget
        if w.held and budget is not None:  # nothing of it went to the writer
            budget.release(w.held)
            w.held = 0
        await self.settle_answered()

    async def hand_over(self, w: _Window, last: Envelope | None, final: bool) -> None:
        """Send the window's envelopes to the writer, but for those answered at once (the
        same message as their ledger row). ``last``, the last to be sent, carries the
        release of the window's grant, and is the session's last when ``final``."""
        opts, send, pending, budget = self.opts, self.send, self.pending, self.opts.budget
        for t, env in zip(w.todo, w.envelopes, strict=True):
            pending.append((t.listed.number, env))
            if env.done.is_set():
                continue  # the same message as its ledger row: disposed of, not sent
            env.dry_run = opts.dry_run
            env.historic = opts.historic
            env.last = final and env is last
            if budget is not None and env is last:
                # From here the writer gives the window's bytes back once it answers.
                env.on_done = functools.partial(budget.release, w.held)
                await _send(send, env)
                w.held = 0
            else:
                await _send(send, env)
            if opts.on_envelope is not None:
                opts.on_envelope(env)

    async def settle_answered(self) -> None:
        """Dispose of what is answered already, so few messages are held at once; never
        while answers are still to be read (the disposal's would be taken for theirs)."""
        pending = self.pending
        ready = 0
        while ready < len(pending) and pending[ready][1].done.is_set():
            ready += 1
        if ready and not self.gateway.mid_exchange:
            await self.settle(pending[:ready])
            del pending[:ready]

    async def settle_rest(self) -> None:
        """Step 7: settle what is still pending once everything is handed over (windows
        are settled as they go, by :meth:`settle_answered`)."""
        if self.pending:
            await self.settle(self.pending)
            self.pending.clear()

    async def settle(self, ready: list[tuple[int, Envelope]]) -> None:
        """Wait for the answers of ``ready``, count them, and dispose of them in one exchange
        with the server; never of those left on the server (kept). An answer that is not a
        commit stops the session: nothing more is disposed of."""
        result = self.result
        gone: list[tuple[int, str]] = []
        failed: list[int] = []
        for number, env in ready:
            if not env.done.is_set():  # wait() yields to the event loop even when set
                await env.done.wait()
            if env.failure is not None or env.outcome is None:
                raise StoreError(f"message {env.uidl} was not committed: {env.failure}")
            if env.outcome.kind is Kind.KEPT:
                # Left on the server, never disposed of; a failure event the first time.
                result.failed += env.outcome.failed
                result.kept += 1
                continue
            if env.outcome.kind is Kind.SKIPPED:
                continue  # older than a historic import's --since: left on the server
            if env.outcome.kind is Kind.FAILED:
                result.failed += 1
                failed.append(number)
            else:
                result.processed += 1
            gone.append((number, env.uidl))
        if gone and not self.opts.dry_run:
            await self.thread(self.gateway.dispose, [number for number, _ in gone], failed)
            result.deleted += len(gone)
            result.deleted_keys += [key for _, key in gone]

    async def quit(self) -> None:
        """Step 8: end the session; only now does the server make the disposals final."""
        await self.thread(self.gateway.quit)

    def give_back(self) -> None:
        """The grants of the windows not handed over (engine.budget, 6)."""
        budget = self.opts.budget
        for w in self.inflight:
            if w.held and budget is not None:
                budget.release(w.held)
            w.held = 0

    async def abort(self, exc: BaseException) -> None:
        """Step 8 of a session that failed: give its budget back, record a message it lost
        step in as left on the server, and end it undoing its disposals."""
        self.give_back()
        if isinstance(exc, FetchError) and exc.unfinished is not None and not self.opts.dry_run:
            await self.keep_unfinished(exc)
        with anyio.CancelScope(shield=True):
            # RSET undoes this session's deletions; a dead socket does the same by itself.
            await anyio.to_thread.run_sync(self.gateway.abort)

    async def keep_unfinished(self, exc: FetchError) -> None:
        """The session lost step in a message it had already cut off: record that message as
        left on the server (what was read, and that it needs more than that) before the
        session ends, so the next one skips it instead of meeting it again, and again."""
        cfg = self.cfg
        request, answer = exc.unfinished
        m = self.by_number[request.number]
        partial = Answer(answer.data, answer.octets + 1, answer.cut)  # more than was read
        env = answer_envelope(cfg, self.account, Todo(m, request), partial, None)
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                await submit(self.send, env)
            except StoreError as failed:
                log.error("mailbox=%s uidl=%s could not be recorded: %s", cfg.name, m.uidl, failed)


def _known(t: Todo, env: Envelope, result: SessionResult) -> bool:
    """For a message whose UIDL the ledger holds (``t.verify``), fetched to be compared:
    whether it is the same message (then answered at once: deleted, never processed again),
    else it is another one under a reused UIDL, given a key of its own."""
    row = t.verify
    if row is None:
        return False
    sha = env.parsed.sha256 if env.parsed is not None else hashlib.sha256(env.raw).hexdigest()
    if sha == row.sha256:
        env.outcome = Outcome(Kind.DUPLICATE)
        env.done.set()
        if row.deleted_at is not None:
            result.kept_deleted = (result.kept_deleted or 0) + 1
        return True
    key = reused_key(env.uidl, sha)
    log.warning(
        "mailbox=%s uidl=%s the server lists another message under this UIDL (the ledger "
        "holds one of %s bytes, sha256 %s): it is taken as %s",
        env.mailbox.name,
        env.uidl,
        row.size if row.size is not None else "unknown",
        row.sha256[:12],
        key,
    )
    env.uidl = key
    return False


def _unread(cfg: MailboxConfig, account: str, todo: list[Todo]) -> list[Envelope]:
    return [answer_envelope(cfg, account, t, Answer(b"", 0), None) for t in todo]


@dataclass(eq=False)
class _Window:
    """Messages fetched in one pipelined exchange, on their way to the writer."""

    todo: list[Todo]
    held: int = 0  # bytes of the shared budget granted to it
    envelopes: list[Envelope] = field(default_factory=list)
    parsed: anyio.Event = field(default_factory=anyio.Event)


async def _interrupt(gateway: Gateway) -> None:
    """On cancellation: end the call blocked in the abandoned thread, then close the socket for
    real (or it leaks until the garbage collector finds it). Bounded: the cancel stays prompt."""
    gateway.interrupt()
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await anyio.to_thread.run_sync(gateway.close, abandon_on_cancel=True)


def same_by_header(gateway: Gateway, pairs: list[tuple[Listed, LedgerRow]], grant: int) -> set[int]:
    """The numbers of the known messages whose header (read alone, pipelined like the
    messages: POP3 ``TOP n 0``) carries the Message-ID their ledger row has."""
    requests = [Request(m.number, HEADER_BYTES, headers_only=True) for m, _ in pairs]
    wanted = {m.number: row.message_id for m, row in pairs}
    same: set[int] = set()
    while requests:
        answers = gateway.fetch_many(requests, grant)
        for request, answer in zip(requests, answers, strict=False):
            ident = header_message_id(answer.data) if answer.cut is None else None
            if ident is not None and ident == wanted[request.number]:
                same.add(request.number)
        requests = requests[len(answers) :]
    return same


def retr_window(
    gateway: Gateway, cfg: MailboxConfig, todo: list[Todo], grant: float, debug_dir: Path | None
) -> list[Answer]:
    """Read a window of messages; fewer than asked once they hold more than ``grant``."""
    answers = gateway.fetch_many([t.request for t in todo if t.request is not None], grant)
    if debug_dir is not None:
        for t, answer in zip(todo, answers, strict=False):
            _write_debug(debug_dir, cfg.name, t.listed.uidl or str(t.listed.number), answer.data)
    return answers


def fetch_window(
    gateway: Gateway,
    cfg: MailboxConfig,
    account: str,
    todo: list[Todo],
    grant: float,
    debug_dir: Path | None,
) -> tuple[list[Answer], list[Envelope]]:
    """Read a window of messages and parse them, in one trip to a worker thread."""
    answers = retr_window(gateway, cfg, todo, grant, debug_dir)
    return answers, [
        answer_envelope(cfg, account, t, a, _parse(cfg, t, a))
        for t, a in zip(todo, answers, strict=False)
    ]


def _parse(cfg: MailboxConfig, t: Todo, answer: Answer) -> ParsedMessage | MessageError | None:
    if kept_error(cfg, t, answer) is not None:
        return None  # not taken whole: nothing to parse
    from engine.parse import parse_raw

    return parse_raw(answer.data, cfg.max_message_bytes)


def _write_debug(folder: Path, mailbox: str, uidl: str, raw: bytes) -> None:
    """The original's /Debug: one RawMessage file per message received."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{mailbox}-{uidl}")[:150]
    (folder / f"RawMessage-{safe}.eml").write_bytes(raw)
