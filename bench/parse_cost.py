"""Issue 18: what the parsing process costs per message, without the rest of the engine.

The parsing process runs :func:`engine.parse.parse_many` on windows of ~48 messages, its
request and its results pickled by the process's loop (engine/parse/worker.py). This runs the same
on a fixed corpus of each mix (``--count`` messages, windows of ``--window``): the request
unpickled, ``parse_many`` run, the results pickled, as the process does. Cheaper to run
than :mod:`bench.instructions` (no Dovecot, no engine, no writer), so fit to A/B one step::

    python -m bench.parse_cost                       # CPU time per message, this tree
    python -m bench.parse_cost --callgrind           # instructions per message, this tree
    python -m bench.parse_cost --callgrind A B       # the same for two trees (git worktrees)

Instructions are counted under callgrind as the difference between two runs of the same
process, one that parses the corpus and one that stops short of it (both import, build the
corpus and parse one warm-up window of other messages), so that only the loop is counted.
CPU time (``time.process_time``) is the median of ``--repeat`` passes.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 25 * 1024 * 1024  # the default maxMessageBytes


def _windows(mix: str, count: int, window: int, offset: int = 0) -> list[list[bytes]]:
    from bench.corpus import make_corpus, stamp

    templates = make_corpus(count + offset, mix=mix)[offset:]
    raws = [stamp(t, f"c{i}.{mix}@bench.invalid") for i, t in enumerate(templates)]
    return [raws[i : i + window] for i in range(0, len(raws), window)]


def _run_window(request: bytes) -> bytes:
    """What the parsing process does with one request (engine.parse.worker.serve):
    unpickle, parse, pickle."""
    from engine.parse import parse_many

    raws, max_bytes = pickle.loads(request)
    return pickle.dumps((True, parse_many(raws, max_bytes)), pickle.HIGHEST_PROTOCOL)


def _requests(windows: list[list[bytes]]) -> list[bytes]:
    return [pickle.dumps((w, MAX_BYTES), pickle.HIGHEST_PROTOCOL) for w in windows]


def inner(mix: str, count: int, window: int, parse: bool, repeat: int) -> dict[str, float]:
    """The measured process: warm up on one window of other messages, then (``parse``) run
    every window of the corpus ``repeat`` times."""
    warm = _requests(_windows(mix, window, window, offset=count))
    requests = _requests(_windows(mix, count, window))
    for request in warm:
        _run_window(request)
    if not parse:
        return {}
    times = []
    size = 0
    for _ in range(repeat):
        start = time.process_time()
        size = sum(len(_run_window(r)) for r in requests)
        times.append(time.process_time() - start)
    return {"cpu_us": statistics.median(times) / count * 1e6, "pickled": size / count}


def _callgrind(tree: Path, mix: str, count: int, window: int, parse: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="mi-parse-cost-") as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, str(Path(__file__).resolve()), "--inner", "--mix", mix,
            "--count", str(count), "--window", str(window), "--repeat", "1",
        ]  # fmt: skip
        if not parse:
            argv.append("--no-parse")
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(argv, cwd=tree, env=env, check=True, capture_output=True)
        for line in out.read_text(errors="replace").splitlines():
            if m := re.match(r"(?:summary|totals): (\d+)", line):
                return int(m.group(1))
    raise SystemExit(f"{tree}: callgrind wrote no totals")


def instructions(tree: Path, mix: str, count: int, window: int) -> float:
    """Instructions per message of the loop, run from ``tree``."""
    full = _callgrind(tree, mix, count, window, parse=True)
    base = _callgrind(tree, mix, count, window, parse=False)
    return (full - base) / count


def _cpu(tree: Path, mix: str, count: int, window: int, repeat: int) -> dict[str, float]:
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--inner", "--mix", mix,
        "--count", str(count), "--window", str(window), "--repeat", str(repeat),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(argv, cwd=tree, env=env, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, help="trees to measure (default: this)")
    parser.add_argument("--mix", default="bench,realistic", help="comma-separated corpus mixes")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--window", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-parse", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        # Run as a script: this file's folder is first on sys.path, the tree's comes next.
        sys.path.remove(str(Path(__file__).resolve().parent))
        result = inner(args.mix, args.count, args.window, not args.no_parse, args.repeat)
        print(json.dumps(result))
        return 0
    trees = [t.resolve() for t in args.trees] or [ROOT]
    for mix in args.mix.split(","):
        first: float | None = None
        for tree in trees:
            if args.callgrind:
                value = instructions(tree, mix, args.count, args.window)
                text = f"{value:,.0f} instructions/message"
            else:
                cpu = _cpu(tree, mix, args.count, args.window, args.repeat)
                value = cpu["cpu_us"]
                text = f"{value:,.1f} us CPU/message, {cpu['pickled']:,.0f} bytes pickled back"
            ratio = "" if first is None else f" ({value / first:.3f})"
            first = value if first is None else first
            print(f"[{mix} mix] {tree}: {text}{ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
