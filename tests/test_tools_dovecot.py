"""The Dovecot launcher (tools/dovecot.py), exercised with the standard library's poplib."""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.dovecot import (
    Dovecot,
    DovecotError,
    make_certificates,
    start_dovecot,
)
from tools.oauthserver import OAuthServer

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


# --------------------------------------------------------------------------- IMAP


def imaps(server: Dovecot, user: tuple[str, str]) -> imaplib.IMAP4_SSL:
    """An IMAPS client that verifies the test CA, logged in."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    client = imaplib.IMAP4_SSL(server.host, server.imaps_port, ssl_context=context, timeout=10)
    client.login(*user)
    return client


def response_code(client: imaplib.IMAP4, name: str) -> bytes:
    """The value of an untagged response code such as UIDVALIDITY, from the last SELECT."""
    _, data = client.response(name)
    assert data and data[0] is not None, f"no {name} in the server's answers"
    value = data[0]
    assert isinstance(value, bytes)
    return value


@pytest.fixture
def imap_user(require_imap: None, pop3_user: tuple[str, str]) -> tuple[str, str]:
    """A fresh mailbox on the session's Dovecot, for IMAP tests (skipped without imapd)."""
    return pop3_user


def test_imaps_select_and_peek_fetch_with_verified_certificate(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    raw = message("imap fetch", "first line\r\n.dot line\r\n")
    dovecot.deliver(imap_user[0], raw)
    client = imaps(dovecot, imap_user)
    try:
        sock = client.socket()
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert client.select("INBOX") == ("OK", [b"1"])
        uidvalidity = int(response_code(client, "UIDVALIDITY"))
        typ, data = client.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK"
        envelope, body = data[0]  # type: ignore[misc]
        assert body == raw
        assert f"RFC822.SIZE {len(raw)}".encode() in envelope
    finally:
        client.logout()
    assert uidvalidity == dovecot.folder_status(imap_user[0]).uidvalidity
    # BODY.PEEK[] leaves the message unread: nothing is marked before the engine commits.
    [stored] = dovecot.list_messages(imap_user[0])
    assert stored.uid == 1
    assert "\\Seen" not in stored.flags
    assert stored.size == len(raw)


@pytest.mark.usefixtures("require_imap")
def test_imaps_certificate_is_checked(dovecot: Dovecot) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(
            dovecot.host, dovecot.imaps_port, ssl_context=ssl.create_default_context(), timeout=10
        )


def test_imap_starttls_with_verified_certificate(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    client = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    try:
        assert "STARTTLS" in client.capabilities
        client.starttls(ssl.create_default_context(cafile=str(dovecot.ca_file)))
        client.login(*imap_user)
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def test_deliver_into_a_folder_and_fetch_it_over_imap(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    user = imap_user[0]
    raw = message("archived")
    dovecot.deliver(user, message("inbox"))
    dovecot.deliver(user, raw, folder="Archive")
    dovecot.deliver(user, message("nested"), folder="Archive.2026")
    assert dovecot.folders(user) == ["INBOX", "Archive", "Archive.2026"]
    assert (dovecot.maildir(user) / ".Archive" / "new").is_dir()
    assert dovecot.count(user) == 1
    assert dovecot.messages(user, "Archive") == [raw]
    client = imaps(dovecot, imap_user)
    try:
        typ, listed = client.list()
        assert typ == "OK"
        names = {line.rsplit(b" ", 1)[-1].strip(b'"') for line in listed if isinstance(line, bytes)}
        assert {b"INBOX", b"Archive", b"Archive.2026"} <= names
        assert client.select("Archive", readonly=True) == ("OK", [b"1"])
        typ, data = client.uid("FETCH", "1", "(BODY.PEEK[])")
        assert data[0][1] == raw  # type: ignore[index]
    finally:
        client.logout()


def test_folder_recreated_with_the_same_mail_gets_a_new_uidvalidity(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    user = imap_user[0]
    raws = [message(f"work {i}") for i in range(3)]
    dovecot.create_folder(user, "Work")
    for raw in raws:
        dovecot.deliver(user, raw, folder="Work")
    before = dovecot.folder_status(user, "Work")
    assert (before.messages, before.uidnext) == (3, 4)

    # What a server migration does: the folder goes away and comes back with the same mail.
    dovecot.rename_folder(user, "Work", "Work-old")
    dovecot.create_folder(user, "Work")
    for raw in raws:
        dovecot.deliver(user, raw, folder="Work")
    after = dovecot.folder_status(user, "Work")
    assert after.messages == 3
    assert after.uidvalidity != before.uidvalidity
    # The renamed folder kept its UIDVALIDITY (Maildir++: the directory moved).
    assert dovecot.folder_status(user, "Work-old").uidvalidity == before.uidvalidity

    client = imaps(dovecot, imap_user)
    try:
        client.select("Work", readonly=True)
        assert int(response_code(client, "UIDVALIDITY")) == after.uidvalidity
    finally:
        client.logout()
    dovecot.delete_folder(user, "Work-old")
    assert dovecot.folders(user) == ["INBOX", "Work"]
    with pytest.raises(ValueError):
        dovecot.create_folder(user, "../escape")
    with pytest.raises(DovecotError):
        dovecot.create_folder(user, "Work")  # exists


def test_set_uidvalidity_of_the_inbox(dovecot: Dovecot, imap_user: tuple[str, str]) -> None:
    user = imap_user[0]
    dovecot.deliver(user, message("kept"))
    old = dovecot.folder_status(user).uidvalidity
    dovecot.set_uidvalidity(user, "INBOX", old + 1000)
    assert dovecot.folder_status(user).uidvalidity == old + 1000
    client = imaps(dovecot, imap_user)
    try:
        client.select("INBOX")
        assert int(response_code(client, "UIDVALIDITY")) == old + 1000
    finally:
        client.logout()


def test_list_messages_shows_what_disposal_left_on_the_server(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    user = imap_user[0]
    for i in range(4):
        dovecot.deliver(user, message(f"dispose {i}"))
    client = imaps(dovecot, imap_user)
    try:
        # imaplib keeps the pre-login list: ask again for the extensions offered now.
        assert {b"UIDPLUS", b"MOVE", b"IDLE"} <= set(client.capability()[1][0].split())  # type: ignore[union-attr]
        client.select("INBOX")
        assert client.uid("STORE", "1", "+FLAGS.SILENT", r"(\Deleted)")[0] == "OK"
        assert client.uid("STORE", "2", "+FLAGS.SILENT", "($MailIntegrationProcessed)")[0] == "OK"
        assert client.uid("STORE", "3", "+FLAGS.SILENT", r"(\Flagged)")[0] == "OK"
        marked = {m.uid: m for m in dovecot.list_messages(user)}
        assert marked[1].deleted
        assert marked[2].flags == {"$MailIntegrationProcessed"}
        assert marked[3].flags == {"\\Flagged"}
        assert not marked[4].flags
        assert client.uid("EXPUNGE", "1")[0] == "OK"
        assert client.uid("MOVE", "4", "Processed")[0] == "NO"  # no such folder yet
        client.create("Processed")
        assert client.uid("MOVE", "4", "Processed")[0] == "OK"
    finally:
        client.logout()
    assert [m.uid for m in dovecot.list_messages(user)] == [2, 3]
    [moved] = dovecot.list_messages(user, "Processed")
    assert moved.uid == 1
    assert dovecot.messages(user, "Processed") == [message("dispose 3")]


@pytest.mark.usefixtures("require_imap")
def test_imap_ports_are_in_the_state_and_closed_by_stop(own_dovecot: Dovecot) -> None:
    assert own_dovecot.imap_port and own_dovecot.imaps_port
    assert len(set(own_dovecot.ports)) == 4
    attached = Dovecot.from_state(own_dovecot.base)
    assert (attached.imap_port, attached.imaps_port) == (
        own_dovecot.imap_port,
        own_dovecot.imaps_port,
    )
    info = own_dovecot.to_json()
    assert info["imap_port"] == own_dovecot.imap_port
    own_dovecot.stop()
    assert all(port_closed(own_dovecot.host, port) for port in own_dovecot.ports)


def test_pop3_only_server_when_imap_is_off(dovecot_dir: Path) -> None:
    server = start_dovecot(dovecot_dir / "pop3only", imap=False)
    try:
        assert server.imap_port == server.imaps_port == 0
        assert "protocols = pop3\n" in server.config_file.read_text()
        server.add_user("solo", "pw")
        login(server, ("solo", "pw")).quit()
    finally:
        server.stop()


# --------------------------------------------------------------------------- OAuth2


def xoauth2(user: str, token: str) -> bytes:
    """The XOAUTH2 initial client response (before base64)."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str, port: int) -> bytes:
    """The OAUTHBEARER (RFC 7628) initial client response (before base64)."""
    return f"n,a={user},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


REFUSED_CHALLENGE = {
    "XOAUTH2": {"status": "401", "schemes": "bearer", "scope": "mail"},
    "OAUTHBEARER": {"status": "invalid_token"},
}


def sasl_response(mechanism: str, user: str, token: str, port: int) -> bytes:
    return xoauth2(user, token) if mechanism == "XOAUTH2" else oauthbearer(user, token, port)


class Line:
    """A line-oriented client on a raw socket: what a SASL exchange looks like on the wire."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=10)
        self.sock: socket.socket = (
            context.wrap_socket(sock, server_hostname=host) if context else sock
        )
        self.buffer = b""

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def read(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed after {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read_until(self, prefix: bytes, limit: int = 20) -> bytes:
        for _ in range(limit):
            line = self.read()
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r}")

    def close(self) -> None:
        self.sock.close()


def sasl_login(
    server: Dovecot, protocol: str, mechanism: str, user: str, token: str
) -> tuple[bool, list[bytes]]:
    """One SASL login over POP3 or IMAP with an initial response; (accepted, lines read).

    A refusal is answered as RFC 7628 says: the server's error challenge gets an empty
    line, then the final answer is read.
    """
    port = server.pop3_port if protocol == "pop3" else server.imap_port
    initial = base64.b64encode(sasl_response(mechanism, user, token, port))
    conn = Line(server.host, port)
    lines = [conn.read()]
    try:
        if protocol == "pop3":
            conn.send(b"AUTH " + mechanism.encode() + b" " + initial)
            lines.append(conn.read())
            if lines[-1].startswith(b"+ "):
                conn.send(b"")
                lines.append(conn.read())
            accepted = lines[-1].startswith(b"+OK")
            conn.send(b"QUIT")
        else:
            conn.send(b"a1 AUTHENTICATE " + mechanism.encode() + b" " + initial)
            lines.append(conn.read())
            if lines[-1].startswith(b"+ "):
                conn.send(b"")
                lines.append(conn.read_until(b"a1 "))
            elif not lines[-1].startswith(b"a1 "):
                lines.append(conn.read_until(b"a1 "))
            accepted = lines[-1].startswith(b"a1 OK")
            conn.send(b"a2 LOGOUT")
    finally:
        conn.close()
    return accepted, lines


@pytest.fixture
def oauth_user(oauth_dovecot: Dovecot, oauth_server: OAuthServer) -> tuple[str, str]:
    """(mailbox, client id): a mailbox on `oauth_dovecot` and an app whose tokens act for it."""
    name = f"oauth-{uuid.uuid4().hex[:10]}"
    oauth_dovecot.add_user(name, secrets.token_urlsafe(12))
    oauth_server.add_client(f"app-{name}", "client-secret", scopes=["mail"], username=name)
    return name, f"app-{name}"


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_oauth2_good_token_accepted_bad_token_refused(
    oauth_dovecot: Dovecot,
    oauth_server: OAuthServer,
    oauth_user: tuple[str, str],
    protocol: str,
    mechanism: str,
) -> None:
    user, client_id = oauth_user
    token = oauth_server.issue_tokens(client_id, user, ["mail"]).access_token
    accepted, lines = sasl_login(oauth_dovecot, protocol, mechanism, user, token)
    assert accepted, lines
    refused, lines = sasl_login(oauth_dovecot, protocol, mechanism, user, "not-a-token")
    assert not refused
    # The refused exchange (RFC 7628 3.2.2): an error challenge, an empty reply, a failure.
    # Dovecot 2.3.19's challenges differ by mechanism, not by cause.
    challenge = json.loads(base64.b64decode(lines[1].removeprefix(b"+ ")))
    assert challenge == REFUSED_CHALLENGE[mechanism]
    if protocol == "pop3":
        assert lines[2] == b"-ERR [AUTH] Authentication failed."
    else:
        assert lines[2] == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed."
    reasons = [r.reason for r in oauth_server.introspections[-2:]]
    assert reasons == ["ok", "unknown"]


def test_oauth2_login_with_imaplib_over_imaps(
    oauth_dovecot: Dovecot, oauth_server: OAuthServer, oauth_user: tuple[str, str]
) -> None:
    user, client_id = oauth_user
    raw = message("oauth imap")
    oauth_dovecot.deliver(user, raw)
    token = oauth_server.issue_tokens(client_id, user, ["mail"]).access_token
    # The OAuth server's HTTPS and Dovecot's IMAPS share one CA.
    assert oauth_server.ca_file == oauth_dovecot.ca_file
    context = ssl.create_default_context(cafile=str(oauth_dovecot.ca_file))
    client = imaplib.IMAP4_SSL(
        oauth_dovecot.host, oauth_dovecot.imaps_port, ssl_context=context, timeout=10
    )
    try:
        assert {"AUTH=XOAUTH2", "AUTH=OAUTHBEARER"} <= set(client.capabilities)
        typ, _ = client.authenticate("XOAUTH2", lambda _challenge: xoauth2(user, token))
        assert typ == "OK"
        client.select("INBOX")
        assert client.uid("FETCH", "1", "(BODY.PEEK[])")[1][0][1] == raw  # type: ignore[index]
    finally:
        client.logout()


def test_oauth2_expired_revoked_and_password_logins(
    oauth_dovecot: Dovecot, oauth_server: OAuthServer, oauth_user: tuple[str, str]
) -> None:
    user, client_id = oauth_user
    lifetime = oauth_server.access_token_lifetime
    oauth_server.access_token_lifetime = 1
    try:
        short = oauth_server.issue_tokens(client_id, user, ["mail"]).access_token
    finally:
        oauth_server.access_token_lifetime = lifetime
    assert sasl_login(oauth_dovecot, "imap", "XOAUTH2", user, short)[0]
    time.sleep(1.2)
    assert not sasl_login(oauth_dovecot, "imap", "XOAUTH2", user, short)[0]
    assert oauth_server.introspections[-1].reason == "expired"

    pair = oauth_server.issue_tokens(client_id, user, ["mail"])
    assert sasl_login(oauth_dovecot, "pop3", "OAUTHBEARER", user, pair.access_token)[0]
    assert pair.refresh_token is not None
    oauth_server.revoke(pair.refresh_token)  # takes its access token with it
    assert not sasl_login(oauth_dovecot, "pop3", "OAUTHBEARER", user, pair.access_token)[0]
    assert oauth_server.introspections[-1].reason == "revoked"

    # The password passdb stays for the password tests.
    password = oauth_dovecot.users()[user]
    login(oauth_dovecot, (user, password)).quit()


def test_oauth2_token_of_another_mailbox_is_refused(
    oauth_dovecot: Dovecot, oauth_server: OAuthServer, oauth_user: tuple[str, str]
) -> None:
    user, client_id = oauth_user
    token = oauth_server.issue_tokens(client_id, "someone-else", ["mail"]).access_token
    assert not sasl_login(oauth_dovecot, "imap", "XOAUTH2", user, token)[0]


@pytest.mark.parametrize("offered", ["xoauth2", "oauthbearer"])
@pytest.mark.usefixtures("require_imap")
def test_server_offering_only_one_oauth2_mechanism(dovecot_dir: Path, offered: str) -> None:
    with OAuthServer() as oauth:
        server = start_dovecot(
            dovecot_dir / offered,
            oauth2_introspection_url=oauth.introspection_url,
            oauth2_mechanisms=(offered,),
        )
        try:
            server.add_user("one", "pw")
            oauth.add_client("app", "secret", scopes=["mail"], username="one")
            token = oauth.issue_tokens("app", "one", ["mail"]).access_token
            pop = poplib.POP3(server.host, server.pop3_port, timeout=10)
            sasl = pop.capa()["SASL"]
            pop.quit()
            assert sorted(sasl) == sorted(["PLAIN", "LOGIN", offered.upper()])
            imap = imaplib.IMAP4(server.host, server.imap_port, timeout=10)
            auths = {c for c in imap.capabilities if c.startswith("AUTH=")}
            imap.logout()
            assert auths == {"AUTH=PLAIN", "AUTH=LOGIN", f"AUTH={offered.upper()}"}
            other = "OAUTHBEARER" if offered == "xoauth2" else "XOAUTH2"
            for protocol in ("pop3", "imap"):
                assert sasl_login(server, protocol, offered.upper(), "one", token)[0]
                accepted, lines = sasl_login(server, protocol, other, "one", token)
                assert not accepted
                assert b"+ " not in lines[1][:2]  # refused at once: mechanism unknown
        finally:
            server.stop()


@pytest.mark.usefixtures("require_imap")
def test_token_without_the_required_scope_is_refused(dovecot_dir: Path) -> None:
    with OAuthServer() as oauth:
        server = start_dovecot(
            dovecot_dir / "scoped",
            oauth2_introspection_url=oauth.introspection_url,
            oauth2_scope="mail",
        )
        try:
            server.add_user("scoped", "pw")
            oauth.add_client("app", "secret", scopes=["mail", "calendar"], username="scoped")
            good = oauth.issue_tokens("app", "scoped", ["mail"]).access_token
            wrong = oauth.issue_tokens("app", "scoped", ["calendar"]).access_token
            for mechanism in ("XOAUTH2", "OAUTHBEARER"):
                assert sasl_login(server, "imap", mechanism, "scoped", good)[0]
                accepted, lines = sasl_login(server, "imap", mechanism, "scoped", wrong)
                assert not accepted
                # The same challenge as for an inactive token: a client cannot tell the
                # causes apart from Dovecot's answer, only the server's records can.
                challenge = json.loads(base64.b64decode(lines[1][2:]))
                assert challenge == REFUSED_CHALLENGE[mechanism]
                assert oauth.introspections[-1].reason == "ok"  # active, but not for mail
            assert "Token is not valid for scope 'mail'" in server.log_tail(20)
        finally:
            server.stop()
    # The authorization server can refuse it itself, too.
    with OAuthServer(introspection_scope="mail") as oauth:
        oauth.add_client("app", "secret", scopes=["mail", "calendar"], username="x")
        wrong = oauth.issue_tokens("app", "x", ["calendar"]).access_token
        assert oauth._introspect(wrong) is None
        assert oauth.introspections[-1].reason == "insufficient_scope"
