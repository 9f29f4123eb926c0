"""The worker processes that parse windows of messages, shared by every session.

Threads share one core for Python code (the GIL): parsing, the costliest step per message,
would compete with the writer. A process runs it beside the event loop; a session with many
messages has its windows parsed in one while it fetches the next (see engine.session).

The processes start only once a session wants them: a session calls :meth:`Parsers.use`
only after it has listed enough messages to use them (the session's ``process_threshold``),
and that first call is what starts them. An empty or small
mailbox, the usual cron `once`, never pays for a process (~0.15 s of CPU on the other core
for each, and its share of the machine's memory); a busy one parses its first windows in
threads meanwhile, as it did while the processes started with the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio import BrokenWorkerProcess

from engine.errors import MessageError, sole
from engine.model import ParsedMessage

# The fetcher's logger, as before the session had a module of its own: operators filter on it.
log = logging.getLogger("engine.session")


class Parsers:
    """The pool of parsing processes.

    A process takes ~0.2 s to start: the engine starts them once, in the background, when
    the first session that has enough messages to use them asks for them (:meth:`use`).
    Until they are up, windows are parsed in threads; from then on a
    window waits for a process.
    """

    def __init__(self, count: int) -> None:
        self.limiter = anyio.CapacityLimiter(count)
        self.wanted = anyio.Event()  # a session asked for them: start() goes on
        self.ready = anyio.Event()  # they are up

    def use(self) -> bool:
        """Whether the processes are up to parse a window, saying they are wanted: the first
        call starts them (:meth:`start` waits for it) and answers False, and the windows are
        parsed in threads until they are up."""
        self.wanted.set()
        return self.ready.is_set()

    async def start(self) -> None:
        """Once a session wants them, start every process (an empty window each), then let
        the sessions use them. Cancel it freely: nothing is started before it is wanted."""
        await self.wanted.wait()
        # Here, not at the top: anyio.to_process brings subprocess and pickle (~3 ms), which
        # a start that never parses apart does without.
        import anyio.to_process

        from engine.parse import parse_many

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
        import anyio.to_process  # imported by start(), which made the processes

        from engine.parse import parse_many, with_raw

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
