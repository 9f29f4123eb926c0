"""The gateway interface (issue 13): a registry picks the gateway by gatewayTypeName, a
session runs on any gateway through the interface alone, and the POP3 gateway translates
library exceptions in one place."""

from __future__ import annotations

import poplib
import socket
import ssl
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
from support import (
    GATEWAY,
    ledger,
    mailbox_xml,
    message,
    once,
    requests,
)

from engine import gateways
from engine.config import ServerConfig, load_mailbox
from engine.errors import (
    AuthError,
    ConnectError,
    FetchTimeout,
    MailboxLockedError,
    ProtocolError,
    TLSError,
)
from engine.gateways import Answer, Listed, Request, gateway_for
from engine.gateways.imap import ImapGateway
from engine.gateways.pop3 import Pop3Gateway

ENGINE = Path(__file__).resolve().parent.parent / "engine"


@pytest.mark.parametrize(
    ("type_name", "kind"),
    [
        (GATEWAY, Pop3Gateway),
        ("Octopus.MailIntegration.Gateways.MailKitMailboxGateway", Pop3Gateway),
        ("pop3", Pop3Gateway),
        (
            "Octopus.MailIntegration.Gateways.ImapMailboxGateway, Octopus.MailIntegration",
            ImapGateway,
        ),
        ("imap", ImapGateway),
    ],
)
def test_the_registry_makes_the_gateway_the_xml_names(
    tmp_path: Path, type_name: str, kind: type
) -> None:
    cfg = mailbox_xml(
        tmp_path / "m.xml", port=110, user="u", password="pw-123456", gateway=type_name
    )
    server = load_mailbox(cfg).server
    # IMAP's factory imports its gateway when it first makes one (a POP3 start never does).
    assert gateways.GATEWAYS.keys() == {"pop3", "imap"}
    assert isinstance(gateway_for(server), kind)


class MemoryGateway:
    """A mailbox held in memory, a second implementation of the interface as IMAP will be
    one: its handles are not 1..n, its keys are not UIDLs, and its disposal is its own
    (a message moves to `gone` only when the session quits, as on a real server)."""

    def __init__(self, messages: dict[int, tuple[str, bytes]]) -> None:
        self.messages = messages
        self.gone: dict[int, tuple[str, bytes]] = {}
        self.calls: list[str] = []
        self.failed: list[int] = []
        self._marked: list[int] = []
        self.pipelining = True
        self.top = True
        self.started = time.monotonic()
        self.deadline = self.started + 60
        self.mid_exchange = False

    @property
    def seconds(self) -> float:
        return self.deadline - self.started

    def extend(self, nbytes: int) -> None:
        self.calls.append("extend")

    def open(self) -> None:
        self.calls.append("open")

    def listing(self) -> list[Listed]:
        self.calls.append("listing")
        return [Listed(n, key, len(raw)) for n, (key, raw) in sorted(self.messages.items())]

    def fetch_many(self, requests: Sequence[Request], grant: float) -> list[Answer]:
        self.calls.append("fetch_many")
        out = []
        for r in requests:
            raw = self.messages[r.number][1]
            data = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" if r.headers_only else raw
            cut = "size" if len(data) > r.cap else None
            out.append(Answer(data[: r.cap], len(data), cut))
        return out

    def dispose(self, numbers: Sequence[int], failed: Collection[int] = ()) -> None:
        self.calls.append("dispose")
        self._marked += numbers
        self.failed += failed

    def quit(self) -> None:
        self.calls.append("quit")
        for n in self._marked:
            self.gone[n] = self.messages.pop(n)
        self._marked = []

    def abort(self) -> None:
        self.calls.append("abort")
        self._marked = []

    def interrupt(self) -> None:
        self.calls.append("interrupt")

    def close(self) -> None:
        self.calls.append("close")


def _bad_mime(tag: str) -> bytes:
    """Over the parser's part limit: a failure event holding the message."""
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(600))
    return (
        f"From: j@example.com\r\nSubject: {tag}\r\nMessage-ID: <{tag}@x>\r\n".encode()
        + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        + parts
        + b"--b--\r\n"
    )


def test_a_session_runs_on_any_gateway_through_the_interface_alone(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session knows gateways only by the interface: an in-memory one, registered for
    the kind the XML names, is read, its messages processed once, the failure named to its
    disposal, the one over maxMessageBytes left on it, and a known one disposed of unread."""
    cfg = mailbox_xml(
        tmp_path / "m.xml", port=1, user="u", password="pw-123456", maxMessageBytes="30000"
    )
    good = message("Printer on fire")
    big = message("Large scan", attachments=(("scan.pdf", "application/pdf", b"%" * 40000),))
    box = MemoryGateway(
        {
            205: ("INBOX/17/5", good),
            301: ("INBOX/17/9", _bad_mime("Broken")),
            402: ("INBOX/17/12", big),
        }
    )
    monkeypatch.setitem(gateways.GATEWAYS, "pop3", lambda server, tokens=None: box)

    assert once(data, cfg) == 1  # a failure event: the run says so
    assert box.calls[:4] == ["open", "listing", "extend", "fetch_many"]
    assert box.calls[-2:] == ["dispose", "quit"]
    assert sorted(box.gone) == [205, 301] and box.failed == [301]
    assert list(box.messages) == [402]  # kept: over maxMessageBytes, only its header read
    kinds = sorted(r["kind"] for r in requests(data))
    assert kinds == ["mail", "message-failure", "message-failure"]
    assert {row["uidl"] for row in ledger(data)} == {"INBOX/17/5", "INBOX/17/9", "INBOX/17/12"}

    # The server keeps one it had confirmed disposing of: the same message by its header's
    # Message-ID, disposed of again without a RETR, never processed twice.
    box.messages[205] = box.gone.pop(205)
    box.calls.clear()
    assert once(data, cfg) == 0
    assert box.calls.count("fetch_many") == 1 and box.calls[-2:] == ["dispose", "quit"]
    assert list(box.messages) == [402]
    assert len(requests(data)) == 3


def _untrusted() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "self-signed certificate"
    return exc


@pytest.fixture
def pop3() -> Pop3Gateway:
    return Pop3Gateway(
        ServerConfig(
            gateway="pop3",
            host="127.0.0.1",
            port=1,
            use_ssl=False,
            starttls=False,
            user_name="u",
            password="pw-123456",
            timeout=5,
        )
    )


@pytest.mark.parametrize(
    ("raised", "during", "expected", "text", "lost"),
    [
        (
            poplib.error_proto(b"-ERR [IN-USE] locked"),
            "login",
            MailboxLockedError,
            "the mailbox is locked by another session: -ERR [IN-USE] locked",
            False,
        ),
        (
            poplib.error_proto(b"-ERR no"),
            "login",
            AuthError,
            "the server refused the login: -ERR no",
            False,
        ),
        (
            poplib.error_proto(b"-ERR no such message"),
            "DELE 3",
            ProtocolError,
            "the server answered '-ERR no such message' to DELE 3",
            False,  # the server said no and knows where it is: abort may still RSET
        ),
        (
            TimeoutError("timed out"),
            "RETR 1",
            FetchTimeout,
            "127.0.0.1:1 did not answer within 5 s (RETR 1)",
            True,
        ),
        (
            ConnectionResetError(104, "reset"),
            "RETR 2",
            ProtocolError,
            "the connection to 127.0.0.1:1 was lost (RETR 2): [Errno 104] reset",
            True,
        ),
        (
            ConnectionResetError(104, "reset"),
            "login",
            ConnectError,
            "cannot connect to 127.0.0.1:1: reset",
            True,
        ),
        (
            _untrusted(),  # a ValueError too: never taken for a malformed answer
            "login",
            TLSError,
            "the certificate of 127.0.0.1:1 is not trusted: self-signed certificate",
            True,
        ),
        (socket.gaierror(-2, "Name unknown"), "login", ConnectError, "cannot resolve", True),
    ],
)
def test_pop3_errors_are_translated_in_one_place(
    pop3: Pop3Gateway,
    raised: BaseException,
    during: str,
    expected: type[Exception],
    text: str,
    lost: bool,
) -> None:
    with pytest.raises(expected) as caught, pop3._mapped(during):
        raise raised
    assert str(caught.value).startswith(text)
    assert pop3._lost is lost


def test_a_malformed_listing_is_a_protocol_error_but_a_bug_elsewhere_is_not_hidden(
    pop3: Pop3Gateway,
) -> None:
    listing = pop3._mapped("LIST", malformed=True)
    with pytest.raises(ProtocolError, match="listing is malformed: invalid literal"), listing:
        int(b"x1")
    listing = pop3._mapped("LIST", malformed=True)
    with pytest.raises(ProtocolError, match="listing is malformed: b'-ERR busy'"), listing:
        raise poplib.error_proto(b"-ERR busy")
    with pytest.raises(ValueError, match="invalid literal"), pop3._mapped("RETR 1"):
        int(b"x1")
    with pytest.raises(KeyboardInterrupt), pop3._mapped("RETR 1"):
        raise KeyboardInterrupt


def test_the_errors_of_a_pipelined_window_name_the_command_whose_answer_was_read(
    pop3: Pop3Gateway,
) -> None:
    """``during`` may be a function, called only on failure: fetch_many names the message
    being read without building a text per message."""
    out = [Answer(b"x", 1)]
    with (
        pytest.raises(FetchTimeout, match=r"\(RETR 8\)"),
        pop3._mapped(lambda: f"RETR {7 + len(out)}"),
    ):
        raise TimeoutError
