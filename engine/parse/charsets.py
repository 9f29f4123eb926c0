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
# The labels of the WHATWG Encoding Standard (https://encoding.spec.whatwg.org/#names-and-labels)
# that Python's codecs do not know, by the encoding they name, and that encoding's Python
# codec. Python's own aliases are tried first: where both know a label they agree, except
# that WHATWG reads "ascii" and "iso-8859-1" as windows-1252, which the upgrades below and
# the fallback of a mislabelled US-ASCII text do too.
_WHATWG_LABELS: Final[dict[str, tuple[str, ...]]] = {
    "utf-8": ("unicode-1-1-utf-8", "unicode11utf8", "unicode20utf8", "x-unicode20utf8"),
    "cp866": ("866", "csibm866"),
    "iso8859-2": ("csisolatin2", "iso88592", "iso_8859-2:1987"),
    "iso8859-3": ("csisolatin3", "iso88593", "iso_8859-3:1988"),
    "iso8859-4": ("csisolatin4", "iso88594", "iso_8859-4:1988"),
    "iso8859-5": ("csisolatincyrillic", "iso88595", "iso_8859-5:1988"),
    "iso8859-6": (
        "csiso88596e",
        "csiso88596i",
        "csisolatinarabic",
        "iso88596",
        "iso_8859-6:1987",
    ),
    "iso8859-7": ("csisolatingreek", "sun_eu_greek", "iso88597", "iso_8859-7:1987"),
    "iso8859-8": (
        "csiso88598e",
        "csiso88598i",
        "csisolatinhebrew",
        "iso88598",
        "iso_8859-8:1988",
        "logical",
        "visual",
    ),
    "iso8859-10": ("csisolatin6", "iso885910"),
    "iso8859-13": ("iso885913",),
    "iso8859-14": ("iso885914",),
    "iso8859-15": ("csisolatin9", "iso885915"),
    "cp874": ("dos-874", "iso-8859-11", "iso8859-11", "iso885911"),
    "koi8-r": ("cskoi8r", "koi", "koi8"),
    "koi8-u": ("koi8-ru",),
    "mac-roman": ("csmacintosh", "mac", "macintosh"),
    "mac-cyrillic": ("x-mac-ukrainian",),
    "cp1250": ("x-cp1250",),
    "cp1251": ("x-cp1251",),
    "cp1252": ("csisolatin1", "iso88591", "iso_8859-1:1987", "x-cp1252"),
    "cp1253": ("x-cp1253",),
    "cp1254": ("csisolatin5", "iso88599", "iso_8859-9:1989", "x-cp1254"),
    "cp1255": ("x-cp1255",),
    "cp1256": ("x-cp1256",),
    "cp1257": ("x-cp1257",),
    "cp1258": ("x-cp1258",),
    "gb18030": ("chinese", "csgb2312", "csiso58gb231280", "gb_2312", "gb_2312-80", "iso-ir-58"),
    "big5hkscs": ("cn-big5", "csbig5", "x-x-big5"),
    "euc_jp": ("cseucpkdfmtjapanese",),
    "cp932": ("csshiftjis", "ms932", "ms_kanji", "shift-jis"),
    "cp949": (
        "cseuckr",
        "csksc56011987",
        "iso-ir-149",
        "korean",
        "ks_c_5601-1989",
        "ksc_5601",
        "windows-949",
    ),
    "utf-16-be": ("unicodefffe",),
    "utf-16": ("csunicode", "iso-10646-ucs-2", "ucs-2", "unicode", "unicodefeff"),
    # Microsoft's names for its ISO-2022-JP variants, decoded with their extensions (see
    # decode_iso2022jp).
    "iso2022_jp": ("cp50220", "cp50221", "cp50222", "iso-2022-jp-ms"),
}
_WHATWG_ALIASES: Final = {
    label: codec for codec, labels in _WHATWG_LABELS.items() for label in labels
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
    except LookupError:
        if name not in _WHATWG_ALIASES:
            return None
        info = codecs.lookup(_WHATWG_ALIASES[name])
    except Exception:  # a broken codec module must not escape
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None
    canonical = info.name.lower().replace("_", "-")
    if canonical in _DENIED_CODECS:
        return None
    return _CHARSET_UPGRADES.get(info.name, info.name)


def refused_label(label: str) -> bool:
    """True if ``label`` names a codec Python has but we never decode mail with (``utf-7``,
    ``zlib_codec``...); False for the labels we accept and for those Python does not know."""
    if _codec_for(label) is not None:
        return False
    try:
        codecs.lookup(label.strip().strip("\"'").lower())
    except Exception:  # unknown to Python (or not even a valid name): not refused, unknown
        return False
    return label.strip().strip("\"'").lower() not in _CHARSET_ALIASES


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


# An undeclared 8-bit file name is read from at most this many octets: longer names are cut
# to 150 bytes anyway, and detection must not cost more for a 100 KB "name".
MAX_NAME_OCTETS: Final = 1024


def decode_8bit_name(data: bytes, declared: tuple[str, ...]) -> str:
    """Text of an undeclared 8-bit file name, weighted by the charsets its message declares.

    A name in GB2312 is as valid in EUC-KR, and detection on a dozen octets is a coin toss:
    the charsets the message declares elsewhere (its text parts, its encoded words), most
    used first, decide before detection does. UTF-8 comes first, since it rarely decodes by
    accident; a declared charset must read the name strictly and to printable text.
    """
    data = data[:MAX_NAME_OCTETS]
    if data.isascii():
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    for label in declared:
        codec = _codec_for(label)
        if codec is None or codec in _UTF8_LIKE or codec.startswith("utf-16"):
            continue
        # ISO-2022-JP is 7-bit: 8-bit Japanese names beside it are Shift_JIS or EUC-JP.
        for candidate in _8BIT_JAPANESE if codec.startswith("iso2022_jp") else (codec,):
            try:
                text = data.decode(candidate)
            except UnicodeDecodeError:
                continue
            if text.isprintable() and "\ufffd" not in text:
                return text
    return decode_undeclared(data)


_8BIT_JAPANESE: Final = ("cp932", "euc_jp")


def _utf16_codec(data: bytes) -> str:
    """utf-16 without a BOM: guess the byte order from where the zero bytes of ASCII fall."""
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return "utf-16"
    sample = data[:4096]
    return "utf-16-le" if sample[1::2].count(0) >= sample[0::2].count(0) else "utf-16-be"


# ISO-2022-JP as Outlook and Windows write it (Microsoft's CP50220/CP50221): JIS X 0208 with
# the NEC special characters of row 13 (circled digits, Roman numerals, "㈱") and the
# NEC-selected IBM extensions of rows 89 to 92, and half-width katakana after ESC ( I. No
# Python codec reads them. Mail clients decode such text by turning each JIS pair into its
# Shift_JIS pair and reading that as cp932, which holds every one of those rows; we do the
# same for the pairs Python's codec refuses, and keep Python's reading of every other pair
# (cp932 maps a few JIS X 0208 cells to other code points: "〜" U+301C is "～" U+FF5E there).
_ISO2022JP_ESC_RE: Final = re.compile(rb"(\x1b(?:\(B|\(J|\(I|\$@|\$B|\$\(@|\$\(B|\$\(D))")
_ISO2022JP_MODES: Final = {
    b"\x1b(B": "ascii",
    b"\x1b(J": "roman",
    b"\x1b(I": "katakana",
    b"\x1b$@": "jis",
    b"\x1b$B": "jis",
    b"\x1b$(@": "jis",
    b"\x1b$(B": "jis",
    b"\x1b$(D": "jis0212",
}
_KATAKANA_TABLE: Final = bytes(b + 0x80 if 0x21 <= b <= 0x5F else b for b in range(256))


def decode_iso2022jp(data: bytes) -> str:
    """ISO-2022-JP text with Microsoft's extensions; never fails.

    Text that Python's ``iso2022_jp`` codec reads is returned exactly as it reads it (the fast
    path, and what :func:`_iso2022jp_ms` gives too: a property test holds them equal).
    """
    try:
        return data.decode("iso2022_jp")
    except UnicodeDecodeError:
        return _iso2022jp_ms(data)


def _iso2022jp_ms(data: bytes) -> str:
    """ISO-2022-JP read escape sequence by escape sequence, with the CP50221 extensions."""
    out: list[str] = []
    mode = "ascii"
    for index, piece in enumerate(_ISO2022JP_ESC_RE.split(data)):
        if index % 2:
            mode = _ISO2022JP_MODES[piece]
        elif piece:
            out.append(_iso2022jp_segment(piece, mode))
    return "".join(out)


def _iso2022jp_segment(data: bytes, mode: str) -> str:
    """One run of ISO-2022-JP octets between escape sequences, read in ``mode``."""
    if mode == "katakana":
        return data.translate(_KATAKANA_TABLE).decode("cp932", "replace")
    if mode == "jis0212":
        return (b"\x1b$(D" + data).decode("iso2022_jp_1", "replace")
    if mode != "jis":
        escape = b"\x1b(J" if mode == "roman" else b"\x1b(B"
        return (escape + data).decode("iso2022_jp", "replace")
    # Line by line: only a line that Python's codec refuses is read pair by pair.
    out: list[str] = []
    for line in data.splitlines(keepends=True):
        try:
            out.append((b"\x1b$B" + line).decode("iso2022_jp"))
        except UnicodeDecodeError:
            out.append(_jis_pairs(line))
    return "".join(out)


def _jis_pairs(line: bytes) -> str:
    """A line of two-byte JIS octets, pair by pair; octets outside pairs are ASCII controls."""
    out: list[str] = []
    i = 0
    while i < len(line):
        first = line[i]
        if 0x21 <= first <= 0x7E and i + 1 < len(line) and 0x21 <= line[i + 1] <= 0x7E:
            out.append(_jis_pair(first, line[i + 1]))
            i += 2
        else:
            out.append(chr(first) if first < 0x80 else "\ufffd")
            i += 1
    return "".join(out)


@functools.lru_cache(maxsize=94 * 94)
def _jis_pair(first: int, second: int) -> str:
    """One JIS X 0208 pair: Python's reading, else that of its Shift_JIS pair in cp932."""
    try:
        return (b"\x1b$B" + bytes((first, second))).decode("iso2022_jp")
    except UnicodeDecodeError:
        pass
    lead = ((first + 1) >> 1) + (0x70 if first <= 0x5E else 0xB0)
    if first & 1:
        trail = second + 0x1F
        trail += trail >= 0x7F
    else:
        trail = second + 0x7E
    return bytes((lead, trail)).decode("cp932", "replace")


def decode_text(data: bytes, label: str | None) -> str:
    """Text of octets declared as charset ``label`` (which may be absent, unknown or hostile)."""
    codec = _codec_for(label) if label else None
    if codec is None:
        return decode_undeclared(data)
    if codec == "iso2022_jp":
        return decode_iso2022jp(data)
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
