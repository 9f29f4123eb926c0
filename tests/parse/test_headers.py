"""engine.parse.headers: encoded words, threading headers and dates."""

from __future__ import annotations

from datetime import UTC, datetime

from samples import parse, simple

from engine.parse import parse_message


def test_broken_encoded_words_in_subject() -> None:
    # Adjacent words join (and split UTF-8 sequences reassemble), missing padding is repaired,
    # an unknown charset falls back, a word inside a word decodes, an unterminated one stays.
    assert parse("subject-broken-encoded-word").subject == (
        "Cafééabc日本 foobarbaz =?utf-8?q?broken"
    )


def test_encoded_newline_never_reaches_the_subject() -> None:
    msg = parse("subject-encoded-newline")
    assert msg.subject == "Urgent Bcc: victim@example.com line separator here"
    assert "\r" not in msg.subject and "\n" not in msg.subject and "\u2028" not in msg.subject


def test_threading_headers() -> None:
    raw = simple(
        "From: a@example.org\nSubject: Re: x\nMessage-ID:  <abc@example.org> \n"
        "In-Reply-To: <p1@example.org> (comment)\n"
        "References: <root@example.org>\n <p0@example.org>\n\t<p1@example.org>\n"
        "Date: not a date\n"
    )
    msg = parse_message(raw)
    assert msg.message_id == "abc@example.org"
    assert msg.in_reply_to == "p1@example.org"
    assert msg.references == ("root@example.org", "p0@example.org", "p1@example.org")
    assert msg.date is None


def test_date_without_zone_is_utc() -> None:
    msg = parse_message(simple("Subject: x\nDate: Thu, 27 Nov 2026 09:00:00 -0000\n"))
    assert msg.date == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
