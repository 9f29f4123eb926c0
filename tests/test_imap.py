"""Issue 15: IMAP as a second gateway, exactly once by (folder, UIDVALIDITY, UID).

Real Dovecot IMAP on loopback for what a real server does (TLS, the disposal modes, a
UIDVALIDITY reset, a crash between commit and disposal); tools/fakeimap.py only for the
faults Dovecot will not produce on demand (no UIDPLUS, a drop mid-FETCH, [UNAVAILABLE],
[ALERT]).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    IMAP_GATEWAY,
    LOGIN,
    LOGIN_PASSWORD,
    cli,
    count_rows,
    engine_argv,
    import_directory,
    ledger,
    mailbox_xml,
    message,
    once,
    requests,
    wait_for,
)

from engine.errors import ProtocolError
from engine.gateways import Request
from engine.gateways.imap import KEYWORD, ImapGateway, first_long_line, mutf7, uid_set
from engine.keys import imap_key, imap_key_parts, uidl_key
from tools.fakeimap import FakeIMAPServer, Script

pytestmark = [pytest.mark.dovecot, pytest.mark.usefixtures("require_imap")]


def imap_mailbox(
    tmp_path: Path,
    port: int,
    user: str,
    password: str,
    *,
    server: str = "",
    name: str = "imap.xml",
    **elements: str | None,
) -> Path:
    return mailbox_xml(
        tmp_path / name,
        port=port,
        user=user,
        password=password,
        gateway=IMAP_GATEWAY,
        server_extra=server,
        **elements,
    )


@pytest.fixture
def box(tmp_path: Path, dovecot: Any, pop3_user: tuple[str, str]) -> dict[str, Any]:
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    user, password = pop3_user

    def config(server: str = "", **elements: str | None) -> Path:
        tls = f"<startTls>true</startTls><caFile>{dovecot.certificates.ca_file}</caFile>"
        return imap_mailbox(
            tmp_path, dovecot.imap_port, user, password, server=tls + server, **elements
        )

    return {"data": data, "user": user, "password": password, "config": config}


def mail_requests(data: Path) -> list[dict[str, Any]]:
    return [r for r in requests(data) if r["kind"] == "mail"]


# ---------------------------------------------------------------------------- the pieces


def test_imap_keys_are_injective_and_never_a_pop3_key() -> None:
    keys = {
        imap_key("INBOX", 7, 1),
        imap_key("INBOX", 7, 11),
        imap_key("INBOX", 71, 1),
        imap_key("INBOX:7", 1, 1),
        imap_key("Support", 7, 1),
        imap_key("=Support", 7, 1),
        imap_key("Été", 7, 1),
        imap_key("#c389", 7, 1),
    }
    assert len(keys) == 8
    assert imap_key_parts(imap_key("a:b:1", 2, 3)) == ("=a:b:1", 2, 3)
    # A POP3 server's UIDL that spells an IMAP key is escaped: it cannot collide.
    assert uidl_key(imap_key("INBOX", 7, 1).encode()).startswith("x-uidl:")
    assert uidl_key(b"X-IMAP:=INBOX:7:1").startswith("x-uidl:")


def test_folder_names_uid_sets_and_long_lines() -> None:
    assert mutf7("INBOX") == "INBOX"
    assert mutf7("Été & co") == "&AMk-t&AOk- &- co"
    assert uid_set([5, 1, 2, 3, 7, 8]) == "1:3,5,7:8"
    assert first_long_line(b"ab\ncd\n", 3) == 3
    assert first_long_line(b"a\nbcdef", 3) == 5
    assert first_long_line(b"a\nb\n", 3) == -1


# ------------------------------------------------------------------- end to end, Dovecot


def test_starttls_session_processes_each_message_once_and_deletes_it(
    box: dict[str, Any], dovecot: Any
) -> None:
    for i in range(3):
        dovecot.deliver(box["user"], message(f"IMAP case {i}"))
    cfg = box["config"]()
    assert once(box["data"], cfg) == 0
    assert sorted(r["subject"] for r in mail_requests(box["data"])) == [
        f"IMAP case {i}" for i in range(3)
    ]
    keys = [row["uidl"] for row in ledger(box["data"])]
    validity = dovecot.folder_status(box["user"]).uidvalidity
    assert keys == [imap_key("INBOX", validity, uid) for uid in (1, 2, 3)]
    assert dovecot.list_messages(box["user"]) == []  # UID EXPUNGE: gone
    assert once(box["data"], cfg) == 0
    assert len(mail_requests(box["data"])) == 3


def test_imaps_with_a_ca_file(tmp_path: Path, dovecot: Any, pop3_user: tuple[str, str]) -> None:
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    dovecot.deliver(pop3_user[0], message("Over IMAPS"))
    cfg = imap_mailbox(
        tmp_path,
        dovecot.imaps_port,
        *pop3_user,
        server=f"<caFile>{dovecot.certificates.ca_file}</caFile>",
        use_ssl=True,
    )
    assert once(data, cfg) == 0
    assert [r["subject"] for r in mail_requests(data)] == ["Over IMAPS"]


def test_dry_run_reads_nothing_as_seen_and_disposes_of_nothing(
    box: dict[str, Any], dovecot: Any
) -> None:
    dovecot.deliver(box["user"], message("Look but do not touch"))
    cfg = box["config"]()
    assert once(box["data"], cfg, "--dry-run") == 0
    [stored] = dovecot.list_messages(box["user"])
    assert "\\Seen" not in stored.flags and not stored.deleted  # BODY.PEEK[]
    assert mail_requests(box["data"]) == []
    assert once(box["data"], cfg) == 0
    assert len(mail_requests(box["data"])) == 1


def test_move_creates_the_folder_and_moves_processed_and_failed_mail(
    box: dict[str, Any], dovecot: Any
) -> None:
    user = box["user"]
    dovecot.deliver(user, message("To the archive"))
    dovecot.deliver(user, message("Unknown sender", sender="nobody@elsewhere.example"))
    cfg = box["config"](
        "<afterProcessing>move</afterProcessing><moveToFolder>Archive.Done</moveToFolder>"
        "<failedFolder>Failed</failedFolder>",
        incidentFallbackUserLogon=None,
    )
    assert once(box["data"], cfg) == 1  # one failure event
    assert dovecot.list_messages(user) == []
    assert len(dovecot.list_messages(user, "Archive.Done")) == 1
    assert len(dovecot.list_messages(user, "Failed")) == 1
    reqs = requests(box["data"])
    assert sorted(r["kind"] for r in reqs) == ["mail", "message-failure"]
    assert once(box["data"], cfg) == 0
    assert len(requests(box["data"])) == 2


def test_keep_marks_the_message_and_skips_it_afterwards(box: dict[str, Any], dovecot: Any) -> None:
    user = box["user"]
    dovecot.deliver(user, message("Keep me"))
    cfg = box["config"]("<afterProcessing>keep</afterProcessing>")
    assert once(box["data"], cfg) == 0
    [stored] = dovecot.list_messages(user)
    assert KEYWORD in stored.flags and not stored.deleted and "\\Seen" not in stored.flags
    dovecot.deliver(user, message("Second"))
    assert once(box["data"], cfg) == 0
    assert sorted(r["subject"] for r in mail_requests(box["data"])) == ["Keep me", "Second"]
    assert all(KEYWORD in m.flags for m in dovecot.list_messages(user))
    assert len(ledger(box["data"])) == 2


def test_several_folders_are_read_and_keyed_apart(box: dict[str, Any], dovecot: Any) -> None:
    user = box["user"]
    dovecot.create_folder(user, "Support")
    dovecot.deliver(user, message("In the inbox"))
    dovecot.deliver(user, message("In support"), folder="Support")
    cfg = box["config"]("<folders><folder>INBOX</folder><folder>Support</folder></folders>")
    assert once(box["data"], cfg) == 0
    assert sorted(r["subject"] for r in mail_requests(box["data"])) == [
        "In support",
        "In the inbox",
    ]
    folders = sorted(imap_key_parts(row["uidl"])[0] for row in ledger(box["data"]))  # type: ignore[index]
    assert folders == ["=INBOX", "=Support"]
    assert dovecot.list_messages(user, "Support") == []


def test_uidvalidity_reset_with_the_same_mail_processes_nothing_again(
    box: dict[str, Any], dovecot: Any
) -> None:
    user = box["user"]
    raws = [message(f"Before the reset {i}") for i in range(3)]
    dovecot.create_folder(user, "Support")
    for raw in raws:
        dovecot.deliver(user, raw, folder="Support")
    cfg = box["config"](
        "<folders><folder>Support</folder></folders><afterProcessing>keep</afterProcessing>"
    )
    assert once(box["data"], cfg) == 0
    before = dovecot.folder_status(user, "Support").uidvalidity
    # The folder rebuilt with the same mail: new UIDVALIDITY, new UIDs, no keywords.
    dovecot.delete_folder(user, "Support")
    dovecot.create_folder(user, "Support")
    for raw in raws:
        dovecot.deliver(user, raw, folder="Support")
    dovecot.deliver(user, message("After the reset"), folder="Support")
    assert dovecot.folder_status(user, "Support").uidvalidity != before
    assert once(box["data"], cfg) == 0
    subjects = sorted(r["subject"] for r in mail_requests(box["data"]))
    assert subjects == ["After the reset"] + [f"Before the reset {i}" for i in range(3)]
    # Disposed of as known (keyword set), so the next session lists nothing at all.
    assert all(KEYWORD in m.flags for m in dovecot.list_messages(user, "Support"))
    assert once(box["data"], cfg) == 0
    assert len(mail_requests(box["data"])) == 4


def test_crash_after_commit_before_disposal_then_rerun_disposes_without_duplicate(
    box: dict[str, Any], dovecot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = box["user"]
    for i in range(4):
        dovecot.deliver(user, message(f"Crash case {i}"))
    cfg = box["config"]("<afterProcessing>move</afterProcessing><moveToFolder>Done</moveToFolder>")

    def crash(self: ImapGateway, *args: object) -> None:
        raise ProtocolError("the connection to the server was lost (simulated, MOVE)")

    with monkeypatch.context() as m:
        m.setattr(ImapGateway, "dispose", crash)
        assert once(box["data"], cfg) == 1
    assert len(mail_requests(box["data"])) == 4
    assert len(dovecot.list_messages(user)) == 4  # committed, not disposed of
    assert once(box["data"], cfg) == 0
    assert len(mail_requests(box["data"])) == 4
    assert len(ledger(box["data"])) == 4
    assert dovecot.list_messages(user) == []
    assert len(dovecot.list_messages(user, "Done")) == 4


def test_wrong_password_is_an_auth_outage(box: dict[str, Any], dovecot: Any) -> None:
    cfg = imap_mailbox(
        box["data"].parent,
        dovecot.imap_port,
        box["user"],
        "not-the-password",
        server=f"<startTls>true</startTls><caFile>{dovecot.certificates.ca_file}</caFile>",
    )
    assert once(box["data"], cfg) == 1
    [outage] = [r for r in requests(box["data"]) if r["kind"] == "outage"]
    assert outage["cause"] == "authentication"
    assert "not-the-password" not in str(outage)


# -------------------------------------------------------------------- faults, fakeimap


@pytest.fixture
def fake_box(tmp_path: Path) -> dict[str, Any]:
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    return {"data": data, "tmp": tmp_path}


def fake_config(fake_box: dict[str, Any], server: FakeIMAPServer, extra: str = "") -> Path:
    return imap_mailbox(fake_box["tmp"], server.port, "box", "secret-pw", server=extra)


def test_without_uidplus_delete_marks_and_never_expunges(fake_box: dict[str, Any]) -> None:
    script = Script(messages=[message("One"), message("Two")], support_uidplus=False)
    with FakeIMAPServer(script) as server:
        server.add_message(message("Someone else's"), flags=["\\Deleted"])
        cfg = fake_config(fake_box, server)
        assert once(fake_box["data"], cfg) == 0
        # Ours are marked, not expunged; the one another client marked \Deleted is still
        # there (a bare EXPUNGE would have removed it), and was processed as mail.
        stored = server.folder("INBOX")
        assert len(stored) == 3
        assert all("\\Deleted" in m.flags for m in stored)
        assert [KEYWORD in m.flags for m in stored] == [True, True, True]
        assert b"EXPUNGE" not in bytes(server.received)
        assert once(fake_box["data"], cfg) == 0
    assert len(mail_requests(fake_box["data"])) == 3


def test_connection_dropped_mid_fetch_loses_and_duplicates_nothing(
    fake_box: dict[str, Any],
) -> None:
    script = Script(
        messages=[message(f"Dropped {i}") for i in range(3)], drop_on_fetch=1, fault_sessions=1
    )
    with FakeIMAPServer(script) as server:
        cfg = fake_config(fake_box, server)
        assert once(fake_box["data"], cfg) == 1
        assert len(server.folder("INBOX")) == 3
        assert mail_requests(fake_box["data"]) == []
        assert once(fake_box["data"], cfg) == 0
        assert server.folder("INBOX") == []
    assert len(mail_requests(fake_box["data"])) == 3
    outages = [r for r in requests(fake_box["data"]) if r["kind"] == "outage"]
    assert [r["status"] for r in outages] == ["processed"]


def test_unavailable_is_a_temporary_outage_then_the_rerun_works(fake_box: dict[str, Any]) -> None:
    script = Script(
        messages=[message("Later")],
        login_response="NO [UNAVAILABLE] Maintenance, try later",
        fault_sessions=1,
    )
    with FakeIMAPServer(script) as server:
        cfg = fake_config(fake_box, server)
        assert once(fake_box["data"], cfg) == 1
        [outage] = [r for r in requests(fake_box["data"]) if r["kind"] == "outage"]
        assert outage["cause"] == "server-temporary"
        assert once(fake_box["data"], cfg) == 0
    assert len(mail_requests(fake_box["data"])) == 1


def test_an_alert_reaches_the_log_scrubbed(
    fake_box: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    script = Script(messages=[message("Alerted")], alert="Mailbox over quota secret-pw")
    with FakeIMAPServer(script) as server:
        cfg = fake_config(fake_box, server)
        assert once(fake_box["data"], cfg) == 0
    err = capfd.readouterr().err
    [alert] = [line for line in err.splitlines() if "ALERT" in line]
    assert "WARNING" in alert and "Mailbox over quota" in alert
    assert "secret-pw" not in err


def test_starttls_missing_fails_closed_before_the_password(fake_box: dict[str, Any]) -> None:
    with FakeIMAPServer(Script(messages=[message("Never read")])) as server:
        cfg = fake_config(fake_box, server, "<startTls>true</startTls>")
        assert once(fake_box["data"], cfg) == 1
        assert b"secret-pw" not in bytes(server.received)
        assert b"LOGIN" not in bytes(server.received).upper()
    [outage] = [r for r in requests(fake_box["data"]) if r["kind"] == "outage"]
    assert outage["cause"] == "tls"


def test_check_lists_folders_uidvalidity_counts_and_capabilities(
    box: dict[str, Any], dovecot: Any
) -> None:
    dovecot.deliver(box["user"], message("Counted"))
    cfg = box["config"]()
    code, out = cli("check", "--config", cfg)
    assert code == 0, out
    validity = dovecot.folder_status(box["user"]).uidvalidity
    assert f"INBOX: 1 message(s), UIDVALIDITY {validity}" in out
    for cap in ("IDLE", "MOVE", "UIDPLUS"):
        assert cap in out
    assert len(dovecot.list_messages(box["user"])) == 1


# ----------------------------------------------------------------------- IDLE, the daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Start `run` over a config folder (a poll interval of 30 s: only a push is fast);
    returns its log file. Killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    files: list[Any] = []

    def start(conf: Path, data: Path, *extra: str) -> Path:
        log = tmp_path / f"daemon-{len(procs)}.log"
        env = dict(os.environ, MAILINTEGRATION_LOGIN=LOGIN, MAILINTEGRATION_PASSWORD=LOGIN_PASSWORD)
        files.append(open(log, "wb"))  # noqa: SIM115 - closed at teardown
        argv = engine_argv(
            "run", "--config-dir", conf, "--data-dir", data, "--poll-interval", "30", *extra
        )
        procs.append(
            subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=files[-1]
            )
        )
        return log

    yield start
    for p in procs:
        p.kill()
        p.wait(10)
    for f in files:
        f.close()


def test_max_idle_zero_turns_push_off(
    fake_box: dict[str, Any], daemon: Callable[..., Path]
) -> None:
    with FakeIMAPServer(Script(messages=[message("Polled only")])) as server:
        conf = fake_box["tmp"] / "conf"
        conf.mkdir()
        fake_config(fake_box, server).rename(conf / "fake.xml")
        daemon(conf, fake_box["data"], "--max-idle", "0")
        wait_for(lambda: _mail_count(fake_box["data"]) == 1, 20, "the first session")
        time.sleep(2)  # time enough for an IDLE connection to open, were there one
        assert b" IDLE\r\n" not in bytes(server.received)
        assert server.sessions == 1


def _mail_count(data: Path) -> int:
    return count_rows(data, "SELECT COUNT(*) FROM requests WHERE kind = 'mail'")


def test_idle_push_fetches_new_mail_long_before_the_poll(
    box: dict[str, Any], dovecot: Any, daemon: Callable[..., Path]
) -> None:
    conf = box["data"].parent / "conf"
    conf.mkdir()
    box["config"]("<idleRenewSeconds>2</idleRenewSeconds>").rename(conf / "support.xml")
    dovecot.deliver(box["user"], message("Before the daemon"))
    log = daemon(conf, box["data"])
    wait_for(lambda: _mail_count(box["data"]) == 1, 20, "the first session")
    # Past one renewal of the IDLE (2 s), well before the next poll (30 s).
    time.sleep(3)
    for i in range(3):
        dovecot.deliver(box["user"], message(f"Pushed {i}"))
        wait_for(lambda i=i: _mail_count(box["data"]) == 2 + i, 10, f"pushed mail {i}")
    text = log.read_text()
    assert "new mail announced (IDLE)" in text
    assert dovecot.list_messages(box["user"]) == []


def test_idle_dropped_without_bye_reconnects_and_still_pushes(
    fake_box: dict[str, Any], daemon: Callable[..., Path]
) -> None:
    script = Script(messages=[message("First")], idle_drop_after=0.5)
    with FakeIMAPServer(script) as server:
        conf = fake_box["tmp"] / "conf"
        conf.mkdir()
        fake_config(fake_box, server).rename(conf / "fake.xml")
        log = daemon(conf, fake_box["data"])
        wait_for(lambda: _mail_count(fake_box["data"]) == 1, 20, "the first session")
        wait_for(lambda: "IDLE failed" in log.read_text(), 10, "the dropped IDLE")
        server.add_message(message("After the drop"))
        wait_for(lambda: _mail_count(fake_box["data"]) == 2, 15, "the mail after the drop")
        assert server.folder("INBOX") == []


def test_without_idle_the_daemon_polls(
    fake_box: dict[str, Any], daemon: Callable[..., Path]
) -> None:
    with FakeIMAPServer(Script(messages=[message("Polled")], support_idle=False)) as server:
        conf = fake_box["tmp"] / "conf"
        conf.mkdir()
        fake_config(fake_box, server).rename(conf / "fake.xml")
        log = daemon(conf, fake_box["data"])
        wait_for(lambda: _mail_count(fake_box["data"]) == 1, 20, "the first session")
        wait_for(lambda: "no IDLE: polling only" in log.read_text(), 10, "the fallback")
        assert b" IDLE\r\n" not in bytes(server.received)


def _gateway_for_fake(tmp_path: Path, server: FakeIMAPServer) -> ImapGateway:
    from engine.config import load_mailbox

    cfg = imap_mailbox(tmp_path, server.port, "box", "secret-pw", name="direct.xml")
    return ImapGateway(load_mailbox(cfg).server)


def test_a_window_keeps_no_more_than_its_grant_and_the_rest_comes_next(tmp_path: Path) -> None:
    raws = [message(f"Grant {i}", body="x" * 5000 + "\n") for i in range(4)]
    with FakeIMAPServer(Script(messages=raws)) as server:
        g = _gateway_for_fake(tmp_path, server)
        g.open()
        try:
            listing = g.listing()
            requests = [Request(m.number, 1 << 20) for m in listing]
            first = g.fetch_many(requests, grant=len(raws[0]) + 10)
            assert [a.data for a in first] == raws[:2]  # over the grant after the second
            assert not g.mid_exchange
            rest = g.fetch_many(requests[2:], grant=1 << 20)
            assert [a.data for a in rest] == raws[2:]
            assert all("\\Seen" not in m.flags for m in server.folder("INBOX"))
        finally:
            g.quit()


def test_a_literal_over_its_cap_is_cut_and_the_session_stays_in_step(tmp_path: Path) -> None:
    big = message("Big", body="y" * 300_000 + "\n")
    with FakeIMAPServer(Script(messages=[big, message("Small")])) as server:
        g = _gateway_for_fake(tmp_path, server)
        g.open()
        try:
            a, b = g.listing()
            got = g.fetch_many([Request(a.number, 1000), Request(b.number, 1 << 20)])
            assert got[0].cut == "size" and got[0].data == big[:1000]
            assert got[0].octets == len(big)
            assert got[1].cut is None and b"Subject: Small" in got[1].data
        finally:
            g.quit()


class Blackhole:
    """A TCP relay to ``target`` that, once ``silence`` is set, stops relaying in both
    directions without closing anything: a server gone without a word (no FIN, no RST)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silence = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.listener.accept()
            upstream = socket.create_connection(self.target, timeout=10)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for _ in range(100_000):
                data = src.recv(65536)
                if not data:
                    return
                if not self.silence.is_set():
                    dst.sendall(data)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


def test_a_server_silent_during_idle_is_found_by_the_keep_alive_deadline(tmp_path: Path) -> None:
    from engine.config import load_mailbox
    from engine.errors import FetchTimeout
    from engine.gateways.imap import IdleWatcher

    with FakeIMAPServer(Script(messages=[message("Old")])) as server:
        relay = Blackhole(server.address)
        try:
            cfg = imap_mailbox(
                tmp_path,
                relay.port,
                "box",
                "secret-pw",
                name="idle.xml",
                server="<idleKeepAliveSeconds>1</idleKeepAliveSeconds>",
            )
            text = cfg.read_text().replace("<timeoutSeconds>5<", "<timeoutSeconds>1<")
            cfg.write_text(text)
            watcher = IdleWatcher(load_mailbox(cfg).server)
            assert watcher.open()
            assert watcher.wait(1.5, None) is None  # quiet: NOOP keep-alives answered
            relay.silence.set()
            started = time.monotonic()
            with pytest.raises(FetchTimeout):
                watcher.wait(60, None)
            # Found within one keep-alive and one timeoutSeconds, not at the 60 s wait's end.
            assert time.monotonic() - started < 10
            watcher.close()
        finally:
            relay.close()


def test_idle_is_renewed_with_a_noop_between_and_a_delivery_ends_the_wait(
    tmp_path: Path,
) -> None:
    from engine.config import load_mailbox
    from engine.gateways.imap import IdleWatcher

    with FakeIMAPServer(Script(messages=[message("Old")])) as server:
        cfg = imap_mailbox(
            tmp_path,
            server.port,
            "box",
            "secret-pw",
            name="renew.xml",
            server="<idleRenewSeconds>1</idleRenewSeconds>",
        )
        watcher = IdleWatcher(load_mailbox(cfg).server)
        try:
            assert watcher.open()
            start = watcher.gateway.uidnext
            assert watcher.wait(2.5, start) is None
            sent = bytes(server.received)
            assert sent.count(b" IDLE\r\n") >= 2 and sent.count(b" NOOP\r\n") >= 2
            threading.Timer(0.5, server.add_message, [message("New")]).start()
            mark = watcher.wait(20, start)
            assert mark is not None and start is not None and mark > start
        finally:
            watcher.close()
        # Mail that came before a wait began (after the last session's listing) ends it at
        # once: the new connection's SELECT shows a UIDNEXT past the one last seen.
        again = IdleWatcher(load_mailbox(cfg).server)
        try:
            assert again.open()
            began = time.monotonic()
            assert again.wait(20, start) == again.gateway.uidnext
            assert time.monotonic() - began < 5  # not the 20 s of the wait
        finally:
            again.close()


def test_a_session_marks_what_it_listed_so_the_push_wakes_only_for_newer_mail(
    box: dict[str, Any], dovecot: Any
) -> None:
    import anyio

    from engine.config import load_mailbox
    from engine.push import PushState
    from engine.session import FetchOptions, SessionResult, run_session
    from engine.supervisor import Engine, EngineSettings

    user = box["user"]
    for i in range(2):
        dovecot.deliver(user, message(f"Marked {i}"))
    cfg = load_mailbox(box["config"]())

    async def one_session() -> SessionResult:
        from engine.store import open_store

        store = await open_store(box["data"])
        engine = Engine(store, EngineSettings(data_dir=box["data"], created_by=LOGIN))
        result = SessionResult()

        async def body(send: Any) -> None:
            await run_session(cfg, send, FetchOptions(), result)

        try:
            await engine._with_writer(body)
        finally:
            await store.close()
        return result

    result = anyio.run(one_session)
    assert result.processed == 2
    assert result.mark == dovecot.folder_status(user).uidnext == 3
    state = PushState("m", mark=2)
    state.learn(result)
    assert state.mark == 3
    state.learn(SessionResult())  # a session that learnt nothing changes nothing
    assert state.mark == 3
