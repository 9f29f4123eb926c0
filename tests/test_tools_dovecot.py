"""The Dovecot launcher (tools/dovecot.py), exercised with the standard library's poplib."""

from __future__ import annotations

import json
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.dovecot import (
    Dovecot,
    DovecotError,
    make_certificates,
    start_dovecot,
)

pytestmark = pytest.mark.dovecot

ROOT = Path(__file__).resolve().parent.parent


def message(subject: str, body: str = "Hello.") -> bytes:
    """A small CRLF message (Dovecot sends stored LF line ends as CRLF)."""
    return (
        f"From: sender@example.com\r\nTo: box@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\n{body}\r\n"
    ).encode()


def login(server: Dovecot, user: tuple[str, str]) -> poplib.POP3:
    client = poplib.POP3(server.host, server.pop3_port, timeout=10)
    client.user(user[0])
    client.pass_(user[1])
    return client


def joined(lines: list[bytes]) -> bytes:
    """Reassemble what poplib returns from RETR (lines without CRLF, dots unstuffed)."""
    return b"".join(line + b"\r\n" for line in lines)


def uidls(client: poplib.POP3) -> list[bytes]:
    return [row.split()[1] for row in client.uidl()[1]]


def port_closed(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except OSError:
        return True


@pytest.fixture
def own_dovecot(dovecot_dir: Path) -> Iterator[Dovecot]:
    """A Dovecot of this test's own, for tests that stop or restart it."""
    server = start_dovecot(dovecot_dir / "dc")
    yield server
    server.stop()


def test_login_capabilities_and_empty_mailbox(dovecot: Dovecot, pop3_user: tuple[str, str]) -> None:
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        assert client.getwelcome().startswith(b"+OK")
        caps = client.capa()
        for cap in ("USER", "UIDL", "STLS", "PIPELINING", "RESP-CODES"):
            assert cap in caps
        client.user(pop3_user[0])
        assert client.pass_(pop3_user[1]).startswith(b"+OK")
        assert client.stat() == (0, 0)
    finally:
        client.quit()


def test_wrong_password_is_refused_without_delay(
    dovecot: Dovecot, pop3_user: tuple[str, str]
) -> None:
    started = time.monotonic()
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    client.user(pop3_user[0])
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("not-the-password")
    client.close()
    # auth_failure_delay = 0: the next login from 127.0.0.1 is not held back 2-15 s.
    login(dovecot, pop3_user).quit()
    assert time.monotonic() - started < 2


def test_retr_returns_the_delivered_bytes(dovecot: Dovecot, pop3_user: tuple[str, str]) -> None:
    user = pop3_user[0]
    raws = [
        message("first"),
        message("dots", ".leading dot\r\n..two dots\r\n.\r\nend"),
        message("long", "x" * 1000 + "\r\n" + "line\r\n" * 500),
    ]
    names = [dovecot.deliver(user, raw) for raw in raws]
    assert len(set(names)) == 3
    assert dovecot.count(user) == 3
    assert dovecot.messages(user) == raws

    client = login(dovecot, pop3_user)
    try:
        assert client.stat()[0] == 3
        for number, raw in enumerate(raws, 1):
            response, lines, _octets = client.retr(number)
            assert response.startswith(b"+OK")
            assert joined(lines) == raw
            sizes = dict(row.split() for row in client.list()[1])
            assert int(sizes[str(number).encode()]) == len(raw)
    finally:
        client.quit()
    # RETR moves the files from new/ to cur/; count and messages see both.
    assert dovecot.count(user) == 3
    assert dovecot.messages(user) == raws


def test_uidl_is_stable_across_sessions(dovecot: Dovecot, pop3_user: tuple[str, str]) -> None:
    user = pop3_user[0]
    for i in range(3):
        dovecot.deliver(user, message(f"m{i}"))
    client = login(dovecot, pop3_user)
    first = uidls(client)
    client.quit()
    assert len(set(first)) == 3
    # pop3_uidl_format = %08Xu%08Xv: UID then UIDVALIDITY, 8 hex digits each (Dovecot
    # writes %X in lower case).
    assert all(re.fullmatch(rb"[0-9a-f]{16}", uid) for uid in first)

    dovecot.deliver(user, message("m3"))
    client = login(dovecot, pop3_user)
    second = uidls(client)
    client.quit()
    assert second[:3] == first
    assert second[3] not in first


def test_dele_and_quit_empty_the_mailbox(dovecot: Dovecot, pop3_user: tuple[str, str]) -> None:
    user = pop3_user[0]
    for i in range(3):
        dovecot.deliver(user, message(f"m{i}"))
    client = login(dovecot, pop3_user)
    for number in (1, 2, 3):
        client.dele(number)
    assert client.quit().startswith(b"+OK")
    assert dovecot.count(user) == 0
    client = login(dovecot, pop3_user)
    assert client.stat() == (0, 0)
    client.quit()


def test_deletions_without_quit_are_not_applied(
    dovecot: Dovecot, pop3_user: tuple[str, str]
) -> None:
    user = pop3_user[0]
    dovecot.deliver(user, message("kept"))
    client = login(dovecot, pop3_user)
    client.dele(1)
    client.close()  # no QUIT: RFC 1939 says the deletion must not happen
    client = login(dovecot, pop3_user)
    assert client.stat()[0] == 1
    client.quit()
    assert dovecot.count(user) == 1


def test_file_names_are_never_reused(dovecot: Dovecot, pop3_user: tuple[str, str]) -> None:
    user = pop3_user[0]
    first = {dovecot.deliver(user, message(f"a{i}")) for i in range(50)}
    client = login(dovecot, pop3_user)
    for number in range(1, 51):
        client.dele(number)
    client.quit()
    second = {dovecot.deliver(user, message(f"b{i}")) for i in range(50)}
    assert len(first) == len(second) == 50
    assert not first & second
    # Had a name come back, Dovecot would hide the message ("Expunged message reappeared").
    client = login(dovecot, pop3_user)
    assert client.stat()[0] == 50
    client.quit()


def test_pop3s_with_verified_certificate(dovecot: Dovecot, pop3_user: tuple[str, str]) -> None:
    dovecot.deliver(pop3_user[0], message("tls"))
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    client = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=context, timeout=10)
    try:
        client.user(pop3_user[0])
        client.pass_(pop3_user[1])
        assert joined(client.retr(1)[1]) == message("tls")
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        client.quit()


def test_pop3s_certificate_is_checked(dovecot: Dovecot) -> None:
    # Without our CA the default context must refuse the server: proves verification
    # really happens in the test above.
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(
            dovecot.host, dovecot.pop3s_port, context=ssl.create_default_context(), timeout=10
        )


def test_stls_with_verified_certificate(dovecot: Dovecot, pop3_user: tuple[str, str]) -> None:
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    for host in ("127.0.0.1", "localhost"):
        client = poplib.POP3(host, dovecot.pop3_port, timeout=10)
        try:
            client.stls(context)
            client.user(pop3_user[0])
            client.pass_(pop3_user[1])
            assert client.stat() == (0, 0)
            assert isinstance(client.sock, ssl.SSLSocket)
        finally:
            client.quit()


def test_new_users_can_log_in_at_once(dovecot: Dovecot) -> None:
    # Dovecot stats a passwd-file at most once per second: users added right after a
    # lookup must still be visible to the very next login.
    stop = threading.Event()
    background = ("background-user", "background-pw")
    dovecot.add_user(*background)

    def keep_auth_busy() -> None:
        while not stop.is_set():
            login(dovecot, background).quit()

    thread = threading.Thread(target=keep_auth_busy, daemon=True)
    thread.start()
    try:
        for i in range(20):
            user = (f"burst-{i}-{time.monotonic_ns()}", f"pw{i}")
            dovecot.add_user(*user)
            login(dovecot, user).quit()
    finally:
        stop.set()
        thread.join(10)


def test_set_password_takes_effect_at_once(dovecot: Dovecot, pop3_user: tuple[str, str]) -> None:
    name, old = pop3_user
    login(dovecot, pop3_user).quit()
    new = old[::-1] + "x" if old[::-1] == old else old[::-1]  # same length, other value
    dovecot.set_password(name, new)
    login(dovecot, (name, new)).quit()
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    client.user(name)
    with pytest.raises(poplib.error_proto):
        client.pass_(old)
    client.close()
    with pytest.raises(KeyError):
        dovecot.set_password("nobody-here", "x")


def test_add_user_is_idempotent_and_updates(dovecot: Dovecot) -> None:
    name = f"idem-{time.monotonic_ns()}"
    dovecot.add_user(name, "one")
    dovecot.deliver(name, message("keep me"))
    dovecot.add_user(name, "one")
    dovecot.add_user(name, "two")
    assert dovecot.users()[name] == "two"
    assert dovecot.count(name) == 1
    login(dovecot, (name, "two")).quit()
    with pytest.raises(ValueError):
        dovecot.add_user("bad:name", "x")
    with pytest.raises(ValueError):
        dovecot.add_user("fine", "bad:password")
    with pytest.raises(KeyError):
        dovecot.count("never-added")


def test_many_concurrent_sessions_for_one_user(
    dovecot: Dovecot, pop3_user: tuple[str, str]
) -> None:
    # Above Dovecot's default mail_max_userip_connections (10).
    dovecot.deliver(pop3_user[0], message("shared"))
    clients: list[poplib.POP3] = []
    try:
        clients += (login(dovecot, pop3_user) for _ in range(25))
        assert all(client.stat()[0] == 1 for client in clients)
        for client in clients:
            assert client.quit().startswith(b"+OK")
    finally:
        for client in clients:
            client.close()


def test_restart_in_the_same_directory_keeps_mail(own_dovecot: Dovecot) -> None:
    user = ("keeper", "pw")
    own_dovecot.add_user(*user)
    own_dovecot.deliver(user[0], message("persist"))
    client = login(own_dovecot, user)
    before = uidls(client)
    client.quit()
    own_dovecot.stop()
    assert port_closed(own_dovecot.host, own_dovecot.pop3_port)
    assert port_closed(own_dovecot.host, own_dovecot.pop3s_port)
    own_dovecot.stop()  # idempotent

    again = start_dovecot(own_dovecot.base)
    try:
        assert again.ca_file == own_dovecot.ca_file
        client = login(again, user)
        assert uidls(client) == before
        assert joined(client.retr(1)[1]) == message("persist")
        client.quit()
    finally:
        again.stop()


def test_cli_start_add_user_deliver_stop(dovecot_dir: Path) -> None:
    base = dovecot_dir / "cli"

    def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        # capture_output: would hang if the daemon kept our stdout open.
        return subprocess.run(
            [sys.executable, "-m", "tools.dovecot", *args],
            input=stdin,
            capture_output=True,
            cwd=ROOT,
            timeout=60,
            check=True,
        )

    info = json.loads(cli("start", str(base)).stdout)
    try:
        assert info["host"] == "127.0.0.1"
        assert Path(info["ca_file"]).is_file()
        cli("add-user", str(base), "cliuser", "clipw")
        name = cli("deliver", str(base), "cliuser", "-", stdin=message("cli")).stdout.strip()
        assert name
        assert cli("count", str(base), "cliuser").stdout.strip() == b"1"
        context = ssl.create_default_context(cafile=info["ca_file"])
        client = poplib.POP3_SSL(info["host"], info["pop3s_port"], context=context, timeout=10)
        client.user("cliuser")
        client.pass_("clipw")
        assert joined(client.retr(1)[1]) == message("cli")
        client.quit()
    finally:
        cli("stop", str(base))
    assert port_closed(info["host"], info["pop3_port"])
    assert port_closed(info["host"], info["pop3s_port"])
    assert Dovecot.from_state(base).pid() is None


def test_start_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    false = shutil.which("false")
    assert false is not None
    monkeypatch.setenv("DOVECOT_BINARY", false)
    started = time.monotonic()
    with pytest.raises(DovecotError, match="exited with status 1"):
        start_dovecot(tmp_path / "broken")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("method", ["trustme", "openssl"])
def test_certificates_verify_for_localhost_and_loopback(tmp_path: Path, method: str) -> None:
    if method == "openssl" and shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = make_certificates(tmp_path, method=method)  # type: ignore[arg-type]
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert_file, certs.key_file)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    for name in ("localhost", "127.0.0.1", "::1"):
        handshake_in_memory(server_ctx, client_ctx, name)


def handshake_in_memory(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> None:
    """A complete TLS handshake through memory buffers; raises if verification fails."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not complete")
