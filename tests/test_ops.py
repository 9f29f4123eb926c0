"""The engine process's resources: memory, and file descriptors under an HTTP flood."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    count_rows,
    engine_argv,
    free_port,
    ledger,
    message,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import sys
if sys.argv[1] == "bound":
    from engine.ops import bound_large_allocations
    assert bound_large_allocations()
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) // 1024
first = bytearray(20_000_000)  # mapped, then freed: glibc raises its mmap threshold
del first
before = rss()
second = bytearray(20_000_000)  # the next one: from the heap, unless the threshold is fixed
del second
print(rss() - before)
"""


def kept_after_free(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or "glibc" not in " ".join(__import__("platform").libc_ver()),
    reason="glibc's malloc only",
)
def test_large_buffers_go_back_to_the_system_once_freed() -> None:
    """A 20 MB message's buffers are returned when freed, not kept by the heap (measured in
    the memory benchmark: 123 -> 100 MiB peak RSS for the engine process)."""
    assert kept_after_free("default") >= 15  # glibc on its own keeps the second one
    assert kept_after_free("bound") <= 2


THREADS_PROBE = """
import sys, threading
if sys.argv[1] == "bound":
    from engine.ops import bound_large_allocations
    assert bound_large_allocations()
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS"))
kept = []
def reader():
    for _ in range(30):
        answers = []
        for _ in range(3):
            answers.append(bytes(600_000))
            kept.append(bytes(100))  # something small that stays, after each
        del answers
before = rss()
threads = [threading.Thread(target=reader) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(rss() - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or "glibc" not in " ".join(__import__("platform").libc_ver()),
    reason="glibc's malloc only",
)
def test_a_parsing_process_s_answers_go_back_to_the_system_from_the_threads_that_read_them() -> (
    None
):
    """The threads that read the parsing processes' answers (~0.5 MB a window) each have a
    heap of their own, and the small things allocated between two answers kept what the
    answers left: with buffers of 1 MiB and more mapped apart, the engine's peak in the
    5 x 21 MB case went from 136-138 to 138-148 MiB over four runs; from 256 KiB, 137."""
    done = subprocess.run(
        [sys.executable, "-c", THREADS_PROBE, "bound"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert int(done.stdout) < 1024  # KiB: with 1 MiB, 3-4 MiB stayed


# -- the HTTP endpoint under a flood (issue 12, item 14) -------------------------------------

FLOOD = 1_100


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _soft_fd_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as fh:
        line = next(line for line in fh if line.startswith("Max open files"))
    return int(line.split()[3])


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@contextlib.contextmanager
def _room_for_the_flood() -> Iterator[None]:
    """This process opens FLOOD sockets: its own soft limit must allow them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the hard open-file limit ({hard}) is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.dovecot
@pytest.mark.parametrize("hard_limit", ["raisable", "fixed-1024"])
def test_a_flood_of_idle_http_connections_neither_kills_the_daemon_nor_stops_its_mail(
    tmp_path: Path, mailbox: Mailbox, hard_limit: str
) -> None:
    """With the usual soft limit of 1,024 descriptors, 1,100 idle connections made accept()
    fail with EMFILE and the daemon exit 1. Now the soft limit is raised to the hard one where
    allowed, the endpoint keeps at most --http-max-connections (100) open and closes the
    rest at once, idle ones are closed after 5 s: the daemon lives, its mailbox is read
    meanwhile, and /healthz answers while the flood is still connected."""
    data = mailbox.data
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    mailbox.config.rename(conf / "m.xml")
    port = free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard_limit == "raisable" else 1024

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
    argv = engine_argv("run", "--config-dir", conf, "--data-dir", data, "--http-port", port)
    argv += ["--poll-interval", "0.5", "--reload-seconds", "0.3"]
    log = tmp_path / "daemon.log"
    flood: list[socket.socket] = []
    with _room_for_the_flood(), open(log, "wb") as err:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stderr=err, preexec_fn=limit_fds
        )
        try:
            wait_for(lambda: _health(port) == 200, 30, "the daemon's /healthz")
            assert _soft_fd_limit(proc.pid) == (1024 if hard == 1024 else min(hard, 1 << 16))
            started = time.monotonic()
            for _ in range(FLOOD):
                if time.monotonic() - started > 60:
                    break
                with contextlib.suppress(OSError):  # refused: nothing is held for it
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            assert len(flood) == FLOOD
            peak = _fds(proc.pid)
            assert proc.poll() is None, log.read_text()[-3000:]
            mailbox.deliver(message("During the flood"))
            wait_for(
                lambda: (
                    mailbox.left() == 0 and count_rows(data, "SELECT count(*) FROM ledger") == 1
                ),
                20,
                "the mailbox processed during the flood",
            )
            wait_for(lambda: _health(port) == 200, 20, "/healthz while the flood is connected")
            peak = max(peak, _fds(proc.pid))
            for sock in flood:
                sock.close()
            flood.clear()
            wait_for(lambda: _health(port) == 200, 10, "/healthz after the flood")
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()[-3000:]
        finally:
            for sock in flood:
                sock.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    # The endpoint's 100 and the engine's own (store, parsing processes, POP3, logs).
    assert peak < 200, peak
    assert "Too many open files" not in log.read_text()
    assert [r["outcome"] for r in ledger(data)] == ["created"]


def test_healthz_and_metrics_are_served_as_before_and_a_failing_engine_says_503() -> None:
    """The Starlette endpoint serves the same bytes, status codes and content types as the
    hand-written one did (monitoring and the Docker healthcheck read them)."""
    from engine.ops import Health, Metrics
    from engine.web import serve

    health, metrics = Health(), Metrics()
    health.supervisor_alive = True
    health.failure("box", "timeout", "no answer")
    metrics.processed.labels("box").inc()

    def get(port: int, path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return int(r.status), str(r.headers["Content-Type"]), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, str(exc.headers["Content-Type"]), bytes(exc.read())

    async def go() -> list[tuple[int, str, bytes]]:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve, "127.0.0.1", 0, health, metrics)
            answers = [await anyio.to_thread.run_sync(get, port, "/healthz")]
            health.writer_alive = True
            answers.append(await anyio.to_thread.run_sync(get, port, "/healthz"))
            answers.append(await anyio.to_thread.run_sync(get, port, "/metrics"))
            answers.append(await anyio.to_thread.run_sync(get, port, "/nothing"))
            tg.cancel_scope.cancel()
        return answers

    failing, ok, text, missing = anyio.run(go)
    health.writer_alive = False
    assert failing == (
        503,
        "application/json",
        json.dumps(health.document(), indent=2).encode() + b"\n",
    )
    assert json.loads(failing[2])["mailboxes"]["box"]["outage"] == "timeout"
    health.writer_alive = True
    assert ok[:2] == (200, "application/json") and json.loads(ok[2])["status"] == "ok"
    assert text == (200, metrics.content_type, metrics.render())
    assert 'mailintegration_messages_processed_total{mailbox="box"} 1.0' in text[2].decode()
    assert missing[0] == 404
