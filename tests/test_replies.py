"""Automatic replies when new requests are not allowed, against a real aiosmtpd sink."""

from __future__ import annotations

import email
from collections.abc import Callable, Iterator
from email.policy import default as default_policy
from pathlib import Path

import pytest
from support import (
    Mailbox,
    SmtpSink,
    message,
    once,
    smtp_server,
)

pytestmark = pytest.mark.dovecot


@pytest.fixture
def smtp_sink() -> Iterator[tuple[SmtpSink, int]]:
    sink = SmtpSink()
    with smtp_server(sink) as port:
        yield sink, port


@pytest.fixture
def mailbox(mailbox: Mailbox, smtp_sink: tuple[SmtpSink, int]) -> Mailbox:
    """Here the shared mailbox is `noreq`: it takes no new requests and replies through the
    SMTP sink."""
    mailbox.configure(
        "noreq",
        createNewRequests="False",
        smtp=f"<serverName>127.0.0.1</serverName><port>{smtp_sink[1]}</port>"
        "<from>Service Desk &lt;servicedesk@example.com&gt;</from>",
        replyTemplate="<subject>Not registered: {subject}</subject>"
        "<body>Dear {sender}, mailbox {mailbox} takes no new requests.</body>",
    )
    return mailbox


@pytest.fixture
def sink(smtp_sink: tuple[SmtpSink, int]) -> SmtpSink:
    return smtp_sink[0]


def _parsed(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_refused_message_gets_one_auto_reply_with_null_sender(
    mailbox: Mailbox, sink: SmtpSink
) -> None:
    mailbox.deliver(message("Need a laptop", message_id="<ask-1@example.com>"))
    assert mailbox.once() == 0
    assert mailbox.requests() == []
    [row] = mailbox.ledger()
    assert row["outcome"] == "refused: replied"
    [(mail_from, rcpts, raw)] = sink.received
    assert mail_from in ("", "<>")
    assert rcpts == ["john.doe@example.com"]
    reply = _parsed(raw)
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["Subject"] == "Not registered: Need a laptop"
    assert reply["In-Reply-To"] == "<ask-1@example.com>"
    assert reply["X-Loop"]
    assert "Dear John Doe, mailbox noreq takes no new requests." in reply.get_content()
    assert mailbox.left() == 0


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
    mailbox: Mailbox, sink: SmtpSink, sender: str, headers: dict[str, str]
) -> None:
    mailbox.deliver(message("Automatic", sender=sender, headers=headers))
    assert mailbox.once() == 0
    assert sink.received == []
    [row] = mailbox.ledger()
    # An out-of-office answer to nothing we know is only recorded; the rest are refused.
    assert row["outcome"].startswith(("refused: no reply", "ignored: auto-reply"))


def test_encoded_newline_in_subject_cannot_inject_a_header(
    mailbox: Mailbox, sink: SmtpSink
) -> None:
    raw = (
        b"From: John Doe <john.doe@example.com>\r\nTo: support@example.com\r\n"
        b"Subject: =?utf-8?q?Hello=0D=0ABcc=3A_victim=40evil=2Eexample?=\r\n"
        b"Message-ID: <inject-1@example.com>\r\n\r\nbody\r\n"
    )
    mailbox.deliver(raw)
    assert mailbox.once() == 0
    [(_, rcpts, out)] = sink.received
    assert rcpts == ["john.doe@example.com"]
    reply = _parsed(out)
    assert reply["Bcc"] is None
    assert "\n" not in reply["Subject"] and "\r" not in reply["Subject"]


def test_replies_per_sender_are_rate_limited(mailbox: Mailbox, sink: SmtpSink) -> None:
    for i in range(7):
        mailbox.deliver(message(f"Ask {i}"))
    assert mailbox.once() == 0
    assert len(sink.received) == 5
    outcomes = [r["outcome"] for r in mailbox.ledger()]
    assert outcomes.count("refused: no reply (rate limit)") == 2


def test_reply_with_reference_still_adds_activity_when_new_requests_are_refused(
    tmp_path: Path, mailbox: Mailbox, sink: SmtpSink, new_mailbox: Callable[..., Mailbox]
) -> None:
    # A request made through an open mailbox of the same team, then answered in this one.
    open_box = new_mailbox(tmp_path / "open.xml")
    open_box.deliver(message("Printer"))
    assert open_box.once() == 0
    mailbox.deliver(message("RE: [Incident] #1 Printer", body="Still broken\n"))
    assert mailbox.once() == 0
    [req] = mailbox.requests()
    assert len(req["activities"]) == 1
    assert sink.received == []


@pytest.mark.parametrize(
    ("headers", "message_id"),
    [
        ({"X-Loop": "mailintegration; other@pop.example.com:110"}, None),
        ({}, "<1.2.3.mailintegration@example.com>"),
    ],
)
def test_no_reply_to_a_message_carrying_our_loop_header_or_message_id(
    mailbox: Mailbox, sink: SmtpSink, headers: dict[str, str], message_id: str | None
) -> None:
    mailbox.deliver(message("Echo", headers=headers, message_id=message_id))
    assert mailbox.once() == 0
    assert sink.received == []
    [row] = mailbox.ledger()
    assert row["outcome"] == "refused: no reply (our own loop header or Message-ID)"


# -- hostile text in the message answered (issue 12, item 4) ----------------------------------

TEMPLATE_BODY = "Dear John Doe, mailbox noreq takes no new requests."
REPLY_HEADERS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Auto-Submitted",
    "X-Loop",
    "X-Auto-Response-Suppress",
    "Precedence",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
]


def _header_names(raw: bytes) -> list[str]:
    """The header names of a message as written, continuation lines checked to be ASCII."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    names = []
    for line in head.split(b"\r\n"):
        assert line.isascii() and b"\r" not in line and b"\n" not in line, line
        if not line.startswith((b" ", b"\t")):
            names.append(line.split(b":", 1)[0].decode())
    return names


@pytest.mark.parametrize(
    ("headers", "visible", "threaded"),
    [
        # A subject encoded twice: decoded once by us it reads as an encoded word, which the
        # stdlib's header policy decoded again into CR LF, a Bcc and a second (HTML) body.
        (
            b"Subject: =?utf-8?q?=3D=3Futf-8=3Fq=3FHi=3D0D=3D0ABcc=3A=5Fvictim=40evil=2Eexample"
            b"=3D0D=3D0A=3D0D=3D0A=3Chtml=3Eevil=3F=3D?=\r\nMessage-ID: <twice-1@example.com>\r\n",
            "=?utf-8?q?Hi=0D=0ABcc:_victim@evil.example=0D=0A=0D=0A<html>evil?=",
            True,
        ),
        # Encoded CR LF in a subject encoded once: the parser decodes it, we flatten it.
        (
            b"Subject: =?utf-8?q?Hello=0D=0ABcc=3A_victim=40evil=2Eexample?=\r\n"
            b"Message-ID: <once-1@example.com>\r\n",
            "Hello Bcc: victim@evil.example",
            True,
        ),
        # An encoded word as the Message-ID: it went into In-Reply-To and References.
        (
            b"Subject: Printer\r\nMessage-ID: =?utf-8?q?x=0D=0ABcc:=20victim2@evil.example"
            b"=0D=0A=0D=0A=3Chtml=3Eevil?=\r\n",
            "Printer",
            False,
        ),
        # A bidi override and a line separator in the subject are not text either.
        (
            "Subject: Invoice \u202egpj.exe\u2028Bcc: x@evil.example\r\n"
            "Message-ID: <bidi-1@example.com>\r\n".encode(),
            "Invoice gpj.exe Bcc: x@evil.example",
            True,
        ),
    ],
    ids=["subject-encoded-twice", "subject-encoded-crlf", "message-id-encoded-word", "bidi"],
)
def test_received_subject_and_message_id_never_inject_a_header_or_a_body(
    mailbox: Mailbox, sink: SmtpSink, headers: bytes, visible: str, threaded: bool
) -> None:
    """On this interpreter (3.11.7, without the CVE-2024-6923 fix): the reply received by a
    real SMTP server has exactly our headers, one text/plain part, and the subject reads as
    the received text made one line, nothing decoded twice."""
    raw = b"From: John Doe <john.doe@example.com>\r\nTo: support@example.com\r\n" + headers
    mailbox.deliver(raw + b"\r\nbody\r\n")
    assert mailbox.once() == 0
    [(mail_from, rcpts, out)] = sink.received
    assert mail_from in ("", "<>") and rcpts == ["john.doe@example.com"]
    expected = sorted(REPLY_HEADERS)
    if not threaded:
        expected = [h for h in expected if h not in ("In-Reply-To", "References")]
    assert sorted(_header_names(out)) == expected  # each once, and no other
    parsed = _parsed(out)
    assert sorted(parsed.keys()) == expected  # the same once a reader has unfolded them
    assert not parsed.is_multipart() and parsed.get_content_type() == "text/plain"
    assert parsed["Subject"] == f"Not registered: {visible}"
    assert parsed["To"] == "john.doe@example.com"
    assert parsed.get_content().replace("\r\n", "\n") == TEMPLATE_BODY + "\n"
    if threaded:
        [mid] = [line for line in headers.split(b"\r\n") if line.startswith(b"Message-ID")]
        assert parsed["In-Reply-To"] == mid.split(b": ", 1)[1].decode()


# -- rate limits (issue 12, item 9) ---------------------------------------------------------


def _sent_to(sink: SmtpSink) -> list[str]:
    return [rcpt for _, rcpts, _ in sink.received for rcpt in rcpts]


def test_address_variants_count_as_one_address_for_the_daily_limit(
    mailbox: Mailbox, sink: SmtpSink
) -> None:
    """+tags, case, a trailing dot and the IDNA or Unicode spelling of the domain were each a
    new address: 11 replies to one person against a limit of 5."""
    variants = [
        "victim+1@xn--exmple-cua.com",
        "victim+2@xn--exmple-cua.com",
        "VICTIM@xn--exmple-cua.com",
        "Victim@XN--EXMPLE-CUA.COM",
        "victim@xn--exmple-cua.com.",
        "victim+x@ex\u00e4mple.com",  # raw UTF-8 in the header (RFC 6532)
        "victim@EX\u00c4MPLE.COM",
        "vIctim+3@xn--exmple-cua.com",
        "victim@xn--exmple-cua.com",
        "victim+abc+def@ex\u00e4mple.com",
        "VICTIM+4@xn--exmple-cua.com",
    ]
    for i, addr in enumerate(variants):
        raw = (
            f"From: Victim <{addr}>\r\nTo: support@example.com\r\nSubject: Ask {i}\r\n"
            f"Message-ID: <variant-{i}@example.com>\r\n\r\nPlease\r\n"
        )
        mailbox.deliver(raw.encode())
    log = mailbox.data.parent / "engine.log"
    assert once(mailbox.data, mailbox.config, "--log-file", log) == 0
    sent = _sent_to(sink)
    assert len(sent) == 5, sent
    assert all(a.endswith("@xn--exmple-cua.com") for a in sent), sent
    outcomes = [r["outcome"] for r in mailbox.ledger()]
    assert outcomes.count("refused: no reply (rate limit)") == 6
    # Logged once, not once per refused reply.
    lines = [line for line in log.read_text().splitlines() if "already got" in line]
    assert len(lines) == 1 and "address victim@xn--exmple-cua.com" in lines[0], lines


def test_replies_to_one_domain_and_from_one_mailbox_are_capped_per_hour(
    mailbox: Mailbox, sink: SmtpSink
) -> None:
    for i in range(25):
        mailbox.deliver(message(f"D {i}", sender=f"<user{i}@victim.example>"))
    assert mailbox.once() == 0
    assert len(_sent_to(sink)) == 20  # the default: 20 per domain per hour
    for i in range(5):
        mailbox.deliver(message(f"M {i}", sender=f"<someone@domain{i}.example>"))
    assert once(mailbox.data, mailbox.config, "--replies-per-mailbox-per-hour", "22") == 0
    assert len(_sent_to(sink)) == 22  # two more, then the mailbox's hour is full
    outcomes = [r["outcome"] for r in mailbox.ledger()]
    assert outcomes.count("refused: no reply (rate limit)") == 5 + 3
