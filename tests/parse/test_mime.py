"""engine.parse.mime: limits refused quickly by the pre-scan, before the stdlib parser can
recurse or go quadratic; large bodies taken from the raw bytes parsing as through the parser;
and the fast MIME split held equal to the feed parser's tree."""

from __future__ import annotations

import base64
import binascii
import email as stdlib_email
import os
import re
from dataclasses import replace
from datetime import timedelta
from email.message import Message
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from samples import (
    ALL_CASES,
    BOUNDARY,
    ELISION_FILLER,
    TYPES,
    ZIP,
    attached,
    elided_bodies,
    header_block,
    load,
    multipart,
    raw_fuzz,
    raw_message,
    simple,
    timed_refusal,
    top,
)

import engine.parse.mime
from engine.errors import LimitExceeded, MessageError, ParseError
from engine.model import ParsedMessage
from engine.parse import ParseLimits, parse_message
from engine.parse.bodies import payload_bytes
from engine.parse.mime import (
    HEADER_END_RE,
    _blank_line_end,
    _BlockEnds,
    _split_mime,
    prescan,
    read_mime,
)

# ------------------------------------------------------------------------------------------
# Limits: refused quickly, before the stdlib parser can recurse or go quadratic
# ------------------------------------------------------------------------------------------


def test_2000_nested_multiparts() -> None:
    raw = b"Subject: nested\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(2000)
    )
    error = timed_refusal(raw + b"x\r\n")
    assert "max_depth" in str(error) and "50" in str(error)


def forwarded_as_attachment(times: int) -> bytes:
    """A message forwarded as an attachment ``times`` times over (two levels each)."""
    raw = simple(
        'Subject: first\nContent-Type: multipart/alternative; boundary="alt"\n',
        b"--alt\r\nContent-Type: text/plain\r\n\r\nthe first words\r\n--alt\r\n"
        b"Content-Type: text/html\r\n\r\n<p>the first words</p>\r\n--alt--\r\n",
    )
    for i in range(times):
        raw = simple(
            f'Subject: Fwd {i}\nContent-Type: multipart/mixed; boundary="f{i}"\n',
            f"--f{i}\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--f{i}\r\n"
            "Content-Type: message/rfc822\r\n\r\n".encode()
            + raw
            + f"\r\n--f{i}--\r\n".encode(),
        )
    return raw


def test_an_escalation_forwarded_as_attachment_twenty_times_is_read() -> None:
    """Each forward as attachment nests two levels: 20 levels refused a chain of ten."""
    raw = forwarded_as_attachment(20)
    msg = parse_message(raw)
    assert msg.subject == "Fwd 19" and msg.body == "see attached"
    [eml] = msg.attachments
    assert eml.name == "Fwd 18.eml" and b"the first words" in eml.data and eml.data in raw
    assert "max_depth" in str(timed_refusal(forwarded_as_attachment(30)))


def test_nested_attached_messages() -> None:
    raw = (
        b"Subject: m\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 2000 + b"Subject: x\r\n\r\nx"
    )
    assert "max_depth" in str(timed_refusal(raw))


def test_depth_within_limit_is_accepted() -> None:
    raw = b"Subject: nested\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(5)
    )
    deep = parse_message(raw + b"Content-Type: text/plain\r\n\r\ndeep\r\n")
    assert deep.body.strip() == "deep"
    with pytest.raises(LimitExceeded):
        parse_message(raw + b"x", ParseLimits(max_depth=4))


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"])
def test_100000_parts(newline: bytes) -> None:
    raw = (
        b'Subject: parts\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * 100_000
        + b"--b--\r\n"
    ).replace(b"\r\n", newline)
    error = timed_refusal(raw)
    assert "max_parts" in str(error) and "500" in str(error)


def pasted_source(levels: int, lines: int) -> bytes:
    """A forwarded message shown as text: its MIME structure is body text, not parts."""
    out = b"Forwarded message source:\r\n"
    for i in range(levels):
        out += b'Content-Type: multipart/mixed; boundary="p%d"\r\n\r\n--p%d\r\n' % (i, i)
    out += b"Content-Type: message/rfc822\r\n\r\n" * levels
    return out + b"--p0\r\nContent-Type: text/plain\r\n\r\nx\r\n" * lines + b"--p0--\r\n"


@pytest.mark.parametrize("ctype", ["text/plain", "text/rfc822-headers"])
def test_multipart_lines_pasted_into_a_body_count_as_neither_nesting_nor_parts(
    ctype: str,
) -> None:
    """Issue 12 item 17d: body text with pasted Content-Type lines was refused as nesting."""
    pasted = pasted_source(levels=30, lines=600)
    single = simple(f"Subject: pasted\nContent-Type: {ctype}\n", pasted)
    assert parse_message(single).body.replace("\n", "\r\n") == (
        pasted.decode() if ctype == "text/plain" else ""
    )
    in_part = simple(
        'Subject: pasted\nContent-Type: multipart/mixed; boundary="real"\n',
        b"--real\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--real\r\n"
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + pasted + b"\r\n--real--\r\n",
    )
    msg = parse_message(in_part)
    if ctype == "text/plain":
        # Issue 20 item 2: a second inline text part belongs to the body.
        assert msg.body == "see below\n\n" + pasted.decode().replace("\r\n", "\n")
        assert msg.attachments == ()
    else:
        assert msg.body == "see below"
        assert len(msg.attachments) == 1
        assert msg.attachments[0].data == pasted


def test_only_the_first_content_type_of_a_header_block_nests() -> None:
    header = 'Content-Type: multipart/mixed; boundary="b"\r\n' * 40
    raw = b"Subject: twice\r\n" + header.encode() + b"\r\n--b\r\n\r\nx\r\n--b--\r\n"
    assert parse_message(raw).body == "x"


def test_nesting_through_parts_and_attached_messages_is_still_refused_quickly() -> None:
    level = (
        b'Content-Type: multipart/mixed; boundary="b%d"\r\nX-Pad: y\r\n\r\n--b%d\r\n'
        b"Content-Type: message/rfc822\r\n\r\n"
    )
    raw = b"Subject: deep\r\n" + b"".join(level % (i, i) for i in range(1000)) + b"\r\nx\r\n"
    error = timed_refusal(raw)
    assert "max_depth" in str(error)
    # Header blocks without a blank line: the delimiter line ends them.
    raw = b"Subject: s\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\nX: y\r\n--b%d\r\n' % (i, i)
        for i in range(2000)
    )
    assert "max_depth" in str(timed_refusal(raw))
    raw = (
        b'Subject: s\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + (b"--b\r\nContent-Type: text/plain\r\n" + b"X: y\r\n" * 10) * 100_000
    )
    assert "max_parts" in str(timed_refusal(raw))


@settings(max_examples=500, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(
    data=st.lists(st.sampled_from([b"\r", b"\n", b"x", b"\r\n"]), max_size=30).map(b"".join),
    start=st.integers(0, 10),
    window=st.integers(0, 40),
)
def test_property_blank_lines_are_found_as_the_regular_expression_finds_them(
    data: bytes, start: int, window: int
) -> None:
    m = HEADER_END_RE.search(data, start, start + window)
    assert _blank_line_end(data, start, start + window) == (None if m is None else m.end())


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(
    lines=st.lists(st.sampled_from([b"X: y", b"", b"\r", b"--b", b"a" * 30]), max_size=40),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    window=st.integers(1, 80),
    picks=st.lists(st.integers(0, 40), max_size=10),
)
def test_property_header_block_ends_are_found_as_by_a_search_from_each_start(
    lines: list[bytes], newline: bytes, window: int, picks: list[int]
) -> None:
    data = b"".join(line + newline for line in lines)
    starts = [0] + [m.end() for m in re.finditer(rb"\n", data)]
    ends = _BlockEnds(data, window)
    for start in sorted({starts[i] for i in picks if i < len(starts)}):
        naive = _blank_line_end(data, start, start + window)
        if data.startswith((b"\n", b"\r"), start):
            naive = start  # an empty line: CRLF, LF or a bare CR
        assert ends(start) == (len(data) if naive is None else naive)


def test_empty_boundary_parts_are_counted() -> None:
    raw = (
        b'Subject: e\r\nContent-Type: multipart/mixed; boundary=""\r\n\r\n'
        + b"--\r\nx\r\n" * 100_000
    )
    assert "max_parts" in str(timed_refusal(raw))


def test_oversized_header_block() -> None:
    raw = b"Subject: big\r\n" + (b"X-Junk: " + b"a" * 80 + b"\r\n") * 12_000 + b"\r\nbody"
    assert "max_header_bytes" in str(timed_refusal(raw))


def test_quadratic_parameter_lists() -> None:
    raw = simple(
        'Subject: s\nContent-Type: multipart/mixed; boundary="b"\n',
        b'--b\r\nContent-Type: multipart/mixed; boundary="c"; name="'
        + b";" * 200_000
        + b'"\r\n\r\n--c--\r\n--b--\r\n',
    )
    assert "max_header_params" in str(timed_refusal(raw))


def test_boundary_in_a_hostile_charset_is_refused() -> None:
    raw = simple(
        "Subject: z\nContent-Type: multipart/mixed; boundary*=zlib_codec''%78%9c\n", b"--x\r\n"
    )
    with pytest.raises(ParseError, match="charset"):
        parse_message(raw)


def container_depth_and_parts(msg: Message) -> tuple[int, int]:
    """(Nesting of containers, parts of multiparts) in a stdlib tree."""
    depth = parts = 0
    stack = [(msg, 1)]
    while stack:
        part, level = stack.pop()
        payload = part._payload  # type: ignore[attr-defined]
        if isinstance(payload, list):
            depth = max(depth, level)
            if part.get_content_maintype() == "multipart":
                parts += len(payload)
            stack += [(p, level + 1) for p in payload if isinstance(p, Message)]
    return depth, parts


@st.composite
def raw_message_with_pasted_headers(draw: st.DrawFn) -> bytes:
    """raw_message, with Content-Type and delimiter lines pasted somewhere in its text."""
    raw = draw(raw_message())
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(raw)))
        boundary = draw(st.sampled_from([b"b", b"b0", b"b1", b"", b"p"]))
        pasted = draw(
            st.sampled_from(
                [
                    b'\r\nContent-Type: multipart/mixed; boundary="' + boundary + b'"\r\n',
                    b"\r\nContent-Type: message/rfc822\r\n\r\n",
                    b"\r\n--" + boundary + b"\r\n",
                    b"\r\n\r\n",
                ]
            )
        )
        raw = raw[:at] + pasted + raw[at:]
    return raw


@raw_fuzz(300)
@given(raw=raw_message_with_pasted_headers())
@example(  # a bare CR, then a CRLF: the blank line ends after the LF
    raw=b"Content-Type: message/delivery-status; charset=utf-8\r\r\n"
    b"Content-Type: message/rfc822\r\n\r\n\nContent-Transfer-Encoding: base64\r\n\r\n"
)
@example(  # a digest's part is a message unless its (parser's) header block says otherwise
    raw=b'Content-Type: multipart/digest; boundary="b1"\r\n\r\n--b1\r\x00\n'
    b"Content-Type: text/plain\r\n\r\nx\r\n"
)
def test_property_the_pre_scan_never_counts_less_nesting_or_parts_than_the_parser(
    raw: bytes,
) -> None:
    """What the pre-scan lets through, the stdlib parser cannot nest deeper or split more."""
    depth, parts = container_depth_and_parts(stdlib_email.message_from_bytes(raw))
    generous = ParseLimits(max_depth=1000, max_parts=100_000, max_header_params=10_000)
    try:
        prescan(raw, generous)
    except MessageError:
        return
    if depth > 1:
        with pytest.raises(LimitExceeded, match="max_depth"):
            prescan(raw, replace(generous, max_depth=depth - 1))
    if parts > 0:
        with pytest.raises(LimitExceeded, match="max_parts"):
            prescan(raw, replace(generous, max_parts=parts - 1))


# ------------------------------------------------------------------------------------------
# Large bodies taken from the raw bytes parse as through the parser
# ------------------------------------------------------------------------------------------
# Messages over 2 MiB have their parts of 256 KiB or more taken from the raw bytes (elided
# from the stdlib parser's sight); smaller ones go through the parser. Both must read alike.


LARGE_LINES = [
    b"plain text, caf\xc3\xa9\r\n",
    b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n",
    b"--b\r\n",
    b"--b0\r\n",
    b"-- \r\n",
    b'Content-Type: multipart/mixed; boundary="b"\r\n',
    b"Content-Type: message/rfc822\r\n",
    b"\r\n",
    b"=C3=A9 soft break=\r\n",
    b"begin 644 x.bin\r\n",
    b"M86)C9&5F9VAI:FML;6YO<'%R<W1U=G=X>7I!0D-$149'2$E*2TQ-3D]045)3\r\n",
    b"\r",
    b"\x00\xff",
]


@st.composite
def large_body(draw: st.DrawFn) -> bytes:
    """A body of a few lines, repeated past the size of part taken from the raw bytes."""
    text = b"".join(draw(st.lists(st.sampled_from(LARGE_LINES), min_size=1, max_size=6)))
    return text * (300 * 1024 // len(text) + 1)


@st.composite
def large_mime_entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    """mime_entity with large leaves, boundaries reused between levels, and more."""
    kinds = ["leaf", "leaf", "multipart", "message"] if depth < 3 else ["leaf"]
    kind = draw(st.sampled_from(kinds))
    if kind == "multipart":
        boundary = draw(st.sampled_from([b"b", b"b0", b"c%d" % depth, b""]))
        subtype = draw(st.sampled_from([b"mixed", b"alternative", b"digest", b"related"]))
        children = draw(st.lists(large_mime_entity(depth + 1), min_size=1, max_size=3))
        body = draw(st.sampled_from([b"", b"preamble\r\n"]))
        for child in children:
            body += b"--" + boundary + b"\r\n" + child + b"\r\n"
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n" + draw(st.sampled_from([b"", b"epilogue"]))
        ctype = b"multipart/" + subtype + b'; boundary="' + boundary + b'"'
        return draw(header_block(ctype)) + body
    if kind == "message":
        return draw(header_block(b"message/rfc822")) + draw(large_mime_entity(depth + 1))
    ctype = draw(st.sampled_from(TYPES)).encode("utf-8")
    body = draw(large_body()) if draw(st.booleans()) else draw(st.binary(max_size=100))
    return draw(header_block(ctype)) + body


@st.composite
def large_message(draw: st.DrawFn) -> bytes:
    raw = draw(large_mime_entity())
    if len(raw) <= 2 * 1024 * 1024:
        raw = top(multipart(raw, ZIP + ELISION_FILLER))
    return raw.replace(b"\r\n", draw(st.sampled_from([b"\r\n", b"\n", b"\r"])))


@pytest.mark.interpreted_parser
@raw_fuzz(25)
@given(raw=large_message())
def test_property_large_bodies_taken_from_the_raw_bytes_parse_as_through_the_parser(
    raw: bytes,
) -> None:
    """Whatever the tree, transfer encodings, line ends and body text: the same result with
    the bodies taken from the raw bytes as with every body through the parser."""
    try:
        reference: ParsedMessage | str = parse_without_elision(raw)
    except MessageError as exc:
        reference = str(exc)
    try:
        elided: ParsedMessage | str = parse_message(raw)
    except MessageError as exc:
        elided = str(exc)
    assert elided == reference


def parse_without_elision(raw: bytes) -> ParsedMessage:
    """The reference: every body goes through the stdlib parser, whatever its size."""
    with mock.patch.object(engine.parse.mime, "_ELIDE_FROM", 1 << 40):
        return parse_message(raw)


BIG_B64 = base64.encodebytes(os.urandom(300 * 1024))
BIG_TEXT = b"".join(b"line %d of a long report, caf\xc3\xa9 and all\r\n" % i for i in range(9000))
BIG_QP = BIG_TEXT.replace(b"\xc3\xa9", b"=C3=A9").replace(b"all\r\n", b"all=\r\n and more\r\n")
UU_DATA = os.urandom(300 * 1024)
UU_TEXT = b"".join(
    binascii.b2a_uu(UU_DATA[i : i + 45]).replace(b"\n", b"\r\n") for i in range(0, len(UU_DATA), 45)
)


def big_message(*parts: bytes) -> bytes:
    """A message over the elision threshold: ``parts``, then a 2.8 MB attachment."""
    return top(multipart(*parts, ZIP + ELISION_FILLER))


ELISION_SHAPES = {
    "single-part text": top(BIG_TEXT * 8, "text/plain; charset=utf-8"),
    "single-part quoted-printable": (
        b"From: a@example.org\r\nSubject: big\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + BIG_QP * 8
    ),
    "single-part with a non-header line in its header block": (
        b"From: a@example.org\r\nnot a header\r\nSubject: x\r\n\r\n" + BIG_TEXT * 8
    ),
    "text, quoted-printable, html and base64 parts": big_message(
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + BIG_TEXT,
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: "
        b"quoted-printable\r\n\r\n<p>" + BIG_QP + b"</p>",
        b"Content-Type: text/plain; name=report.txt\r\n"
        b"Content-Transfer-Encoding: base64 \r\n\r\n" + base64.encodebytes(BIG_TEXT),
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
        b"begin 644 a.pdf\r\n" + UU_TEXT + b"`\r\nend\r\n",
    ),
    # A message pasted into a text body: its "delimiters" are text, not parts.
    "pasted multipart in a text body": big_message(
        b"Content-Type: text/plain\r\n\r\nForwarded:\r\n"
        b'Content-Type: multipart/mixed; boundary="pasted"\r\n\r\n--pasted\r\n'
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + BIG_B64 + b"--pasted--\r\nend of the forwarded text",
    ),
    # A text body with a line that starts like the enclosing delimiter.
    "a delimiter-like line in a body": big_message(
        b"Content-Type: text/plain\r\n\r\n"
        + BIG_TEXT
        + f"--{BOUNDARY}x is not a delimiter\r\n".encode()
        + BIG_TEXT,
    ),
    "a non-header line in a part's header block": big_message(
        b"Content-Type: application/octet-stream\r\nnot a header\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + BIG_B64,
    ),
    "two transfer encodings": big_message(
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 7bit\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + BIG_B64,
    ),
    "a digest part without a content type": big_message(
        b'Content-Type: multipart/digest; boundary="dig"\r\n\r\n'
        + multipart(b"\r\nSubject: digested\r\n\r\n" + BIG_TEXT, boundary="dig"),
    ),
    # An attached message whose multipart reuses the outer boundary: the parser gives each
    # delimiter line to the innermost multipart with that boundary, and so does the scan.
    "an attached message sharing the outer boundary": big_message(
        b"Content-Type: text/plain\r\n\r\nsee attached",
        attached(top(multipart(b"Content-Type: text/plain\r\n\r\ninner", ZIP + BIG_B64))),
        b"Content-Type: text/plain\r\n\r\nafter the attached message",
    ),
    # An attached message after an mbox envelope line: its exact span does not start with
    # its first header, so its bytes are rebuilt from the parsed tree, big parts included.
    "an attached message rebuilt from the tree": big_message(
        b"Content-Type: text/plain\r\n\r\nsee attached",
        attached(
            b"From sender@example.org Thu Nov 27 09:00:00 2026\r\n"
            + top(
                multipart(
                    b"Content-Type: text/plain\r\n\r\ninner",
                    b"Content-Type: text/plain; name=report.txt\r\n\r\n" + BIG_TEXT,
                    b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: "
                    b"base64\r\n\r\n" + BIG_B64,
                    boundary="inner",
                ),
                'multipart/mixed; boundary="inner"',
            )
        ),
    ),
}


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"])
@pytest.mark.interpreted_parser
@pytest.mark.parametrize("name", sorted(ELISION_SHAPES))
def test_large_bodies_taken_from_the_raw_bytes_parse_as_through_the_parser(
    name: str, newline: bytes
) -> None:
    """Bare CR line ends were left to the parser whole (8 to 16 times the message)."""
    raw = ELISION_SHAPES[name].replace(b"\r\n", newline)
    assert len(raw) > 2 * 1024 * 1024
    if name != "single-part with a non-header line in its header block":
        assert elided_bodies(raw)
    assert parse_message(raw) == parse_without_elision(raw)


def test_two_trees_read_side_by_side_each_give_their_own_large_bodies() -> None:
    """A large body is read from the MimeTree passed in, not from whichever parse ran last."""
    files = [os.urandom(400 * 1024) for _ in range(2)]
    pdf = b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    trees = [read_mime(big_message(pdf + base64.encodebytes(f)), ParseLimits()) for f in files]
    for tree, data in reversed(list(zip(trees, files, strict=True))):
        [part] = [p for p in tree.root.walk() if p.get_content_type() == "application/pdf"]
        payload = part.get_payload()
        assert isinstance(payload, str) and tree.elided_span(payload) is not None  # elided
        assert payload_bytes(part, "base64", tree) == data


def test_an_attached_message_rebuilt_from_the_tree_keeps_its_large_parts() -> None:
    raw = ELISION_SHAPES["an attached message rebuilt from the tree"]
    assert BIG_TEXT in elided_bodies(raw) and BIG_B64 in elided_bodies(raw)
    [eml] = [a.data for a in parse_message(raw).attachments if a.name.endswith(".eml")]
    assert BIG_TEXT in eml and BIG_B64 in eml
    inner = parse_message(eml)
    assert inner.body == "inner"
    assert [a.data for a in inner.attachments] == [BIG_TEXT, base64.b64decode(BIG_B64)]


def test_a_rebuilt_attached_message_keeps_its_8bit_octets_whatever_its_charset() -> None:
    """The stdlib's get_payload() decodes 8-bit text with the declared charset (here utf-7,
    which turns "+ADw-" into "<"): the attached message must keep its octets."""
    body = b"caf\xe9 +ADw-script+AD4- \xff"
    inner = top(
        multipart(b"Content-Type: text/plain; charset=utf-7\r\n\r\n" + body, boundary="in"),
        'multipart/mixed; boundary="in"',
    )
    envelope = b"From sender@example.org Thu Nov 27 09:00:00 2026\r\n"
    raw = top(multipart(b"Content-Type: text/plain\r\n\r\nsee", attached(envelope + inner)))
    [eml] = [a.data for a in parse_message(raw).attachments if a.name.endswith(".eml")]
    assert body in eml


# ------------------------------------------------------------------------------------------
# The fast MIME split gives the feed parser's tree
# ------------------------------------------------------------------------------------------
# These reach into engine.parse.mime's internals on purpose: what they check is the equality
# of a fast path with the stdlib, which no public result shows in every case.


def message_tree(msg: Message) -> object:
    """Everything of a compat32 Message that parsing sets, recursively."""
    payload = msg._payload  # type: ignore[attr-defined]
    if isinstance(payload, list):
        payload = [message_tree(part) for part in payload]
    return (
        msg._headers,  # type: ignore[attr-defined]
        msg.get_unixfrom(),
        payload,
        msg.preamble,
        msg.epilogue,
        msg.get_default_type(),
        msg.get_content_type(),  # the fast path's is kept from when its header was read
    )


def assert_split_like_the_feed_parser(raw: bytes) -> bool:
    """True if the fast path took ``raw`` (and then built the stdlib's very tree)."""
    if raw.count(b"\r") != raw.count(b"\r\n"):
        return False  # bare CR line ends are never given to the fast path
    tree = _split_mime(raw)
    if tree is None:
        return False
    assert message_tree(tree) == message_tree(stdlib_email.message_from_bytes(raw))
    return True


MIME_SHAPES = {
    "nested": (
        b'Content-Type: multipart/mixed; boundary="out"\r\n\r\npreamble\r\n--out\r\n'
        b'Content-Type: multipart/alternative; boundary="in"\r\n\r\n--in\r\n'
        b"Content-Type: text/plain\r\n\r\nplain\r\n\r\n--in  \r\nContent-Type: text/html\r\n\r\n"
        b"<p>html</p>\r\n--in--\r\nepilogue of in\r\n\r\n--out\r\n"
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n--out--\r\n"
        b"\r\nepilogue\r\n"
    ),
    "digest": (
        b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: one\n\n1\n--d\n"
        b"Content-Type: text/plain\n\n2\n--d--"
    ),
    "no close delimiter": (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX-A: 1\r\n continued\r\n"
        b"\r\nbody\r\n--bx\r\nnot a delimiter\r\n"
    ),
    "header block without blank line": b"Subject: s\r\nnot a header\r\nbody\r\n",
    "nested close missing": (
        b"Content-Type: multipart/mixed; boundary=a\n\n--a\n"
        b"Content-Type: multipart/mixed; boundary=a1\n\n--a1\n\nx\n--a\n\ny\n--a--\n"
    ),
}
DSN_REPORT = (
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="r"\r\n\r\n'
    b"--r\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n"
    b"--r\r\nContent-Type: message/delivery-status\r\n\r\n"
    b"Reporting-MTA: dns; mx.example.org\r\nArrival-Date: Thu, 27 Nov 2026\r\n 09:00:00 +0000"
    b"\r\n\r\nFinal-Recipient: rfc822; a@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    b"%s--r\r\nContent-Type: message/rfc822\r\n\r\nSubject: original\r\n\r\nhello\r\n"
    b"--r--\r\n"
)
MIME_SHAPES |= {
    "delivery status": b"Content-Type: message/delivery-status\n\nA: b\n\nC: d\n",
    "delivery status, empty": b"Content-Type: message/delivery-status\r\n\r\n",
    "delivery status, blank lines around": (
        b"Content-Type: message/delivery-status\n\n\nA: b\n\n\n\nC: d\n continued\n\n"
    ),
    "delivery status, no final line end": (
        b"Content-Type: message/delivery-status\r\n\r\nA: b\r\n\r\nC: d"
    ),
    "delivery status in a report": DSN_REPORT % b"",
    "delivery status in a report, blank line last": DSN_REPORT % b"\r\n",
    "delivery status in a report, blank lines last": DSN_REPORT % b"\r\n\r\n",
}
IRREGULAR_SHAPES = {
    "envelope line": b"From someone@example.org Thu Nov 27 09:00:00 2026\r\nSubject: s\r\n\r\nx",
    "repeated delimiters": b"Content-Type: multipart/mixed; boundary=b\n\n--b\n--b\n\nx\n--b--\n",
    "no first delimiter": b"Content-Type: multipart/mixed; boundary=b\n\nx\n--b--\n",
    "delivery status with a non-field line": (
        b"Content-Type: message/delivery-status\n\nA: b\nnot a field\n\nC: d\n"
    ),
    "delivery status block continued first": (
        b"Content-Type: message/delivery-status\n\nA: b\n\n folded\nC: d\n"
    ),
    "first line continued": b" folded\r\nSubject: s\r\n\r\nx",
}


@pytest.mark.parametrize("case", ALL_CASES)
def test_fast_mime_split_of_the_corpus_is_the_feed_parsers_tree(case: str) -> None:
    assert_split_like_the_feed_parser(load(case))


@pytest.mark.parametrize("name", sorted(MIME_SHAPES))
def test_fast_mime_split_follows_the_feed_parser(name: str) -> None:
    assert assert_split_like_the_feed_parser(MIME_SHAPES[name])


@pytest.mark.parametrize("name", sorted(IRREGULAR_SHAPES))
def test_irregular_mime_shapes_are_left_to_the_feed_parser(name: str) -> None:
    assert _split_mime(IRREGULAR_SHAPES[name]) is None


@raw_fuzz(300)
@given(raw=raw_message())
def test_property_fast_mime_split_is_the_feed_parsers_tree(raw: bytes) -> None:
    assert_split_like_the_feed_parser(raw)


dsn_line = st.one_of(
    st.sampled_from(["Action: failed", "Status: 5.1.1", "X-Odd:", " folded", "\tfolded"]),
    st.sampled_from(["Final-Recipient: rfc822; ", "Diagnostic-Code: smtp; 550 "]).flatmap(
        lambda name: st.text(st.characters(codec="latin-1"), max_size=12).map(
            lambda v: name + v.replace("\r", " ").replace("\n", " ")
        )
    ),
    st.sampled_from(["", "", "", "not a field", "From x"]),
)


@st.composite
def delivery_status(draw: st.DrawFn) -> bytes:
    """A message/delivery-status, alone or in a multipart/report: blocks of fields and
    blank lines, with now and then a line that is neither."""
    newline = draw(st.sampled_from(["\r\n", "\n"]))
    body = newline.join(draw(st.lists(dsn_line, max_size=12)))
    body += draw(st.sampled_from(["", newline, newline * 2]))
    part = "Content-Type: message/delivery-status" + newline * 2 + body
    if draw(st.booleans()):
        return part.encode("latin-1")
    report = newline.join(
        [
            'Content-Type: multipart/report; boundary="r"',
            "",
            "--r",
            part,
            "--r",
            "Content-Type: text/plain",
            "",
            "x",
            "--r--",
            "",
        ]
    )
    return report.encode("latin-1")


@raw_fuzz(300)
@given(raw=delivery_status())
def test_property_fast_split_of_a_delivery_status_is_the_feed_parsers_tree(raw: bytes) -> None:
    taken = assert_split_like_the_feed_parser(raw)
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    # Every DSN whose lines are all fields or blank is taken (before, none was).
    if all(
        not line
        or b": " in line
        or line.endswith(b":")
        or line.startswith(b"--r")
        or line.startswith(b"Content-Type")
        for line in lines
    ):
        assert taken


@pytest.mark.interpreted_parser
@pytest.mark.parametrize("line_end", [b"\r\n", b"\n", b"\r"])
def test_a_message_is_searched_for_bare_crs_once(line_end: bytes) -> None:
    """The pre-scan's answer (Scan.bare_cr) is what the parser's fast path is given for the
    same bytes, rather than a second search of the whole message."""
    raw = (
        b"From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nSee the log.\r\n--b--\r\n"
    ).replace(b"\r\n", line_end)
    real = engine.parse.mime._BARE_CR_RE
    searches = mock.Mock(wraps=real)
    with mock.patch.object(engine.parse.mime, "_BARE_CR_RE", searches):
        parsed = parse_message(raw)
    assert parsed.body.startswith("See the log.")
    assert searches.search.call_count <= 1
