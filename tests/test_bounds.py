"""Properties of what the POP3 boundary makes of hostile bytes: message reading bounded
exactly (size and line length, wherever the chunks end), ledger keys that never collide, and
one account per server whatever the spelling of its name."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import FetchTimeout, ProtocolError
from engine.gateways import Answer, read_cap
from engine.gateways.pop3 import Unfinished, read_answer, read_line, read_lines
from engine.keys import (
    RESERVED_PREFIXES,
    account_key,
    content_key,
    ingest_key,
    normalize_host,
    reused_key,
    uidl_key,
)

_PIECES = st.sampled_from(
    [b"\r\n", b"\n", b".", b"..", b".\r\n", b"\n.\r\n", b"\r\n.\r", b"x", b"yyyyyyy", b"\r"]
)


def _wire(body: bytes) -> bytes:
    """``body`` dot-stuffed as a server sends it, ending in a line end."""
    wire = body.replace(b"\n.", b"\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    return wire if wire.endswith(b"\n") else wire + b"\r\n"


def _unstuff(wire: bytes) -> bytes:
    out = wire[1:] if wire.startswith(b"..") else wire
    return out.replace(b"\n..", b"\n.")


def _reference(wire: bytes, cap: int, max_line: int) -> Answer:
    """What a line-by-line reader says: the first line longer than ``max_line`` (LF
    included) is cut after ``max_line`` bytes, the content after ``cap`` bytes, whichever
    comes first; everything before it is kept."""
    line_cut = None
    offset = 0
    for line in io.BytesIO(wire):  # lines end at LF only, as for readline
        if len(line) > max_line:
            line_cut = offset + max_line
            break
        offset += len(line)
    size_cut = cap if len(wire) > cap else None
    stops = [(at, why) for at, why in ((line_cut, "line"), (size_cut, "size")) if at is not None]
    if not stops:
        return Answer(_unstuff(wire), len(wire))
    at, why = min(stops, key=lambda s: (s[0], s[1] != "line"))
    return Answer(_unstuff(wire[:at]), len(wire), why)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.lists(_PIECES, max_size=40).map(b"".join),
    following=st.binary(max_size=12),
    buffer=st.integers(min_value=1, max_value=48),
    cap=st.integers(min_value=0, max_value=120),
    max_line=st.integers(min_value=3, max_value=24),
)
def test_a_message_is_cut_exactly_where_a_line_by_line_reader_would_cut_it(
    body: bytes, following: bytes, buffer: int, cap: int, max_line: int
) -> None:
    """Over its cap, or at a line one byte over the limit, a message is cut at that exact
    byte, wherever the reader's chunks end (a line of exactly the limit is never cut); the
    rest is read and dropped, so the next pipelined answer is still there, untouched."""
    wire = _wire(body)
    reader = io.BufferedReader(io.BytesIO(wire + b".\r\n" + following), buffer_size=buffer)
    got = read_answer(reader, cap=cap, max_line=max_line, discard=1 << 20)
    assert got == _reference(wire, cap, max_line)
    assert reader.read() == following


@pytest.mark.parametrize("length", [8, 9, 10])
@pytest.mark.parametrize("buffer", [1, 2, 3, 4, 5, 7, 64])
def test_a_line_of_exactly_the_limit_is_kept_and_one_byte_more_is_cut(
    length: int, buffer: int
) -> None:
    line = b"a" * (length - 2) + b"\r\n"  # LF included, as poplib counts
    wire = b"ok\r\n" + line + b"end\r\n"
    reader = io.BufferedReader(io.BytesIO(wire + b".\r\n+OK next"), buffer_size=buffer)
    got = read_answer(reader, cap=1000, max_line=9, discard=1000)
    if length <= 9:
        assert got == Answer(wire, len(wire))
    else:
        assert got == Answer(b"ok\r\n" + line[:9], len(wire), "line")
    assert reader.read() == b"+OK next"


def test_an_endless_answer_is_read_only_up_to_cap_and_discard() -> None:
    """A server that never ends its answer: at most cap bytes are kept, and reading stops
    once cap + discard bytes have come (what was kept is given with the error)."""

    class Endless(io.RawIOBase):
        sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            n = len(b)
            b[:n] = b"x" * (n - 2) + b"\r\n"
            self.sent += n
            return n

    raw = Endless()
    with pytest.raises(Unfinished) as caught:
        read_answer(io.BufferedReader(raw, 4096), cap=10_000, discard=50_000)
    assert caught.value.answer.cut == "size" and len(caught.value.answer.data) == 10_000
    assert isinstance(caught.value.__cause__, ProtocolError)
    assert raw.sent < 10_000 + 50_000 + 2 * 65536


def test_the_deadline_stops_a_trickle_between_two_reads() -> None:
    """``wait`` runs before every read: a byte a second meets it at the next byte."""
    reads = []

    def wait() -> None:
        reads.append(1)
        if len(reads) > 5:
            raise FetchTimeout("deadline")

    reader = io.BufferedReader(io.BytesIO(b"slow content\r\n.\r\n"), buffer_size=1)
    with pytest.raises(FetchTimeout):
        read_answer(reader, cap=100, wait=wait)
    with pytest.raises(FetchTimeout):
        read_line(io.BufferedReader(io.BytesIO(b"+OK slow\r\n"), buffer_size=1), 100, wait)


def test_a_listing_keeps_the_first_lines_and_refuses_an_endless_one() -> None:
    lines = b"".join(b"%d 100\r\n" % i for i in range(1, 31))
    got, count = read_lines(io.BufferedReader(io.BytesIO(lines + b".\r\nnext")), keep=10)
    assert count == 30 and got == [b"%d 100" % i for i in range(1, 11)]
    with pytest.raises(ProtocolError, match="without its end"):
        read_lines(io.BufferedReader(io.BytesIO(lines * 10 + b".\r\n")), keep=10)
    with pytest.raises(ProtocolError, match="over 1024 bytes"):
        read_lines(io.BufferedReader(io.BytesIO(b"1 " + b"u" * 2000 + b"\r\n.\r\n")), keep=10)


def test_read_cap_bounds_a_lying_list_size_and_never_cuts_an_honest_one() -> None:
    assert read_cap(10, 26_214_400) == 20 + 1024 * 1024
    assert read_cap(20_000_000, 26_214_400) == 26_214_400
    assert read_cap(5_000, 26_214_400) >= 2 * 5_000  # LF-stored: CRLF form up to twice


# -- ledger keys ---------------------------------------------------------------------------

_RFC_UIDL = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70
)


@settings(max_examples=2000)
@given(a=st.binary(max_size=40), b=st.binary(max_size=40))
def test_uidl_keys_are_injective(a: bytes, b: bytes) -> None:
    """Two different UIDLs (spaces, 8-bit bytes, a reserved prefix, empty) never share a
    key; none equals a key the engine mints."""
    assert (uidl_key(a) == uidl_key(b)) == (a == b)
    assert not uidl_key(a).startswith(RESERVED_PREFIXES[1:])


@settings(max_examples=500)
@given(uidl=_RFC_UIDL)
def test_a_valid_uidl_is_its_own_key(uidl: str) -> None:
    """RFC 1939 UIDLs keep the key they always had: no migration of the ledger."""
    if uidl.lower().startswith(RESERVED_PREFIXES):
        assert uidl_key(uidl.encode()) == "x-uidl:" + uidl.encode().hex()
    else:
        assert uidl_key(uidl.encode()) == uidl


def test_uidls_that_used_to_collapse_are_distinct_keys() -> None:
    """Cut at the first space and decoded ascii/replace, these were one key each."""
    assert uidl_key(b"id\xff") != uidl_key(b"id\xfe")
    assert uidl_key(b"abc x") != uidl_key(b"abc y")
    sha = "0" * 64
    minted = {content_key(sha), ingest_key(sha), reused_key("abc", sha)}
    for key in minted:
        assert uidl_key(key.encode()) not in minted
        assert uidl_key(key.upper().encode()) not in minted


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "localhost"),
        ("LOCALHOST", "localhost"),
        ("localhost.", "localhost"),
        ("127.0.0.2", "localhost"),
        ("127.1", "localhost"),
        ("::1", "localhost"),
        ("[::1]", "localhost"),
        ("::ffff:127.0.0.1", "localhost"),
        ("Pop.Example.COM.", "pop.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("10.0.0.5", "10.0.0.5"),
        ("0x0a000005", "10.0.0.5"),
    ],
)
def test_every_spelling_of_a_host_is_one_account(host: str, expected: str) -> None:
    assert normalize_host(host) == expected
    assert account_key("box1", host) == f"box1@{expected}"


def test_account_id_is_taken_verbatim() -> None:
    assert account_key("box1", "pop.example.com", "Support Desk") == "Support Desk"
