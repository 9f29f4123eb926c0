"""One mailbox session: POP3 in a worker thread, messages to the writer, DELE after the ack.

The order is the whole point: RETR → parse → hand to the writer → wait for the answer that the
outcome is committed → DELE → QUIT. A message whose answer never comes (crash, cancellation,
failed commit) is never deleted; the next session finds it again, and the ledger makes sure
it is not processed twice.
"""

from __future__ import annotations

import functools
import hashlib
import logging
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
from engine.errors import MessageError, StoreError, sole
from engine.model import ParsedMessage
from engine.parse import parse_many, parse_raw, with_raw
from engine.pop3 import Listed, Pop3Session
from engine.writer import DirectoryCheck, Envelope, Item, KnownQuery

log = logging.getLogger("engine.fetcher")

T = TypeVar("T")


@dataclass
class SessionResult:
    listed: int = 0
    fetched: int = 0
    processed: int = 0
    failed: int = 0
    deleted: int = 0


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


def make_envelope(cfg: MailboxConfig, uidl: str | None, raw: bytes) -> Envelope:
    """Parse one message (CPU work: runs in a worker thread, off the event loop)."""
    return envelope_for(cfg, uidl, raw, parse_raw(raw, cfg.max_message_bytes))


def envelope_for(
    cfg: MailboxConfig, uidl: str | None, raw: bytes, result: ParsedMessage | MessageError
) -> Envelope:
    if isinstance(result, ParsedMessage):
        key = uidl or f"x-sha256:{result.sha256}"
        return Envelope(mailbox=cfg, uidl=key, raw=raw, parsed=result)
    key = uidl or f"x-sha256:{hashlib.sha256(raw).hexdigest()}"
    return Envelope(mailbox=cfg, uidl=key, raw=raw, parsed=None, error=result)


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
    tells how far it got."""
    check = await submit(send, DirectoryCheck(mailbox=cfg))
    assert isinstance(check, DirectoryCheck)
    if check.problem is not None:
        raise check.problem

    async def thread(fn: Callable[..., T], *args: object) -> T:
        # A thread cannot be cancelled; on cancellation we abandon it and shut its socket
        # (below), which ends it at once. Without QUIT the server deletes nothing (RFC 1939).
        return await anyio.to_thread.run_sync(
            fn, *args, limiter=opts.limiter, abandon_on_cancel=True
        )

    result = SessionResult() if result is None else result
    session = Pop3Session(cfg.server)
    # Windows fetched and not yet handed to the writer, oldest first: each holds its grant of
    # the byte budget until its last envelope is sent (the writer then gives it back).
    inflight: deque[_Window] = deque()

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
        query = KnownQuery(account=cfg.account, uidls=[m.uidl for m in listing if m.uidl])
        await submit(send, query)
        assert isinstance(query, KnownQuery)
        pending: list[tuple[int, Envelope]] = []

        async def settle(ready: list[tuple[int, Envelope]]) -> None:
            """Count the answered messages and DELE them, in one exchange with the server."""
            for _, env in ready:
                if not env.done.is_set():  # wait() yields to the event loop even when set
                    await env.done.wait()
                if env.failure is not None or env.outcome is None:
                    raise StoreError(f"message {env.uidl} was not committed: {env.failure}")
                if env.outcome.startswith("failed"):
                    result.failed += 1
                else:
                    result.processed += 1
            if not opts.dry_run:
                await thread(session.dele_many, [number for number, _ in ready])
                result.deleted += len(ready)

        async def deliver(w: _Window) -> None:
            """Hand a parsed window to the writer, in fetch order; DELE what is answered."""
            await w.parsed.wait()
            result.fetched += len(w.envelopes)
            final = not todo and len(inflight) == 1  # nothing more to send after this window
            for i, (m, env) in enumerate(zip(w.listed, w.envelopes, strict=True)):
                env.dry_run = opts.dry_run
                env.last = final and i == len(w.envelopes) - 1
                if opts.budget is not None and i == len(w.envelopes) - 1:
                    # From here the writer gives the window's bytes back once it answers.
                    env.on_done = functools.partial(opts.budget.release, w.held)
                    await _send(send, env)
                    w.held = 0
                else:
                    await _send(send, env)
                if opts.on_envelope is not None:
                    opts.on_envelope(env)
                pending.append((m.number, env))
            # Delete what is already acknowledged, so few messages are held at once.
            ready = 0
            while ready < len(pending) and pending[ready][1].done.is_set():
                ready += 1
            if ready:
                await settle(pending[:ready])
                del pending[:ready]

        known = [m.number for m in listing if m.uidl is not None and m.uidl in query.known]
        if known and not opts.dry_run:
            log.info(
                "mailbox=%s %d message(s) already in the ledger: deleting", cfg.name, len(known)
            )
            await thread(session.dele_many, known)
            result.deleted += len(known)
        todo = [m for m in listing if m.uidl is None or m.uidl not in query.known]
        window = opts.window if session.pipelining else 1
        # Parsing apart: while worker processes parse the last windows, the next is fetched.
        parsers = opts.processes if len(todo) >= opts.process_threshold else None
        depth = int(parsers.limiter.total_tokens) if parsers is not None else 0
        try:
            async with anyio.create_task_group() as tg:
                while todo:
                    if opts.stop is not None and opts.stop.is_set():
                        log.info("mailbox=%s stopping: the rest stays on the server", cfg.name)
                        break
                    # A window of messages fetched in one pipelined exchange, bounded by count
                    # and by the bytes the server announced, and only once the shared byte
                    # budget allows it.
                    take, size = 1, todo[0].size
                    while (
                        take < min(window, len(todo))
                        and size + todo[take].size <= opts.window_bytes
                    ):
                        size += todo[take].size
                        take += 1
                    if opts.budget is not None and not opts.budget.available(size):
                        # The windows in flight hold budget the writer gives back only once
                        # they reach it: hand them over before waiting for more.
                        while inflight:
                            await deliver(inflight[0])
                            inflight.popleft()
                    w = _Window(todo[:take])
                    todo = todo[take:]
                    inflight.append(w)
                    w.held = await opts.budget.acquire(size) if opts.budget else 0
                    # Once the processes are up, a window waits for one rather than be parsed
                    # in a thread (meanwhile the next is fetched): a thread parsing holds the
                    # GIL, and every handover the writer and SQLite's thread make then waits
                    # for it. With 16 sessions parsing in threads, the writer took 0.53 ms per
                    # message inside its transactions instead of 0.2; one process parses
                    # ~3,500 messages a second here, more than the writer commits.
                    if (
                        parsers is not None
                        and parsers.ready.is_set()
                        and all(m.size <= opts.process_message_bytes for m in w.listed)
                    ):
                        raws = await thread(retr_window, session, cfg, w.listed, opts.debug_dir)
                        tg.start_soon(_parse_apart, cfg, w, raws, parsers, thread)
                    else:
                        w.envelopes = await thread(
                            fetch_window, session, cfg, w.listed, opts.debug_dir
                        )
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
    except BaseException:
        give_back()
        with anyio.CancelScope(shield=True):
            # RSET undoes this session's deletions; a dead socket does the same by itself.
            await anyio.to_thread.run_sync(session.abort)
        raise
    return result


@dataclass(eq=False)
class _Window:
    """Messages fetched in one pipelined exchange, on their way to the writer."""

    listed: list[Listed]
    held: int = 0  # bytes of the shared budget granted to it
    envelopes: list[Envelope] = field(default_factory=list)
    parsed: anyio.Event = field(default_factory=anyio.Event)


async def _interrupt(session: Pop3Session) -> None:
    """On cancellation: end the call blocked in the abandoned thread, then close the socket for
    real (or it leaks until the garbage collector finds it). Bounded: the cancel stays prompt."""
    session.interrupt()
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await anyio.to_thread.run_sync(session.close, abandon_on_cancel=True)


def retr_window(
    session: Pop3Session, cfg: MailboxConfig, listed: list[Listed], debug_dir: Path | None
) -> list[bytes]:
    raws = session.retr_many([m.number for m in listed])
    if debug_dir is not None:
        for m, raw in zip(listed, raws, strict=True):
            _write_debug(debug_dir, cfg.name, m.uidl or str(m.number), raw)
    return raws


def fetch_window(
    session: Pop3Session, cfg: MailboxConfig, listed: list[Listed], debug_dir: Path | None
) -> list[Envelope]:
    """RETR a window of messages and parse them, in one trip to a worker thread."""
    raws = retr_window(session, cfg, listed, debug_dir)
    return [make_envelope(cfg, m.uidl, raw) for m, raw in zip(listed, raws, strict=True)]


async def _parse_apart(
    cfg: MailboxConfig,
    w: _Window,
    raws: list[bytes],
    parsers: Parsers,
    thread: Callable[..., Awaitable[Any]],
) -> None:
    """Parse a fetched window in a worker process, then mark it parsed.

    Threads share one core for Python code (the GIL): parsing, the costliest step per
    message, would compete with the writer. A process runs it beside the event loop. Should
    the process die (a parser crash on some message, the OOM killer), the window is parsed
    in a thread as before.
    """
    try:
        results = await anyio.to_process.run_sync(
            parse_many, raws, cfg.max_message_bytes, cancellable=True, limiter=parsers.limiter
        )
    except BrokenWorkerProcess as exc:
        log.warning(
            "mailbox=%s the parsing process failed (%s): parsing in a thread",
            cfg.name,
            exc.__cause__ or exc,
        )
        results = await thread(parse_many, raws, cfg.max_message_bytes)
    w.envelopes = [
        envelope_for(cfg, m.uidl, raw, with_raw(result, raw))
        for m, raw, result in zip(w.listed, raws, results, strict=True)
    ]
    w.parsed.set()


def _write_debug(folder: Path, mailbox: str, uidl: str, raw: bytes) -> None:
    """The original's /Debug: one RawMessage file per message received."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{mailbox}-{uidl}")[:150]
    (folder / f"RawMessage-{safe}.eml").write_bytes(raw)
