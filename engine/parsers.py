"""The worker processes that parse windows of messages, shared by every session.

Threads share one core for Python code (the GIL): parsing, the costliest step per message,
would compete with the writer. A process runs it beside the event loop; a session with many
messages has its windows parsed in one while it fetches the next (see engine.session).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_process
from anyio import BrokenWorkerProcess

from engine.errors import MessageError, sole
from engine.model import ParsedMessage
from engine.parse import parse_many, with_raw

# The fetcher's logger, as before the session had a module of its own: operators filter on it.
log = logging.getLogger("engine.session")


class Parsers:
    """The pool of parsing processes.

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

    async def parse(
        self,
        raws: list[bytes],
        max_bytes: int,
        thread: Callable[..., Awaitable[Any]],
        mailbox: str,
    ) -> list[ParsedMessage | MessageError]:
        """Parse ``raws`` in a process. Should the process die (a parser crash on some
        message, the OOM killer), they are parsed with ``thread`` (the session's worker
        threads) instead. Each result holds its message's bytes, which stayed here rather
        than cross the pipe twice (see engine.parse.with_raw)."""
        try:
            parsed = await anyio.to_process.run_sync(
                parse_many, raws, max_bytes, cancellable=True, limiter=self.limiter
            )
        except BrokenWorkerProcess as exc:
            log.warning(
                "mailbox=%s the parsing process failed (%s): parsing in a thread",
                mailbox,
                exc.__cause__ or exc,
            )
            parsed = await thread(parse_many, raws, max_bytes)
        return [with_raw(result, raw) for result, raw in zip(parsed, raws, strict=True)]
