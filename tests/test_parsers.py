"""The parsing process and its pipes (engine.parsers.Worker, engine.parse.worker)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import anyio
import pytest
from anyio import BrokenWorkerProcess
from support import message

from engine.model import ParsedMessage
from engine.parse import parse_message, with_raw
from engine.parse.worker import LENGTH, read_frame
from engine.parsers import Parsers, Worker

MAX = 25 * 1024 * 1024


@pytest.fixture
def worker() -> Any:
    w = Worker()
    yield w
    w.close()


def parsed(worker: Worker, raws: list[bytes]) -> list[Any]:
    return [with_raw(r, raw) for r, raw in zip(worker.call(raws, MAX), raws, strict=True)]


def test_a_window_comes_back_as_parsing_it_here_gives_it(worker: Worker) -> None:
    raws = [message(f"Here {i}", body=f"Body {i}\n") for i in range(5)]
    assert parsed(worker, raws) == [parse_message(raw) for raw in raws]
    assert worker.call([], 0) == []  # the empty window a start sends


def test_the_next_window_is_sent_before_the_answer_to_the_one_being_parsed(
    worker: Worker,
) -> None:
    """While the process parses a window, the next already waits in its pipe: the process
    never sits idle until the engine's event loop gets round to sending it. Each window
    still gets its own answer, in order."""
    slow = [message(f"Slow {i}", body="word " * 200_000) for i in range(12)]  # ~1 s to parse
    quick = [message("Quick")]
    read_when_sent: list[int] = []
    real_send = worker._send

    def send(data: bytes, *, framed: bool = True) -> None:
        real_send(data, framed=framed)
        read_when_sent.append(worker._read)  # answers read by the time this window was sent

    worker._send = send  # type: ignore[method-assign]
    results: dict[str, list[Any]] = {}
    first = threading.Thread(target=lambda: results.update(slow=parsed(worker, slow)))
    first.start()
    for _ in range(1000):  # the slow window has gone (bounded: 10 s)
        if read_when_sent:
            break
        threading.Event().wait(0.01)
    results["quick"] = parsed(worker, quick)
    first.join(60)
    assert read_when_sent == [0, 0]  # the quick one went before the slow one's answer came
    assert [m.subject for m in results["slow"]] == [f"Slow {i}" for i in range(12)]
    assert [m.subject for m in results["quick"]] == ["Quick"]


def test_a_parser_error_is_raised_for_its_window_and_the_process_goes_on(worker: Worker) -> None:
    with pytest.raises(TypeError):
        worker.call([None], MAX)  # type: ignore[list-item]
    assert [m.subject for m in parsed(worker, [message("After")])] == ["After"]
    assert worker.alive


def test_a_killed_process_fails_every_window_in_flight_and_is_not_used_again(
    worker: Worker,
) -> None:
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait(10)
    with pytest.raises(BrokenWorkerProcess):
        worker.call([message("Lost")], MAX)
    assert not worker.alive
    with pytest.raises(BrokenWorkerProcess):
        worker.call([message("Again")], MAX)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_process_outlives_a_stop_signal_to_the_group_until_its_stdin_ends(
    worker: Worker, signum: int
) -> None:
    """Ctrl-C or a service manager's stop reaches every process of the group; the engine,
    stopping gracefully, still waits for the windows in flight. The process ends when the
    engine closes its stdin."""
    worker.call([], 0)  # it is up, its handlers set
    os.kill(worker.process.pid, signum)
    assert [m.subject for m in parsed(worker, [message("Still here")])] == ["Still here"]
    worker.close()
    assert worker.process.returncode == 0


def test_a_process_whose_engine_died_ends_at_the_end_of_its_stdin(worker: Worker) -> None:
    """A SIGKILLed engine closes nothing: the kernel does, and the process reads the end."""
    worker.call([], 0)
    worker.requests.close()
    assert worker.process.wait(10) == 0


def test_a_frame_cut_short_is_the_end() -> None:
    whole = (3).to_bytes(LENGTH, "little") + b"abc"
    assert read_frame(io.BytesIO(whole + whole)) == b"abc"
    assert read_frame(io.BytesIO(whole[:-1])) is None
    assert read_frame(io.BytesIO(whole[:3])) is None
    assert read_frame(io.BytesIO(b"")) is None


def test_results_cross_without_the_message_bytes(worker: Worker) -> None:
    """The engine has each message's bytes: they are not sent back (see with_raw)."""
    (result,) = worker.call([message("Bytes")], MAX)
    assert isinstance(result, ParsedMessage) and result.raw == b""


def test_a_window_given_up_takes_its_process_with_it() -> None:
    """A session past its deadline gives its window up. The parser might never finish it,
    and every later window would wait behind it: the process is killed, as anyio's was, and
    the next window gets a new one."""
    slow = [message(f"Slow {i}", body="word " * 200_000) for i in range(36)]  # ~0.25 s here

    async def go() -> None:
        pool = Parsers(1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.start)
            assert not pool.use()
            await pool.ready.wait()
        (first,) = pool.workers
        try:
            with anyio.move_on_after(0.02) as scope:
                await pool.parse(slow, MAX, anyio.to_thread.run_sync, "m")
            assert scope.cancelled_caught
            assert not first.alive
            got = await pool.parse([message("Next")], MAX, anyio.to_thread.run_sync, "m")
            assert [m.subject for m in got] == ["Next"]
            assert pool.workers[0] is not first
        finally:
            await pool.aclose()
        assert first.process.returncode == -signal.SIGKILL

    anyio.run(go)


def test_windows_that_find_their_process_gone_start_one_new_one_between_them() -> None:
    async def go() -> None:
        pool = Parsers(1)
        pool.ready.set()  # as a long-running engine: up, then its process died
        starts: list[Worker] = []

        async def parse(i: int) -> None:
            got = await pool.parse([message(f"W{i}")], MAX, anyio.to_thread.run_sync, "m")
            assert [m.subject for m in got] == [f"W{i}"]

        try:
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(parse, i)
            starts = list(pool.workers)
        finally:
            await pool.aclose()
        assert len(starts) == 1

    anyio.run(go)


def test_a_process_that_cannot_start_is_a_broken_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of processes or file descriptors: the windows are parsed in threads."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", refused)
    with pytest.raises(BrokenWorkerProcess):
        Worker()


def test_a_start_and_a_window_that_both_want_a_process_start_one() -> None:
    """The pool's start and a window's replacement share the count (bench.instructions marks
    the pool ready before it starts, and two processes were counted as one's parse)."""

    async def go() -> None:
        pool = Parsers(1)
        pool.ready.set()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.start)
                assert pool.use()
                got = await pool.parse([message("Both")], MAX, anyio.to_thread.run_sync, "m")
                assert [m.subject for m in got] == ["Both"]
            assert len(pool.workers) == 1
        finally:
            await pool.aclose()

    anyio.run(go)


_ORDER = """
import sys
seen = []
sys.addaudithook(lambda event, args: seen.append(
    "popen" if event == "subprocess.Popen" else "parser"
) if event == "subprocess.Popen" or (event == "import" and args[0] == "engine.parse") else None)
from engine.parsers import Worker
assert "engine.parse" not in sys.modules, "engine.parsers imports the parser"
worker = Worker()
worker.close()
print(",".join(dict.fromkeys(seen)))
"""


def test_the_process_is_started_before_the_parser_is_imported_here() -> None:
    """The process needs ~0.15 s to be up, on the other core; the engine's import of the
    parser (~25 ms under the GIL, for the windows it parses in threads meanwhile) comes after
    the process is started, not before, so that the process is up that much sooner."""
    done = subprocess.run(
        [sys.executable, "-c", _ORDER], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["popen,parser"], done.stderr
