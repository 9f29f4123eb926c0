"""End-to-end benchmark of the engine against a real Dovecot on loopback.

    python -m bench.run                 # the full run (a few minutes)
    python -m bench.run --quick         # a small version of every case (under a minute)
    python -m bench.run --profile       # only the 1-mailbox case, the engine under pyinstrument

One invocation starts Dovecot (tools.dovecot), generates a deterministic corpus
(bench.corpus) and, for each case, delivers it anew to fresh mailboxes and a fresh data
directory, then measures:

- the limit: the stdlib poplib loop and a pipelined raw-socket client (bench.clients);
- the engine: ``python -m engine once`` as a subprocess, from process start to exit;
- that every message is in the store exactly once (ledger rows, requests and activities
  by Message-ID) and every mailbox is empty afterwards;
- the engine's peak RSS, and the daemon's delivery-to-ledger latency.

It prints one Markdown table and appends it, with the machine facts, to BENCHMARKS.md
(``--out``). Timings are never asserted; the exit status is 1 only when a correctness check
failed (a message missing, stored twice, or left on the server) or a case could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import math
import os
import platform
import re
import shutil
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.clients import Fetched, imaplib_loop, pipelined, poplib_loop
from bench.corpus import MIXES, Template, describe, make_corpus, stamp
from tests.support import (
    DIRECTORY,
    IMAP_GATEWAY,
    LOGIN,
    LOGIN_PASSWORD,
    Delivered,
    check_exactly_once,
    mailbox_xml,
)
from tools.dovecot import Dovecot, start_dovecot

REPO = Path(__file__).resolve().parent.parent
PROFILE_DIR = REPO / "bench"


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    single: int  # 1 mailbox x N
    boxes: int  # M mailboxes ...
    per_box: int  # ... x K messages
    threads: int  # threads of the baseline over the M mailboxes
    tls: int  # POP3S, 1 mailbox x N
    memory: int  # messages of the memory case, of which `big` are `big_bytes`
    big: int
    big_bytes: int
    latency: int  # messages delivered one by one to the daemon
    latency_gap: float  # seconds between two deliveries
    rounds: int  # rounds of the 1-mailbox cases; the median one is reported


FULL = Sizes(
    single=2000,
    boxes=50,
    per_box=200,
    threads=20,
    tls=2000,
    memory=2000,
    big=5,
    big_bytes=15_000_000,  # 15 MB base64-encoded: a 20 MB message
    latency=200,
    latency_gap=0.05,
    rounds=5,
)
QUICK = Sizes(
    single=200,
    boxes=10,
    per_box=20,
    threads=10,
    tls=200,
    memory=200,
    big=1,
    big_bytes=15_000_000,
    latency=60,
    latency_gap=0.05,
    rounds=1,
)

MAX_MESSAGE_BYTES = 52_428_800


# --------------------------------------------------------------------------- results


class BenchError(RuntimeError):
    """A case could not be run (setup, timeout, a crash): reported, then the next case."""


@dataclass
class Row:
    case: str
    messages: int
    baseline: float | None = None  # msg/s
    engine: float | None = None  # msg/s
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.baseline and self.engine:
            return self.engine / self.baseline
        return None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- processes

_CHILDREN: list[subprocess.Popen[bytes]] = []


def _stop_children() -> None:
    """Every engine process this run started and that still runs: SIGTERM, then SIGKILL."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in _CHILDREN:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    _CHILDREN.clear()


@dataclass
class ProcResult:
    seconds: float
    returncode: int
    maxrss_kib: int
    cpu_seconds: float
    log: Path
    processes: int = 1  # the engine plus the parsing processes seen while it ran
    engine_kib: int = 0  # the engine process's own peak RSS
    pss_kib: int = 0  # peak of the summed PSS over the engine and its processes
    machine_seconds: float = 0.0  # CPU the whole machine spent meanwhile (machine_busy)


def machine_busy() -> float:
    """Seconds of CPU every core of the machine has spent busy since boot: every process
    (the engine or the client, Dovecot, this bench) and the kernel, from /proc/stat (0 where
    there is none). Over a run, it is what the run cost the machine, Dovecot's share
    included, which the CPU of the measured process alone leaves out."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MAILINTEGRATION_LOGIN"] = LOGIN
    env["MAILINTEGRATION_PASSWORD"] = LOGIN_PASSWORD
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    env.pop("MAILINTEGRATION_DATA_DIR", None)
    return env


def run_process(
    argv: list[str],
    log: Path,
    *,
    timeout: float,
    on_tick: Callable[[float, subprocess.Popen[bytes]], None] | None = None,
    tick: float = 0.05,
) -> ProcResult:
    """Run ``argv`` (cwd: the repo), timed from just before the spawn to the reap.

    The child is reaped with ``wait4`` so its own peak RSS and CPU time are known exactly
    (RUSAGE_CHILDREN would mix in every earlier child). ``on_tick`` runs every ``tick``
    seconds while it runs; past ``timeout`` the child is killed and BenchError raised.
    """
    with open(log, "wb") as out:
        busy = machine_busy()
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=REPO, env=_engine_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    _CHILDREN.append(proc)
    reaped: dict[str, object] = {}

    def waiter() -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        reaped["end"] = time.perf_counter()
        reaped["busy"] = machine_busy()
        reaped["status"] = status
        reaped["usage"] = usage

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    deadline = start + timeout
    peaks: dict[int, int] = {}  # the engine and its parsing processes, each at its peak
    pss = 0  # the highest sum of their proportional set sizes seen (shared pages split)
    while thread.is_alive():
        tree = _process_tree(proc.pid)
        for pid in tree:
            peaks[pid] = max(peaks.get(pid, 0), _vm_hwm_kib(pid))
        pss = max(pss, sum(_pss_kib(pid) for pid in tree))
        thread.join(tick)
        if on_tick is not None and thread.is_alive():
            on_tick(time.perf_counter() - start, proc)
        if thread.is_alive() and time.perf_counter() > deadline:
            proc.kill()
            thread.join(10)
            proc.returncode = -9
            _CHILDREN.remove(proc)
            raise BenchError(f"{' '.join(argv[2:5])} did not finish within {timeout:.0f} s")
    status = reaped["status"]
    usage = reaped["usage"]
    assert isinstance(status, int)
    proc.returncode = os.waitstatus_to_exitcode(status)
    _CHILDREN.remove(proc)
    end, busy_end = reaped["end"], reaped["busy"]
    assert isinstance(end, float) and isinstance(busy_end, float)
    return ProcResult(
        seconds=end - start,
        returncode=proc.returncode,
        # ru_maxrss also counts the pages of this (large) process the child had between fork
        # and exec (Linux keeps the old address space's high-water mark at exec), so it read
        # the benchmark's own corpus-laden RSS. VmHWM, polled while the child runs, is the
        # engine's alone; ru_maxrss remains as the fallback where /proc is missing.
        # With parsing processes, the sum of every process's own peak: never less than the
        # true peak of their total, which is what the machine must have.
        maxrss_kib=sum(peaks.values()) or int(usage.ru_maxrss),  # type: ignore[attr-defined]
        processes=len([k for k in peaks.values() if k]),
        engine_kib=peaks.get(proc.pid, 0),
        pss_kib=pss,
        cpu_seconds=float(usage.ru_utime + usage.ru_stime),  # type: ignore[attr-defined]
        log=log,
        machine_seconds=busy_end - busy,
    )


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child of :func:`run_process` from its ``on_tick``.

    Not ``proc.kill()``: Popen polls first, and a child that has just exited is then reaped
    there, out from under run_process's ``wait4`` (its waiter thread failed with ECHILD, and
    the crash case with KeyError: 'status', in a quick run whose engine finished as it was
    being killed). The child is not reaped before that ``wait4`` returns, so until then its
    pid is still its own, exited or not."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (what is gone is left out)."""
    tree, i = [pid], 0
    while i < len(tree):
        try:
            for task in os.listdir(f"/proc/{tree[i]}/task"):
                with open(f"/proc/{tree[i]}/task/{task}/children", encoding="ascii") as fh:
                    tree.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            pass
        i += 1
    return tree


def _proc_kib(pid: int, file: str, field: str) -> int:
    """A "Field:  N kB" line of /proc/PID/FILE (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/{file}", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kib(pid: int) -> int:
    """Proportional set size of a running process (shared pages split)."""
    return _proc_kib(pid, "smaps_rollup", "Pss")


def _vm_hwm_kib(pid: int) -> int:
    """Peak resident set of a running process."""
    return _proc_kib(pid, "status", "VmHWM")


def _apart(res: ProcResult) -> str:
    if res.processes <= 1:
        return ""
    return (
        f" (each process at its own peak, summed: the engine {_mb(res.engine_kib)} and "
        f"{res.processes - 1} parsing process(es) {_mb(res.maxrss_kib - res.engine_kib)}; "
        f"peak of their summed PSS, shared pages split: {_mb(res.pss_kib)})"
    )


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- a case's world


class World:
    """Dovecot, the corpora and a fresh folder per case."""

    def __init__(self, root: Path, dovecot: Dovecot, nonce: str) -> None:
        self.root = root
        self.dovecot = dovecot
        self.nonce = nonce
        self.serial = 0
        self.startup_cpu: float | None = None  # CPU of `once` over an empty mailbox
        self.poll_p95: float | None = None  # the POP3 poll's latency p95, for the IDLE row

    def fresh(self, case: str) -> Path:
        self.serial += 1
        folder = self.root / f"{self.serial:02d}-{case}"
        folder.mkdir(parents=True)
        return folder

    def users(self, prefix: str, count: int) -> list[str]:
        """``count`` new mailboxes; names never reused within a run."""
        self.serial += 1
        names = [f"{prefix}{self.serial:02d}x{i:02d}" for i in range(count)]
        for name in names:
            self.dovecot.add_user(name, f"pw-{name}")
        return names

    def deliver(self, user: str, templates: list[Template]) -> list[str]:
        """Deliver each template with a Message-ID of its own; returns them (no brackets)."""
        mids = []
        for i, template in enumerate(templates):
            mid = f"{user}.{i}.{template.kind}.{self.nonce}@bench.example"
            self.dovecot.deliver(user, stamp(template, mid))
            mids.append(mid)
        return mids

    def empty(self, users: list[str]) -> list[str]:
        left = {u: self.dovecot.count(u) for u in users}
        return [f"{u}: {n} message(s) left on the server" for u, n in left.items() if n]

    def engine_setup(
        self,
        folder: Path,
        users: list[str],
        *,
        tls: bool = False,
        max_bytes: int | None = None,
        imap: bool = False,
        session_seconds: float | None = None,
    ) -> tuple[Path, Path]:
        """A mailboxes.d with one file per user and a data dir with the directory imported;
        ``session_seconds`` sets each mailbox's session deadline (sessionTimeoutSeconds)."""
        config_dir = folder / "mailboxes.d"
        data_dir = folder / "data"
        config_dir.mkdir()
        extra: dict[str, str] = {}
        if max_bytes is not None:
            extra["maxMessageBytes"] = str(max_bytes)
        if imap:  # plain IMAP on loopback, as the POP3 cases use plain POP3
            extra["gateway"] = IMAP_GATEWAY
        for user in users:
            port = self.dovecot.pop3s_port if tls else self.dovecot.pop3_port
            mailbox_xml(
                config_dir / f"{user}.xml",
                port=self.dovecot.imap_port if imap else port,
                user=user,
                password=f"pw-{user}",
                host="localhost" if tls else self.dovecot.host,
                use_ssl=tls,
                server_extra=(f"    <caFile>{self.dovecot.ca_file}</caFile>\n" if tls else "")
                + (
                    f"    <sessionTimeoutSeconds>{session_seconds:.0f}</sessionTimeoutSeconds>\n"
                    if session_seconds is not None
                    else ""
                ),
                **extra,
            )
        directory = folder / "directory.json"
        directory.write_text(json.dumps(DIRECTORY), encoding="utf-8")
        result = run_process(
            [
                sys.executable,
                "-m",
                "engine",
                "directory",
                "import",
                str(directory),
                "--data-dir",
                str(data_dir),
            ],
            folder / "directory-import.log",
            timeout=120,
        )
        if result.returncode != 0:
            raise BenchError(f"directory import failed:\n{_log_tail(result.log)}")
        return config_dir, data_dir

    def engine_once(
        self,
        folder: Path,
        config_dir: Path,
        data_dir: Path,
        *,
        timeout: float,
        on_tick: Callable[[float, subprocess.Popen[bytes]], None] | None = None,
    ) -> ProcResult:
        return run_process(
            [
                sys.executable,
                "-m",
                "engine",
                "once",
                "--config-dir",
                str(config_dir),
                "--data-dir",
                str(data_dir),
            ],
            folder / "engine.log",
            timeout=timeout,
            on_tick=on_tick,
        )


def _db(data_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(data_dir / "mailintegration.sqlite3", timeout=10)
    db.execute("PRAGMA query_only = 1")
    return db


# --------------------------------------------------------------------------- verification


def verify(
    world: World, data_dir: Path, expected: dict[str, list[str]], case: str, report: Report
) -> str:
    """Every delivered message in the store exactly once, every mailbox empty: the tests'
    checker (tests.support.check_exactly_once), no outage, and each message's outcome the
    one its kind (in its Message-ID, see World.deliver) calls for: auto-replies and DSNs
    ignored, everything else created or an activity.

    Appends problems to the report and returns a short note for the table.
    """
    delivered = [Delivered(user, mid) for user, ids in expected.items() for mid in ids]
    allowed = ("created", "activity", "ignored")
    check = check_exactly_once(data_dir, delivered, world.dovecot, outcomes=allowed)
    problems = check.problems
    db = _db(data_dir)
    try:
        ledger = db.execute("SELECT mailbox, outcome, message_id FROM ledger").fetchall()
    finally:
        db.close()
    for _, outcome, mid in ledger:
        auto = str(mid).split("@")[0].split(".")[-2] == "auto"
        if (str(outcome).split(":")[0] == "ignored") != auto:
            problems.append(f"{mid}: outcome {outcome!r} for a message of its kind")
    outcomes = Counter((outcome or "?").split(":")[0] for _, outcome, _ in ledger)
    by_box = Counter(box for box, _, _ in ledger)
    for user, ids in expected.items():
        if by_box[user] != len(ids):
            problems.append(f"mailbox {user}: {by_box[user]} ledger rows for {len(ids)} messages")
    for p in problems:
        report.problems.append(f"{case}: {p}")
    mix = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    if problems:
        return f"**CHECK FAILED** ({len(problems)} problem(s), see below); ledger: {mix}"
    return f"exactly once: {len(ledger)} ledger rows ({mix}), mailboxes empty"


# --------------------------------------------------------------------------- cases


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _mb(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


@dataclass
class Timed:
    got: Fetched
    seconds: float
    cpu_seconds: float  # this process (the client and its threads; nothing else runs)
    machine_seconds: float = 0.0  # the whole machine's (machine_busy): Dovecot's included


def _timed(fn: Callable[[], Fetched]) -> Timed:
    busy = machine_busy()
    cpu = time.process_time()
    start = time.perf_counter()
    got = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Timed(got, seconds, cpu, machine_busy() - busy)


def _cpu_note(base: Timed, res: ProcResult, n: int, startup_cpu: float | None) -> str:
    """CPU per message, the number that other load on the machine disturbs least."""
    engine = res.cpu_seconds
    text = (
        f"CPU per message: baseline {base.cpu_seconds / n * 1000:.2f} ms, engine "
        f"{engine / n * 1000:.2f} ms"
    )
    if startup_cpu is not None and engine > startup_cpu:
        text += f" ({(engine - startup_cpu) / n * 1000:.2f} ms without the startup's CPU)"
    if base.machine_seconds > 0 and res.machine_seconds > 0:
        # The bound CPU sets on the ratio: the engine run needs res.machine_seconds of the
        # machine's cores; had it kept every core busy, it would have taken that over
        # nproc, so its ratio could not exceed base.seconds over that time.
        cores = os.cpu_count() or 1
        text += (
            f"; the whole machine's CPU per message (the client or the engine, Dovecot, the "
            f"kernel, this bench's polling): baseline {base.machine_seconds / n * 1000:.2f} ms "
            f"({base.machine_seconds / base.seconds:.2f} cores busy), engine "
            f"{res.machine_seconds / n * 1000:.2f} ms ({res.machine_seconds / res.seconds:.2f} "
            f"cores busy): with all {cores} cores busy the ratio could reach at most "
            f"{base.seconds * cores / res.machine_seconds:.2f}"
        )
    return text


def _check_fetched(
    world: World, got: Fetched, users: list[str], count: int, what: str, report: Report
) -> None:
    if got.messages != count:
        report.problems.append(f"{what}: fetched {got.messages} of {count} messages")
    for p in world.empty(users):
        report.problems.append(f"{what}: {p}")


def _compile_engine() -> None:
    """Byte-compile the engine, as pip does when it installs it, and keep its dataclasses'
    methods (engine.precompile, as the image does). Where the environment sets
    PYTHONDONTWRITEBYTECODE, every run would otherwise compile each module anew (~50 ms).
    A tree from before engine.precompile gets compileall alone."""
    if (REPO / "engine" / "precompile.py").is_file():
        command = [sys.executable, "-m", "engine.precompile"]
    else:
        command = [sys.executable, "-m", "compileall", "-q", str(REPO / "engine")]
    subprocess.run(
        command,
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        timeout=120,
        cwd=REPO,
        env=_engine_env(),
    )


# Runs of the start-up case: one run moved by ±10 % here from one start to the next.
STARTUP_RUNS = 7


def case_startup(world: World, report: Report) -> None:
    """``once`` over one empty mailbox: the fixed cost in every engine time below. The median
    of :data:`STARTUP_RUNS` runs, each a new process over the same data directory."""
    folder = world.fresh("startup")
    users = world.users("empty", 1)
    config_dir, data_dir = world.engine_setup(folder, users)
    runs = [
        world.engine_once(folder, config_dir, data_dir, timeout=120) for _ in range(STARTUP_RUNS)
    ]
    walls = sorted(r.seconds for r in runs)
    cpus = sorted(r.cpu_seconds for r in runs)
    world.startup_cpu = statistics.median(cpus)
    row = Row("startup: `once` over 1 empty mailbox", 0)
    row.notes.append(
        f"{statistics.median(walls):.3f} s from process start to exit (median of {len(runs)} "
        f"runs, {walls[0]:.3f}-{walls[-1]:.3f}), {world.startup_cpu:.3f} s CPU (a fixed cost "
        f"in every engine time below), peak RSS {_mb(max(r.maxrss_kib for r in runs))}"
    )
    for res in runs:
        if res.returncode != 0:
            row.notes.append(f"**exit code {res.returncode}**")
            report.problems.append(f"startup: exit code {res.returncode}\n{_log_tail(res.log)}")
            break
    report.rows.append(row)


def _engine_case(
    world: World,
    report: Report,
    row: Row,
    case: str,
    folder: Path,
    config_dir: Path,
    data_dir: Path,
    expected: dict[str, list[str]],
    base: Timed,
    *,
    on_tick: Callable[[float, subprocess.Popen[bytes]], None] | None = None,
    extra_notes: Callable[[ProcResult], list[str]] | None = None,
    append: bool = True,
) -> ProcResult:
    """Run ``once``, fill the row (rate, notes, CPU) and verify the store."""
    n = row.messages
    res = world.engine_once(
        folder, config_dir, data_dir, timeout=max(600.0, n / 5), on_tick=on_tick
    )
    row.baseline = _rate(n, base.seconds)
    row.engine = _rate(n, res.seconds)
    if extra_notes is not None:
        row.notes += extra_notes(res)
    row.notes.append(
        f"engine {res.seconds:.2f} s wall, {res.cpu_seconds:.2f} s CPU, peak RSS "
        f"{_mb(res.maxrss_kib)}{_apart(res)}"
    )
    row.notes.append(_cpu_note(base, res, n, world.startup_cpu))
    if res.returncode != 0:
        row.notes.append(f"**exit code {res.returncode}**")
        report.problems.append(f"{case}: engine exit code {res.returncode}\n{_log_tail(res.log)}")
    row.notes.append(verify(world, data_dir, expected, case, report))
    if append:
        report.rows.append(row)
    return res


def case_single(
    world: World, report: Report, corpus: list[Template], *, tls: bool, rounds: int
) -> None:
    """``rounds`` rounds of poplib loop, pipelined client and engine, each on fresh mailboxes
    and in that order: the row is the round with the median ratio, the notes give them all.
    On a shared machine the baseline alone moves by tens of percent within minutes."""
    rows = [_single_round(world, report, corpus, tls=tls) for _ in range(rounds)]
    rows.sort(key=lambda r: r.ratio or 0.0)
    row = rows[len(rows) // 2]
    if rounds > 1:
        ratios = ", ".join(f"{r.ratio:.3f}" for r in rows if r.ratio is not None)
        row.notes.insert(
            0,
            f"median of {rounds} rounds (poplib loop, pipelined client, engine in turn, each "
            f"on fresh mailboxes); ratios {ratios}",
        )
    report.rows.append(row)


def _single_round(world: World, report: Report, corpus: list[Template], *, tls: bool) -> Row:
    n = len(corpus)
    case = f"1 mailbox x {n} ({'POP3S' if tls else 'POP3'})"
    context = ssl.create_default_context(cafile=str(world.dovecot.ca_file)) if tls else None
    host = "localhost" if tls else world.dovecot.host
    port = world.dovecot.pop3s_port if tls else world.dovecot.pop3_port

    users = world.users("pl", 1)
    world.deliver(users[0], corpus)
    base = _timed(lambda: poplib_loop(host, port, users[0], f"pw-{users[0]}", tls=context))
    _check_fetched(world, base.got, users, n, f"{case} poplib", report)

    users = world.users("pp", 1)
    world.deliver(users[0], corpus)
    piped = _timed(
        lambda: pipelined(
            host, port, users[0], f"pw-{users[0]}", tls=context, server_hostname="localhost"
        )
    )
    _check_fetched(world, piped.got, users, n, f"{case} pipelined", report)
    piped_rate = _rate(n, piped.seconds)

    folder = world.fresh("single-tls" if tls else "single")
    users = world.users("en", 1)
    expected = {users[0]: world.deliver(users[0], corpus)}
    config_dir, data_dir = world.engine_setup(folder, users, tls=tls)

    def notes(res: ProcResult) -> list[str]:
        return [
            f"pipelined client {piped_rate:,.0f} msg/s, engine/pipelined "
            f"{_rate(n, res.seconds) / piped_rate:.3f}"
        ]

    row = Row(case, n)
    _engine_case(
        world,
        report,
        row,
        case,
        folder,
        config_dir,
        data_dir,
        expected,
        base,
        extra_notes=notes,
        append=False,
    )
    return row


def case_many(world: World, report: Report, corpus: list[Template], sizes: Sizes) -> None:
    m, k = sizes.boxes, sizes.per_box
    n = m * k
    case = f"{m} mailboxes x {k}"

    def slice_for(j: int) -> list[Template]:
        return [corpus[(j * k + i) % len(corpus)] for i in range(k)]

    users = world.users("tl", m)
    for j, user in enumerate(users):
        world.deliver(user, slice_for(j))
    host, port = world.dovecot.host, world.dovecot.pop3_port

    def threaded() -> Fetched:
        total = Fetched()
        with ThreadPoolExecutor(sizes.threads) as pool:
            for got in pool.map(lambda u: poplib_loop(host, port, u, f"pw-{u}"), users):
                total.messages += got.messages
                total.octets += got.octets
        return total

    base = _timed(threaded)
    _check_fetched(world, base.got, users, n, f"{case} threaded poplib", report)

    folder = world.fresh("many")
    users = world.users("em", m)
    expected = {user: world.deliver(user, slice_for(j)) for j, user in enumerate(users)}
    config_dir, data_dir = world.engine_setup(folder, users)

    # Per-mailbox finish times: poll the ledger (WAL: readers never block the writer).
    finished: dict[str, float] = {}
    first_row: list[float] = []
    db = _db(data_dir)

    def tick(elapsed: float, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(sqlite3.Error):
            counts = dict(db.execute("SELECT mailbox, COUNT(*) FROM ledger GROUP BY mailbox"))
            if counts and not first_row:
                first_row.append(elapsed)
            for box, count in counts.items():
                if count >= k and box not in finished:
                    finished[box] = elapsed

    def notes(res: ProcResult) -> list[str]:
        for user in users:
            finished.setdefault(user, res.seconds)
        times = sorted(finished.values())
        median = statistics.median(times)
        return [
            f"baseline: poplib loop in {sizes.threads} threads; engine with its default "
            "--max-sessions 16",
            f"per-mailbox finish (ledger polled every 50 ms, from process start): first "
            f"{times[0]:.2f} s, median {median:.2f} s, max {times[-1]:.2f} s "
            f"(max/median {times[-1] / median:.2f}); first ledger row at "
            f"{first_row[0] if first_row else float('nan'):.2f} s",
        ]

    try:
        _engine_case(
            world,
            report,
            Row(case, n),
            case,
            folder,
            config_dir,
            data_dir,
            expected,
            base,
            on_tick=tick,
            extra_notes=notes,
        )
    finally:
        db.close()


def case_imap_single(world: World, report: Report, corpus: list[Template], rounds: int) -> None:
    """IMAP, 1 mailbox: the plain imaplib loop against the engine, ``rounds`` rounds each on
    fresh mailboxes; the row is the round with the median ratio."""
    n = len(corpus)
    case = f"1 mailbox x {n} (IMAP)"
    host, port = world.dovecot.host, world.dovecot.imap_port
    rows: list[Row] = []
    for _ in range(rounds):
        users = world.users("il", 1)
        world.deliver(users[0], corpus)
        base = _timed(functools.partial(imaplib_loop, host, port, users[0], f"pw-{users[0]}"))
        _check_fetched(world, base.got, users, n, f"{case} imaplib", report)
        folder = world.fresh("imap-single")
        users = world.users("ie", 1)
        expected = {users[0]: world.deliver(users[0], corpus)}
        config_dir, data_dir = world.engine_setup(folder, users, imap=True)
        row = Row(case, n)
        row.notes.append("baseline: imaplib loop (UID FETCH and UID STORE each, one EXPUNGE)")
        _engine_case(
            world, report, row, case, folder, config_dir, data_dir, expected, base, append=False
        )
        rows.append(row)
    rows.sort(key=lambda r: r.ratio or 0.0)
    row = rows[len(rows) // 2]
    if rounds > 1:
        ratios = ", ".join(f"{r.ratio:.3f}" for r in rows if r.ratio is not None)
        row.notes.insert(0, f"median of {rounds} rounds; ratios {ratios}")
    report.rows.append(row)


def case_imap_many(world: World, report: Report, corpus: list[Template], sizes: Sizes) -> None:
    """IMAP, many mailboxes: the imaplib loop in threads against the engine."""
    m, k = sizes.boxes, sizes.per_box
    n = m * k
    case = f"{m} mailboxes x {k} (IMAP)"

    def slice_for(j: int) -> list[Template]:
        return [corpus[(j * k + i) % len(corpus)] for i in range(k)]

    users = world.users("it", m)
    for j, user in enumerate(users):
        world.deliver(user, slice_for(j))
    host, port = world.dovecot.host, world.dovecot.imap_port

    def threaded() -> Fetched:
        total = Fetched()
        with ThreadPoolExecutor(sizes.threads) as pool:
            for got in pool.map(lambda u: imaplib_loop(host, port, u, f"pw-{u}"), users):
                total.messages += got.messages
                total.octets += got.octets
        return total

    base = _timed(threaded)
    _check_fetched(world, base.got, users, n, f"{case} threaded imaplib", report)
    folder = world.fresh("imap-many")
    users = world.users("im", m)
    expected = {user: world.deliver(user, slice_for(j)) for j, user in enumerate(users)}
    config_dir, data_dir = world.engine_setup(folder, users, imap=True)
    row = Row(case, n)
    row.notes.append(
        f"baseline: imaplib loop in {sizes.threads} threads; engine with its default "
        "--max-sessions 16"
    )
    _engine_case(world, report, row, case, folder, config_dir, data_dir, expected, base)


def case_memory(world: World, report: Report, sizes: Sizes, mix: str = "bench") -> None:
    """Peak RSS with a few 20 MB messages, spread evenly (the row), then the same corpus with
    the big messages one after the other (a note: they can be in flight together)."""
    corpus = make_corpus(sizes.memory, seed=7, big=sizes.big, big_bytes=sizes.big_bytes, mix=mix)
    n = len(corpus)
    big_size = min(sorted((len(t.raw) for t in corpus), reverse=True)[: sizes.big])
    total_mb = sum(len(t.raw) for t in corpus) / 1e6
    case = f"memory: 1 mailbox x {n} incl. {sizes.big} x {big_size / 1e6:.0f} MB"

    users = world.users("ml", 1)
    world.deliver(users[0], corpus)
    host, port = world.dovecot.host, world.dovecot.pop3_port
    base = _timed(lambda: poplib_loop(host, port, users[0], f"pw-{users[0]}"))
    _check_fetched(world, base.got, users, n, f"{case} poplib", report)

    # The same messages with the big ones back to back in the middle.
    big = [t for t in corpus if t.kind == "big"]
    small = [t for t in corpus if t.kind != "big"]
    clustered = small[: len(small) // 2] + big + small[len(small) // 2 :]
    folder = world.fresh("memory-clustered")
    users = world.users("mc", 1)
    expected = {users[0]: world.deliver(users[0], clustered)}
    del clustered
    config_dir, data_dir = world.engine_setup(folder, users, max_bytes=MAX_MESSAGE_BYTES)
    together = world.engine_once(folder, config_dir, data_dir, timeout=max(600.0, n / 5))
    check = verify(world, data_dir, expected, f"{case} (clustered)", report)
    if together.returncode != 0:
        report.problems.append(
            f"{case} (clustered): engine exit code {together.returncode}\n{_log_tail(together.log)}"
        )

    folder = world.fresh("memory")
    users = world.users("mm", 1)
    expected = {users[0]: world.deliver(users[0], corpus)}
    del corpus
    config_dir, data_dir = world.engine_setup(folder, users, max_bytes=MAX_MESSAGE_BYTES)

    def notes(res: ProcResult) -> list[str]:
        return [
            f"**peak RSS {_mb(res.maxrss_kib)}** with the big messages spread evenly, "
            f"**{_mb(together.maxrss_kib)}** with them back to back (exit "
            f"{together.returncode}; {check}); VmHWM of the engine process{_apart(res)}; corpus "
            f"{total_mb:.0f} MB, maxMessageBytes {MAX_MESSAGE_BYTES}"
        ]

    _engine_case(
        world,
        report,
        Row(case, n),
        case,
        folder,
        config_dir,
        data_dir,
        expected,
        base,
        extra_notes=notes,
    )


def case_crash(world: World, report: Report, corpus: list[Template]) -> None:
    """Not a timing: SIGKILL ``once`` a third of the way through, run it again, and check
    that every message is still in the store exactly once and the mailbox ends empty (the
    killed session's DELEs were never committed by a QUIT, so the rerun meets messages that
    are already in the ledger)."""
    n = len(corpus)
    case = f"crash: SIGKILL `once` after {n // 3} of {n}, then `once` again"
    row = Row(case, n)
    folder = world.fresh("crash")
    users = world.users("cr", 1)
    expected = {users[0]: world.deliver(users[0], corpus)}
    config_dir, data_dir = world.engine_setup(folder, users)
    db = _db(data_dir)
    killed_at: list[int] = []

    def tick(elapsed: float, proc: subprocess.Popen[bytes]) -> None:
        if killed_at:
            return
        with contextlib.suppress(sqlite3.Error):
            (rows,) = db.execute("SELECT COUNT(*) FROM ledger").fetchone()
            if rows >= n // 3:
                sigkill(proc)
                killed_at.append(rows)

    try:
        first = world.engine_once(
            folder, config_dir, data_dir, timeout=max(600.0, n / 5), on_tick=tick
        )
    finally:
        db.close()
    left = world.dovecot.count(users[0])
    if not killed_at:
        row.notes.append(f"the first run ended (exit {first.returncode}) before the kill")
    (folder / "engine.log").rename(folder / "engine-killed.log")
    second = world.engine_once(folder, config_dir, data_dir, timeout=max(600.0, n / 5))
    # The fetcher logs one line per session: "N message(s) already in the ledger: deleting".
    already = sum(
        int(m.group(1))
        for m in re.finditer(
            r"(\d+) message\(s\) already in the ledger", _log_tail(folder / "engine.log", 10**6)
        )
    )
    row.notes.append(
        f"killed with >= {killed_at[0] if killed_at else '?'} ledger rows (exit "
        f"{first.returncode}); {left} message(s) still on the server; the rerun (exit "
        f"{second.returncode}) found {already} of them already in the ledger"
    )
    if second.returncode != 0:
        row.notes.append(f"**rerun exit code {second.returncode}**")
        report.problems.append(
            f"{case}: rerun exit code {second.returncode}\n{_log_tail(second.log)}"
        )
    row.notes.append(verify(world, data_dir, expected, case, report))
    report.rows.append(row)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def case_latency(
    world: World, report: Report, corpus: list[Template], sizes: Sizes, *, imap: bool = False
) -> None:
    """The daemon's delivery-to-ledger latency: POP3 polled every second, or IMAP pushed by
    IDLE with a poll of 600 s (so every message within it came by push)."""
    n = sizes.latency
    how = "IMAP IDLE, poll 600 s" if imap else "poll 1 s"
    case = f"latency: daemon, {how}, {n} messages every {sizes.latency_gap * 1000:.0f} ms"
    row = Row(case, n)
    folder = world.fresh("latency-imap" if imap else "latency")
    users = world.users("li" if imap else "lt", 1)
    user = users[0]
    config_dir, data_dir = world.engine_setup(folder, users, imap=imap)
    argv = [
        sys.executable,
        "-m",
        "engine",
        "run",
        "--config-dir",
        str(config_dir),
        "--data-dir",
        str(data_dir),
        "--poll-interval",
        "600" if imap else "1",
        "--http-port",
        "0",
    ]
    log = folder / "engine.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=_engine_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    _CHILDREN.append(proc)
    expected: list[str] = []
    seen: dict[str, float] = {}
    db = _db(data_dir)
    last_id = 0

    def poll() -> None:
        nonlocal last_id
        now = time.perf_counter()
        for row_id, mid in db.execute(
            "SELECT id, message_id FROM ledger WHERE id > ? ORDER BY id", (last_id,)
        ):
            last_id = row_id
            seen.setdefault(mid, now)

    def wait_for(mids: list[str], limit: float) -> bool:
        deadline = time.perf_counter() + limit
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"the daemon exited ({proc.returncode}):\n{_log_tail(log)}")
            poll()
            if all(m in seen for m in mids):
                return True
            time.sleep(0.02)
        return False

    delivered: dict[str, float] = {}
    try:
        # Warm-up: one message, so the daemon's start is not part of any latency.
        warm = world.deliver(user, corpus[-1:])
        expected += warm
        if not wait_for(warm, 60):
            raise BenchError(f"the daemon never processed the warm-up message:\n{_log_tail(log)}")
        start = time.perf_counter()
        i = 0
        while i < n:
            due = start + i * sizes.latency_gap
            now = time.perf_counter()
            if now >= due:
                template = corpus[i % len(corpus)]
                mid = f"{user}.lat{i}.{template.kind}.{world.nonce}@bench.example"
                world.dovecot.deliver(user, stamp(template, mid))
                delivered[mid] = time.perf_counter()
                expected.append(mid)
                i += 1
                continue
            poll()
            time.sleep(min(0.02, max(0.0, due - time.perf_counter())))
        complete = wait_for(list(delivered), 60)
        poll()
    finally:
        db.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=10)
            report.problems.append(f"{case}: the daemon ignored SIGTERM for 45 s; killed")
        if proc in _CHILDREN:
            _CHILDREN.remove(proc)
    lat = sorted(seen[m] - t for m, t in delivered.items() if m in seen)
    if not complete:
        report.problems.append(
            f"{case}: {n - len(lat)} message(s) never reached the ledger within 60 s"
        )
    if lat:
        p95 = _percentile(lat, 0.95)
        row.notes.append(
            f"delivery -> ledger row: **p50 {statistics.median(lat) * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms**, max {lat[-1] * 1000:.0f} ms "
            f"(store polled every 20 ms)"
        )
        if imap and world.poll_p95:
            row.notes.append(
                f"p95 IDLE / p95 of the 1 s poll in this run: **{p95 / world.poll_p95:.3f}**"
            )
        if not imap:
            world.poll_p95 = p95
    if code != 0:
        report.problems.append(f"{case}: daemon exit code {code} after SIGTERM\n{_log_tail(log)}")
        row.notes.append(f"**exit code {code} after SIGTERM**")
    else:
        row.notes.append("SIGTERM: clean exit 0")
    row.notes.append(verify(world, data_dir, {user: expected}, case, report))
    report.rows.append(row)


# --------------------------------------------------------------------------- profile


def profile(world: World, report: Report, corpus: list[Template]) -> list[Path]:
    """The 1-mailbox case with the engine under pyinstrument, then (when installed) under
    py-spy; returns the files written under bench/.

    pyinstrument samples only the main thread, the event loop: time spent in the worker
    threads (POP3, parsing) and in aiosqlite's thread (SQL) shows there as ``epoll.poll``.
    py-spy samples every thread, so its summary says where the CPU goes.
    """
    n = len(corpus)
    outputs: list[Path] = []

    def engine_run(tool: list[str], tag: str) -> tuple[Path, ProcResult]:
        folder = world.fresh(f"profile-{tag}")
        users = world.users("pf", 1)
        expected = {users[0]: world.deliver(users[0], corpus)}
        config_dir, data_dir = world.engine_setup(folder, users)
        res = run_process(
            [*tool, "once", "--config-dir", str(config_dir), "--data-dir", str(data_dir)],
            folder / "engine.log",
            timeout=max(600.0, n / 2),
        )
        case = f"profile ({tag}): 1 mailbox x {n}"
        if res.returncode != 0:
            report.problems.append(f"{case}: exit code {res.returncode}\n{_log_tail(res.log)}")
        row = Row(f"{case} under {tag}", n, engine=_rate(n, res.seconds))
        row.notes.append(verify(world, data_dir, expected, case, report))
        report.rows.append(row)
        return folder, res

    session = PROFILE_DIR / "profile-once.pyisession"
    engine_run(
        [
            sys.executable,
            "-m",
            "pyinstrument",
            "-r",
            "pyisession",
            "-o",
            str(session),
            # engine.cli.main, not ``-m engine``: its run() leaves by os._exit, before
            # pyinstrument writes the session (which came out empty).
            "-c",
            "import sys; from engine.cli import main; sys.exit(main())",
        ],
        "pyinstrument",
    )
    outputs.append(session)
    renders = [
        ("profile-once.txt", ["-r", "text", "--no-color", "--unicode"]),
        ("profile-once.pstats", ["-r", "pstats"]),
    ]
    for name, flags in renders:
        target = PROFILE_DIR / name
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pyinstrument",
                "--load",
                str(session),
                *flags,
                "-o",
                str(target),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            report.problems.append(f"profile: rendering {name} failed: {done.stderr.decode()}")
        else:
            outputs.append(target)

    sql_json = PROFILE_DIR / "profile-once-sql.json"
    _, res = engine_run([sys.executable, "-m", "bench.sqltrace", str(sql_json)], "sqltrace")
    if sql_json.is_file():
        summary = PROFILE_DIR / "profile-once-sql.txt"
        summary.write_text(summarize_sql(sql_json, n, res.seconds), encoding="utf-8")
        outputs += [sql_json, summary]

    pyspy = shutil.which("py-spy")
    if pyspy is None:
        report.details.append("py-spy is not installed (pip install py-spy): no all-thread profile")
        return outputs
    raw = PROFILE_DIR / "profile-once-pyspy.raw"
    rate = 250
    engine_run(
        [
            pyspy,
            "record",
            "--format",
            "raw",
            "--threads",
            "--subprocesses",  # the parsing processes too (issue 18: "py-spy on both processes")
            "--rate",
            str(rate),
            "--nonblocking",
            "-o",
            str(raw),
            "--",
            sys.executable,
            "-m",
            "engine",
        ],
        "py-spy",
    )
    if raw.is_file():
        outputs.append(raw)
        summary = PROFILE_DIR / "profile-once-pyspy.txt"
        summary.write_text(summarize_pyspy(raw, rate), encoding="utf-8")
        outputs.append(summary)
    return outputs


def summarize_sql(path: Path, messages: int, wall: float) -> str:
    """Statements per message and where SQLite's own time goes (bench.sqltrace's numbers)."""
    stats = json.loads(path.read_text(encoding="utf-8"))
    calls = sum(v["count"] for v in stats.values())
    seconds = sum(v["seconds"] for v in stats.values())
    commits = stats.get("COMMIT", {"count": 0, "seconds": 0.0})
    lines = [
        f"SQLite calls made through aiosqlite (each one a hop to its thread and back), "
        f"{messages} messages, engine wall {wall:.2f} s:",
        f"  {calls} calls = {calls / max(1, messages):.1f} per message; time inside SQLite "
        f"{seconds:.2f} s ({seconds / max(1, messages) * 1000:.2f} ms per message)",
        f"  COMMIT: {commits['count']} transactions ({messages / max(1, commits['count']):.1f} "
        f"messages per commit), {commits['seconds']:.2f} s, "
        f"{commits['seconds'] / max(1, commits['count']) * 1000:.2f} ms each",
        "",
        f"{'calls':>7} {'per msg':>8} {'seconds':>8} {'ms/call':>8}  statement",
    ]
    for kind, v in sorted(stats.items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(
            f"{v['count']:7d} {v['count'] / max(1, messages):8.2f} {v['seconds']:8.3f} "
            f"{v['seconds'] / max(1, v['count']) * 1000:8.3f}  {kind}"
        )
    return "\n".join(lines) + "\n"


_PYSPY_PROCESSES = re.compile(r'(?:process \d+:"(?:[^"\\]|\\.)*";)+')
_PYSPY_COMMAND = re.compile(r'process \d+:"((?:[^"\\]|\\.)*)";')


def _process_kind(chain: list[str]) -> str:
    """What a process of the engine's run is, from its chain of command lines (the process
    py-spy runs first). The first is the engine's whatever its command line reads as: py-spy
    reads it as ``""`` on some machines, and every sample then counted as a parsing process's."""
    command = chain[-1]
    if len(chain) == 1 or " -m engine" in command:
        return "engine"
    if "resource_tracker" in command:
        return "resource tracker"
    return "parsing process"


def summarize_pyspy(raw: Path, rate: int, top: int = 40) -> str:
    """Cumulative and self time per function (line numbers dropped), and per thread kind,
    from py-spy's collapsed stacks (only busy samples: idle threads are not recorded)."""
    cumulative: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # With --subprocesses each stack starts with its process and the parents', each as
        # `process PID:"command line";`: a command line may hold a ';' of its own.
        chain = _PYSPY_PROCESSES.match(stack)
        if chain is not None:
            processes[_process_kind(_PYSPY_COMMAND.findall(chain.group(0)))] += count
            stack = stack[chain.end() :]
        frames = stack.split(";")
        head = frames[0]
        if head.startswith("thread ("):
            name = head.split(":", 1)[1].strip() if ":" in head else "main"
            threads[re.sub(r"[-_ ]\d+|\(.*\)|\d+", "", name).strip() or "main"] += count
            frames = frames[1:]
        names = [re.sub(r":\d+\)$", ")", f) for f in frames]
        total += count
        for f in set(names):
            cumulative[f] += count
        if names:
            own[names[-1]] += count
    if not total:
        return "no samples\n"

    def fmt(c: Counter[str]) -> list[str]:
        return [f"{n / rate:8.2f} s {100 * n / total:5.1f} %  {f}" for f, n in c.most_common(top)]

    out = [
        f"py-spy, {rate} Hz, busy samples of every thread: {total} ({total / rate:.1f} s of "
        "CPU-or-GIL-holding time; idle threads are not sampled)",
        "",
        "By process:",
        *(f"{n / rate:8.2f} s {100 * n / total:5.1f} %  {k}" for k, n in processes.most_common()),
        "",
        "By thread kind:",
        *(f"{n / rate:8.2f} s {100 * n / total:5.1f} %  {t}" for t, n in threads.most_common()),
        "",
        f"Top {top} by cumulative time (a function counted once per sample):",
        *fmt(cumulative),
        "",
        f"Top {top} by self time:",
        *fmt(own),
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- output


def table(rows: list[Row]) -> str:
    out = [
        "| case | messages | baseline msg/s | engine msg/s | ratio | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = f"{r.baseline:,.0f}" if r.baseline else "-"
        eng = f"{r.engine:,.0f}" if r.engine else "-"
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        notes = "; ".join(r.notes).replace("|", "\\|")
        out.append(f"| {r.case} | {r.messages:,} | {base} | {eng} | {ratio} | {notes} |")
    return "\n".join(out)


HEADER = """# Benchmarks

Throughput, memory, latency and crash recovery of the engine against a real Dovecot on
loopback, measured by `bench/run.py` in one invocation:

```sh
python -m bench.run            # full: 1 x 2,000, 50 x 200, POP3S, 20 MB messages, latency, crash
python -m bench.run --quick    # the same cases, small (about a minute; CI may run it)
python -m bench.run --profile  # the 1 x 2,000 case under pyinstrument, SQL tracing and py-spy
python -m bench.run --only single --engine-tree /tmp/before  # A/B: another checkout's engine
```

Each case delivers the same deterministic corpus (`bench/corpus.py`: plain text, HTML only,
text+HTML, attachments of 1 KB to 200 KB, RFC 2047 headers, `RE: [Incident] #N` replies; about
10 KiB per message), each message with a Message-ID of its own, anew to fresh mailboxes and a
fresh data directory.

How to read the table:

- **baseline msg/s** is the limit a client could reach here: the stdlib `poplib` loop (USER/PASS,
  UIDL, RETR + DELE each, QUIT; in threads for the many-mailbox case). The pipelined client in
  the notes (a window of RETR, then DELE, commands in flight on a raw socket) shows what the
  server alone can do.
- **engine msg/s** is `python -m engine once` from process start to exit, so it includes the
  interpreter start, the store, parsing, processing, the durable commit (WAL,
  `synchronous=FULL`) and DELE after the commit. The `startup` row is that fixed cost.
- **ratio** = engine / baseline. 1.0 would mean the engine costs nothing over a bare fetch;
  the engine also parses and commits every message durably, so expect well below 1.
- **CPU per message** (in the notes) is the number other load on the machine disturbs least:
  the engine's own CPU time (`wait4`) against the reference client's (`process_time`).
  Beside it, the whole machine's CPU per message during each run (`/proc/stat`: the client
  or the engine, Dovecot, the kernel), how many cores that kept busy, and the highest ratio
  the engine could reach at its CPU cost had it kept every core busy: a target above that
  bound needs less CPU per message, not better overlap.
- Every engine case is checked: each delivered Message-ID exactly once in the ledger and
  exactly one request or activity for it, no outage, and every mailbox empty afterwards. The
  `crash` row kills `once` with SIGKILL a third of the way through and checks the same after
  a second run. A failed check is printed in bold in the notes and listed under the table,
  and makes the command exit 1; timings are never asserted.

Each run appends a section below (date, `nproc`, Python, machine, load average). The numbers
move by tens of percent when other work runs on the machine (see the load average): compare
ratios and CPU per message, not absolute rates, across runs and machines. `--profile` writes
`bench/profile-once*` (not committed): pyinstrument's view of the event loop thread, every
SQLite call counted and timed (`bench/sqltrace.py`), and py-spy's view of all threads.
"""


def record(out: Path, mode: str, report: Report, facts: dict[str, str]) -> None:
    if not out.exists() or not out.read_text(encoding="utf-8").strip():
        out.write_text(HEADER, encoding="utf-8")
    stamp_ = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        f"## {stamp_} - {mode}",
        "",
        ", ".join(f"{k} {v}" for k, v in facts.items()),
        "",
        table(report.rows),
        "",
    ]
    if report.details:
        lines += [*(f"- {d}" for d in report.details), ""]
    if report.problems:
        lines += ["**Correctness problems:**", ""]
        lines += [f"- {p.splitlines()[0]}" for p in report.problems]
        lines.append("")
    with open(out, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def machine_facts() -> dict[str, str]:
    try:
        dovecot = (
            subprocess.run(
                ["dovecot", "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
            or "?"
        )
    except OSError:
        dovecot = "?"
    return {
        "nproc": str(os.cpu_count() or "?"),
        "Python": platform.python_version(),
        "uname -m": platform.machine(),
        "Dovecot": dovecot.split(" ")[0],
        "parser": _parser_kind(),
        # Other work on the machine skews every number: say how busy it was.
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _parser_kind() -> str:
    """Whether the measured engine runs its parser compiled (engine.native) or not, and why."""
    if not (REPO / "engine" / "nativebuild.py").exists():
        return "interpreted (a tree from before engine.native)"
    done = subprocess.run(
        [sys.executable, "-m", "engine.nativebuild", "--check"],
        cwd=REPO,
        env=_engine_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 0:
        return "compiled (engine.native)"
    return "interpreted (" + done.stdout.strip().removeprefix("engine.nativebuild: ") + ")"


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM (and SIGHUP) become SystemExit, so every finally below runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _mix_cases(
    world: World, report: Report, sizes: Sizes, corpus: list[Template], mix: str
) -> list[tuple[str, Callable[[], object]]]:
    """Every case that runs once per corpus mix, by name."""
    return [
        (
            "single",
            lambda: case_single(
                world, report, corpus[: sizes.single], tls=False, rounds=sizes.rounds
            ),
        ),
        ("many", lambda: case_many(world, report, corpus, sizes)),
        (
            "tls",
            lambda: case_single(world, report, corpus[: sizes.tls], tls=True, rounds=sizes.rounds),
        ),
        ("memory", lambda: case_memory(world, report, sizes, mix)),
        ("latency", lambda: case_latency(world, report, corpus, sizes)),
        ("crash", lambda: case_crash(world, report, corpus[: sizes.single])),
        (
            "imap",
            lambda: case_imap_single(world, report, corpus[: sizes.single], sizes.rounds),
        ),
        ("imap-many", lambda: case_imap_many(world, report, corpus, sizes)),
        (
            "imap-latency",
            lambda: case_latency(world, report, corpus, sizes, imap=True),
        ),
    ]


def _run_case(
    report: Report, name: str, run: Callable[[], object], *, label: str | None = None
) -> None:
    """One case; its rows get ``label`` appended. A case that cannot run or crashes is
    reported, and the next one runs."""
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    first = len(report.rows)
    try:
        run()
    except BenchError as exc:
        report.problems.append(f"{name}: could not run: {exc}")
    except Exception as exc:  # a crash of one case must not lose the others
        traceback.print_exc()
        report.problems.append(f"{name}: crashed: {type(exc).__name__}: {exc}")
    if label:
        for row in report.rows[first:]:
            row.case = f"{row.case} [{label}]"
    print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _use_engine_tree(tree: Path) -> None:
    global REPO
    REPO = tree.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "BENCHMARKS.md",
        help="append the results here (default BENCHMARKS.md)",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; append nothing")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only the 1-mailbox case under pyinstrument (bench/profile-once.*)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--mix",
        default=",".join(MIXES),
        help="comma-separated corpus mixes, each case runs on each (default: all of "
        + ", ".join(MIXES)
        + "; see bench/corpus.py)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated cases: startup,single,many,tls,memory,latency,crash,imap,"
        "imap-many,imap-latency",
    )
    parser.add_argument(
        "--engine-tree",
        type=Path,
        help="run the engine from this checkout instead (an A/B: a git worktree of the "
        "revision before); the corpus, Dovecot, baselines and checks stay this checkout's",
    )
    args = parser.parse_args(argv)
    if args.engine_tree is not None:
        _use_engine_tree(args.engine_tree)
    sizes = QUICK if args.quick else FULL
    every = "startup,single,many,tls,memory,latency,crash,imap,imap-many,imap-latency"
    wanted = set((args.only or every).split(","))
    mixes = [m for m in args.mix.split(",") if m]
    if unknown := set(mixes) - set(MIXES):
        parser.error(f"unknown mix: {', '.join(sorted(unknown))}")

    report = Report()
    facts = machine_facts()
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="mi-bench-"))
    dovecot: Dovecot | None = None
    with _terminate_on_sigterm():
        try:
            dovecot = start_dovecot(root / "dovecot", max_connections=sizes.boxes + 100)
            world = World(root / "cases", dovecot, uuid.uuid4().hex[:10])
            _compile_engine()
            if args.profile:
                corpus = make_corpus(sizes.single, mix=mixes[0])
                report.details.append(f"corpus ({mixes[0]}): {describe(corpus)}")
                outputs = profile(world, report, corpus)
                report.details.append(
                    "profile files: " + ", ".join(str(p.relative_to(REPO)) for p in outputs)
                )
            elif "startup" in wanted:
                _run_case(report, "startup", lambda: case_startup(world, report))
            for mix in mixes if not args.profile else ():
                corpus = make_corpus(max(sizes.single, sizes.tls), mix=mix)
                report.details.append(f"corpus {mix}: {describe(corpus[: sizes.single])}")
                cases = _mix_cases(world, report, sizes, corpus, mix)
                for name, run in cases:
                    if name in wanted:
                        _run_case(report, f"{name} ({mix})", run, label=f"{mix} mix")
        finally:
            _stop_children()
            if dovecot is not None:
                with contextlib.suppress(Exception):
                    dovecot.stop()
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
            else:
                print(f"[bench] work folder kept: {root}", file=sys.stderr)

    report.details.append(
        f"total bench time {time.perf_counter() - started:.0f} s; load average at the end "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    mode = ("profile " if args.profile else "") + ("quick" if args.quick else "full")
    print()
    print(", ".join(f"{k} {v}" for k, v in facts.items()))
    print()
    print(table(report.rows))
    for d in report.details:
        print(f"- {d}")
    if report.problems:
        print("\nCorrectness problems:")
        for p in report.problems:
            print(f"- {p}")
    if not args.no_record and not args.profile:
        record(args.out, mode, report, facts)
        print(f"\n(appended to {args.out})")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
