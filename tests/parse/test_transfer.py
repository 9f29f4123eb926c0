"""engine.parse.transfer: one base64 decoder for every path (the same bytes whichever path a
part takes), and uudecoding a chunk of lines at a time held equal to the stdlib's."""

from __future__ import annotations

import base64
import binascii
import email as stdlib_email
import os
from datetime import timedelta
from email.message import _decode_uu as stdlib_decode_uu  # type: ignore[attr-defined]

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from samples import BOUNDARY, ELISION_FILLER, elided_bodies, raw_fuzz

from engine.parse import ParseLimits, parse_message
from engine.parse.transfer import _B64_NOISE, _b64_blobs, b64_decode, uu_decode


def _big_message(inner_attachment: bytes, crlf: bool = True) -> bytes:
    from email.message import EmailMessage
    from email.policy import SMTP, default

    inner = EmailMessage()
    inner["From"], inner["Subject"] = "x@example.org", "inner report"
    inner.set_content("inner text")
    inner.add_attachment(inner_attachment, maintype="application", subtype="zip", filename="in.zip")
    outer = EmailMessage()
    outer["From"], outer["To"], outer["Subject"] = "a@example.org", "b@example.org", "big one"
    outer["Message-ID"] = "<big-1@example.org>"
    outer.set_content("plain body")
    outer.add_alternative("<p>html body</p>", subtype="html")
    outer.add_attachment(
        os.urandom(3 * 1024 * 1024),
        maintype="application",
        subtype="octet-stream",
        filename="big.bin",
    )
    outer.add_attachment(inner)
    return outer.as_bytes(policy=SMTP if crlf else default)


@pytest.mark.parametrize("crlf", [True, False])
def test_large_base64_parts_decode_from_the_raw_bytes_exactly(crlf: bool) -> None:
    """Bodies over the elision threshold skip the stdlib parser; the result must not change."""
    inner_zip = os.urandom(600 * 1024)
    raw = _big_message(inner_zip, crlf)
    msg = parse_message(raw, ParseLimits(max_bytes=50_000_000))
    assert msg.raw is raw
    assert msg.body.strip() == "plain body"
    by_name = {a.name: a for a in msg.attachments}
    import email as stdlib_email

    reference = stdlib_email.message_from_bytes(raw)
    expected = next(
        p.get_payload(decode=True) for p in reference.walk() if p.get_filename() == "big.bin"
    )
    assert by_name["big.bin"].data == expected
    # The attached message is kept byte for byte, its own big part included.
    eml = by_name["inner report.eml"].data
    assert eml in raw
    again = parse_message(eml)
    assert [a.data for a in again.attachments] == [inner_zip]


def message_with_part(
    body: bytes, *, large: bool, cte: str = "base64", ctype: str = "application/octet-stream"
) -> bytes:
    """A message whose part "x.bin" has the encoded text ``body``; ``large`` adds a 2.8 MB
    attachment that takes the message over the elision threshold."""
    filler = b""
    if large:
        filler = (
            f"--{BOUNDARY}\r\nContent-Type: application/octet-stream; name=filler.bin\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode() + ELISION_FILLER
    return (
        (
            "From: a@example.org\r\nSubject: part\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed; boundary="{BOUNDARY}"\r\n\r\n'
            f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nSee the file.\r\n"
            f'--{BOUNDARY}\r\nContent-Type: {ctype}; name="x.bin"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n\r\n"
        ).encode()
        + body
        + b"\r\n"
        + filler
        + f"--{BOUNDARY}--\r\n".encode()
    )


def part_data(raw: bytes, name: str = "x.bin") -> bytes:
    [found] = [a.data for a in parse_message(raw).attachments if a.name == name]
    return found


@pytest.mark.parametrize(
    ("sizes", "elided"),
    [((1_500_001, 1_500_000), True), ((1_001, 1_000), False), ((2, 7), False)],
)
def test_two_joined_base64_blobs_keep_every_byte(sizes: tuple[int, int], elided: bool) -> None:
    """Issue 12 item 2: 3,000,001 bytes in two padded blobs came out as 1,500,001."""
    first, second = os.urandom(sizes[0]), os.urandom(sizes[1])
    raw_body = base64.encodebytes(first) + base64.encodebytes(second)
    raw = message_with_part(raw_body, large=False)
    assert (raw_body in elided_bodies(raw)) == elided
    data = part_data(raw)
    assert len(data) == sum(sizes) and data == first + second


def test_a_lone_base64_blob_decodes_as_the_stdlib_decodes_it() -> None:
    data = os.urandom(300 * 1024 + 1)
    for large in (False, True):
        raw = message_with_part(base64.encodebytes(data), large=large)
        assert (base64.encodebytes(data) in elided_bodies(raw)) == large
        assert part_data(raw) == data
        reference = stdlib_email.message_from_bytes(raw)
        [stdlib] = [p for p in reference.walk() if p.get_filename() == "x.bin"]
        assert stdlib.get_payload(decode=True) == data


B64_NOISE = [b"\r\n", b"\n", b" ", b"\t", b"!", b"*", b"\xff", b"=", b"==", b"\r\n\r\n"]


@st.composite
def base64ish(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """Base64-like text: joined blobs, broken padding, odd line lengths and junk; with the
    octets it must give when it is a well-formed sequence of padded blobs (else None)."""
    text = b""
    expected: bytes | None = b""
    for _ in range(draw(st.integers(1, 4))):
        data = draw(st.binary(max_size=60))
        blob = base64.b64encode(data)
        damage = draw(st.sampled_from(["none", "none", "unpadded", "cut", "padding"]))
        if damage == "unpadded":
            blob = blob.rstrip(b"=")
        elif damage == "cut":
            blob = blob[: draw(st.integers(0, len(blob)))]
        elif damage == "padding":
            blob += b"=" * draw(st.integers(1, 3))
        if damage != "none":
            expected = None
        elif expected is not None:
            expected += data
        width = draw(st.sampled_from([76, 64, 4, 7, 1]))
        newline = draw(st.sampled_from([b"\r\n", b"\n"]))
        text += newline.join(blob[i : i + width] for i in range(0, len(blob), width)) + newline
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        if text[at - 1 : at] == b"\r":
            at -= 1  # never split a CRLF: bare CRs are line ends the fast path leaves alone
        text = text[:at] + draw(st.sampled_from(B64_NOISE)) + text[at:]
        expected = None
    return text, expected


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(case=base64ish())
def test_property_the_in_place_base64_decoding_is_the_blob_by_blob_decoding(
    case: tuple[bytes, bytes | None],
) -> None:
    text, expected = case
    decoded = b64_decode(text)
    assert decoded == _b64_blobs(text.translate(None, _B64_NOISE))
    if expected is not None:
        assert decoded == expected
    # A window of a larger buffer decodes as the same bytes on their own.
    assert b64_decode(b"QUJD" + text + b"=QQ", 4, 4 + len(text)) == decoded


@raw_fuzz(60)
@given(case=base64ish())
def test_property_base64_parts_decode_alike_above_and_below_the_elision_threshold(
    case: tuple[bytes, bytes | None],
) -> None:
    text, expected = case
    # Repeated to the size of a part that a large message has taken from its raw bytes.
    copies = 256 * 1024 // len(text) + 1
    body = text * copies
    small, large = (message_with_part(body, large=big) for big in (False, True))
    assert body not in elided_bodies(small) and body in elided_bodies(large)
    decoded = part_data(small)
    assert part_data(large) == decoded == b64_decode(body)
    if expected is not None:
        assert decoded == expected * copies


@st.composite
def uuencoded(draw: st.DrawFn) -> bytes:
    """uuencoded text as mailers write it, and broken: no begin line, bad modes, short or
    long lines, missing end, junk and blank lines."""
    data = draw(st.binary(max_size=200))
    lines = [binascii.b2a_uu(data[i : i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    lines = [b"begin 644 f.bin", *lines, b"`", b"end"]
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(lines)))
        junk = [b"", b"begin x f", b"begin 755", b"M" + b"!" * 70, b"#86)C", b" end ", b"\xff"]
        lines.insert(at, draw(st.sampled_from(junk)))
    if draw(st.booleans()):
        del lines[draw(st.integers(0, len(lines) - 1))]
    newline = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    return newline.join(lines) + draw(st.sampled_from([newline, b""]))


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(text=uuencoded(), chunk=st.integers(1, 64))
def test_property_uudecoding_a_chunk_of_lines_at_a_time_is_the_stdlibs(
    text: bytes, chunk: int
) -> None:
    """The stdlib splits the whole text into lines at once (twice its size for 20 MB)."""
    try:
        expected: bytes | str = stdlib_decode_uu(text)
    except ValueError as exc:
        expected = str(exc)
    try:
        got: bytes | str = uu_decode(text, chunk)
    except ValueError as exc:
        got = str(exc)
    assert got == expected
