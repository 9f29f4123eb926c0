"""Issue 20 item 6: plain-text (non-RFC 3464) bounces are bounces, with their status code,
failed recipients and the Message-ID of the message that bounced."""

from __future__ import annotations

import pytest
from samples import simple

from engine.parse import parse_message


def bounce(sender: str, subject: str, body: str, extra: str = "") -> bytes:
    return simple(
        f"From: {sender}\nTo: desk@example.com\nSubject: {subject}\n{extra}", body.encode()
    )


ORIGINAL = "Message-ID: <reply-7@desk.example.com>\nSubject: [#107] Your request\n"
CASES = {
    "postfix": bounce(
        "MAILER-DAEMON@mx.example.com (Mail Delivery System)",
        "Undelivered Mail Returned to Sender",
        "This is the mail system at host mx.example.com.\n\n"
        "<ann@partner.example.net>: host mx.partner.example.net said: 550 5.1.1 User unknown\n\n"
        f"--- Original message ---\n{ORIGINAL}",
    ),
    "exchange": bounce(
        "postmaster@contoso.example.com",
        "Undeliverable: [#107] Your request",
        "Delivery has failed to these recipients or groups:\n\n"
        "ann@partner.example.net (ann@partner.example.net)\n"
        "#550 5.1.10 RESOLVER.ADR.RecipientNotFound ##\n\n"
        f"Original message headers:\n\n{ORIGINAL}",
    ),
    "exim": bounce(
        "Mail Delivery System <Mailer-Daemon@mail.example.org>",
        "Mail delivery failed: returning message to sender",
        "This message was created automatically by mail delivery software.\n\n"
        "The following address(es) failed:\n\n  ann@partner.example.net\n"
        "    550 5.1.1 No such user here\n\n"
        f"------ This is a copy of the message, including all the headers. ------\n\n{ORIGINAL}",
    ),
    "qmail": bounce(
        "MAILER-DAEMON@mail.example.net",
        "failure notice",
        "Hi. This is the qmail-send program at mail.example.net.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n\n"
        "<ann@partner.example.net>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
        f"--- Below this line is a copy of the message.\n\n{ORIGINAL}",
        "Return-Path: <>\n",
    ),
    "gmail": bounce(
        "Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
        "Delivery Status Notification (Failure)",
        "** Address not found **\n\nYour message wasn't delivered to ann@partner.example.net "
        "because the address couldn't be found.\n\n550 5.1.1 The email account does not exist.\n"
        f"\n----- Original message -----\n\n{ORIGINAL}",
    ),
    "null sender with a notice": bounce(
        "Mail System <system@relay.example.com>",
        "Your message",
        "Your message could not be delivered to <ann@partner.example.net>: 5.2.2 mailbox full\n",
        "Return-Path: <>\n",
    ),
}


@pytest.mark.parametrize("mta", sorted(CASES))
def test_plain_text_bounce_is_a_bounce_with_status_recipient_and_original_id(mta: str) -> None:
    msg = parse_message(CASES[mta])
    assert msg.is_bounce and msg.auto_submitted, msg.auto_reason
    assert msg.bounce_recipients == ("ann@partner.example.net",)
    expected_status = {"exchange": "5.1.10", "null sender with a notice": "5.2.2"}.get(mta, "5.1.1")
    assert msg.bounce_status == expected_status
    if mta != "null sender with a notice":
        assert msg.bounce_message_id == "reply-7@desk.example.com"


def test_a_delay_notice_is_a_bounce_with_a_temporary_status() -> None:
    msg = parse_message(
        bounce(
            "MAILER-DAEMON@mx.example.com",
            "Delayed Mail (still being retried)",
            "<ann@partner.example.net>: connect to mx.partner.example.net: 4.4.1 timed out\n",
        )
    )
    assert msg.is_bounce and msg.bounce_status == "4.4.1"


@pytest.mark.parametrize(
    ("sender", "subject", "body", "extra"),
    [
        # A person forwarding a bounce asks for help: that is a request.
        ("Ann <ann@example.com>", "Fwd: Undeliverable: Invoice", "Why did this bounce?\n", ""),
        # An out-of-office with a null return path is automatic, not a bounce.
        (
            "Bob <bob@example.com>",
            "Out of office",
            "I am away until Monday.\n",
            "Return-Path: <>\n",
        ),
        # A postmaster writing as a person, without any failure in the text.
        ("postmaster@example.com", "Quota", "Your mailbox is nearly full.\n", ""),
        # People write such subjects to a service desk too.
        ("Dock <dock@example.com>", "Undeliverable packages at dock 3", "Two pallets.\n", ""),
        (
            "CEO Office <office@example.com>",
            "Mail delivery failed: returning message to sender",
            "Our mail to the board could not be delivered, please help.\n",
            "",
        ),
        # Version numbers and IP addresses are not status codes.
        ("Ann <ann@example.com>", "Upgrade", "Installed 5.1.1.4 on 10.4.1.2\n", ""),
    ],
)
def test_what_only_looks_like_a_bounce_is_not_one(
    sender: str, subject: str, body: str, extra: str
) -> None:
    msg = parse_message(bounce(sender, subject, body, extra))
    assert not msg.is_bounce
    assert (msg.bounce_status, msg.bounce_recipients, msg.bounce_message_id) == (None, (), None)


def test_a_structured_dsn_gives_its_own_fields() -> None:
    dsn = (
        "Content-Type: multipart/report; report-type=delivery-status; boundary=r\n",
        b"--r\r\nContent-Type: text/plain\r\n\r\nFailed.\r\n"
        b"--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; Ann@Partner.example.net\r\nAction: failed\r\nStatus: 5.7.1\r\n"
        b"\r\n--r\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Message-ID: <reply-9@desk.example.com>\r\nSubject: x\r\n\r\nbody\r\n--r--\r\n",
    )
    msg = parse_message(
        simple("From: MAILER-DAEMON@mx.example.com\nSubject: failed\n" + dsn[0], dsn[1])
    )
    assert msg.is_bounce
    assert (msg.bounce_status, msg.bounce_recipients, msg.bounce_message_id) == (
        "5.7.1",
        ("ann@partner.example.net",),
        "reply-9@desk.example.com",
    )
