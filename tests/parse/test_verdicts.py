"""engine.parse.verdicts: auto-replies, mailing lists, bounces and system senders."""

from __future__ import annotations

import pytest
from samples import parse, simple

from engine.parse import parse_message


@pytest.mark.parametrize(
    ("case", "auto", "reason"),
    [
        ("auto-auto-submitted-auto-replied", True, "Auto-Submitted: auto-replied"),
        ("auto-auto-submitted-no", False, None),
        ("auto-precedence-bulk", True, "Precedence: bulk"),
        ("auto-precedence-junk", True, "Precedence: junk"),
        ("auto-precedence-list", True, "Precedence: list"),
        ("auto-x-auto-response-suppress-all", True, "X-Auto-Response-Suppress: All"),
        ("auto-x-auto-response-suppress-oof", True, "X-Auto-Response-Suppress: DR, OOF, AutoReply"),
        ("auto-x-auto-response-suppress-dr", False, None),
        ("auto-list-id", True, "mailing list (List-Id)"),
        ("auto-list-unsubscribe", True, "mailing list (List-Unsubscribe)"),
        ("auto-x-autoreply", True, "X-Autoreply header"),
        ("auto-x-autorespond", True, "X-Autorespond header"),
        ("auto-null-return-path", True, "null sender"),
        ("auto-empty-from", True, "null sender"),
        ("auto-mailer-daemon", True, "system sender mailer-daemon"),
        ("auto-noreply", True, "system sender no-reply"),
        ("auto-do-not-reply", True, "system sender do-not-reply"),
        ("auto-postmaster", True, "system sender postmaster"),
        ("auto-oof-subject-only", False, None),
        ("plain-utf8", False, None),
    ],
)
def test_loop_safety_verdict(case: str, auto: bool, reason: str | None) -> None:
    msg = parse(case)
    assert (msg.auto_submitted, msg.auto_reason, msg.is_bounce) == (auto, reason, False)


def test_empty_from_has_empty_sender() -> None:
    msg = parse("auto-empty-from")
    assert (msg.from_name, msg.from_addr) == ("", "")


def test_dsn_is_a_bounce() -> None:
    msg = parse("dsn-bounce")
    assert (msg.auto_submitted, msg.auto_reason, msg.is_bounce) == (
        True,
        "delivery status notification",
        True,
    )
    assert msg.body.startswith("This is the mail system at host mx1.example.com.")
    assert [a.content_type for a in msg.attachments] == [
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert b"Status: 5.1.1" in msg.attachments[0].data


def test_lone_delivery_status_part_is_a_bounce() -> None:
    raw = simple(
        'From: a@example.org\nSubject: x\nContent-Type: multipart/mixed; boundary="b"\n',
        b"--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n--b\r\n"
        b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\n--b--\r\n",
    )
    assert parse_message(raw).is_bounce
