"""The scripted fake POP3 server (tools/fakepop3.py), exercised with the standard poplib."""

from __future__ import annotations

import asyncio
import poplib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
import trustme

from tools.fakepop3 import FakePOP3Server, Script

MESSAGES = [
    b"Subject: one\r\n\r\nfirst body\r\n",
    # Bare LF line ends and lines starting with dots: sent as CRLF, dot-stuffed.
    b"Subject: two\n\n.hidden\n..two\n.\nend\n",
    b"Subject: three\r\n\r\n" + b"x" * 1500 + b"\r\n",  # poplib refuses lines over 2048 bytes
]


def crlf(raw: bytes) -> bytes:
    """What a POP3 server sends for `raw`: every line ended by CRLF."""
    return b"".join(line.removesuffix(b"\r") + b"\r\n" for line in raw.split(b"\n")[:-1])


def joined(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


def words(response: object) -> list[bytes]:
    """The words of a one-line response (typeshed types LIST n as a multi-line one)."""
    assert isinstance(response, bytes)
    return response.split()


def connect(server: FakePOP3Server, *, timeout: float = 5) -> poplib.POP3:
    return poplib.POP3(server.host, server.port, timeout=timeout)


def login(server: FakePOP3Server, *, timeout: float = 5) -> poplib.POP3:
    client = connect(server, timeout=timeout)
    client.user("box")
    client.pass_("secret")
    return client


def read_until(sock: socket.socket, end: bytes, timeout: float = 5) -> bytes:
    """Read from a raw socket until the data ends with `end` (bounded in time)."""
    data = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.5)
    while not data.endswith(end):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {end!r} after {data!r}")
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the server's CA) for 127.0.0.1."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


@pytest.fixture
def server() -> Iterator[FakePOP3Server]:
    with FakePOP3Server(Script(messages=list(MESSAGES))) as srv:
        yield srv


def test_a_complete_session(server: FakePOP3Server) -> None:
    client = connect(server)
    assert client.getwelcome().startswith(b"+OK")
    caps = client.capa()
    assert {"USER", "UIDL", "TOP", "PIPELINING", "RESP-CODES"} <= set(caps)
    assert "STLS" not in caps  # no ssl_context
    client.user("box")
    assert client.pass_("secret").startswith(b"+OK")
    sizes = [len(crlf(raw)) for raw in MESSAGES]
    assert client.stat() == (3, sum(sizes))
    assert client.list()[1] == [f"{n} {size}".encode() for n, size in enumerate(sizes, 1)]
    assert words(client.list(2))[2] == str(sizes[1]).encode()
    assert client.uidl()[1] == [b"1 uid-1", b"2 uid-2", b"3 uid-3"]
    assert client.uidl(3).split()[2] == b"uid-3"
    for number, raw in enumerate(MESSAGES, 1):
        response, lines, _ = client.retr(number)
        assert joined(lines) == crlf(raw)
        assert response.split()[1] == str(len(crlf(raw))).encode()
    assert client.top(1, 0)[1] == [b"Subject: one", b""]
    assert client.noop().startswith(b"+OK")
    client.dele(1)
    with pytest.raises(poplib.error_proto):
        client.retr(1)  # marked deleted
    client.rset()
    assert client.stat()[0] == 3
    client.dele(2)
    assert client.stat()[0] == 2
    assert server.deleted == []  # not before QUIT
    assert client.quit().startswith(b"+OK")
    assert server.deleted == [2]
    assert server.remaining == [1, 3]
    assert server.sessions == 1
    assert server.wait_idle()
    assert b"DELE 2\r\n" in server.received
    assert server.commands[-1] == "QUIT"
    assert server.errors == []


def test_retr_sends_dot_stuffed_crlf_lines(server: FakePOP3Server) -> None:
    with socket.create_connection(server.address, timeout=5) as sock:
        read_until(sock, b"\r\n")
        sock.sendall(b"USER a\r\nPASS b\r\nRETR 2\r\n")
        data = read_until(sock, b"\r\n.\r\n")
    body = data.split(b"octets\r\n", 1)[1]
    assert body == b"Subject: two\r\n\r\n..hidden\r\n...two\r\n..\r\nend\r\n.\r\n"


def test_pipelined_commands_are_answered_in_order(server: FakePOP3Server) -> None:
    with socket.create_connection(server.address, timeout=5) as sock:
        read_until(sock, b"\r\n")
        sock.sendall(b"USER a\r\nPASS b\r\nSTAT\r\nNOOP\r\nQUIT\r\n")
        data = read_until(sock, b"+OK bye\r\n")
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"+OK")  # USER
    assert lines[1] == b"+OK 3 messages"
    assert lines[2].startswith(b"+OK 3 ")
    assert lines[3] == b"+OK"


def test_deletions_need_a_completed_quit_and_persist(server: FakePOP3Server) -> None:
    client = login(server)
    client.dele(1)
    client.close()  # connection dropped without QUIT
    assert server.wait_idle()
    assert server.deleted == []

    client = login(server)
    assert client.stat()[0] == 3
    client.dele(1)
    client.dele(3)
    client.quit()
    assert server.deleted == [1, 3]

    client = login(server)  # the next session no longer sees them
    assert client.stat()[0] == 1
    assert client.uidl()[1] == [b"1 uid-2"]
    assert joined(client.retr(1)[1]) == crlf(MESSAGES[1])
    client.quit()
    assert server.sessions == 3


def test_added_messages_appear_in_the_next_session(server: FakePOP3Server) -> None:
    msg_id = server.add_message(b"Subject: late\r\n\r\nx\r\n", uidl="late-one")
    assert msg_id == 4
    client = login(server)
    assert client.uidl(4).split()[2] == b"late-one"
    client.quit()


def test_uidl_override_with_duplicates() -> None:
    script = Script(messages=list(MESSAGES), uidls=["same", "same", "other"])
    with FakePOP3Server(script) as srv:
        client = login(srv)
        assert client.uidl()[1] == [b"1 same", b"2 same", b"3 other"]
        client.quit()
    with pytest.raises(ValueError):
        FakePOP3Server(Script(messages=list(MESSAGES), uidls=["too", "few"]))


def test_capabilities_without_uidl_and_uidl_refused() -> None:
    script = Script(messages=list(MESSAGES), capabilities=["USER"], support_uidl=False)
    with FakePOP3Server(script) as srv:
        client = login(srv)
        assert client.capa() == {"USER": []}
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client.uidl()
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client.uidl(1)
        client.quit()


def test_without_stls_capability(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    script = Script(messages=list(MESSAGES), ssl_context=server_ctx, capabilities=["USER", "UIDL"])
    with FakePOP3Server(script) as srv:
        client = connect(srv)
        with pytest.raises(poplib.error_proto, match="STLS"):
            client.stls(client_ctx)  # poplib checks CAPA first
        client.quit()
        with socket.create_connection(srv.address, timeout=5) as sock:
            read_until(sock, b"\r\n")
            sock.sendall(b"STLS\r\n")
            assert read_until(sock, b"\r\n").startswith(b"-ERR")


@pytest.mark.parametrize(
    "response",
    [
        "-ERR [IN-USE] mailbox locked",
        "-ERR [SYS/TEMP] try later",
        "-ERR [AUTH] invalid credentials",
    ],
)
def test_auth_response(response: str) -> None:
    with FakePOP3Server(Script(messages=list(MESSAGES), auth_response=response)) as srv:
        client = connect(srv)
        client.user("box")
        with pytest.raises(poplib.error_proto) as caught:
            client.pass_("secret")
        assert caught.value.args[0] == response.encode()
        with pytest.raises(poplib.error_proto):
            client.stat()  # still not authenticated
        client.quit()


def test_fault_sessions_limits_faults_to_the_first_sessions() -> None:
    script = Script(messages=list(MESSAGES), auth_response="-ERR [IN-USE] locked", fault_sessions=1)
    with FakePOP3Server(script) as srv:
        client = connect(srv)
        client.user("box")
        with pytest.raises(poplib.error_proto, match="IN-USE"):
            client.pass_("secret")
        client.quit()
        client = login(srv)  # the retry meets a healthy server
        assert client.stat()[0] == 3
        client.quit()


def test_expected_credentials() -> None:
    with FakePOP3Server(Script(messages=list(MESSAGES), user="box", password="right")) as srv:
        client = connect(srv)
        client.user("box")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong")
        client.user("box")
        client.pass_("right")
        client.quit()


def test_greeting_override() -> None:
    # A raw socket: poplib.POP3() leaks its socket when the greeting is an error.
    with (
        FakePOP3Server(Script(greeting="-ERR [SYS/TEMP] go away")) as srv,
        socket.create_connection(srv.address, timeout=5) as sock,
    ):
        assert read_until(sock, b"\r\n") == b"-ERR [SYS/TEMP] go away\r\n"
    with FakePOP3Server(Script(greeting="+OK custom <1.2@host>")) as srv:
        client = connect(srv)
        assert client.getwelcome() == b"+OK custom <1.2@host>"
        client.quit()


def test_stall_on_retr_keeps_the_connection_open() -> None:
    with FakePOP3Server(Script(messages=list(MESSAGES), stall_on_retr=3)) as srv:
        client = login(srv, timeout=0.5)
        assert joined(client.retr(1)[1]) == crlf(MESSAGES[0])
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.retr(3)
        assert time.monotonic() - started < 3
        assert not srv.wait_idle(0.3)  # server side still holds the session open
        client.close()
        assert srv.wait_idle()
        assert srv.deleted == []
        assert srv.errors == []


def test_stall_sends_part_of_the_message() -> None:
    with (
        FakePOP3Server(Script(messages=list(MESSAGES), stall_on_retr=3)) as srv,
        socket.create_connection(srv.address, timeout=5) as sock,
    ):
        read_until(sock, b"\r\n")
        sock.sendall(b"USER a\r\nPASS b\r\nRETR 3\r\n")
        data, eof = read_until_quiet(sock)
    assert not eof
    _, _, partial = data.partition(b"+OK 3 messages\r\n")
    assert partial.startswith(b"+OK ")
    body = partial.split(b"\r\n", 1)[1]
    assert 0 < len(body) < len(crlf(MESSAGES[2]))
    assert crlf(MESSAGES[2]).startswith(body)


def read_until_quiet(sock: socket.socket, quiet: float = 0.5) -> tuple[bytes, bool]:
    """Read until nothing arrives for `quiet` s; return the data and whether EOF came."""
    data = b""
    sock.settimeout(quiet)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        if not chunk:
            return data, True
        data += chunk
    raise AssertionError("the server never went quiet")


def test_stop_does_not_wait_for_a_stalled_client() -> None:
    srv = FakePOP3Server(Script(messages=list(MESSAGES), stall_on_retr=1)).start()
    client = login(srv, timeout=0.5)
    with pytest.raises(TimeoutError):
        client.retr(1)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 2
    client.close()


def test_drop_after_dele() -> None:
    with FakePOP3Server(Script(messages=list(MESSAGES), drop_after_dele=2)) as srv:
        client = login(srv)
        client.dele(1)
        assert client.dele(2).startswith(b"+OK")  # answered, then the line drops
        with pytest.raises((poplib.error_proto, ConnectionError)):
            client.dele(3)
        client.close()
        assert srv.wait_idle()
        assert srv.deleted == []
        client = login(srv)
        assert client.stat()[0] == 3
        client.quit()


def test_drop_after_quit() -> None:
    with FakePOP3Server(Script(messages=list(MESSAGES), drop_after_quit=True)) as srv:
        client = login(srv)
        client.dele(1)
        with pytest.raises(poplib.error_proto, match="EOF"):
            client.quit()
        client.close()  # poplib does not close when QUIT fails
        assert srv.wait_idle()
        assert srv.deleted == []
        assert srv.remaining == [1, 2, 3]


def test_quit_response_error_applies_nothing() -> None:
    with FakePOP3Server(Script(messages=list(MESSAGES), quit_response="-ERR failed")) as srv:
        client = login(srv)
        client.dele(1)
        with pytest.raises(poplib.error_proto, match="-ERR failed"):
            client.quit()
        client.close()
        assert srv.deleted == []
        assert srv.remaining == [1, 2, 3]


def test_list_size_override() -> None:
    script = Script(messages=list(MESSAGES), list_size_override={2: 5})
    with FakePOP3Server(script) as srv:
        client = login(srv)
        assert words(client.list(2))[2] == b"5"
        assert client.list()[1][1] == b"2 5"
        _, lines, _ = client.retr(2)
        assert joined(lines) == crlf(MESSAGES[1])  # the real bytes, not 5 of them
        client.quit()


def test_raw_retr_override_with_a_bare_lf_terminator() -> None:
    raw = b"+OK 40 octets\r\nSubject: x\r\n\r\nbody\n.\nafter the bare dot\r\n.\r\n"
    with FakePOP3Server(Script(messages=list(MESSAGES), raw_retr_override={1: raw})) as srv:
        with socket.create_connection(srv.address, timeout=5) as sock:
            read_until(sock, b"\r\n")
            sock.sendall(b"USER a\r\nPASS b\r\n")
            read_until(sock, b"messages\r\n")
            sock.sendall(b"RETR 1\r\n")
            assert read_until(sock, b"\r\n.\r\n") == raw  # exactly these bytes
        # poplib takes the bare-LF "." for the end of the message.
        client = login(srv)
        assert client.retr(1)[1] == [b"Subject: x", b"", b"body"]
        client.close()


def test_stls(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    with FakePOP3Server(Script(messages=list(MESSAGES), ssl_context=server_ctx)) as srv:
        client = connect(srv)
        assert "STLS" in client.capa()
        client.stls(client_ctx)
        assert isinstance(client.sock, ssl.SSLSocket)
        client.user("box")
        client.pass_("tls-secret")
        assert joined(client.retr(1)[1]) == crlf(MESSAGES[0])
        client.quit()
        assert srv.wait_idle()
        assert b"STLS\r\n" in srv.received_plain
        assert b"tls-secret" not in srv.received_plain
        assert b"PASS tls-secret\r\n" in srv.received
        assert srv.errors == []


def test_stls_refused_after_login(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = tls
    with (
        FakePOP3Server(Script(messages=list(MESSAGES), ssl_context=server_ctx)) as srv,
        socket.create_connection(srv.address, timeout=5) as sock,
    ):
        read_until(sock, b"\r\n")
        sock.sendall(b"USER a\r\nPASS b\r\nSTLS\r\n")
        data = read_until(sock, b"now\r\n")
        assert data.endswith(b"-ERR command not permitted now\r\n")


def test_implicit_tls(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    script = Script(messages=list(MESSAGES), ssl_context=server_ctx, implicit_tls=True)
    with FakePOP3Server(script) as srv:
        client = poplib.POP3_SSL(srv.host, srv.port, context=client_ctx, timeout=5)
        assert "STLS" not in client.capa()
        client.user("box")
        client.pass_("secret")
        assert joined(client.retr(2)[1]) == crlf(MESSAGES[1])
        client.quit()
        assert srv.wait_idle()
        assert srv.received_plain == b""
        assert b"RETR 2\r\n" in srv.received


def test_implicit_tls_rejected_by_a_verifying_client(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, _ = tls
    script = Script(ssl_context=server_ctx, implicit_tls=True)
    with FakePOP3Server(script) as srv:
        with pytest.raises(ssl.SSLCertVerificationError):
            poplib.POP3_SSL(srv.host, srv.port, context=ssl.create_default_context(), timeout=5)
        assert srv.wait_idle()
        assert any(isinstance(error, ssl.SSLError) for error in srv.errors)


@pytest.mark.asyncio
async def test_usable_from_async_code() -> None:
    async with FakePOP3Server(Script(messages=list(MESSAGES))) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        try:
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"+OK")
            writer.write(b"USER a\r\nPASS b\r\nSTAT\r\nQUIT\r\n")
            await writer.drain()
            answers = [await asyncio.wait_for(reader.readline(), 5) for _ in range(4)]
            assert answers[2].startswith(b"+OK 3 ")
            assert answers[3] == b"+OK bye\r\n"
        finally:
            writer.close()
            await writer.wait_closed()
    assert srv.sessions == 1


def test_raw_byte_and_spaced_uidls_are_sent_as_they_are() -> None:
    script = Script(messages=list(MESSAGES), uidls=[b"id\xff", "abc x", b"abc y"])
    with FakePOP3Server(script) as srv, socket.create_connection(srv.address, timeout=5) as sock:
        read_until(sock, b"\r\n")
        sock.sendall(b"USER a\r\nPASS b\r\nUIDL\r\nUIDL 1\r\n")
        data = read_until(sock, b"+OK 1 id\xff\r\n")
    assert b"+OK\r\n1 id\xff\r\n2 abc x\r\n3 abc y\r\n.\r\n" in data


def test_padding_and_list_size_override_make_a_lying_server() -> None:
    script = Script(messages=list(MESSAGES[:1]), list_size_override={1: 10}, padding={1: 5000})
    with FakePOP3Server(script) as srv:
        client = login(srv)
        assert words(client.list(1))[2] == b"10"
        lines = client.retr(1)[1]
        assert joined(lines[:3]) == crlf(MESSAGES[0])
        assert len(lines) == 3 + 5 and all(line == b"x" * 998 for line in lines[3:])
        client.quit()


def test_endless_retr_and_endless_list_never_end() -> None:
    for fault, command in (({"endless_retr": 1}, b"RETR 1"), ({"endless_list": True}, b"LIST")):
        with (
            FakePOP3Server(Script(messages=list(MESSAGES), **fault)) as srv,
            socket.create_connection(srv.address, timeout=5) as sock,
        ):
            read_until(sock, b"\r\n")
            sock.sendall(b"USER a\r\nPASS b\r\n" + command + b"\r\n")
            sock.settimeout(5)
            got = 0
            while got < 2_000_000:  # far more than any message or listing here
                chunk = sock.recv(65536)
                assert chunk and b"\r\n.\r\n" not in chunk
                got += len(chunk)


def test_trickle_sends_a_byte_per_interval() -> None:
    script = Script(messages=list(MESSAGES), trickle_greeting=True, trickle_interval=0.2)
    with FakePOP3Server(script) as srv, socket.create_connection(srv.address, timeout=5) as sock:
        started = time.monotonic()
        first = sock.recv(100)
        second = sock.recv(100)
        assert (len(first), len(second)) == (1, 1)
        assert first + second == b"+O"
        assert 0.1 < time.monotonic() - started < 2


def test_dele_keeps_says_ok_and_deletes_nothing() -> None:
    with FakePOP3Server(Script(messages=list(MESSAGES), dele_keeps=True)) as srv:
        client = login(srv)
        client.dele(1)
        client.dele(2)
        assert client.quit().startswith(b"+OK")
        assert srv.wait_idle()
        assert srv.deleted == [] and srv.remaining == [1, 2, 3]
