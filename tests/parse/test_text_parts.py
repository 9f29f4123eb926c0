"""Issue 20 items 2, 3 and 7: every inline text part is in the body, in order, with a marker
where an attachment sat; the only text part, inline with a file name, is the body; empty text
parts are dropped."""

from __future__ import annotations

from samples import multipart, simple, top

from engine.parse import parse_message


def named(ctype: str, name: str, data: bytes) -> bytes:
    return (
        f"Content-Type: {ctype}; name={name}\r\n"
        f"Content-Disposition: inline; filename={name}\r\n\r\n"
    ).encode() + data


JPEG = named("image/jpeg", "IMG_0001.jpg", b"\xff\xd8\xff")
PDF = named("application/pdf", "scan.pdf", b"%PDF-1.4")


def text(body: str, charset: str = "us-ascii") -> bytes:
    return f"Content-Type: text/plain; charset={charset}\r\n\r\n{body}".encode(
        "utf-8" if charset == "utf-8" else "ascii"
    )


def test_phone_mail_interleaving_text_image_text_pdf_text_keeps_all_text_in_order() -> None:
    raw = top(
        multipart(
            text("The printer shows this:"),
            JPEG,
            text("and prints this:"),
            PDF,
            text("Thanks, Ann"),
        )
    )
    msg = parse_message(raw)
    assert msg.body == (
        "The printer shows this:\n\n[attachment: IMG_0001.jpg]\n\nand prints this:\n\n"
        "[attachment: scan.pdf]\n\nThanks, Ann"
    )
    assert [a.name for a in msg.attachments] == ["IMG_0001.jpg", "scan.pdf"]


def test_apple_mail_alternatives_around_an_image_keep_both_texts_and_both_htmls() -> None:
    alternative = (
        'Content-Type: multipart/alternative; boundary="{0}"\r\n\r\n--{0}\r\n'
        "Content-Type: text/plain; charset=utf-8\r\n\r\n{1}\r\n--{0}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n<div>{1}</div>\r\n--{0}--\r\n"
    )
    raw = top(
        multipart(
            alternative.format("a1", "Before the photo").encode(),
            JPEG,
            alternative.format("a2", "After the photo").encode(),
        )
    )
    msg = parse_message(raw)
    assert msg.body == "Before the photo\n\n[attachment: IMG_0001.jpg]\n\nAfter the photo"
    assert msg.html is not None
    assert "Before the photo" in msg.html and "After the photo" in msg.html
    assert [a.name for a in msg.attachments] == ["IMG_0001.jpg"]


def test_an_attachment_after_the_last_text_is_not_marked() -> None:
    msg = parse_message(top(multipart(text("See the scan."), PDF)))
    assert msg.body == "See the scan."
    assert [a.name for a in msg.attachments] == ["scan.pdf"]


def test_the_only_text_part_inline_with_a_file_name_is_the_body() -> None:
    raw = simple(
        "From: a@example.org\nSubject: s\nContent-Type: text/plain; charset=utf-8; name=body.txt\n"
        "Content-Disposition: inline; filename=body.txt\n",
        "Grüße, the VPN is down.\r\n".encode(),
    )
    msg = parse_message(raw)
    assert msg.body == "Grüße, the VPN is down.\n"
    assert msg.attachments == ()
    # In a multipart beside an image, too.
    note = named("text/plain", "note.txt", b"Call me back.")
    msg = parse_message(top(multipart(JPEG, note)))
    assert msg.body == "Call me back."
    assert [a.name for a in msg.attachments] == ["IMG_0001.jpg"]


def test_an_inline_named_text_part_beside_a_body_stays_a_file() -> None:
    log = named("text/plain", "log.txt", b"line 1")
    msg = parse_message(top(multipart(text("Log attached."), log)))
    assert msg.body == "Log attached."
    assert [(a.name, a.data) for a in msg.attachments] == [("log.txt", b"line 1")]


def test_empty_text_parts_are_dropped_not_kept_as_empty_files() -> None:
    empty_plain = b"Content-Type: text/plain\r\n\r\n"
    blank_html = b"Content-Type: text/html\r\n\r\n \r\n"
    empty_csv = b"Content-Type: text/csv\r\n\r\n"
    msg = parse_message(
        top(multipart(text("Hello"), empty_plain, blank_html, empty_csv, PDF, empty_plain))
    )
    assert msg.body == "Hello"
    assert [a.name for a in msg.attachments] == ["scan.pdf"]
    assert all(a.data for a in msg.attachments)
    # An empty first text part leaves the body to the text after it.
    msg = parse_message(top(multipart(empty_plain, JPEG, text("Real text"))))
    assert msg.body == "Real text"
    assert [a.name for a in msg.attachments] == ["IMG_0001.jpg"]
