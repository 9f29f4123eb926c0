"""A ceiling for the engine's throughput: this checkout's engine with a writer that records
each message's ledger row and nothing else (no processor, no request, no attachment file),
so that ``bench.run`` on it measures everything but the writer's per-message work::

    python -m bench.ceiling /tmp/ceiling          # this checkout as it is, patched
    python -m bench.run --only single --engine-tree /tmp/ceiling --no-record

The fetch, the parse (in its process), the hand-over, the transaction per batch, the ledger
row, the answer and DELE all stay; only what the writer does between the plan and the ledger
goes. No engine can be faster than this one at what ours does, so a target this ceiling does
not reach needs a change to the rest of the pipeline, not to the writer. Its check says every
message is "ignored": that is the point, not a failure of the engine measured.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The writer's message handler (engine.writer.TwoPassCommit.message): its first statements,
# and what the ceiling runs instead of planning and writing.
_HANDLER = """        writer = self.writer
        plan = await writer.plan(work, env)
"""
_CEILING = """        writer = self.writer
        env.outcome = Outcome(Kind.IGNORED)  # bench.ceiling: the ledger row only
        await writer._ledger(work, env, env.outcome)
        return
        plan = await writer.plan(work, env)
"""


def make(target: Path, *, build: bool = True) -> None:
    """A copy of this checkout at ``target`` (its files as they are, edits included: what
    git tracks or would), with the ceiling's writer, this checkout's venv and, with
    ``build``, its parser compiled (as setup.sh builds this checkout's)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    target.mkdir(parents=True)
    for name in filter(None, listed.decode().split("\0")):
        source, copy = REPO / name, target / name
        if source.is_symlink() or source.is_file():  # not one deleted but still in the index
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy, follow_symlinks=False)
    writer = target / "engine" / "writer.py"
    text = writer.read_text(encoding="utf-8")
    if text.count(_HANDLER) != 1:
        sys.exit("bench.ceiling: engine/writer.py's TwoPassCommit.message changed; update _HANDLER")
    writer.write_text(text.replace(_HANDLER, _CEILING), encoding="utf-8")
    (target / ".venv").symlink_to(REPO / ".venv")
    if build:  # its manifest names the tree's own sources: a build of its own
        subprocess.run([sys.executable, "-m", "engine.nativebuild"], cwd=target, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="a folder that does not exist yet")
    parser.add_argument("--no-build", action="store_true", help="the parser interpreted")
    args = parser.parse_args()
    make(args.target, build=not args.no_build)


if __name__ == "__main__":
    main()
