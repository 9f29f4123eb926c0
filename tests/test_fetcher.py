"""Where a session parses: worker processes for busy sessions, threads otherwise."""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import secrets
import signal
import subprocess
import termios
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import BrokenWorkerProcess
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    Mailbox,
    attachment_bytes,
    engine_argv,
    import_directory,
    mailbox_xml,
    message,
    once,
    requests,
    store_args,
    wait_for,
)

from engine import parsers, session
from engine.gateways import Answer, Request
from engine.gateways.pop3 import Pop3Gateway
from engine.items import Envelope, Item, KnownQuery
from engine.writer import Writer

pytestmark = pytest.mark.dovecot

HTML = (
    "<html><body><p>The <b>printer</b> on floor 3 is jammed.</p>"
    "<ul><li>tray 1</li><li>tray 2</li></ul><a href='https://example.com/x'>ticket</a>"
    "</body></html>"
)


def mix(count: int, tag: str) -> list[bytes]:
    """Plain, HTML and attachment messages, one the parser refuses, one of 1.5 MB."""
    out = []
    for i in range(count):
        if i % 3 == 0:
            out.append(message(f"{tag} plain {i}", body=f"Plain body {i}\n"))
        elif i % 3 == 1:
            raw = message(f"{tag} html {i}").replace(
                b'Content-Type: text/plain; charset="utf-8"', b"Content-Type: text/html"
            )
            out.append(raw.replace(b"Hello, it does not work.", HTML.encode()))
        else:
            data = f"log line {i}\n".encode() * 50
            out.append(message(f"{tag} files {i}", attachments=(("log.txt", "text/plain", data),)))
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(600))
    out.append(  # over max_parts: refused by the parser, wherever it runs
        f"From: j@example.com\r\nSubject: {tag} refused\r\nMessage-ID: <{tag}@x>\r\n".encode()
        + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        + parts
        + b"--b--\r\n"
    )
    big = (("big.bin", "application/pdf", b"%" * 1_500_000),)
    out.insert(0, message(f"{tag} huge", attachments=big))  # in the first window: a thread
    return out


def slow_retr(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """A slow server: the worker processes (~0.2 s to start) are ready before the session
    is over, however loaded the machine."""
    real = Pop3Gateway.fetch_many

    def fetch_many(self: Pop3Gateway, requests: Sequence[Request], grant: float) -> list[Answer]:
        time.sleep(seconds)
        return real(self, requests, grant)

    monkeypatch.setattr(Pop3Gateway, "fetch_many", fetch_many)


def spy_processes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the sizes of the messages each call into a worker process gets."""
    shares: list[int] = []
    real: Callable[..., Any] = parsers.run_window

    async def spy(worker: Any, raws: list[bytes], *args: Any) -> Any:
        shares.extend(len(r) for r in raws)
        return await real(worker, raws, *args)

    monkeypatch.setattr(parsers, "run_window", spy)
    return shares


def shape(rows: list[dict[str, Any]], tag: str) -> list[tuple[Any, ...]]:
    """What a request says, without what differs between two mailboxes (numbers, names)."""
    out = []
    for r in rows:
        subject = str(r["subject"]).replace(tag, "T")
        attachments = tuple((a["name"], a["size"]) for a in r["attachments"])
        desc = str(r["description"])
        if r["kind"] == "message-failure":  # names the mailbox and the UIDL
            desc = desc.split("\n")[2]
        out.append((subject, desc, r["requester"], r["type"], r["kind"], attachments))
    return sorted(out)


def test_a_busy_session_parses_in_worker_processes_with_the_same_results(
    tmp_path: Path, dovecot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From 64 messages on, windows of small messages are parsed in worker processes (the
    GIL would keep a thread on the writer's core); the result is exactly that of threads.
    Messages over 1 MiB never cross to a process."""
    results = {}
    for mode, extra in (("procs", ()), ("thrds", ("--parse-processes", "0"))):
        data = tmp_path / mode / "data"
        import_directory(data, tmp_path)
        user, password = f"user-{uuid.uuid4().hex[:12]}", secrets.token_urlsafe(12)
        dovecot.add_user(user, password)
        for raw in mix(140, mode):
            dovecot.deliver(user, raw)
        cfg = mailbox_xml(
            tmp_path / mode / "m.xml",
            port=dovecot.pop3_port,
            user=user,
            password=password,
        )
        shares = spy_processes(monkeypatch)
        slow_retr(monkeypatch, 0.5)
        assert once(data, cfg, *extra) == 1  # the refused message is a failure event
        assert dovecot.count(user) == 0
        results[mode] = (shape(requests(data), mode), shares)
        monkeypatch.undo()
    (apart, shares), (threads, none) = results["procs"], results["thrds"]
    assert apart == threads
    assert len(apart) == 142 and sum(r[4] == "message-failure" for r in apart) == 1
    # The first windows go to threads while the processes start; the huge one never leaves.
    assert 48 <= len([n for n in shares if n]) <= 94 and max(shares) < 1_000_000
    assert none == []


def test_a_window_parsed_apart_keeps_each_message_s_exact_bytes(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker process sends its results back without the message bytes (they would
    double what crosses the pipe); the session puts them back, so the raw .eml attached to
    each request is still exactly the message as received."""
    raws = [message(f"Exact {i}", body=f"Body {i}\n" * (i + 1)) for i in range(100)]
    mailbox.configure(includeRawMessageAsAttachment="true")
    mailbox.deliver(*raws)
    shares = spy_processes(monkeypatch)
    slow_retr(monkeypatch, 0.5)
    assert mailbox.once() == 0
    assert any(shares)
    rows = mailbox.requests()
    assert len(rows) == 100
    got = {
        r["subject"]: attachment_bytes(mailbox.data, a["sha256"])
        for r in rows
        for a in r["attachments"]
        if a["name"].endswith(".eml")
    }
    sent = {f"Exact {i}": raw for i, raw in enumerate(raws)}
    assert got.keys() == sent.keys()
    # Dovecot may add a header at delivery; the body, and the exact bytes, must come back.
    for subject, raw in sent.items():
        assert got[subject].endswith(raw.split(b"\r\n\r\n", 1)[1]), subject
        assert len(got[subject]) >= len(raw)


@pytest.mark.parametrize("boxes", [1, 3])
def test_a_window_waits_for_a_busy_process_rather_than_parse_in_a_thread(
    tmp_path: Path,
    data: Path,
    new_mailbox: Callable[..., Mailbox],
    monkeypatch: pytest.MonkeyPatch,
    boxes: int,
) -> None:
    """Parsing in a thread holds the GIL, and every handover the writer and SQLite's thread
    make then waits for it. Once the process is up, a window waits for it instead (meanwhile
    the next one is fetched): no window is parsed in a thread any more, however many
    sessions are busy. Before, every other window of a lone session was, and with three
    sessions every third."""
    folder = tmp_path / "mailboxes.d"
    folder.mkdir()
    for b in range(boxes):
        new_mailbox(folder / f"m{b}.xml").deliver(*[message(f"Queue {b}.{i}") for i in range(150)])
    events: list[str] = []
    real_run: Callable[..., Any] = parsers.run_window

    async def slow_parse(worker: Any, raws: list[bytes], *a: Any) -> Any:
        if raws:
            events.append("apart")
            await anyio.sleep(0.3)  # parsing slower than fetching: the process stays busy
        return await real_run(worker, raws, *a)

    real_retr = Pop3Gateway.fetch_many
    first: set[int] = set()

    def fetch_many(self: Pop3Gateway, requests: Sequence[Request], grant: float) -> list[Answer]:
        if id(self) not in first:
            first.add(id(self))
            time.sleep(2)  # the process is up before each session's second window
        return real_retr(self, requests, grant)

    real_window = session.fetch_window

    def fetch_window(*args: Any) -> Any:
        events.append("thread")
        return real_window(*args)

    monkeypatch.setattr(parsers, "run_window", slow_parse)
    monkeypatch.setattr(Pop3Gateway, "fetch_many", fetch_many)
    monkeypatch.setattr(session, "fetch_window", fetch_window)
    assert once(data, folder) == 0
    assert len(requests(data)) == 150 * boxes
    # A session's first window may be fetched before the process is up; none after it.
    assert "apart" in events
    assert "thread" not in events[events.index("apart") :], events
    assert events.count("apart") >= 3 * boxes


def test_few_messages_are_parsed_in_a_thread(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process costs about 0.1 s to start: not worth it for a handful of messages."""
    mailbox.deliver(*[message(f"Few {i}") for i in range(10)])
    shares = spy_processes(monkeypatch)
    assert mailbox.once() == 0
    assert shares == []
    mailbox.assert_exactly_once()


def test_a_small_mailbox_starts_no_parsing_process(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processes start when a session lists enough messages to use them, not with the
    engine: a pass over a handful of messages never pays ~0.15 s of CPU for one."""
    mailbox.deliver(*[message(f"Small {i}") for i in range(10)])
    calls: list[int] = []
    real: Callable[..., Any] = parsers.run_window

    async def spy(worker: Any, raws: list[bytes], *args: Any) -> Any:
        calls.append(len(raws))  # an empty window is a process being started
        return await real(worker, raws, *args)

    monkeypatch.setattr(parsers, "run_window", spy)
    assert mailbox.once() == 0
    assert calls == []
    mailbox.assert_exactly_once()


@pytest.mark.parametrize(
    ("when", "says"),
    [
        ("at start", "no parsing process could start (worker killed): parsing in threads"),
        ("under a window", "the parsing process failed (worker killed): parsing in a thread"),
    ],
)
def test_a_dying_parse_process_falls_back_to_a_thread(
    tmp_path: Path,
    mailbox: Mailbox,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
    says: str,
) -> None:
    """A worker process that cannot start, or is killed under a window (a parser crash, the
    OOM killer), loses nothing: the windows are parsed in a thread, every message goes in
    once."""
    mailbox.deliver(*[message(f"Crash {i}") for i in range(80)])
    calls = []
    real: Callable[..., Any] = parsers.run_window

    async def broken(worker: Any, raws: list[bytes], *args: Any) -> Any:
        calls.append(len(raws))
        if when == "under a window" and not raws:
            return await real(worker, raws, *args)  # starting works
        raise BrokenWorkerProcess from EOFError("worker killed")

    monkeypatch.setattr(parsers, "run_window", broken)
    slow_retr(monkeypatch, 0.5)
    log = tmp_path / "engine.log"
    assert mailbox.once("--log-file", log) == 0
    mailbox.assert_exactly_once()
    assert sorted(r["subject"] for r in mailbox.requests()) == sorted(
        f"Crash {i}" for i in range(80)
    )
    assert says in log.read_text()
    assert any(calls) == (when == "under a window")


def test_the_first_windows_parse_in_threads_while_the_processes_start(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting a worker process takes ~0.2 s; the session does not wait for it."""
    mailbox.deliver(*[message(f"Slow start {i}") for i in range(100)])
    real: Callable[..., Any] = parsers.run_window
    shares: list[int] = []

    async def slow(worker: Any, raws: list[bytes], *args: Any) -> Any:
        if not raws:
            await anyio.sleep(3)  # a start far slower than fetching 100 messages
        shares.append(len(raws))
        return await real(worker, raws, *args)

    monkeypatch.setattr(parsers, "run_window", slow)
    assert mailbox.once() == 0
    mailbox.assert_exactly_once()
    assert not any(shares)  # every window went to a thread; the starts were then cancelled


def test_a_message_over_the_byte_budget_does_not_wait_on_windows_still_in_flight(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 17 MB message needs the whole 16 MiB budget, which the windows being parsed hold
    until they reach the writer: they are handed over first, or the session waits forever
    (bounded here by an alarm)."""
    raws = [message(f"Small {i}") for i in range(120)]
    big = (("scan.pdf", "application/pdf", b"%" * 17_000_000),)
    raws.insert(100, message("Big scan", attachments=big))
    mailbox.deliver(*raws)
    shares = spy_processes(monkeypatch)
    slow_retr(monkeypatch, 0.3)

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("the session did not finish within 120 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        assert mailbox.once() == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert any(shares)  # windows were in flight in a worker process
    mailbox.assert_exactly_once()


def test_only_the_session_s_final_message_is_marked_last(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer stops gathering at a message marked last (nothing more is coming from
    its session); marking one too early would only cost batching, but marking none would
    hold every session's end back for the linger."""
    mailbox.deliver(*[message(f"Last {i}") for i in range(100)])
    seen: list[tuple[str, bool]] = []
    real = Writer._account

    def account(self: Writer, env: Envelope) -> None:
        assert env.parsed is not None
        seen.append((env.parsed.subject, env.last))
        real(self, env)

    monkeypatch.setattr(Writer, "_account", account)
    assert mailbox.once() == 0
    assert len(seen) == 100
    assert [s for s, last in seen if last] == ["Last 99"]


def test_parsing_processes_start_once_a_session_lists_enough_messages(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process costs ~0.15 s of CPU to start: it starts when a session has listed enough
    messages to use it (64 or more), not with the engine, so that an empty or small mailbox
    never pays for it; the session's first windows parse in threads meanwhile."""
    mailbox.deliver(*[message(f"Early {i}") for i in range(70)])
    order: list[str] = []
    real_run: Callable[..., Any] = parsers.run_window

    async def run_sync(worker: Any, raws: list[bytes], *a: Any) -> Any:
        order.append("window" if raws else "start")
        return await real_run(worker, raws, *a)

    real_open = Pop3Gateway.open

    def open_(self: Pop3Gateway) -> None:
        order.append("connect")
        real_open(self)

    monkeypatch.setattr(parsers, "run_window", run_sync)
    monkeypatch.setattr(Pop3Gateway, "open", open_)
    assert mailbox.once() == 0
    mailbox.assert_exactly_once()
    assert order[:2] == ["connect", "start"], order


def test_handing_a_message_over_does_not_go_round_the_event_loop() -> None:
    """While the queue has room, a message is handed to the writer without a checkpoint (two
    trips round the loop per message were two thirds of its iterations); once it is full,
    the fetcher waits for room as before."""

    async def go() -> list[str]:
        send, receive = anyio.create_memory_object_stream[Item](1)
        async with send, receive:
            return await hand_over(send, receive)

    async def hand_over(
        send: MemoryObjectSendStream[Item], receive: MemoryObjectReceiveStream[Item]
    ) -> list[str]:
        seen = []
        with anyio.CancelScope() as scope:
            scope.cancel()
            await session._send(send, KnownQuery(account="a", uidls=[]))  # no checkpoint
            seen.append("sent without yielding")
            await session._send(send, KnownQuery(account="a", uidls=[]))  # full: waits
            seen.append("not reached")
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(session._send, send, KnownQuery(account="b", uidls=[]))
                await anyio.sleep(0.1)
                seen.append(f"waiting for room: {send.statistics().tasks_waiting_send}")
                assert isinstance(await receive.receive(), KnownQuery)
        seen.append(f"then sent: {receive.statistics().current_buffer_used}")
        return seen

    assert anyio.run(go) == ["sent without yielding", "waiting for room: 1", "then sent: 1"]


def test_a_parsing_process_gets_the_next_window_while_it_parses_one(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two windows in flight to the one process: it starts on the next as soon as it has
    answered, not once the event loop, busy with the writer, has read the answer and sent
    another (it sat idle a quarter of the time so). Never more: the bytes held stay
    bounded."""
    mailbox.deliver(*[message(f"Depth {i}") for i in range(300)])
    inflight, most = [0], [0]
    real: Callable[..., Any] = parsers.run_window

    async def spy(worker: Any, raws: list[bytes], *args: Any) -> Any:
        inflight[0] += 1
        most[0] = max(most[0], inflight[0])
        try:
            if raws:
                await anyio.sleep(0.2)  # parsing slower than fetching
            return await real(worker, raws, *args)
        finally:
            inflight[0] -= 1

    real_retr = Pop3Gateway.fetch_many
    first: list[bool] = []

    def fetch_many(self: Pop3Gateway, requests: Sequence[Request], grant: float) -> list[Answer]:
        if not first:
            first.append(True)
            time.sleep(2)  # the process is up before the second window
        return real_retr(self, requests, grant)

    monkeypatch.setattr(parsers, "run_window", spy)
    monkeypatch.setattr(Pop3Gateway, "fetch_many", fetch_many)
    assert mailbox.once("--parse-processes", "1") == 0
    mailbox.assert_exactly_once()
    assert most[0] == 2


def test_a_parsing_process_killed_mid_pass_is_replaced_and_loses_nothing(
    tmp_path: Path, mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SIGKILL (the OOM killer): the windows it had are parsed in threads, the next
    ones go to a new process, every message goes in once."""
    mailbox.deliver(*[message(f"Killed {i}") for i in range(300)])
    pids: list[int] = []
    real: Callable[..., Any] = parsers.run_window

    async def spy(worker: Any, raws: list[bytes], *args: Any) -> Any:
        if raws and worker.process.pid not in pids:
            pids.append(worker.process.pid)
            if len(pids) == 1:
                os.kill(worker.process.pid, signal.SIGKILL)
        return await real(worker, raws, *args)

    monkeypatch.setattr(parsers, "run_window", spy)
    slow_retr(monkeypatch, 0.5)
    log = tmp_path / "engine.log"
    assert mailbox.once("--parse-processes", "1", "--log-file", log) == 0
    mailbox.assert_exactly_once()
    assert len(pids) == 2
    assert "the parsing process failed" in log.read_text()


def _parsing_processes(pid: int) -> list[int]:
    """The engine's children that run engine.parse.worker."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                children = [int(c) for c in fh.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as fh:
                    if b"engine.parse.worker" in fh.read():
                        found.append(child)
            except OSError:
                pass
    return found


def _pipe_holds(pid: int, least: int) -> bool:
    """Whether ``least`` bytes or more wait, unread, in the pipe on ``pid``'s stdin (FIONREAD
    on it, opened again through /proc: the count is the pipe's, whoever asks)."""
    try:
        fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        count = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, count)
        return count[0] >= least
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: neither gone nor a zombie left for its new parent to reap."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_engine_killed_with_windows_in_its_parsing_process_loses_nothing_and_leaves_none(
    mailbox: Mailbox,
) -> None:
    """kill -9 while the parsing process has windows: nothing ends it but the end of its
    stdin, which the kernel closes with the engine, and it ignores the signals a stop sends
    the group. It ends by itself; the next `once` takes every message once."""
    mailbox.deliver(*[message(f"Killed engine {i}", body="word " * 4000) for i in range(400)])
    argv = engine_argv("once", "--config", mailbox.config, "--data-dir", mailbox.data)
    argv += ["--login", LOGIN, "--password", LOGIN_PASSWORD, *store_args()]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    workers: list[int] = []
    try:
        # A window waits in its pipe while it parses the one before (DEPTH): caught there and
        # stopped, the process answers nothing more, so however fast the machine the engine
        # cannot end the pass on its own, and the kill below lands mid-pass. (Its start and
        # sys.path frames are a few hundred bytes; a window of these messages, ~0.9 MB.)
        deadline = time.monotonic() + 60
        for _ in range(60 * 200):
            workers = workers or _parsing_processes(proc.pid)
            if any(_pipe_holds(w, 64 << 10) for w in workers) or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)
        assert any(_pipe_holds(w, 64 << 10) for w in workers), "no window caught in its pipe"
    finally:
        proc.kill()
        proc.wait(10)
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)
    assert proc.returncode == -signal.SIGKILL  # killed mid-pass, not ended
    wait_for(lambda: not any(_running(w) for w in workers), 10, "the parsing process to end")
    assert mailbox.once() == 0
    mailbox.assert_exactly_once()
