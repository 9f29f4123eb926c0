"""The scripted fake IMAP server (tools/fakeimap.py), driven by imaplib and IMAPClient."""

from __future__ import annotations

import base64
import imaplib
import socket
import ssl
import time
from collections.abc import Iterator

import imapclient  # type: ignore[import-untyped]
import pytest
import trustme

from tools.fakeimap import FakeIMAPServer, Script

MESSAGES = [
    b"Subject: one\r\nMessage-ID: <one@example.com>\r\n\r\nfirst body\r\n",
    b"Subject: two\n\nbare LF lines\n.leading dot\n",  # sent with CRLF
    b"Subject: three\r\n\r\n" + b"x" * 5000 + b"\r\n",
]


def crlf(raw: bytes) -> bytes:
    return b"".join(line.removesuffix(b"\r") + b"\r\n" for line in raw.split(b"\n")[:-1])


def login(server: FakeIMAPServer, *, timeout: float = 5) -> imaplib.IMAP4:
    client = imaplib.IMAP4(server.host, server.port, timeout=timeout)
    client.login("box", "secret")
    return client


def fetched(data: list[object]) -> dict[int, tuple[bytes, bytes]]:
    """UID -> (envelope line, body) from an imaplib UID FETCH answer with bodies."""
    result = {}
    for item in data:
        if isinstance(item, tuple):
            envelope, body = item
            uid = int(envelope.split(b"UID ", 1)[1].split()[0])
            result[uid] = (envelope, body)
    return result


class Line:
    """A raw line client, for what imaplib cannot show (IDLE, silent drops, literals)."""

    def __init__(self, server: FakeIMAPServer, timeout: float = 5) -> None:
        self.sock = socket.create_connection(server.address, timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def close(self) -> None:
        self.sock.close()


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
def server() -> Iterator[FakeIMAPServer]:
    with FakeIMAPServer(Script(messages=list(MESSAGES))) as fake:
        yield fake
    assert fake.errors == []


def test_select_search_and_peek_fetch_with_imaplib(server: FakeIMAPServer) -> None:
    client = login(server)
    try:
        assert {"UIDPLUS", "MOVE", "IDLE", "AUTH=XOAUTH2"} <= set(client.capabilities)
        assert client.select("INBOX") == ("OK", [b"3"])
        assert client.response("UIDVALIDITY") == ("UIDVALIDITY", [b"1000"])
        assert client.uid("SEARCH", "ALL") == ("OK", [b"1 2 3"])
        typ, data = client.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK"
        bodies = fetched(data)
        assert {uid: body for uid, (_, body) in bodies.items()} == {
            i: crlf(raw) for i, raw in enumerate(MESSAGES, 1)
        }
        assert f"RFC822.SIZE {len(crlf(MESSAGES[1]))}".encode() in bodies[2][0]
        assert all("\\Seen" not in m.flags for m in server.folder())  # PEEK marks nothing
        client.uid("FETCH", "2", "(BODY[])")
        assert [sorted(m.flags) for m in server.folder()] == [[], ["\\Seen"], []]
        assert client.uid("SEARCH", "UNSEEN") == ("OK", [b"1 3"])
        assert client.uid("FETCH", "1:4294967295", "(UID)")[0] == "OK"  # a huge UID range
        client.close()
    finally:
        client.logout()


def test_store_uid_expunge_and_expunge(server: FakeIMAPServer) -> None:
    client = login(server)
    try:
        client.select("INBOX")
        client.uid("STORE", "1,2", "+FLAGS.SILENT", r"(\Deleted)")
        client.uid("STORE", "3", "+FLAGS", "($MailIntegrationProcessed)")
        assert client.uid("SEARCH", "UNKEYWORD", "$MailIntegrationProcessed") == ("OK", [b"1 2"])
        # UID EXPUNGE removes only the UIDs named, never another client's \Deleted mail.
        typ, data = client.uid("EXPUNGE", "2")
        assert typ == "OK"
        assert [m.uid for m in server.folder()] == [1, 3]
        typ, data = client.expunge()
        # imaplib collects every "* n EXPUNGE": UID 2 left as number 2, then UID 1 as 1.
        assert (typ, data) == ("OK", [b"2", b"1"])
    finally:
        client.logout()
    assert server.expunged == [("INBOX", 2), ("INBOX", 1)]
    [kept] = server.folder()
    assert (kept.uid, kept.flags) == (3, {"$MailIntegrationProcessed"})


def test_move_and_copy_answer_copyuid(server: FakeIMAPServer) -> None:
    client = login(server)
    try:
        client.select("INBOX")
        typ, data = client.uid("MOVE", "1", "Archive")
        assert typ == "NO" and b"[TRYCREATE]" in data[0]
        assert client.create("Archive")[0] == "OK"
        assert client.uid("MOVE", "1", "Archive")[0] == "OK"
        assert client.response("COPYUID") == ("COPYUID", [b"1001 1 1"])
        assert client.uid("COPY", "2", "Archive")[0] == "OK"
        assert client.response("COPYUID") == ("COPYUID", [b"1001 2 2"])  # tagged OK's code
        assert client.status("Archive", "(MESSAGES UIDNEXT)") == (
            "OK",
            [b'"Archive" (MESSAGES 2 UIDNEXT 3)'],
        )
    finally:
        client.logout()
    assert [m.uid for m in server.folder("INBOX")] == [2, 3]
    assert [m.raw for m in server.folder("Archive")] == MESSAGES[:2]


def test_server_without_uidplus_move_and_idle() -> None:
    script = Script(
        messages=list(MESSAGES), support_uidplus=False, support_move=False, support_idle=False
    )
    with FakeIMAPServer(script) as server:
        client = login(server)
        try:
            assert not {"UIDPLUS", "MOVE", "IDLE"} & set(client.capabilities)
            client.select("INBOX")
            client.uid("STORE", "1", "+FLAGS.SILENT", r"(\Deleted)")
            for command in (("EXPUNGE", "1"), ("MOVE", "1", "INBOX")):
                with pytest.raises(imaplib.IMAP4.error, match="not supported"):
                    client.uid(*command)
            client.create("Archive")
            assert client.uid("COPY", "2", "Archive")[0] == "OK"
            assert client.response("COPYUID") == ("COPYUID", [None])
            tag = client._new_tag()  # IDLE by hand: imaplib 3.11 has no idle()
            client.send(tag + b" IDLE\r\n")
            assert client._get_line().endswith(b"BAD Command unknown or not supported")
        finally:
            client.logout()
        assert [m.uid for m in server.folder()] == [1, 2, 3]  # nothing expunged


def test_idle_pushes_new_mail_with_imapclient(server: FakeIMAPServer) -> None:
    client = imapclient.IMAPClient(server.host, port=server.port, ssl=False, timeout=5)
    try:
        client.login("box", "secret")
        client.select_folder("INBOX")
        client.idle()
        assert client.idle_check(timeout=0.2) == []
        started = time.monotonic()
        uid = server.add_message(b"Subject: pushed\r\n\r\nnew\r\n")
        assert client.idle_check(timeout=5) == [(4, b"EXISTS")]
        assert time.monotonic() - started < 1
        client.idle_done()
        assert client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"].startswith(b"Subject: pushed")
    finally:
        client.logout()


def test_idle_dropped_without_bye() -> None:
    with FakeIMAPServer(Script(messages=list(MESSAGES), idle_drop_after=0.3)) as server:
        line = Line(server)
        try:
            line.read()  # greeting
            line.send(b"a LOGIN box secret\r\na2 SELECT INBOX\r\na3 IDLE\r\n")
            while not line.read().startswith(b"a2 OK"):
                pass
            assert line.read() == b"+ idling"
            started = time.monotonic()
            with pytest.raises(EOFError) as closed:
                line.read()
            assert 0.2 < time.monotonic() - started < 3
            assert closed.value.args[0] == b""  # no BYE, no answer at all
        finally:
            line.close()
        server.wait_idle()
        assert b"BYE" not in bytes(server.received)


def test_unavailable_answers_and_alert() -> None:
    script = Script(login_response="NO [UNAVAILABLE] Backend down", fault_sessions=1)
    with FakeIMAPServer(script) as server:
        client = imaplib.IMAP4(server.host, server.port, timeout=5)
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\] Backend down"):
            client.login("box", "secret")
        client.shutdown()
        login(server).logout()  # the second session is healthy

    with FakeIMAPServer(Script(select_response="NO [UNAVAILABLE] Try later")) as server:
        client = login(server)
        typ, data = client.select("INBOX")
        assert (typ, data) == ("NO", [b"[UNAVAILABLE] Try later"])
        client.logout()

    bye = Script(greeting="* BYE [UNAVAILABLE] Server restarting")
    with FakeIMAPServer(bye) as server, pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        imaplib.IMAP4(server.host, server.port, timeout=5)

    with FakeIMAPServer(Script(alert="Your mailbox is almost full")) as server:
        client = login(server)
        try:
            # imaplib keeps the code (no data inside the brackets); the text is the line's.
            assert client.response("ALERT") == ("ALERT", [b""])
            assert b"[ALERT] Your mailbox is almost full" in client.untagged_responses["OK"]
        finally:
            client.logout()


def test_stall_mid_fetch_is_bounded_by_the_client_timeout() -> None:
    with FakeIMAPServer(Script(messages=list(MESSAGES), stall_on_fetch=3)) as server:
        client = login(server, timeout=0.5)
        client.select("INBOX")
        assert client.uid("FETCH", "1", "(BODY.PEEK[])")[0] == "OK"
        started = time.monotonic()
        with pytest.raises((TimeoutError, imaplib.IMAP4.abort)):
            client.uid("FETCH", "3", "(BODY.PEEK[])")
        assert time.monotonic() - started < 3
        client.shutdown()
        stopped = time.monotonic()
    assert time.monotonic() - stopped < 3  # stop() ends the stalled session


def test_connection_dropped_mid_fetch() -> None:
    with FakeIMAPServer(Script(messages=list(MESSAGES), drop_on_fetch=2)) as server:
        client = login(server)
        client.select("INBOX")
        with pytest.raises(imaplib.IMAP4.abort):
            client.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
        client.shutdown()
        assert server.wait_idle()
        assert [m.uid for m in server.folder()] == [1, 2, 3]


def test_uidvalidity_changes_between_sessions() -> None:
    with FakeIMAPServer(Script(messages=list(MESSAGES), uidvalidity_changes={2: 2000})) as server:
        client = login(server)
        client.select("INBOX")
        client.uid("STORE", "1", "+FLAGS.SILENT", r"(\Deleted)")
        client.expunge()
        assert client.response("UIDVALIDITY") == ("UIDVALIDITY", [b"1000"])
        client.logout()
        assert [m.uid for m in server.folder()] == [2, 3]
        client = login(server)
        client.select("INBOX")
        assert client.response("UIDVALIDITY") == ("UIDVALIDITY", [b"2000"])
        # The rebuilt folder numbers its messages from 1 again.
        assert client.uid("SEARCH", "ALL") == ("OK", [b"1 2"])
        bodies = fetched(client.uid("FETCH", "1", "(UID BODY.PEEK[])")[1])
        assert bodies[1][1] == crlf(MESSAGES[1])
        client.logout()


def test_oauth2_logins_and_the_refused_exchange() -> None:
    with FakeIMAPServer(Script(user="box", tokens={"good-token"})) as server:
        client = imaplib.IMAP4(server.host, server.port, timeout=5)
        xoauth2 = b"user=box\x01auth=Bearer good-token\x01\x01"
        assert client.authenticate("XOAUTH2", lambda _: xoauth2)[0] == "OK"
        client.logout()

        line = Line(server)
        try:
            line.read()
            bearer = b"n,a=box,\x01host=127.0.0.1\x01port=1\x01auth=Bearer bad-token\x01\x01"
            line.send(b"a1 AUTHENTICATE OAUTHBEARER " + base64.b64encode(bearer) + b"\r\n")
            challenge = line.read()
            assert challenge.startswith(b"+ ")
            assert b'"status":"invalid_token"' in base64.b64decode(challenge[2:])
            line.send(b"\r\n")
            assert line.read() == b"a1 NO [AUTHENTICATIONFAILED] Authentication failed."
            good = bearer.replace(b"bad-token", b"good-token")
            line.send(b"a2 AUTHENTICATE OAUTHBEARER " + base64.b64encode(good) + b"\r\n")
            assert line.read().startswith(b"a2 OK")
        finally:
            line.close()


def test_literals_and_literal_plus() -> None:
    with FakeIMAPServer(Script(user="box", password='pa ss"{1}')) as server:
        line = Line(server)
        try:
            line.read()
            password = b'pa ss"{1}'
            line.send(b"a1 LOGIN {3}\r\n")
            assert line.read() == b"+ Ready for literal data"
            line.send(b"box {%d+}\r\n%s\r\n" % (len(password), password))
            assert line.read().startswith(b"a1 OK")
        finally:
            line.close()


def test_starttls_and_implicit_tls(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    with FakeIMAPServer(Script(messages=list(MESSAGES), ssl_context=server_ctx)) as server:
        client = imaplib.IMAP4(server.host, server.port, timeout=5)
        assert "STARTTLS" in client.capabilities
        client.starttls(client_ctx)
        client.login("box", "secret")
        client.logout()
        server.wait_idle()
        assert b"LOGIN" not in bytes(server.received_plain)
    script = Script(messages=list(MESSAGES), ssl_context=server_ctx, implicit_tls=True)
    with FakeIMAPServer(script) as server:
        client = imaplib.IMAP4_SSL(server.host, server.port, ssl_context=client_ctx, timeout=5)
        client.login("box", "secret")
        assert client.select("INBOX") == ("OK", [b"3"])
        client.logout()


def test_imapclient_fetch_flag_move_and_expunge(server: FakeIMAPServer) -> None:
    client = imapclient.IMAPClient(server.host, port=server.port, ssl=False, timeout=5)
    try:
        client.login("box", "secret")
        assert client.has_capability("UIDPLUS") and client.has_capability("MOVE")
        info = client.select_folder("INBOX")
        assert (info[b"EXISTS"], info[b"UIDVALIDITY"]) == (3, 1000)
        uids = client.search(["ALL"])
        assert uids == [1, 2, 3]
        data = client.fetch(uids, ["BODY.PEEK[]", "RFC822.SIZE", "FLAGS"])
        assert [data[u][b"BODY[]"] for u in uids] == [crlf(m) for m in MESSAGES]
        assert [data[u][b"RFC822.SIZE"] for u in uids] == [len(crlf(m)) for m in MESSAGES]
        client.add_flags([1], [b"$MailIntegrationProcessed"])
        client.create_folder("Processed")
        client.move([2], "Processed")
        client.delete_messages([3])
        client.uid_expunge([3])
        client.noop()
    finally:
        client.logout()
    [kept] = server.folder()
    assert (kept.uid, kept.flags) == (1, {"$MailIntegrationProcessed"})
    assert [m.raw for m in server.folder("Processed")] == [MESSAGES[1]]
    assert server.expunged == [("INBOX", 2), ("INBOX", 3)]
