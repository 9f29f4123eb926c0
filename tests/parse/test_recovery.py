"""Issue 20 items 7 and 8: an empty file or one that is not mail is refused (it becomes a
failure event); a header continued on unindented lines is mended so that the From and
Subject after it are read."""

from __future__ import annotations

import hashlib

import pytest

from engine.errors import ParseError
from engine.parse import ParseLimits, parse_message
from engine.parse.mime import mend_header_block


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n  \r\n",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        bytes(range(256)) * 4,
        b"just some words\nwithout any header\n",
    ],
)
def test_an_empty_file_or_one_that_is_not_mail_is_refused(raw: bytes) -> None:
    with pytest.raises(ParseError, match=r"empty|not an e-mail message"):
        parse_message(raw)


BROKEN = (
    b"Received: from legacy.example.com by mx1.example.com; Mon, 1 Dec 2026 09:00:00 +0100\r\n"
    b"X-Legacy-Routing: route=1;\r\nhop=b;\r\nhop=c\r\n"
    b"From: Legacy App <legacy@example.com>\r\nSubject: Nightly job failed\r\n"
    b"Message-ID: <legacy-1@example.com>\r\n\r\nThe job failed.\r\n"
)


def test_a_header_continued_on_unindented_lines_keeps_the_from_and_subject_after_it() -> None:
    msg = parse_message(BROKEN)
    assert (msg.from_addr, msg.subject, msg.message_id) == (
        "legacy@example.com",
        "Nightly job failed",
        "legacy-1@example.com",
    )
    assert msg.body == "The job failed.\n"
    assert msg.raw == BROKEN and msg.sha256 == hashlib.sha256(BROKEN).hexdigest()
    assert any("not header fields" in note for note in msg.notes)
    assert msg.header("x-legacy-routing") is not None
    assert "hop=c" in (msg.header("x-legacy-routing") or "")


def test_mending_leaves_well_formed_and_headerless_text_alone() -> None:
    good = b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\nNot: a header\r\n"
    assert mend_header_block(good, ParseLimits().max_header_bytes) is None
    # No blank line: the text after the fields is body text, with nothing to recover after it.
    no_blank = b"From: a@example.org\r\nSubject: s\r\nHello there\r\nthanks\r\n"
    assert mend_header_block(no_blank, ParseLimits().max_header_bytes) is None
    # A first line that is no field is not mail: nothing to mend.
    assert mend_header_block(b"hello\r\nFrom: a@example.org\r\n\r\n", 1000) is None
