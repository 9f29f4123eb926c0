"""Turn the raw bytes of one message into a :class:`~engine.model.ParsedMessage`.

Everything here is a pure function of its arguments: no I/O, no global state changed, safe to
call from several worker threads at once. :func:`parse_message` raises only
:class:`~engine.errors.LimitExceeded` or :class:`~engine.errors.ParseError`, whatever the bytes.

Design notes (the reasons, so that nobody "simplifies" them away):

* Limits are checked on the raw bytes *before* the stdlib parser sees them. The ``email``
  feed parser recurses once per MIME level (2,000 nested multiparts raise ``RecursionError``),
  takes seconds for 100,000 parts, and its parameter splitter is quadratic in the number of
  quoted semicolons. A linear scan of the header blocks and boundary lines catches all of
  that in microseconds; MIME source pasted into a body is text to it, as to the parser.
* A limit refuses a message only where reading it would cost out of proportion. Where real
  mail can pass a limit (thousands of addresses, HTML too large or too deep to sanitize, a
  winmail.dat holding more files than allowed), the message is read up to there, nothing of
  it is lost (the rest stays in the raw message or is attached whole), and
  ``ParsedMessage.notes`` says what was left out.
* Memory stays within a few times the message (3.3 at most for 20 MB of any shape we know):
  large bodies are taken from the raw bytes instead of the parser's lines, and no step keeps
  a list of a million short strings.
* The parser runs with the ``compat32`` policy and we decode headers ourselves: the
  ``policy.default`` header objects cost five times the whole parse, and we need a tolerant
  RFC 2047 decoder anyway (broken encoded words are common in real mail).
* Charsets never reach ``codecs`` unchecked. A label is looked up once and accepted only if it
  names a text encoding outside a deny-list (``utf-7``, ``unicode_escape``, ``punycode``...);
  ``zlib_codec`` or ``rot13`` in a charset parameter would otherwise decompress or transform
  attacker data. The stdlib helpers that decode with the declared charset (``get_filename``,
  ``get_content_charset``, ``get_payload()`` without ``decode=True``) are never called.
* Decoded header text is flattened to one line (CVE-2024-6923: a newline in a decoded header
  must never reach anything we build), and addresses are split on the *raw* header before
  display names are decoded, with the strict rules of the CVE-2023-27043 fix.
* Fast paths stand in for slow or memory-hungry library code and must give exactly its
  results; each accepts only the input shapes it is known to handle and leaves the rest to
  the library, and a property test holds the two equal: :func:`_split_mime` builds the feed
  parser's Message tree, :class:`_TextCanvas` renders HTML to the text inscriptis gives,
  :func:`_simple_addresses` reads the address lists ``getaddresses`` would,
  :func:`_elide_large_bodies` keeps large bodies out of the parser and :func:`_uu_decode`
  gives the stdlib's uudecoding without its lists. :func:`_html_text_lean`, nh3's text of
  HTML too large to sanitize, cannot leave any markup to nh3: its docstring says where the
  two differ. Base64 has one decoder for every path, :func:`_b64_decode`, which reads joined
  padded blobs whole where binascii and the stdlib stop at the first padding.
"""

from __future__ import annotations

import binascii
import codecs
import contextvars
import email
import email.utils
import functools
import hashlib
import html as html_lib
import inspect
import itertools
import mimetypes
import quopri
import re
import secrets
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import Message
from typing import Final, NamedTuple

import nh3
from lxml import etree

from engine.errors import LimitExceeded, MessageError, ParseError
from engine.model import Attachment, ParsedMessage

__all__ = ["ParseLimits", "message_summary", "parse_message", "safe_filename"]


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on what one message may cost to parse; over most of them it is refused whole.

    ``max_bytes`` is the size of the raw message, ``max_depth`` the MIME nesting (multiparts
    and ``message/*`` parts), ``max_parts`` the number of MIME parts and ``max_header_bytes``
    the size of the top-level header block (room for a To of 10,000 named addresses).
    ``max_header_params`` bounds the parameters of one Content-Type field (the stdlib
    splitter is quadratic in them). These refuse nothing:
    ``max_addresses``, the addresses read from one address header (the message gets a note
    about the rest), ``max_html_render_bytes``, the HTML that is rendered to text with full
    layout (a larger HTML-only body is flattened with a faster, plainer method), and
    ``max_html_sanitize_bytes`` and ``max_html_depth``, the size and the nesting of block
    elements of the HTML that is sanitized and kept as the message's HTML (the sanitizer's
    tree takes ~25 times the markup, and time quadratic in that nesting): a larger or deeper
    HTML body is attached as a file, its text read without building a tree.
    """

    max_bytes: int = 26_214_400
    max_depth: int = 50
    max_parts: int = 500
    max_header_bytes: int = 1024 * 1024
    max_addresses: int = 1000
    max_header_params: int = 100
    max_html_depth: int = 1000
    max_html_render_bytes: int = 1024 * 1024
    max_html_sanitize_bytes: int = 2 * 1024 * 1024


_DEFAULT_LIMITS: Final = ParseLimits()

# --------------------------------------------------------------------------------------------
# Small text helpers
# --------------------------------------------------------------------------------------------

# Every C0/C1 control, DEL and the Unicode line/paragraph separators become one space, and
# runs of spaces collapse: the result is always a single line.
_ONE_LINE_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029 ]+")
# In multi-line bodies only the controls that are never text are removed.
_BODY_CTRL_RE: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BODY_CTRL_TABLE: Final = dict.fromkeys([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_FOLD_RE: Final = re.compile(r"\r\n|\r|\n")


def _one_line(text: str) -> str:
    """Flatten decoded header text to one line: no CR, LF or other control character."""
    if text.isprintable() and "  " not in text:
        return text.strip()  # every character the expression replaces is unprintable but " "
    return _ONE_LINE_RE.sub(" ", text).strip()


def _to_bytes(text: str) -> bytes:
    """Recover the original octets of text that the parser decoded ASCII+surrogateescape."""
    return text.encode("utf-8", "surrogateescape")


def _sanitize_exc(exc: BaseException) -> str:
    """One safe line describing an exception, for a ParseError message."""
    text = f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")
    return _one_line(text)[:200]


# --------------------------------------------------------------------------------------------
# Charsets
# --------------------------------------------------------------------------------------------

# Codecs that are "text encodings" to Python but must never decode mail: UTF-7 turns
# "+ADw-script+AD4-" into "<script>", the escape codecs interpret backslashes, punycode/idna
# are for host names, and the rest are not charsets at all.
_DENIED_CODECS: Final = frozenset(
    {
        "utf-7",
        "unicode-escape",
        "raw-unicode-escape",
        "punycode",
        "idna",
        "undefined",
        "charmap",
        "mbcs",
        "oem",
        "unicode-internal",
    }
)
# Labels seen in real mail that Python does not know, mapped to the codec they mean. The
# "unknown" labels map to None: decode by detection.
_CHARSET_ALIASES: Final[dict[str, str | None]] = {
    "x-unknown": None,
    "unknown": None,
    "unknown-8bit": None,
    "x-user-defined": None,
    "iso-8859-8-i": "iso8859-8",
    "iso-8859-8-e": "iso8859-8",
    "iso-8859-6-i": "iso8859-6",
    "iso-8859-6-e": "iso8859-6",
    "windows-31j": "cp932",
    "x-sjis": "cp932",
    "windows-874": "cp874",
    "x-gbk": "gb18030",
    "x-euc-jp": "euc_jp",
    "x-mac-cyrillic": "mac-cyrillic",
    "x-mac-roman": "mac-roman",
}
# Declared charsets that mail clients routinely use for their superset: decoding with the
# superset gives the same text for conforming data and the right text for the rest (the WHATWG
# encoding standard does the same).
_CHARSET_UPGRADES: Final = {
    "iso8859-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "shift_jis": "cp932",
    "euc_kr": "cp949",
    "tis-620": "cp874",
}
_CHARSET_LABEL_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.:+-]{0,39}")
_UTF8_LIKE: Final = frozenset({"utf-8", "ascii", "utf-8-sig"})
# Detection looks at a bounded sample: its cost must not grow with a 20 MB part.
_DETECT_SAMPLE: Final = 64 * 1024


@functools.lru_cache(maxsize=256)
def _codec_for(label: str) -> str | None:
    """The Python codec to decode text declared as ``label``, or None if unknown or unsafe."""
    name = label.strip().strip("\"'").lower()
    if not _CHARSET_LABEL_RE.fullmatch(name):
        return None
    if name in _CHARSET_ALIASES:
        alias = _CHARSET_ALIASES[name]
        if alias is None:
            return None
        name = alias
    try:
        info = codecs.lookup(name)
    except Exception:  # LookupError mostly; a broken codec module must not escape either
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None
    canonical = info.name.lower().replace("_", "-")
    if canonical in _DENIED_CODECS:
        return None
    return _CHARSET_UPGRADES.get(info.name, info.name)


def _detect_codec(data: bytes) -> str | None:
    """charset-normalizer's safe guess for undeclared 8-bit text, or None.

    It ranks candidates by "chaos" then "coherence"; when several single-byte code pages tie
    its first pick is arbitrary, so among the tied best we prefer windows-1252.
    """
    # Imported on first use: ~30 ms of every start, and most mail declares its charset.
    import charset_normalizer

    try:
        matches = list(charset_normalizer.from_bytes(data[:_DETECT_SAMPLE]))
    except Exception:  # detection is best effort: any failure means "no guess"
        return None
    if not matches:
        return None
    least_chaos = min(m.percent_chaos for m in matches)
    calm = [m for m in matches if m.percent_chaos <= least_chaos + 1.0]
    best_coherence = max(m.percent_coherence for m in calm)
    tied = [m for m in calm if m.percent_coherence >= best_coherence - 1.0]
    for m in tied:
        if "cp1252" in m.could_be_from_charset:
            return "cp1252"
    return _codec_for(str(tied[0].encoding))


_WESTERN_PUNCTUATION: Final = frozenset("€‚„…†‡‰‹›‘’“”•–—™«»°£©®§¡¿·\xa0")


def _looks_western(data: bytes) -> str | None:
    """The windows-1252 text of ``data`` if it reads as a Western European text, else None.

    charset-normalizer guesses poorly on short Western texts (a French paragraph comes back
    as cp1257), while undeclared 8-bit mail is overwhelmingly windows-1252. We accept that
    reading when every non-ASCII character is a letter or common typographic sign and such
    letters are a minority of the letters: Cyrillic or Greek single-byte text decodes to
    accented Latin letters too, but then nearly every letter is non-ASCII.
    """
    sample = data[:_DETECT_SAMPLE]
    try:
        text = sample.decode("cp1252")
    except UnicodeDecodeError:
        return None
    letters = 0
    accented = 0
    for ch in text:
        if ch.isascii():
            letters += ch.isalpha()
        elif ch in _WESTERN_PUNCTUATION:
            continue
        elif unicodedata.category(ch).startswith("L"):
            letters += 1
            accented += 1
        else:
            return None
    if accented > 0.3 * letters:
        return None
    return data.decode("cp1252", "replace")


def _decode_undeclared(data: bytes) -> str:
    """Text of octets whose charset is unknown: ASCII, UTF-8, detection, else UTF-8 lossy."""
    if data.isascii():
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    western = _looks_western(data)
    if western is not None:
        return western
    codec = _detect_codec(data)
    if codec is not None:
        try:
            return data.decode(codec, "replace")
        except Exception:  # a codec that cannot even decode with "replace": use the fallback
            pass
    return data.decode("utf-8", "replace")


def _utf16_codec(data: bytes) -> str:
    """utf-16 without a BOM: guess the byte order from where the zero bytes of ASCII fall."""
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return "utf-16"
    sample = data[:4096]
    return "utf-16-le" if sample[1::2].count(0) >= sample[0::2].count(0) else "utf-16-be"


def _decode_text(data: bytes, label: str | None) -> str:
    """Text of octets declared as charset ``label`` (which may be absent, unknown or hostile)."""
    codec = _codec_for(label) if label else None
    if codec is None:
        return _decode_undeclared(data)
    if codec == "utf-16":
        codec = _utf16_codec(data)
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        if codec in _UTF8_LIKE:
            # "us-ascii" or "utf-8" on 8-bit data that is not UTF-8 is a mislabel, not a
            # damaged UTF-8 text: the real charset is some legacy one.
            return _decode_undeclared(data)
    except Exception:  # the codec failed otherwise: treat the label as unknown
        return _decode_undeclared(data)
    try:
        return data.decode(codec, "replace")
    except Exception:  # same: never let a codec error out of here
        return _decode_undeclared(data)


def _decode_8bit(text: str) -> str:
    """Header text as parsed (raw 8-bit octets surrogate-escaped) to real text."""
    if text.isascii():
        return text
    return _decode_undeclared(_to_bytes(text))


# --------------------------------------------------------------------------------------------
# Base64: one decoder for every path
# --------------------------------------------------------------------------------------------

_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# Everything but the alphabet and "=": removed before the general decoding.
_B64_NOISE: Final = bytes(sorted(set(range(256)) - set(_B64_ALPHABET + b"=")))
_B64_DATA_RE: Final = re.compile(rb"[A-Za-z0-9+/]")
_B64_PADDING_RE: Final = re.compile(rb"=+")
# Each run of padding costs a step of Python: past this many, the rest of a body is decoded
# as one blob (no real part joins that many files; a text mislabelled base64 may hold as many
# "=" as it likes).
_B64_MAX_PADDING_RUNS: Final = 100_000


def _b64_decode(data: bytes, start: int = 0, end: int | None = None) -> bytes:
    """The octets of the base64 text ``data[start:end]``: the one decoder of every path.

    Characters outside the alphabet (line ends, spaces, junk) are skipped. Padding that
    completes a quantum ends a blob, and decoding goes on with the next one: two encoded files
    joined in one part (some scanners append one) both come out whole, where
    ``binascii.a2b_base64`` and the stdlib's ``get_payload(decode=True)`` stop at the first
    padding and drop the rest. Padding that cannot end a blob (after 0 or 1 characters of a
    quantum) is ignored; a blob's unpadded last quantum is decoded as if padded, and a lone last
    character, which holds no whole octet, is dropped. It never fails.
    """
    stop = len(data) if end is None else end
    first_pad = data.find(b"=", start, stop)
    if first_pad < 0 or _B64_DATA_RE.search(data, first_pad, stop) is None:
        # One blob, padded at most at its end: binascii decodes it in place, without a copy
        # of the text, and gives what _b64_blobs gives whenever it succeeds.
        try:
            return binascii.a2b_base64(memoryview(data)[start:stop])
        except binascii.Error:
            pass  # an unpadded or cut last quantum
    return _b64_blobs(data[start:stop].translate(None, _B64_NOISE))


def _b64_blobs(text: bytes) -> bytes:
    """Decode ``text`` (alphabet and "=" only) blob by blob, as :func:`_b64_decode` says."""
    view = memoryview(text)
    out: list[bytes] = []
    blob: list[memoryview] = []
    count = 0  # characters of the alphabet in the current blob
    pos = 0
    for runs, m in enumerate(_B64_PADDING_RE.finditer(text)):
        if runs == _B64_MAX_PADDING_RUNS:
            view = memoryview(text[pos:].replace(b"=", b""))
            pos = 0
            break
        blob.append(view[pos : m.start()])
        count += m.start() - pos
        pos = m.end()
        if count % 4 >= 2:
            _b64_blob(blob, count, out)
            blob, count = [], 0
    blob.append(view[pos:])
    _b64_blob(blob, count + len(view) - pos, out)
    return b"".join(out)


def _b64_blob(pieces: list[memoryview], count: int, out: list[bytes]) -> None:
    """Append the octets of one blob (its alphabet characters, in ``pieces``) to ``out``."""
    text: memoryview | bytes = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    whole = count - count % 4
    out.append(binascii.a2b_base64(text[:whole]))
    tail = bytes(text[whole:count])
    if len(tail) >= 2:
        out.append(binascii.a2b_base64(tail + b"=" * (4 - len(tail))))


# --------------------------------------------------------------------------------------------
# RFC 2047 encoded words
# --------------------------------------------------------------------------------------------

# Tolerant: any charset token, either case of B/Q, and an encoded text of anything but "?"
# (which also keeps the match linear: a scan never runs past the next "?").
_EW_RE: Final = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?]*)\?=")


def _ew_bytes(encoding: str, text: str) -> bytes | None:
    """The octets of one encoded word's text, or None if it cannot be decoded."""
    raw = _to_bytes(text)
    if encoding in "bB":
        return _b64_decode(raw)
    try:
        return binascii.a2b_qp(raw, header=True)
    except (binascii.Error, ValueError):
        return None


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words in header text, tolerating the usual breakage.

    Adjacent words in the same charset are joined before decoding, because senders split
    multi-byte characters across words; white space between encoded words is dropped as
    RFC 2047 section 6.2 says. A word that cannot be decoded stays as it was written.
    """
    if "=?" not in value:
        return _decode_8bit(value)
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    after_word = False

    def flush() -> None:
        if pending:
            out.append(_decode_text(bytes(pending), pending_charset or None))
            pending.clear()

    for m in _EW_RE.finditer(value):
        between = value[pos : m.start()]
        if between and not (after_word and between.isspace()):
            flush()
            out.append(_decode_8bit(between))
        charset = m.group(1).split("*", 1)[0].lower()
        data = _ew_bytes(m.group(2), m.group(3))
        if data is None:
            flush()
            out.append(_decode_8bit(m.group(0)))
            after_word = False
        else:
            if pending and charset != pending_charset:
                flush()
            pending_charset = charset
            pending.extend(data)
            after_word = True
        pos = m.end()
    flush()
    out.append(_decode_8bit(value[pos:]))
    return "".join(out)


# --------------------------------------------------------------------------------------------
# MIME parameters (our own linear parser: no codec is ever called with a declared charset)
# --------------------------------------------------------------------------------------------


class _Param(NamedTuple):
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


def _parse_params(value: str) -> tuple[str, Mapping[str, _Param]]:
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
def _parse_params_cached(value: str) -> tuple[str, Mapping[str, _Param]]:
    return _parse_params_uncached(value)


def _parse_params_uncached(value: str) -> tuple[str, dict[str, _Param]]:
    segments = _split_params(value)
    main = segments[0].strip().lower() if segments else ""
    params: dict[str, _Param] = {}
    extended: dict[str, list[tuple[int, str, bool]]] = {}
    for segment in segments[1:]:
        name, sep, val = segment.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            continue
        m = _RFC2231_NAME_RE.fullmatch(name)
        if m is None:
            params.setdefault(name, _Param(_unquote(val)))
            continue
        number = int(m.group(2)) if m.group(2) is not None else 0
        encoded = m.group(2) is None or m.group(3) is not None
        extended.setdefault(m.group(1), []).append((number, _unquote(val), encoded))
    for name, pieces in extended.items():
        if name in params:
            continue
        pieces.sort(key=lambda p: p[0])
        charset = ""
        chunks: list[bytes] = []
        any_encoded = False
        for index, (_, text, encoded) in enumerate(pieces):
            if encoded:
                any_encoded = True
                if index == 0 and text.count("'") >= 2:
                    charset, _lang, text = text.split("'", 2)
                chunks.append(urllib.parse.unquote_to_bytes(_to_bytes(text)))
            else:
                chunks.append(_to_bytes(text))
        data = b"".join(chunks)
        if any_encoded:
            params[name] = _Param("", data, charset.strip())
        else:
            params[name] = _Param(data.decode("utf-8", "surrogateescape"))
    return main, params


def _param_text(param: _Param | None, *, encoded_words: bool = False) -> str | None:
    """The decoded text of a parameter (None if absent)."""
    if param is None:
        return None
    if param.data is not None:
        return _decode_text(param.data, param.charset or None)
    return _decode_words(param.text) if encoded_words else _decode_8bit(param.text)


# --------------------------------------------------------------------------------------------
# Pre-scan: header block, MIME structure and limits, on the raw bytes
# --------------------------------------------------------------------------------------------

# A blank line; bare CR line ends ("\r\r") count too, as they do for the feed parser, and
# after "\r\r" an LF belongs to the empty line (a bare CR, then a CRLF).
_HEADER_END_RE: Final = re.compile(rb"\r?\n\r?\n|\r\r\n?")
# A line the feed parser would not take as a header line ends the header block too.
_NOT_HEADER_LINE_RE: Final = re.compile(rb"^(?!From |[\x21-\x39\x3b-\x7e]*:|[ \t])", re.M)
# One pass finds every Content-Type field (with its continuation lines) and every line that
# starts with "--" (a candidate boundary delimiter), in order. The pattern starts with a
# literal newline rather than "^" so that the regex engine can skip ahead to line ends; the
# first line is matched separately. Where a bare CR ends lines too, as for the feed parser,
# _SCAN_CR_RE starts at either (three times slower): after the CR of a CRLF it finds an LF,
# not a field, and goes on from there.
_SCAN_BODY: Final = rb"(?:content-type[ \t]*:([^\r\n]*(?:(?:\r\n?|\n)[ \t][^\r\n]*)*)|--([^\r\n]*))"
_SCAN_RE: Final = re.compile(rb"\n" + _SCAN_BODY, re.I)
_SCAN_CR_RE: Final = re.compile(rb"[\r\n]" + _SCAN_BODY, re.I)
_SCAN_FIRST_RE: Final = re.compile(_SCAN_BODY, re.I)
_BARE_CR_RE: Final = re.compile(rb"\r(?!\n)")
_LINE_END_RE: Final = re.compile(rb"\r\n?|\n")
# Charsets the stdlib may meet in an RFC 2231 boundary parameter without harm.
_SAFE_BOUNDARY_CHARSETS: Final = frozenset({"", "us-ascii", "ascii", "utf-8", "iso-8859-1"})


def _header_end(raw: bytes, limit: int) -> int | None:
    """Offset of the body (after the blank line), or None if the header block is too big."""
    if raw.startswith((b"\n", b"\r\n")):
        return raw.index(b"\n") + 1
    if raw.startswith(b"\r"):
        return 1
    window = limit + 4
    end = _blank_line_end(raw, 0, window)
    if end is not None:
        return end
    if len(raw) <= limit:
        return len(raw)
    # Only whole lines inside the window count: a line cut by the window looks like a
    # non-header line to the regex.
    cut = raw.rfind(b"\n", 0, window)
    m = _NOT_HEADER_LINE_RE.search(raw, 0, cut) if cut > 0 else None
    if m is not None:
        return m.start()
    return None


_LF_BLANK_LINE_RE: Final = re.compile(rb"\n\r?\n")


def _blank_line_end(data: bytes, start: int, end: int) -> int | None:
    """``_HEADER_END_RE.search(data, start, end).end()``, None if it finds nothing.

    That regular expression starts with an optional character, so its engine tries it at
    every offset of the header block; this one starts with a line end, and the "\r\r" that
    bare CR line ends make is looked for only before the line break found.
    """
    m = _LF_BLANK_LINE_RE.search(data, start, end)
    if m is None:
        cr_cr = data.find(b"\r\r", start, end)
    else:
        first = m.start()
        if first > start and data[first - 1] == 0x0D:
            first -= 1  # the match starts at the CR of a CRLF
        # "\r\r" wins only where it starts before that line break.
        cr_cr = data.find(b"\r\r", start, first + 1)
    if cr_cr < 0:
        return None if m is None else m.end()
    return cr_cr + (3 if data.startswith(b"\n", cr_cr + 2) and cr_cr + 3 <= end else 2)


@dataclass
class _Scan:
    """What the pre-scan learned about the MIME structure."""

    # boundary -> [(offset of the "--" of its delimiter line, is the close delimiter)]
    delimiters: dict[str, list[tuple[int, bool]]]
    # boundary -> how many Content-Type fields declare it (spans are trusted only if one)
    declared: dict[str, int]
    bare_cr: bool  # some lines end with a CR alone


def _scan(raw: bytes, limits: ParseLimits) -> _Scan:
    """Check size-like limits on the raw bytes, before the stdlib parser ever sees them.

    Nesting is followed with a stack: a multipart Content-Type pushes its boundary, a
    ``message/*`` one pushes a level without a boundary, a delimiter line of a boundary on the
    stack pops what was opened inside it. Only the first Content-Type field of a header block
    counts, as for the parser: the message's own, a part's (after a delimiter line) and an
    attached message's (after its part's header block). One pasted into body text (a
    forwarded message shown as text, a text/rfc822-headers part) is text to the parser and
    nests nothing. A header block ends at its blank line; one without a blank line in
    ``max_header_bytes`` reaches as far as the next block, which can only make the check
    stricter than the parser.
    """
    data = raw
    stack: list[str | None] = []
    delimiters: dict[str, list[tuple[int, bool]]] = {}
    declared: dict[str, int] = {}
    digests: set[str] = set()  # boundaries of multipart/digest: parts are messages by default
    parts = 0
    # The header block whose first Content-Type field is still to come, as [start, end).
    block_end = _BlockEnds(data, limits.max_header_bytes)
    block = (0, block_end(0))
    typed = False
    attached = False  # the block's type is message/*: an attached message's block follows
    first = _SCAN_FIRST_RE.match(data)
    bare_cr = b"\r" in data and _BARE_CR_RE.search(data) is not None
    lines = (_SCAN_CR_RE if bare_cr else _SCAN_RE).finditer(data)
    matches = itertools.chain([first] if first is not None else [], lines)
    for m in matches:
        field = m.group(1)
        if field is not None:
            at = m.start(1)
            if attached and at >= block[1]:
                block = (block[1], block_end(block[1]))
                typed = attached = False
            if not block[0] <= at < block[1]:
                continue  # body text
            semicolons = field.count(b";")
            if semicolons > limits.max_header_params:
                raise LimitExceeded(
                    f"a Content-Type field has {semicolons} parameters; the limit "
                    f"(max_header_params) is {limits.max_header_params}"
                )
            if typed:
                continue  # the parser reads the first Content-Type field of a block
            typed = True
            ctype, params = _parse_params(_unfold(field.decode("ascii", "surrogateescape")))
            if ctype.startswith("multipart/"):
                boundary = _scan_boundary(params.get("boundary"))
                if boundary is None:
                    continue
                stack.append(boundary)
                declared[boundary] = declared.get(boundary, 0) + 1
                if ctype == "multipart/digest":
                    digests.add(boundary)
            elif ctype.startswith("message/"):
                stack.append(None)
                attached = True
            else:
                continue
            _check_depth(stack, limits)
            continue
        if not stack:
            continue
        line = m.group(2).decode("ascii", "surrogateescape").rstrip(" \t")
        for index in range(len(stack) - 1, -1, -1):
            boundary = stack[index]
            if boundary is None:
                continue
            if line == boundary:
                del stack[index + 1 :]
                parts += 1
                if parts > limits.max_parts:
                    raise LimitExceeded(
                        f"the message has at least {parts} MIME parts; the limit (max_parts) "
                        f"is {limits.max_parts}"
                    )
                delimiters.setdefault(boundary, []).append((m.start(2) - 2, False))
                # The part's header block starts on the next line.
                start = m.end(2) + (2 if data.startswith(b"\r\n", m.end(2)) else 1)
                block = (start, block_end(start))
                typed = attached = False
                if boundary in digests:
                    # A message unless its header block says otherwise (and even then: one
                    # level too many is only stricter), with a header block of its own next.
                    stack.append(None)
                    _check_depth(stack, limits)
                    attached = True
                break
            if line == boundary + "--":
                del stack[index:]
                delimiters.setdefault(boundary, []).append((m.start(2) - 2, True))
                block = (0, 0)  # an epilogue follows: text
                typed = attached = False
                break
    return _Scan(delimiters, declared, bare_cr)


def _check_depth(stack: list[str | None], limits: ParseLimits) -> None:
    # The top-level entity is level 1; each container adds one.
    if len(stack) > limits.max_depth:
        raise LimitExceeded(
            f"MIME nesting reaches at least {len(stack)} levels; the limit (max_depth) is "
            f"{limits.max_depth}"
        )


class _BlockEnds:
    """Where each header block ends: after its blank line, or, without one in ``window``
    bytes, at the end of the data (an over-long block is header all along).

    Blocks are asked for in order, and no byte is searched twice: a part without a blank line
    would otherwise cost ``window`` bytes of search, 500 parts of them 128 MB.
    """

    def __init__(self, data: bytes, window: int) -> None:
        self.data = data
        self.window = window
        self.searched = (0, 0)  # no blank line starts in there, but the one that ends at found
        self.found: int | None = None

    def __call__(self, start: int) -> int:
        data = self.data
        if data.startswith((b"\n", b"\r"), start):
            return start  # no header fields at all
        low, high = self.searched
        # A blank line is at most 4 bytes ("\r\n\r\n"): a block starting before it ends there.
        if self.found is not None and low <= start < self.found - 4:
            return self.found
        resume = max(start, high - 3) if low <= start <= high else start
        limit = start + self.window
        self.found = _blank_line_end(data, resume, limit)
        low = low if low <= start <= high else start
        self.searched = (low, limit if self.found is None else self.found)
        return len(data) if self.found is None else self.found


def _scan_boundary(param: _Param | None) -> str | None:
    """The boundary the stdlib will use, as ``Message.get_boundary`` computes it."""
    if param is None:
        return None
    if param.data is None:
        return param.text.rstrip()
    if param.charset.lower() not in _SAFE_BOUNDARY_CHARSETS:
        # The stdlib would decode this boundary with whatever codec the label names.
        raise ParseError(
            f"the boundary parameter declares the charset {param.charset[:40]!r}; only ASCII "
            "boundaries are accepted"
        )
    return param.data.decode("latin-1").rstrip()


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------


def _unfold(value: str) -> str:
    """RFC 5322 unfolding: remove the line breaks, keep the white space after them."""
    return _FOLD_RE.sub("", value) if "\n" in value or "\r" in value else value


def _header_map(msg: Message) -> dict[str, list[str]]:
    """All top-level header values by lowercased name, raw (8-bit octets surrogate-escaped)."""
    headers: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        headers.setdefault(name.strip().lower(), []).append(value)
    return headers


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return _unfold(values[0]) if values else None


def _part_header(part: Message, name: str) -> str | None:
    """First raw value of a header of a MIME part (never the stdlib's decoded view)."""
    for key, value in part.raw_items():
        if key.strip().lower() == name:
            return _unfold(value)
    return None


def _part_fields(part: Message) -> dict[str, str]:
    """Each header field of a MIME part by lowercased name: its first value, as _part_header."""
    fields: dict[str, str] = {}
    for key, value in part.raw_items():
        name = key.strip().lower()
        if name not in fields:
            fields[name] = _unfold(value)
    return fields


_MSGID_RE: Final = re.compile(r"<([^<>\s]{1,998})>")
_MAX_REFERENCES: Final = 200


def _clean_id(text: str) -> str | None:
    ident = _one_line(_decode_8bit(text)).replace(" ", "")
    return ident[:998] or None


def _msgid(value: str | None) -> str | None:
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


def _msgids(value: str | None) -> tuple[str, ...]:
    """All message-ids of a References value, oldest first."""
    if not value:
        return ()
    ids = [i for i in (_clean_id(m) for m in _MSGID_RE.findall(value)) if i]
    if len(ids) > _MAX_REFERENCES:
        # The root and the most recent ancestors are the ones threading needs.
        ids = [ids[0], *ids[-(_MAX_REFERENCES - 1) :]]
    return tuple(ids)


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(_decode_8bit(value).strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        # "-0000" means "UTC, but the sender's zone is unknown" (RFC 5322 3.3).
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------

_getaddresses: Callable[..., list[tuple[str, str]]] = email.utils.getaddresses
_HAS_STRICT: Final = "strict" in inspect.signature(email.utils.getaddresses).parameters
_QUOTED_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_ADDR_SPECIALS_RE: Final = re.compile(r'\\.|[()"]', re.S)
_MAX_COMMENT_DEPTH: Final = 16
_BAD_ADDR_RE: Final = re.compile(r'[\s\x00-\x1f\x7f<>(),;:"\\\[\]]')


def _balanced(value: str) -> bool:
    """Quotes closed, parentheses balanced and shallow (the stdlib recurses on comments)."""
    depth = 0
    quoted = False
    for m in _ADDR_SPECIALS_RE.finditer(value):
        token = m.group(0)
        if token[0] == "\\":
            continue
        if token == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif token == "(":
            depth += 1
            if depth > _MAX_COMMENT_DEPTH:
                return False
        else:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not quoted


def _address_count(value: str) -> int:
    """Upper bound of the addresses in an address header: its unquoted commas plus one."""
    if '"' not in value:
        return value.count(",") + 1
    return _QUOTED_RE.sub("", value).count(",") + 1


# The common shapes of an address list, "Name <local@domain>", '"Last, First" <a@b>' and a
# bare "local@domain", whose parse by getaddresses is known without running its parser (a
# character-by-character loop in Python). Words and address parts are kept to characters that
# the stdlib parser takes as they are: no comments, escapes, groups, routes or literals.
_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]++"
_ADDR_SPEC: Final = rf"{_ATEXT}(?:\.{_ATEXT})*+@{_ATEXT}(?:\.{_ATEXT})*+"
_PHRASE_WORD: Final = r'(?:[^\x00-\x20\x7f()<>@,:;"\[\]\\]++|"[^"\\\x00-\x1f\x7f]*+")'
_SIMPLE_ADDRESS_RE: Final = re.compile(
    rf"[ \t]*+(?:({_PHRASE_WORD}(?:[ \t]++{_PHRASE_WORD})*+)?[ \t]*+<({_ADDR_SPEC})>"
    rf"|({_ADDR_SPEC}))[ \t]*+"
)
_QUOTED_WORD_RE: Final = re.compile(r'"([^"]*)"|([^ \t"]+)')


def _simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """What ``getaddresses([value])`` returns, if ``value`` has only the common shapes."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    while (m := _SIMPLE_ADDRESS_RE.match(value, pos)) is not None:
        phrase, routed, bare = m.groups()
        if bare is not None:
            pairs.append(("", bare))
        else:
            # The stdlib joins the phrase's words, unquoted, with single spaces.
            words = _QUOTED_WORD_RE.findall(phrase or "")
            pairs.append((" ".join(quoted or atom for quoted, atom in words), routed))
        pos = m.end()
        if pos == len(value):
            return pairs
        if value[pos] != ",":
            return None
        pos += 1
    return None


def _split_addresses(value: str) -> list[tuple[str, str]]:
    """``getaddresses`` in strict mode (CVE-2023-27043), emulated where Python lacks it.

    Any doubt yields no address at all rather than a wrong one: a field whose parse does not
    produce exactly one address per unquoted comma, or that holds a "[" outside a domain
    literal, was misread and is dropped whole, as the patched stdlib does.
    """
    simple = _simple_addresses(value)
    if simple is not None:
        return simple
    if not _balanced(value):
        return []
    try:
        if _HAS_STRICT:
            pairs = _getaddresses([value], strict=True)
        else:
            pairs = _getaddresses([value])
            if len(pairs) != _address_count(value):
                return []
            pairs = [("", "") if "[" in addr else (name, addr) for name, addr in pairs]
    except (RecursionError, IndexError, ValueError, TypeError):
        return []
    return pairs


# What separates addresses, and what may hide a comma: quoted strings, comments, route
# addresses and domain literals.
_ADDR_LIST_TOKENS_RE: Final = re.compile(r'\\.|[()"<>\[\],]', re.S)
# The text of an address header that is read: the parsers of odd shapes (quotes, comments)
# take a second per MiB of hostile text, and 256 KiB hold several thousand real addresses.
_MAX_ADDRESS_TEXT: Final = 256 * 1024


def _cut_addresses(value: str, keep: int) -> tuple[str, int, int]:
    """``value`` up to the end of its ``keep``-th address or of its last address within
    _MAX_ADDRESS_TEXT characters; with the count of addresses kept and of those that follow.

    Only commas outside quoted strings, comments, angle brackets and domain literals separate
    addresses; both counts are upper bounds, as _address_count's. An address that runs past
    the text limit is not kept at all: cut, it could read as another address.
    """
    if value.count(",") < keep and len(value) <= _MAX_ADDRESS_TEXT:
        return value, value.count(",") + 1, 0
    commas = depth = 0
    cut = 0  # the end of the last whole address seen
    quoted = routed = literal = False
    for m in _ADDR_LIST_TOKENS_RE.finditer(value, 0, _MAX_ADDRESS_TEXT):
        token = m.group(0)
        if token[0] == "\\":
            continue
        if quoted:
            quoted = token != '"'
        elif token == '"':
            quoted = True
        elif token == "(":
            depth += 1
        elif depth:
            depth -= token == ")"
        elif literal:
            literal = token != "]"
        elif token == "[":
            literal = True
        elif routed:
            routed = token != ">"
        elif token == "<":
            routed = True
        elif token == ",":
            commas += 1
            cut = m.start()
            if commas == keep:
                break
    else:
        if len(value) <= _MAX_ADDRESS_TEXT:
            return value, commas + 1, 0
    if commas == 0:
        return "", 0, _address_count(value)
    return value[:cut], commas, _address_count(value[cut + 1 :])


def _addresses(
    values: list[str] | None, limits: ParseLimits, field: str, notes: list[str]
) -> list[tuple[str, str]] | None:
    """(display name, address) pairs of an address header; None if the header is absent.

    Addresses are split on the raw header and only then are display names decoded, so that
    an encoded word cannot smuggle a "<victim@example.org>" into the parse. A header listing
    more than ``max_addresses`` (or more than 256 KiB of them) is read up to there, and a note
    says so: real mail goes out to thousands at times, and the rest costs time without telling
    the processors anything more.
    """
    if not values:
        return None
    raw, kept, more = _cut_addresses(", ".join(_unfold(v) for v in values), limits.max_addresses)
    if more:
        notes.append(
            f"The {field} header lists up to {kept + more} addresses; only the first {kept} "
            f"were read (max_addresses is {limits.max_addresses}, and at most "
            f"{_MAX_ADDRESS_TEXT // 1024} KiB of a header are read)."
        )
    result: list[tuple[str, str]] = []
    for name, addr in _split_addresses(raw) if raw else ():
        address = _decode_8bit(addr).strip()
        if not address or _BAD_ADDR_RE.search(address) or address.count("@") > 1:
            continue
        result.append((_one_line(_decode_words(name)), address))
    return result


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------

_RESERVED_NAMES: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{device}{n}" for device in ("COM", "LPT") for n in "123456789¹²³"}
)
_SEPARATORS_RE: Final = re.compile(r"[/\\]")
_MAX_NAME_INPUT: Final = 4096
# Characters that Windows refuses in a name (the separators are handled before).
_WINDOWS_ILLEGAL_RE: Final = re.compile(r'[<>:"|?*]')
_MAX_NAME_BYTES: Final = 150
_MAX_EXT_CHARS: Final = 16


def _strip_name_junk(name: str) -> str:
    """Replace characters that are never part of a sane file name by "_".

    Control characters (NUL included), Unicode format characters (bidi overrides such as
    U+202E disguise "exe" as "txt"), line/paragraph separators and lone surrogates (not
    encodable to UTF-8) all go.
    """
    return "".join(
        "_" if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") else ch for ch in name
    )


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def safe_filename(name: str | None, fallback: str) -> str:
    """A name safe to create as a file on POSIX and Windows, derived from a sender's ``name``.

    Only the last path component is kept (``/`` and ``\\`` both separate), so ``..``
    components and drive letters cannot lead anywhere; control, format and Windows-illegal
    characters become ``_``; leading dots and spaces and trailing dots and spaces are removed;
    reserved Windows device names (``CON``, ``NUL``, ``COM1``..., with or without extension)
    get a ``_`` prefix; the result is at most 150 UTF-8 bytes, keeping the extension. When
    nothing usable is left, ``fallback`` (sanitized the same way) is returned, and
    ``"attachment"`` if even that is empty.
    """
    for candidate in (name, fallback):
        if not candidate:
            continue
        cleaned = _clean_name(candidate)
        if cleaned:
            return cleaned
    return "attachment"


def _clean_name(name: str) -> str:
    if len(name) > _MAX_NAME_INPUT:
        # Keep the head and the tail: the tail holds the last path component and extension.
        name = name[: _MAX_NAME_INPUT // 2] + name[-256:]
    text = unicodedata.normalize("NFC", name)
    text = _strip_name_junk(text)
    text = _SEPARATORS_RE.split(text)[-1]
    text = _WINDOWS_ILLEGAL_RE.sub("_", text)
    text = text.strip(" .")
    if not text.strip("_ "):
        return ""
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem or len(ext) > _MAX_EXT_CHARS or " " in ext:
        stem, ext = text, ""
    if ext:
        ext = "." + ext
    if stem.split(".", 1)[0].rstrip(" ").upper() in _RESERVED_NAMES:
        stem = "_" + stem
    room = _MAX_NAME_BYTES - len(ext.encode("utf-8"))
    stem = _truncate_utf8(stem, room).rstrip(" .")
    if not stem:
        return ""
    return stem + ext


_PREFERRED_EXTENSIONS: Final = {
    "application/octet-stream": ".bin",
    "application/ms-tnef": ".dat",
    "application/pdf": ".pdf",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/rfc822-headers": ".txt",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
}


def _invert(types_map: dict[str, str]) -> dict[str, str]:
    inverted: dict[str, str] = {}
    for extension, content_type in types_map.items():
        inverted.setdefault(content_type, extension)
    return inverted


# mimetypes' built-in tables, read once: guess_type()/guess_extension() would load the
# system's mime.types files on first use, and this module does no I/O.
_TYPES_BY_EXTENSION: Final = dict(mimetypes.types_map)
_EXTENSIONS_BY_TYPE: Final = _invert(_TYPES_BY_EXTENSION)


def _type_for(name: str | None) -> str:
    if name and "." in name:
        return _TYPES_BY_EXTENSION.get(
            "." + name.rpartition(".")[2].lower(), "application/octet-stream"
        )
    return "application/octet-stream"


def _extension_for(content_type: str) -> str:
    return _PREFERRED_EXTENSIONS.get(content_type) or _EXTENSIONS_BY_TYPE.get(content_type, ".bin")


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_URL_SCHEMES: Final = frozenset(nh3.ALLOWED_URL_SCHEMES | {"cid"})
# Block elements whose start tag makes html5ever scan the stack of open elements: nesting
# them n deep costs O(n^2) in the sanitizer (100,000 nested <div> take 25 s).
_HTML_BLOCK_TAG_RE: Final = re.compile(
    r"<(/?)(?:address|article|aside|blockquote|center|details|dialog|dir|div|dl|fieldset|"
    r"figcaption|figure|footer|form|h[1-6]|header|hgroup|listing|main|menu|nav|ol|pre|"
    r"search|section|summary|ul)(?=[\s/>])",
    re.I,
)
_META_CHARSET_RE: Final = re.compile(
    rb"<meta[^>]{0,200}?charset\s*=\s*[\"']?([A-Za-z0-9_.:-]{1,40})", re.I
)
_BLANK_LINES_RE: Final = re.compile(r"\n{3,}")


def _unsanitizable(markup: str, limits: ParseLimits) -> str | None:
    """Why the sanitizer must not read ``markup`` (its tree takes ~25 times the markup, and
    it is quadratic in the nesting of block elements), or None."""
    if len(markup) > limits.max_html_sanitize_bytes:
        return (
            f"is {len(markup)} characters, over max_html_sanitize_bytes "
            f"({limits.max_html_sanitize_bytes})"
        )
    if markup.count("<") <= limits.max_html_depth:
        return None  # every level takes a start tag: too few tags to nest that deep
    depth = 0
    for m in _HTML_BLOCK_TAG_RE.finditer(markup):
        if m.group(1):
            depth = max(0, depth - 1)
        else:
            depth += 1
            if depth > limits.max_html_depth:
                return f"nests block elements deeper than max_html_depth ({limits.max_html_depth})"
    return None


def _sanitize_html(markup: str) -> str:
    """The HTML with scripts, styles, event handlers and unsafe URLs removed (nh3/ammonia)."""
    return nh3.clean(markup, url_schemes=set(_URL_SCHEMES))


def _flatten_html(markup: str) -> str:
    """Plain text of HTML with no layout: the fast fallback for huge or unrenderable HTML."""
    text = html_lib.unescape(nh3.clean(markup, tags=set()))
    return _BLANK_LINES_RE.sub("\n\n", text).strip()


# HTML over max_html_sanitize_bytes never reaches nh3, whose tree takes ~25 times the markup
# (a 20 MB HTML body took 460 MiB to sanitize and as much again to flatten): its text is read
# by _html_text_lean instead, which gives nh3's flattening without building any tree. The
# tokens it tells apart, as html5ever's tokenizer does: comments (and the bogus ones a "<!",
# "<?" or "</" that opens no tag makes), end tags and start tags (a quoted attribute value
# may hold a ">"); a "<" that opens none of these is text.
_HTML_ATTRIBUTES: Final = r"""(?:[^>"']++|"[^"]*+"|'[^']*+')*+(?:>|\Z)"""
_HTML_NOT_TAGS: Final = (
    r"<!---?>|<!--.*?(?:--!?>|\Z)|<[!?][^>]*+(?:>|\Z)|</>|</(?=[^A-Za-z>])[^>]*+(?:>|\Z)"
)
_HTML_TOKEN_RE: Final = re.compile(
    rf"{_HTML_NOT_TAGS}|</[A-Za-z][^>]*+(?:>|\Z)|<([A-Za-z][^\s/>]*+){_HTML_ATTRIBUTES}", re.S
)
# Elements whose content the tokenizer reads as text up to their end tag: raw text, text with
# character references (title, textarea), or dropped whole by nh3 (script and style).
_RAW_TEXT_ELEMENTS: Final = frozenset({"xmp", "iframe", "noembed", "noframes", "noscript"})
_ESCAPABLE_TEXT_ELEMENTS: Final = frozenset({"title", "textarea"})
_DROPPED_ELEMENTS: Final = frozenset({"script", "style"})
_TEXT_ELEMENTS: Final = _RAW_TEXT_ELEMENTS | _ESCAPABLE_TEXT_ELEMENTS | _DROPPED_ELEMENTS
# The tree builder drops a line end right after these start tags.
_LEADING_NEWLINE_ELEMENTS: Final = frozenset({"pre", "textarea", "listing"})
# The common case in one regular expression, with no step of Python per tag: every token
# becomes a NUL (which ends a character reference just as the end of a text node does, and
# never occurs in a cleaned body), script and style go with their content, and the line end
# after <pre>, <listing> and <textarea> with their start tag.
_HTML_MARKUP: Final = "|".join(
    [
        _HTML_NOT_TAGS,
        r"</[A-Za-z][^>]*+(?:>|\Z)",
        *(
            # (No group and back reference: with them, Python 3.11's sre gets a group's
            # span wrong inside the repetition of _HTML_RUN_RE, and raises SystemError.)
            rf"<{name}(?=[\s/>]){_HTML_ATTRIBUTES}.*?(?:</{name}(?=[\s/>])[^>]*+(?:>|\Z)|\Z)"
            for name in ("script", "style")
        ),
        rf"<(?:pre|listing|textarea)(?=[\s/>]){_HTML_ATTRIBUTES}\n?",
        rf"<[A-Za-z][^\s/>]*+{_HTML_ATTRIBUTES}",
    ]
)
_HTML_MARKUP_RE: Final = re.compile(_HTML_MARKUP, re.S | re.I)
# re.sub makes a list of every piece before joining them (ten times 20 MB of short pieces):
# the document is read in runs of whole tokens and texts instead, each replaced on its own.
_HTML_RUN_RE: Final = re.compile(rf"(?:[^<]++|{_HTML_MARKUP}|<){{1,4096}}", re.S | re.I)
# What that expression does not read as the tokenizer does: raw text elements (their content
# is neither markup nor character references), and title or textarea content holding a "<".
_HTML_RAW_TEXT_RE: Final = re.compile(
    r"<(?:xmp|iframe|noembed|noframes|noscript|plaintext)(?=[\s/>])", re.I
)
_HTML_ESCAPABLE_TEXT_RE: Final = re.compile(r"<(title|textarea)(?=[\s/>])", re.I)


@functools.lru_cache(maxsize=16)
def _end_tag_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"</{name}(?=[\s/>])[^>]*+(?:>|\Z)", re.I)


def _html_text_lean(markup: str) -> str:
    """``_flatten_html(markup)`` (nh3's text of ``markup``) without building a tree.

    A property test holds the two equal on ordinary markup. They differ where html5ever's
    tree builder moves text (text straight inside a <table> goes before it), where nh3 drops
    text that this keeps (inside <svg>, <math> and <template>), and where the tokenizer reads
    odd markup its own way ("<a b"c>").
    """
    if _html_markup_strippable(markup):
        text = _html_text_stripped(markup)
    else:
        text = _html_text_tokens(markup)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def _html_markup_strippable(markup: str) -> bool:
    """True if _html_text_stripped reads ``markup`` as the tokenizer does."""
    if _HTML_RAW_TEXT_RE.search(markup):
        return False
    for m in _HTML_ESCAPABLE_TEXT_RE.finditer(markup):
        end = _end_tag_re(m.group(1).lower()).search(markup, m.end())
        if markup.find("<", m.end(), len(markup) if end is None else end.start()) >= 0:
            return False
    return True


def _html_text_stripped(markup: str) -> str:
    """The text of ``markup`` with every token removed at once (see _HTML_MARKUP_RE).

    A run ends before a "<": a character reference never spans two of them.
    """
    out = _Pieces()
    for run in _HTML_RUN_RE.finditer(markup):
        text = _HTML_MARKUP_RE.sub("\x00", run.group())
        out.append(html_lib.unescape(text).replace("\x00", ""))
    return out.join()


# A step of Python per tag costs ~5 us: past this many tags the rest of a document is read
# by _html_text_stripped, which may read raw text elements as markup (their text is in the
# HTML attached whole, see _attach_unsanitized_html).
_HTML_TOKENS_READ: Final = 200_000


def _html_text_tokens(markup: str) -> str:
    """The text of ``markup``, token by token: any markup, a step of Python per tag."""
    out = _Pieces()
    pos = 0
    for _ in range(_HTML_TOKENS_READ):
        m = _HTML_TOKEN_RE.search(markup, pos)
        if m is None:
            break
        if m.start() > pos:
            out.append(html_lib.unescape(markup[pos : m.start()]))
        pos = m.end()
        name = (m.group(1) or "").lower()
        if name in _LEADING_NEWLINE_ELEMENTS and markup.startswith("\n", pos):
            pos += 1
        if name == "plaintext":
            out.append(markup[pos:])
            pos = len(markup)
            break
        if name in _TEXT_ELEMENTS:
            end = _end_tag_re(name).search(markup, pos)
            stop = len(markup) if end is None else end.start()
            if name in _RAW_TEXT_ELEMENTS:
                out.append(markup[pos:stop])
            elif name in _ESCAPABLE_TEXT_ELEMENTS:
                out.append(html_lib.unescape(markup[pos:stop]))
            pos = len(markup) if end is None else end.end()
    else:
        out.append(_html_text_stripped(markup[pos:]))
        return out.join()
    out.append(html_lib.unescape(markup[pos:]))
    return out.join()


class _Pieces:
    """Strings to join, held in joined runs: a list of a million short pieces (the text
    between the tags of 20 MB of HTML) takes ten times their text."""

    _RUN: Final = 4096

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.pieces: list[str] = []

    def append(self, piece: str) -> None:
        self.pieces.append(piece)
        if len(self.pieces) >= self._RUN:
            self.runs.append("".join(self.pieces))
            self.pieces.clear()

    def join(self) -> str:
        self.runs.append("".join(self.pieces))
        self.pieces.clear()
        text = "".join(self.runs)
        self.runs.clear()
        return text


def _render_html(markup: str, limits: ParseLimits) -> str:
    """Readable text of an HTML body: paragraphs, lists, links as "[text](url)"."""
    if len(markup) <= limits.max_html_render_bytes:
        try:
            text = _html_text(markup)
        except Exception:  # inscriptis/lxml failing on odd markup: use the plain flattening
            text = ""
        text = "\n".join(line.rstrip() for line in text.splitlines())
        text = _BLANK_LINES_RE.sub("\n\n", text).strip()
        if text:
            return text
    # Too big for the layout engine, or lxml gave up (it drops documents nested too deep).
    return _flatten_html(markup)


def _html_text(markup: str) -> str:
    """inscriptis' text of ``markup`` (``get_text`` showing links), computed fast if possible."""
    if "<table" not in markup:  # tables are for inscriptis: spare the walk that would stop
        try:
            return _TextCanvas().render(markup)
        except Exception:  # _Unrenderable, or anything odd: inscriptis decides, as ever
            pass
    # Imported on first use, like tnefparse: only tables and odd markup need it, and every
    # start (the parsing processes' too) would pay ~9 ms for it.
    from inscriptis import get_text  # type: ignore[import-untyped, unused-ignore]
    from inscriptis.model.config import ParserConfig  # type: ignore[import-untyped, unused-ignore]

    return str(get_text(markup, ParserConfig(display_links=True)))


# The layout inscriptis gives each element in its default ("relaxed") CSS profile: block,
# margin before, margin after, left padding, pre-formatted, text prefix and suffix, and
# whether a blank prefix/suffix is dropped inside pre-formatted text. Other tags are inline.
class _Layout(NamedTuple):
    block: bool = False
    margin_before: int = 0
    margin_after: int = 0
    padding: int = 0
    pre: bool = False
    prefix: str = ""
    suffix: str = ""
    limit_affixes: bool = False


_PARAGRAPH: Final = _Layout(True, 1, 1)
_PLAIN_BLOCK: Final = _Layout(True)
_LAYOUTS: Final[dict[str, _Layout]] = {
    **dict.fromkeys(("p", "figure", "h1", "h2", "h3", "h4", "h5", "h6"), _PARAGRAPH),
    **dict.fromkeys(("ul", "ol"), _Layout(True, padding=4)),
    **dict.fromkeys(
        ("li", "address", "article", "aside", "footer", "header", "hgroup", "layer", "main"),
        _PLAIN_BLOCK,
    ),
    **dict.fromkeys(("nav", "figcaption", "blockquote"), _PLAIN_BLOCK),
    "div": _Layout(True, padding=2),
    **dict.fromkeys(("pre", "xmp", "listing", "plaintext"), _Layout(True, pre=True)),
    "q": _Layout(prefix='"', suffix='"'),
    "span": _Layout(prefix=" ", suffix=" ", limit_affixes=True),
}
_INLINE: Final = _Layout()
_UL_BULLETS: Final = ("* ", "+ ", "o ", "- ")
# Elements that inscriptis lays out with machinery this renderer does not reproduce (tables)
# or hides (display: none); nh3 never lets the hidden ones through, tables it does.
_RENDER_ELSEWHERE: Final = frozenset(
    {"table", "tr", "td", "th", "head", "link", "meta", "script", "title", "style"}
)
_RENDER_MAX_DEPTH: Final = 200
# Parsers lock themselves while parsing, so threads can share this one as they share
# lxml.html's own parser (which this is, minus its element classes).
_HTML_PARSER: Final = etree.HTMLParser()


class _Unrenderable(Exception):
    """Markup that _TextCanvas leaves to inscriptis itself."""


class _Box:
    """One open element: its layout and what inscriptis derives for it from its parent."""

    __slots__ = ("block", "bullet", "layout", "pre", "prefix", "previous_margin_after", "suffix")

    def __init__(self, layout: _Layout, parent: _Box | None, bullet: str = "") -> None:
        self.layout = layout
        self.block = layout.block
        self.pre = layout.pre
        self.prefix = layout.prefix
        self.suffix = layout.suffix
        self.bullet = bullet
        self.previous_margin_after = 0
        if parent is not None:
            if layout.limit_affixes and parent.pre:
                if self.prefix.isspace():
                    self.prefix = ""
                if self.suffix.isspace():
                    self.suffix = ""
            if layout.block and parent.block:
                self.previous_margin_after = parent.layout.margin_after


# Every inline element without a prefix or suffix behaves the same whatever its parent.
_PLAIN_INLINE_BOX: Final = _Box(_INLINE, None)


class _TextCanvas:
    """inscriptis' rendering of HTML to text (``get_text`` with ``display_links``), lean.

    The same algorithm as inscriptis' Canvas, Block and Prefix (margins between blocks,
    indentation, list bullets, white-space collapsing, links as "[text](url)"), with its
    layout fixed to the default CSS profile instead of computed per element, for the markup
    nh3 lets through. It raises _Unrenderable for what it does not reproduce: tables, style
    attributes, hidden elements, very deep trees. inscriptis spends most of its time copying
    per-element style objects and collapsing white space one character at a time.
    """

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.margin = 1000
        # The current block (line) being written.
        self.content = ""
        self.collapsable = True
        # The prefix shared by all blocks: indentation and bullets.
        self.consumed = False
        self.padding = 0
        self.paddings: list[int] = []
        self.bullets: list[str] = []
        # Document state.
        self.list_counters: list[str | int] = []
        self.link_target = ""

    # Prefix -------------------------------------------------------------------------------

    def _pop_bullet(self) -> str:
        for index in range(len(self.bullets) - 1, -1, -1):
            bullet = self.bullets[index]
            if bullet:
                self.bullets[index] = ""
                return bullet
        return ""

    def _first_prefix(self) -> str:
        if self.consumed:
            return ""
        self.consumed = True
        bullet = self._pop_bullet()
        return " " * (self.padding - len(bullet)) + bullet

    def _unconsumed_bullet(self) -> str:
        if self.consumed:
            return ""
        bullet = self._pop_bullet()
        if not bullet:
            return ""
        return " " * (self.padding - self.paddings[-1] - len(bullet)) + bullet

    # Block --------------------------------------------------------------------------------

    def _merge(self, text: str, pre: bool) -> None:
        if pre:
            text = self._first_prefix() + text.replace("\n", "\n" + " " * self.padding)
            self.content += html_lib.unescape(text)
            self.collapsable = False
            return
        # Every run of white space becomes one space, and none follows a collapsable one.
        if text.isprintable() and "  " not in text:
            # The only white space is single spaces (all others are unprintable).
            if self.collapsable and text.startswith(" "):
                text = text[1:]
                if not text:
                    return
            self.collapsable = text.endswith(" ")
        elif words := text.split():
            first_is_space, last_is_space = text[0].isspace(), text[-1].isspace()
            text = " ".join(words)
            if first_is_space and not self.collapsable:
                text = " " + text
            if last_is_space:
                text += " "
            self.collapsable = last_is_space
        elif self.collapsable:
            return
        else:
            text = " "
            self.collapsable = True
        if not self.content:
            text = self._first_prefix() + text
        self.content += html_lib.unescape(text)

    def _new_block(self) -> None:
        self.consumed = False
        self.content = ""
        self.collapsable = True

    # Canvas -------------------------------------------------------------------------------

    def _flush_inline(self) -> bool:
        # inscriptis reads the block's text twice here, and each read drops one trailing
        # space when the block ends in collapsable white space.
        content = self.content
        if self.collapsable and content.endswith(" "):
            content = content[:-1]
        if not content:
            self.content = content
            return False
        if self.collapsable and content.endswith(" "):
            content = content[:-1]
        self.blocks.append(content)
        self._new_block()
        self.margin = 0
        return True

    def _write_unconsumed_bullet(self) -> None:
        bullet = self._unconsumed_bullet()
        if bullet:
            self.blocks.append(bullet)
            self._new_block()
            self.margin = 0

    def _open_block(self, box: _Box) -> None:
        if not self._flush_inline() and box.bullet:
            self._write_unconsumed_bullet()
        padding = box.layout.padding
        self.padding += padding
        self.paddings.append(padding)
        self.bullets.append(box.bullet)
        required = max(box.previous_margin_after, box.layout.margin_before)
        if required > self.margin:
            self.blocks.append("\n" * (required - self.margin - 1))
            self.margin = required

    def _close_block(self, box: _Box) -> None:
        if not self._flush_inline() and box.bullet:
            self._write_unconsumed_bullet()
        if self.paddings:
            self.padding -= self.paddings.pop()
            del self.bullets[-1]
        margin_after = box.layout.margin_after
        if margin_after > self.margin:
            self.blocks.append("\n" * (margin_after - self.margin - 1))
            self.margin = margin_after

    def _write_newline(self) -> None:
        if not self._flush_inline():
            self.blocks.append("")
            self._new_block()

    # Tree walk ----------------------------------------------------------------------------

    def render(self, markup: str) -> str:
        """The text of ``markup``; raises _Unrenderable where inscriptis must decide."""
        content = markup.strip()
        if not content:
            return ""
        if content.startswith("<?xml "):
            raise _Unrenderable  # inscriptis strips the declaration first
        # lxml.html's document_fromstring, minus its Python element classes (a third of
        # the parse time), which this walk does not need.
        root = etree.fromstring(content, _HTML_PARSER)
        if root is None:
            raise _Unrenderable  # inscriptis parses such a document again as <pre>
        self._element(root, _Box(_INLINE, None), 0)  # inscriptis' <body> style, above <html>
        self._flush_inline()
        return "\n".join(self.blocks)

    def _element(self, element: etree._Element, parent: _Box, depth: int) -> None:
        tag = element.tag
        if not isinstance(tag, str):
            if tag is etree.Comment and element.tail:
                self._merge(element.tail, parent.pre)
            return
        if (
            depth > _RENDER_MAX_DEPTH
            or tag in _RENDER_ELSEWHERE
            or element.get("style") is not None
        ):
            raise _Unrenderable
        layout = _LAYOUTS.get(tag)
        if tag == "li":
            if element.get("value") is not None:
                raise _Unrenderable
            counter = self.list_counters[-1] if self.list_counters else "* "
            if isinstance(counter, int):
                self.list_counters[-1] = counter + 1
                box = _Box(_PLAIN_BLOCK, parent, f"{counter}. ")
            else:
                box = _Box(_PLAIN_BLOCK, parent, counter)
        elif layout is None:
            box = _PLAIN_INLINE_BOX
        else:
            box = _Box(layout, parent)
        if tag == "a":
            self.link_target = element.get("href", "")
            if self.link_target:
                self._merge("[", False)
        elif tag == "br":
            self._write_newline()
        elif tag == "ul":
            self.list_counters.append(_UL_BULLETS[len(self.list_counters) % len(_UL_BULLETS)])
        elif tag == "ol":
            self.list_counters.append(1)
        if box.block:
            self._open_block(box)
        text = element.text
        if text:
            self._merge(box.prefix + text + box.suffix, box.pre)
        for child in element:
            self._element(child, box, depth + 1)
        if tag == "a":
            if self.link_target:
                self._merge(f"]({self.link_target})", False)
        elif tag == "ul" or tag == "ol":
            self.list_counters.pop()
        if box.block:
            self._close_block(box)
        tail = element.tail
        if tail:
            self._merge(parent.prefix + tail + parent.suffix, parent.pre)


# --------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------


def _raw_payload(part: Message) -> object:
    """A part's payload as parsed: text (8-bit octets surrogate-escaped), a list of parts or None.

    Never ``get_payload()``: on 8-bit text it decodes with whatever charset the part
    declares (``utf-7``, ``unicode_escape``...), and the octets are then lost.
    """
    return getattr(part, "_payload", None)


_UU_ENCODINGS: Final = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})


def _payload_bytes(part: Message, cte_field: str | None) -> bytes:
    """The decoded octets of a leaf part (base64, quoted-printable, uuencode or as is).

    ``cte_field`` is the part's raw Content-Transfer-Encoding value (None if absent). Base64
    always goes through :func:`_b64_decode`, and a body that :func:`_elide_large_bodies` took
    out of the parser's sight is decoded straight from the raw bytes: both give what the
    small path gives for the same part.
    """
    payload = _raw_payload(part)
    if not isinstance(payload, str):
        return b""
    cte = (cte_field or "").strip().lower()
    elided = _ELIDED.get()
    span = elided[1].get(payload) if elided is not None else None
    if span is not None and elided is not None:
        raw, (start, end) = elided[0], span
        if cte == "base64":
            return _b64_decode(raw, start, end)
        if cte == "quoted-printable":
            return binascii.a2b_qp(memoryview(raw)[start:end])  # what quopri.decodestring runs
        data = raw[start:end]
    else:
        data = _to_bytes(payload)
    if cte == "base64":
        return _b64_decode(data)
    if cte == "quoted-printable":
        # The stdlib compares the header without stripping it: "quoted-printable " came
        # back undecoded.
        return quopri.decodestring(data)
    # The stdlib's get_payload(decode=True) for the rest: uuencode where the header says so
    # unstripped, else the octets as they are.
    if str(part.get("content-transfer-encoding", "")).lower() in _UU_ENCODINGS:
        try:
            return _uu_decode(data)
        except ValueError:
            return data
    return data


# Lines are split a chunk at a time: splitting 20 MB of uuencoded text at once makes a list of
# 330,000 lines (about twice the text, and as much again for the decoded lines).
_LINES_CHUNK: Final = 1 << 20


def _uu_decode(data: bytes, chunk: int = _LINES_CHUNK) -> bytes:
    """``email.message._decode_uu(data)``, lean: the same octets, or the same ValueError."""
    lines = _lines(data, chunk)
    for line in lines:
        if line.startswith(b"begin "):
            mode = line.removeprefix(b"begin ").partition(b" ")[0]
            try:
                int(mode, base=8)
            except ValueError:
                continue
            break
    else:
        raise ValueError("`begin` line not found")
    runs: list[bytes] = []
    decoded: list[bytes] = []
    for line in lines:
        if not line:
            raise ValueError("Truncated input")
        if line.strip(b" \t\r\n\f") == b"end":
            break
        try:
            decoded.append(binascii.a2b_uu(line))
        except binascii.Error:
            # The stdlib's workaround for broken uuencoders (by Fredrik Lundh).
            decoded.append(binascii.a2b_uu(line[: (((line[0] - 32) & 63) * 4 + 5) // 3]))
        if len(decoded) >= 4096:
            runs.append(b"".join(decoded))
            decoded.clear()
    runs.append(b"".join(decoded))
    return b"".join(runs)


def _lines(data: bytes, chunk: int) -> Iterator[bytes]:
    """``data.splitlines()``, split ``chunk`` bytes (and up to a line end) at a time."""
    pos = 0
    while pos < len(data):
        end = _LINE_END_RE.search(data, pos + chunk) if pos + chunk < len(data) else None
        stop = len(data) if end is None else end.end()
        yield from data[pos:stop].splitlines()
        pos = stop


# Large leaf bodies are taken straight from the raw bytes instead of going through the stdlib
# parser, which holds a 20 MB body as text lines, joined text and decoded bytes at once (about
# 8 times the message at its peak). The parser sees a short placeholder instead of each such
# body; _payload_bytes decodes the span of the raw bytes it stands for. A placeholder is
# trusted only where the parser made it the whole payload of a part of a multipart (or of the
# whole message): anything else and the message is parsed again without elision.
_ELIDE_FROM: Final = 2 * 1024 * 1024
_ELIDE_PART: Final = 256 * 1024
_ELIDED: contextvars.ContextVar[tuple[bytes, dict[str, tuple[int, int]]] | None] = (
    contextvars.ContextVar("_ELIDED", default=None)
)
_CT_CONTAINER_RE: Final = re.compile(
    rb"(?:\A|[\r\n])content-type[ \t]*:\s*(?:multipart|message)/", re.I
)


def _elide_large_bodies(
    raw: bytes, scan: _Scan, root_body: int
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """``raw`` with every large leaf body replaced by a placeholder; the spans by placeholder."""
    if len(raw) <= _ELIDE_FROM:
        return raw, {}
    candidates = _leaf_spans(raw, scan)
    if not candidates and not _CT_CONTAINER_RE.search(raw, 0, root_body):
        candidates = [(root_body, len(raw))]  # a single-part message
    # A body holding a line that starts like a delimiter of any multipart would end a part
    # where the parser reads the raw bytes: never hide such a line from it.
    boundaries = [b.encode("utf-8", "surrogateescape") for b in scan.declared]
    line_start = b"[\r\n]" if scan.bare_cr else b"\n"
    guard = re.compile(line_start + b"--(?:" + b"|".join(map(re.escape, boundaries)) + b")")
    nonce = secrets.token_hex(8)
    pieces: list[bytes] = []
    spans: dict[str, tuple[int, int]] = {}
    last = 0
    for start, end in candidates:
        if end - start < _ELIDE_PART or (boundaries and guard.search(raw, start - 1, end)):
            continue
        marker = f"mailintegration-elided-{nonce}-{len(spans)}"
        spans[marker] = (start, end)
        pieces += [raw[last:start], marker.encode("ascii")]
        last = end
    if not spans:
        return raw, {}
    pieces.append(raw[last:])
    return b"".join(pieces), spans


def _leaf_spans(raw: bytes, scan: _Scan) -> list[tuple[int, int]]:
    """(start, end) of the body of every part between two delimiters that may be a leaf."""
    # Boundaries declared twice (an attached message reusing the outer one) are followed too:
    # a span the parser reads otherwise fails _elision_holds.
    delimiters = sorted(
        (offset, close) for found in scan.delimiters.values() for offset, close in found
    )
    spans: list[tuple[int, int]] = []
    for (start, close), (end, _) in itertools.pairwise(delimiters):
        if close:
            continue  # an epilogue, not a part
        line_end = _LINE_END_RE.search(raw, start, end)
        if line_end is None or raw.startswith((b"\n", b"\r"), line_end.end()):
            continue  # no header block
        head_start = line_end.end()
        body_start = _blank_line_end(raw, head_start, end)
        if body_start is None:
            continue
        # The line end before the next delimiter belongs to that delimiter (RFC 2046).
        body_end = end - 2 if raw[end - 2 : end] == b"\r\n" else end - 1
        if body_end - body_start < _ELIDE_PART:
            continue
        head_end = len(raw[head_start:body_start].rstrip(b"\r\n")) + head_start
        if _CT_CONTAINER_RE.search(raw, head_start - 1, head_end):
            continue
        if _NOT_HEADER_LINE_RE.search(raw, head_start, head_end):
            continue  # the parser's header block ends before the blank line
        spans.append((body_start, body_end))
    return spans


def _elision_holds(tree: Message, spans: Mapping[str, tuple[int, int]]) -> bool:
    """True if each placeholder is the whole payload of the message or of a multipart's part."""
    if not isinstance(_raw_payload(tree), list):
        return len(spans) == 1 and _raw_payload(tree) in spans
    found = 0
    stack = [tree]
    while stack:
        part = stack.pop()
        in_multipart = part.get_content_maintype() == "multipart"
        payload = _raw_payload(part)
        for child in payload if isinstance(payload, list) else ():
            if not isinstance(child, Message):
                continue
            child_payload = _raw_payload(child)
            if isinstance(child_payload, list):
                stack.append(child)
            elif in_multipart and isinstance(child_payload, str) and child_payload in spans:
                found += 1
    return found == len(spans)


def _part_charset(params: Mapping[str, _Param]) -> str | None:
    charset = params.get("charset")
    if charset is None:
        return None
    return charset.text if charset.data is None else charset.data.decode("latin-1")


# format=flowed text is undone a chunk of whole lines at a time: splitting a 20 MB body of short
# lines at once makes millions of small strings (about ten times the text).
_UNFLOW_CHUNK: Final = 1 << 20


def _unflow(text: str, delsp: bool, chunk: int = _UNFLOW_CHUNK) -> str:
    """Undo RFC 3676 format=flowed soft line breaks (lines ending in a space are joined).

    ``chunk`` only sets how much text is split into lines at once; the result is the same
    for any value.
    """
    pieces: list[str] = []
    out: list[str] = []
    current: str | None = None
    current_depth = 0
    pos = 0
    while True:
        cut = text.find("\n", pos + chunk) if pos + chunk < len(text) else -1
        for line in (text[pos:] if cut < 0 else text[pos:cut]).split("\n"):
            depth = len(line) - len(line.lstrip(">"))
            content = line[depth:]
            if content.startswith(" "):
                content = content[1:]  # space-stuffing
            flowed = content.endswith(" ") and content != "-- "
            if current is not None and depth == current_depth:
                current += content
            else:
                if current is not None:
                    out.append(">" * current_depth + (" " if current_depth else "") + current)
                current, current_depth = content, depth
            if flowed:
                if delsp:
                    current = current[:-1]
            else:
                out.append(">" * current_depth + (" " if current_depth else "") + current)
                current = None
        if out:
            pieces.append("\n".join(out))
            out = []
        if cut < 0:
            break
        pos = cut + 1
    if current is not None:
        pieces.append(">" * current_depth + (" " if current_depth else "") + current)
    return "\n".join(pieces)


def _clean_body(text: str) -> str:
    """Body text with LF line ends and without the controls that are never text."""
    if "\r" in text:
        # Each CR, alone or before an LF, is one line end; str.replace makes no list of pieces
        # (the regular expression \r\n? made one per line: ten times a body of short lines).
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _BODY_CTRL_RE.search(text) is None:
        return text
    # str.translate is fast on ASCII text only, the regular expression everywhere else.
    return text.translate(_BODY_CTRL_TABLE) if text.isascii() else _BODY_CTRL_RE.sub("", text)


def _text_of(
    part: Message, params: Mapping[str, _Param], cte_field: str | None, *, html: bool = False
) -> str:
    data = _payload_bytes(part, cte_field)
    charset = _part_charset(params)
    if charset is None and html:
        m = _META_CHARSET_RE.search(data[:4096])
        if m is not None:
            charset = m.group(1).decode("ascii")
    text = _decode_text(data, charset)
    del data  # a large body is held as octets and as text, never longer than needed
    text = _clean_body(text)
    if not html:
        flowed = params.get("format")
        if flowed is not None and flowed.text.strip().lower() == "flowed":
            delsp = params.get("delsp")
            text = _unflow(text, delsp is not None and delsp.text.strip().lower() == "yes")
    return text


# --------------------------------------------------------------------------------------------
# message/* parts: the exact bytes of the attached message
# --------------------------------------------------------------------------------------------


def _span_body(raw: bytes, start: int, end: int) -> bytes:
    """Body of the entity raw[start:end]: what follows its header block."""
    if raw.startswith(b"\r\n", start):
        return raw[start + 2 : end]
    if raw.startswith((b"\n", b"\r"), start):
        return raw[start + 1 : end]
    m = _HEADER_END_RE.search(raw, start, end)
    return raw[m.end() : end] if m is not None else b""


def _exact_message_bytes(
    raw: bytes, scan: _Scan, parent_boundary: str | None, index: int, root_body: int | None
) -> bytes | None:
    """The bytes of the ``index``-th child of the multipart with ``parent_boundary``.

    For the top-level entity (``root_body`` given) it is everything after the header block.
    Found from the delimiter offsets of the pre-scan, and trusted only when the boundary is
    declared once (two multiparts sharing a boundary make the offsets ambiguous).
    """
    if root_body is not None:
        return raw[root_body:]
    if parent_boundary is None or scan.declared.get(parent_boundary) != 1:
        return None
    marks = scan.delimiters.get(parent_boundary, [])
    opens = [i for i, (_, close) in enumerate(marks) if not close]
    if index >= len(opens):
        return None
    here = opens[index]
    line_end = _LINE_END_RE.search(raw, marks[here][0])
    if line_end is None:
        return None
    start = line_end.end()
    if here + 1 < len(marks):
        end = marks[here + 1][0]
        # The line break before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
        if raw[end - 2 : end] == b"\r\n":
            end -= 2
        elif raw[end - 1 : end] in (b"\n", b"\r"):
            end -= 1
    else:
        end = len(raw)
    return _span_body(raw, start, max(start, end))


def _rebuild(entity: Message, linesep: bytes) -> bytes:
    """Bytes of a parsed entity rebuilt from its raw header lines and payloads.

    Used when the exact span of an attached message is unknown. Unlike ``as_bytes()`` it
    never refolds or re-encodes a header (compat32 folding is slow on long headers and
    rewrites them), so the result differs from the original only in line ends.
    """
    out = [
        _to_bytes(name)
        + b": "
        + _to_bytes(value).replace(b"\r\n", b"\n").replace(b"\n", linesep)
        + linesep
        for name, value in entity.raw_items()
    ]
    out.append(linesep)
    payload = _raw_payload(entity)
    if isinstance(payload, str):
        out.append(_leaf_bytes(payload))
    elif isinstance(payload, list):
        children = [c for c in payload if isinstance(c, Message)]
        if entity.get_content_maintype() == "multipart":
            _, params = _parse_params(_part_header(entity, "content-type") or "")
            boundary = _to_bytes(_scan_boundary(params.get("boundary")) or "")
            if entity.preamble:
                out += [_to_bytes(entity.preamble), linesep]
            for child in children:
                out += [b"--", boundary, linesep, _rebuild(child, linesep), linesep]
            out += [b"--", boundary, b"--", linesep]
            if entity.epilogue:
                out.append(_to_bytes(entity.epilogue))
        else:
            out.append(linesep.join(_rebuild(child, linesep) for child in children))
    return b"".join(out)


def _leaf_bytes(payload: str) -> bytes:
    """The raw octets of a leaf's payload, the elided body it stands for included."""
    elided = _ELIDED.get()
    span = elided[1].get(payload) if elided is not None else None
    if span is None or elided is None:
        return _to_bytes(payload)
    return elided[0][span[0] : span[1]]


def _serialize(part: Message, linesep: bytes) -> bytes:
    """Fallback bytes of a message/* part when its exact span is unknown."""
    payload = _raw_payload(part)
    if not isinstance(payload, list):
        return _leaf_bytes(payload) if isinstance(payload, str) else b""
    return linesep.join(_rebuild(sub, linesep) for sub in payload if isinstance(sub, Message))


def _looks_like(data: bytes, part: Message) -> bool:
    """Sanity check of a span: it starts with the first header of the parsed message."""
    payload = _raw_payload(part)
    if not isinstance(payload, list) or not payload or not isinstance(payload[0], Message):
        return True
    keys = payload[0].keys()
    if not keys:
        return True
    head = data.lstrip()[: len(keys[0]) + 1].decode("ascii", "replace").lower()
    return head == keys[0].lower() + ":"


# --------------------------------------------------------------------------------------------
# TNEF (winmail.dat)
# --------------------------------------------------------------------------------------------

_TNEF_SIGNATURE: Final = 0x223E9F78
_IMESSAGE_SIG: Final = b"\x07\x03\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"
_TNEF_MAX_OBJECTS: Final = 4096
_TNEF_MAX_PROPERTIES: Final = 100_000
_TNEF_MAX_DEPTH: Final = 2
_FIXED_MAPI_SIZES: Final = {
    0x0001: 0,
    0x0002: 2,
    0x000B: 2,
    0x0003: 4,
    0x0004: 4,
    0x000A: 4,
    0x0005: 8,
    0x0006: 8,
    0x0007: 8,
    0x0014: 8,
    0x0040: 8,
    0x0048: 16,
}
_VARIABLE_MAPI_TYPES: Final = frozenset({0x0000, 0x000D, 0x001E, 0x001F, 0x0102})


_STOPPED: Final = -1


class _TnefBudget:
    """Counts what tnefparse will do, so that hostile input is refused before it runs."""

    def __init__(self) -> None:
        self.properties = 0


def _u16(data: bytes, offset: int) -> int | None:
    return int.from_bytes(data[offset : offset + 2], "little") if offset + 2 <= len(data) else None


def _u32(data: bytes, offset: int) -> int | None:
    return int.from_bytes(data[offset : offset + 4], "little") if offset + 4 <= len(data) else None


def _mapi_walk(data: bytes, offset: int, depth: int, budget: _TnefBudget) -> int | None:
    """Walk a MAPI property list as tnefparse's ``decode_mapi`` will.

    Returns the offset after the list, ``_STOPPED`` where ``decode_mapi`` stops on an error of
    its own (harmless: it catches it), or None if the list is unsafe. tnefparse trusts the
    counts in the data: a property count of 4 billion past the end of the buffer spins (and
    logs) 4 billion times. We accept only counts the remaining bytes can hold, charge every
    value to the budget, and refuse anything we cannot follow exactly.
    """
    n = len(data)
    count = _u32(data, offset)
    if count is None:
        return None
    offset += 4
    if count > (n - offset) // 4 + 1:
        return None
    for _ in range(count):
        budget.properties += 1
        if budget.properties > _TNEF_MAX_PROPERTIES:
            return None
        attr_type = _u16(data, offset)
        attr_name = _u16(data, offset + 2)
        if attr_type is None or attr_name is None:
            # decode_mapi spins through the remaining count past the end: refuse.
            return None
        offset += 4
        if attr_name >= 0x8000:
            kind = _u32(data, offset + 16)
            if kind is None:
                return _STOPPED
            offset += 20
            if kind == 0:
                offset += 4
            else:
                length = _u32(data, offset)
                if length is None:
                    return _STOPPED
                offset += 4 + length + (-length % 4)
        values: int | None = None
        if attr_type & 0x1000:
            attr_type ^= 0x1000
            values = _u32(data, offset)
            if values is None:
                return _STOPPED
            offset += 4
            budget.properties += values
            if values > (n - offset) // 2 + 1 or budget.properties > _TNEF_MAX_PROPERTIES:
                return None
        for _ in range(values or 1):
            if attr_type in _FIXED_MAPI_SIZES:
                offset += _FIXED_MAPI_SIZES[attr_type]
                continue
            if attr_type not in _VARIABLE_MAPI_TYPES:
                return _STOPPED  # decode_mapi raises ValueError on the type and stops
            items = 1
            if not values:
                declared = _u32(data, offset)
                if declared is None:
                    return _STOPPED
                items = declared
                offset += 4
                budget.properties += items
                if items > (n - offset) // 4 + 1 or budget.properties > _TNEF_MAX_PROPERTIES:
                    return None
            chunks: list[bytes] = []
            for _ in range(items):
                length = _u32(data, offset)
                if length is None:
                    return _STOPPED
                offset += 4
                padded = length + (-length % 4)
                if attr_name == 0x3701:
                    chunks.append(data[offset : offset + padded].rstrip(b"\x00"))
                offset += padded
            if chunks:
                # An attached Outlook item: tnefparse decodes it as a nested TNEF.
                embedded = b"".join(chunks)
                if embedded.startswith(_IMESSAGE_SIG) and not _tnef_safe(
                    embedded[len(_IMESSAGE_SIG) :], depth + 1, budget
                ):
                    return None
        if (values or 1) % 2 and attr_type in (0x0002, 0x000B):
            offset += 2
    return offset


def _tnef_safe(data: bytes, depth: int, budget: _TnefBudget) -> bool:
    """True if tnefparse can decode ``data`` in time linear in its size."""
    n = len(data)
    if depth > _TNEF_MAX_DEPTH or _u32(data, 0) != _TNEF_SIGNATURE:
        return False
    offset = 6
    objects = 0
    copied = 0
    while offset + 12 < n:
        objects += 1
        # tnefparse slices the rest of the buffer for every object: bound that copying.
        copied += n - offset
        if objects > _TNEF_MAX_OBJECTS or copied > 64 * n + (16 << 20):
            return False
        name = _u16(data, offset + 1)
        size = _u32(data, offset + 5)
        if name is None or size is None:
            return False
        length = min(n - offset, size + 11)
        body = data[offset + 9 : offset + length - 2]
        if name in (0x9003, 0x9005):
            if _mapi_walk(body, 0, depth, budget) is None:
                return False
        elif name == 0x9004:
            # Recipient rows: each row continues where the previous one ended, so every row
            # must be followed exactly.
            rows = _u32(body, 0)
            if rows is None or rows > len(body) // 4:
                return False
            position = 4
            for _ in range(rows):
                after = _mapi_walk(body, position, depth, budget)
                if after is None or after == _STOPPED:
                    return False
                position = after
        offset += length
    return True


class _TnefContent(NamedTuple):
    """What a winmail.dat yields: its files, its plain text body, and whether that is all."""

    files: list[tuple[str | None, bytes]]
    body: str
    complete: bool  # no file over the budget or without data, no RTF or HTML body


def _tnef_files(data: bytes, max_files: int) -> _TnefContent:
    """The files inside a winmail.dat and its body text; no files when it cannot be read.

    When it holds more than that (files past ``max_files``, an RTF or HTML body, which are
    not rendered here), it is not complete: the caller keeps winmail.dat itself as well.
    """
    if not _tnef_safe(data, 0, _TnefBudget()):
        return _TnefContent([], "", False)
    from tnefparse.tnef import TNEF  # type: ignore[import-untyped, unused-ignore]

    try:
        tnef = TNEF(data, do_checksum=False)
        files: list[tuple[str | None, bytes]] = []
        complete = len(tnef.attachments) <= max_files and not (tnef.htmlbody or tnef._rtfbody)
        for item in tnef.attachments[:max_files]:
            content = item.data
            if not isinstance(content, bytes):
                complete = False
                continue
            try:
                title = item.long_filename()
            except Exception:  # undecodable name: the file is still worth keeping
                title = None
            if isinstance(title, bytes):
                title = _decode_undeclared(title)
            files.append((title if isinstance(title, str) else None, content))
        body = tnef.body
        if isinstance(body, bytes):
            body = _decode_undeclared(body)
        return _TnefContent(files, body if isinstance(body, str) else "", complete)
    except Exception:  # any failure inside tnefparse: keep winmail.dat itself
        return _TnefContent([], "", False)


# --------------------------------------------------------------------------------------------
# The MIME tree: the feed parser's result, built by slicing where the shape allows it
# --------------------------------------------------------------------------------------------

# The stdlib feed parser reads every line of a message through a stack of end-of-part predicates
# (a 100 KB attachment is some 1,800 lines of base64) and compiles a regular expression for every
# boundary it meets: a third of the cost of a parse, before the fast paths. _split_mime builds the
# very same compat32 Message tree by slicing the text, looking only at header lines and at lines
# that start with a boundary. It takes the stdlib's own decisions (content types, boundaries,
# header field splitting) from the Message objects it builds, follows the feed parser's rules for
# preambles, epilogues and the line break before a delimiter, and gives up on every shape whose
# handling there is irregular (envelope "From " lines, a continuation line first or a field
# without a name, a multipart without its first delimiter, repeated delimiter lines, an empty last
# part, message/delivery-status, bare CR line ends): the feed parser then parses the message, so
# the fast path only has to be exact on what it accepts.

# What the feed parser takes for a header line (its headerRE), and one header field with its
# continuation lines as its _parse_headers reads it (without the irregular cases).
_FEED_HEADER_LINE_RE: Final = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
_FIELD_RE: Final = re.compile(r"([\041-\071\073-\176]+):[ \t]*([^\n]*\n?(?:[\t ][^\n]*\n?)*)")
# The rest of a delimiter line after "--" + boundary (the feed parser's boundaryre).
_DELIMITER_TAIL_RE: Final = re.compile(r"(--)?[ \t]*(?:\r\n|\r|\n)?$")
# Deeper trees are left to the feed parser (the pre-scan bounds the depth anyway).
_SPLIT_MAX_DEPTH: Final = 64


class _Irregular(Exception):
    """The message has a shape the fast path does not handle: the feed parser must parse it."""


def _split_mime(source: bytes) -> Message | None:
    """``email.message_from_bytes(source)`` for the usual shapes of mail, else None.

    ``source`` must not contain bare CR line ends (the feed parser breaks lines there too).
    """
    text = source.decode("ascii", "surrogateescape")
    try:
        return _split_entity(text, 0, len(text), False, False, 0)
    except _Irregular:
        return None


def _strip_eol(text: str) -> str:
    """``text`` without its final line break: RFC 2046 gives it to the next delimiter."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith(("\r", "\n")) else text


def _split_entity(
    text: str, start: int, end: int, in_digest: bool, last_in_part: bool, depth: int
) -> Message:
    """The entity at ``text[start:end]``, as the feed parser builds it.

    ``last_in_part`` says that the entity ends a part of a multipart, and that what the feed
    parser created last in it loses the line break before the next delimiter.
    """
    if depth > _SPLIT_MAX_DEPTH:
        raise _Irregular
    msg = Message()
    if in_digest:
        msg.set_default_type("message/rfc822")
    body = _split_headers(msg, text, start, end)
    ctype = msg.get_content_type()
    maintype = ctype.split("/")[0]
    if ctype == "message/delivery-status":
        raise _Irregular
    if maintype == "message":
        msg.attach(_split_entity(text, body, end, False, last_in_part, depth + 1))
    elif maintype == "multipart":
        _split_multipart(msg, text, body, end, depth)
        if last_in_part:
            epilogue = msg.epilogue
            msg.epilogue = None if not epilogue else _strip_eol(epilogue)
    else:
        payload = text[body:end]
        msg.set_payload(_strip_eol(payload) if last_in_part else payload)
    return msg


def _split_headers(msg: Message, text: str, start: int, end: int) -> int:
    """Add the header fields at ``text[start:end]`` to ``msg``; the offset of the body."""
    pos = start
    while (m := _FIELD_RE.match(text, pos, end)) is not None:
        # What compat32's header_source_parse makes of the field's lines.
        msg.set_raw(m.group(1), m.group(2).rstrip("\r\n"))
        pos = m.end()
    if pos >= end:
        return end
    if text[pos] in "\r\n":
        newline = text.find("\n", pos, end)
        if newline < 0:
            raise _Irregular  # a bare CR
        return newline + 1  # after the blank line that ends the header block
    if _FEED_HEADER_LINE_RE.match(text, pos, end):
        raise _Irregular  # an envelope "From " line, a field without a name, a continuation
    # Any other line ends the header block and is the first line of the body.
    return pos


def _split_multipart(msg: Message, text: str, start: int, end: int, depth: int) -> None:
    """Preamble, parts and epilogue of the multipart ``msg`` whose body is text[start:end]."""
    boundary = msg.get_boundary()
    if boundary is None or "\n" in boundary or "\r" in boundary:
        raise _Irregular
    delimiters = _delimiter_lines(text, "--" + boundary, start, end)
    if not delimiters or delimiters[0][2]:
        raise _Irregular
    if delimiters[0][0] > start:
        msg.preamble = _strip_eol(text[start : delimiters[0][0]])
    in_digest = msg.get_content_type() == "multipart/digest"
    for index, (_, line_end, close) in enumerate(delimiters):
        if close:
            msg.epilogue = text[line_end:end]
            return
        part_end = delimiters[index + 1][0] if index + 1 < len(delimiters) else end
        if part_end == line_end:
            raise _Irregular  # repeated delimiter lines, or nothing after the last one
        msg.attach(_split_entity(text, line_end, part_end, in_digest, True, depth + 1))


def _delimiter_lines(
    text: str, separator: str, start: int, end: int
) -> list[tuple[int, int, bool]]:
    """(line start, line end, is the close delimiter) of each delimiter line in the range."""
    found: list[tuple[int, int, bool]] = []
    needle = "\n" + separator
    if text.startswith(separator, start, end):
        at = start
    else:
        hit = text.find(needle, start, end)
        at = hit + 1 if hit >= 0 else -1
    while at >= 0:
        newline = text.find("\n", at, end)
        line_end = end if newline < 0 else newline + 1
        m = _DELIMITER_TAIL_RE.match(text, at + len(separator), line_end)
        if m is not None:
            found.append((at, line_end, m.group(1) is not None))
        hit = text.find(needle, line_end - 1, end)
        at = hit + 1 if hit >= 0 else -1
    return found


def _mime_tree(source: bytes) -> Message:
    """The compat32 Message tree of ``source`` (see the module docstring for why compat32)."""
    # The fast path leaves bare CR line ends to the feed parser.
    simple_line_ends = b"\r" not in source or _BARE_CR_RE.search(source) is None
    tree = _split_mime(source) if simple_line_ends else None
    return tree if tree is not None else email.message_from_bytes(source)


# --------------------------------------------------------------------------------------------
# The walk over the MIME tree
# --------------------------------------------------------------------------------------------


_CONTENT_TYPE_RE: Final = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,128}")


class _Collector:
    """Accumulates body, html and attachments while walking the tree."""

    def __init__(self, raw: bytes, scan: _Scan, root_body: int, limits: ParseLimits) -> None:
        self.raw = raw
        self.scan = scan
        self.root_body = root_body
        self.limits = limits
        self.body: str | None = None
        self.html: str | None = None
        self.tnef_body = ""
        self.attachments: list[Attachment] = []
        self.seen_names: set[str] = set()
        self.next_copy: dict[str, int] = {}
        self.bounce = False
        self.parts = 0
        self.notes: list[str] = []  # what the walk left out of the model (see ParsedMessage)
        # Alternatives whose text is kept as a file (see alternatives): one version kept yet?
        self.secondary: dict[int, bool] = {}

    def add(
        self,
        name: str | None,
        content_type: str,
        data: bytes,
        *,
        content_id: str | None = None,
        inline: bool = False,
        force_ext: str | None = None,
    ) -> None:
        number = len(self.attachments) + 1
        fallback = f"attachment-{number}{_extension_for(content_type)}"
        safe = safe_filename(name, fallback)
        if force_ext and not safe.lower().endswith(force_ext):
            safe = safe_filename(safe + force_ext, fallback)
        self.attachments.append(
            Attachment(
                name=self._unique(safe),
                content_type=content_type,
                data=data,
                inline=inline,
                content_id=content_id,
            )
        )

    def _unique(self, name: str) -> str:
        """``name``, or ``name (2)``... if an earlier attachment has it (in any case).

        Case-insensitive because Windows and macOS file systems are: two attachments must
        never be saved over each other.
        """
        key = name.lower()
        if key not in self.seen_names:
            self.seen_names.add(key)
            return name
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem:
            stem, ext = name, ""
        suffix = "." + ext if ext else ""
        # Counting on from the last copy keeps 500 attachments of one name linear; the stem
        # is shortened first so that the 150-byte cap never cuts the " (k)" marker off.
        k = self.next_copy.get(key, 2)
        for _ in range(len(self.seen_names) + 1):
            marker = f" ({k}){suffix}"
            room = _MAX_NAME_BYTES - len(marker.encode("utf-8"))
            candidate = safe_filename(_truncate_utf8(stem, room).rstrip(" .") + marker, name)
            k += 1
            if candidate.lower() not in self.seen_names:
                break
        self.next_copy[key] = k
        self.seen_names.add(candidate.lower())
        return candidate

    def walk(self, root: Message) -> None:
        # Iterative, in document order: the stdlib tree can be as deep as the limits allow
        # and we never want Python recursion here.
        stack: list[tuple[Message, int, str | None, str | None, int, Message | None]] = [
            (root, 1, None, None, 0, None)
        ]
        while stack:
            part, depth, parent_type, parent_boundary, index, parent = stack.pop()
            # Counted like the pre-scan counts delimiters: every part but the root.
            self.parts += depth > 1
            if self.parts > self.limits.max_parts:
                raise LimitExceeded(
                    f"the message has more than {self.limits.max_parts} MIME parts; the limit "
                    f"(max_parts) is {self.limits.max_parts}"
                )
            if depth > self.limits.max_depth + 1:
                raise LimitExceeded(
                    f"MIME nesting is deeper than {depth - 1} levels; the limit (max_depth) is "
                    f"{self.limits.max_depth}"
                )
            ctype = part.get_content_type()
            if not _CONTENT_TYPE_RE.fullmatch(ctype):
                # 8-bit or spaced garbage: never let it into a stored content type.
                ctype = "application/octet-stream"
            if ctype.startswith("multipart/") and part.is_multipart():
                payload = _raw_payload(part)
                if isinstance(payload, list):
                    _, params = _parse_params(_part_header(part, "content-type") or "")
                    boundary = _scan_boundary(params.get("boundary"))
                    children = [
                        (child, depth + 1, ctype, boundary, i, part)
                        for i, child in enumerate(payload)
                        if isinstance(child, Message)
                    ]
                    if ctype == "multipart/alternative":
                        self.alternatives(part, [child for child, *_ in children])
                    stack.extend(reversed(children))
                continue
            group = id(parent) if parent_type == "multipart/alternative" else None
            self.leaf(part, ctype, parent_type, parent_boundary, index, depth == 1, group)

    def alternatives(self, part: Message, children: list[Message]) -> None:
        """Note an alternative whose text versions would all be dropped as body and HTML are
        taken already (a second alternative in a mixed part): one of them is kept as a file."""
        html_child = any(c.get_content_type() == "text/html" for c in children)
        if self.body is not None and (self.html is not None or not html_child):
            self.secondary[id(part)] = False

    def leaf(
        self,
        part: Message,
        ctype: str,
        parent_type: str | None,
        parent_boundary: str | None,
        index: int,
        is_root: bool,
        group: int | None = None,
    ) -> None:
        fields = _part_fields(part)
        _, ct_params = _parse_params(fields.get("content-type", ""))
        disposition, cd_params = _parse_params(fields.get("content-disposition", ""))
        name = _param_text(cd_params.get("filename"), encoded_words=True)
        if name is None:
            name = _param_text(ct_params.get("name"), encoded_words=True)
        content_id = _msgid(fields.get("content-id"))
        cte = fields.get("content-transfer-encoding")
        as_file = disposition == "attachment" or name is not None
        maintype = ctype.split("/", 1)[0]

        if maintype == "message":
            if ctype == "message/delivery-status":
                self.bounce = True
            self.message_part(part, ctype, name, parent_boundary, index, is_root)
            return
        if ctype.startswith("multipart/"):
            ctype = "text/plain"  # a multipart without a usable boundary: its body is text
        if group in self.secondary and ctype in ("text/plain", "text/html") and not as_file:
            if self.secondary[group]:
                return  # another version of the same text is kept
            self.secondary[group] = True
            as_file = True
        if ctype == "text/plain" and not as_file:
            if self.body is None:
                self.body = _text_of(part, ct_params, cte)
                return
            if parent_type == "multipart/alternative":
                return
        if ctype == "text/html" and not as_file:
            if self.html is None:
                self.html = _text_of(part, ct_params, cte, html=True)
                return
            if parent_type == "multipart/alternative":
                return
        data = _payload_bytes(part, cte)
        if ctype == "application/ms-tnef" or (name or "").strip().lower() == "winmail.dat":
            budget = max(0, self.limits.max_parts - len(self.attachments))
            tnef = _tnef_files(data, budget)
            for file_name, content in tnef.files:
                self.add(file_name, _type_for(file_name), content)
            self.tnef_body = self.tnef_body or tnef.body
            if tnef.files and tnef.complete:
                return
            if tnef.files:
                # Files past the budget, or a rich text body: winmail.dat keeps them all.
                self.notes.append(
                    f"{len(tnef.files)} files were taken out of {name or 'winmail.dat'}, which "
                    "holds more (more files than max_parts allows, or a formatted body): it is "
                    "attached as well."
                )
            name = name or "winmail.dat"
        inline = content_id is not None and disposition != "attachment"
        self.add(name, ctype, data, content_id=content_id, inline=inline)

    def message_part(
        self,
        part: Message,
        ctype: str,
        name: str | None,
        parent_boundary: str | None,
        index: int,
        is_root: bool,
    ) -> None:
        exact = _exact_message_bytes(
            self.raw, self.scan, parent_boundary, index, self.root_body if is_root else None
        )
        if exact is None or not _looks_like(exact, part):
            exact = _serialize(part, b"\r\n" if b"\r\n" in self.raw[:4096] else b"\n")
        cte = (_part_header(part, "content-transfer-encoding") or "").strip().lower()
        # message/* may only be 7bit/8bit/binary, but some mailers base64 it anyway.
        if cte == "base64":
            exact = _b64_decode(exact)
        elif cte == "quoted-printable":
            exact = quopri.decodestring(exact)
        force_ext = ".eml" if ctype in ("message/rfc822", "message/global") else None
        if name is None and force_ext:
            payload = _raw_payload(part)
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                subject = _part_header(payload[0], "subject")
                if subject is not None:
                    # Only as much as a file name can hold is worth decoding.
                    name = _one_line(_decode_words(subject[:1024])) or None
        self.add(name, ctype, exact, force_ext=force_ext)


# --------------------------------------------------------------------------------------------
# Loop safety
# --------------------------------------------------------------------------------------------

_SYSTEM_LOCAL_PARTS: Final = frozenset(
    {"mailer-daemon", "postmaster", "noreply", "no-reply", "do-not-reply", "donotreply"}
)
_COMMENT_RE: Final = re.compile(r"\([^()]*\)")


def _token(value: str) -> str:
    return _one_line(_COMMENT_RE.sub("", _decode_8bit(value)).split(";", 1)[0]).lower()


def _reason_text(value: str) -> str:
    """A header value fit for a short reason string: decoded, one line, 40 characters."""
    return _one_line(_decode_8bit(value))[:40]


def _loop_verdict(
    headers: dict[str, list[str]],
    top_type: str,
    top_params: Mapping[str, _Param],
    has_dsn_part: bool,
    senders: Iterable[str],
    null_sender: bool,
) -> tuple[bool, str | None, bool]:
    """(auto_submitted, reason, is_bounce) for the loop-safety rules."""
    report_type = _param_text(top_params.get("report-type"))
    report_type = (report_type or "").strip().lower()
    if has_dsn_part or (top_type == "multipart/report" and report_type == "delivery-status"):
        return True, "delivery status notification", True
    if top_type == "multipart/report":
        return True, f"report: {_reason_text(report_type) or 'unknown'}", False
    auto = _first(headers, "auto-submitted")
    if auto is not None and _token(auto) != "no":
        return True, f"Auto-Submitted: {_reason_text(_token(auto))}", False
    for name in ("x-autoreply", "x-autorespond"):
        if name in headers:
            return True, f"{name.title()} header", False
    suppress = _first(headers, "x-auto-response-suppress")
    if suppress is not None:
        tokens = {t.strip().lower() for t in _decode_8bit(suppress).split(",")}
        if tokens & {"all", "autoreply", "oof"}:
            return True, "X-Auto-Response-Suppress: " + _reason_text(suppress), False
    precedence = _first(headers, "precedence")
    if precedence is not None and _token(precedence) in ("bulk", "junk", "list", "auto_reply"):
        return True, f"Precedence: {_reason_text(_token(precedence))}", False
    for name, label in (("list-id", "List-Id"), ("list-unsubscribe", "List-Unsubscribe")):
        if name in headers:
            return True, f"mailing list ({label})", False
    if null_sender:
        return True, "null sender", False
    for address in senders:
        local = address.rpartition("@")[0].lower() if "@" in address else address.lower()
        if local in _SYSTEM_LOCAL_PARTS:
            return True, f"system sender {local}", False
    return False, None, False


def _attach_unsanitized_html(
    collector: _Collector, markup: str, why: str, text_from_it: bool
) -> str:
    """Keep HTML that cannot be sanitized as an attachment; the note that says so.

    Such an HTML body is not shown, but nothing of it is lost. It is attached in UTF-8 (the
    text it was decoded to) with a byte order mark, which browsers take as its charset when
    the file is opened.
    """
    collector.add("message.html", "text/html", markup.encode("utf-8-sig"))
    name = collector.attachments[-1].name
    text = " and the text above is taken from it" if text_from_it else ""
    return (
        f"The HTML version of this message {why}: it is attached as {name} instead of being "
        f"shown{text}."
    )


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def message_summary(raw: bytes) -> tuple[str | None, str]:
    """(Message-ID without brackets, sha256 hex) of raw bytes, cheaply and never failing.

    Used for the ledger when a message cannot be parsed: only the top-level header block is
    scanned (bounded to the default header limit), with the same id extraction as
    :func:`parse_message`, so both agree on the id of the same bytes.
    """
    data = bytes(raw) if isinstance(raw, bytearray | memoryview) else raw
    if not isinstance(data, bytes):
        return None, hashlib.sha256(b"").hexdigest()
    digest = hashlib.sha256(data).hexdigest()
    try:
        limit = _DEFAULT_LIMITS.max_header_bytes
        end = _header_end(data, limit)
        block = data[: end if end is not None else limit]
        m = _MESSAGE_ID_FIELD_RE.search(block)
        if m is None:
            return None, digest
        return _msgid(_unfold(m.group(1).decode("ascii", "surrogateescape"))), digest
    except Exception:  # a summary must never fail: no id is an acceptable answer
        return None, digest


_MESSAGE_ID_FIELD_RE: Final = re.compile(
    rb"^message-id[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.M | re.I
)


def parse_message(raw: bytes, limits: ParseLimits = _DEFAULT_LIMITS) -> ParsedMessage:
    """Parse one raw RFC 5322 message.

    Raises :class:`LimitExceeded` (naming the limit, the value and the limit) when the message
    is over one of ``limits``, and :class:`ParseError` when it cannot be read; never anything
    else, whatever the bytes.
    """
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    if not isinstance(raw, bytes):
        raise ParseError(f"a message must be bytes, not {type(raw).__name__}")
    try:
        return _parse(raw, limits)
    except MessageError:
        raise
    except RecursionError as exc:
        raise LimitExceeded(
            f"the message is nested too deeply for the parser; the limit (max_depth) is "
            f"{limits.max_depth}"
        ) from exc
    except MemoryError as exc:
        raise LimitExceeded(
            f"the message ({len(raw)} bytes) needs more memory than is available"
        ) from exc
    except Exception as exc:
        raise ParseError(f"the message cannot be parsed: {_sanitize_exc(exc)}") from exc


def _parse(raw: bytes, limits: ParseLimits) -> ParsedMessage:
    if len(raw) > limits.max_bytes:
        raise LimitExceeded(
            f"the message is {len(raw)} bytes; the limit (max_bytes) is {limits.max_bytes}"
        )
    root_body = _header_end(raw, limits.max_header_bytes)
    if root_body is None or root_body > limits.max_header_bytes + 4:
        size = "more than " + str(limits.max_header_bytes) if root_body is None else str(root_body)
        raise LimitExceeded(
            f"the header block is {size} bytes; the limit (max_header_bytes) is "
            f"{limits.max_header_bytes}"
        )
    scan = _scan(raw, limits)
    source, spans = _elide_large_bodies(raw, scan, root_body)
    msg = _mime_tree(source)
    del source
    if spans and not _elision_holds(msg, spans):
        spans = {}
        msg = _mime_tree(raw)
    token = _ELIDED.set((raw, spans) if spans else None)
    try:
        return _parse_tree(raw, msg, scan, root_body, limits)
    finally:
        _ELIDED.reset(token)


def _parse_tree(
    raw: bytes, msg: Message, scan: _Scan, root_body: int, limits: ParseLimits
) -> ParsedMessage:
    headers = _header_map(msg)

    notes: list[str] = []
    from_pairs = _addresses(headers.get("from"), limits, "From", notes)
    to_pairs = _addresses(headers.get("to"), limits, "To", notes)
    return_path = _first(headers, "return-path")
    rp_pairs = _addresses(headers.get("return-path"), limits, "Return-Path", notes)

    from_name, from_addr = from_pairs[0] if from_pairs else ("", "")
    from_value = _first(headers, "from")
    null_sender = (return_path is not None and return_path.strip() == "<>") or (
        from_value is None or from_value.strip() in ("", "<>")
    )

    collector = _Collector(raw, scan, root_body, limits)
    collector.walk(msg)
    notes += collector.notes

    body = collector.body
    html_source, collector.html = collector.html, None
    sanitized: str | None = None
    # HTML-only mail, or an alternative whose text/plain part is left empty, takes its text
    # from the HTML: rendered from the sanitized HTML, so that no script, style or
    # javascript: URL shows up in it, or read without a tree from HTML too large to sanitize.
    needs_text = body is None or not body.strip()
    why = _unsanitizable(html_source, limits) if html_source is not None else None
    if html_source is not None and why is not None:
        notes.append(_attach_unsanitized_html(collector, html_source, why, needs_text))
        if needs_text:
            body = _html_text_lean(html_source)
    elif html_source is not None:
        sanitized = _sanitize_html(html_source)
        if needs_text:
            body = _render_html(sanitized, limits)
    del html_source
    body = body or ""
    if not body.strip() and collector.tnef_body:
        body = _clean_body(collector.tnef_body)

    top_type, top_params = _parse_params(_first(headers, "content-type") or "")
    senders = [from_addr, *(addr for _, addr in rp_pairs or [])]
    auto, reason, bounce = _loop_verdict(
        headers, top_type, top_params, collector.bounce, senders, null_sender
    )

    subject = _first(headers, "subject")
    return ParsedMessage(
        raw=raw,
        sha256=hashlib.sha256(raw).hexdigest(),
        message_id=_msgid(_first(headers, "message-id")),
        subject=_one_line(_decode_words(subject)) if subject is not None else "",
        from_name=from_name,
        from_addr=from_addr,
        to=tuple(addr for _, addr in to_pairs or []),
        date=_date(_first(headers, "date")),
        in_reply_to=_msgid(_first(headers, "in-reply-to")),
        references=_msgids(_first(headers, "references")),
        body=body,
        html=sanitized,
        attachments=tuple(collector.attachments),
        auto_submitted=auto,
        auto_reason=reason,
        is_bounce=bounce,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------
# Across a process boundary
# --------------------------------------------------------------------------------------------


def parse_raw(raw: bytes, max_bytes: int) -> ParsedMessage | MessageError:
    """``parse_message`` with the size limit checked first; a refusal is returned, not raised
    (it crosses a process boundary as a value)."""
    try:
        if len(raw) > max_bytes:
            raise LimitExceeded(
                f"the message is {len(raw)} bytes, over maxMessageBytes ({max_bytes})"
            )
        return parse_message(raw, ParseLimits(max_bytes=max_bytes))
    except MessageError as exc:
        return exc


def parse_many(raws: list[bytes], max_bytes: int) -> list[ParsedMessage | MessageError]:
    """A window of messages in one call: what a parsing worker process runs.

    The results come back without ``raw``: the caller has it already, and sending it back
    through the pipe doubled what crossed it (see :func:`with_raw`)."""
    out: list[ParsedMessage | MessageError] = []
    for raw in raws:
        result = parse_raw(raw, max_bytes)
        out.append(replace(result, raw=b"") if isinstance(result, ParsedMessage) else result)
    return out


def with_raw(result: ParsedMessage | MessageError, raw: bytes) -> ParsedMessage | MessageError:
    """A result of :func:`parse_many` with its message's bytes put back."""
    return replace(result, raw=raw) if isinstance(result, ParsedMessage) else result
