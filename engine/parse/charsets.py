"""Octets to text: charset labels, detection of undeclared charsets, decoding.

Charsets never reach ``codecs`` unchecked. A label is looked up once and accepted only if it
names a text encoding outside a deny-list (``utf-7``, ``unicode_escape``, ``punycode``...);
``zlib_codec`` or ``rot13`` in a charset parameter would otherwise decompress or transform
attacker data. The stdlib helpers that decode with the declared charset (``get_filename``,
``get_content_charset``, ``get_payload()`` without ``decode=True``) are never called. Every
decoding of the parser goes through :func:`decode_text` (a declared label) or
:func:`decode_undeclared` (none), and never fails.
"""

from __future__ import annotations

import codecs
import functools
import re
import unicodedata
from typing import Final


def to_bytes(text: str) -> bytes:
    """Recover the original octets of text that the parser decoded ASCII+surrogateescape."""
    return text.encode("utf-8", "surrogateescape")


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


def decode_undeclared(data: bytes) -> str:
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


def decode_text(data: bytes, label: str | None) -> str:
    """Text of octets declared as charset ``label`` (which may be absent, unknown or hostile)."""
    codec = _codec_for(label) if label else None
    if codec is None:
        return decode_undeclared(data)
    if codec == "utf-16":
        codec = _utf16_codec(data)
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        if codec in _UTF8_LIKE:
            # "us-ascii" or "utf-8" on 8-bit data that is not UTF-8 is a mislabel, not a
            # damaged UTF-8 text: the real charset is some legacy one.
            return decode_undeclared(data)
    except Exception:  # the codec failed otherwise: treat the label as unknown
        return decode_undeclared(data)
    try:
        return data.decode(codec, "replace")
    except Exception:  # same: never let a codec error out of here
        return decode_undeclared(data)


def decode_8bit(text: str) -> str:
    """Header text as parsed (raw 8-bit octets surrogate-escaped) to real text."""
    if text.isascii():
        return text
    return decode_undeclared(to_bytes(text))
