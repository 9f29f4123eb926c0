"""The worker processes that parse windows of messages, shared by every session.

Threads share one core for Python code (the GIL): parsing, the costliest step per message,
would compete with the writer. A process runs it beside the event loop; a session with many
messages has its windows parsed in one while it fetches the next (see engine.session).

Each process is fed two windows at a time: while it parses one, the next waits in its pipe,
and the answers are read by worker threads, so neither side waits for the event loop, busy
with the writer, between two windows. anyio.to_process, used before, sent a window only once
the last answer had been read on the loop: the process then sat idle ~7 ms between windows
of 48 (a quarter of the time) and the engine's slowest stage with it.

The processes start only once a session wants them: a session calls :meth:`Parsers.use`
only after it has listed enough messages to use them (the session's ``process_threshold``),
and that first call is what starts them. An empty or small
mailbox, the usual cron `once`, never pays for a process (~0.15 s of CPU on the other core
for each, and its share of the machine's memory); a busy one parses its first windows in
threads meanwhile, as it did while the processes started with the engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
from anyio import BrokenWorkerProcess

from engine.errors import MessageError, sole
from engine.model import ParsedMessage

# The fetcher's logger, as before the session had a module of its own: operators filter on it.
log = logging.getLogger("engine.session")

Results = list[ParsedMessage | MessageError]

# Windows sent to a process before its answers come back: one parsed, one waiting.
DEPTH = 2
# A pipe this large (Linux's default cap for an unprivileged process; 64 KiB otherwise)
# takes a usual window of ~0.5 MB in one write: the sender does not wait on the reader's
# reads, chunk by chunk. A larger window is still sent, only in several writes.
_PIPE_BYTES = 1 << 20
# How long a process has to finish its windows and exit once its stdin is closed.
_EXIT_SECONDS = 5.0
# The parsing process's program (engine.parse.worker): it takes the engine's sys.path, the
# first pickle on its stdin, as anyio's and multiprocessing's workers do, then serves.
BOOTSTRAP: Final = (
    "import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
    "from engine.parse.worker import serve; serve()"
)


class Worker:
    """One parsing process (engine.parse.worker) and its two pipes.

    :meth:`call` runs in worker threads, up to :data:`DEPTH` at once: each sends its window
    under a lock, then waits for its turn to read, the answers coming back in the order the
    windows went. Once the process has failed (a short read, a closed pipe) every call
    raises BrokenWorkerProcess, and the pool replaces it.
    """

    def __init__(self) -> None:
        # pickle, here and below, not at the top: every start imports this module, and only
        # one with a process needs pickle (~2 ms).
        import pickle

        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        except OSError as exc:  # out of processes or file descriptors: threads will do
            raise BrokenWorkerProcess("the parsing process could not start") from exc
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests, self.answers = self.process.stdin, self.process.stdout
        for pipe in (self.requests, self.answers):
            with contextlib.suppress(OSError, AttributeError):  # not Linux, or over the cap
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        self.pending = 0  # windows sent and not yet answered (counted on the event loop)
        self._sending = threading.Lock()
        self._turn = threading.Condition()
        self._sent = 0  # tickets: the order windows went in, and their answers come out
        self._read = 0
        self._broken: BaseException | None = None
        try:
            self._send(pickle.dumps(sys.path, pickle.HIGHEST_PROTOCOL), framed=False)
        except BrokenWorkerProcess:
            self.process.kill()
            self.process.wait()
            raise
        # Only now, with the process on its way: importing engine.parse.worker imports the
        # parser (~25 ms under the GIL), which a start that never parses does without and
        # which the process's own start (~0.15 s on the other core) need not wait for.
        from engine.parse.worker import frame, read_frame

        self._frame, self._read_frame = frame, read_frame

    @property
    def alive(self) -> bool:
        return self._broken is None and self.process.poll() is None

    def call(self, raws: list[bytes], max_bytes: int) -> Results:
        """Parse a window in the process; blocks."""
        return self.results(self.exchange(raws, max_bytes))

    @staticmethod
    def results(answer: bytes) -> Results:
        """The results an answer holds; raises the error it holds instead."""
        import pickle

        ok, value = pickle.loads(answer)
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def exchange(self, raws: list[bytes], max_bytes: int) -> bytes:
        """Send a window to the process and wait for its answer, unread (see
        :func:`run_window`); blocks, so it runs in a worker thread."""
        import pickle

        request = pickle.dumps((raws, max_bytes), pickle.HIGHEST_PROTOCOL)
        with self._sending:
            ticket = self._sent
            self._sent += 1
            self._send(request)
        with self._turn:
            self._turn.wait_for(lambda: self._read == ticket or self._broken is not None)
            if self._broken is not None:
                raise BrokenWorkerProcess("the parsing process failed") from self._broken
        try:
            answer = self._read_frame(self.answers)
            if answer is None:
                raise EOFError("the parsing process ended")
        except Exception as exc:
            self._break(exc)
            raise BrokenWorkerProcess("the parsing process failed") from exc
        with self._turn:
            self._read += 1
            self._turn.notify_all()
        return answer

    def _send(self, data: bytes, *, framed: bool = True) -> None:
        try:
            if self._broken is not None:
                raise self._broken
            self.requests.write(self._frame(data) if framed else data)
            self.requests.flush()
        except Exception as exc:
            self._break(exc)
            raise BrokenWorkerProcess("the parsing process failed") from exc

    def kill(self, why: str) -> None:
        """Kill the process: every window in flight fails, and the pool replaces it."""
        self._break(RuntimeError(why))

    def _break(self, exc: BaseException) -> None:
        with self._turn:
            if self._broken is None:
                self._broken = exc
            self._turn.notify_all()
        with contextlib.suppress(OSError):
            self.process.kill()

    def close(self) -> None:
        """End the process: its stdin closed, it answers what it has and exits (killed if it
        has not within a few seconds); blocks, so it runs in a worker thread."""
        # A window still being sent (its caller cancelled) holds the pipe while the process
        # parses the one before: bounded too.
        if self._sending.acquire(timeout=_EXIT_SECONDS):
            try:
                with contextlib.suppress(OSError):
                    self.requests.close()
            finally:
                self._sending.release()
        else:
            self.kill("it did not take its last window")
        try:
            self.process.wait(_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            self.answers.close()


async def run_window(
    worker: Worker, raws: list[bytes], max_bytes: int, threads: anyio.CapacityLimiter
) -> Results:
    """Parse a window in ``worker``, its answer awaited in a worker thread of ``threads`` (a
    limiter). Cancelled, the thread still reads its answer, which keeps the others' in order,
    and drops it.

    The answer is unpickled here, on the event loop, not in the thread: glibc gives each
    thread that allocates a heap of its own, and the parsed messages, small and many, would
    be spread over them (see also engine.ops.bound_large_allocations)."""
    answer = await anyio.to_thread.run_sync(
        worker.exchange, raws, max_bytes, abandon_on_cancel=True, limiter=threads
    )
    return worker.results(answer)


class Parsers:
    """The pool of parsing processes.

    A process takes ~0.2 s to start: the engine starts them once, in the background, when
    the first session that has enough messages to use them asks for them (:meth:`use`).
    Until they are up, windows are parsed in threads; from then on a
    window waits for a process.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        # A window holds a token from sending to answer: DEPTH per process. The sessions
        # keep as many in flight (engine.session).
        self.limiter = anyio.CapacityLimiter(DEPTH * count)
        self.threads = anyio.CapacityLimiter(DEPTH * count)  # those that wait for answers
        self.workers: list[Worker] = []
        self._replacing = anyio.Lock()  # two windows finding a process gone start one
        self.wanted = anyio.Event()  # a session asked for them: start() goes on
        self.ready = anyio.Event()  # they are up

    def use(self) -> bool:
        """Whether the processes are up to parse a window, saying they are wanted: the first
        call starts them (:meth:`start` waits for it) and answers False, and the windows are
        parsed in threads until they are up."""
        self.wanted.set()
        return self.ready.is_set()

    async def start(self) -> None:
        """Once a session wants them, start every process (an empty window each, which waits
        for its imports), then let the sessions use them. Cancel it freely: nothing is started
        before it is wanted, and what started is closed by :meth:`aclose`."""
        await self.wanted.wait()

        async def one() -> None:
            async with self._replacing:  # a window may have started one meanwhile
                if len(self.workers) >= self.count:
                    return
                worker = await self._spawn()
            await run_window(worker, [], 0, self.threads)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.count):
                    tg.start_soon(one)
        except BaseExceptionGroup as group:
            broken, other = group.split(BrokenWorkerProcess)
            if other is not None or broken is None:
                raise sole(group) from None
            cause = broken.exceptions[0]
            log.warning(
                "no parsing process could start (%s): parsing in threads", cause.__cause__ or cause
            )
            await self.aclose()
            return
        self.ready.set()

    async def parse(
        self,
        raws: list[bytes],
        max_bytes: int,
        thread: Callable[..., Awaitable[Any]],
        mailbox: str,
    ) -> Results:
        """Parse ``raws`` in a process. Should the process die (a parser crash on some
        message, the OOM killer), they are parsed with ``thread`` (the session's worker
        threads) instead, and the process is replaced for the next window. Each result holds
        its message's bytes, which stayed here rather than cross the pipe twice (see
        engine.parse.with_raw)."""
        from engine.parse import parse_many, with_raw

        async with self.limiter:
            try:
                worker = await self._worker()
                worker.pending += 1
                try:
                    parsed = await run_window(worker, raws, max_bytes, self.threads)
                except anyio.get_cancelled_exc_class():
                    # The session's deadline, say: its window may be one the parser never
                    # finishes, which would hold every later window. The process goes with it,
                    # as anyio's did; the other window in flight is parsed in a thread.
                    worker.kill("a window in flight was given up")
                    raise
                finally:
                    worker.pending -= 1
            except BrokenWorkerProcess as exc:
                log.warning(
                    "mailbox=%s the parsing process failed (%s): parsing in a thread",
                    mailbox,
                    exc.__cause__ or exc,
                )
                parsed = await thread(parse_many, raws, max_bytes)
        return [with_raw(result, raw) for result, raw in zip(parsed, raws, strict=True)]

    async def _worker(self) -> Worker:
        """The least busy live process; a failed one is closed and replaced first."""
        async with self._replacing:
            for worker in [w for w in self.workers if not w.alive]:
                self.workers.remove(worker)
                await anyio.to_thread.run_sync(worker.close)
            while len(self.workers) < self.count:
                await self._spawn()
        return min(self.workers, key=lambda w: w.pending)

    async def _spawn(self) -> Worker:
        """A new process, in the pool before anything can cancel the caller: aclose ends it."""
        with anyio.CancelScope(shield=True):
            worker = await anyio.to_thread.run_sync(Worker)
            self.workers.append(worker)
        return worker

    async def aclose(self) -> None:
        """Close every process (each answers its windows first); the pool can start again."""
        workers, self.workers = self.workers, []
        with anyio.CancelScope(shield=True):
            for worker in workers:
                await anyio.to_thread.run_sync(worker.close)
        self.wanted, self.ready = anyio.Event(), anyio.Event()
