"""Instructions per message of ``once`` under callgrind: an A/B measure other load cannot move.

On a shared 2-core machine wall-clock and even CPU time move by 5-10 % from run to run; the
number of instructions the engine executes does not (valgrind runs its threads one at a time).
Each tree given is measured in its own process with the bench's corpus and a Dovecot of its
own, and the totals of the engine and of its parsing processes are summed::

    python -m bench.instructions /tmp/before /tmp/after     # two checkouts, e.g. git worktrees

Both trees get the same mail: the corpus, the Dovecot and the checks are this checkout's
(``--mix``: each corpus mix of bench/corpus.py, by default all); only the engine run is the
tree's.

Whether a window is parsed in a thread or in a parsing process no longer depends on timing:
the engine parses in threads until its processes are up, and under valgrind starting one
takes so long that a run parsed some, all or none of its windows in the process (1 x 400,
realistic mix, the same tree: 0.59 M and 2.8 M instructions per message in the parsing
process). The measured run marks its processes ready from the start, so every window of a
mailbox big enough (see engine.session) waits for one, as in a long-running engine.

The parsing processes are counted because the measured engine ends them gracefully. The
engine's own (engine.parse.worker) end when it closes their stdin; a tree from before them
used anyio's, and at exit anyio SIGKILLs its worker processes: a process valgrind runs
writes its totals only as it exits, so a killed one left a file without them (counted as 0,
i.e. the parse was not counted at all). The measured run (:data:`_GRACEFUL`) has anyio close
a worker's stdin instead of killing it: the worker reads EOF and returns, anyio's own
shutdown awaits its exit, and callgrind writes its totals. The engine's code is unchanged:
both patches are made in the measured process only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.corpus import MIXES

ROOT = Path(__file__).resolve().parent.parent
CASES = (("1 mailbox x 400", 1, 400), ("10 mailboxes x 40", 10, 40))

# ``python -m engine`` with anyio's Process.kill ending a process by closing its stdin, and
# the parsing processes ready from the start (see the module docstring); the command line
# after ``-c`` is the engine's.
_GRACEFUL = r"""
import runpy
from anyio._backends._asyncio import Process
from engine.parsers import Parsers

def end(self):
    if (pipe := self._transport.get_pipe_transport(0)) is not None:
        pipe.close()

def init(self, count):
    start(self, count)
    self.ready.set()

Process.kill = end
start, Parsers.__init__ = Parsers.__init__, init
runpy.run_module("engine", run_name="__main__", alter_sys=True)
"""

_MEASURE = r"""
import json, os, subprocess, sys, uuid
from pathlib import Path
out, cases, mix, tree = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
graceful = sys.argv[5]
from bench.corpus import make_corpus
import bench.run
from bench.run import World, _engine_env
from tools.dovecot import start_dovecot

bench.run.REPO = Path(tree)  # the directory import too is the tree's: its own schema

subprocess.run([sys.executable, "-m", "compileall", "-q", f"{tree}/engine"], check=True)
env = {**_engine_env(), "PYTHONPATH": tree}
dovecot = start_dovecot(out / "dovecot", max_connections=200)
try:
    world = World(out / "cases", dovecot, uuid.uuid4().hex[:10])
    corpus = make_corpus(max(boxes * per for _, boxes, per in cases), mix=mix)
    for name, boxes, per in cases:
        users = world.users("cg", boxes)
        for j, user in enumerate(users):
            world.deliver(user, [corpus[(j * per + i) % len(corpus)] for i in range(per)])
        folder = world.fresh("cg")
        # Under valgrind a session runs ~50 times slower than its byte-derived deadline.
        config_dir, data_dir = world.engine_setup(folder, users, session_seconds=86400)
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--trace-children=yes",
             f"--callgrind-out-file={folder}/callgrind.%p", sys.executable, "-c", graceful,
             "once", "--config-dir", str(config_dir), "--data-dir", str(data_dir)],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "engine.err", "wb"),
            timeout=3600,
        ).returncode and sys.exit((folder / "engine.err").read_text()[-3000:])
        left = sum(dovecot.count(u) for u in users)
        print(json.dumps({"case": name, "folder": str(folder), "data": str(data_dir),
                          "messages": boxes * per, "left": left}), flush=True)
finally:
    dovecot.stop()
"""


def _totals(folder: Path) -> tuple[int, int]:
    """The sum of the ``totals:`` lines of every callgrind file a run wrote, and the part of
    it that the parsing processes (engine.parse.worker, or anyio's before it) executed."""
    total = workers = 0
    for path in folder.glob("callgrind.*"):
        worker = False
        with path.open(errors="replace") as f:
            for line in f:
                if line.startswith("cmd:"):
                    worker = "engine.parse.worker" in line or "anyio.to_process" in line
                elif m := re.match(r"(?:summary|totals): (\d+)", line):
                    total += int(m.group(1))
                    workers += int(m.group(1)) if worker else 0
                    break
    return total, workers


def measure(tree: Path, work: Path, mix: str = "bench") -> dict[str, float]:
    """Instructions per message of each case, the engine run from ``tree``; checks exactly
    once."""
    work.mkdir(parents=True)
    work.chmod(0o755)  # Dovecot's unprivileged processes must enter it
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(work), json.dumps(CASES), mix, str(tree), _GRACEFUL],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"{tree}: the measure failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = {}
    for line in done.stdout.splitlines():
        run = json.loads(line)
        db = sqlite3.connect(Path(run["data"]) / "mailintegration.sqlite3")
        try:
            rows = db.execute("SELECT count(DISTINCT message_id) FROM ledger").fetchone()[0]
        finally:
            db.close()
        if rows != run["messages"] or run["left"]:
            raise SystemExit(f"{tree}: {run['case']}: {rows} ledger rows, {run['left']} left")
        total, workers = _totals(Path(run["folder"]))
        result[run["case"]] = total / run["messages"]
        result[run["case"] + " parsing"] = workers / run["messages"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--mix", default=",".join(MIXES), help="comma-separated corpus mixes")
    args = parser.parse_args(argv)
    for mix in args.mix.split(","):
        with tempfile.TemporaryDirectory(prefix="mi-instructions-") as tmp:
            before = measure(args.before.resolve(), Path(tmp) / "before", mix)
            after = measure(args.after.resolve(), Path(tmp) / "after", mix)
        for case, _, _ in CASES:
            ratio = after[case] / before[case]
            parsing = f"{case} parsing"
            print(
                f"{case} [{mix} mix]: {before[case]:,.0f} -> {after[case]:,.0f} "
                f"instructions/message ({ratio:.3f}; of which the parsing processes "
                f"{before[parsing]:,.0f} -> {after[parsing]:,.0f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
