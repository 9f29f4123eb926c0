"""Instructions per message of ``once`` under callgrind: an A/B measure other load cannot move.

On a shared 2-core machine wall-clock and even CPU time move by 5-10 % from run to run; the
number of instructions the engine executes does not (valgrind runs its threads one at a time).
Each tree given is measured in its own process with the bench's corpus and a Dovecot of its
own, and the totals of the engine and of its parsing process are summed::

    python -m bench.instructions /tmp/before /tmp/after     # two checkouts, e.g. git worktrees

Both trees get the same mail: the corpus, the Dovecot and the checks are this checkout's
(``--mix``: each corpus mix of bench/corpus.py, by default all); only the engine run is the
tree's.

Only what is timing-dependent still varies: whether a window is parsed in a thread or in the
parsing process (a thread parse skips the pipe; that run prints fewer instructions).
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

_MEASURE = r"""
import json, os, subprocess, sys, uuid
from pathlib import Path
out, cases, mix, tree = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
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
             f"--callgrind-out-file={folder}/callgrind.%p", sys.executable, "-m", "engine",
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


def _total(folder: Path) -> int:
    """The sum of the ``totals:`` lines of every callgrind file a run wrote."""
    total = 0
    for path in folder.glob("callgrind.*"):
        with path.open(errors="replace") as f:
            for line in f:
                if m := re.match(r"(?:summary|totals): (\d+)", line):
                    total += int(m.group(1))
                    break
    return total


def measure(tree: Path, work: Path, mix: str = "bench") -> dict[str, float]:
    """Instructions per message of each case, the engine run from ``tree``; checks exactly
    once."""
    work.mkdir(parents=True)
    work.chmod(0o755)  # Dovecot's unprivileged processes must enter it
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(work), json.dumps(CASES), mix, str(tree)],
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
        result[run["case"]] = _total(Path(run["folder"])) / run["messages"]
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
            print(
                f"{case} [{mix} mix]: {before[case]:,.0f} -> {after[case]:,.0f} "
                f"instructions/message ({ratio:.3f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
