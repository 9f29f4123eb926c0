"""Issue 20 items 1 and 5: every charset label that Python's codecs or the WHATWG Encoding
Standard accept decodes, in bodies, RFC 2231 parameters and encoded words alike; ISO-2022-JP
is read with Microsoft's extensions (CP50220/CP50221), as mail clients read it."""

from __future__ import annotations

import base64
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from samples import multipart, simple, top

from engine.errors import ParseError
from engine.parse import parse_message
from engine.parse.charsets import _iso2022jp_ms, decode_iso2022jp, decode_text

# Every label of https://encoding.spec.whatwg.org/#names-and-labels, by encoding, except the
# "replacement" ones and x-user-defined.
WHATWG = {
    "utf-8": "unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8",
    "ibm866": "866 cp866 csibm866 ibm866",
    "iso-8859-2": "csisolatin2 iso-8859-2 iso-ir-101 iso8859-2 iso88592 iso_8859-2 "
    "iso_8859-2:1987 l2 latin2",
    "iso-8859-3": "csisolatin3 iso-8859-3 iso-ir-109 iso8859-3 iso88593 iso_8859-3 "
    "iso_8859-3:1988 l3 latin3",
    "iso-8859-4": "csisolatin4 iso-8859-4 iso-ir-110 iso8859-4 iso88594 iso_8859-4 "
    "iso_8859-4:1988 l4 latin4",
    "iso-8859-5": "csisolatincyrillic cyrillic iso-8859-5 iso-ir-144 iso8859-5 iso88595 "
    "iso_8859-5 iso_8859-5:1988",
    "iso-8859-6": "arabic asmo-708 csiso88596e csiso88596i csisolatinarabic ecma-114 "
    "iso-8859-6 iso-8859-6-e iso-8859-6-i iso-ir-127 iso8859-6 iso88596 iso_8859-6 "
    "iso_8859-6:1987",
    "iso-8859-7": "csisolatingreek ecma-118 elot_928 greek greek8 iso-8859-7 iso-ir-126 "
    "iso8859-7 iso88597 iso_8859-7 iso_8859-7:1987 sun_eu_greek",
    "iso-8859-8": "csiso88598e csisolatinhebrew hebrew iso-8859-8 iso-8859-8-e iso-ir-138 "
    "iso8859-8 iso88598 iso_8859-8 iso_8859-8:1988 visual csiso88598i iso-8859-8-i logical",
    "iso-8859-10": "csisolatin6 iso-8859-10 iso-ir-157 iso8859-10 iso885910 l6 latin6",
    "iso-8859-13": "iso-8859-13 iso8859-13 iso885913",
    "iso-8859-14": "iso-8859-14 iso8859-14 iso885914",
    "iso-8859-15": "csisolatin9 iso-8859-15 iso8859-15 iso885915 iso_8859-15 l9",
    "iso-8859-16": "iso-8859-16",
    "koi8-r": "cskoi8r koi koi8 koi8-r koi8_r",
    "koi8-u": "koi8-ru koi8-u",
    "macintosh": "csmacintosh mac macintosh x-mac-roman",
    "windows-874": "dos-874 iso-8859-11 iso8859-11 iso885911 tis-620 windows-874",
    "windows-1250": "cp1250 windows-1250 x-cp1250",
    "windows-1251": "cp1251 windows-1251 x-cp1251",
    "windows-1252": "ansi_x3.4-1968 ascii cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 "
    "iso8859-1 iso88591 iso_8859-1 iso_8859-1:1987 l1 latin1 us-ascii windows-1252 x-cp1252",
    "windows-1253": "cp1253 windows-1253 x-cp1253",
    "windows-1254": "cp1254 csisolatin5 iso-8859-9 iso-ir-148 iso8859-9 iso88599 iso_8859-9 "
    "iso_8859-9:1989 l5 latin5 windows-1254 x-cp1254",
    "windows-1255": "cp1255 windows-1255 x-cp1255",
    "windows-1256": "cp1256 windows-1256 x-cp1256",
    "windows-1257": "cp1257 windows-1257 x-cp1257",
    "windows-1258": "cp1258 windows-1258 x-cp1258",
    "x-mac-cyrillic": "x-mac-cyrillic x-mac-ukrainian",
    "gbk": "chinese csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 x-gbk",
    "gb18030": "gb18030",
    "big5": "big5 big5-hkscs cn-big5 csbig5 x-x-big5",
    "euc-jp": "cseucpkdfmtjapanese euc-jp x-euc-jp",
    "iso-2022-jp": "csiso2022jp iso-2022-jp",
    "shift_jis": "csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis",
    "euc-kr": "cseuckr csksc56011987 euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 "
    "ksc5601 ksc_5601 windows-949",
    "utf-16be": "unicodefffe utf-16be",
    "utf-16le": "csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff utf-16 utf-16le",
}
# A text each encoding can write, beyond ASCII where it can.
SAMPLES = {
    "utf-8": "Grüße 你好",
    "ibm866": "Привет",
    "iso-8859-2": "Zażółć",
    "iso-8859-3": "Ĝis",
    "iso-8859-4": "Ķīļ",
    "iso-8859-5": "Привет",
    "iso-8859-6": "مرحبا",
    "iso-8859-7": "Γειά",
    "iso-8859-8": "שלום",
    "iso-8859-10": "Ŋŧ",
    "iso-8859-13": "Ąč",
    "iso-8859-14": "Ŵŷ",
    "iso-8859-15": "100 €",
    "iso-8859-16": "Ță",
    "koi8-r": "Привет",
    "koi8-u": "Привіт",
    "macintosh": "Café",
    "windows-874": "สวัสดี",
    "windows-1250": "Zażółć",
    "windows-1251": "Привет",
    "windows-1252": "Café",
    "windows-1253": "Γειά",
    "windows-1254": "Günaydın",
    "windows-1255": "שלום",
    "windows-1256": "مرحبا",
    "windows-1257": "Ąč",
    "windows-1258": "Café",
    "x-mac-cyrillic": "Привет",
    "gbk": "你好",
    "gb18030": "你好",
    "big5": "你好",
    "euc-jp": "こんにちは",
    "iso-2022-jp": "こんにちは",
    "shift_jis": "こんにちは",
    "euc-kr": "안녕하세요",
    "utf-16be": "Grüße",
    "utf-16le": "Grüße",
}
PY_CODEC = {
    "macintosh": "mac-roman",
    "gbk": "gb18030",
    "windows-874": "cp874",
    "x-mac-cyrillic": "mac-cyrillic",
}
LABELS = [(enc, label) for enc, labels in WHATWG.items() for label in labels.split()]


def _encode(encoding: str, label: str, text: str) -> bytes:
    codec = PY_CODEC.get(encoding, encoding)
    if encoding == "windows-1252" and label in ("ascii", "us-ascii", "ansi_x3.4-1968"):
        return b"Cafe"  # a US-ASCII label on 8-bit text is a mislabel, tested elsewhere
    if label in ("utf-16", "unicode", "ucs-2", "csunicode", "iso-10646-ucs-2", "unicodefeff"):
        return text.encode("utf-16")  # with a byte order mark, as such mail is written
    return text.encode(codec)


@pytest.mark.parametrize(("encoding", "label"), LABELS)
def test_every_whatwg_label_decodes_a_body(encoding: str, label: str) -> None:
    data = _encode(encoding, label, SAMPLES[encoding])
    expected = "Cafe" if data == b"Cafe" else SAMPLES[encoding]
    assert decode_text(data, label) == expected
    assert decode_text(data, label.upper()) == expected
    raw = simple(
        f"From: a@example.org\nSubject: s\nContent-Type: text/plain; charset={label}\n", data
    )
    assert parse_message(raw).body == expected


@pytest.mark.parametrize(
    "label", ["ANSI_X3.4-1968", "latin1", "x-sjis", "ks_c_5601-1987", "unicode-1-1-utf-8"]
)
def test_rfc2231_parameters_and_encoded_words_take_every_alias(label: str) -> None:
    text = {"x-sjis": "見積書", "ks_c_5601-1987": "견적서", "unicode-1-1-utf-8": "Grüße"}.get(
        label, "quote"
    )
    codec = {"x-sjis": "cp932", "ks_c_5601-1987": "cp949", "unicode-1-1-utf-8": "utf-8"}.get(
        label, "latin-1"
    )
    if label == "latin1":
        text = "Café"
    quoted = urllib.parse.quote(text.encode(codec), safe="")
    word = "=?" + label + "?B?" + base64.b64encode(text.encode(codec)).decode() + "?="
    attachment = (
        "Content-Type: application/pdf\r\n"
        f"Content-Disposition: attachment; filename*={label}''{quoted}.pdf\r\n\r\n%PDF"
    ).encode()
    body = multipart(b"Content-Type: text/plain\r\n\r\nSee attached.", attachment, boundary="b1")
    raw = (
        f"From: {word} <a@example.org>\r\nSubject: {word}\r\n"
        f"Content-Type: multipart/mixed; boundary*={label}''b1\r\n\r\n"
    ).encode() + body
    parsed = parse_message(raw)
    assert parsed.subject == text
    assert parsed.from_name == text
    assert parsed.body == "See attached."
    assert [a.name for a in parsed.attachments] == [f"{text}.pdf"]


def test_an_unknown_label_falls_back_to_detection_and_never_fails() -> None:
    body = "Привет, это проверка кодировки без названия.".encode("cp1251")
    raw = simple(
        "From: a@example.org\nSubject: =?x-no-such-charset?B?"
        + base64.b64encode("Привет".encode()).decode()
        + "?=\nContent-Type: multipart/mixed; boundary*=x-no-such-charset''b2\n",
        multipart(
            b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\n" + body, boundary="b2"
        ),
    )
    parsed = parse_message(raw)
    assert parsed.subject == "Привет"
    assert parsed.body == body.decode("cp1251")


def test_a_boundary_label_naming_a_refused_codec_still_fails_the_message() -> None:
    raw = top(
        multipart(b"Content-Type: text/plain\r\n\r\nx", boundary="b3"),
        ctype="multipart/mixed; boundary*=utf-7''b3",
    )
    with pytest.raises(ParseError, match="charset"):
        parse_message(raw)


# -- ISO-2022-JP with the Microsoft extensions ---------------------------------------------

ESC_JIS, ESC_ASCII = b"\x1b$B", b"\x1b(B"


def test_iso2022jp_reads_nec_row_13_and_ibm_extensions_as_outlook_writes_them() -> None:
    # ① ② (NEC row 13: 0x2D21, 0x2D22), ㈱ (0x2D6A), 纊 (NEC-selected IBM, 0x7921), and
    # half-width katakana after ESC ( I.
    data = ESC_JIS + b'-!-"-jy!' + ESC_ASCII + b" \x1b(I12" + ESC_ASCII + b" ok"
    assert decode_text(data, "iso-2022-jp") == "①②㈱纊 ｱｲ ok"
    assert decode_text(data, "CP50221") == "①②㈱纊 ｱｲ ok"
    subject = "=?ISO-2022-JP?B?" + base64.b64encode(ESC_JIS + b'-!-"' + ESC_ASCII).decode() + "?="
    raw = simple(
        f"From: a@example.jp\nSubject: {subject}\nContent-Type: text/plain; charset=iso-2022-jp\n",
        ESC_JIS + b"$3$s$K$A$O-!" + ESC_ASCII + b"\r\n",
    )
    parsed = parse_message(raw)
    assert parsed.subject == "①②"
    assert parsed.body == "こんにちは①\n"


def test_iso2022jp_keeps_pythons_reading_where_cp932_differs() -> None:
    # JIS 0x2141 is "〜" U+301C in JIS X 0208 but "～" U+FF5E in cp932: one extension
    # character on the line must not change how the rest of it reads.
    data = ESC_JIS + b"!A-!" + ESC_ASCII
    assert decode_iso2022jp(data) == "〜①"


JIS_TEXT = st.text(
    st.characters(codec="iso2022_jp", exclude_characters="\x1b\x0e\x0f"), max_size=60
)


@settings(max_examples=300, derandomize=True, database=None)
@given(JIS_TEXT)
def test_iso2022jp_decoder_equals_pythons_codec_on_standard_text(text: str) -> None:
    data = text.encode("iso2022_jp")
    assert _iso2022jp_ms(data) == data.decode("iso2022_jp")
    assert decode_iso2022jp(data) == data.decode("iso2022_jp")
