"""One mailbox session: POP3 in a worker thread, messages to the writer, DELE after the ack.

The order is the whole point: RETR → parse → hand to the writer → wait for the answer that the
outcome is committed → DELE → QUIT. A message whose answer never comes (crash, cancellation,
failed commit) is never deleted; the next session finds it again, and the ledger makes sure
it is not processed twice.

A message the ledger already holds is deleted again only once it is known to be the same
message (:func:`plan_session`): same listed size, and the same Message-ID in its header
(``TOP n 0``) where the server has TOP; otherwise it is fetched and its hash compared, and a
different message under a reused UIDL is processed under a key of its own. A message that
cannot be taken whole (over ``maxMessageBytes``, larger than listed, a line over the limit)
becomes a failure event and stays on the server: it is never deleted.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_process
import anyio.to_thread
from anyio import BrokenWorkerProcess
from anyio.streams.memory import MemoryObjectSendStream

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
from engine.items import DirectoryCheck, Envelope, Item, Kind, KnownQuery, Outcome
from engine.keys import content_key, reused_key
from engine.model import LedgerRow, ParsedMessage
from engine.parse import parse_many, parse_raw, with_raw

log = logging.getLogger("engine.fetcher")

T = TypeVar("T")


@dataclass
class SessionResult:
    listed: int = 0
    fetched: int = 0
    processed: int = 0
    failed: int = 0
    deleted: int = 0
    # The ledger's account for the mailbox, and the keys whose DELE a QUIT confirmed.
    account: str | None = None
    deleted_keys: list[str] = field(default_factory=list)
    # Listed again although the server had confirmed their deletion (None: not listed).
    kept_deleted: int | None = None


class ByteBudget:
    """Bounds the bytes of fetched messages not yet acknowledged by the writer, over all
    mailboxes: the queue is bounded by count, this bounds it by size (a burst of 20 MB
    messages must not pile up in memory). One grant larger than the budget proceeds alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = anyio.Event()

    def available(self, size: int) -> bool:
        """Whether :meth:`acquire` would grant ``size`` at once."""
        return not self.used or self.used + min(size, self.limit) <= self.limit

    async def acquire(self, size: int) -> int:
        size = min(size, self.limit)
        while not self.available(size):
            await self._freed.wait()
        self.used += size
        return size

    def release(self, size: int) -> None:
        """Called by the writer once a message is answered; never blocks."""
        self.used -= size
        freed, self._freed = self._freed, anyio.Event()
        freed.set()

    def settle(self, granted: int, held: int) -> int:
        """Replace a grant, made on the sizes the server listed, by the bytes really held
        once read, and return them. Never blocks: over the limit, grants wait until enough
        comes back (a LIST that lies cannot make the budget hold more than it says)."""
        if held < granted:
            self.release(granted - held)
        else:
            self.used += held - granted
        return held


class Parsers:
    """The worker processes that parse windows of messages, shared by every session.

    A process takes ~0.2 s to start: the engine starts them once, in the background, while it
    logs in and the first sessions connect. Until they are up, windows are parsed in
    threads; from then on a window waits for a process.
    """

    def __init__(self, count: int) -> None:
        self.limiter = anyio.CapacityLimiter(count)
        self.ready = anyio.Event()

    async def start(self) -> None:
        """Start every process (an empty window each), then let the sessions use them."""

        async def one() -> None:
            limiter = self.limiter
            await anyio.to_process.run_sync(parse_many, [], 0, cancellable=True, limiter=limiter)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(int(self.limiter.total_tokens)):
                    tg.start_soon(one)
        except BaseExceptionGroup as group:
            broken, other = group.split(BrokenWorkerProcess)
            if other is not None or broken is None:
                raise sole(group) from None
            cause = broken.exceptions[0]
            log.warning(
                "no parsing process could start (%s): parsing in threads", cause.__cause__ or cause
            )
            return
        self.ready.set()


@dataclass(frozen=True)
class FetchOptions:
    limiter: anyio.CapacityLimiter | None = None
    dry_run: bool = False
    debug_dir: Path | None = None
    on_envelope: Callable[[Envelope], None] | None = None
    # Once set, no further message is fetched: the session settles what it has and QUITs.
    stop: anyio.Event | None = None
    # Messages per pipelined RETR exchange, and the most bytes one exchange may announce.
    window: int = 48
    window_bytes: int = 4 * 1024 * 1024
    # Shared by every fetcher: bytes of messages between RETR and their acknowledgement.
    budget: ByteBudget | None = None
    # Worker processes for parsing, shared by every fetcher (None: parse in threads). Worth
    # the trip only for sessions with many messages, and only for windows of small ones: a
    # large message is parsed in a thread rather than copied to a process.
    processes: Parsers | None = None
    process_threshold: int = 64
    process_message_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class Todo:
    """A listed message to read: its request (None: nothing to read, see plan_session) and,
    for a UIDL the ledger already holds, that row, to tell the same message from another
    one under a reused UIDL once it is read."""

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
    # Known, and the same by their listed size: deleted without being fetched.
    delete: list[tuple[Listed, LedgerRow]] = field(default_factory=list)
    # Known, the same size: deleted once TOP's Message-ID matches the ledger's too.
    by_header: list[tuple[Listed, LedgerRow]] = field(default_factory=list)
    # Known and left alone: left on the server before (still too large, a line too long),
    # or now listed over maxMessageBytes.
    skipped: int = 0


def plan_session(
    cfg: MailboxConfig, listing: list[Listed], known: dict[str, LedgerRow], *, top: bool | None
) -> Plan:
    """Sort the listing (``top``: whether the server announced TOP; None if it has no
    CAPA, and then TOP is never sent: an -ERR to it would end every session)."""
    plan = Plan()
    limit = cfg.max_message_bytes
    for m in listing:
        row = known.get(m.uidl) if m.uidl is not None else None
        if row is None:
            if m.size <= limit:
                plan.todo.append(Todo(m, Request(m.number, read_cap(m.size, limit))))
            else:  # only its header, for the failure event; it stays on the server
                header = Request(m.number, HEADER_BYTES, headers_only=True)
                plan.todo.append(Todo(m, header if top else None))
        elif row.kept and row.size == m.size:
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
    return plan


def make_envelope(cfg: MailboxConfig, uidl: str | None, raw: bytes) -> Envelope:
    """Parse one message (CPU work: runs in a worker thread, off the event loop)."""
    return envelope_for(cfg, uidl, raw, parse_raw(raw, cfg.max_message_bytes))


def envelope_for(
    cfg: MailboxConfig,
    uidl: str | None,
    raw: bytes,
    result: ParsedMessage | MessageError,
    *,
    account: str = "",
    size: int | None = None,
) -> Envelope:
    if isinstance(result, ParsedMessage):
        key = uidl or content_key(result.sha256)
        return Envelope(cfg, key, raw, result, account=account, size=size)
    key = uidl or content_key(hashlib.sha256(raw).hexdigest())
    return Envelope(cfg, key, raw, None, error=result, account=account, size=size)


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
    it was not taken whole (:func:`kept_error`), else its parsing ``result``."""
    kept = kept_error(cfg, t, answer)
    if kept is not None or result is None:
        error = kept or MessageError("internal error: not parsed")
        return envelope_for(
            cfg, t.listed.uidl, answer.data, error, account=account, size=t.listed.size
        )
    return envelope_for(
        cfg, t.listed.uidl, answer.data, result, account=account, size=t.listed.size
    )


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


def same_by_header(session: Gateway, pairs: list[tuple[Listed, LedgerRow]], grant: int) -> set[int]:
    """The numbers of the known messages whose header (``TOP n 0``, pipelined like RETR)
    carries the Message-ID their ledger row has."""
    requests = [Request(m.number, HEADER_BYTES, headers_only=True) for m, _ in pairs]
    wanted = {m.number: row.message_id for m, row in pairs}
    same: set[int] = set()
    while requests:
        answers = session.fetch_many(requests, grant)
        for request, answer in zip(requests, answers, strict=False):
            ident = header_message_id(answer.data) if answer.cut is None else None
            if ident is not None and ident == wanted[request.number]:
                same.add(request.number)
        requests = requests[len(answers) :]
    return same


async def submit(send: MemoryObjectSendStream[Item], item: Item) -> Item:
    """Send an item to the writer and wait for its answer; a failed commit raises."""
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

    The whole session is bounded by its deadline (engine.gateways.session_seconds), here as in
    the thread that talks to the server, which checks it before every read: past it, a
    thread still blocked is abandoned, its socket shut down (no QUIT: nothing is deleted),
    and the session ends as a ``timeout`` outage.
    """
    check = await submit(send, DirectoryCheck(mailbox=cfg, remember=not opts.dry_run))
    assert isinstance(check, DirectoryCheck)
    if check.problem is not None:
        raise check.problem
    session = gateway_for(cfg.server)
    with anyio.CancelScope() as scope:

        def follow() -> None:
            # A little later than the thread's own check, whose error says more.
            scope.deadline = anyio.current_time() + session.deadline - time.monotonic() + 2

        follow()
        result = SessionResult() if result is None else result
        result.account = check.account
        return await _session(cfg, send, opts, session, result, follow)
    raise FetchTimeout(
        f"the session with {cfg.server.host}:{cfg.server.port} went over its deadline of "
        f"{session.seconds:.0f} s and was dropped"
    )


async def _session(
    cfg: MailboxConfig,
    send: MemoryObjectSendStream[Item],
    opts: FetchOptions,
    session: Gateway,
    result: SessionResult,
    follow: Callable[[], None],
) -> SessionResult:
    async def thread(fn: Callable[..., T], *args: object) -> T:
        # A thread cannot be cancelled; on cancellation we abandon it and shut its socket
        # (below), which ends it at once. Without QUIT the server deletes nothing (RFC 1939).
        return await anyio.to_thread.run_sync(
            fn, *args, limiter=opts.limiter, abandon_on_cancel=True
        )

    account = result.account or cfg.account  # as the writer resolved it (DirectoryCheck)
    # Windows fetched and not yet handed to the writer, oldest first: each holds its grant of
    # the byte budget until its last envelope is sent (the writer then gives it back).
    inflight: deque[_Window] = deque()
    by_number: dict[int, Listed] = {}

    def give_back() -> None:
        for w in inflight:
            if w.held and opts.budget is not None:
                opts.budget.release(w.held)
            w.held = 0

    try:
        await thread(session.open)
    except anyio.get_cancelled_exc_class():
        await _interrupt(session)  # or the abandoned thread logs in and leaks the session
        raise
    try:
        listing = await thread(session.listing)
        result.listed = len(listing)
        by_number.update((m.number, m) for m in listing)
        query = KnownQuery(account=account, uidls=[m.uidl for m in listing if m.uidl])
        await submit(send, query)
        assert isinstance(query, KnownQuery)
        plan = plan_session(cfg, listing, query.known, top=session.top)
        session.extend(sum(t.expected for t in plan.todo) + HEADER_BYTES * len(plan.by_header))
        follow()
        await _dispose_known(cfg, plan, session, thread, opts, result)
        todo = [t for t in plan.todo if t.request is not None]
        unread = [t for t in plan.todo if t.request is None]
        if unread:  # over maxMessageBytes on a server without TOP: failure events, unread
            inflight.append(_Window(unread, envelopes=_unread(cfg, account, unread)))
            inflight[0].parsed.set()
        pending: list[tuple[int, Envelope]] = []

        async def settle(ready: list[tuple[int, Envelope]]) -> None:
            """Count the answered messages and DELE them, in one exchange with the server;
            never those left on the server (kept)."""
            gone = []
            failed: list[int] = []
            for number, env in ready:
                if not env.done.is_set():  # wait() yields to the event loop even when set
                    await env.done.wait()
                if env.failure is not None or env.outcome is None:
                    raise StoreError(f"message {env.uidl} was not committed: {env.failure}")
                if env.outcome.kind is Kind.KEPT:
                    # Left on the server, never deleted; a failure event the first time.
                    result.failed += env.outcome.failed
                    continue
                if env.outcome.kind is Kind.FAILED:
                    result.failed += 1
                    failed.append(number)
                else:
                    result.processed += 1
                gone.append((number, env.uidl))
            if gone and not opts.dry_run:
                await thread(session.dispose, [number for number, _ in gone], failed)
                result.deleted += len(gone)
                result.deleted_keys += [key for _, key in gone]

        async def deliver(w: _Window) -> None:
            """Hand a parsed window to the writer, in fetch order; DELE what is answered."""
            await w.parsed.wait()
            result.fetched += len(w.envelopes)
            final = not todo and len(inflight) == 1  # nothing more to send after this window
            mine = [
                env
                for t, env in zip(w.todo, w.envelopes, strict=True)
                if not _known(t, env, result)
            ]
            for t, env in zip(w.todo, w.envelopes, strict=True):
                pending.append((t.listed.number, env))
                if env.done.is_set():
                    continue  # the same message as its ledger row: deleted, not sent
                env.dry_run = opts.dry_run
                env.last = final and env is mine[-1]
                if opts.budget is not None and env is mine[-1]:
                    # From here the writer gives the window's bytes back once it answers.
                    env.on_done = functools.partial(opts.budget.release, w.held)
                    await _send(send, env)
                    w.held = 0
                else:
                    await _send(send, env)
                if opts.on_envelope is not None:
                    opts.on_envelope(env)
            if w.held and opts.budget is not None:  # nothing of it went to the writer
                opts.budget.release(w.held)
                w.held = 0
            # Delete what is already acknowledged, so few messages are held at once; never
            # while answers are still to be read (the DELE's would be taken for theirs).
            ready = 0
            while ready < len(pending) and pending[ready][1].done.is_set():
                ready += 1
            if ready and not session.mid_exchange:
                await settle(pending[:ready])
                del pending[:ready]

        window = opts.window if session.pipelining else 1
        # Parsing apart: while worker processes parse the last windows, the next is fetched.
        parsers = opts.processes if len(todo) >= opts.process_threshold else None
        depth = int(parsers.limiter.total_tokens) if parsers is not None else 0
        try:
            async with anyio.create_task_group() as tg:
                while todo:
                    if opts.stop is not None and opts.stop.is_set() and not session.mid_exchange:
                        log.info("mailbox=%s stopping: the rest stays on the server", cfg.name)
                        break
                    # A window of messages fetched in one pipelined exchange, bounded by count
                    # and by the bytes the server announced, and only once the shared byte
                    # budget allows it.
                    take, size = 1, todo[0].expected
                    while (
                        take < min(window, len(todo))
                        and size + todo[take].expected <= opts.window_bytes
                    ):
                        size += todo[take].expected
                        take += 1
                    if opts.budget is not None and not opts.budget.available(size):
                        # The windows in flight hold budget the writer gives back only once
                        # they reach it: hand them over before waiting for more.
                        while inflight:
                            await deliver(inflight[0])
                            inflight.popleft()
                    w = _Window(todo[:take])
                    inflight.append(w)
                    w.held = await opts.budget.acquire(size) if opts.budget else 0
                    grant = w.held if opts.budget else math.inf
                    # Once the processes are up, a window waits for one rather than be parsed
                    # in a thread (meanwhile the next is fetched): a thread parsing holds the
                    # GIL, and every handover the writer and SQLite's thread make then waits
                    # for it. With 16 sessions parsing in threads, the writer took 0.53 ms per
                    # message inside its transactions instead of 0.2; one process parses
                    # ~3,500 messages a second here, more than the writer commits.
                    apart = (
                        parsers is not None
                        and parsers.ready.is_set()
                        and all(t.listed.size <= opts.process_message_bytes for t in w.todo)
                    )
                    if apart:
                        answers = await thread(
                            retr_window, session, cfg, w.todo, grant, opts.debug_dir
                        )
                    else:
                        answers, w.envelopes = await thread(
                            fetch_window, session, cfg, account, w.todo, grant, opts.debug_dir
                        )
                    # Read fewer than asked (the server's sizes were below the truth): the
                    # rest, already asked for, comes first in the next window.
                    w.todo, todo = w.todo[: len(answers)], todo[len(answers) :]
                    if opts.budget is not None:
                        w.held = opts.budget.settle(w.held, sum(len(a.data) for a in answers))
                    if apart:
                        assert parsers is not None
                        tg.start_soon(_parse_apart, cfg, account, w, answers, parsers, thread)
                    else:
                        w.parsed.set()
                    while inflight and (len(inflight) > depth or inflight[0].parsed.is_set()):
                        await deliver(inflight[0])
                        inflight.popleft()
                while inflight:
                    await deliver(inflight[0])
                    inflight.popleft()
        except BaseExceptionGroup as group:
            raise sole(group) from None
        if pending:
            await settle(pending)
            pending.clear()
        await thread(session.quit)
    except anyio.get_cancelled_exc_class():
        give_back()
        await _interrupt(session)
        raise
    except BaseException as exc:
        give_back()
        if isinstance(exc, FetchError) and exc.unfinished is not None and not opts.dry_run:
            await _keep_unfinished(cfg, account, send, by_number, exc)
        with anyio.CancelScope(shield=True):
            # RSET undoes this session's deletions; a dead socket does the same by itself.
            await anyio.to_thread.run_sync(session.abort)
        raise
    return result


async def _dispose_known(
    cfg: MailboxConfig,
    plan: Plan,
    session: Gateway,
    thread: Callable[..., Awaitable[Any]],
    opts: FetchOptions,
    result: SessionResult,
) -> None:
    """Delete the messages the ledger holds already, once sure each is the same message;
    the others join ``plan.todo``, to be fetched and compared."""
    if plan.by_header:
        same = await thread(same_by_header, session, plan.by_header, opts.window_bytes)
        for m, row in plan.by_header:
            if m.number in same:
                plan.delete.append((m, row))
            else:
                plan.todo.insert(
                    0, Todo(m, Request(m.number, read_cap(m.size, cfg.max_message_bytes)), row)
                )
    result.kept_deleted = sum(row.deleted_at is not None for _, row in plan.delete)
    if plan.skipped:
        log.info("mailbox=%s %d message(s) left on the server as before", cfg.name, plan.skipped)
    if plan.delete and not opts.dry_run:
        log.info(
            "mailbox=%s %d message(s) already in the ledger: deleting", cfg.name, len(plan.delete)
        )
        await thread(session.dispose, [m.number for m, _ in plan.delete])
        result.deleted += len(plan.delete)
        result.deleted_keys += [key for m, _ in plan.delete if (key := m.uidl) is not None]


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


async def _keep_unfinished(
    cfg: MailboxConfig,
    account: str,
    send: MemoryObjectSendStream[Item],
    by_number: dict[int, Listed],
    exc: FetchError,
) -> None:
    """The session lost step in a message it had already cut off: record that message as
    left on the server (what was read, and that it needs more than that) before the session
    ends, so the next one skips it instead of meeting it again, and again."""
    request, answer = exc.unfinished
    m = by_number[request.number]
    partial = Answer(answer.data, answer.octets + 1, answer.cut)  # more than was read
    env = answer_envelope(cfg, account, Todo(m, request), partial, None)
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        try:
            await submit(send, env)
        except StoreError as failed:
            log.error("mailbox=%s uidl=%s could not be recorded: %s", cfg.name, m.uidl, failed)


@dataclass(eq=False)
class _Window:
    """Messages fetched in one pipelined exchange, on their way to the writer."""

    todo: list[Todo]
    held: int = 0  # bytes of the shared budget granted to it
    envelopes: list[Envelope] = field(default_factory=list)
    parsed: anyio.Event = field(default_factory=anyio.Event)


async def _interrupt(session: Gateway) -> None:
    """On cancellation: end the call blocked in the abandoned thread, then close the socket for
    real (or it leaks until the garbage collector finds it). Bounded: the cancel stays prompt."""
    session.interrupt()
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await anyio.to_thread.run_sync(session.close, abandon_on_cancel=True)


def retr_window(
    session: Gateway, cfg: MailboxConfig, todo: list[Todo], grant: float, debug_dir: Path | None
) -> list[Answer]:
    """Read a window of messages; fewer than asked once they hold more than ``grant``."""
    answers = session.fetch_many([t.request for t in todo if t.request is not None], grant)
    if debug_dir is not None:
        for t, answer in zip(todo, answers, strict=False):
            _write_debug(debug_dir, cfg.name, t.listed.uidl or str(t.listed.number), answer.data)
    return answers


def fetch_window(
    session: Gateway,
    cfg: MailboxConfig,
    account: str,
    todo: list[Todo],
    grant: float,
    debug_dir: Path | None,
) -> tuple[list[Answer], list[Envelope]]:
    """RETR a window of messages and parse them, in one trip to a worker thread."""
    answers = retr_window(session, cfg, todo, grant, debug_dir)
    return answers, [
        answer_envelope(cfg, account, t, a, _parse(cfg, t, a))
        for t, a in zip(todo, answers, strict=False)
    ]


def _parse(cfg: MailboxConfig, t: Todo, answer: Answer) -> ParsedMessage | MessageError | None:
    if kept_error(cfg, t, answer) is not None:
        return None  # not taken whole: nothing to parse
    return parse_raw(answer.data, cfg.max_message_bytes)


async def _parse_apart(
    cfg: MailboxConfig,
    account: str,
    w: _Window,
    answers: list[Answer],
    parsers: Parsers,
    thread: Callable[..., Awaitable[Any]],
) -> None:
    """Parse a fetched window in a worker process, then mark it parsed.

    Threads share one core for Python code (the GIL): parsing, the costliest step per
    message, would compete with the writer. A process runs it beside the event loop. Should
    the process die (a parser crash on some message, the OOM killer), the window is parsed
    in a thread as before. A message not taken whole is not parsed at all.
    """
    whole = [
        i
        for i, (t, a) in enumerate(zip(w.todo, answers, strict=True))
        if kept_error(cfg, t, a) is None
    ]
    raws = [answers[i].data for i in whole]
    try:
        parsed = await anyio.to_process.run_sync(
            parse_many, raws, cfg.max_message_bytes, cancellable=True, limiter=parsers.limiter
        )
    except BrokenWorkerProcess as exc:
        log.warning(
            "mailbox=%s the parsing process failed (%s): parsing in a thread",
            cfg.name,
            exc.__cause__ or exc,
        )
        parsed = await thread(parse_many, raws, cfg.max_message_bytes)
    results: list[ParsedMessage | MessageError | None] = [None] * len(answers)
    for i, result in zip(whole, parsed, strict=True):
        results[i] = with_raw(result, answers[i].data)
    w.envelopes = [
        answer_envelope(cfg, account, t, a, r)
        for t, a, r in zip(w.todo, answers, results, strict=True)
    ]
    w.parsed.set()


def _write_debug(folder: Path, mailbox: str, uidl: str, raw: bytes) -> None:
    """The original's /Debug: one RawMessage file per message received."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{mailbox}-{uidl}")[:150]
    (folder / f"RawMessage-{safe}.eml").write_bytes(raw)
