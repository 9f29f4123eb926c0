"""Automatic replies when new requests are not allowed, against a real aiosmtpd sink."""

from __future__ import annotations

import email
import socket
from collections.abc import Iterator
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from support import import_directory, ledger, mailbox_xml, message, once, requests

pytestmark = pytest.mark.dovecot


class Sink:
    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp_sink() -> Iterator[tuple[Sink, int]]:
    sink = Sink()
    port = _free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


@pytest.fixture
def box(
    tmp_path: Path, dovecot: Any, pop3_user: tuple[str, str], smtp_sink: tuple[Sink, int]
) -> dict[str, Any]:
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    user, pw = pop3_user
    sink, port = smtp_sink
    cfg = mailbox_xml(
        tmp_path / "noreq.xml",
        port=dovecot.pop3_port,
        user=user,
        password=pw,
        createNewRequests="False",
        smtp=f"<serverName>127.0.0.1</serverName><port>{port}</port>"
        "<from>Service Desk &lt;servicedesk@example.com&gt;</from>",
        replyTemplate="<subject>Not registered: {subject}</subject>"
        "<body>Dear {sender}, mailbox {mailbox} takes no new requests.</body>",
    )
    return {"data": data, "cfg": cfg, "user": user, "sink": sink}


def _parsed(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_refused_message_gets_one_auto_reply_with_null_sender(
    box: dict[str, Any], dovecot: Any
) -> None:
    dovecot.deliver(box["user"], message("Need a laptop", message_id="<ask-1@example.com>"))
    assert once(box["data"], box["cfg"]) == 0
    assert requests(box["data"]) == []
    [row] = ledger(box["data"])
    assert row["outcome"] == "refused: replied"
    [(mail_from, rcpts, raw)] = box["sink"].received
    assert mail_from in ("", "<>")
    assert rcpts == ["john.doe@example.com"]
    reply = _parsed(raw)
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["Subject"] == "Not registered: Need a laptop"
    assert reply["In-Reply-To"] == "<ask-1@example.com>"
    assert reply["X-Loop"]
    assert "Dear John Doe, mailbox noreq takes no new requests." in reply.get_content()
    assert dovecot.count(box["user"]) == 0


@pytest.mark.parametrize(
    ("sender", "headers"),
    [
        ("robot@example.com", {"Auto-Submitted": "auto-replied"}),
        ("list@example.com", {"Precedence": "bulk"}),
        ("MAILER-DAEMON@example.com", {}),
        ("noreply@example.com", {}),
        ("news@example.com", {"List-Unsubscribe": "<mailto:unsub@example.com>"}),
        ("ooo@example.com", {"X-Auto-Response-Suppress": "OOF, AutoReply"}),
    ],
)
def test_no_reply_to_automated_or_null_senders(
    box: dict[str, Any], dovecot: Any, sender: str, headers: dict[str, str]
) -> None:
    dovecot.deliver(box["user"], message("Automatic", sender=sender, headers=headers))
    assert once(box["data"], box["cfg"]) == 0
    assert box["sink"].received == []
    [row] = ledger(box["data"])
    # An out-of-office answer to nothing we know is only recorded; the rest are refused.
    assert row["outcome"].startswith(("refused: no reply", "ignored: auto-reply"))


def test_encoded_newline_in_subject_cannot_inject_a_header(
    box: dict[str, Any], dovecot: Any
) -> None:
    raw = (
        b"From: John Doe <john.doe@example.com>\r\nTo: support@example.com\r\n"
        b"Subject: =?utf-8?q?Hello=0D=0ABcc=3A_victim=40evil=2Eexample?=\r\n"
        b"Message-ID: <inject-1@example.com>\r\n\r\nbody\r\n"
    )
    dovecot.deliver(box["user"], raw)
    assert once(box["data"], box["cfg"]) == 0
    [(_, rcpts, out)] = box["sink"].received
    assert rcpts == ["john.doe@example.com"]
    reply = _parsed(out)
    assert reply["Bcc"] is None
    assert "\n" not in reply["Subject"] and "\r" not in reply["Subject"]


def test_replies_per_sender_are_rate_limited(box: dict[str, Any], dovecot: Any) -> None:
    for i in range(7):
        dovecot.deliver(box["user"], message(f"Ask {i}"))
    assert once(box["data"], box["cfg"]) == 0
    assert len(box["sink"].received) == 5
    outcomes = [r["outcome"] for r in ledger(box["data"])]
    assert outcomes.count("refused: no reply (rate limit)") == 2


def test_reply_with_reference_still_adds_activity_when_new_requests_are_refused(
    tmp_path: Path, box: dict[str, Any], dovecot: Any, pop3_user: tuple[str, str]
) -> None:
    # A request made through an open mailbox of the same team, then answered in this one.
    open_user, open_pw = f"{box['user']}-open", "open-pw-1"
    dovecot.add_user(open_user, open_pw)
    open_cfg = mailbox_xml(
        tmp_path / "open.xml", port=dovecot.pop3_port, user=open_user, password=open_pw
    )
    dovecot.deliver(open_user, message("Printer"))
    assert once(box["data"], open_cfg) == 0
    dovecot.deliver(box["user"], message("RE: [Incident] #1 Printer", body="Still broken\n"))
    assert once(box["data"], box["cfg"]) == 0
    [req] = requests(box["data"])
    assert len(req["activities"]) == 1
    assert box["sink"].received == []


@pytest.mark.parametrize(
    ("headers", "message_id"),
    [
        ({"X-Loop": "mailintegration; other@pop.example.com:110"}, None),
        ({}, "<1.2.3.mailintegration@example.com>"),
    ],
)
def test_no_reply_to_a_message_carrying_our_loop_header_or_message_id(
    box: dict[str, Any], dovecot: Any, headers: dict[str, str], message_id: str | None
) -> None:
    dovecot.deliver(box["user"], message("Echo", headers=headers, message_id=message_id))
    assert once(box["data"], box["cfg"]) == 0
    assert box["sink"].received == []
    [row] = ledger(box["data"])
    assert row["outcome"] == "refused: no reply (our own loop header or Message-ID)"
