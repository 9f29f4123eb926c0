"""Issue 4: the multi-mailbox engine: once over a folder, the daemon, reload, signals, ops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    Delivered,
    Mailbox,
    assert_exactly_once,
    cli,
    count_rows,
    engine_argv,
    free_port,
    ledger,
    mailbox_xml,
    message,
    once,
    requests,
    store_args,
    wait_for,
)

from engine.gateways.pop3 import Pop3Gateway
from engine.items import Envelope, Item
from engine.model import ParsedMessage
from engine.store import open_store
from engine.writer import Writer
from tools.fakepop3 import FakePOP3Server, Script

pytestmark = pytest.mark.dovecot
ROOT = Path(__file__).resolve().parent.parent


def test_twenty_mailboxes_once_each_message_exactly_once(
    tmp_path: Path, store: str, data: Path, dovecot: Any, new_mailbox: Callable[..., Mailbox]
) -> None:
    conf = tmp_path / "mailboxes.d"
    (conf / "IT").mkdir(parents=True)  # a per-team folder: its files need no <team>
    delivered: list[Delivered] = []
    for i in range(20):
        if i % 2:
            box = new_mailbox(conf / "IT" / f"box{i}.xml", team=None)
        else:
            box = new_mailbox(conf / f"box{i}.xml")
        box.deliver(*[message(f"Box {i} message {j}") for j in range(5)])
        delivered += box.expected()
    assert once(data, conf) == 0
    assert len(delivered) == 100
    assert_exactly_once(data, delivered, dovecot)
    assert {r["team"] for r in requests(data)} == {"IT"}
    code, out = cli("status", "--data-dir", data, *store_args())
    assert code == 0 and "IT/box1" in out and "processed 5" in out


def test_a_stalled_server_does_not_hold_up_the_others(
    tmp_path: Path, store: str, data: Path, new_mailbox: Callable[..., Mailbox]
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    fine = [new_mailbox(conf / f"fine{i}.xml") for i in range(5)]
    for i, box in enumerate(fine):
        box.deliver(message(f"Fine {i}"))
    stall = Script(messages=[message("Stalls")], stall_on_retr=1, stall_timeout=20)
    with FakePOP3Server(stall) as fake:
        mailbox_xml(conf / "stalled.xml", port=fake.port, user="u", password="p", timeout=2)
        started = time.monotonic()
        assert once(data, conf) == 1
        elapsed = time.monotonic() - started
        assert fake.deleted == []
    # Bounded by the 2 s socket timeout, not by the stalled server's 20 s.
    assert elapsed < 15
    reqs = requests(data)
    assert sorted(r["subject"] for r in reqs if r["kind"] == "mail") == [
        f"Fine {i}" for i in range(5)
    ]
    [outage] = [r for r in reqs if r["kind"] == "outage"]
    assert (outage["mailbox"], outage["cause"]) == ("stalled", "timeout")
    assert all(box.left() == 0 for box in fine)


def test_in_use_is_a_locked_mailbox_not_bad_credentials(
    tmp_path: Path, store: str, data: Path
) -> None:
    causes = {}
    for code, name in (("[IN-USE]", "locked"), ("[SYS/TEMP]", "temp"), ("[AUTH]", "auth")):
        script = Script(messages=[message("x")], auth_response=f"-ERR {code} no")
        with FakePOP3Server(script) as fake:
            cfg = mailbox_xml(tmp_path / f"{name}.xml", port=fake.port, user="u", password="p")
            assert once(data, cfg) == 1
            assert fake.deleted == []
    causes = {r["mailbox"]: r["cause"] for r in requests(data, type="event")}
    assert causes == {
        "locked": "mailbox-locked",
        "temp": "server-temporary",
        "auth": "authentication",
    }


@pytest.mark.parametrize(("count", "max_seconds", "most"), [(500, 60.0, 4), (20, 0.0, 20)])
def test_group_commit_batches_many_messages_into_few_transactions(
    tmp_path: Path, count: int, max_seconds: float, most: int
) -> None:
    """500 queued messages take a handful of transactions; a zero time budget (the bound by
    time) commits after every message instead."""

    async def go() -> tuple[int, str]:
        from engine.config import load_mailbox
        from engine.ops import Metrics

        data = tmp_path / "data"
        store = await open_store(data)
        from support import DIRECTORY

        async with store.transaction() as tx:
            await tx.import_directory(DIRECTORY)
        cfg_path = mailbox_xml(tmp_path / "m.xml", port=110, user="u", password="p")
        cfg = load_mailbox(cfg_path)
        metrics = Metrics()
        writer = Writer(
            store, created_by=LOGIN, max_batch=256, max_batch_seconds=max_seconds, metrics=metrics
        )
        send, receive = anyio.create_memory_object_stream[Item](1000)
        envelopes = []
        for i in range(count):
            parsed = ParsedMessage(
                raw=b"x",
                sha256=f"{i:064x}",
                message_id=f"m{i}@x",
                subject=f"s{i}",
                from_name="",
                from_addr="john.doe@example.com",
                to=(),
                date=None,
                in_reply_to=None,
                references=(),
                body="b",
                html=None,
                attachments=(),
                auto_submitted=False,
                auto_reason=None,
                is_bounce=False,
            )
            env = Envelope(mailbox=cfg, uidl=f"u{i}", raw=b"x", parsed=parsed)
            envelopes.append(env)
            send.send_nowait(env)
        send.close()
        await writer.run(receive)
        assert all(str(e.outcome) == "created" for e in envelopes)
        await store.close()
        return writer.stats.transactions, metrics.render().decode()

    transactions, text = anyio.run(go)
    assert transactions <= most
    if max_seconds == 0:
        assert transactions == count
    line = next(x for x in text.splitlines() if x.startswith("mailintegration_transactions_total"))
    assert float(line.split()[-1]) == transactions
    assert "mailintegration_batch_size_count" in text


def test_dele_only_after_the_ledger_row_is_committed(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox.deliver(*[message(f"Order {i}") for i in range(30)])
    data = mailbox.data
    seen: list[tuple[int, int]] = []
    real = Pop3Gateway.dele_many

    def spy(self: Pop3Gateway, numbers: Sequence[int]) -> None:
        # Another connection sees only committed rows.
        committed = count_rows(data, "SELECT count(*) FROM ledger")
        seen.extend((number, committed) for number in numbers)
        real(self, numbers)

    monkeypatch.setattr(Pop3Gateway, "dele_many", spy)
    assert mailbox.once() == 0
    assert sorted(n for n, _ in seen) == list(range(1, 31))
    assert all(committed >= number for number, committed in seen)
    mailbox.assert_exactly_once()


def test_dry_run_explains_and_changes_nothing(mailbox: Mailbox) -> None:
    mailbox.deliver(message("Dry", attachments=(("a.txt", "text/plain", b"a"),)))
    mailbox.deliver(message("From a stranger", sender="who@nowhere.example"))
    code, out = cli(
        "once",
        "--config",
        mailbox.config,
        "--data-dir",
        mailbox.data,
        "--login",
        LOGIN,
        "--password",
        LOGIN_PASSWORD,
        "--dry-run",
    )
    assert code == 0
    assert "new incident 'Dry': requester jdoe, site Québec, group Service Desk" in out
    assert "attachments: a.txt" in out
    assert "requester unknown.user" in out
    assert mailbox.left() == 2
    assert mailbox.requests() == [] and mailbox.ledger() == []


def test_password_env_and_file(
    tmp_path: Path,
    data: Path,
    dovecot: Any,
    pop3_user: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user, pw = pop3_user
    monkeypatch.setenv("BOX_PW", pw)
    secret = tmp_path / "secret.txt"
    secret.write_text(pw + "\n")
    for name, extra in (
        ("env", "<passwordEnv>BOX_PW</passwordEnv>"),
        ("file", f"<passwordFile>{secret}</passwordFile>"),
    ):
        cfg = mailbox_xml(
            tmp_path / f"{name}.xml",
            port=dovecot.pop3_port,
            user=user,
            password=None,
            server_extra=f"    {extra}\n",
        )
        dovecot.deliver(user, message(f"Via {name}"))
        assert once(data, cfg) == 0
    assert [r["subject"] for r in requests(data)] == ["Via env", "Via file"]


# -- the daemon, as a separate process ---------------------------------------------------


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    procs: list[subprocess.Popen[bytes]] = []
    files: list[Any] = []

    def start(conf: Path, data: Path, *extra: str) -> Daemon:
        port = free_port()
        log = tmp_path / f"daemon-{len(procs)}.log"
        env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
        files.append(open(log, "wb"))  # noqa: SIM115 - closed at teardown
        proc = subprocess.Popen(
            engine_argv(
                "run",
                "--config-dir",
                str(conf),
                "--data-dir",
                str(data),
                "--poll-interval",
                "1",
                "--reload-seconds",
                "0.3",
                "--http-port",
                str(port),
                *extra,
            ),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=files[-1],
        )
        procs.append(proc)
        d = Daemon(proc, port, log)
        wait_for(lambda: _up(d), 30, "the daemon's /healthz")
        return d

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    for f in files:
        f.close()


def _up(d: Daemon) -> bool:
    if d.proc.poll() is not None:
        raise AssertionError(f"daemon exited: {d.log.read_text()[-2000:]}")
    try:
        return d.get("/healthz")[0] == 200
    except OSError:
        return False


def test_daemon_hot_reload_health_and_metrics(
    tmp_path: Path, data: Path, dovecot: Any, daemon: Callable[..., Daemon]
) -> None:
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    users = {}
    for name in ("alpha", "beta", "gamma"):
        user, pw = f"{name}-{time.monotonic_ns()}", f"{name}-pw"
        dovecot.add_user(user, pw)
        users[name] = (user, pw)
    a_user, a_pw = users["alpha"]
    mailbox_xml(conf / "alpha.xml", port=dovecot.pop3_port, user=a_user, password=a_pw)
    dovecot.deliver(a_user, message("Alpha 1"))
    d = daemon(conf, data)
    mail = "SELECT count(*) FROM requests WHERE kind = 'mail'"
    wait_for(lambda: count_rows(data, mail) == 1, what="alpha's first message")

    # Add a file while running: its mail is processed.
    b_user, b_pw = users["beta"]
    dovecot.deliver(b_user, message("Beta 1"))
    mailbox_xml(conf / "beta.xml", port=dovecot.pop3_port, user=b_user, password=b_pw)
    wait_for(lambda: count_rows(data, mail) == 2, what="beta after it was added")

    # Break one: its outage opens, the others go on.
    (conf / "beta.xml").write_text("<mailIntegration><server>broken")
    outage = "SELECT count(*) FROM requests WHERE kind = 'outage' AND cause = 'config'"
    wait_for(lambda: count_rows(data, outage) == 1, what="beta's config outage")
    dovecot.deliver(a_user, message("Alpha 2"))
    wait_for(lambda: count_rows(data, mail) == 3, what="alpha going on")

    # Remove one: it stops.
    (conf / "alpha.xml").unlink()
    time.sleep(1.0)
    dovecot.deliver(a_user, message("Alpha after removal"))
    g_user, g_pw = users["gamma"]
    mailbox_xml(conf / "gamma.xml", port=dovecot.pop3_port, user=g_user, password=g_pw)
    dovecot.deliver(g_user, message("Gamma 1"))
    wait_for(lambda: count_rows(data, mail) == 4, what="gamma")
    time.sleep(2.5)  # more than two poll intervals of the removed mailbox
    assert dovecot.count(a_user) == 1
    assert count_rows(data, mail) == 4

    status, body = d.get("/healthz")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok" and health["writer"] and health["supervisor"]
    assert health["mailboxes"]["gamma"]["last_success"]
    assert health["mailboxes"]["beta"]["outage"] == "config"
    assert "alpha" not in health["mailboxes"]
    status, body = d.get("/metrics")
    text = body.decode()
    assert status == 200
    assert 'mailintegration_messages_processed_total{mailbox="gamma"} 1.0' in text
    assert 'mailintegration_mailbox_outage{mailbox="beta"} 1.0' in text
    assert "mailintegration_queue_depth" in text
    assert "mailintegration_commit_seconds_bucket" in text

    # A second engine on the same data directory is refused, naming the holder.
    code = subprocess.run(
        engine_argv(
            "once",
            "--config-dir",
            str(conf),
            "--data-dir",
            str(data),
            "--login",
            LOGIN,
            "--password",
            LOGIN_PASSWORD,
        ),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert code.returncode != 0
    assert f"in use by pid {d.proc.pid}".encode() in code.stderr

    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert b"stopped:" in d.log.read_bytes()


def busy_mailboxes(
    tmp_path: Path, new_mailbox: Callable[..., Mailbox], prefix: str, boxes: int, per_box: int
) -> tuple[Path, list[Delivered]]:
    """A folder of ``boxes`` mailbox files each holding ``per_box`` mails."""
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    delivered = []
    for i in range(boxes):
        box = new_mailbox(conf / f"{prefix}{i}.xml")
        box.deliver(*[message(f"{prefix} {i}/{j}", body="x" * 2500) for j in range(per_box)])
        delivered += box.expected()
    return conf, delivered


def converges(data: Path, conf: Path, dovecot: Any, delivered: list[Delivered]) -> None:
    """A final `once` converges: every message once in the store, every mailbox empty."""
    assert once(data, conf) == 0
    assert_exactly_once(data, delivered, dovecot)


def test_sigterm_during_a_busy_run_loses_and_duplicates_nothing(
    tmp_path: Path,
    data: Path,
    dovecot: Any,
    new_mailbox: Callable[..., Mailbox],
    daemon: Callable[..., Daemon],
) -> None:
    conf, delivered = busy_mailboxes(tmp_path, new_mailbox, "busy", 4, 150)
    d = daemon(conf, data, "--grace-seconds", "20")
    wait_for(lambda: count_rows(data, "SELECT count(*) FROM ledger") > 20, what="progress")
    d.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert d.proc.wait(30) == 0
    assert time.monotonic() - started < 25
    converges(data, conf, dovecot, delivered)


def test_compose_file_names_only_things_that_exist() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"engine", "mail", "catcher", "directory"} <= services.keys()
    volumes = set(doc.get("volumes", {}))
    for name, svc in services.items():
        if "build" in svc:
            ctx = svc["build"] if isinstance(svc["build"], str) else svc["build"]["context"]
            assert (ROOT / ctx / "Dockerfile").exists(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in volumes, (name, source)
    engine = services["engine"]
    assert any(v.startswith("./mailboxes.d:") and v.endswith(":ro") for v in engine["volumes"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER mailintegration" in dockerfile and "HEALTHCHECK" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    from engine.config import load_mailbox

    os.environ.setdefault("SUPPORT_POP3_PASSWORD", "x")
    for xml in (ROOT / "mailboxes.d").glob("*.xml"):
        load_mailbox(xml)


def test_second_signal_cancels_at_once_without_loss(
    tmp_path: Path,
    data: Path,
    dovecot: Any,
    new_mailbox: Callable[..., Mailbox],
    daemon: Callable[..., Daemon],
) -> None:
    conf, delivered = busy_mailboxes(tmp_path, new_mailbox, "twice", 3, 200)
    # One mailbox hangs mid-RETR for a minute: the first signal alone waits for it.
    stall = Script(
        messages=[message("Stalls")], stall_on_retr=1, stall_timeout=90, fault_sessions=1
    )
    with FakePOP3Server(stall) as fake:
        mailbox_xml(conf / "stalled.xml", port=fake.port, user="u", password="p", timeout=60)
        d = daemon(conf, data, "--grace-seconds", "300")
        wait_for(lambda: count_rows(data, "SELECT count(*) FROM ledger") > 10, what="progress")
        wait_for(lambda: fake.sessions >= 1, what="the stalled session")
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert d.proc.poll() is None  # still waiting for the stalled RETR
        d.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        d.proc.wait(60)
        # Far sooner than the 300 s grace period or the 60 s socket timeout.
        assert time.monotonic() - started < 10
        assert fake.deleted == []
        (conf / "stalled.xml").unlink()
    converges(data, conf, dovecot, delivered)


def test_once_on_a_terminal_shows_progress_per_mailbox(
    tmp_path: Path, data: Path, dovecot: Any, pop3_user: tuple[str, str]
) -> None:
    import pty

    user, pw = pop3_user
    conf = tmp_path / "conf"
    conf.mkdir()
    mailbox_xml(conf / "term.xml", port=dovecot.pop3_port, user=user, password=pw)
    dovecot.deliver(user, message("On a terminal"))
    main, sub = pty.openpty()
    env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
    proc = subprocess.run(
        engine_argv("once", "--config-dir", str(conf), "--data-dir", str(data)),
        cwd=ROOT,
        env=env,
        stdout=sub,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    os.close(sub)
    out = b""
    for _ in range(100):
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.returncode == 0
    assert b"term: fetched 1, processed 1, failed 0; ok" in out
    # Without a terminal, only the log speaks.
    dovecot.deliver(user, message("Not on a terminal"))
    code, text = cli(
        "once",
        "--config-dir",
        conf,
        "--data-dir",
        data,
        "--login",
        LOGIN,
        "--password",
        LOGIN_PASSWORD,
    )
    assert code == 0 and text == ""


def test_a_failing_mailbox_backs_off_while_a_healthy_one_keeps_its_pace(
    tmp_path: Path,
    data: Path,
    dovecot: Any,
    pop3_user: tuple[str, str],
    daemon: Callable[..., Daemon],
) -> None:
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    user, pw = pop3_user
    mailbox_xml(conf / "healthy.xml", port=dovecot.pop3_port, user=user, password=pw)
    mailbox_xml(conf / "down.xml", port=free_port(), user="x", password="y")
    d = daemon(conf, data, "--poll-interval", "0.2")
    time.sleep(4.0)

    def sessions(mailbox: str) -> float:
        text = d.get("/metrics")[1].decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("mailintegration_sessions_total") and f'mailbox="{mailbox}"' in line
        )

    healthy, down = sessions("healthy"), sessions("down")
    # 0.2 s apart while it works; 0.2, 0.4, 0.8, 1.6… after each failure.
    assert healthy >= 8
    assert 2 <= down <= 6
    # Still one outage event, however many failed sessions.
    outages = "SELECT count(*) FROM requests WHERE kind = 'outage'"
    assert count_rows(data, outages) == 1


def test_json_logs_name_the_mailbox_and_uidl_of_each_message(
    tmp_path: Path, data: Path, dovecot: Any, pop3_user: tuple[str, str]
) -> None:
    user, pw = pop3_user
    cfg = mailbox_xml(tmp_path / "jl.xml", port=dovecot.pop3_port, user=user, password=pw)
    dovecot.deliver(user, message("Logged as JSON"))
    env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
    proc = subprocess.run(
        engine_argv("once", "--config", str(cfg), "--data-dir", str(data), "--log-format", "json"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0
    lines = [json.loads(line) for line in proc.stderr.decode().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    [created] = [x for x in lines if x["logger"] == "engine.writer" and "created" in x["message"]]
    [row] = ledger(data)
    assert f"mailbox=jl uidl={row['uidl']}" in created["message"]
    assert pw not in proc.stderr.decode()


def test_byte_budget_is_given_back_when_a_session_fails_mid_window(tmp_path: Path) -> None:
    """A failed RETR window must not keep its share of the budget, or a long-running daemon
    would slowly stop fetching at all."""
    from support import DIRECTORY

    from engine.supervisor import Engine, EngineSettings, MailboxSource

    stall = Script(messages=[message(f"m{i}") for i in range(5)], stall_on_retr=3, stall_timeout=1)
    with FakePOP3Server(stall) as fake:
        cfg = mailbox_xml(
            tmp_path / "w.xml", port=fake.port, user="u", password="p-secret", timeout=2
        )

        async def go() -> tuple[int, str | None]:
            store = await open_store(tmp_path / "data")
            async with store.transaction() as tx:
                await tx.import_directory(DIRECTORY)
            engine = Engine(store, EngineSettings(data_dir=tmp_path / "data", created_by=LOGIN))
            [outcome] = await engine.once([MailboxSource("w", cfg)])
            await store.close()
            return engine.budget.used, getattr(outcome.error, "cause", None)

        used, cause = anyio.run(go)
    assert cause in ("timeout", "protocol")
    assert used == 0
    assert fake.deleted == []


def test_the_daemon_stops_when_no_session_wanted_a_parsing_process(tmp_path: Path) -> None:
    """The parsing processes start only once a session has enough messages to want them:
    a daemon told to stop before any did still ends (the start, still waiting, is
    cancelled), and never started a process."""
    from engine.supervisor import Engine, EngineSettings

    folder = tmp_path / "mailboxes.d"
    folder.mkdir()
    settings = EngineSettings(data_dir=tmp_path / "data", created_by=LOGIN, parse_processes=1)

    async def go() -> bool:
        store = await open_store(tmp_path / "data")
        try:
            engine = Engine(store, settings)

            async def stop_soon() -> None:
                await anyio.sleep(0.3)
                engine.stop.set()

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop_soon)
                    await engine.run(folder, reload_seconds=0.1)
            assert engine.processes is not None
            return engine.processes.wanted.is_set()
        finally:
            await store.close()

    assert anyio.run(go) is False
