"""Header fields: unfolding, RFC 2047 encoded words, MIME parameters (RFC 2231), header maps,
Message-IDs and dates.

* The parser runs with the ``compat32`` policy and we decode headers ourselves: the
  ``policy.default`` header objects cost five times the whole parse, and we need a tolerant
  RFC 2047 decoder anyway (broken encoded words are common in real mail). Raw values are read
  with ``raw_items()`` (8-bit octets surrogate-escaped), never the stdlib's decoded view.
* Decoded header text is flattened to one line by :func:`one_line` (CVE-2024-6923: a newline
  in a decoded header must never reach anything we build).
* MIME parameters have our own linear parser: the stdlib's splitter is quadratic in the
  number of quoted semicolons, and an RFC 2231 value must reach a codec only through
  :func:`~engine.parse.charsets.decode_text`.
"""

from __future__ import annotations

import binascii
import email.utils
import functools
import re
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from email.message import Message
from typing import Final, NamedTuple

from engine.parse.charsets import decode_8bit, decode_text, to_bytes
from engine.parse.transfer import b64_decode

# Every C0/C1 control, DEL and the Unicode line/paragraph separators become one space, and
# runs of spaces collapse: the result is always a single line.
_ONE_LINE_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029 ]+")
_FOLD_RE: Final = re.compile(r"\r\n|\r|\n")


def one_line(text: str) -> str:
    """Flatten decoded header text to one line: no CR, LF or other control character."""
    if text.isprintable() and "  " not in text:
        return text.strip()  # every character the expression replaces is unprintable but " "
    return _ONE_LINE_RE.sub(" ", text).strip()


# Tolerant: any charset token, either case of B/Q, and an encoded text of anything but "?"
# (which also keeps the match linear: a scan never runs past the next "?").
_EW_RE: Final = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?]*)\?=")


def _ew_bytes(encoding: str, text: str) -> bytes | None:
    """The octets of one encoded word's text, or None if it cannot be decoded."""
    raw = to_bytes(text)
    if encoding in "bB":
        return b64_decode(raw)
    try:
        return binascii.a2b_qp(raw, header=True)
    except (binascii.Error, ValueError):
        return None


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words in header text, tolerating the usual breakage.

    Adjacent words in the same charset are joined before decoding, because senders split
    multi-byte characters across words; white space between encoded words is dropped as
    RFC 2047 section 6.2 says. A word that cannot be decoded stays as it was written.
    """
    if "=?" not in value:
        return decode_8bit(value)
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    after_word = False

    def flush() -> None:
        if pending:
            out.append(decode_text(bytes(pending), pending_charset or None))
            pending.clear()

    for m in _EW_RE.finditer(value):
        between = value[pos : m.start()]
        if between and not (after_word and between.isspace()):
            flush()
            out.append(decode_8bit(between))
        charset = m.group(1).split("*", 1)[0].lower()
        data = _ew_bytes(m.group(2), m.group(3))
        if data is None:
            flush()
            out.append(decode_8bit(m.group(0)))
            after_word = False
        else:
            if pending and charset != pending_charset:
                flush()
            pending_charset = charset
            pending.extend(data)
            after_word = True
        pos = m.end()
    flush()
    out.append(decode_8bit(value[pos:]))
    return "".join(out)


class Param(NamedTuple):
    """One parameter: ``text`` as written (unquoted) or, for RFC 2231, ``data`` + charset."""

    text: str
    data: bytes | None = None
    charset: str = ""


_RFC2231_NAME_RE: Final = re.compile(r"([^*]+)\*(?:([0-9]{1,4})(\*)?)?")


def _unquote(value: str) -> str:
    """Unquote a parameter value exactly as ``email.utils.unquote`` does."""
    value = value.strip()
    if len(value) > 1:
        if value[0] == '"' and value[-1] == '"':
            return value[1:-1].replace("\\\\", "\\").replace('\\"', '"')
        if value[0] == "<" and value[-1] == ">":
            return value[1:-1]
    return value


def _split_params(value: str) -> list[str]:
    """Split on ";" outside quoted strings, in one linear pass."""
    segments: list[str] = []
    current: list[str] = []
    quotes = 0
    for piece in value.split(";"):
        current.append(piece)
        quotes += piece.count('"') - piece.count('\\"')
        if quotes % 2 == 0:
            segments.append(";".join(current))
            current = []
            quotes = 0
    if current:
        segments.append(";".join(current))
    return segments


# Values up to this long are remembered: a message has the same Content-Type read by the
# pre-scan and by the walk, and mail repeats a few values ('text/plain; charset="utf-8"').
_PARAMS_CACHE_MAX_VALUE: Final = 512


def parse_params(value: str) -> tuple[str, Mapping[str, Param]]:
    """Split a Content-Type/Disposition value into its lowercased main value and parameters.

    RFC 2231 continuations (``name*0*=``) and charset/language prefixes are honoured; the
    octets of an extended value are returned undecoded with their charset label, so that the
    caller decodes them through the safe codec lookup. As in the stdlib, a plain parameter
    wins over an extended one of the same name, and the first of duplicates wins. The
    parameters are shared between calls: read them, never change them.
    """
    if ";" not in value:
        return value.strip().lower(), {}
    if len(value) <= _PARAMS_CACHE_MAX_VALUE:
        return _parse_params_cached(value)
    return _parse_params_uncached(value)


@functools.lru_cache(maxsize=1024)
def _parse_params_cached(value: str) -> tuple[str, Mapping[str, Param]]:
    return _parse_params_uncached(value)


def _parse_params_uncached(value: str) -> tuple[str, dict[str, Param]]:
    """parse_params without the cache: the value split once, RFC 2231 sections joined."""
    segments = _split_params(value)
    main = segments[0].strip().lower() if segments else ""
    params: dict[str, Param] = {}
    extended: dict[str, list[tuple[int, str, bool]]] = {}
    for segment in segments[1:]:
        name, sep, val = segment.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            continue
        m = _RFC2231_NAME_RE.fullmatch(name)
        if m is None:
            params.setdefault(name, Param(_unquote(val)))
            continue
        number = int(m.group(2)) if m.group(2) is not None else 0
        encoded = m.group(2) is None or m.group(3) is not None
        extended.setdefault(m.group(1), []).append((number, _unquote(val), encoded))
    for name, pieces in extended.items():
        if name not in params:
            params[name] = _rfc2231_param(pieces)
    return main, params


def _rfc2231_param(pieces: list[tuple[int, str, bool]]) -> Param:
    """One RFC 2231 parameter from its (section number, text, is encoded) pieces."""
    pieces.sort(key=lambda p: p[0])
    charset = ""
    chunks: list[bytes] = []
    any_encoded = False
    for index, (_, text, encoded) in enumerate(pieces):
        if encoded:
            any_encoded = True
            if index == 0 and text.count("'") >= 2:
                charset, _lang, text = text.split("'", 2)
            chunks.append(urllib.parse.unquote_to_bytes(to_bytes(text)))
        else:
            chunks.append(to_bytes(text))
    data = b"".join(chunks)
    if any_encoded:
        return Param("", data, charset.strip())
    return Param(data.decode("utf-8", "surrogateescape"))


def param_text(param: Param | None, *, encoded_words: bool = False) -> str | None:
    """The decoded text of a parameter (None if absent)."""
    if param is None:
        return None
    if param.data is not None:
        return decode_text(param.data, param.charset or None)
    return decode_words(param.text) if encoded_words else decode_8bit(param.text)


def unfold(value: str) -> str:
    """RFC 5322 unfolding: remove the line breaks, keep the white space after them."""
    return _FOLD_RE.sub("", value) if "\n" in value or "\r" in value else value


def header_map(msg: Message) -> dict[str, list[str]]:
    """All top-level header values by lowercased name, raw (8-bit octets surrogate-escaped)."""
    headers: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        headers.setdefault(name.strip().lower(), []).append(value)
    return headers


def first_field(headers: dict[str, list[str]], name: str) -> str | None:
    """The first value of the header field ``name`` (lowercase) in ``headers``, unfolded."""
    values = headers.get(name)
    return unfold(values[0]) if values else None


def part_header(part: Message, name: str) -> str | None:
    """First raw value of a header of a MIME part (never the stdlib's decoded view)."""
    for key, value in part.raw_items():
        if key.strip().lower() == name:
            return unfold(value)
    return None


def part_fields(part: Message) -> dict[str, str]:
    """Each header field of a MIME part by lowercased name: its first value, as part_header."""
    fields: dict[str, str] = {}
    for key, value in part.raw_items():
        name = key.strip().lower()
        if name not in fields:
            fields[name] = unfold(value)
    return fields


_MSGID_RE: Final = re.compile(r"<([^<>\s]{1,998})>")
_MAX_REFERENCES: Final = 200


def _clean_id(text: str) -> str | None:
    ident = one_line(decode_8bit(text)).replace(" ", "")
    return ident[:998] or None


def msgid(value: str | None) -> str | None:
    """The message-id in a Message-ID/In-Reply-To value, without angle brackets."""
    if value is None:
        return None
    m = _MSGID_RE.search(value)
    if m is not None:
        return _clean_id(m.group(1))
    token = value.strip()
    if token and not any(ch.isspace() for ch in token):
        return _clean_id(token.strip("<>"))
    return None


def msgids(value: str | None) -> tuple[str, ...]:
    """All message-ids of a References value, oldest first."""
    if not value:
        return ()
    ids = [i for i in (_clean_id(m) for m in _MSGID_RE.findall(value)) if i]
    if len(ids) > _MAX_REFERENCES:
        # The root and the most recent ancestors are the ones threading needs.
        ids = [ids[0], *ids[-(_MAX_REFERENCES - 1) :]]
    return tuple(ids)


def parse_date(value: str | None) -> datetime | None:
    """A Date value as an aware datetime (UTC if it has no zone), or None if unreadable."""
    if not value:
        return None
    text = decode_8bit(value).strip()
    if (m := _RFC5322_DATE_RE.fullmatch(text)) is not None:
        return _rfc5322_date(m)
    return _parse_date(text)


def _parse_date(text: str) -> datetime | None:
    """:func:`parse_date` of a stripped text, by email.utils: the definition."""
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    zone = parsed.tzinfo
    if zone is None:
        # "-0000" means "UTC, but the sender's zone is unknown" (RFC 5322 3.3).
        return parsed.replace(tzinfo=UTC)
    if type(zone) is not timezone:
        return parsed
    shared = _zone(parsed.utcoffset())
    return parsed if shared is zone else parsed.replace(tzinfo=shared)


# The date of RFC 5322 as mail programs write it, "Fri, 04 Dec 2026 21:00:00 +0100", which
# email.utils reads with a dozen splits and tests in Python (4 us, 2 % of the parse of the
# bench mix). Other shapes (two-digit years, zone names, comments, no weekday) are its.
_MONTHS: Final = (
    *("Jan", "Feb", "Mar", "Apr", "May", "Jun"),
    *("Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
)
_RFC5322_DATE_RE: Final = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), ([0-9]{1,2}) (" + "|".join(_MONTHS) + r") "
    r"([1-9][0-9]{3}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)
_MONTH_NUMBERS: Final = {name: number for number, name in enumerate(_MONTHS, 1)}


def _rfc5322_date(m: re.Match[str]) -> datetime | None:
    """:func:`_parse_date` of a date that :data:`_RFC5322_DATE_RE` matched, without
    email.utils (tests/test_parse_stage.py holds the two equal): "-0000" is a date in UTC
    whose sender's zone is unknown (RFC 5322 3.3), any other zone an offset of hours and
    minutes (as email.utils reads "+0099", an hour and 99 minutes)."""
    day, month, year, hours, minutes, seconds, sign, zone_hours, zone_minutes = m.groups()
    offset = int(zone_hours) * 3600 + int(zone_minutes) * 60
    try:
        zone = UTC if offset == 0 else _zone(timedelta(seconds=-offset if sign == "-" else offset))
        return datetime(
            int(year), _MONTH_NUMBERS[month], int(day), int(hours), int(minutes), int(seconds),
            tzinfo=zone,
        )  # fmt: skip
    except (ValueError, OverflowError):
        return None


@functools.lru_cache(maxsize=256)
def _zone(offset: timedelta | None) -> tzinfo:
    """One ``timezone`` object per offset, shared by the dates of every message.

    email.utils makes a new ``timezone(timedelta(...))`` per date, and pickle writes each
    distinct object in full (a reduce of the zone and of its timedelta, each rebuilt by a
    call on the other side): a parsing process's results cost 21 % more instructions to
    pickle, and the event loop 7 % more to unpickle, than with one shared zone per offset,
    which pickle writes once per window. Equal in every respect (offset, name, repr: the
    zones email.utils makes have no name); an immutable value, so sharing it is safe across
    threads."""
    return UTC if offset is None else timezone(offset)


# Where the top-most Received field is looked for, and how much of it is read: our own mail
# server adds it first, so it sits near the top; a header that hides it further down (or a
# field folded over kilobytes) is not worth reading for a statistic.
RECEIVED_SCAN_BYTES: Final = 16 * 1024
RECEIVED_FIELD_BYTES: Final = 4 * 1024
# The field at a line start: the header's first line, or after an LF (where "^" matches under
# re.MULTILINE). A pattern that starts with "^" is tried at every character of the header;
# one that starts with the LF is tried only where the regex engine finds an LF.
_RECEIVED_RE: Final = re.compile(rb"\nreceived[ \t]*:", re.IGNORECASE)
_RECEIVED_FIRST_RE: Final = re.compile(rb"received[ \t]*:", re.IGNORECASE)
_HEAD_END_RE: Final = re.compile(rb"\r?\n\r?\n")
_FIELD_END_RE: Final = re.compile(rb"\r?\n(?![ \t])")


def head_end_start(head: bytes) -> int | None:
    """``_HEAD_END_RE.search(head).start()``, None where it finds nothing.

    That expression starts with an optional CR, so the regex engine tries it at every
    offset of up to 16 KiB (1 % of a parse); two finds of the LF that starts the blank line
    do the same in C. The earliest match starts at the first LF followed by an empty line,
    or at the CR before it (tests/test_parse_stage.py holds the two equal).

    The find of the line end the header's first line does not use goes only as far as the
    other's match: searched in full, ``b"\n\n"`` scanned all 16 KiB of every CRLF message
    (5 us, 2 % of the parse of the bench mix, whose messages have no Received field)."""
    first = head.find(b"\n")
    if first > 0 and head[first - 1] == 0x0D:  # CRLF: the blank line is most likely one too
        crlf = head.find(b"\n\r\n")
        # A "\n\n" before it ends by crlf + 1 (none starts at crlf).
        lf = head.find(b"\n\n", 0, len(head) if crlf < 0 else crlf + 1)
    else:
        lf = head.find(b"\n\n")
        # A "\n\r\n" before it ends by lf + 2 (none starts at lf).
        crlf = head.find(b"\n\r\n", 0, len(head) if lf < 0 else lf + 2)
    found = [at for at in (lf, crlf) if at >= 0]
    if not found:
        return None
    at = min(found)
    return at - 1 if at and head[at - 1] == 0x0D else at


def received_at(raw: bytes) -> datetime | None:
    """When the server that took the message last (the top-most ``Received:`` field) says
    it received it: the date after the field's last ";" (RFC 5321 4.4), aware (UTC if it
    has no zone); None without one, or one that cannot be read.

    Bounded: only the first :data:`RECEIVED_SCAN_BYTES` of the message, only the first
    Received field, at most :data:`RECEIVED_FIELD_BYTES` of it. The date is whatever the
    message says: the caller bounds it against its own clock (engine/store/sqlite.py,
    ``arrived_text``)."""
    if raw.startswith((b"\n", b"\r\n")):
        return None  # no header at all: whatever follows is the body
    head = raw[:RECEIVED_SCAN_BYTES]
    if (end := head_end_start(head)) is not None:
        head = head[:end]  # the header only: never a "Received:" of the body
    found = _RECEIVED_FIRST_RE.match(head) or _RECEIVED_RE.search(head)
    if found is None:
        return None
    value = head[found.end() : found.end() + RECEIVED_FIELD_BYTES]
    if (stop := _FIELD_END_RE.search(value)) is not None:
        value = value[: stop.start()]
    _, semicolon, date = value.rpartition(b";")
    if not semicolon:
        return None
    return parse_date(unfold(date.decode("latin-1")))
