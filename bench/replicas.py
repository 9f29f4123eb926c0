"""The PostgreSQL store and replicas, measured against baselines of the same invocation:

    python -m bench.replicas [--quick] [--store postgresql://postgres@127.0.0.1:5432/test]

1. **Store**: ``once`` over 1 × 2,000 and 50 × 200 messages (the bench corpus), SQLite in a
   data directory against PostgreSQL (a fresh database): the ratio is PostgreSQL's rate over
   SQLite's.
2. **Replicas**: ``run`` with 1, 2 and 3 replicas over 300 mailboxes × 20 messages, from the
   replicas' start until every message is in the ledger: the ratio is against 1 replica. The
   leases are shared out before the start (round robin, as a balanced steady state has them),
   so the figure is throughput, not the first balancing.
3. **Takeover** after a kill -9: tools/crash_replicas.py's measure, p50 and max over 20
   kills (3 replicas, 30 mailboxes, leases of 2 s, mail delivered all the while).

Every message is checked to be in the ledger exactly once and every mailbox emptied; a case
that fails that is reported as a problem. Appends a Markdown section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.corpus import Template, make_corpus, stamp
from tests.support import DIRECTORY, LOGIN, LOGIN_PASSWORD, mailbox_xml
from tools.dovecot import Dovecot, start_dovecot
from tools.postgres import DEFAULT_DSN, throwaway_database

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    single: int
    boxes: int
    per_box: int
    fleet_boxes: int
    fleet_per_box: int
    kills: int


FULL = Sizes(single=2000, boxes=50, per_box=200, fleet_boxes=300, fleet_per_box=20, kills=20)
QUICK = Sizes(single=200, boxes=10, per_box=20, fleet_boxes=30, fleet_per_box=5, kills=4)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "MAILINTEGRATION_LOGIN": LOGIN,
        "MAILINTEGRATION_PASSWORD": LOGIN_PASSWORD,
        "PYTHONPATH": str(REPO),
    }


def _engine(*args: object) -> list[str]:
    return [sys.executable, "-m", "engine", *map(str, args)]


class World:
    def __init__(self, base: Path, dovecot: Dovecot, server: str) -> None:
        self.base, self.dovecot, self.server = base, dovecot, server
        self.n = 0

    def mailboxes(self, count: int, per_box: int, corpus: list[Template]) -> tuple[Path, list[str]]:
        """``count`` fresh mailboxes with ``per_box`` messages each, and their folder."""
        self.n += 1
        conf = self.base / f"conf{self.n}"
        conf.mkdir()
        users = []
        for i in range(count):
            user, pw = f"b{self.n}x{i}-{os.getpid()}", f"pw-{i}"
            self.dovecot.add_user(user, pw)
            mailbox_xml(
                conf / f"box{i:03}.xml",
                port=self.dovecot.pop3_port,
                user=user,
                password=pw,
                maxMessageBytes="52428800",
            )
            for k in range(per_box):
                template = corpus[(i * per_box + k) % len(corpus)]
                self.dovecot.deliver(user, stamp(template, f"{self.n}.{i}.{k}@bench.example"))
            users.append(user)
        return conf, users

    def directory(self, store: list[str]) -> Path:
        self.n += 1
        data = self.base / f"data{self.n}"
        spec = self.base / "directory.json"
        spec.write_text(json.dumps(DIRECTORY), encoding="utf-8")
        subprocess.run(
            _engine("directory", "import", spec, "--data-dir", data, *store),
            env=_env(),
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=120,
        )
        return data

    def emptied(self, users: list[str]) -> bool:
        return all(self.dovecot.count(u) == 0 for u in users)


def _ledger(store: list[str], data: Path) -> tuple[int, int]:
    """(ledger rows, distinct Message-IDs in it)."""
    sql = "SELECT count(*), count(DISTINCT message_id) FROM ledger"
    if store:
        with psycopg.connect(store[1]) as conn:
            row = conn.execute(sql).fetchone()
    else:
        import sqlite3

        with sqlite3.connect(data / "mailintegration.sqlite3") as db:
            row = db.execute(sql).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def case_store(
    world: World, corpus: list[Template], boxes: int, per_box: int, problems: list[str]
) -> str:
    """``once`` over ``boxes`` × ``per_box``: SQLite, then PostgreSQL."""
    rates: dict[str, float] = {}
    for name in ("sqlite", "postgresql"):
        with throwaway_database(world.server, prefix="mi_bench") as dsn:
            store = ["--store", dsn] if name == "postgresql" else []
            data = world.directory(store)
            conf, users = world.mailboxes(boxes, per_box, corpus)
            target = conf if boxes > 1 else next(conf.glob("*.xml"))
            flag = "--config-dir" if boxes > 1 else "--config"
            started = time.monotonic()
            done = subprocess.run(
                _engine("once", flag, target, "--data-dir", data, *store),
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=900,
            )
            seconds = time.monotonic() - started
            total = boxes * per_box
            rows, distinct = _ledger(store, data)
            if done.returncode != 0 or rows != total or distinct != total:
                problems.append(f"{name} {boxes}x{per_box}: exit {done.returncode}, {rows} rows")
            if not world.emptied(users):
                problems.append(f"{name} {boxes}x{per_box}: mail left on the server")
            rates[name] = total / seconds
    pg, lite = rates["postgresql"], rates["sqlite"]
    return (
        f"| {boxes} × {per_box} | SQLite {lite:,.0f} msg/s | PostgreSQL {pg:,.0f} msg/s "
        f"| **{pg / lite:.2f}** |"
    )


def _share_leases(dsn: str, names: list[str], replicas: int, seconds: float) -> None:
    """The leases of a balanced steady state: round robin, valid for ``seconds``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, name in enumerate(sorted(names)):
            conn.execute(
                "INSERT INTO leases(mailbox, owner, expires_at, epoch) "
                "VALUES (%s, %s, now() + make_interval(secs => %s), 1)",
                (name, f"r{i % replicas}", seconds),
            )


def case_fleet(
    world: World, corpus: list[Template], sizes: Sizes, replicas: int, problems: list[str]
) -> float:
    """``run`` with ``replicas`` replicas until every message is in the ledger: msg/s."""
    total = sizes.fleet_boxes * sizes.fleet_per_box
    lease = 30.0
    with throwaway_database(world.server, prefix="mi_bench") as dsn:
        store = ["--store", dsn]
        world.directory(store)
        conf, users = world.mailboxes(sizes.fleet_boxes, sizes.fleet_per_box, corpus)
        _share_leases(dsn, [p.stem for p in conf.glob("*.xml")], replicas, lease)
        procs = []
        started = time.monotonic()
        for i in range(replicas):
            log = open(world.base / f"fleet{replicas}-{i}.log", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    _engine(
                        *("run", "--config-dir", conf, *store, "--replica-id", f"r{i}"),
                        *("--data-dir", world.base / f"fleet-data{i}", "--http-port", "0"),
                        *("--lease-seconds", lease, "--poll-interval", "60"),
                        *("--max-sessions", "16"),
                    ),
                    env=_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
            log.close()
        deadline = started + 900
        rows = 0
        while time.monotonic() < deadline:
            rows, _ = _ledger(store, world.base)
            if rows >= total:
                break
            time.sleep(0.2)
        seconds = time.monotonic() - started
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
        rows, distinct = _ledger(store, world.base)
        if rows != total or distinct != total or not world.emptied(users):
            problems.append(f"{replicas} replicas: {rows} rows, {distinct} distinct of {total}")
    return total / seconds


def case_takeover(world: World, sizes: Sizes, problems: list[str]) -> str:
    from tools.crash_replicas import run_replicas

    out = run_replicas(
        world.dovecot,
        world.base / "takeover",
        store=world.server,
        iterations=sizes.kills,
        replicas=3,
        mailboxes=30,
        lease=2.0,
        seed=20261204,
    )
    if out["losses"] or out["duplicates"] or out["left_on_server"] or not out["drained"]:
        problems.append(f"takeover run: {out}")
    t = out["takeover_seconds"]
    return (
        f"Takeover after kill -9 (3 replicas, 30 mailboxes, leases of 2 s, {out['messages']} "
        f"messages delivered meanwhile): p50 **{t['p50']} s**, max **{t['max']} s** over "
        f"{t['count']} kills of a replica holding leases, that is {t['p50'] / 2.0:.2f} and "
        f"{t['max'] / 2.0:.2f} lease periods; no loss, no duplicate."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--store", default=os.environ.get("MAILINTEGRATION_TEST_PG") or DEFAULT_DSN)
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    base = Path(tempfile.mkdtemp(prefix="mailintegration-bench-replicas-"))
    dovecot = start_dovecot(base / "dovecot")
    problems: list[str] = []
    lines: list[str] = []
    try:
        world = World(base, dovecot, args.store)
        corpus = make_corpus(min(2000, sizes.single))
        lines += [
            "| case | baseline: SQLite | PostgreSQL | PostgreSQL / SQLite |",
            "|---|---|---|---|",
        ]
        lines.append(case_store(world, corpus, 1, sizes.single, problems))
        lines.append(case_store(world, corpus, sizes.boxes, sizes.per_box, problems))
        fleet = {n: case_fleet(world, corpus, sizes, n, problems) for n in (1, 2, 3)}
        lines += [
            "",
            f"| replicas over {sizes.fleet_boxes} × {sizes.fleet_per_box} | msg/s | against 1 |",
            "|---|---|---|",
        ]
        lines += [f"| {n} | {rate:,.0f} | **{rate / fleet[1]:.2f}** |" for n, rate in fleet.items()]
        lines += ["", case_takeover(world, sizes, problems)]
    finally:
        dovecot.stop()
        if not problems:
            shutil.rmtree(base, ignore_errors=True)  # kept to look into when a case failed
    text = "\n".join(lines)
    print(text)
    if problems:
        print("PROBLEMS:\n" + "\n".join(problems), file=sys.stderr)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "quick" if args.quick else "full"
    with args.out.open("a", encoding="utf-8") as f:
        f.write(f"\n## {when} - replicas ({mode}, python -m bench.replicas)\n\n")
        f.write(f"{os.cpu_count()} CPUs, PostgreSQL at {args.store.rpartition('@')[2]}\n\n")
        f.write(text + "\n")
        if problems:
            f.write("\nProblems: " + "; ".join(problems) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
