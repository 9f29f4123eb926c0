"""The benchmark harness itself, in its quick mode: every case runs and every engine case is
checked exactly once. No timing is asserted (CI machines are shared and noisy)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.dovecot import find_dovecot

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.dovecot
@pytest.mark.timeout(1200)  # every case on both corpus mixes: two to four minutes here
def test_quick_benchmark_runs_every_case_and_records_one_table(tmp_path: Path) -> None:
    if find_dovecot() is None:
        pytest.skip("dovecot is not installed")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    section = text.split("\n## ", 1)[1]
    assert section.count("- quick") == 1 and "nproc " in section and "Python " in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    cases = [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]]
    # startup once, then every other case on each corpus mix, its rows labelled with it.
    per_mix = [
        "1 mailbox x 200",
        "10 mailboxes x 20",
        "1 mailbox x 200",
        "memory",
        "latency",
        "crash",
        "1 mailbox x 200",
        "10 mailboxes x 20",
        "latency",
    ]
    assert [c.split(":")[0].split(" (")[0].split(" [")[0] for c in cases] == [
        "startup",
        *per_mix,
        *per_mix,
    ]
    for k, mix in enumerate(("bench", "realistic")):
        labelled = cases[1 + k * len(per_mix) : 1 + (k + 1) * len(per_mix)]
        assert all(c.endswith(f" [{mix} mix]") for c in labelled), labelled
        assert "(IMAP)" in labelled[-3] and "(IMAP)" in labelled[-2]
        assert "IMAP IDLE" in labelled[-1]
    assert "p95 IDLE / p95 of the 1 s poll in this run" in section
    assert "CHECK FAILED" not in text and "Correctness problems" not in text
    assert section.count("exactly once:") >= 18
    assert "ignored" in section  # the realistic mix's auto-replies, each checked as such
    # Every throughput row carries the bound the machine's CPU sets on its ratio.
    assert section.count("cores busy): with all") >= 8, section


def test_the_profile_summary_splits_the_engine_from_its_parsing_process(tmp_path: Path) -> None:
    """py-spy --subprocesses prefixes each stack with its process chain, whose command lines
    may hold a ';' of their own: the summary counts samples per process, and the frames after
    the chain, not inside it."""
    from bench.run import summarize_pyspy

    engine = 'process 10:"/v/python -m engine once --config-dir /c";'
    parser = 'process 11:"/v/python -B -c from multiprocessing.spawn import spawn_main; x;y";'
    raw = tmp_path / "raw"
    raw.write_text(
        f"{engine}thread (0x1): MainThread;run (engine/cli.py:3);apply (engine/writer.py:9) 30\n"
        f"{engine}{parser}thread (0x2): MainThread;parse_message (engine/parse/x.py:7) 10\n",
        encoding="utf-8",
    )
    text = summarize_pyspy(raw, rate=10)
    by_process = text.split("By process:\n", 1)[1].split("\n\n", 1)[0]
    assert by_process.splitlines() == [
        "    3.00 s  75.0 %  engine",
        "    1.00 s  25.0 %  parsing process",
    ]
    assert "1.00 s  25.0 %  parse_message (engine/parse/x.py)" in text
    assert "spawn_main" not in text.split("By thread kind:", 1)[1]


def test_the_profile_summary_counts_the_root_process_as_the_engine_whatever_its_command(
    tmp_path: Path,
) -> None:
    """py-spy may read the engine's command line as "" (it did on one machine): the root of
    every chain is still the engine, not a parsing process."""
    from bench.run import summarize_pyspy

    raw = tmp_path / "raw"
    raw.write_text(
        'process 10:"";thread (0x1): MainThread;apply (engine/writer.py:9) 30\n'
        'process 10:"";process 11:"/v/python -u -m anyio.to_process";thread (0x2): MainThread;'
        "parse_message (engine/parse/x.py:7) 10\n",
        encoding="utf-8",
    )
    by_process = summarize_pyspy(raw, rate=10).split("By process:\n", 1)[1].split("\n\n", 1)[0]
    assert by_process.splitlines() == [
        "    3.00 s  75.0 %  engine",
        "    1.00 s  25.0 %  parsing process",
    ]


@pytest.mark.timeout(300)
def test_quick_parser_benchmark_times_and_compares_every_parser_present() -> None:
    """bench.parsers in its quick mode: a row per parser and corpus against the stdlib, the
    agreement of each parser installed with ours, HTML converters against ours."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.parsers", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    head = "| parser | bench mix | realistic mix | realworld | realworld2 |"
    assert head in out
    timings = [line for line in out.splitlines() if line.startswith("| ") and " µs (" in line]
    rows = {line.split(" | ")[0]: line for line in timings}
    assert rows["| stdlib email"].count("(1.00)") == 4
    assert rows["| ours (parse_message)"].count(" µs (") == 4
    assert rows["| ours (render_html)"].count("(1.00)") == 4
    # The stdlib against ours, message by message: the bench mix (50 here) all alike.
    assert "| stdlib email | bench mix | 50/50 | 0 | 0 | 0 | none | none |" in out
    for name in ("fast-mail-parser", "selectolax (lexbor)", "resiliparse"):
        assert f"{name}: not installed, skipped" in out or f"| {name} |" in out


@pytest.mark.timeout(300)
def test_parse_cost_measures_each_mix_for_each_tree_given() -> None:
    """bench.parse_cost on CPU time, 20 messages of each mix in windows of 8, this tree given
    twice: a line per mix and tree, the second with its ratio to the first, and the size of
    what the parsing process pickles back."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.parse_cost", "--count", "20", "--window", "8",
         "--repeat", "1", str(ROOT), str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[bench mix"] * 2 + ["[realistic mix"] * 2
    assert all("us CPU/message" in line and "bytes pickled back" in line for line in lines)
    assert lines[1].endswith(")") and lines[3].endswith(")")


def test_machine_busy_counts_the_cpu_spent_by_any_process() -> None:
    """bench.run's whole-machine CPU (/proc/stat) grows by at least most of what a child
    process burns: the bound it reports counts Dovecot's CPU the same way."""
    from bench.run import machine_busy

    before = machine_busy()
    done = subprocess.run(
        [sys.executable, "-c", "import time\nt = time.process_time()\n"
         "while time.process_time() - t < 0.5: pass"],
        timeout=60,
        check=True,
    )  # fmt: skip
    assert done.returncode == 0
    # Clock ticks are 10 ms; the child spent 0.5 s of CPU, the interpreter's start on top.
    assert machine_busy() - before >= 0.4


def test_the_ceiling_tree_records_the_ledger_row_and_nothing_else(tmp_path: Path) -> None:
    """bench.ceiling's engine: each message only "ignored" in the ledger, no request, no
    activity, no attachment; this tree's writer, on the same messages, makes them."""
    target = tmp_path / "ceiling"
    subprocess.run(
        [sys.executable, "-m", "bench.ceiling", "--no-build", str(target)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert (target / "engine" / "writer.py").read_text() != (ROOT / "engine/writer.py").read_text()
    args = ["-m", "bench.writer_alone", "-n", "12", "--batch", "5", "--outcomes"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ceiling, here = (
        subprocess.run(
            [sys.executable, *args],
            cwd=tree,
            env={**env, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout.splitlines()
        for tree in (target, ROOT)
    )
    assert ceiling[:2] == [
        "ignored=12",
        "requests=0 activities=0 attachments=0 ledger=12 outbox=0",
    ], ceiling
    assert "created=" in here[0] and "ledger=12" in here[1] and "requests=0" not in here[1]


def test_a_kill_from_on_tick_leaves_the_child_for_run_process_to_reap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash case kills the engine from ``on_tick``. A child that has just exited is a
    zombie until run_process's wait4 reaps it: the kill must not reap it first (Popen.kill
    polls, and did, and run_process then failed with KeyError: 'status')."""
    from bench import run as bench_run

    real_wait4 = os.wait4

    def slow_wait4(pid: int, options: int) -> tuple[int, int, object]:
        time.sleep(0.5)  # the child exits meanwhile and stays a zombie until this reaps it
        return real_wait4(pid, options)

    monkeypatch.setattr(os, "wait4", slow_wait4)
    killed: list[bool] = []

    def tick(elapsed: float, proc: subprocess.Popen[bytes]) -> None:
        if not killed:
            time.sleep(0.25)  # long enough for `python -c pass` to have exited
            bench_run.sigkill(proc)
            killed.append(True)

    res = bench_run.run_process(
        [sys.executable, "-c", "pass"], tmp_path / "log", timeout=60, on_tick=tick, tick=0.01
    )
    assert killed and res.returncode == 0
