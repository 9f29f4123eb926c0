"""engine.parse.parts: which part becomes the body, the HTML or a file."""

from __future__ import annotations

from samples import multipart, parse, top

from engine.parse import parse_message


def test_multipart_alternative_prefers_plain_text() -> None:
    msg = parse("multipart-alternative")
    assert msg.body == "Plain text version: the VPN is down.\n"
    assert msg.html is not None and "<b>VPN</b>" in msg.html and "<script" not in msg.html
    assert msg.attachments == ()


def test_a_second_alternative_and_a_text_after_it_belong_to_the_body() -> None:
    """Issue 20 item 2: they were kept as attachment-N.txt (the body was taken already)."""
    alternative = (
        'Content-Type: multipart/alternative; boundary="{0}"\r\n\r\n--{0}\r\n'
        "Content-Type: text/plain\r\n\r\n{1}\r\n--{0}\r\n"
        "Content-Type: text/html\r\n\r\n<p>{1}</p>\r\n--{0}--\r\n"
    )
    raw = top(
        multipart(
            alternative.format("a1", "first text").encode(),
            alternative.format("a2", "second text").encode(),
            b"Content-Type: text/plain\r\n\r\nfooter",
        )
    )
    msg = parse_message(raw)
    assert msg.body == "first text\n\nsecond text\n\nfooter"
    assert msg.html == "<p>first text</p>\n<p>second text</p>"
    assert msg.attachments == ()
    # A text part before an alternative leaves the alternative its HTML, as before.
    raw = top(
        multipart(b"Content-Type: text/plain\r\n\r\nintro", alternative.format("a", "x").encode())
    )
    msg = parse_message(raw)
    assert (msg.body, msg.html, msg.attachments) == ("intro\n\nx", "<p>x</p>", ())
