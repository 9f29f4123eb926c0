"""The writer alone, for quick A/B steps on its Python: ``N`` messages of a corpus mix,
parsed before the measure, applied by :class:`engine.writer.Writer` in batches of ``B`` on a
real SQLite file (the directory imported, the log lines written to a file), no POP3, no
parsing process::

    python -m bench.writer_alone --mix realistic -n 500 --batch 74
    valgrind --tool=callgrind python -m bench.writer_alone ... --setup-only   # subtract

It prints the CPU time of the measured part. Instruction counts: run it under callgrind
twice, with and without ``--setup-only``, with ``PYTHONHASHSEED=0``; the difference over
``N`` is the writer's instructions per message (``bench.writer_alone --callgrind`` does both).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from engine.model import ParsedMessage


def _setup(mix: str, count: int) -> tuple[list[bytes], list[ParsedMessage]]:
    from bench.corpus import make_corpus, stamp
    from engine.parse import parse_message

    raws = [stamp(t, f"<wa-{i}@bench.example>") for i, t in enumerate(make_corpus(count, mix=mix))]
    return raws, [parse_message(raw) for raw in raws]


async def _run(
    folder: Path, mix: str, count: int, batch: int, setup_only: bool, outcomes: bool = False
) -> float:
    from engine import logs
    from engine.config import load_mailbox
    from engine.items import Envelope, Item
    from engine.store import open_store
    from engine.writer import Writer
    from tests.support import DIRECTORY, LOGIN, mailbox_xml

    # As ``once`` logs in a pipe: one handler, its SecretFilter with the mailbox's password
    # (WRITER_ALONE_LOG=WARNING: without the line per message, to see what it costs).
    logs.configure(level=logging.getLevelName(os.environ.get("WRITER_ALONE_LOG", "INFO")))
    log_file = (folder / "engine.log").open("w", encoding="utf-8")
    logging.getLogger().handlers[0].setStream(log_file)  # type: ignore[attr-defined]
    logs.register_secret("pw-bench")
    raws, parsed = _setup(mix, count)
    store = await open_store(folder / "data")
    async with store.transaction() as tx:
        await tx.import_directory(DIRECTORY)
    cfg = load_mailbox(mailbox_xml(folder / "m.xml", port=110, user="u", password="pw-bench"))
    envelopes = [
        Envelope(mailbox=cfg, uidl=f"u{i}", raw=raw, parsed=p, size=len(raw))
        for i, (raw, p) in enumerate(zip(raws, parsed, strict=True))
    ]
    writer = Writer(store, created_by=LOGIN)
    spent = 0.0
    if not setup_only:
        started = time.process_time()
        for k in range(0, len(envelopes), batch):
            items: list[Item] = list(envelopes[k : k + batch])
            while items:
                items = await writer.apply(items)
        spent = time.process_time() - started
        assert all(e.outcome is not None for e in envelopes)
    if outcomes:  # what the writer made of them (bench.ceiling's test reads it)
        kinds = Counter(e.outcome.kind.value for e in envelopes if e.outcome is not None)
        print(" ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
        print(" ".join(f"{k}={v}" for k, v in (await store.counts()).items()))
    await store.close()
    log_file.close()
    return spent


def _callgrind(args: argparse.Namespace) -> None:
    totals = []
    for setup_only in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cg.out"
            cmd = [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                sys.executable, "-m", "bench.writer_alone", "--mix", args.mix,
                "-n", str(args.n), "--batch", str(args.batch),
                *(["--setup-only"] if setup_only else []),
            ]  # fmt: skip
            env = dict(os.environ, PYTHONHASHSEED="0")
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            head = out.read_text(errors="replace")
            totals.append(int(re.search(r"^(?:totals|summary): (\d+)", head, re.M)[1]))  # type: ignore[index]
    print(f"{args.mix} x {args.n}, batches of {args.batch}: "
          f"{(totals[1] - totals[0]) / args.n:,.0f} instructions per message")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mix", default="realistic")
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--batch", type=int, default=74)
    parser.add_argument("--setup-only", action="store_true")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--outcomes", action="store_true", help="print what became of them")
    args = parser.parse_args()
    if args.callgrind:
        _callgrind(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        spent = anyio.run(
            _run, Path(tmp), args.mix, args.n, args.batch, args.setup_only, args.outcomes
        )
    if not args.setup_only:
        print(f"{args.mix} x {args.n}: {spent / args.n * 1e6:.1f} us CPU per message")


if __name__ == "__main__":
    main()
