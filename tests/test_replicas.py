"""Issue 16: several engine replicas on one PostgreSQL database: exactly-once when two of
them race for a message, and the mailbox leases."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
import support
from support import (
    DIRECTORY,
    LOGIN,
    LOGIN_PASSWORD,
    cli,
    count_rows,
    engine_argv,
    free_port,
    import_directory,
    ledger,
    mailbox_xml,
    message,
    store_rows,
    wait_for,
)
from test_engine import Daemon, _up
from test_writer import feed, parsed

from engine.config import load_mailbox
from engine.items import Envelope, Kind
from engine.leases import Leases
from engine.store.postgres import open_leases, open_postgres
from engine.writer import Writer
from tools.postgres import postgres_available, throwaway_database
from tools.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pg() -> Iterator[str]:
    """A fresh PostgreSQL database that the support helpers use, for this test."""
    if not postgres_available():
        pytest.skip("no PostgreSQL answers")
    with throwaway_database() as dsn:
        support.STORE = dsn
        try:
            yield dsn
        finally:
            support.STORE = None


def test_the_loser_of_a_race_for_a_message_records_it_once_and_processes_nothing(
    tmp_path: Path, pg: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Replica B holds the ledger row of a message in a transaction not yet committed while
    replica A's writer handles the same message: A's insert waits on the unique key, fails
    when B commits, and A's transaction is done again: the message is then a duplicate
    (deleted by A's session without being processed), and A's request was rolled back."""
    cfg = load_mailbox(mailbox_xml(tmp_path / "m.xml", port=110, user="u", password="p"))

    async def go() -> tuple[Envelope, Envelope]:
        a, b = await open_postgres(pg), await open_postgres(pg)
        try:
            async with a.transaction() as tx:
                await tx.import_directory(DIRECTORY)
            raced = Envelope(mailbox=cfg, uidl="u1", raw=b"x", parsed=parsed(1))
            other = Envelope(mailbox=cfg, uidl="u2", raw=b"y", parsed=parsed(2))
            async with anyio.create_task_group() as tg:
                async with b.transaction() as tx_b:
                    await tx_b.record_ledger(
                        account=raced.account,
                        uidl="u1",
                        mailbox=cfg.name,
                        message_id=None,
                        sha256="b" * 64,
                        outcome="created",
                        request_number=None,
                    )
                    # A read of the ledger sends B's row (a store may hold it back till then).
                    assert list(await tx_b.ledger_rows(raced.account, ["u1"])) == ["u1"]
                    tg.start_soon(feed, Writer(a, created_by=LOGIN), [raced, other])
                    await anyio.sleep(1.0)  # A now waits on B's uncommitted key
                    assert not raced.done.is_set(), (raced.failure, raced.outcome)
                # B committed: A goes on.
                with anyio.fail_after(30):
                    await raced.done.wait()
            return raced, other
        finally:
            await a.close()
            await b.close()

    with caplog.at_level(logging.WARNING, logger="engine.writer"):
        raced, other = anyio.run(go)
    assert raced.failure is None and raced.outcome is not None
    assert raced.outcome.kind is Kind.DUPLICATE
    assert other.failure is None and str(other.outcome) == "created"
    assert "UniqueViolationError" in caplog.text
    subjects = [r["subject"] for r in store_rows(tmp_path, "SELECT subject FROM requests")]
    assert subjects == ["Printer 2 is jammed"]
    assert store_rows(tmp_path, "SELECT uidl, outcome FROM ledger ORDER BY uidl") == [
        {"uidl": "u1", "outcome": "created"},
        {"uidl": "u2", "outcome": "created"},
    ]


@pytest.mark.dovecot
def test_two_engines_on_one_mailbox_process_each_message_once(
    tmp_path: Path, pg: str, dovecot: Any, pop3_user: tuple[str, str]
) -> None:
    """Two `once` processes on one mailbox at the same moment: every message is recorded
    and processed once, and the mailbox ends empty."""
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    user, password = pop3_user
    for i in range(60):
        dovecot.deliver(user, message(f"Raced {i}"))
    cfg = mailbox_xml(tmp_path / "m.xml", port=dovecot.pop3_port, user=user, password=password)
    argv = engine_argv(
        "once", "--config", cfg, "--store", pg, "--login", LOGIN, "--password", LOGIN_PASSWORD
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [*argv, "--data-dir", tmp_path / f"d{i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 90
    logs = [p.communicate(timeout=max(1, deadline - time.monotonic()))[1] for p in procs]
    assert b"Traceback" not in b"".join(logs)
    if dovecot.count(user):  # a session the other's deletions cut short: once more
        subprocess.run([*argv, "--data-dir", tmp_path / "d0"], cwd=ROOT, env=env, timeout=60)
    assert dovecot.count(user) == 0
    subjects = [r["subject"] for r in store_rows(data, "SELECT subject FROM requests")]
    mail = sorted(s for s in subjects if s.startswith("Raced"))
    assert mail == sorted(f"Raced {i}" for i in range(60))
    [n] = store_rows(data, "SELECT count(*) AS n FROM ledger")
    assert n["n"] == 60


async def _replicas(dsn: str, count: int, ttl: float) -> list[Leases]:
    await (await open_postgres(dsn)).close()  # migrated
    return [Leases(await open_leases(dsn), f"r{i}", ttl=ttl) for i in range(count)]


def _owners(dsn: str) -> dict[str, str | None]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT mailbox, CASE WHEN expires_at > now() THEN owner END FROM leases"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def test_leases_balance_three_replicas_and_rebalance_when_one_leaves(pg: str) -> None:
    """3 replicas over 300 mailboxes own 100 ± 10 each, no mailbox held twice; when one stops
    (and gives its leases back) the two others own them all within two lease periods, and
    when a fourth joins it gets its share within two lease periods."""
    names = [f"box{i:03}" for i in range(300)]
    ttl = 1.5

    async def rounds(replicas: list[Leases], seconds: float) -> None:
        deadline = anyio.current_time() + seconds
        while anyio.current_time() < deadline:
            for r in replicas:
                await r.tick()
            await anyio.sleep(replicas[0].interval)

    async def go() -> tuple[list[int], list[int], list[int], int]:
        replicas = await _replicas(pg, 4, ttl)
        first, last = replicas[:3], replicas[3]
        try:
            for r in replicas:
                r.names = names
            await rounds(first, 2 * ttl)
            three = [len(r.held) for r in first]
            await first[2].release_all()
            await rounds(first[:2], 2 * ttl)
            two = [len(r.held) for r in first[:2]]
            await rounds([*first[:2], last], 2 * ttl)
            again = [len(r.held) for r in (*first[:2], last)]
            held = [n for r in (*first[:2], last) for n in r.held]
            return three, two, again, len(held) - len(set(held))
        finally:
            for r in replicas:
                await r.backend.close()

    three, two, again, doubled = anyio.run(go)
    assert all(90 <= n <= 110 for n in three) and sum(three) == 300, three
    assert sorted(two) == [150, 150], two
    assert all(90 <= n <= 110 for n in again) and sum(again) == 300, again
    assert doubled == 0
    owners = _owners(pg)
    assert sorted(Counter(owners.values()).values()) == [100, 100, 100]


def test_a_commit_fenced_by_a_lease_another_replica_took_commits_nothing(
    tmp_path: Path, pg: str
) -> None:
    """Replica A holds a mailbox, then pauses past its lease; B takes it over (a new
    epoch). A's writer, waking with the old epoch, commits nothing: its transaction fails
    its fence, and every message of it is answered "not committed"."""
    cfg = load_mailbox(mailbox_xml(tmp_path / "m.xml", port=110, user="u", password="p"))

    async def go() -> tuple[Envelope, int, int]:
        store = await open_postgres(pg)
        async with store.transaction() as tx:
            await tx.import_directory(DIRECTORY)
        a, b = await _replicas(pg, 2, 1.0)
        try:
            a.names = b.names = [cfg.name]
            await a.tick()
            epoch = a.held[cfg.name]
            writer = Writer(store, created_by=LOGIN)
            stale = a.fence(cfg.name)  # what A's writer knew before its pause
            writer.fences = lambda name: stale
            await anyio.sleep(1.2)  # A paused past its lease...
            await b.tick()  # ...and B took it over
            env = Envelope(mailbox=cfg, uidl="u1", raw=b"x", parsed=parsed(1))
            await feed(writer, [env])
            return env, epoch, b.held[cfg.name]
        finally:
            await store.close()
            await a.backend.close()
            await b.backend.close()

    env, old, new = anyio.run(go)
    assert new == old + 1
    assert env.failure is not None and "lease" in str(env.failure)
    assert store_rows(tmp_path, "SELECT count(*) AS n FROM requests") == [{"n": 0}]
    assert store_rows(tmp_path, "SELECT count(*) AS n FROM ledger") == [{"n": 0}]


def _mailboxes(tmp_path: Path, dovecot: Any, count: int) -> tuple[Path, list[str]]:
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    users = []
    for i in range(count):
        user, pw = f"lease{i}-{time.monotonic_ns()}", f"pw-{i}"
        dovecot.add_user(user, pw)
        mailbox_xml(conf / f"box{i}.xml", port=dovecot.pop3_port, user=user, password=pw)
        users.append(user)
    return conf, users


@pytest.fixture
def replica(tmp_path: Path, pg: str) -> Iterator[Callable[..., Daemon]]:
    """Start ``run`` replicas on the test's database: ``replica(conf, "A", lease)``; every
    one still running is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(conf: Path, name: str, lease: float, *extra: str) -> Daemon:
        port = free_port()
        log = tmp_path / f"replica-{name}-{len(procs)}.log"
        env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                engine_argv(
                    *("run", "--config-dir", conf, "--data-dir", tmp_path / f"data-{name}"),
                    *("--store", pg, "--replica-id", name, "--lease-seconds", str(lease)),
                    *("--poll-interval", "1", "--reload-seconds", "0.5", "--parse-processes", "0"),
                    *("--http-port", str(port), "--grace-seconds", "10", *extra),
                ),
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        procs.append(proc)
        d = Daemon(proc, port, log)
        wait_for(lambda: _up(d), 30, f"replica {name}'s /healthz")
        return d

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(10)


def _held(pg: str) -> Counter[str | None]:
    return Counter(_owners(pg).values())


@pytest.mark.dovecot
def test_sigterm_gives_the_leases_back_at_once_and_health_names_the_replica(
    tmp_path: Path, pg: str, dovecot: Any, replica: Callable[..., Daemon]
) -> None:
    """Two replicas share 6 mailboxes 3 and 3; /healthz names each replica and its lease
    counts. A SIGTERM gives the leases back on the way out: the other replica holds them all
    within one tick, long before they would have expired."""
    import_directory(tmp_path / "data", tmp_path)
    conf, _ = _mailboxes(tmp_path, dovecot, 6)
    lease = 9.0
    a = replica(conf, "A", lease)
    b = replica(conf, "B", lease)
    wait_for(lambda: _held(pg) == Counter({"A": 3, "B": 3}), 3 * lease, "3 and 3")
    _, body = a.get("/healthz")
    health = json.loads(body)
    assert health["replica"] == "A" and health["leases"]["held"] == 3
    assert health["leases"]["mailboxes"] == 6 and health["leases"]["replicas"] == 2
    _, metrics = b.get("/metrics")
    assert b'mailintegration_leases_held{replica="B"} 3.0' in metrics
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(timeout=30)
    released = time.monotonic()
    assert "A" not in _held(pg)  # given back, not left to expire
    wait_for(lambda: _held(pg) == Counter({"B": 6}), lease, "B holding all six")
    assert time.monotonic() - released < lease
    code, out = cli("status", "--data-dir", tmp_path, "--store", pg)
    assert code == 0 and out.count("polled by B") == 6, out


@pytest.mark.dovecot
def test_a_replica_killed_with_9_is_taken_over_within_a_lease_and_a_poll(
    tmp_path: Path, pg: str, dovecot: Any, replica: Callable[..., Daemon]
) -> None:
    """kill -9 leaves its leases to expire: the other replica polls its mailboxes within
    one lease period plus one poll interval, and the mail delivered meanwhile is processed
    once."""
    import_directory(tmp_path / "data", tmp_path)
    conf, users = _mailboxes(tmp_path, dovecot, 6)
    lease, poll = 3.0, 1.0
    a = replica(conf, "A", lease)
    replica(conf, "B", lease)
    wait_for(lambda: _held(pg) == Counter({"A": 3, "B": 3}), 4 * lease, "3 and 3")
    orphans = [n for n, owner in _owners(pg).items() if owner == "A"]
    a.proc.kill()
    killed = time.monotonic()
    for user in users:
        dovecot.deliver(user, message(f"After the kill {user}"))
    wait_for(lambda: _held(pg) == Counter({"B": 6}), 3 * lease, "B taking A's leases")
    took = time.monotonic() - killed
    mail = "SELECT count(*) FROM requests WHERE kind = 'mail'"
    wait_for(lambda: count_rows(tmp_path, mail) == 6, 3 * lease, "every message")
    polled = time.monotonic() - killed
    assert len(orphans) == 3
    # Expiry, then B's next tick (lease / 3), then its poll; 1 s of slack for a busy machine.
    assert took <= lease + lease / 3 + 1.0, took
    assert polled <= lease + lease / 3 + poll + 2.0, polled
    assert all(dovecot.count(u) == 0 for u in users)
    assert len(ledger(tmp_path)) == 6


@pytest.mark.dovecot
def test_a_replica_paused_past_its_lease_commits_nothing_when_it_wakes(
    tmp_path: Path, pg: str, dovecot: Any, replica: Callable[..., Daemon]
) -> None:
    """SIGSTOP replica A in the middle of a long session, past its lease; B takes the mailbox
    over (a new epoch) and empties it. SIGCONT A: what A had fetched and not committed fails
    its fence; no message is lost or doubled."""
    import_directory(tmp_path / "data", tmp_path)
    conf, [user] = _mailboxes(tmp_path, dovecot, 1)
    total, lease = 600, 2.0
    for i in range(total):
        dovecot.deliver(user, message(f"Paused {i}", body="x" * 2000))
    mail = "SELECT count(*) FROM requests WHERE kind = 'mail'"
    a = replica(conf, "A", lease)
    wait_for(lambda: count_rows(tmp_path, mail) >= 20, 60, "A under way")
    os.kill(a.proc.pid, signal.SIGSTOP)
    paused_at = count_rows(tmp_path, mail)
    assert paused_at < total, "A finished before it could be paused: use more messages"
    b = replica(conf, "B", lease)
    wait_for(lambda: count_rows(tmp_path, mail) == total, 90, "B finishing the mailbox")
    wait_for(lambda: dovecot.count(user) == 0, 30, "the mailbox emptied")
    os.kill(a.proc.pid, signal.SIGCONT)
    time.sleep(2 * lease)  # A wakes, meets its fences, finds the lease gone
    for d in (a, b):
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=30)
    rows = store_rows(tmp_path, "SELECT subject FROM requests WHERE kind = 'mail'")
    subjects = Counter(r["subject"] for r in rows)
    assert len(subjects) == total and set(subjects.values()) == {1}
    assert len(ledger(tmp_path)) == total
    assert dovecot.count(user) == 0
    assert "lease" in a.log.read_text()


@pytest.mark.dovecot
@pytest.mark.crash
def test_the_multi_replica_kill_9_harness_finds_no_loss_and_no_duplicate(
    tmp_path: Path, pg: str, dovecot: Any
) -> None:
    """A short run of tools/crash_replicas.py (the lead runs 1,000 iterations): 3 replicas,
    10 mailboxes, mail delivered all the while, 4 random SIGKILLs with restarts."""
    from tools.crash_replicas import run_replicas

    out = run_replicas(
        dovecot, tmp_path / "work", store=pg, iterations=4, replicas=3, mailboxes=10, seed=7
    )
    assert out["iterations"] == 4 and out["messages"] > 0
    assert out["drained"], out
    assert (out["losses"], out["duplicates"], out["left_on_server"]) == (0, 0, 0), out
    assert out["ledger_keys_twice"] == 0


def _through(dsn: str, port: int) -> str:
    parts = urllib.parse.urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


@pytest.mark.dovecot
def test_postgresql_lost_under_load_fails_cleanly_shows_and_resumes(
    tmp_path: Path, pg: str, dovecot: Any, replica: Callable[..., Daemon]
) -> None:
    """The replica reaches PostgreSQL through a proxy that drops every connection in the
    middle of the work, three times, then refuses connections for longer than a lease: the
    transactions fail and nothing is deleted; /healthz says the store fails (503); once
    PostgreSQL answers again the replica reconnects by itself and every message is processed
    exactly once."""
    import_directory(tmp_path / "data", tmp_path)
    conf, users = _mailboxes(tmp_path, dovecot, 3)
    total, lease = 150, 3.0
    host, port = urllib.parse.urlsplit(pg).hostname or "", urllib.parse.urlsplit(pg).port or 5432
    mail = "SELECT count(*) FROM requests WHERE kind = 'mail'"

    def deliver() -> None:
        for i in range(total):
            dovecot.deliver(users[i % 3], message(f"Under load {i}"))
            time.sleep(0.02)

    with TcpProxy(host, port) as proxy:
        a = replica(conf, "A", lease, "--store", _through(pg, proxy.port))
        feeder = threading.Thread(target=deliver)
        feeder.start()
        try:
            wait_for(lambda: count_rows(tmp_path, mail) >= 10, 60, "work under way")
            for _ in range(3):
                proxy.cut()
                time.sleep(0.3)
            proxy.refuse(True)
            proxy.cut()

            def failing() -> bool:
                code, body = a.get("/healthz")
                return code == 503 and json.loads(body)["store"] != "ok"

            wait_for(failing, 2 * lease, "/healthz saying the store fails")
            time.sleep(lease)
            proxy.refuse(False)
        finally:
            feeder.join(30)
        wait_for(lambda: count_rows(tmp_path, mail) == total, 90, "every message")
        wait_for(lambda: all(dovecot.count(u) == 0 for u in users), 30, "the mailboxes emptied")
        wait_for(lambda: a.get("/healthz")[0] == 200, 30, "/healthz well again")
    rows = store_rows(tmp_path, "SELECT subject FROM requests WHERE kind = 'mail'")
    assert sorted(Counter(r["subject"] for r in rows).values()) == [1] * total
    assert len(ledger(tmp_path)) == total
    log = a.log.read_text()
    assert "reconnected" in log and "nothing is deleted" in log


def test_a_connection_dropped_or_gone_silent_mid_transaction_fails_it_and_the_next_reconnects(
    tmp_path: Path, pg: str
) -> None:
    """Through a proxy: a connection reset in the middle of a transaction fails that
    transaction (a store failure, nothing of it committed); one gone silent (half-open: no
    reset, nothing arrives) fails it within the statement bound instead of hanging; each
    time the next transaction reconnects by itself."""
    url = urllib.parse.urlsplit(pg)

    async def attempt(store: Any, subject: str, fault: Callable[[], None] | None) -> str:
        try:
            async with store.transaction() as tx:
                team = await tx.team("IT")
                await tx.create_request(
                    team_id=team.id,
                    type="event",
                    subject=subject,
                    description="d",
                    created_by="t",
                )
                if fault is not None:
                    fault()
                    await tx.open_outages("box")  # a statement after the fault
        except store.failures as exc:
            return type(exc).__name__
        return "committed"

    async def go(proxy: TcpProxy) -> list[str]:
        store = await open_postgres(_through(pg, proxy.port), command_seconds=1.0)
        try:
            async with store.transaction() as tx:
                await tx.import_directory(DIRECTORY)
            seen = [await attempt(store, "before", None)]
            seen.append(await attempt(store, "reset", proxy.cut))
            seen.append(await attempt(store, "after reset", None))
            with anyio.fail_after(20):
                seen.append(await attempt(store, "silent", lambda: proxy.stall(True)))
            proxy.stall(False)
            seen.append(await attempt(store, "after silence", None))
            return seen
        finally:
            await store.close()

    with TcpProxy(url.hostname or "", url.port or 5432) as proxy:
        seen = anyio.run(go, proxy)
    assert seen[0] == "committed" and seen[2] == "committed" and seen[4] == "committed"
    assert seen[1] != "committed" and seen[3] == "TimeoutError", seen
    rows = store_rows(tmp_path, "SELECT subject FROM requests ORDER BY number")
    assert [r["subject"] for r in rows] == ["before", "after reset", "after silence"]


def test_two_replicas_cannot_open_the_same_outage_twice(tmp_path: Path, pg: str) -> None:
    """Outage events stay one per mailbox and cause across replicas: a second open one is
    refused by the database as a conflict (which the writer does again, then finds the
    first and adds to it), and once the first is closed a new one may open."""

    async def outage(tx: Any) -> int:
        team = await tx.team("IT")
        return int(
            await tx.create_request(
                team_id=team.id,
                type="event",
                kind="outage",
                subject="box: timeout",
                description="d",
                created_by="t",
                mailbox="box",
                cause="timeout",
            )
        )

    async def go() -> tuple[str, int, int]:
        a, b = await open_postgres(pg), await open_postgres(pg)
        try:
            async with a.transaction() as tx:
                await tx.import_directory(DIRECTORY)
            result = "committed"
            async with b.transaction() as tx_b:
                first = await outage(tx_b)
            try:
                async with a.transaction() as tx_a:
                    await outage(tx_a)
            except a.conflicts as exc:
                result = type(exc).__name__
            async with a.transaction() as tx_a:
                await tx_a.set_status(first, "processed", by="t", why="recovered")
            async with a.transaction() as tx_a:
                second = await outage(tx_a)
            return result, first, second
        finally:
            await a.close()
            await b.close()

    result, first, second = anyio.run(go)
    assert result == "UniqueViolationError" and second > first
    rows = store_rows(tmp_path, "SELECT status FROM requests WHERE kind = 'outage' ORDER BY number")
    assert [r["status"] for r in rows] == ["processed", "new"]


@pytest.mark.dovecot
def test_once_skips_a_mailbox_another_replica_holds_and_takes_it_once_free(
    tmp_path: Path, pg: str, dovecot: Any, pop3_user: tuple[str, str]
) -> None:
    """`once` with PostgreSQL takes the lease of every mailbox nobody holds: a mailbox a live
    replica holds is skipped (its mail left to that replica), and polled once it is free;
    the pass gives its leases back when it ends."""
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    user, password = pop3_user
    dovecot.deliver(user, message("Held elsewhere"))
    cfg = mailbox_xml(tmp_path / "m.xml", port=dovecot.pop3_port, user=user, password=password)
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO leases(mailbox, owner, expires_at, epoch) "
            "VALUES ('m', 'other', now() + interval '60 seconds', 7)"
        )
    args = ("once", "--config", cfg, "--data-dir", data, "--store", pg, "--replica-id", "cron")
    login = ("--login", LOGIN, "--password", LOGIN_PASSWORD)
    code, out = cli(*args, *login)
    assert code == 0 and "m: skipped: another replica polls it now" in out
    assert dovecot.count(user) == 1
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("UPDATE leases SET expires_at = now() WHERE mailbox = 'm'")
    code, out = cli(*args, *login)
    assert code == 0 and "skipped" not in out
    assert dovecot.count(user) == 0
    assert [r["subject"] for r in store_rows(data, "SELECT subject FROM requests")] == [
        "Held elsewhere"
    ]
    assert _owners(pg) == {"m": None}  # given back at the end of the pass
