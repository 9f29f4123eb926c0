"""engine.parse's entry points: the whole corpus, any input parsed or refused with a
MessageError, message_summary, the memory a parse takes, and the same results whether
messages are parsed one at a time, side by side in threads or in worker processes."""

from __future__ import annotations

import base64
import binascii
import contextvars
import hashlib
import importlib
import os
import pkgutil
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from samples import (
    ALL_CASES,
    CRLF_RE,
    ELISION_FILLER,
    FAST,
    ZIP,
    attached,
    elided_bodies,
    load,
    multipart,
    parse,
    raw_fuzz,
    raw_message,
    simple,
    timed_refusal,
    top,
)

import engine.parse
from engine.errors import LimitExceeded, MessageError, ParseError
from engine.model import ParsedMessage
from engine.parse import (
    ParseLimits,
    message_summary,
    parse_message,
    safe_filename,
    with_raw,
)
from engine.parsers import Worker


def single_line_fields(msg: ParsedMessage) -> list[str]:
    fields = [msg.subject, msg.from_name, msg.from_addr, *msg.to, *msg.references]
    fields += [x for x in (msg.message_id, msg.in_reply_to, msg.auto_reason) if x is not None]
    fields += [a.name for a in msg.attachments]
    fields += [a.content_id for a in msg.attachments if a.content_id is not None]
    return fields


# ------------------------------------------------------------------------------------------
# The whole corpus
# ------------------------------------------------------------------------------------------


def test_corpus_is_there() -> None:
    assert len(ALL_CASES) >= 40


@pytest.mark.parametrize("case", ALL_CASES)
def test_corpus_message_parses_with_single_line_headers(case: str) -> None:
    raw = load(case)
    msg = parse_message(raw)
    assert msg.raw is raw
    assert msg.sha256 == hashlib.sha256(raw).hexdigest()
    for value in single_line_fields(msg):
        assert not CRLF_RE.search(value), (case, value)
    for attachment in msg.attachments:
        assert safe_filename(attachment.name, "x") == attachment.name
    assert msg.date is None or msg.date.tzinfo is not None
    assert message_summary(raw) == (msg.message_id, msg.sha256)


# ------------------------------------------------------------------------------------------
# One plain message, field by field
# ------------------------------------------------------------------------------------------


def test_plain_utf8() -> None:
    msg = parse("plain-utf8")
    assert msg.subject == "Imprimante bloquée au 3ᵉ étage"
    assert msg.from_name == "Marie Dupont-Lefèvre"
    assert msg.from_addr == "marie.dupont@client.example.org"
    assert msg.to == ("servicedesk@example.com",)
    assert msg.message_id == "corpus-001.20261127@client.example.org"
    assert msg.date == datetime(2026, 11, 27, 9, 1, 7, tzinfo=timezone(timedelta(hours=1)))
    assert msg.body == (
        "Bonjour,\n\nL'imprimante du 3ᵉ étage est bloquée depuis ce matin.\n"
        "Merci d'avance — Marie ☕\n"
    )
    assert msg.html is None
    assert msg.attachments == ()
    assert (msg.auto_submitted, msg.auto_reason, msg.is_bounce) == (False, None, False)


def test_oversized_message() -> None:
    limits = ParseLimits(max_bytes=1000)
    error = timed_refusal(simple("Subject: big\n", b"x" * 2000), limits)
    assert "max_bytes" in str(error) and "1000" in str(error)


# ------------------------------------------------------------------------------------------
# Never any other exception; message_summary
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n",
        b"\r\n\r\n\r\n",
        bytes(range(256)) * 50,
        b"From nobody Thu Nov 27 09:00:00 2026\nSubject: mbox\n\nbody",
        b"Subject: x\r\nContent-Type: multipart/mixed\r\n\r\nno boundary\r\n",
        b"Subject: x\r\nContent-Type: text/plain; name*99999999999999999999*=x\r\n\r\n",
        b"Subject: x\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64===\r\n",
        b"Subject: x\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\n#86)C\r\n",
        b"Subject: \xff\xfe\x00\r\nFrom: \xe9\xe9 <\xe9@x.example>\r\nTo: ,,,,\r\n\r\n\xff",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"U3ViamVjdDogeA0KDQp5",
        b"Subject: =?utf-8?b?" + b"A" * 100_000 + b"?=\r\n\r\n",
        b"Subject: " + b"=?utf-8?q?" * 20_000 + b"\r\n\r\n",
        b"Date: Thu, 27 Nov 99999 09:00:00 +9999\r\n\r\n",
    ],
)
def test_odd_input_parses_or_raises_message_error(raw: bytes) -> None:
    try:
        msg = parse_message(raw)
    except MessageError:
        return
    assert isinstance(msg, ParsedMessage)


def test_bytes_like_input_is_accepted_and_anything_else_refused() -> None:
    raw = load("plain-utf8")
    assert parse_message(bytearray(raw)).subject == parse_message(raw).subject  # type: ignore[arg-type]
    assert parse_message(memoryview(raw)).sha256 == hashlib.sha256(raw).hexdigest()  # type: ignore[arg-type]
    with pytest.raises(ParseError, match="bytes"):
        parse_message("Subject: x\r\n\r\n")  # type: ignore[arg-type]


def test_message_summary_is_cheap_and_never_fails() -> None:
    raw = load("plain-utf8")
    assert message_summary(raw) == (
        "corpus-001.20261127@client.example.org",
        hashlib.sha256(raw).hexdigest(),
    )
    assert message_summary(b"") == (None, hashlib.sha256(b"").hexdigest())
    folded = b"Subject: x\r\nMessage-ID:\r\n <folded@example.org>\r\n\r\nbody"
    assert message_summary(folded)[0] == "folded@example.org"
    hostile = b"Subject: x\r\n" + b"X: y\r\n" * 200_000
    start = time.process_time()
    assert message_summary(hostile)[0] is None
    assert time.process_time() - start < FAST
    # The same id whether or not the message parses.
    unparseable = b"Message-ID: <id-1@example.org>\r\n" + b"X: y\r\n" * 200_000 + b"\r\n"
    with pytest.raises(LimitExceeded):
        parse_message(unparseable)
    assert message_summary(unparseable)[0] == "id-1@example.org"


SMALL = ParseLimits(max_depth=6, max_parts=40, max_header_bytes=4096, max_addresses=20)


@raw_fuzz(200)
@given(raw=raw_message(), small=st.booleans())
def test_property_any_input_parses_or_raises_message_error(raw: bytes, small: bool) -> None:
    try:
        msg = parse_message(raw, SMALL if small else ParseLimits())
    except MessageError as exc:
        assert isinstance(exc, LimitExceeded | ParseError)
        return
    assert isinstance(msg, ParsedMessage)
    for value in single_line_fields(msg):
        assert not CRLF_RE.search(value)
        value.encode("utf-8")  # no lone surrogate escaped from the raw bytes
    msg.body.encode("utf-8")
    if msg.html is not None:
        msg.html.encode("utf-8")
    for attachment in msg.attachments:
        assert safe_filename(attachment.name, "x") == attachment.name
    assert message_summary(raw)[1] == msg.sha256


# ------------------------------------------------------------------------------------------
# Memory: parsing a 20 MB message takes a small multiple of it, whatever its shape
# ------------------------------------------------------------------------------------------

MEMORY_PROBE = r"""
import gc, re, sys
from engine.parse import ParseLimits, parse_message

def kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))

parse_message(b"Subject: warm-up\r\nContent-Type: text/html\r\n\r\n<p>caf\xe9</p>")
with open(sys.argv[1], "rb") as f:
    raw = f.read()
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from the present RSS
except OSError:
    pass  # then the file's bytes, the largest allocation so far, set the peak before parsing
before = kib("VmRSS")
msg = parse_message(raw, ParseLimits(max_bytes=len(raw)))
print(kib("VmHWM") - before, len(msg.body), len(msg.attachments))
"""
MIB20 = 20 * 1024 * 1024
SHORT_LINES = b"".join(b"ok %d\r\n" % (i % 1000) for i in range(MIB20 // 7))
PROSE_LINE = b"The quick brown fox jumps over the lazy dog, caf\xc3\xa9 cr\xc3\xa8me, again.\r\n"


def twenty_mb(shape: str) -> bytes:
    """A message of about 20 MB of the given shape."""
    head = "From: a@example.org\r\nTo: b@example.org\r\nSubject: big\r\n"
    if shape == "short lines":
        return top(SHORT_LINES, "text/plain; charset=utf-8")
    if shape == "short lines ending in a bare CR":
        lines = SHORT_LINES.replace(b"\r\n", b"\r")
        return top(lines + lines[: 2 * 1024 * 1024], "text/plain; charset=utf-8")
    if shape == "base64 attachment with bare CR line ends":
        text = base64.encodebytes(os.urandom(MIB20 * 3 // 4)).replace(b"\n", b"\r")
        return top(multipart(ZIP + text)).replace(b"\r\n", b"\r")
    if shape == "short lines in a multipart":
        return top(multipart(b"Content-Type: text/plain\r\n\r\n" + SHORT_LINES))
    if shape == "one text/plain part":
        return top(PROSE_LINE * (MIB20 // len(PROSE_LINE)), "text/plain; charset=utf-8")
    if shape == "quoted-printable":
        line = (
            b"Caf=C3=A9 cr=C3=A8me =E2=80=94 the quick brown fox jumps over the la=\r\nzy dog.\r\n"
        )
        cte = "Content-Transfer-Encoding: quoted-printable\r\n"
        return (head + cte).encode() + top(line * (MIB20 // len(line)), "text/plain")
    if shape == "format=flowed":
        line = b"a flowed line of text that goes on \r\nand ends here.\r\n> quoted \r\n> more\r\n"
        return top(line * (MIB20 // len(line)), "text/plain; format=flowed; delsp=yes")
    if shape == "many small parts":
        part = ZIP + base64.encodebytes(os.urandom(32_000))  # 485 parts: under max_parts
        return top(multipart(*[part] * (MIB20 // len(part) + 1)))
    if shape == "long html":
        para = (
            b"<p>Hello <b>world</b> &amp; friends, <a href='https://example.org'>a link</a></p>\n"
        )
        return top(b"<html><body>" + para * (MIB20 // len(para)), "text/html; charset=utf-8")
    if shape == "html at the sanitizing limit":
        para = (
            b"<p>Hello <b>world</b> &amp; friends, <a href='https://example.org'>a link</a></p>\n"
        )
        html = b"Content-Type: text/html\r\n\r\n" + para * (2 * 1024 * 1024 // len(para))
        return top(multipart(html, ZIP + base64.encodebytes(os.urandom(MIB20 * 3 // 4 - 2**20))))
    if shape == "uuencoded attachment":
        data = os.urandom(MIB20 * 3 // 4)
        uu_lines = (binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45))
        uu = b"begin 644 a.pdf\r\n" + b"".join(uu_lines).replace(b"\n", b"\r\n") + b"`\r\nend\r\n"
        return top(
            multipart(
                b"Content-Type: application/pdf\r\n"
                b"Content-Transfer-Encoding: x-uuencode\r\n\r\n" + uu
            )
        )
    if shape == "attached message sharing the outer boundary":
        inner = top(multipart(b"Content-Type: text/plain\r\n\r\ninner", ZIP + ELISION_FILLER * 8))
        return top(multipart(b"Content-Type: text/plain\r\n\r\nsee", attached(inner)))
    if shape == "base64 attachment":
        return top(multipart(ZIP + base64.encodebytes(os.urandom(MIB20 * 3 // 4))))
    if shape == "base64 text":
        text = base64.encodebytes(PROSE_LINE * (MIB20 * 3 // 4 // len(PROSE_LINE)))
        return top(
            multipart(
                b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n" + text
            )
        )
    if shape == "joined base64 blobs":
        blobs = base64.encodebytes(os.urandom(MIB20 * 3 // 8 + 1)) * 2
        return top(multipart(ZIP + blobs))
    raise AssertionError(shape)


MEMORY_SHAPES = [
    "short lines",
    "short lines ending in a bare CR",
    "base64 attachment with bare CR line ends",
    "short lines in a multipart",
    "one text/plain part",
    "quoted-printable",
    "format=flowed",
    "many small parts",
    "long html",
    "html at the sanitizing limit",
    "uuencoded attachment",
    "attached message sharing the outer boundary",
    "base64 attachment",
    "base64 text",
    "joined base64 blobs",
]
MEMORY_BOUND = 4  # peak memory of a parse, as a multiple of the message (issue 12: 14 times)


@pytest.mark.parametrize("shape", MEMORY_SHAPES)
def test_parsing_20_mb_takes_a_small_multiple_of_the_message(shape: str, tmp_path: Path) -> None:
    """Issue 12 item 17e: a 20 MB message of short lines took 439 MiB to parse."""
    raw = twenty_mb(shape)
    assert MIB20 <= len(raw) <= 25 * 1024 * 1024
    path = tmp_path / "big.eml"
    path.write_bytes(raw)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
        cwd=Path(__file__).parents[2],
    ).stdout
    peak_kib, body, attachments = map(int, out.split())
    assert body > 0 or attachments > 0  # the message was read, not refused
    assert peak_kib * 1024 <= MEMORY_BOUND * len(raw), (
        f"{shape}: {peak_kib / 1024:.0f} MiB for {len(raw) / 2**20:.0f} MiB"
    )


# ------------------------------------------------------------------------------------------
# Pure: the same results in threads, in worker processes, and one at a time
# ------------------------------------------------------------------------------------------
# Large bodies are read from the raw bytes through the MimeTree a parse owns; they were handed
# over through a context variable (issue 13). Messages over the elision threshold, each with
# bytes of its own, parsed side by side must each come out as when parsed alone.

THREADS = 4


def large_message(rng: random.Random) -> bytes:
    """A message over 2 MiB whose large bodies are all taken from the raw bytes: a text body,
    a base64 attachment, and an attached message rebuilt from the tree (its span starts with
    an mbox envelope line) holding a large part."""
    text = b"".join(b"line %d of report %d\r\n" % (i, rng.randrange(10**6)) for i in range(16_000))
    inner = top(
        multipart(
            b"Content-Type: text/plain\r\n\r\ninner",
            ZIP + base64.encodebytes(rng.randbytes(300 * 1024)),
            boundary="inner",
        ),
        'multipart/mixed; boundary="inner"',
    )
    return top(
        multipart(
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text,
            ZIP + base64.encodebytes(rng.randbytes(1024 * 1024)),
            attached(b"From sender@example.org Thu Nov 27 09:00:00 2026\r\n" + inner),
        )
    )


@pytest.fixture(scope="module")
def large_messages() -> list[bytes]:
    rng = random.Random(13)
    raws = [large_message(rng) for _ in range(6)]
    for raw in raws:
        assert len(raw) > 2 * 1024 * 1024 and len(elided_bodies(raw)) == 3
    return raws


def test_no_module_of_the_parser_hands_data_over_in_a_context_variable() -> None:
    """Issue 13: the large-body fast path handed the raw bytes over in a ContextVar."""
    modules = [engine.parse]
    for info in pkgutil.iter_modules(getattr(engine.parse, "__path__", [])):
        modules.append(importlib.import_module(f"engine.parse.{info.name}"))
    side_channels = [
        f"{module.__name__}.{name}"
        for module in modules
        for name, value in vars(module).items()
        if isinstance(value, contextvars.ContextVar | threading.local)
    ]
    if hasattr(engine.parse, "__path__"):
        assert len(modules) > 1  # the package's modules were all looked at
    assert side_channels == []


def test_large_messages_parsed_in_threads_come_out_as_parsed_one_at_a_time(
    large_messages: list[bytes],
) -> None:
    alone = [parse_message(raw) for raw in large_messages]
    start = threading.Barrier(THREADS, timeout=60)

    def parse_all(offset: int) -> list[ParsedMessage]:
        start.wait()
        # Each thread starts on another message: every pair is parsed side by side.
        order = large_messages[offset:] + large_messages[:offset]
        return [parse_message(raw) for raw in order]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads every few bytecodes, not every 5 ms
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(parse_all, offset) for offset in range(THREADS)]
            results = [future.result(timeout=300) for future in futures]
    finally:
        sys.setswitchinterval(interval)
    for offset, parsed in enumerate(results):
        assert parsed == alone[offset:] + alone[:offset]


def test_large_messages_parsed_by_worker_processes_come_out_as_parsed_one_at_a_time(
    large_messages: list[bytes],
) -> None:
    """The engine parses busy mailboxes with parse_many in its worker processes
    (engine.parsers), two windows in flight to each: every window comes back whole, and its
    own, as parsing it here gives it."""
    max_bytes = ParseLimits().max_bytes
    windows = [large_messages, large_messages[::-1]]
    results: dict[int, list[ParsedMessage | MessageError]] = {}
    worker = Worker()

    async def parse_windows() -> None:
        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for index, window in enumerate(windows):
                    tg.start_soon(parse_window, index, window)

    async def parse_window(index: int, window: list[bytes]) -> None:
        results[index] = await anyio.to_thread.run_sync(worker.call, window, max_bytes)

    try:
        anyio.run(parse_windows)
    finally:
        worker.close()
    assert worker.process.returncode == 0  # it read the end of its stdin and returned
    alone = [parse_message(raw) for raw in large_messages]
    for index, window in enumerate(windows):
        assert all(isinstance(r, ParsedMessage) and r.raw == b"" for r in results[index])
        parsed = [with_raw(result, raw) for result, raw in zip(results[index], window, strict=True)]
        assert parsed == (alone if index == 0 else alone[::-1])
