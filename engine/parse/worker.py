"""The parsing process: windows of messages in, their parse results out (engine.parsers).

The engine starts it as ``python -c`` :data:`engine.parsers.BOOTSTRAP`, which takes the
engine's ``sys.path`` (the first pickle on stdin, as anyio's and multiprocessing's workers
do) and runs :func:`serve`.

On stdin, each request is an 8-byte little-endian length and a pickle of ``(raws,
max_bytes)``; on stdout, in the same order, each answer is a length and a pickle of ``(True,
results)`` or ``(False, exception)``. The engine sends the next window before the answer to
the one being parsed has come back: it waits in the pipe, so this process starts on it as
soon as it has answered, whatever the engine's event loop is doing at that moment.

The process ends when its stdin does: the engine closed it, or died. It ignores SIGINT and
SIGTERM: a terminal's Ctrl-C or a service manager's stop reaches every process of the group,
and the engine, stopping gracefully, may still have windows here whose answers it waits for.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from typing import IO, Final

LENGTH: Final = 8  # bytes of the length before each request and answer


def serve() -> None:
    """Answer requests until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    # Nothing else may write to the answers' pipe, nor read the requests': a library's print
    # would break the framing.
    sys.stdin = open(os.devnull)  # noqa: SIM115 - for the life of the process
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115

    from engine.parse import parse_many

    while (request := read_frame(requests)) is not None:
        raws, max_bytes = pickle.loads(request)
        try:
            answer = pickle.dumps((True, parse_many(raws, max_bytes)), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a parser bug: the engine raises it for this window
            answer = _failure(exc)
        answers.write(frame(answer))
        answers.flush()


def frame(data: bytes) -> bytes:
    """``data`` with its length before it."""
    return len(data).to_bytes(LENGTH, "little") + data


def read_frame(stream: IO[bytes]) -> bytes | None:
    """The next length-prefixed frame of ``stream``, or None at its end (a frame cut short
    is an end too: the writer is gone)."""
    head = stream.read(LENGTH)
    if len(head) < LENGTH:
        return None
    size = int.from_bytes(head, "little")
    body = stream.read(size)
    return body if len(body) == size else None


def _failure(exc: Exception) -> bytes:
    """An exception's answer; one that does not pickle becomes a RuntimeError naming its type."""
    try:
        return pickle.dumps((False, exc), pickle.HIGHEST_PROTOCOL)
    except Exception:
        error = RuntimeError(f"{type(exc).__name__} in the parsing process")
        return pickle.dumps((False, error), pickle.HIGHEST_PROTOCOL)
