"""engine.parse.addresses: smuggled and ambiguous addresses, thousands of them, and the
fast path for the common shapes held equal to getaddresses."""

from __future__ import annotations

import time
from datetime import timedelta
from email.utils import getaddresses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from samples import FAST, simple

from engine.parse import ParseLimits, parse_message
from engine.parse.addresses import _address_count, _cut_addresses, _simple_addresses


def test_display_name_cannot_smuggle_an_address() -> None:
    # The encoded word decodes to '"x" <attacker@evil.example>': addresses are split on the
    # raw header, so it stays a display name.
    raw = simple(
        "From: =?utf-8?q?victim=40bank.example_=3Cattacker=40evil.example=3E?= "
        "<real@sender.example>\nSubject: x\n"
    )
    msg = parse_message(raw)
    assert msg.from_addr == "real@sender.example"
    assert msg.from_name == "victim@bank.example <attacker@evil.example>"


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.org)<bob@example.org>",
        "(alice@example.org <bob@example.org>",
        "alice@example.org[bob@example.org]",
        "alice@example.org <bob@example.org>",
        "(" * 5000 + "x" + ")" * 5000 + " <a@example.org>",
    ],
)
def test_ambiguous_from_yields_no_address(value: str) -> None:
    msg = parse_message(simple(f"From: {value}\nSubject: x\n"))
    assert msg.from_addr == ""


def named_addresses(count: int) -> str:
    return ", ".join(f'"Doe, Jane {i}" <jane.doe{i}@example.com>' for i in range(count))


@pytest.mark.parametrize("count", [1_500, 10_000])
def test_a_to_of_thousands_is_read_up_to_max_addresses_with_a_note(count: int) -> None:
    """Issue 12 item 17d: a To with 1,500 addresses failed the whole message."""
    raw = simple(f"From: Ann <ann@example.org>\nTo: {named_addresses(count)}\nSubject: all\n")
    start = time.process_time()
    msg = parse_message(raw)
    assert time.process_time() - start < FAST
    assert (msg.from_addr, msg.body) == ("ann@example.org", "Hello.\r\n".replace("\r", ""))
    assert msg.to == tuple(f"jane.doe{i}@example.com" for i in range(1000))
    [note] = msg.notes
    assert note.startswith(
        f"The To header lists up to {count} addresses; only the first 1000 were read"
    )


def test_20000_addresses_in_to() -> None:
    to = ", ".join(f"user{i}@example.com" for i in range(20_000))
    raw = simple(f"From: a@example.org\nTo: {to}\nSubject: many\n")
    start = time.process_time()
    msg = parse_message(raw, ParseLimits(max_header_bytes=4 * 1024 * 1024, max_addresses=5))
    assert time.process_time() - start < FAST
    assert msg.to == tuple(f"user{i}@example.com" for i in range(5))
    assert "20000" in msg.notes[0]


@pytest.mark.parametrize(
    ("value", "head"),
    [
        ('"Doe, John" <j@x.org>, b@x.org, c@x.org', '"Doe, John" <j@x.org>, b@x.org'),
        ("a@x.org (Ann, Sales), b@x.org, c@x.org", "a@x.org (Ann, Sales), b@x.org"),
        ("a@x.org (Ann (x, y)), b@x.org, c@x.org", "a@x.org (Ann (x, y)), b@x.org"),
        ("<@r1,@r2:a@x.org>, b@x.org, c@x.org", "<@r1,@r2:a@x.org>, b@x.org"),
        ('a@[1,2], "q\\", b" <b@x.org>, c@x.org', 'a@[1,2], "q\\", b" <b@x.org>'),
    ],
)
def test_address_lists_are_cut_only_between_addresses(value: str, head: str) -> None:
    assert _cut_addresses(value, 2) == (head, 2, 1)
    assert _cut_addresses(value, 3) == (value, 3, 0)


def test_hostile_address_headers_are_read_in_bounded_time() -> None:
    """Quotes and comments cost the address parsers a Python step each: at most 256 KiB of
    an address header is read, and an address cut by that limit is not read at all."""
    for junk in (b'""', b"()", b"\\\\", b"<>,", b",", b"(a,b)"):
        value = junk * (900_000 // len(junk)) + b", a@example.org" * 1001
        raw = b"From: " + value + b"\r\nTo: x@example.org\r\nSubject: x\r\n\r\nbody"
        start = time.process_time()
        msg = parse_message(raw)
        assert time.process_time() - start < FAST, junk
        assert msg.to == ("x@example.org",) and "example.org" not in msg.from_addr, junk
        assert msg.notes and msg.notes[0].startswith("The From header lists up to"), junk
    long_one = b"From: " + b"a" * 300_000 + b"@example.org\r\nSubject: x\r\n\r\nbody"
    msg = parse_message(long_one)
    assert msg.from_addr == "" and "only the first 0 were read" in msg.notes[0]


ADDRESS_WORDS = ["John", "Doe", '"Doe, John"', "J.", '""', "=?utf-8?q?x?=", "é", "(c)", "\\", "<"]
ADDRESSES = ["a@b", "john.doe@example.com", "x+y@z.org", "a..b@c", "@b", "a@", "a@[1.2.3.4]"]


@st.composite
def address_list(draw: st.DrawFn) -> str:
    entries = []
    for _ in range(draw(st.integers(1, 3))):
        words = " ".join(draw(st.lists(st.sampled_from(ADDRESS_WORDS), max_size=3)))
        address = draw(st.sampled_from(ADDRESSES))
        spacing = draw(st.sampled_from(["", " ", "\t"]))
        entries.append(spacing + (f"{words} <{address}>" if draw(st.booleans()) else address))
    return ",".join(entries)


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(value=address_list())
def test_property_simple_address_lists_read_as_getaddresses(value: str) -> None:
    pairs = _simple_addresses(value)
    if pairs is not None:
        assert pairs == getaddresses([value])


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(value=address_list(), keep=st.integers(1, 3))
def test_property_a_cut_address_list_reads_as_the_first_addresses_of_the_whole(
    value: str, keep: int
) -> None:
    """Where getaddresses reads one address per separating comma (else the field is dropped)."""
    head, kept, more = _cut_addresses(value, keep)
    whole = getaddresses([value])
    if len(whole) != _address_count(value):
        return
    if more:
        assert getaddresses([head]) == whole[:keep]
        assert kept == keep and len(whole) == keep + more
    else:
        assert head == value and len(whole) <= kept <= keep
