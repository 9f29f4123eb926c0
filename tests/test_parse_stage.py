"""What the parse stage computes for the single writer, beside it (issue 18): each value
carried on the ParsedMessage must be what the writer (or the session) computed before."""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import pickle
import re
from datetime import UTC, datetime
from email.message import EmailMessage

from hypothesis import given
from hypothesis import strategies as st

from engine.errors import MessageError
from engine.model import ParsedMessage
from engine.parse import _copy_with_raw, fingerprint, parse_many, parse_message, parse_raw, with_raw
from engine.parse.charsets import decode_8bit
from engine.parse.fingerprint import folded_ascii, folded_text, folded_unicode
from engine.parse.headers import (
    _HEAD_END_RE,
    _RECEIVED_FIRST_RE,
    _RECEIVED_RE,
    _RFC5322_DATE_RE,
    _parse_date,
    head_end_start,
    parse_date,
    received_at,
)
from engine.processors import intake
from tests.parse.samples import raw_fuzz, raw_message

_OLD_PREFIX = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|tr|rv|sv|vs)\s*(?:\[\d+\])?\s*:\s*)+", re.I)


def old_fingerprint(msg: ParsedMessage) -> str:
    """engine.processors.intake.fingerprint as the writer computed it before (0ec1c29)."""
    subject = _OLD_PREFIX.sub("", msg.subject)
    text = " ".join(f"{subject}\n{msg.body[:8192]}".casefold().split())
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def check(raw: bytes) -> None:
    result = parse_raw(raw, 10 * 1024 * 1024)
    if isinstance(result, MessageError):
        return
    assert result.fingerprint == old_fingerprint(result)
    assert intake.fingerprint(result) == old_fingerprint(result)
    assert result.received_at == received_at(raw)
    for att in result.attachments:
        assert att.sha256 == hashlib.sha256(att.data).hexdigest()


received = st.sampled_from(
    [
        b"",
        b"Received: from a by b; Fri, 04 Dec 2026 21:00:00 +0100\r\n",
        b"Received: from a\r\n by b; 4 Dec 2026 21:00 -0000\r\n",
        b"Received: from a by b; not a date\r\n",
        b"Received: no semicolon\r\n",
    ]
)


@given(top=received, raw=raw_message())
@raw_fuzz(150)
def test_the_parse_stage_fingerprint_and_arrival_are_the_writers_and_sessions(
    top: bytes, raw: bytes
) -> None:
    """Over generated hostile messages (any structure, charset, byte flips), with or
    without a top Received field: the carried flood fingerprint is what intake computed
    from the parsed subject and body, the carried arrival date what the session read
    from the raw bytes, and each attachment's carried digest what the store hashed."""
    check(top + raw)


prefixes = st.lists(st.sampled_from(["Re: ", "RE:", "Fwd: ", "AW: ", "tr :", "Sv[2]: ", " "]))


@given(
    prefix=prefixes,
    subject=st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=60),
    body=st.one_of(st.text(max_size=300), st.text(min_size=8000, max_size=9000)),
)
@raw_fuzz(100)
def test_the_fingerprint_of_any_text_is_the_writers(
    prefix: list[str], subject: str, body: str
) -> None:
    """Any subject (reply prefixes, any case and script) and any body, the long ones past
    the 8 KiB read: the same fingerprint as before."""
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["Subject"] = "".join(prefix) + subject
    msg.set_content(body)
    check(msg.as_bytes())


def test_intake_reads_the_carried_fingerprint_and_computes_one_only_when_none_is() -> None:
    msg = parse_message(b"From: a@example.com\r\nSubject: Re: Printer\r\n\r\nJammed.\r\n")
    assert msg.fingerprint and intake.fingerprint(msg) == msg.fingerprint
    assert intake.fingerprint(dataclasses.replace(msg, fingerprint="carried")) == "carried"
    built = dataclasses.replace(msg, fingerprint="")  # a message not made by the parser
    assert intake.fingerprint(built) == old_fingerprint(msg)


def test_an_attachment_digest_crosses_the_pipe_and_never_outlives_its_data() -> None:
    """The digest the parse stage sets comes back from a parsing process (pickled, as
    parse_many's results are), and a copy of the attachment with other data (replace)
    has none: the store then hashes that data itself, never files it under the old name."""
    raw = (
        b"From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nSee the log.\r\n--b\r\n"
        b'Content-Type: text/plain; name="log.txt"\r\nContent-Disposition: attachment; '
        b'filename="log.txt"\r\n\r\nline 1\r\n--b--\r\n'
    )
    [result] = parse_many([raw], 1 << 20)
    assert isinstance(result, ParsedMessage)
    back = pickle.loads(pickle.dumps(result))
    [att] = back.attachments
    assert att.sha256 == hashlib.sha256(att.data).hexdigest()
    assert dataclasses.replace(att, data=b"other").sha256 is None
    assert dataclasses.replace(att, name="y.txt").sha256 is None


@given(raw=raw_message(), other=st.binary(max_size=40))
@raw_fuzz(150)
def test_the_cheap_raw_swap_is_dataclasses_replace(raw: bytes, other: bytes) -> None:
    """parse_many drops ``raw`` and with_raw puts it back with a copy of the fields rather
    than dataclasses.replace: over generated messages, the same object as replace makes,
    and the message it copies is left as it was."""
    result = parse_raw(raw, 10 * 1024 * 1024)
    if isinstance(result, MessageError):
        return
    before = dict(vars(result))
    fast = _copy_with_raw(result, other)
    slow = dataclasses.replace(result, raw=other)
    assert type(fast) is ParsedMessage and fast is not result
    assert vars(fast) == vars(slow) and fast == slow
    assert vars(with_raw(result, other)) == vars(slow)
    assert vars(result) == before
    [window] = parse_many([raw], 10 * 1024 * 1024)
    assert vars(window) == vars(dataclasses.replace(result, raw=b""))


def test_replace_has_nothing_the_cheap_raw_swap_would_miss() -> None:
    """The swap copies every field as it is: equal to replace only while ParsedMessage
    has no __post_init__ and no init=False field (replace would run or reset them)."""
    assert not hasattr(ParsedMessage, "__post_init__")
    assert all(f.init for f in dataclasses.fields(ParsedMessage))


def old_parse_date(value: str | None) -> datetime | None:
    """engine.parse.headers.parse_date before its zones were shared (4f2e55e)."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(decode_8bit(value).strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


zones = st.one_of(
    st.sampled_from(["+0000", "-0000", "+0100", "-0530", "+1400", "-2359", "+9999", "GMT"]),
    st.sampled_from(["UT", "EST", "PDT", "Z", "A", "", "+01", "+0160", "nonsense"]),
    st.from_regex(r"[+-][0-9]{4}", fullmatch=True),
)


@given(
    day=st.integers(-1, 40),
    month=st.sampled_from(["Jan", "Feb", "Dec", "jan", "Foo"]),
    year=st.integers(0, 10_000),
    clock=st.from_regex(r"[0-9]{1,2}:[0-9]{2}(:[0-9]{2})?", fullmatch=True),
    zone=zones,
    noise=st.text(max_size=8),
)
@raw_fuzz(400)
def test_a_date_with_a_shared_zone_is_the_date_as_before(
    day: int, month: str, year: int, clock: str, zone: str, noise: str
) -> None:
    """Whatever the Date value, parse_date gives what it gave before its zones were shared:
    the same instant, offset, zone name and repr (so the same text wherever it is shown)."""
    for value in (
        f"Fri, {day} {month} {year} {clock} {zone}",
        f"{day} {month} {year} {clock}{noise}",
    ):
        new, old = parse_date(value), old_parse_date(value)
        assert new == old and repr(new) == repr(old)
        if new is not None and old is not None:
            assert new.utcoffset() == old.utcoffset() and new.tzname() == old.tzname()
            assert new.isoformat() == old.isoformat()


def test_the_dates_and_field_names_of_a_window_share_their_objects() -> None:
    """Two messages of a window hold the same zone object for the same offset and the same
    name objects for common fields: pickle writes each once per window, the event loop
    unpickles each once."""
    raws = [
        f"From: a{i}@example.com\r\nTo: b@example.com\r\nSubject: s{i}\r\nX-Mailer: m\r\n"
        f"Received: from a by b; Fri, 04 Dec 2026 21:0{i}:00 +0100\r\n"
        f"Date: Fri, 04 Dec 2026 21:0{i}:00 +0100\r\n\r\nbody {i}\r\n".encode()
        for i in range(2)
    ]
    one, two = parse_many(raws, 1 << 20)
    assert isinstance(one, ParsedMessage) and isinstance(two, ParsedMessage)
    assert one.date is not None and two.date is not None and one.received_at is not None
    assert one.date.tzinfo is two.date.tzinfo is one.received_at.tzinfo
    assert [name for name, _ in one.headers] == [name for name, _ in two.headers]
    assert all(a is b for (a, _), (b, _) in zip(one.headers, two.headers, strict=True))
    size = len(pickle.dumps([one, two], pickle.HIGHEST_PROTOCOL))
    assert pickle.loads(pickle.dumps([one, two], pickle.HIGHEST_PROTOCOL)) == [one, two]
    assert size < 2 * len(pickle.dumps(one, pickle.HIGHEST_PROTOCOL))


ascii_text = st.text(st.characters(max_codepoint=127), max_size=300)
spaced = st.lists(
    st.one_of(ascii_text, st.sampled_from([" " * 9, "\t\r\n", "\x1c\x1d\x1e\x1f", "\x0b\x0c "])),
    max_size=12,
).map("".join)


@given(text=st.one_of(ascii_text, spaced))
@raw_fuzz(500)
def test_the_ascii_fold_of_the_fingerprint_is_the_general_one(text: str) -> None:
    """Any ASCII text (every control character, runs of white space of any length and
    kind, \\x1c-\\x1f which str.split counts as space): the fast fold is the definition."""
    assert folded_ascii(text) == folded_text(text)
    assert fingerprint.fingerprint("", text) == hashlib.sha256(folded_text("\n" + text)).hexdigest()


def test_the_unicode_fold_of_every_code_point_is_the_general_one() -> None:
    """Every code point (surrogates too), alone, in a run of itself and between letters and
    white space, in Latin-1 text and beyond it: the fast fold is the definition. In chunks
    of 512, a chunk of its own for each of the two Latin-1 characters that do not fold to
    one (the Latin-1 fold leaves a text with one to the general fold)."""
    points = [c for c in range(0x110000) if c not in (0xB5, 0xDF)]
    chunks = [points[i : i + 512] for i in range(0, len(points), 512)] + [[0xB5], [0xDF]]
    for chunk in chunks:
        text = "".join(f"A{chr(c)}b {chr(c)}{chr(c)}{chr(c)}\t{chr(c)}\u00c9" for c in chunk)
        assert folded_unicode(text) == folded_text(text), [hex(c) for c in chunk[:1]]
        latin = "".join(f"A{chr(c)}b {chr(c)}{chr(c)}" for c in chunk if c < 256)
        assert folded_unicode(latin) == folded_text(latin)
    # Alone too, where a chunk could hide one: Latin-1 and two-byte UTF-8, white space.
    for c in [*range(0x800), *(c for c in range(0x800, 0x110000) if chr(c).isspace())]:
        text = f"\u00e9{chr(c)}B{chr(c)}{chr(c)}"
        assert folded_unicode(text) == folded_text(text), hex(c)


# Text of any script with the white space str.split knows beside the rest, in runs.
any_spaced = st.lists(
    st.one_of(
        st.text(max_size=200),
        st.text(st.characters(max_codepoint=255), max_size=200),
        st.sampled_from([" " * 5, "\xa0", "\x85 ", "\u3000\u2028", "\u2000\t", "\x1c", "  \n"]),
        st.sampled_from(["\xb5", "\xdf", "\u0130", "\ufb03", "\ud800", "\u1e9e"]),
    ),
    max_size=16,
).map("".join)


@given(text=st.one_of(st.text(max_size=400), any_spaced))
@raw_fuzz(500)
def test_the_unicode_fold_of_the_fingerprint_is_the_general_one(text: str) -> None:
    """Any text (any script, lone surrogates, runs of white space of every kind, the
    characters whose case fold is longer than they are): the fast fold is the definition."""
    assert folded_unicode(text) == folded_text(text)
    digest = hashlib.sha256(folded_text("\n" + text)).hexdigest()
    assert fingerprint.fingerprint("", text) == digest


@given(head=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b"Received: a; b", b" "])))
@raw_fuzz(500)
def test_the_end_of_the_header_found_by_finds_is_the_regular_expressions(
    head: list[bytes],
) -> None:
    """received_at cuts the header where the blank line starts: two finds give the start
    the regular expression they replaced gave, on any mix of CR, LF and text."""
    data = b"".join(head)
    m = _HEAD_END_RE.search(data)
    assert head_end_start(data) == (None if m is None else m.start())


_OLD_RECEIVED_RE = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


@given(
    head=st.lists(
        st.sampled_from(
            [b"\r", b"\n", b"\r\n", b"x", b" ", b"\t", b":", b"received", b"ReCeIvEd", b"eceived"]
        )
    )
)
@raw_fuzz(500)
def test_the_received_field_found_from_line_ends_is_the_multiline_patterns(
    head: list[bytes],
) -> None:
    """The top Received field found at the start or after an LF: where ``^`` under
    re.MULTILINE found it, on any mix of line ends, blanks and field names."""
    data = b"".join(head)
    old = _OLD_RECEIVED_RE.search(data)
    new = _RECEIVED_FIRST_RE.match(data) or _RECEIVED_RE.search(data)
    assert (old and old.end()) == (new and new.end())


_WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "mon", "Xyz", ""]
_MONTH_NAMES = ["Jan", "Feb", "Jun", "Sep", "Dec", "dec", "JAN", "Foo"]


@given(
    weekday=st.sampled_from(_WEEKDAYS),
    day=st.integers(0, 40).map(str) | st.sampled_from(["05", "00", "123", "", "\u0665"]),
    month=st.sampled_from(_MONTH_NAMES),
    year=st.integers(0, 12000).map(str) | st.sampled_from(["0099", "26", "02026", "\u0662026"]),
    clock=st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(0, 60))
    | st.tuples(st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)),
    zone=st.tuples(st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59)).map(
        lambda z: f"{z[0]}{z[1]:02}{z[2]:02}"
    )
    | st.tuples(st.sampled_from("+-"), st.integers(0, 9999)).map(lambda z: f"{z[0]}{z[1]:04}")
    | st.sampled_from(["GMT", "UT", "EST", "-0000", "+0000", "+2400", "-2359", "+0099", ""]),
    spaces=st.sampled_from([" ", "  ", "\t", " ,"]),
)
@raw_fuzz(1000)
def test_the_usual_date_is_read_as_email_utils_reads_it(
    weekday: str, day: str, month: str, year: str, clock: tuple[int, int, int], zone: str,
    spaces: str,
) -> None:  # fmt: skip
    """Dates of the usual shape and around it (any day, month, year, time and zone, valid or
    not; other weekdays, names and spacing): parse_date gives what email.utils gives, the
    same zone object included, and only the usual shape takes the fast path."""
    hours, minutes, seconds = clock
    for text in (
        f"{weekday}, {day} {month} {year} {hours:02}:{minutes:02}:{seconds:02} {zone}",
        f"{weekday},{spaces}{day} {month} {year} {hours}:{minutes:02}:{seconds:02}{spaces}{zone}",
    ):
        expected = _parse_date(text)
        got = parse_date(text)
        assert got == expected and (got is None or got.tzinfo is expected.tzinfo), text
        if _RFC5322_DATE_RE.fullmatch(text) is None:
            continue
        assert weekday in _WEEKDAYS[:7] and month in _MONTH_NAMES[:5], text
