"""Crash consistency, measured: deliver mail, SIGKILL the engine at random and at chosen moments,
restart it, and check that every message ended up in the store exactly once.

    python -m tools.crash --iterations 1000 [--workers 2] [--launcher exec|fork] [--seed S]
        [--gateway pop3|imap] [--after-processing delete|move|keep]

Each iteration delivers a known set of messages (some with attachments, some attachments shared
between messages) to 2 or 3 fresh mailboxes of a real Dovecot on 127.0.0.1, then runs
``mailintegration once`` over them as a separate process 1 to 3 times, each run SIGKILLed
either at a random moment or at the N-th occurrence of a dangerous point (see
:mod:`tools.crashpoints`), and finally once more to completion. It then compares the store with
what was delivered, with the tests' own checker (``tests.support.check_exactly_once``):

- every Message-ID is in the ledger exactly once, with the sha256 of the delivered bytes, and
  there is exactly one request for it, with exactly the attachments it carried;
- nothing is left on the server (IMAP ``move``: each message is in the Done folder once and
  nothing is left in INBOX; IMAP ``keep``: each is still in INBOX once, with the keyword);
- the files under ``data/attachments/`` are exactly the ``attachments.sha256`` rows (no orphan,
  none missing, no temporary file), each file's content hashing to its name;
- ``PRAGMA integrity_check`` is ``ok``.

Launchers: ``exec`` runs ``python -m engine once …`` (and ``python -m tools.crashpoints …``),
exactly the deployed command. ``fork`` forks each run from a server process that has already
imported the engine (a few milliseconds instead of seconds of imports); the run is still its own
process, killed with SIGKILL. The summary (JSON on stdout) gives iterations, messages, losses,
duplicates and kills; the exit status is 0 only when there was no problem at all.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.context
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from pathlib import Path
from typing import Any, Protocol

from engine.store.sqlite import BLOB_MAX
from tests.support import (
    DIRECTORY,
    IMAP_GATEWAY,
    LOGIN,
    LOGIN_PASSWORD,
    Delivered,
    check_exactly_once,
    mailbox_xml,
)
from tools.crashpoints import POINTS, fork_child
from tools.dovecot import Dovecot, start_dovecot

ROOT = Path(__file__).resolve().parent.parent

# The engine's login, the directory and the mailbox files are the tests' own (tests/support.py).
MOVE_FOLDER = "Done"  # where afterProcessing "move" puts the mail

# The same bytes attached to several messages: stored once, cited by several rows.
SHARED_ATTACHMENTS: tuple[tuple[str, str, bytes], ...] = (
    ("policy.pdf", "application/pdf", b"%PDF-1.4\n" + bytes(range(256)) * 24),
    ("logo.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"shared logo " * 300),
)

# Kill modes: "random" is an outside SIGKILL at a random moment of the run.
MODES = ("random", *POINTS)
MODE_WEIGHTS = (4, 1, 1, 1, 1)
# The N of a kill point is drawn from 1..MAX_N[point]; a run that ends first is not killed.
MAX_N = {"after-commit": 3, "before-commit": 3, "attachment-write": 4, "mid-retr": 6}
RUN_TIMEOUT = 60.0  # seconds for one engine run; the mailbox timeout is 5 s


# --------------------------------------------------------------------------- launchers


class Handle(Protocol):
    pid: int

    def wait(self, timeout: float) -> int | None:
        """The exit status (negative: killed by that signal), or None if still running."""
        ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    name: str

    def start(self, argv: list[str], point: str, n: int, log: Path) -> Handle: ...

    def close(self) -> None: ...


def engine_env() -> dict[str, str]:
    return {"MAILINTEGRATION_LOGIN": LOGIN, "MAILINTEGRATION_PASSWORD": LOGIN_PASSWORD}


class _PopenHandle:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class ExecLauncher:
    """``python -m engine …``, or ``python -m tools.crashpoints POINT N -- …``."""

    name = "exec"

    def start(self, argv: list[str], point: str, n: int, log: Path) -> Handle:
        if point == "none":
            cmd = [sys.executable, "-m", "engine", *argv]
        else:
            cmd = [sys.executable, "-m", "tools.crashpoints", point, str(n), "--", *argv]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**os.environ, **engine_env()},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        return _PopenHandle(proc)

    def close(self) -> None:
        pass


# multiprocessing's forkserver gives 255 as the exit code of a child whose status it could not
# read back (popen_forkserver.Popen.poll): not the engine's status.
FORKSERVER_LOST_STATUS = 255


class _ProcessHandle:
    def __init__(self, proc: multiprocessing.process.BaseProcess, log: Path) -> None:
        self.proc = proc
        assert proc.pid is not None
        self.pid = proc.pid
        self.status = Path(f"{log}.status")  # written by fork_child as it exits

    def wait(self, timeout: float) -> int | None:
        self.proc.join(timeout)
        code = self.proc.exitcode
        if code == FORKSERVER_LOST_STATUS:
            if self.status.exists():
                return int(self.status.read_text())  # the engine's own status
            # fork_child writes the status before its os._exit, so a child without one never
            # reached its end: a signal ended it, ours or a crash point's (seen once in a
            # 1,000-iteration POP3 run, at an attachment-write kill). The iteration's checks
            # of the store and the server still judge what the kill left behind.
            return -signal.SIGKILL
        return code

    def kill(self) -> None:
        if self.proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class ForkLauncher:
    """Each run is forked from a server process that imported the engine once."""

    name = "fork"

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["engine.commands", "tools.crashpoints"])
        self.ctx: multiprocessing.context.ForkServerContext = ctx

    def start(self, argv: list[str], point: str, n: int, log: Path) -> Handle:
        Path(f"{log}.status").unlink(missing_ok=True)
        proc = self.ctx.Process(
            target=fork_child, args=(argv, engine_env(), point, n, str(log)), daemon=False
        )
        proc.start()
        return _ProcessHandle(proc, log)

    def close(self) -> None:
        pass


def make_launcher(name: str) -> Launcher:
    if name == "exec":
        return ExecLauncher()
    if name == "fork":
        return ForkLauncher()
    raise ValueError(f"unknown launcher {name!r}")


# --------------------------------------------------------------------------- mail and config


def make_message(
    rng: random.Random, tag: str, *, file: bool = False
) -> tuple[bytes, str, frozenset[str]]:
    """A message with 0 to 3 attachments, shared ones included, small and large; CRLF as on
    the wire. ``file``: one of them for sure larger than BLOB_MAX, stored as a file."""
    msg = EmailMessage()
    known = rng.random() < 0.7
    msg["From"] = "John Doe <john.doe@example.com>" if known else f"Someone <s{tag}@else.example>"
    msg["To"] = "support@example.com"
    msg["Subject"] = f"Crash test {tag}"
    msg["Date"] = "Fri, 27 Nov 2026 09:12:44 -0500"
    message_id = make_msgid(idstring=tag, domain="crash.example")
    msg["Message-ID"] = message_id
    msg.set_content(f"Message {tag}.\n" + "Some text to make it longer.\n" * rng.randint(1, 40))
    payloads: list[bytes] = []
    for name, ctype, data in SHARED_ATTACHMENTS:
        if rng.random() < 0.4:
            maintype, subtype = ctype.split("/")
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
            payloads.append(data)
    if file or rng.random() < 0.5:
        # Half of them rows of the store, half files (larger than BLOB_MAX): a kill may land
        # in the writing of either.
        small = not file and rng.random() < 0.5
        data = rng.randbytes(
            rng.randint(100, 30_000) if small else rng.randint(BLOB_MAX + 1, 2 * BLOB_MAX)
        )
        msg.add_attachment(
            data, maintype="application", subtype="octet-stream", filename=f"dump-{tag}.bin"
        )
        payloads.append(data)
    digests = frozenset(hashlib.sha256(p).hexdigest() for p in payloads)
    return msg.as_bytes(policy=SMTP), message_id.strip("<>"), digests


class MailboxWriter(Protocol):
    """Writes the file of a mailbox whose Dovecot user ``user`` has ``password``; the other
    keywords are support.mailbox_xml's (Target.mailbox gives them)."""

    def __call__(self, path: Path, *, user: str, password: str, **settings: Any) -> object: ...


@dataclass(frozen=True)
class Target:
    """What the runs read: POP3, or IMAP with its afterProcessing."""

    gateway: str = "pop3"
    after: str = "delete"

    def mailbox(self, dovecot: Dovecot) -> dict[str, Any]:
        """support.mailbox_xml's keywords that read ``dovecot`` this way."""
        if self.gateway == "pop3":
            return {"port": dovecot.pop3_port}
        move = f"<moveToFolder>{MOVE_FOLDER}</moveToFolder>" if self.after == "move" else ""
        return {
            "port": dovecot.imap_port,
            "gateway": IMAP_GATEWAY,
            "server_extra": f"    <afterProcessing>{self.after}</afterProcessing>{move}\n",
        }


def make_template(directory: Path) -> Path:
    """A data directory with the directory imported: copied for every iteration."""
    from engine.cli import main as engine_main

    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)  # as the engine wants it: no warning on open
    spec = directory.parent / "directory.json"
    spec.write_text(json.dumps(DIRECTORY), encoding="utf-8")
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        code = engine_main(["directory", "import", str(spec), "--data-dir", str(directory)])
    if code != 0:
        raise RuntimeError(f"directory import failed with status {code}")
    return directory


# --------------------------------------------------------------------------- iterations


@dataclass
class IterationResult:
    index: int
    messages: int = 0
    losses: int = 0
    duplicates: int = 0
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    runs: list[tuple[str, int, int | None]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _BusyTime:
    """How long a run takes once started, learnt from the runs that ended by themselves: the
    random kills are drawn from that window."""

    def __init__(self, initial: float) -> None:
        self.value = initial
        self._lock = threading.Lock()

    def learn(self, seconds: float) -> None:
        with self._lock:
            self.value = 0.8 * self.value + 0.2 * seconds


def _wait_started(data: Path, handle: Handle, timeout: float) -> bool:
    """The engine holds the data-directory lock, which it writes its pid into, once its
    imports are done and it starts working: that is when a random kill is meaningful."""
    lock = data / "engine.lock"
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.005) + 1):
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(handle.pid):
                return True
        if handle.wait(0.005) is not None or time.monotonic() > deadline:
            return False
    return False


def _one_run(
    launcher: Launcher,
    argv: list[str],
    data: Path,
    log: Path,
    mode: str,
    n: int,
    rng: random.Random,
    busy: _BusyTime,
) -> int | None:
    """One engine process; returns its exit status (-9 when SIGKILLed), None if it hung."""
    point = "none" if mode == "random" else mode
    handle = launcher.start(argv, point, n, log)
    try:
        ready = _wait_started(data, handle, RUN_TIMEOUT)
        started = time.monotonic()
        if mode == "random" and ready:
            delay = rng.uniform(0, busy.value * 1.2)
            if handle.wait(delay) is None:
                handle.kill()
        code = handle.wait(RUN_TIMEOUT)
        if ready and code == 0:
            # Ended by itself (a random delay that outlasted the run included): a whole run.
            # The first estimate is a guess; an engine that got faster would otherwise draw
            # most random kills after its end for many iterations.
            busy.learn(time.monotonic() - started)
        return code
    finally:
        handle.kill()
        handle.wait(10)


def iteration(
    dovecot: Dovecot,
    base: Path,
    template: Path,
    index: int,
    rng: random.Random,
    launcher: Launcher,
    busy: _BusyTime,
    *,
    modes: Sequence[str] | None = None,
    keep: bool = False,
    write: MailboxWriter | None = None,
    target: Target = Target(),
) -> IterationResult:
    """Deliver, run-and-kill 1 to 3 times, finish, verify.

    ``modes`` chooses the kills instead: one run per entry, ``"random"``, ``"POINT"`` (a random
    N) or ``"POINT:N"``. ``write`` writes each mailbox file (default the tests' mailbox_xml,
    a password over plain POP3; the OAuth2 tests sign in with tokens instead).
    """
    write = write or mailbox_xml
    started = time.monotonic()
    result = IterationResult(index)
    work = base / f"it-{index:05d}"
    data, conf, logs = work / "data", work / "mailboxes.d", work / "logs"
    conf.mkdir(parents=True)
    logs.mkdir()
    shutil.copytree(template, data)
    delivered: list[Delivered] = []
    token = f"{index}x{rng.getrandbits(40):010x}"
    for box in range(rng.randint(2, 3)):
        user, password = f"crash-{token}-{box}", f"pw-{rng.getrandbits(64):016x}"
        dovecot.add_user(user, password)
        write(conf / f"box{box}.xml", user=user, password=password, **target.mailbox(dovecot))
        for i in range(rng.randint(3, 6)):
            # Each iteration writes at least one attachment file, where the attachment-write
            # kill point lands (small attachments are rows: no file to kill it in).
            first = box == 0 and i == 0
            raw, mid, attachments = make_message(rng, f"{token}-{box}-{i}", file=first)
            dovecot.deliver(user, raw)
            digest = hashlib.sha256(raw).hexdigest()
            delivered.append(Delivered(user, mid, digest, attachments))
    result.messages = len(delivered)
    argv = ["once", "--config-dir", str(conf), "--data-dir", str(data)]
    if modes is None:
        modes = rng.choices(MODES, MODE_WEIGHTS, k=rng.randint(1, 3))
    for k, spec in enumerate(modes):
        mode, _, fixed = spec.partition(":")
        n = 0 if mode == "random" else int(fixed) if fixed else rng.randint(1, MAX_N[mode])
        code = _one_run(launcher, argv, data, logs / f"run{k}-{mode}.log", mode, n, rng, busy)
        result.runs.append((mode, n, code))
        if code == -signal.SIGKILL:
            result.kills[mode] += 1
        elif code is None:
            result.problems.append(f"run {k} ({mode} {n}) did not end within {RUN_TIMEOUT:g} s")
        elif code != 0:
            result.problems.append(f"run {k} ({mode} {n}) exited with status {code}")
    code = _one_run(launcher, argv, data, logs / "final.log", "none", 0, rng, busy)
    result.runs.append(("final", 0, code))
    if code != 0:
        result.problems.append(f"the final run exited with status {code}")
    check = check_exactly_once(
        data, delivered, dovecot, disposal=target.after, move_folder=MOVE_FOLDER
    )
    result.losses, result.duplicates = check.losses, check.duplicates
    result.problems.extend(check.problems)
    result.seconds = time.monotonic() - started
    if not result.problems and not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


@dataclass
class Figures:
    launcher: str = ""
    iterations: int = 0
    messages: int = 0
    losses: int = 0
    duplicates: int = 0
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: list[tuple[int, list[str]]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    def add(self, r: IterationResult) -> None:
        self.iterations += 1
        self.messages += r.messages
        self.losses += r.losses
        self.duplicates += r.duplicates
        self.kills.update(r.kills)
        if r.problems:
            self.failed.append((r.index, r.problems))

    def as_dict(self) -> dict[str, object]:
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "launcher": self.launcher,
            "iterations": self.iterations,
            "messages": self.messages,
            "losses": self.losses,
            "duplicates": self.duplicates,
            "kills": sum(self.kills.values()),
            "kills_by_mode": dict(sorted(self.kills.items())),
            "failed_iterations": [{"iteration": i, "problems": p} for i, p in self.failed],
            "seconds": round(self.seconds, 1),
            "interrupted": self.interrupted,
        }


def run_iterations(
    dovecot: Dovecot,
    base: Path,
    iterations: int,
    *,
    launcher: Launcher,
    seed: int = 0,
    workers: int = 2,
    max_seconds: float | None = None,
    forced_modes: Sequence[Sequence[str]] = (),
    keep: bool = False,
    progress: Callable[[Figures], None] | None = None,
    write: MailboxWriter | None = None,
    target: Target = Target(),
) -> Figures:
    """``iterations`` iterations on ``workers`` threads (each starting its own processes).

    The first iterations use ``forced_modes`` (one list of modes each), the rest draw their
    kills at random. No iteration starts after ``max_seconds``.
    """
    started = time.monotonic()
    template = make_template(base / "template" / "data")
    figures = Figures(launcher=launcher.name)
    busy = _BusyTime(0.5 if launcher.name == "fork" else 2.0)
    lock = threading.Lock()
    next_index = iter(range(iterations))
    stopping = threading.Event()

    def worker() -> None:
        while not stopping.is_set():
            with lock:
                if max_seconds is not None and time.monotonic() - started > max_seconds:
                    return
                index = next(next_index, None)
            if index is None:
                return
            rng = random.Random(f"{seed}-{index}")
            modes = forced_modes[index] if index < len(forced_modes) else None
            try:
                r = iteration(
                    dovecot,
                    base,
                    template,
                    index,
                    rng,
                    launcher,
                    busy,
                    modes=modes,
                    keep=keep,
                    write=write,
                    target=target,
                )
            except Exception as exc:  # a broken harness must show, not hang the others
                r = IterationResult(index, problems=[f"harness error: {exc!r}"])
            with lock:
                figures.add(r)
                figures.seconds = time.monotonic() - started
                if progress is not None:
                    progress(figures)

    threads = [threading.Thread(target=worker, name=f"crash-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        # Let the iterations in progress finish (each is bounded), start no other.
        stopping.set()
        for t in threads:
            t.join()
        figures.interrupted = True
    figures.seconds = time.monotonic() - started
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    summary = " ".join((__doc__ or "").split("\n\n")[0].split())
    p = argparse.ArgumentParser(prog="python -m tools.crash", description=summary)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--launcher", choices=["exec", "fork"], default="exec")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--max-seconds", type=float, help="start no iteration after this long")
    p.add_argument("--dir", type=Path, help="work directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep every iteration's directory")
    p.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="N > 0: the multi-replica harness (tools/crash_replicas.py), with --store",
    )
    p.add_argument("--store", help="postgresql://... server for --replicas (a database is made)")
    p.add_argument("--mailboxes", type=int, default=30, help="with --replicas (default 30)")
    p.add_argument("--lease-seconds", type=float, default=2.0, help="with --replicas")
    p.add_argument("--gateway", choices=["pop3", "imap"], default="pop3")
    p.add_argument(
        "--after-processing",
        choices=["delete", "move", "keep"],
        default="delete",
        help="IMAP only: the mailboxes' afterProcessing (move: to the folder Done)",
    )
    args = p.parse_args(argv)
    if args.gateway == "pop3" and args.after_processing != "delete":
        p.error("--after-processing move or keep needs --gateway imap")
    if args.replicas:
        return _replicas_main(args)
    # SIGINT may be ignored when started in the background; SIGTERM should stop cleanly too:
    # both end the run after the iterations in progress, and stop Dovecot.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    base = Path(args.dir or tempfile.mkdtemp(prefix="mailintegration-crash-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    server = start_dovecot(base / "dovecot")
    launcher = make_launcher(args.launcher)
    every = max(1, args.iterations // 20)

    shown = 0

    def progress(f: Figures) -> None:
        # A failed iteration's problems show at once (its directory is kept), not only in
        # the JSON at the end of a run that may take hours.
        nonlocal shown
        for index, problems in f.failed[shown:]:
            print(f"iteration {index} failed: {'; '.join(problems)}", file=sys.stderr, flush=True)
        shown = len(f.failed)
        if f.iterations % every == 0 or f.failed:
            print(
                f"[{f.seconds:7.1f} s] {f.iterations} iterations, {f.messages} messages, "
                f"{sum(f.kills.values())} kills, {f.losses} lost, {f.duplicates} duplicated, "
                f"{len(f.failed)} failed",
                file=sys.stderr,
                flush=True,
            )

    try:
        figures = run_iterations(
            server,
            base / "work",
            args.iterations,
            launcher=launcher,
            seed=args.seed,
            workers=args.workers,
            max_seconds=args.max_seconds,
            keep=args.keep,
            progress=progress,
            target=Target(args.gateway, args.after_processing),
        )
    finally:
        launcher.close()
        server.stop()
    out = figures.as_dict()
    out["seed"] = args.seed
    out["gateway"] = args.gateway
    out["after_processing"] = args.after_processing
    out["work_dir"] = str(base)
    print(json.dumps(out, indent=2))
    ok = not figures.failed and figures.losses == 0 and figures.duplicates == 0
    if ok and not args.keep and args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


def _replicas_main(args: argparse.Namespace) -> int:
    """``--replicas N --store DSN``: the multi-replica kill -9 harness."""
    from tools.crash_replicas import run_replicas

    if not args.store:
        raise SystemExit("--replicas needs --store postgresql://...")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    base = Path(args.dir or tempfile.mkdtemp(prefix="mailintegration-replicas-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    server = start_dovecot(base / "dovecot")
    try:
        out = run_replicas(
            server,
            base / "work",
            store=args.store,
            iterations=args.iterations,
            replicas=args.replicas,
            mailboxes=args.mailboxes,
            lease=args.lease_seconds,
            seed=args.seed,
            max_seconds=args.max_seconds,
        )
    finally:
        server.stop()
    out["seed"] = args.seed
    out["work_dir"] = str(base)
    print(json.dumps(out, indent=2))
    problems = out["losses"] or out["duplicates"] or out["left_on_server"]
    ok = not problems and not out["ledger_keys_twice"] and out["drained"]
    if ok and not args.keep and args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
