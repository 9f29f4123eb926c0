"""Property: whatever bytes arrive, processing ends in a request, an activity, a refusal, an
ignored auto-reply or a failure event, committed with its ledger row; never an exception."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import DIRECTORY, LOGIN, mailbox_xml

from engine.config import load_mailbox
from engine.errors import ProtocolError
from engine.gateways.pop3 import read_answer
from engine.items import Envelope
from engine.session import make_envelope
from engine.store import open_store
from engine.writer import Writer

HEADERS = st.sampled_from(
    [
        "Subject",
        "From",
        "To",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Auto-Submitted",
        "Date",
        "Content-Disposition",
    ]
)
VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "multipart/mixed; boundary=b",
            "text/plain; charset=utf-7",
            "text/html; charset=x-unknown",
            "=?utf-8?q?broken",
            "RE: [Incident] #1 printer",
            "base64",
            "quoted-printable",
            "attachment; filename*=UTF-8''..%2F..%2Fetc%2Fpasswd",
            "<a@b>",
            "auto-replied",
            "message/rfc822",
            "application/ms-tnef",
        ]
    ),
)
BODIES = st.one_of(st.binary(max_size=2000), st.text(max_size=2000).map(str.encode))


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(HEADERS, VALUES), max_size=8))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers).encode("utf-8", "surrogateescape")
    parts = draw(st.lists(BODIES, max_size=4))
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\n" + p + b"\r\n" for p in parts)
    return head + b"\r\n" + body + draw(st.binary(max_size=200))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raws=st.lists(raw_messages(), min_size=1, max_size=5))
def test_any_message_ends_in_a_committed_outcome(tmp_path: Path, raws: list[bytes]) -> None:
    cfg_path = tmp_path / "p.xml"
    if not cfg_path.exists():
        mailbox_xml(cfg_path, port=110, user="u", password="p-secret")
    cfg = load_mailbox(cfg_path)

    async def go() -> list[Envelope]:
        store = await open_store(tmp_path / f"data-{time.monotonic_ns()}")
        try:
            async with store.transaction() as tx:
                await tx.import_directory(DIRECTORY)
            writer = Writer(store, created_by=LOGIN)
            envelopes = [make_envelope(cfg, f"u{i}", raw) for i, raw in enumerate(raws)]
            with anyio.fail_after(30):
                await writer.apply(list(envelopes))
            assert await store.counts() and (await store.counts())["ledger"] == len(raws)
            return envelopes
        finally:
            await store.close()

    for env in anyio.run(go):
        assert env.failure is None
        assert env.outcome is not None
        text = str(env.outcome)
        assert text in (
            "created",
            "activity",
            "ignored: auto-reply",
        ) or text.startswith(("failed: ", "refused: ")), text


def _read_by_lines(reader: io.BufferedReader) -> bytes:
    """The reference: RFC 1939's reading of a multi-line answer, one line at a time."""
    out = bytearray()
    while True:
        line = reader.readline()
        if not line:
            raise ProtocolError("closed")
        if line == b".\r\n":
            return bytes(out)
        out += line[1:] if line.startswith(b"..") else line


_PIECES = st.sampled_from(
    [b"\r\n", b"\n", b".", b"..", b".\r\n", b"\n.\r\n", b"\r\n.\r", b"x", b"Subject: y", b"\r"]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.lists(_PIECES, max_size=30).map(b"".join),
    following=st.binary(max_size=20),
    buffer=st.integers(min_value=1, max_value=64),
)
def test_retr_reading_in_chunks_equals_reading_line_by_line(
    body: bytes, following: bytes, buffer: int
) -> None:
    """Whatever the content and wherever the reader's chunks end: the same message, the
    same error, and the next pipelined answer left unread, as line by line."""
    wire = body.replace(b"\n.", b"\n..")  # dot-stuffed as a server sends it
    if wire.startswith(b"."):
        wire = b"." + wire
    if not wire.endswith(b"\n"):
        wire += b"\r\n"
    answer = wire + b".\r\n" + following

    def run(read: Callable[[io.BufferedReader], bytes]) -> tuple[bytes | str, bytes]:
        reader = io.BufferedReader(io.BytesIO(answer), buffer_size=buffer)
        try:
            got: bytes | str = read(reader)
        except ProtocolError:
            got = "error"
        return got, reader.read()

    def chunked(reader: io.BufferedReader) -> bytes:
        answer = read_answer(reader, cap=1 << 20)
        assert answer.cut is None and answer.octets == len(wire)
        return answer.data

    assert run(chunked) == run(_read_by_lines)
    # And a truncated answer is an error both ways, never a short message.
    answer = answer[: len(wire) + 2]
    assert run(chunked)[0] == run(_read_by_lines)[0] == "error"
