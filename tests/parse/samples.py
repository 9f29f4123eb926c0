"""Messages, builders and strategies that the parser's tests share (tests/parse/).

The corpus in tests/corpus/ holds one real-looking message per case; hostile and oversized
messages are built here and in the test modules instead, so that the corpus stays small and
readable.
"""

from __future__ import annotations

import base64
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from engine.errors import LimitExceeded
from engine.model import ParsedMessage
from engine.parse import ParseLimits, parse_message
from engine.parse.mime import (
    elide_large_bodies,
    header_end,
    prescan,
)

CORPUS = Path(__file__).parents[1] / "corpus"
ALL_CASES = sorted(p.stem for p in CORPUS.glob("*.eml"))
CRLF_RE = re.compile(r"[\r\n\x00]")
# CPU seconds (time.process_time) every refusal of a hostile message stays under: the bound is
# on the work, which a loaded machine does not stretch, where wall time went from 0.2 s to over
# 1 s at a load average of 10 on 2 cores.
FAST = 1.0


def load(name: str) -> bytes:
    return (CORPUS / f"{name}.eml").read_bytes()


def parse(name: str) -> ParsedMessage:
    return parse_message(load(name))


def timed_refusal(raw: bytes, limits: ParseLimits | None = None) -> LimitExceeded:
    start = time.process_time()
    with pytest.raises(LimitExceeded) as info:
        parse_message(raw, limits or ParseLimits())
    assert time.process_time() - start < FAST
    return info.value


def simple(headers: str, body: bytes = b"Hello.\r\n") -> bytes:
    return headers.replace("\n", "\r\n").encode("ascii") + b"\r\n" + body


# ------------------------------------------------------------------------------------------
# Random messages: MIME trees, headers, charsets and bytes
# ------------------------------------------------------------------------------------------

CHARSET_LABELS = [
    "utf-8",
    "iso-8859-1",
    "windows-1252",
    "koi8-r",
    "shift_jis",
    "gb2312",
    "iso-2022-jp",
    "utf-16",
    "utf-7",
    "x-unknown",
    "rot13",
    "zlib_codec",
    "base64_codec",
    "unicode_escape",
    "punycode",
    "idna",
    "",
    "us-ascii",
    'bogus"',
    "utf-8*en",
]
ENCODINGS = [
    "base64",
    "quoted-printable",
    "7bit",
    "8bit",
    "binary",
    "x-uuencode",
    "Base64 ",
    "bogus",
]
TYPES = [
    "text/plain",
    "text/html",
    "text/calendar",
    "application/pdf",
    "application/ms-tnef",
    "image/png",
    "message/delivery-status",
    "bogus",
    "text/\xe9",
]

text_or_bytes = st.one_of(
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=30),
)


@st.composite
def encoded_word(draw: st.DrawFn) -> bytes:
    charset = draw(st.sampled_from(CHARSET_LABELS)) or "utf-8"
    payload = draw(st.binary(max_size=20))
    if draw(st.booleans()):
        body = base64.b64encode(payload)[: draw(st.integers(0, 40))]
        return b"=?" + charset.encode() + b"?b?" + body + b"?="
    return b"=?" + charset.encode() + b"?q?" + payload.replace(b"?", b"=3F") + b"?="


header_value = st.lists(st.one_of(text_or_bytes, encoded_word()), max_size=4).map(b" ".join)


@st.composite
def header_block(draw: st.DrawFn, ctype: bytes) -> bytes:
    lines = [b"Content-Type: " + ctype]
    names = [b"Subject", b"From", b"To", b"Date", b"Message-ID", b"References", b"Return-Path"]
    names += [b"Auto-Submitted", b"Precedence", b"Content-ID", b"X-Random"]
    for name in draw(st.lists(st.sampled_from(names), max_size=5)):
        lines.append(name + b": " + draw(header_value))
    if draw(st.booleans()):
        filename = draw(
            st.one_of(
                header_value.map(lambda v: b'filename="' + v + b'"'),
                st.tuples(st.sampled_from(CHARSET_LABELS), st.binary(max_size=20)).map(
                    lambda t: (
                        b"filename*="
                        + t[0].encode()
                        + b"''"
                        + "".join(f"%{b:02X}" for b in t[1]).encode()
                    )
                ),
            )
        )
        disposition = draw(st.sampled_from([b"attachment", b"inline", b"bogus"]))
        lines.append(b"Content-Disposition: " + disposition + b"; " + filename)
    lines.append(b"Content-Transfer-Encoding: " + draw(st.sampled_from(ENCODINGS)).encode())
    if draw(st.booleans()):
        lines.append(draw(st.binary(max_size=40)))
    return b"\r\n".join(lines) + b"\r\n\r\n"


@st.composite
def mime_entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    kind = draw(
        st.sampled_from(["leaf", "leaf", "multipart", "message"] if depth < 4 else ["leaf"])
    )
    if kind == "multipart":
        boundary = (
            draw(st.sampled_from([b"b", b"=_x", b"", b"b" * 70, b"sp ace"])) + str(depth).encode()
        )
        subtype = draw(
            st.sampled_from([b"mixed", b"alternative", b"related", b"report", b"digest"])
        )
        ctype = b"multipart/" + subtype + b'; boundary="' + boundary + b'"'
        if subtype == b"report":
            ctype += b"; report-type=delivery-status"
        children = draw(st.lists(mime_entity(depth + 1), max_size=4))
        body = draw(st.binary(max_size=20)) + b"\r\n"
        for child in children:
            body += b"--" + boundary + b"\r\n" + child + b"\r\n"
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n"
        body += draw(st.binary(max_size=20))
        return draw(header_block(ctype)) + body
    if kind == "message":
        return draw(header_block(b"message/rfc822")) + draw(mime_entity(depth + 1))
    charset = draw(st.sampled_from(CHARSET_LABELS))
    ctype = draw(st.sampled_from(TYPES)).encode("utf-8")
    if charset:
        ctype += b"; charset=" + charset.encode()
    body = draw(st.one_of(st.binary(max_size=200), text_or_bytes))
    if draw(st.booleans()):
        body = base64.encodebytes(body)
    return draw(header_block(ctype)) + body


@st.composite
def raw_message(draw: st.DrawFn) -> bytes:
    raw = draw(st.one_of(mime_entity(), st.binary(max_size=500)))
    newline = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    raw = raw.replace(b"\r\n", newline)
    # A few random byte flips, insertions and cuts on top of the structure.
    for _ in range(draw(st.integers(0, 3))):
        if not raw:
            break
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + draw(st.binary(max_size=4)) + raw[at + draw(st.integers(0, 4)) :]
    return raw


def raw_fuzz(examples: int) -> settings:
    """Settings for properties over generated raw messages: repeatable, large inputs allowed."""
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=2),
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------------------
# Large messages: over 2 MiB, their large bodies are taken from the raw bytes
# ------------------------------------------------------------------------------------------

BOUNDARY = "=_Part_0_x9"
ELISION_FILLER = base64.encodebytes(os.urandom(2 * 1024 * 1024))


def elided_bodies(raw: bytes) -> list[bytes]:
    """The bodies of ``raw`` that the parser never sees (taken from the raw bytes instead)."""
    limits = ParseLimits()
    root_body = header_end(raw, limits.max_header_bytes)
    assert root_body is not None
    spans = elide_large_bodies(raw, prescan(raw, limits), root_body)[1].values()
    return [raw[start:end] for start, end in spans]


ZIP = b"Content-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"


def multipart(*parts: bytes, boundary: str = BOUNDARY) -> bytes:
    """The body of a multipart of ``parts`` (each a header block and a body)."""
    b = boundary.encode()
    return b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"


def top(body: bytes, ctype: str = f'multipart/mixed; boundary="{BOUNDARY}"') -> bytes:
    return f"From: a@example.org\r\nSubject: big\r\nContent-Type: {ctype}\r\n\r\n".encode() + body


def attached(message: bytes) -> bytes:
    return b"Content-Type: message/rfc822\r\n\r\n" + message
