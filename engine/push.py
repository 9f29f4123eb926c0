"""Push: the daemon's wait for new mail between two sessions of an IMAP mailbox, by IDLE.

Between sessions the daemon waits ``pollIntervalSeconds`` (:mod:`engine.supervisor`). For an
IMAP mailbox with ``idle`` (the default), :func:`idle_until_mail` runs beside that wait and
ends it as soon as the server announces new mail, so a message is fetched within a second of
its delivery instead of at the next poll. The poll stays as the safety net, and is all there
is where the server has no IDLE.

What one mailbox costs while it waits: one more IMAP connection (a socket, so one file
descriptor) and one worker thread blocked on it, from a capacity limiter of its own (the
sessions' threads are never taken by waits). Past that limit a mailbox simply polls.

The IDLE connection itself (:class:`engine.gateways.imap.IdleWatcher`) renews its IDLE
before the 29-minute limit and sends NOOP keep-alives, each answered within
``timeoutSeconds`` or the connection is taken as dropped; a failure of any kind reconnects
after a backoff (1 s, doubling, at most 60 s) within the same wait.

Mail delivered between a session's listing and the next IDLE is not missed: the folder's
UIDNEXT as of the last session's listing, or of the last push, is remembered (``mark``), and
a new IDLE connection whose SELECT shows a larger one ends the wait at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.to_thread

from engine.config import ServerConfig
from engine.errors import FetchError

if TYPE_CHECKING:
    from engine.gateways.imap import IdleWatcher
    from engine.oauth.broker import TokenBroker
    from engine.session import SessionResult

log = logging.getLogger("engine.push")

T = TypeVar("T")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


@dataclass
class PushState:
    """What a mailbox's waits carry from one to the next."""

    name: str
    # UIDNEXT of the watched folder as of the last listing or push (None: not known yet).
    mark: int | None = None
    # Set once the server was found to have no IDLE: the mailbox only polls from then on.
    unsupported: bool = False

    def learn(self, result: SessionResult | None) -> None:
        """A session listed everything below its ``mark``: no wait need wake for that."""
        mark = result.mark if result is not None else None
        if mark is not None and (self.mark is None or mark > self.mark):
            self.mark = mark


def wants_push(server: ServerConfig) -> bool:
    """Whether waits for this mailbox's mail use IDLE."""
    return server.gateway == "imap" and server.idle


async def idle_until_mail(
    state: PushState,
    server: ServerConfig,
    seconds: float,
    limiter: anyio.CapacityLimiter,
    wake: Callable[[], None],
    tokens: TokenBroker | None = None,
) -> None:
    """Wait up to ``seconds`` for new mail by IDLE and call ``wake`` when it comes; returns
    without calling it when the time is up or the server has no IDLE. Cancel it freely: the
    blocked thread is interrupted and its connection closed."""
    # Here rather than at the top: a `once`, and a daemon without IMAP mailboxes, never wait
    # by IDLE, and imaplib with the IMAP gateway was ~7 ms of every start.
    from engine.gateways.imap import IdleWatcher

    end = anyio.current_time() + seconds
    backoff = BACKOFF_FIRST
    while not state.unsupported and (left := end - anyio.current_time()) > 0:
        watcher = IdleWatcher(server, tokens)
        try:
            if not await _thread(watcher, limiter, watcher.open):
                log.info("mailbox=%s the server has no IDLE: polling only", state.name)
                state.unsupported = True
                return
            gateway = watcher.gateway
            if state.mark is None:
                state.mark = gateway.uidnext
            left = end - anyio.current_time()
            mark = await _thread(watcher, limiter, watcher.wait, left, state.mark)
            if mark is not None:
                state.mark = mark
                log.info("mailbox=%s new mail announced (IDLE)", state.name)
                wake()
                return
            backoff = BACKOFF_FIRST
        except FetchError as exc:
            pause = min(backoff, max(0.0, end - anyio.current_time()))
            log.warning(
                "mailbox=%s IDLE failed (%s: %s): reconnecting in %.0f s",
                state.name,
                exc.cause,
                exc,
                pause,
            )
            await anyio.sleep(pause)
            backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await anyio.to_thread.run_sync(watcher.close, abandon_on_cancel=True)


async def _thread(
    watcher: IdleWatcher, limiter: anyio.CapacityLimiter, fn: Callable[..., T], *args: object
) -> T:
    """A blocking call of the watcher in a worker thread; on cancellation the thread is
    abandoned and its socket shut, which ends the call at once."""
    try:
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        watcher.interrupt()
        raise
