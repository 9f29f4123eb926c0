"""The multi-replica kill -9 harness: several ``run`` replicas share mailboxes through one
PostgreSQL store while mail is delivered all the while; random replicas are SIGKILLed and
restarted. Then the mail still waiting is drained and the store compared with what was
delivered::

    python -m tools.crash --replicas 3 --store postgresql://postgres@127.0.0.1:5432/test \\
        --iterations 1000 [--mailboxes 30] [--lease-seconds 2] [--seed S]

An iteration is one kill: a random replica, at a random moment (0.5 to 3 s after the last
one), SIGKILLed and started again under a new replica id. The checks, on a database of its
own created on the named server:

- every delivered Message-ID is in the ledger exactly once, with the sha256 of its bytes;
- exactly one request per message (no loss, no duplicate), and every mailbox empty;
- no two ledger rows share (account, uidl).

It also measures the **takeover time** of each kill: from the SIGKILL until every mailbox the
killed replica held is held by a live replica (p50 and max in the summary).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.support import DIRECTORY, LOGIN, LOGIN_PASSWORD, Delivered, mailbox_xml
from tools.crash import make_message
from tools.dovecot import Dovecot
from tools.postgres import throwaway_database

ROOT = Path(__file__).resolve().parent.parent
DRAIN_SECONDS = 180.0  # after the last kill, for every mailbox to be emptied
POLL = 0.5


@dataclass
class Replica:
    slot: int
    generation: int
    proc: subprocess.Popen[bytes]

    @property
    def name(self) -> str:
        return f"r{self.slot}g{self.generation}"


@dataclass
class Harness:
    dovecot: Dovecot
    base: Path
    dsn: str
    lease: float
    rng: random.Random
    users: list[str] = field(default_factory=list)
    delivered: list[Delivered] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    takeovers: list[float] = field(default_factory=list)
    kills: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    # -- set-up ----------------------------------------------------------------------------

    def engine(self, *args: object) -> list[str]:
        return [sys.executable, "-m", "engine", *map(str, args)]

    def setup(self, mailboxes: int) -> Path:
        conf = self.base / "mailboxes.d"
        conf.mkdir(parents=True)
        for i in range(mailboxes):
            user, pw = f"rep{i}-{os.getpid()}-{time.monotonic_ns()}", f"pw-{i}"
            self.dovecot.add_user(user, pw)
            mailbox_xml(
                conf / f"box{i:02}.xml", port=self.dovecot.pop3_port, user=user, password=pw
            )
            self.users.append(user)
        spec = self.base / "directory.json"
        spec.write_text(json.dumps(DIRECTORY), encoding="utf-8")
        subprocess.run(
            self.engine("directory", "import", spec, "--store", self.dsn, "--data-dir", self.base),
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        return conf

    def start(self, conf: Path, slot: int, generation: int) -> Replica:
        log = self.base / f"r{slot}.log"
        env = {
            **os.environ,
            "MAILINTEGRATION_LOGIN": LOGIN,
            "MAILINTEGRATION_PASSWORD": LOGIN_PASSWORD,
        }
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.engine(
                    *("run", "--config-dir", conf, "--store", self.dsn),
                    *("--data-dir", self.base / f"data-r{slot}", "--http-port", "0"),
                    *("--replica-id", f"r{slot}g{generation}", "--lease-seconds", self.lease),
                    *("--poll-interval", POLL, "--reload-seconds", "5", "--parse-processes", "0"),
                ),
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        return Replica(slot, generation, proc)

    # -- while it runs ---------------------------------------------------------------------

    def deliver_all_the_while(self) -> None:
        rng = random.Random(self.rng.random())
        n = 0
        while not self.stop.is_set():
            user = rng.choice(self.users)
            tag = f"{os.getpid()}-{n}"
            raw, message_id, digests = make_message(rng, tag)
            self.dovecot.deliver(user, raw)
            sha = hashlib.sha256(raw).hexdigest()
            self.delivered.append(Delivered(user, message_id, sha, digests))
            n += 1
            time.sleep(rng.uniform(0.005, 0.04))

    def owners(self) -> dict[str, str | None]:
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT mailbox, CASE WHEN expires_at > now() THEN owner END FROM leases"
            ).fetchall()
        return {str(r[0]): r[1] for r in rows}

    def kill_one(self, conf: Path) -> None:
        victim = self.rng.choice(self.replicas)
        held = [m for m, owner in self.owners().items() if owner == victim.name]
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.proc.wait(30)
        self.kills += 1
        self.replicas[victim.slot] = self.start(conf, victim.slot, victim.generation + 1)
        if held:
            self.takeovers.append(self.wait_taken_over(held, victim.name, killed))

    def wait_taken_over(self, held: list[str], dead: str, killed: float) -> float:
        """Seconds from the kill until a live replica holds every mailbox ``dead`` held."""
        deadline = killed + 10 * self.lease + 30
        while time.monotonic() < deadline:
            owners = self.owners()
            if all(owners.get(m) not in (None, dead) for m in held):
                return time.monotonic() - killed
            time.sleep(0.05)
        return float("inf")

    # -- the end ---------------------------------------------------------------------------

    def drain(self) -> bool:
        deadline = time.monotonic() + DRAIN_SECONDS
        want = len(self.delivered)
        while time.monotonic() < deadline:
            if all(self.dovecot.count(u) == 0 for u in self.users) and self.ledger_count() >= want:
                return True
            time.sleep(0.5)
        return False

    def ledger_count(self) -> int:
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM ledger").fetchone()
        return int(row[0]) if row else 0

    def verify(self) -> dict[str, Any]:
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            ledger = conn.execute("SELECT message_id, sha256 FROM ledger").fetchall()
            subjects = conn.execute(
                "SELECT subject FROM requests WHERE kind = 'mail' OR kind = 'message-failure'"
            ).fetchall()
            twice = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM ledger GROUP BY account, uidl "
                "HAVING count(*) > 1) d"
            ).fetchone()
        in_ledger = collections.Counter((str(m), str(s)) for m, s in ledger)
        requests = collections.Counter(str(s[0]) for s in subjects)
        losses = duplicates = 0
        for d in self.delivered:
            seen = in_ledger[(d.message_id, d.sha256 or "")]  # always known here
            tag = d.message_id.split("@")[0].split(".")[-1]
            made = requests[f"Crash test {tag}"]
            losses += seen == 0 or made == 0
            duplicates += seen > 1 or made > 1
        left = sum(self.dovecot.count(u) for u in self.users)
        return {
            "losses": losses,
            "duplicates": duplicates,
            "left_on_server": left,
            "ledger_keys_twice": int(twice[0]) if twice else 0,
        }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_replicas(
    dovecot: Dovecot,
    base: Path,
    *,
    store: str,
    iterations: int,
    replicas: int = 3,
    mailboxes: int = 30,
    lease: float = 2.0,
    seed: int = 0,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """The harness (see the module's docstring); returns the summary."""
    started = time.monotonic()
    with throwaway_database(store, prefix="mi_crash") as dsn:
        h = Harness(dovecot, base, dsn, lease, random.Random(seed))
        conf = h.setup(mailboxes)
        h.replicas = [h.start(conf, i, 0) for i in range(replicas)]
        delivery = threading.Thread(target=h.deliver_all_the_while, daemon=True)
        delivery.start()
        try:
            for _ in range(iterations):
                if max_seconds is not None and time.monotonic() - started > max_seconds:
                    break
                time.sleep(h.rng.uniform(0.5, 3.0))
                h.kill_one(conf)
                if h.kills % max(1, iterations // 20) == 0:
                    print(
                        f"[{time.monotonic() - started:7.1f} s] {h.kills} kills, "
                        f"{len(h.delivered)} delivered",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            h.stop.set()
            delivery.join(30)
        drained = h.drain()
        for r in h.replicas:
            r.proc.send_signal(signal.SIGTERM)
        for r in h.replicas:
            try:
                r.proc.wait(60)
            except subprocess.TimeoutExpired:
                r.proc.kill()
        result = h.verify()
    finite = [t for t in h.takeovers if t != float("inf")]
    return {
        "replicas": replicas,
        "mailboxes": mailboxes,
        "lease_seconds": lease,
        "iterations": h.kills,
        "messages": len(h.delivered),
        "drained": drained,
        **result,
        "takeover_seconds": {
            "count": len(h.takeovers),
            "never": len(h.takeovers) - len(finite),
            "p50": round(statistics.median(finite), 3) if finite else None,
            "p95": _percentile(finite, 0.95),
            "max": round(max(finite), 3) if finite else None,
        },
        "seconds": round(time.monotonic() - started, 1),
    }
