"""Tests of engine.parse: the message corpus in tests/corpus/, hostile input, limits, properties.

Each corpus file is one case, named after it. Hostile and oversized messages are built here
instead, so that the corpus stays small and readable.
"""

from __future__ import annotations

import base64
import binascii
import email as stdlib_email
import hashlib
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message
from email.message import _decode_uu as stdlib_decode_uu  # type: ignore[attr-defined]
from email.utils import getaddresses
from pathlib import Path
from unittest import mock

import nh3
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from inscriptis import get_text  # type: ignore[import-untyped, unused-ignore]
from inscriptis.model.config import ParserConfig  # type: ignore[import-untyped, unused-ignore]

import engine.parse.mime
from engine.errors import LimitExceeded, MessageError, ParseError
from engine.model import ParsedMessage
from engine.parse import ParseLimits, message_summary, parse_message, safe_filename
from engine.parse.addresses import _address_count, _cut_addresses, _simple_addresses
from engine.parse.bodies import (
    _flatten_html,
    _html_markup_strippable,
    _html_text_stripped,
    _html_text_tokens,
    _TextCanvas,
    _unflow,
    _Unrenderable,
    clean_body,
    html_text_lean,
)
from engine.parse.mime import (
    HEADER_END_RE,
    _blank_line_end,
    _BlockEnds,
    _split_mime,
    elide_large_bodies,
    header_end,
    prescan,
)
from engine.parse.transfer import _B64_NOISE, _b64_blobs, b64_decode, uu_decode

CORPUS = Path(__file__).parent / "corpus"
ALL_CASES = sorted(p.stem for p in CORPUS.glob("*.eml"))
CRLF_RE = re.compile(r"[\r\n\x00]")
FAST = 1.0  # seconds: every refusal of a hostile message must be at least this quick


def load(name: str) -> bytes:
    return (CORPUS / f"{name}.eml").read_bytes()


def parse(name: str) -> ParsedMessage:
    return parse_message(load(name))


def timed_refusal(raw: bytes, limits: ParseLimits | None = None) -> LimitExceeded:
    start = time.perf_counter()
    with pytest.raises(LimitExceeded) as info:
        parse_message(raw, limits or ParseLimits())
    assert time.perf_counter() - start < FAST
    return info.value


def single_line_fields(msg: ParsedMessage) -> list[str]:
    fields = [msg.subject, msg.from_name, msg.from_addr, *msg.to, *msg.references]
    fields += [x for x in (msg.message_id, msg.in_reply_to, msg.auto_reason) if x is not None]
    fields += [a.name for a in msg.attachments]
    fields += [a.content_id for a in msg.attachments if a.content_id is not None]
    return fields


def simple(headers: str, body: bytes = b"Hello.\r\n") -> bytes:
    return headers.replace("\n", "\r\n").encode("ascii") + b"\r\n" + body


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
# Headers and bodies
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


CHARSETS = {
    "iso-8859-1": (
        "Café crème à côté",
        "Le café est prêt à côté de l'hôtel. Où êtes-vous ? Ça va très bien.",
    ),
    "iso-8859-15": (
        "Facture de 100 € pour l'œuvre",
        "Le prix est de 100 € pour l'œuvre. Cœur, sœur, bœuf.",
    ),
    "windows-1252": (
        "“Quoted” – dash € sign",
        "He said “hello” – then left… The bill was €42 and ‘that’s it’.",
    ),
    "koi8-r": ("Проверка кодировки", "Привет, мир! Это проверка кодировки KOI8-R. Спасибо."),
    "shift_jis": (
        "文字コードのテスト",
        "こんにちは、世界。これは文字コードのテストです。よろしくお願いします。",
    ),
    "gb2312": ("编码测试", "你好，世界。这是一封编码测试邮件。谢谢！"),
    "gbk": (
        "朱镕基的测试",
        "朱镕基先生，你好。这封邮件使用 GBK 编码，包含 GB2312 没有的字：镕、堃。",
    ),
    "iso-2022-jp": ("会議の件", "お疲れ様です。明日の会議は十時からです。よろしくお願いします。"),
    "utf-16": ("Grüße – Привет – 你好", "Grüße aus Köln – Привет – 你好。UTF-16 body with a BOM."),
}


@pytest.mark.parametrize("charset", sorted(CHARSETS))
def test_declared_charsets_decode_body_and_subject(charset: str) -> None:
    subject, body = CHARSETS[charset]
    msg = parse(f"charset-{charset}")
    assert msg.subject == subject
    assert msg.body.strip() == body


def test_undeclared_8bit_windows_1252_is_detected() -> None:
    msg = parse("undeclared-8bit-windows-1252")
    assert msg.body.strip() == (
        "Bonjour, le café de l'hôtel coûte 3 € – c'est “très” cher. "
        "Les élèves ont réservé la salle. Déjà vu ? Ça arrive souvent… "
        "Merci beaucoup, à bientôt."
    )


def test_unknown_charset_falls_back_to_detection() -> None:
    msg = parse("charset-x-unknown")
    assert msg.subject == "Problème réseau"
    assert (
        msg.body.strip() == "Le réseau est en panne depuis 8 h. Merci de vérifier le commutateur."
    )


def test_utf7_is_never_decoded() -> None:
    msg = parse("charset-utf-7")
    assert "<script>" not in msg.body
    assert "+ADw-script+AD4-" in msg.body
    assert "<script>" not in msg.subject
    assert "+ADw-script+AD4-" in msg.subject


HOSTILE_CODECS = {
    # codec: (the octets of the body, what must stay literally in the decoded body)
    "utf-7": (b"+ADw-script+AD4-", "+ADw-script+AD4-"),
    "UTF7": (b"+ADw-b+AD4-", "+ADw-b+AD4-"),
    "unicode_escape": (b"\\u003cscript\\u003e", "\\u003cscript\\u003e"),
    "raw_unicode_escape": (b"\\u003cscript\\u003e", "\\u003cscript\\u003e"),
    "rot13": (b"uryyb jbeyq", "uryyb jbeyq"),
    "rot_13": (b"uryyb jbeyq", "uryyb jbeyq"),
    "base64_codec": (b"aGVsbG8gd29ybGQ=", "aGVsbG8gd29ybGQ="),
    "hex_codec": (b"68656c6c6f", "68656c6c6f"),
    "punycode": (b"mnchen-3ya", "mnchen-3ya"),
    "idna": (b"xn--mnchen-3ya.de", "xn--mnchen-3ya.de"),
    "uu_codec": (b"begin 666 x\n%:&5L;&\\`\n`\nend\n", "begin 666 x"),
}


@pytest.mark.parametrize("codec", sorted(HOSTILE_CODECS))
def test_hostile_charsets_are_refused(codec: str) -> None:
    data, literal = HOSTILE_CODECS[codec]
    word = base64.b64encode(data).decode()
    raw = simple(
        f"From: a@example.org\nSubject: =?{codec}?b?{word}?=\n"
        f"Content-Type: text/plain; charset={codec}\n",
        data,
    )
    msg = parse_message(raw)
    assert literal in msg.body
    assert literal in msg.subject or literal.split()[0] in msg.subject


def test_zlib_charset_is_not_decompressed() -> None:
    bomb = zlib.compress(b"A" * 1_000_000)
    raw = simple("Subject: z\nContent-Type: text/plain; charset=zlib_codec\n", bomb)
    msg = parse_message(raw)
    assert len(msg.body) < 10_000
    raw = simple(
        "Subject: z\nContent-Type: application/octet-stream\n"
        "Content-Disposition: attachment; filename*=zlib_codec''"
        + "".join(f"%{b:02X}" for b in zlib.compress(b"A" * 100_000))
        + "\n"
    )
    (attachment,) = parse_message(raw).attachments
    assert len(attachment.name.encode()) <= 150


def test_broken_encoded_words_in_subject() -> None:
    # Adjacent words join (and split UTF-8 sequences reassemble), missing padding is repaired,
    # an unknown charset falls back, a word inside a word decodes, an unterminated one stays.
    assert parse("subject-broken-encoded-word").subject == (
        "Cafééabc日本 foobarbaz =?utf-8?q?broken"
    )


def test_encoded_newline_never_reaches_the_subject() -> None:
    msg = parse("subject-encoded-newline")
    assert msg.subject == "Urgent Bcc: victim@example.com line separator here"
    assert "\r" not in msg.subject and "\n" not in msg.subject and "\u2028" not in msg.subject


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


def test_threading_headers() -> None:
    raw = simple(
        "From: a@example.org\nSubject: Re: x\nMessage-ID:  <abc@example.org> \n"
        "In-Reply-To: <p1@example.org> (comment)\n"
        "References: <root@example.org>\n <p0@example.org>\n\t<p1@example.org>\n"
        "Date: not a date\n"
    )
    msg = parse_message(raw)
    assert msg.message_id == "abc@example.org"
    assert msg.in_reply_to == "p1@example.org"
    assert msg.references == ("root@example.org", "p0@example.org", "p1@example.org")
    assert msg.date is None


def test_date_without_zone_is_utc() -> None:
    msg = parse_message(simple("Subject: x\nDate: Thu, 27 Nov 2026 09:00:00 -0000\n"))
    assert msg.date == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def test_html_only_is_rendered_and_sanitized() -> None:
    msg = parse("html-only")
    assert msg.body.startswith("Printer down\n\nThe printer on floor 3 is broken since 8:00.")
    assert "* Paper jam" in msg.body and "* Toner low" in msg.body
    assert "1. Open tray" in msg.body and "2. Remove paper" in msg.body
    assert "[the status page](https://status.example.com/printers)" in msg.body
    assert "alert" not in msg.body and "color" not in msg.body
    assert msg.html is not None
    assert "<script" not in msg.html and "onerror" not in msg.html
    assert "javascript:" not in msg.html and "<style" not in msg.html
    assert "<ul><li>Paper jam</li>" in msg.html
    assert 'href="https://status.example.com/printers"' in msg.html


def test_multipart_alternative_prefers_plain_text() -> None:
    msg = parse("multipart-alternative")
    assert msg.body == "Plain text version: the VPN is down.\n"
    assert msg.html is not None and "<b>VPN</b>" in msg.html and "<script" not in msg.html
    assert msg.attachments == ()


def test_format_flowed_is_unwrapped() -> None:
    assert parse("format-flowed-lf").body == (
        "This is a long paragraph that the sender's client wrapped at seventy-two "
        "characters with a trailing space.\n> quoted text that is also flowed\n-- \nSignature\n"
    )


# ------------------------------------------------------------------------------------------
# Attachments
# ------------------------------------------------------------------------------------------


def test_rfc2231_and_encoded_word_file_names() -> None:
    msg = parse("attachment-rfc2231-filename")
    assert [(a.name, a.content_type) for a in msg.attachments] == [
        ("résumé.pdf", "application/pdf"),
        (
            "été report.docx",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        ("café_menu.txt", "text/plain"),
        ("budget 2026.xls", "application/vnd.ms-excel"),
    ]
    assert msg.attachments[0].data == b"%PDF-1.4 resume"
    assert msg.attachments[2].data == "café menu".encode("latin-1")
    assert msg.body == "Please find my CV attached.\n"


def test_hostile_file_names_are_made_safe() -> None:
    names = [a.name for a in parse("attachment-traversal-names").attachments]
    assert names == [
        "passwd",
        "x.bat",
        "_CON.txt",
        "evil_.exe.txt",
        "a" * 146 + ".pdf",
        "attachment-6.bin",
        "htaccess",
        "invoice_fdp.exe",
        "_lpt1",
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("C:\\Windows\\x.bat", "x.bat"),
        ("C:x.bat", "C_x.bat"),
        ("CON.txt", "_CON.txt"),
        ("con", "_con"),
        ("NUL.tar.gz", "_NUL.tar.gz"),
        ("com9.log", "_com9.log"),
        ("COM10.log", "COM10.log"),
        ("AUX .txt", "_AUX.txt"),
        ("report.pdf\x00.exe", "report.pdf_.exe"),
        ("a\nb\r.txt", "a_b_.txt"),
        ("..", "fallback.bin"),
        ("  . hidden.  ", "hidden"),
        ("", "fallback.bin"),
        (None, "fallback.bin"),
        ("\x00\x01", "fallback.bin"),
        ('what?<>|*".txt', "what______.txt"),
        ("résumé.pdf", "résumé.pdf"),
        ("e\u0301te\u0301.txt", "été.txt"),
        ("x" * 300, "x" * 150),
        ("é" * 100 + ".docx", "é" * 72 + ".docx"),
        ("name." + "e" * 40, "name." + "e" * 40),
    ],
)
def test_safe_filename(name: str | None, expected: str) -> None:
    assert safe_filename(name, "fallback.bin") == expected


def test_safe_filename_sanitizes_its_fallback_too() -> None:
    assert safe_filename(None, "../x/..") == "attachment"
    assert safe_filename("", "../evil.bin") == "evil.bin"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.pdf", ["a.pdf", "A (2).PDF", "a (3).pdf", "A (4).PDF"]),
        ("x" * 200 + ".pdf", ["x" * 146 + ".pdf"] + ["x" * 142 + f" ({k}).pdf" for k in (2, 3, 4)]),
    ],
)
def test_duplicate_names_are_numbered(name: str, expected: list[str]) -> None:
    parts = b"".join(
        b'--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="'
        + (name if i % 2 == 0 else name.upper()).encode()
        + b'"\r\n\r\nx\r\n'
        for i in range(4)
    )
    raw = simple(
        'Subject: dup\nContent-Type: multipart/mixed; boundary="b"\n', parts + b"--b--\r\n"
    )
    names = [a.name for a in parse_message(raw).attachments]
    assert [n.lower() for n in names] == [n.lower() for n in expected]


def test_inline_image_keeps_content_id() -> None:
    msg = parse("inline-image-cid")
    (image,) = msg.attachments
    assert image.inline is True
    assert image.content_id == "screenshot.01@client.example.org"
    assert image.content_type == "image/png"
    assert image.name == "attachment-1.png"
    assert image.data.startswith(b"\x89PNG")
    assert msg.html is not None and 'src="cid:screenshot.01@client.example.org"' in msg.html
    assert msg.body == "See the error:"


def test_content_id_and_location_never_shape_the_name() -> None:
    raw = simple(
        'Subject: x\nContent-Type: multipart/related; boundary="b"\n',
        b"--b\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n"
        b"--b\r\nContent-Type: image/gif\r\nContent-ID: <../../etc/passwd>\r\n"
        b"Content-Location: ../../x.gif\r\n\r\nGIF89a\r\n--b--\r\n",
    )
    (image,) = parse_message(raw).attachments
    assert image.name == "attachment-1.gif"
    assert image.content_id == "../../etc/passwd"


def test_attached_message_keeps_its_exact_bytes() -> None:
    raw = load("attached-message-rfc822")
    start = raw.index(b"Return-Path: <bob@")
    end = raw.index(b"\r\n--fwd-b0undary--")
    msg = parse_message(raw)
    (attached,) = msg.attachments
    assert attached.name == "Original problem report.eml"
    assert attached.content_type == "message/rfc822"
    assert attached.data == raw[start:end]
    assert msg.body == "Forwarding the original report as an attachment.\n"


def test_attached_message_with_shared_boundary_is_serialized() -> None:
    # Two multiparts declare the same boundary: offsets are ambiguous, so the attached
    # message is rebuilt by the generator instead (same headers and body).
    inner = b"Subject: inner\r\nFrom: b@example.org\r\n\r\ninner body\r\n"
    raw = simple(
        'Subject: outer\nContent-Type: multipart/mixed; boundary="same"\n',
        b"--same\r\nContent-Type: text/plain\r\n\r\nouter\r\n"
        b"--same\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--same--\r\n"
        b'Content-Type: multipart/mixed; boundary="same"\r\n',
    )
    (attached,) = parse_message(raw).attachments
    assert attached.name == "inner.eml"
    assert attached.data == b"Subject: inner\r\nFrom: b@example.org\r\n\r\ninner body"


def test_rebuilt_attached_message_keeps_its_structure() -> None:
    # A leading "From " line fails the span check: the attached multipart is rebuilt from
    # its raw header lines and parts, without refolding the 100 kB header.
    long_header = b"X-Long: " + b"word " * 20_000
    inner = (
        b"From nobody Thu Nov 27 09:00:00 2026\r\nSubject: inner\r\n" + long_header + b"\r\n"
        b'Content-Type: multipart/mixed; boundary="in"\r\n\r\npreamble\r\n'
        b"--in\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
        b"--in\r\nContent-Type: application/pdf; name=a.pdf\r\n\r\n%PDF\r\n--in--\r\n"
    )
    raw = simple(
        'Subject: outer\nContent-Type: multipart/mixed; boundary="out"\n',
        b"--out\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--out--\r\n",
    )
    start = time.perf_counter()
    (attached,) = parse_message(raw).attachments
    assert time.perf_counter() - start < FAST
    assert long_header in attached.data
    again = parse_message(attached.data)
    assert again.subject == "inner"
    assert again.body.strip() == "first"
    assert [(a.name, a.data) for a in again.attachments] == [("a.pdf", b"%PDF")]


def test_tnef_files_are_extracted() -> None:
    msg = parse("tnef-winmail-dat")
    assert [(a.name, a.content_type, a.data) for a in msg.attachments] == [
        ("Quarterly report.txt", "text/plain", b"Revenue went up.\r\n"),
        ("diagramme-réseau.vsdx", "application/octet-stream", b"PK\x03\x04 visio"),
    ]


def tnef_message(winmail: bytes) -> bytes:
    return simple(
        'Subject: tnef\nContent-Type: multipart/mixed; boundary="b"\n',
        b"--b\r\nContent-Type: text/plain\r\n\r\nbody\r\n--b\r\n"
        b'Content-Type: application/ms-tnef; name="winmail.dat"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(winmail) + b"--b--\r\n",
    )


def tnef_object(level: int, attribute: int, data: bytes) -> bytes:
    header = struct.pack("<BHHI", level, attribute & 0xFFFF, attribute >> 16, len(data))
    return header + data + struct.pack("<H", sum(data) & 0xFFFF)


TNEF_HEADER = struct.pack("<IH", 0x223E9F78, 1)


def test_a_winmail_dat_with_more_files_than_allowed_is_kept_as_well() -> None:
    """Files past max_parts were dropped without a word, winmail.dat with them."""
    files = [(f"file{i}.txt".encode(), b"content %d" % i) for i in range(5)]
    winmail = TNEF_HEADER + b"".join(
        tnef_object(2, 0x00069002, b"\0" * 14)  # attAttachRendData: a new attachment
        + tnef_object(2, 0x00018010, title + b"\0")  # attAttachTitle
        + tnef_object(2, 0x0006800F, data)  # attAttachData
        for title, data in files
    )
    whole = parse_message(tnef_message(winmail))
    assert [(a.name, a.data) for a in whole.attachments] == [
        (title.decode(), data) for title, data in files
    ]
    assert not whole.notes
    cut = parse_message(tnef_message(winmail), ParseLimits(max_parts=3))
    assert [(a.name, a.data) for a in cut.attachments] == [
        *((title.decode(), data) for title, data in files[:3]),
        ("winmail.dat", winmail),
    ]
    assert cut.notes == (
        "3 files were taken out of winmail.dat, which holds more (more files than max_parts "
        "allows, or a formatted body): it is attached as well.",
    )


@pytest.mark.parametrize(
    "winmail",
    [
        b"not a tnef stream at all",
        TNEF_HEADER + b"\x01\x02",
        # MAPI property list claiming 4 billion properties: tnefparse would spin on it.
        TNEF_HEADER + tnef_object(1, 0x00069003, struct.pack("<I", 0xFFFFFFFF) + b"\0" * 16),
        # A multi-valued property with 4 billion values.
        TNEF_HEADER
        + tnef_object(
            1, 0x00069003, struct.pack("<IHHI", 1, 0x1002, 0x0001, 0xFFFFFFFF) + b"\0" * 8
        ),
        # Recipient table with 4 billion rows.
        TNEF_HEADER + tnef_object(1, 0x00069004, struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF)),
        # 100,000 tiny objects (tnefparse copies the rest of the buffer for each).
        TNEF_HEADER + tnef_object(1, 0x00078008, b"x") * 100_000,
    ],
)
def test_unreadable_or_hostile_tnef_keeps_winmail_dat(winmail: bytes) -> None:
    start = time.perf_counter()
    msg = parse_message(tnef_message(winmail))
    assert time.perf_counter() - start < FAST
    (kept,) = msg.attachments
    assert (kept.name, kept.content_type, kept.data) == (
        "winmail.dat",
        "application/ms-tnef",
        winmail,
    )


# ------------------------------------------------------------------------------------------
# Loop safety
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "auto", "reason"),
    [
        ("auto-auto-submitted-auto-replied", True, "Auto-Submitted: auto-replied"),
        ("auto-auto-submitted-no", False, None),
        ("auto-precedence-bulk", True, "Precedence: bulk"),
        ("auto-precedence-junk", True, "Precedence: junk"),
        ("auto-precedence-list", True, "Precedence: list"),
        ("auto-x-auto-response-suppress-all", True, "X-Auto-Response-Suppress: All"),
        ("auto-x-auto-response-suppress-oof", True, "X-Auto-Response-Suppress: DR, OOF, AutoReply"),
        ("auto-x-auto-response-suppress-dr", False, None),
        ("auto-list-id", True, "mailing list (List-Id)"),
        ("auto-list-unsubscribe", True, "mailing list (List-Unsubscribe)"),
        ("auto-x-autoreply", True, "X-Autoreply header"),
        ("auto-x-autorespond", True, "X-Autorespond header"),
        ("auto-null-return-path", True, "null sender"),
        ("auto-empty-from", True, "null sender"),
        ("auto-mailer-daemon", True, "system sender mailer-daemon"),
        ("auto-noreply", True, "system sender no-reply"),
        ("auto-do-not-reply", True, "system sender do-not-reply"),
        ("auto-postmaster", True, "system sender postmaster"),
        ("auto-oof-subject-only", False, None),
        ("plain-utf8", False, None),
    ],
)
def test_loop_safety_verdict(case: str, auto: bool, reason: str | None) -> None:
    msg = parse(case)
    assert (msg.auto_submitted, msg.auto_reason, msg.is_bounce) == (auto, reason, False)


def test_empty_from_has_empty_sender() -> None:
    msg = parse("auto-empty-from")
    assert (msg.from_name, msg.from_addr) == ("", "")


def test_dsn_is_a_bounce() -> None:
    msg = parse("dsn-bounce")
    assert (msg.auto_submitted, msg.auto_reason, msg.is_bounce) == (
        True,
        "delivery status notification",
        True,
    )
    assert msg.body.startswith("This is the mail system at host mx1.example.com.")
    assert [a.content_type for a in msg.attachments] == [
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert b"Status: 5.1.1" in msg.attachments[0].data


def test_lone_delivery_status_part_is_a_bounce() -> None:
    raw = simple(
        'From: a@example.org\nSubject: x\nContent-Type: multipart/mixed; boundary="b"\n',
        b"--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n--b\r\n"
        b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\n--b--\r\n",
    )
    assert parse_message(raw).is_bounce


# ------------------------------------------------------------------------------------------
# Limits: refused quickly, before the stdlib parser can recurse or go quadratic
# ------------------------------------------------------------------------------------------


def test_2000_nested_multiparts() -> None:
    raw = b"Subject: nested\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(2000)
    )
    error = timed_refusal(raw + b"x\r\n")
    assert "max_depth" in str(error) and "50" in str(error)


def forwarded_as_attachment(times: int) -> bytes:
    """A message forwarded as an attachment ``times`` times over (two levels each)."""
    raw = simple(
        'Subject: first\nContent-Type: multipart/alternative; boundary="alt"\n',
        b"--alt\r\nContent-Type: text/plain\r\n\r\nthe first words\r\n--alt\r\n"
        b"Content-Type: text/html\r\n\r\n<p>the first words</p>\r\n--alt--\r\n",
    )
    for i in range(times):
        raw = simple(
            f'Subject: Fwd {i}\nContent-Type: multipart/mixed; boundary="f{i}"\n',
            f"--f{i}\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--f{i}\r\n"
            "Content-Type: message/rfc822\r\n\r\n".encode()
            + raw
            + f"\r\n--f{i}--\r\n".encode(),
        )
    return raw


def test_an_escalation_forwarded_as_attachment_twenty_times_is_read() -> None:
    """Each forward as attachment nests two levels: 20 levels refused a chain of ten."""
    raw = forwarded_as_attachment(20)
    msg = parse_message(raw)
    assert msg.subject == "Fwd 19" and msg.body == "see attached"
    [eml] = msg.attachments
    assert eml.name == "Fwd 18.eml" and b"the first words" in eml.data and eml.data in raw
    assert "max_depth" in str(timed_refusal(forwarded_as_attachment(30)))


def test_a_second_alternative_is_kept_as_a_file() -> None:
    """Its text and HTML were both dropped: the body and the HTML were taken already."""
    alternative = (
        'Content-Type: multipart/alternative; boundary="{0}"\r\n\r\n--{0}\r\n'
        "Content-Type: text/plain\r\n\r\n{1}\r\n--{0}\r\n"
        "Content-Type: text/html\r\n\r\n<p>{1}</p>\r\n--{0}--\r\n"
    )
    raw = top(
        multipart(
            alternative.format("a1", "first text").encode(),
            alternative.format("a2", "second text").encode(),
            b"Content-Type: text/plain\r\n\r\nfooter",
        )
    )
    msg = parse_message(raw)
    assert (msg.body, msg.html) == ("first text", "<p>first text</p>")
    assert [(a.name, a.data) for a in msg.attachments] == [
        ("attachment-1.txt", b"second text"),
        ("attachment-2.txt", b"footer"),
    ]
    # A text part before an alternative leaves the alternative its HTML, as before.
    raw = top(
        multipart(b"Content-Type: text/plain\r\n\r\nintro", alternative.format("a", "x").encode())
    )
    msg = parse_message(raw)
    assert (msg.body, msg.html, msg.attachments) == ("intro", "<p>x</p>", ())


def test_nested_attached_messages() -> None:
    raw = (
        b"Subject: m\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 2000 + b"Subject: x\r\n\r\nx"
    )
    assert "max_depth" in str(timed_refusal(raw))


def test_depth_within_limit_is_accepted() -> None:
    raw = b"Subject: nested\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(5)
    )
    deep = parse_message(raw + b"Content-Type: text/plain\r\n\r\ndeep\r\n")
    assert deep.body.strip() == "deep"
    with pytest.raises(LimitExceeded):
        parse_message(raw + b"x", ParseLimits(max_depth=4))


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"])
def test_100000_parts(newline: bytes) -> None:
    raw = (
        b'Subject: parts\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * 100_000
        + b"--b--\r\n"
    ).replace(b"\r\n", newline)
    error = timed_refusal(raw)
    assert "max_parts" in str(error) and "500" in str(error)


def pasted_source(levels: int, lines: int) -> bytes:
    """A forwarded message shown as text: its MIME structure is body text, not parts."""
    out = b"Forwarded message source:\r\n"
    for i in range(levels):
        out += b'Content-Type: multipart/mixed; boundary="p%d"\r\n\r\n--p%d\r\n' % (i, i)
    out += b"Content-Type: message/rfc822\r\n\r\n" * levels
    return out + b"--p0\r\nContent-Type: text/plain\r\n\r\nx\r\n" * lines + b"--p0--\r\n"


@pytest.mark.parametrize("ctype", ["text/plain", "text/rfc822-headers"])
def test_multipart_lines_pasted_into_a_body_count_as_neither_nesting_nor_parts(
    ctype: str,
) -> None:
    """Issue 12 item 17d: body text with pasted Content-Type lines was refused as nesting."""
    pasted = pasted_source(levels=30, lines=600)
    single = simple(f"Subject: pasted\nContent-Type: {ctype}\n", pasted)
    assert parse_message(single).body.replace("\n", "\r\n") == (
        pasted.decode() if ctype == "text/plain" else ""
    )
    in_part = simple(
        'Subject: pasted\nContent-Type: multipart/mixed; boundary="real"\n',
        b"--real\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--real\r\n"
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + pasted + b"\r\n--real--\r\n",
    )
    msg = parse_message(in_part)
    assert msg.body == "see below"
    assert len(msg.attachments) == 1
    assert msg.attachments[0].data == pasted


def test_only_the_first_content_type_of_a_header_block_nests() -> None:
    header = 'Content-Type: multipart/mixed; boundary="b"\r\n' * 40
    raw = b"Subject: twice\r\n" + header.encode() + b"\r\n--b\r\n\r\nx\r\n--b--\r\n"
    assert parse_message(raw).body == "x"


def test_nesting_through_parts_and_attached_messages_is_still_refused_quickly() -> None:
    level = (
        b'Content-Type: multipart/mixed; boundary="b%d"\r\nX-Pad: y\r\n\r\n--b%d\r\n'
        b"Content-Type: message/rfc822\r\n\r\n"
    )
    raw = b"Subject: deep\r\n" + b"".join(level % (i, i) for i in range(1000)) + b"\r\nx\r\n"
    error = timed_refusal(raw)
    assert "max_depth" in str(error)
    # Header blocks without a blank line: the delimiter line ends them.
    raw = b"Subject: s\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\nX: y\r\n--b%d\r\n' % (i, i)
        for i in range(2000)
    )
    assert "max_depth" in str(timed_refusal(raw))
    raw = (
        b'Subject: s\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + (b"--b\r\nContent-Type: text/plain\r\n" + b"X: y\r\n" * 10) * 100_000
    )
    assert "max_parts" in str(timed_refusal(raw))


@settings(max_examples=500, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(
    data=st.lists(st.sampled_from([b"\r", b"\n", b"x", b"\r\n"]), max_size=30).map(b"".join),
    start=st.integers(0, 10),
    window=st.integers(0, 40),
)
def test_property_blank_lines_are_found_as_the_regular_expression_finds_them(
    data: bytes, start: int, window: int
) -> None:
    m = HEADER_END_RE.search(data, start, start + window)
    assert _blank_line_end(data, start, start + window) == (None if m is None else m.end())


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(
    lines=st.lists(st.sampled_from([b"X: y", b"", b"\r", b"--b", b"a" * 30]), max_size=40),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    window=st.integers(1, 80),
    picks=st.lists(st.integers(0, 40), max_size=10),
)
def test_property_header_block_ends_are_found_as_by_a_search_from_each_start(
    lines: list[bytes], newline: bytes, window: int, picks: list[int]
) -> None:
    data = b"".join(line + newline for line in lines)
    starts = [0] + [m.end() for m in re.finditer(rb"\n", data)]
    ends = _BlockEnds(data, window)
    for start in sorted({starts[i] for i in picks if i < len(starts)}):
        naive = _blank_line_end(data, start, start + window)
        if data.startswith((b"\n", b"\r"), start):
            naive = start  # an empty line: CRLF, LF or a bare CR
        assert ends(start) == (len(data) if naive is None else naive)


def test_empty_boundary_parts_are_counted() -> None:
    raw = (
        b'Subject: e\r\nContent-Type: multipart/mixed; boundary=""\r\n\r\n'
        + b"--\r\nx\r\n" * 100_000
    )
    assert "max_parts" in str(timed_refusal(raw))


def named_addresses(count: int) -> str:
    return ", ".join(f'"Doe, Jane {i}" <jane.doe{i}@example.com>' for i in range(count))


@pytest.mark.parametrize("count", [1_500, 10_000])
def test_a_to_of_thousands_is_read_up_to_max_addresses_with_a_note(count: int) -> None:
    """Issue 12 item 17d: a To with 1,500 addresses failed the whole message."""
    raw = simple(f"From: Ann <ann@example.org>\nTo: {named_addresses(count)}\nSubject: all\n")
    start = time.perf_counter()
    msg = parse_message(raw)
    assert time.perf_counter() - start < FAST
    assert (msg.from_addr, msg.body) == ("ann@example.org", "Hello.\r\n".replace("\r", ""))
    assert msg.to == tuple(f"jane.doe{i}@example.com" for i in range(1000))
    [note] = msg.notes
    assert note.startswith(
        f"The To header lists up to {count} addresses; only the first 1000 were read"
    )


def test_20000_addresses_in_to() -> None:
    to = ", ".join(f"user{i}@example.com" for i in range(20_000))
    raw = simple(f"From: a@example.org\nTo: {to}\nSubject: many\n")
    start = time.perf_counter()
    msg = parse_message(raw, ParseLimits(max_header_bytes=4 * 1024 * 1024, max_addresses=5))
    assert time.perf_counter() - start < FAST
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
        start = time.perf_counter()
        msg = parse_message(raw)
        assert time.perf_counter() - start < FAST, junk
        assert msg.to == ("x@example.org",) and "example.org" not in msg.from_addr, junk
        assert msg.notes and msg.notes[0].startswith("The From header lists up to"), junk
    long_one = b"From: " + b"a" * 300_000 + b"@example.org\r\nSubject: x\r\n\r\nbody"
    msg = parse_message(long_one)
    assert msg.from_addr == "" and "only the first 0 were read" in msg.notes[0]


def test_oversized_message() -> None:
    limits = ParseLimits(max_bytes=1000)
    error = timed_refusal(simple("Subject: big\n", b"x" * 2000), limits)
    assert "max_bytes" in str(error) and "1000" in str(error)


def test_oversized_header_block() -> None:
    raw = b"Subject: big\r\n" + (b"X-Junk: " + b"a" * 80 + b"\r\n") * 12_000 + b"\r\nbody"
    assert "max_header_bytes" in str(timed_refusal(raw))


def test_quadratic_parameter_lists() -> None:
    raw = simple(
        'Subject: s\nContent-Type: multipart/mixed; boundary="b"\n',
        b'--b\r\nContent-Type: multipart/mixed; boundary="c"; name="'
        + b";" * 200_000
        + b'"\r\n\r\n--c--\r\n--b--\r\n',
    )
    assert "max_header_params" in str(timed_refusal(raw))


def test_deeply_nested_html_is_attached_and_read_as_text() -> None:
    """The sanitizer is quadratic in the nesting of blocks: such HTML is not refused, but
    attached and read without a tree (it was a failure event)."""
    raw = simple("Subject: h\nContent-Type: text/html\n", b"<div>" * 100_000 + b"deep text")
    start = time.perf_counter()
    msg = parse_message(raw)
    assert time.perf_counter() - start < FAST
    assert (msg.body, msg.html, msg.attachments[0].name) == ("deep text", None, "message.html")
    assert "nests block elements deeper than max_html_depth (1000)" in msg.notes[0]


def test_large_html_is_flattened_without_layout() -> None:
    markup = b"<p>Hello <b>world</b> &amp; friends</p><script>x()</script>\n" * 50
    msg = parse_message(
        simple("Subject: h\nContent-Type: text/html\n", markup),
        ParseLimits(max_html_render_bytes=100),
    )
    assert msg.body.startswith("Hello world & friends")
    assert "x()" not in msg.body


def test_boundary_in_a_hostile_charset_is_refused() -> None:
    raw = simple(
        "Subject: z\nContent-Type: multipart/mixed; boundary*=zlib_codec''%78%9c\n", b"--x\r\n"
    )
    with pytest.raises(ParseError, match="charset"):
        parse_message(raw)


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
    start = time.perf_counter()
    assert message_summary(hostile)[0] is None
    assert time.perf_counter() - start < FAST
    # The same id whether or not the message parses.
    unparseable = b"Message-ID: <id-1@example.org>\r\n" + b"X: y\r\n" * 200_000 + b"\r\n"
    with pytest.raises(LimitExceeded):
        parse_message(unparseable)
    assert message_summary(unparseable)[0] == "id-1@example.org"


# ------------------------------------------------------------------------------------------
# Property test: random MIME trees, headers, charsets and bytes
# ------------------------------------------------------------------------------------------

CHARSET_LABELS = [
    "utf-8",
    "iso-8859-1",
    "windows-1252",
    "koi8-r",
    "shift_jis",
    "gb2312",
    "iso-2022-jp",
    "utf-16",
    "utf-7",
    "x-unknown",
    "rot13",
    "zlib_codec",
    "base64_codec",
    "unicode_escape",
    "punycode",
    "idna",
    "",
    "us-ascii",
    'bogus"',
    "utf-8*en",
]
ENCODINGS = [
    "base64",
    "quoted-printable",
    "7bit",
    "8bit",
    "binary",
    "x-uuencode",
    "Base64 ",
    "bogus",
]
TYPES = [
    "text/plain",
    "text/html",
    "text/calendar",
    "application/pdf",
    "application/ms-tnef",
    "image/png",
    "message/delivery-status",
    "bogus",
    "text/\xe9",
]

text_or_bytes = st.one_of(
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=30),
)


@st.composite
def encoded_word(draw: st.DrawFn) -> bytes:
    charset = draw(st.sampled_from(CHARSET_LABELS)) or "utf-8"
    payload = draw(st.binary(max_size=20))
    if draw(st.booleans()):
        body = base64.b64encode(payload)[: draw(st.integers(0, 40))]
        return b"=?" + charset.encode() + b"?b?" + body + b"?="
    return b"=?" + charset.encode() + b"?q?" + payload.replace(b"?", b"=3F") + b"?="


header_value = st.lists(st.one_of(text_or_bytes, encoded_word()), max_size=4).map(b" ".join)


@st.composite
def header_block(draw: st.DrawFn, ctype: bytes) -> bytes:
    lines = [b"Content-Type: " + ctype]
    names = [b"Subject", b"From", b"To", b"Date", b"Message-ID", b"References", b"Return-Path"]
    names += [b"Auto-Submitted", b"Precedence", b"Content-ID", b"X-Random"]
    for name in draw(st.lists(st.sampled_from(names), max_size=5)):
        lines.append(name + b": " + draw(header_value))
    if draw(st.booleans()):
        filename = draw(
            st.one_of(
                header_value.map(lambda v: b'filename="' + v + b'"'),
                st.tuples(st.sampled_from(CHARSET_LABELS), st.binary(max_size=20)).map(
                    lambda t: (
                        b"filename*="
                        + t[0].encode()
                        + b"''"
                        + "".join(f"%{b:02X}" for b in t[1]).encode()
                    )
                ),
            )
        )
        disposition = draw(st.sampled_from([b"attachment", b"inline", b"bogus"]))
        lines.append(b"Content-Disposition: " + disposition + b"; " + filename)
    lines.append(b"Content-Transfer-Encoding: " + draw(st.sampled_from(ENCODINGS)).encode())
    if draw(st.booleans()):
        lines.append(draw(st.binary(max_size=40)))
    return b"\r\n".join(lines) + b"\r\n\r\n"


@st.composite
def mime_entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    kind = draw(
        st.sampled_from(["leaf", "leaf", "multipart", "message"] if depth < 4 else ["leaf"])
    )
    if kind == "multipart":
        boundary = (
            draw(st.sampled_from([b"b", b"=_x", b"", b"b" * 70, b"sp ace"])) + str(depth).encode()
        )
        subtype = draw(
            st.sampled_from([b"mixed", b"alternative", b"related", b"report", b"digest"])
        )
        ctype = b"multipart/" + subtype + b'; boundary="' + boundary + b'"'
        if subtype == b"report":
            ctype += b"; report-type=delivery-status"
        children = draw(st.lists(mime_entity(depth + 1), max_size=4))
        body = draw(st.binary(max_size=20)) + b"\r\n"
        for child in children:
            body += b"--" + boundary + b"\r\n" + child + b"\r\n"
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n"
        body += draw(st.binary(max_size=20))
        return draw(header_block(ctype)) + body
    if kind == "message":
        return draw(header_block(b"message/rfc822")) + draw(mime_entity(depth + 1))
    charset = draw(st.sampled_from(CHARSET_LABELS))
    ctype = draw(st.sampled_from(TYPES)).encode("utf-8")
    if charset:
        ctype += b"; charset=" + charset.encode()
    body = draw(st.one_of(st.binary(max_size=200), text_or_bytes))
    if draw(st.booleans()):
        body = base64.encodebytes(body)
    return draw(header_block(ctype)) + body


@st.composite
def raw_message(draw: st.DrawFn) -> bytes:
    raw = draw(st.one_of(mime_entity(), st.binary(max_size=500)))
    newline = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    raw = raw.replace(b"\r\n", newline)
    # A few random byte flips, insertions and cuts on top of the structure.
    for _ in range(draw(st.integers(0, 3))):
        if not raw:
            break
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + draw(st.binary(max_size=4)) + raw[at + draw(st.integers(0, 4)) :]
    return raw


SMALL = ParseLimits(max_depth=6, max_parts=40, max_header_bytes=4096, max_addresses=20)


def raw_fuzz(examples: int) -> settings:
    """Settings for properties over generated raw messages: repeatable, large inputs allowed."""
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=2),
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


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


LARGE_LINES = [
    b"plain text, caf\xc3\xa9\r\n",
    b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n",
    b"--b\r\n",
    b"--b0\r\n",
    b"-- \r\n",
    b'Content-Type: multipart/mixed; boundary="b"\r\n',
    b"Content-Type: message/rfc822\r\n",
    b"\r\n",
    b"=C3=A9 soft break=\r\n",
    b"begin 644 x.bin\r\n",
    b"M86)C9&5F9VAI:FML;6YO<'%R<W1U=G=X>7I!0D-$149'2$E*2TQ-3D]045)3\r\n",
    b"\r",
    b"\x00\xff",
]


@st.composite
def large_body(draw: st.DrawFn) -> bytes:
    """A body of a few lines, repeated past the size of part taken from the raw bytes."""
    text = b"".join(draw(st.lists(st.sampled_from(LARGE_LINES), min_size=1, max_size=6)))
    return text * (300 * 1024 // len(text) + 1)


@st.composite
def large_mime_entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    """mime_entity with large leaves, boundaries reused between levels, and more."""
    kinds = ["leaf", "leaf", "multipart", "message"] if depth < 3 else ["leaf"]
    kind = draw(st.sampled_from(kinds))
    if kind == "multipart":
        boundary = draw(st.sampled_from([b"b", b"b0", b"c%d" % depth, b""]))
        subtype = draw(st.sampled_from([b"mixed", b"alternative", b"digest", b"related"]))
        children = draw(st.lists(large_mime_entity(depth + 1), min_size=1, max_size=3))
        body = draw(st.sampled_from([b"", b"preamble\r\n"]))
        for child in children:
            body += b"--" + boundary + b"\r\n" + child + b"\r\n"
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n" + draw(st.sampled_from([b"", b"epilogue"]))
        ctype = b"multipart/" + subtype + b'; boundary="' + boundary + b'"'
        return draw(header_block(ctype)) + body
    if kind == "message":
        return draw(header_block(b"message/rfc822")) + draw(large_mime_entity(depth + 1))
    ctype = draw(st.sampled_from(TYPES)).encode("utf-8")
    body = draw(large_body()) if draw(st.booleans()) else draw(st.binary(max_size=100))
    return draw(header_block(ctype)) + body


@st.composite
def large_message(draw: st.DrawFn) -> bytes:
    raw = draw(large_mime_entity())
    if len(raw) <= 2 * 1024 * 1024:
        raw = top(multipart(raw, ZIP + ELISION_FILLER))
    return raw.replace(b"\r\n", draw(st.sampled_from([b"\r\n", b"\n", b"\r"])))


@raw_fuzz(25)
@given(raw=large_message())
def test_property_large_bodies_taken_from_the_raw_bytes_parse_as_through_the_parser(
    raw: bytes,
) -> None:
    """Whatever the tree, transfer encodings, line ends and body text: the same result with
    the bodies taken from the raw bytes as with every body through the parser."""
    try:
        reference: ParsedMessage | str = parse_without_elision(raw)
    except MessageError as exc:
        reference = str(exc)
    try:
        elided: ParsedMessage | str = parse_message(raw)
    except MessageError as exc:
        elided = str(exc)
    assert elided == reference


def container_depth_and_parts(msg: Message) -> tuple[int, int]:
    """(Nesting of containers, parts of multiparts) in a stdlib tree."""
    depth = parts = 0
    stack = [(msg, 1)]
    while stack:
        part, level = stack.pop()
        payload = part._payload  # type: ignore[attr-defined]
        if isinstance(payload, list):
            depth = max(depth, level)
            if part.get_content_maintype() == "multipart":
                parts += len(payload)
            stack += [(p, level + 1) for p in payload if isinstance(p, Message)]
    return depth, parts


@st.composite
def raw_message_with_pasted_headers(draw: st.DrawFn) -> bytes:
    """raw_message, with Content-Type and delimiter lines pasted somewhere in its text."""
    raw = draw(raw_message())
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(raw)))
        boundary = draw(st.sampled_from([b"b", b"b0", b"b1", b"", b"p"]))
        pasted = draw(
            st.sampled_from(
                [
                    b'\r\nContent-Type: multipart/mixed; boundary="' + boundary + b'"\r\n',
                    b"\r\nContent-Type: message/rfc822\r\n\r\n",
                    b"\r\n--" + boundary + b"\r\n",
                    b"\r\n\r\n",
                ]
            )
        )
        raw = raw[:at] + pasted + raw[at:]
    return raw


@raw_fuzz(300)
@given(raw=raw_message_with_pasted_headers())
@example(  # a bare CR, then a CRLF: the blank line ends after the LF
    raw=b"Content-Type: message/delivery-status; charset=utf-8\r\r\n"
    b"Content-Type: message/rfc822\r\n\r\n\nContent-Transfer-Encoding: base64\r\n\r\n"
)
@example(  # a digest's part is a message unless its (parser's) header block says otherwise
    raw=b'Content-Type: multipart/digest; boundary="b1"\r\n\r\n--b1\r\x00\n'
    b"Content-Type: text/plain\r\n\r\nx\r\n"
)
def test_property_the_pre_scan_never_counts_less_nesting_or_parts_than_the_parser(
    raw: bytes,
) -> None:
    """What the pre-scan lets through, the stdlib parser cannot nest deeper or split more."""
    depth, parts = container_depth_and_parts(stdlib_email.message_from_bytes(raw))
    generous = ParseLimits(max_depth=1000, max_parts=100_000, max_header_params=10_000)
    try:
        prescan(raw, generous)
    except MessageError:
        return
    if depth > 1:
        with pytest.raises(LimitExceeded, match="max_depth"):
            prescan(raw, replace(generous, max_depth=depth - 1))
    if parts > 0:
        with pytest.raises(LimitExceeded, match="max_parts"):
            prescan(raw, replace(generous, max_parts=parts - 1))


@settings(max_examples=200, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(name=st.one_of(st.none(), st.text(max_size=400)))
def test_property_safe_filename(name: str | None) -> None:
    safe = safe_filename(name, "attachment-1.bin")
    assert safe and len(safe.encode("utf-8")) <= 150
    assert "/" not in safe and "\\" not in safe
    assert not CRLF_RE.search(safe)
    assert safe[0] not in ". " and safe[-1] not in ". "
    assert safe.split(".")[0].strip().upper() not in {"CON", "PRN", "AUX", "NUL", "COM1", "LPT1"}
    assert safe_filename(safe, "attachment-1.bin") == safe


def _big_message(inner_attachment: bytes, crlf: bool = True) -> bytes:
    from email.message import EmailMessage
    from email.policy import SMTP, default

    inner = EmailMessage()
    inner["From"], inner["Subject"] = "x@example.org", "inner report"
    inner.set_content("inner text")
    inner.add_attachment(inner_attachment, maintype="application", subtype="zip", filename="in.zip")
    outer = EmailMessage()
    outer["From"], outer["To"], outer["Subject"] = "a@example.org", "b@example.org", "big one"
    outer["Message-ID"] = "<big-1@example.org>"
    outer.set_content("plain body")
    outer.add_alternative("<p>html body</p>", subtype="html")
    outer.add_attachment(
        os.urandom(3 * 1024 * 1024),
        maintype="application",
        subtype="octet-stream",
        filename="big.bin",
    )
    outer.add_attachment(inner)
    return outer.as_bytes(policy=SMTP if crlf else default)


@pytest.mark.parametrize("crlf", [True, False])
def test_large_base64_parts_decode_from_the_raw_bytes_exactly(crlf: bool) -> None:
    """Bodies over the elision threshold skip the stdlib parser; the result must not change."""
    inner_zip = os.urandom(600 * 1024)
    raw = _big_message(inner_zip, crlf)
    msg = parse_message(raw, ParseLimits(max_bytes=50_000_000))
    assert msg.raw is raw
    assert msg.body.strip() == "plain body"
    by_name = {a.name: a for a in msg.attachments}
    import email as stdlib_email

    reference = stdlib_email.message_from_bytes(raw)
    expected = next(
        p.get_payload(decode=True) for p in reference.walk() if p.get_filename() == "big.bin"
    )
    assert by_name["big.bin"].data == expected
    # The attached message is kept byte for byte, its own big part included.
    eml = by_name["inner report.eml"].data
    assert eml in raw
    again = parse_message(eml)
    assert [a.data for a in again.attachments] == [inner_zip]


# ------------------------------------------------------------------------------------------
# Base64 and large bodies: the same bytes whichever path a part takes
# ------------------------------------------------------------------------------------------
# Messages over 2 MiB have their parts of 256 KiB or more taken from the raw bytes (elided
# from the stdlib parser's sight); smaller ones go through the parser. Both must decode alike.

BOUNDARY = "=_Part_0_x9"
ELISION_FILLER = base64.encodebytes(os.urandom(2 * 1024 * 1024))


def message_with_part(
    body: bytes, *, large: bool, cte: str = "base64", ctype: str = "application/octet-stream"
) -> bytes:
    """A message whose part "x.bin" has the encoded text ``body``; ``large`` adds a 2.8 MB
    attachment that takes the message over the elision threshold."""
    filler = b""
    if large:
        filler = (
            f"--{BOUNDARY}\r\nContent-Type: application/octet-stream; name=filler.bin\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode() + ELISION_FILLER
    return (
        (
            "From: a@example.org\r\nSubject: part\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed; boundary="{BOUNDARY}"\r\n\r\n'
            f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nSee the file.\r\n"
            f'--{BOUNDARY}\r\nContent-Type: {ctype}; name="x.bin"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n\r\n"
        ).encode()
        + body
        + b"\r\n"
        + filler
        + f"--{BOUNDARY}--\r\n".encode()
    )


def part_data(raw: bytes, name: str = "x.bin") -> bytes:
    [found] = [a.data for a in parse_message(raw).attachments if a.name == name]
    return found


def elided_bodies(raw: bytes) -> list[bytes]:
    """The bodies of ``raw`` that the parser never sees (taken from the raw bytes instead)."""
    limits = ParseLimits()
    root_body = header_end(raw, limits.max_header_bytes)
    assert root_body is not None
    spans = elide_large_bodies(raw, prescan(raw, limits), root_body)[1].values()
    return [raw[start:end] for start, end in spans]


@pytest.mark.parametrize(
    ("sizes", "elided"),
    [((1_500_001, 1_500_000), True), ((1_001, 1_000), False), ((2, 7), False)],
)
def test_two_joined_base64_blobs_keep_every_byte(sizes: tuple[int, int], elided: bool) -> None:
    """Issue 12 item 2: 3,000,001 bytes in two padded blobs came out as 1,500,001."""
    first, second = os.urandom(sizes[0]), os.urandom(sizes[1])
    raw_body = base64.encodebytes(first) + base64.encodebytes(second)
    raw = message_with_part(raw_body, large=False)
    assert (raw_body in elided_bodies(raw)) == elided
    data = part_data(raw)
    assert len(data) == sum(sizes) and data == first + second


def test_a_lone_base64_blob_decodes_as_the_stdlib_decodes_it() -> None:
    data = os.urandom(300 * 1024 + 1)
    for large in (False, True):
        raw = message_with_part(base64.encodebytes(data), large=large)
        assert (base64.encodebytes(data) in elided_bodies(raw)) == large
        assert part_data(raw) == data
        reference = stdlib_email.message_from_bytes(raw)
        [stdlib] = [p for p in reference.walk() if p.get_filename() == "x.bin"]
        assert stdlib.get_payload(decode=True) == data


B64_NOISE = [b"\r\n", b"\n", b" ", b"\t", b"!", b"*", b"\xff", b"=", b"==", b"\r\n\r\n"]


@st.composite
def base64ish(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """Base64-like text: joined blobs, broken padding, odd line lengths and junk; with the
    octets it must give when it is a well-formed sequence of padded blobs (else None)."""
    text = b""
    expected: bytes | None = b""
    for _ in range(draw(st.integers(1, 4))):
        data = draw(st.binary(max_size=60))
        blob = base64.b64encode(data)
        damage = draw(st.sampled_from(["none", "none", "unpadded", "cut", "padding"]))
        if damage == "unpadded":
            blob = blob.rstrip(b"=")
        elif damage == "cut":
            blob = blob[: draw(st.integers(0, len(blob)))]
        elif damage == "padding":
            blob += b"=" * draw(st.integers(1, 3))
        if damage != "none":
            expected = None
        elif expected is not None:
            expected += data
        width = draw(st.sampled_from([76, 64, 4, 7, 1]))
        newline = draw(st.sampled_from([b"\r\n", b"\n"]))
        text += newline.join(blob[i : i + width] for i in range(0, len(blob), width)) + newline
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        if text[at - 1 : at] == b"\r":
            at -= 1  # never split a CRLF: bare CRs are line ends the fast path leaves alone
        text = text[:at] + draw(st.sampled_from(B64_NOISE)) + text[at:]
        expected = None
    return text, expected


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(case=base64ish())
def test_property_the_in_place_base64_decoding_is_the_blob_by_blob_decoding(
    case: tuple[bytes, bytes | None],
) -> None:
    text, expected = case
    decoded = b64_decode(text)
    assert decoded == _b64_blobs(text.translate(None, _B64_NOISE))
    if expected is not None:
        assert decoded == expected
    # A window of a larger buffer decodes as the same bytes on their own.
    assert b64_decode(b"QUJD" + text + b"=QQ", 4, 4 + len(text)) == decoded


@raw_fuzz(60)
@given(case=base64ish())
def test_property_base64_parts_decode_alike_above_and_below_the_elision_threshold(
    case: tuple[bytes, bytes | None],
) -> None:
    text, expected = case
    # Repeated to the size of a part that a large message has taken from its raw bytes.
    copies = 256 * 1024 // len(text) + 1
    body = text * copies
    small, large = (message_with_part(body, large=big) for big in (False, True))
    assert body not in elided_bodies(small) and body in elided_bodies(large)
    decoded = part_data(small)
    assert part_data(large) == decoded == b64_decode(body)
    if expected is not None:
        assert decoded == expected * copies


def parse_without_elision(raw: bytes) -> ParsedMessage:
    """The reference: every body goes through the stdlib parser, whatever its size."""
    with mock.patch.object(engine.parse.mime, "_ELIDE_FROM", 1 << 40):
        return parse_message(raw)


BIG_B64 = base64.encodebytes(os.urandom(300 * 1024))
BIG_TEXT = b"".join(b"line %d of a long report, caf\xc3\xa9 and all\r\n" % i for i in range(9000))
BIG_QP = BIG_TEXT.replace(b"\xc3\xa9", b"=C3=A9").replace(b"all\r\n", b"all=\r\n and more\r\n")
UU_DATA = os.urandom(300 * 1024)
UU_TEXT = b"".join(
    binascii.b2a_uu(UU_DATA[i : i + 45]).replace(b"\n", b"\r\n") for i in range(0, len(UU_DATA), 45)
)
ZIP = b"Content-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"


def multipart(*parts: bytes, boundary: str = BOUNDARY) -> bytes:
    """The body of a multipart of ``parts`` (each a header block and a body)."""
    b = boundary.encode()
    return b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"


def top(body: bytes, ctype: str = f'multipart/mixed; boundary="{BOUNDARY}"') -> bytes:
    return f"From: a@example.org\r\nSubject: big\r\nContent-Type: {ctype}\r\n\r\n".encode() + body


def big_message(*parts: bytes) -> bytes:
    """A message over the elision threshold: ``parts``, then a 2.8 MB attachment."""
    return top(multipart(*parts, ZIP + ELISION_FILLER))


def attached(message: bytes) -> bytes:
    return b"Content-Type: message/rfc822\r\n\r\n" + message


ELISION_SHAPES = {
    "single-part text": top(BIG_TEXT * 8, "text/plain; charset=utf-8"),
    "single-part quoted-printable": (
        b"From: a@example.org\r\nSubject: big\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + BIG_QP * 8
    ),
    "single-part with a non-header line in its header block": (
        b"From: a@example.org\r\nnot a header\r\nSubject: x\r\n\r\n" + BIG_TEXT * 8
    ),
    "text, quoted-printable, html and base64 parts": big_message(
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + BIG_TEXT,
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: "
        b"quoted-printable\r\n\r\n<p>" + BIG_QP + b"</p>",
        b"Content-Type: text/plain; name=report.txt\r\n"
        b"Content-Transfer-Encoding: base64 \r\n\r\n" + base64.encodebytes(BIG_TEXT),
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
        b"begin 644 a.pdf\r\n" + UU_TEXT + b"`\r\nend\r\n",
    ),
    # A message pasted into a text body: its "delimiters" are text, not parts.
    "pasted multipart in a text body": big_message(
        b"Content-Type: text/plain\r\n\r\nForwarded:\r\n"
        b'Content-Type: multipart/mixed; boundary="pasted"\r\n\r\n--pasted\r\n'
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + BIG_B64 + b"--pasted--\r\nend of the forwarded text",
    ),
    # A text body with a line that starts like the enclosing delimiter.
    "a delimiter-like line in a body": big_message(
        b"Content-Type: text/plain\r\n\r\n"
        + BIG_TEXT
        + f"--{BOUNDARY}x is not a delimiter\r\n".encode()
        + BIG_TEXT,
    ),
    "a non-header line in a part's header block": big_message(
        b"Content-Type: application/octet-stream\r\nnot a header\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + BIG_B64,
    ),
    "two transfer encodings": big_message(
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 7bit\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + BIG_B64,
    ),
    "a digest part without a content type": big_message(
        b'Content-Type: multipart/digest; boundary="dig"\r\n\r\n'
        + multipart(b"\r\nSubject: digested\r\n\r\n" + BIG_TEXT, boundary="dig"),
    ),
    # An attached message whose multipart reuses the outer boundary: the parser gives each
    # delimiter line to the innermost multipart with that boundary, and so does the scan.
    "an attached message sharing the outer boundary": big_message(
        b"Content-Type: text/plain\r\n\r\nsee attached",
        attached(top(multipart(b"Content-Type: text/plain\r\n\r\ninner", ZIP + BIG_B64))),
        b"Content-Type: text/plain\r\n\r\nafter the attached message",
    ),
    # An attached message after an mbox envelope line: its exact span does not start with
    # its first header, so its bytes are rebuilt from the parsed tree, big parts included.
    "an attached message rebuilt from the tree": big_message(
        b"Content-Type: text/plain\r\n\r\nsee attached",
        attached(
            b"From sender@example.org Thu Nov 27 09:00:00 2026\r\n"
            + top(
                multipart(
                    b"Content-Type: text/plain\r\n\r\ninner",
                    b"Content-Type: text/plain; name=report.txt\r\n\r\n" + BIG_TEXT,
                    b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: "
                    b"base64\r\n\r\n" + BIG_B64,
                    boundary="inner",
                ),
                'multipart/mixed; boundary="inner"',
            )
        ),
    ),
}


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"])
@pytest.mark.parametrize("name", sorted(ELISION_SHAPES))
def test_large_bodies_taken_from_the_raw_bytes_parse_as_through_the_parser(
    name: str, newline: bytes
) -> None:
    """Bare CR line ends were left to the parser whole (8 to 16 times the message)."""
    raw = ELISION_SHAPES[name].replace(b"\r\n", newline)
    assert len(raw) > 2 * 1024 * 1024
    if name != "single-part with a non-header line in its header block":
        assert elided_bodies(raw)
    assert parse_message(raw) == parse_without_elision(raw)


def test_an_attached_message_rebuilt_from_the_tree_keeps_its_large_parts() -> None:
    raw = ELISION_SHAPES["an attached message rebuilt from the tree"]
    assert BIG_TEXT in elided_bodies(raw) and BIG_B64 in elided_bodies(raw)
    [eml] = [a.data for a in parse_message(raw).attachments if a.name.endswith(".eml")]
    assert BIG_TEXT in eml and BIG_B64 in eml
    inner = parse_message(eml)
    assert inner.body == "inner"
    assert [a.data for a in inner.attachments] == [BIG_TEXT, base64.b64decode(BIG_B64)]


def test_a_rebuilt_attached_message_keeps_its_8bit_octets_whatever_its_charset() -> None:
    """The stdlib's get_payload() decodes 8-bit text with the declared charset (here utf-7,
    which turns "+ADw-" into "<"): the attached message must keep its octets."""
    body = b"caf\xe9 +ADw-script+AD4- \xff"
    inner = top(
        multipart(b"Content-Type: text/plain; charset=utf-7\r\n\r\n" + body, boundary="in"),
        'multipart/mixed; boundary="in"',
    )
    envelope = b"From sender@example.org Thu Nov 27 09:00:00 2026\r\n"
    raw = top(multipart(b"Content-Type: text/plain\r\n\r\nsee", attached(envelope + inner)))
    [eml] = [a.data for a in parse_message(raw).attachments if a.name.endswith(".eml")]
    assert body in eml


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
        lines = (binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45))
        uu = b"begin 644 a.pdf\r\n" + b"".join(lines).replace(b"\n", b"\r\n") + b"`\r\nend\r\n"
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
        cwd=Path(__file__).parent.parent,
    ).stdout
    peak_kib, body, attachments = map(int, out.split())
    assert body > 0 or attachments > 0  # the message was read, not refused
    assert peak_kib * 1024 <= MEMORY_BOUND * len(raw), (
        f"{shape}: {peak_kib / 1024:.0f} MiB for {len(raw) / 2**20:.0f} MiB"
    )


# ------------------------------------------------------------------------------------------
# Fast paths: each must give exactly what the library code it stands in for gives
# ------------------------------------------------------------------------------------------
# These reach into engine.parse's internals on purpose: what they check is the equality of a
# fast path with the stdlib or inscriptis, which no public result shows in every case.


def message_tree(msg: Message) -> object:
    """Everything of a compat32 Message that parsing sets, recursively."""
    payload = msg._payload  # type: ignore[attr-defined]
    if isinstance(payload, list):
        payload = [message_tree(part) for part in payload]
    return (
        msg._headers,  # type: ignore[attr-defined]
        msg.get_unixfrom(),
        payload,
        msg.preamble,
        msg.epilogue,
        msg.get_default_type(),
    )


def assert_split_like_the_feed_parser(raw: bytes) -> bool:
    """True if the fast path took ``raw`` (and then built the stdlib's very tree)."""
    if raw.count(b"\r") != raw.count(b"\r\n"):
        return False  # bare CR line ends are never given to the fast path
    tree = _split_mime(raw)
    if tree is None:
        return False
    assert message_tree(tree) == message_tree(stdlib_email.message_from_bytes(raw))
    return True


MIME_SHAPES = {
    "nested": (
        b'Content-Type: multipart/mixed; boundary="out"\r\n\r\npreamble\r\n--out\r\n'
        b'Content-Type: multipart/alternative; boundary="in"\r\n\r\n--in\r\n'
        b"Content-Type: text/plain\r\n\r\nplain\r\n\r\n--in  \r\nContent-Type: text/html\r\n\r\n"
        b"<p>html</p>\r\n--in--\r\nepilogue of in\r\n\r\n--out\r\n"
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n--out--\r\n"
        b"\r\nepilogue\r\n"
    ),
    "digest": (
        b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: one\n\n1\n--d\n"
        b"Content-Type: text/plain\n\n2\n--d--"
    ),
    "no close delimiter": (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX-A: 1\r\n continued\r\n"
        b"\r\nbody\r\n--bx\r\nnot a delimiter\r\n"
    ),
    "header block without blank line": b"Subject: s\r\nnot a header\r\nbody\r\n",
    "nested close missing": (
        b"Content-Type: multipart/mixed; boundary=a\n\n--a\n"
        b"Content-Type: multipart/mixed; boundary=a1\n\n--a1\n\nx\n--a\n\ny\n--a--\n"
    ),
}
IRREGULAR_SHAPES = {
    "envelope line": b"From someone@example.org Thu Nov 27 09:00:00 2026\r\nSubject: s\r\n\r\nx",
    "repeated delimiters": b"Content-Type: multipart/mixed; boundary=b\n\n--b\n--b\n\nx\n--b--\n",
    "no first delimiter": b"Content-Type: multipart/mixed; boundary=b\n\nx\n--b--\n",
    "delivery status": b"Content-Type: message/delivery-status\n\nA: b\n\nC: d\n",
    "first line continued": b" folded\r\nSubject: s\r\n\r\nx",
}


@pytest.mark.parametrize("case", ALL_CASES)
def test_fast_mime_split_of_the_corpus_is_the_feed_parsers_tree(case: str) -> None:
    assert_split_like_the_feed_parser(load(case))


@pytest.mark.parametrize("name", sorted(MIME_SHAPES))
def test_fast_mime_split_follows_the_feed_parser(name: str) -> None:
    assert assert_split_like_the_feed_parser(MIME_SHAPES[name])


@pytest.mark.parametrize("name", sorted(IRREGULAR_SHAPES))
def test_irregular_mime_shapes_are_left_to_the_feed_parser(name: str) -> None:
    assert _split_mime(IRREGULAR_SHAPES[name]) is None


@raw_fuzz(300)
@given(raw=raw_message())
def test_property_fast_mime_split_is_the_feed_parsers_tree(raw: bytes) -> None:
    assert_split_like_the_feed_parser(raw)


HTML_TEXTS = ["x", " ", "\n", " a ", "  b\n c  ", "\xa0", "&amp;lt;", "\t\n", "é", "&nbsp;"]
HTML_TAGS = ["ul", "ol", "li", "pre", "a", "p", "div", "span", "q", "b", "blockquote", "h2"]


@st.composite
def html_fragment(draw: st.DrawFn, depth: int = 0) -> str:
    out = []
    for _ in range(draw(st.integers(0, 3 if depth < 5 else 1))):
        kind = draw(st.sampled_from(["text", "text", "br", "comment", "element", "element"]))
        if kind == "text":
            out.append(draw(st.sampled_from(HTML_TEXTS)))
        elif kind == "br":
            out.append("<br>")
        elif kind == "comment":
            out.append("<!-- c -->")
        else:
            tag = draw(st.sampled_from(HTML_TAGS))
            attributes = ' href="https://example.org/?a=1&amp;b=2"' if tag == "a" else ""
            inner = draw(html_fragment(depth + 1))
            out.append(f"<{tag}{attributes}>{inner}</{tag}>")
    return "".join(out)


@settings(max_examples=300, deadline=timedelta(seconds=2), derandomize=True, database=None)
@given(markup=html_fragment(), sanitize=st.booleans())
def test_property_fast_html_text_is_inscriptis_text(markup: str, sanitize: bool) -> None:
    if sanitize:
        markup = nh3.clean(markup)
    try:
        fast = _TextCanvas().render(markup)
    except _Unrenderable:
        return
    assert fast == get_text(markup, ParserConfig(display_links=True))


LEAN_TEXTS = [
    "x",
    " ",
    "\n",
    " a ",
    "  b\n c  ",
    "\xa0",
    "&amp;lt;",
    "\t\n",
    "é",
    "&nbsp;",
    "&amp",
    "&ampx",
    "&#169;",
    "&#x263a;",
    "&notin;",
    "&notit;",
    "a < b",
    "a > b",
    "&",
    "&#0;",
    "<",
    "\n\n\n\n",
    "&lt;b&gt;",
    "x</",
    "</>",
    "<!-->",
]
LEAN_TAGS = [
    "ul",
    "ol",
    "li",
    "pre",
    "a",
    "p",
    "div",
    "span",
    "q",
    "b",
    "blockquote",
    "h2",
    "br",
    "img",
    "textarea",
    "title",
    "xmp",
    "script",
    "style",
    "noscript",
    "iframe",
    "listing",
    "font",
    "center",
    "select",
    "option",
    "i",
    "code",
    "hr",
    "head",
    "body",
    "html",
    "SCRIPT",
    "Title",
]
LEAN_ATTRIBUTES = [
    "",
    ' href="https://example.org/?a=1&amp;b=2"',
    ' title="x>y"',
    " alt='a>b'",
    " class=c",
    ' style="color:red"',
    ' onclick="x()"',
]
LEAN_MARKUP = ["<!-- c -->", "<!DOCTYPE html>", "<!-->", "<?x?>", "</ g>", "<br/>"]


@st.composite
def html_document(draw: st.DrawFn, depth: int = 0) -> str:
    """Markup of text, entities, comments, raw-text elements and tables of cells."""
    out = []
    for _ in range(draw(st.integers(0, 3 if depth < 4 else 1))):
        kind = draw(st.sampled_from(["text", "text", "markup", "element", "element", "table"]))
        if kind == "text":
            out.append(draw(st.sampled_from(LEAN_TEXTS)))
        elif kind == "markup":
            out.append(draw(st.sampled_from(LEAN_MARKUP)))
        elif kind == "table":
            cells = "".join(
                f"\n  <td{draw(st.sampled_from(LEAN_ATTRIBUTES))}>"
                f"{draw(html_document(depth + 1))}</td>"
                for _ in range(draw(st.integers(0, 2)))
            )
            out.append(f"<table>\n <tr>{cells}\n </tr>\n</table>")
        else:
            tag = draw(st.sampled_from(LEAN_TAGS))
            attributes = draw(st.sampled_from(LEAN_ATTRIBUTES))
            out.append(f"<{tag}{attributes}>{draw(html_document(depth + 1))}</{tag}>")
    return "".join(out)


@settings(max_examples=500, deadline=timedelta(seconds=2), derandomize=True, database=None)
@given(markup=html_document())
def test_property_the_lean_html_text_is_nh3s_flattening(markup: str) -> None:
    """HTML over max_html_sanitize_bytes is read without nh3's tree, to the same text: token
    by token, and all at once where the markup allows it."""
    reference = _flatten_html(markup)
    assert html_text_lean(markup) == reference
    tidy = "\n\n".join(re.split(r"\n{3,}", _html_text_tokens(markup))).strip()
    assert tidy == reference
    if _html_markup_strippable(markup):
        assert "\n\n".join(re.split(r"\n{3,}", _html_text_stripped(markup))).strip() == reference


def test_html_too_large_to_sanitize_is_attached_and_read_as_text() -> None:
    """Issue 12 item 17e: 20 MB of HTML took 520 MiB (nh3's tree, twice)."""
    markup = "<html><head><style>p {}</style><title>Report</title></head><body>" + (
        "<p>Ligne <b>caf\u00e9</b> &amp; <a href='https://example.org'>lien</a></p>\n" * 4
    )
    limits = ParseLimits(max_html_sanitize_bytes=100)
    for alternative in (False, True):
        html_part = b"Content-Type: text/html; charset=utf-8\r\n\r\n" + markup.encode()
        if alternative:
            raw = top(
                multipart(b"Content-Type: text/plain\r\n\r\nPlain text.", html_part),
                f'multipart/alternative; boundary="{BOUNDARY}"',
            )
        else:
            raw = simple("Subject: report\nContent-Type: text/html; charset=utf-8\n", b"") + (
                markup.encode()
            )
        msg = parse_message(raw, limits)
        assert msg.html is None
        [attached] = msg.attachments
        assert (attached.name, attached.content_type) == ("message.html", "text/html")
        assert attached.data == b"\xef\xbb\xbf" + markup.encode()
        [note] = msg.notes
        assert "over max_html_sanitize_bytes (100): it is attached as message.html" in note
        if alternative:
            assert msg.body == "Plain text." and "taken from it" not in note
        else:
            assert msg.body == _flatten_html(markup) and "taken from it" in note
            assert msg.body.startswith("ReportLigne café & lien\nLigne")
    sanitized = parse_message(raw)
    assert sanitized.html is not None and "<style>" not in sanitized.html and not sanitized.notes


def test_hostile_html_too_large_to_sanitize_is_read_in_bounded_time() -> None:
    for markup in ("<noscript>x</noscript>" + "<a>" * 200_000, "<title>" * 100_000, "<!--" * 9):
        raw = simple("Subject: h\nContent-Type: text/html\n", markup.encode())
        start = time.perf_counter()
        msg = parse_message(raw, ParseLimits(max_html_sanitize_bytes=10))
        assert time.perf_counter() - start < 2 * FAST
        assert msg.html is None and msg.attachments[0].name == "message.html"


def test_html_tables_are_still_laid_out_by_inscriptis() -> None:
    markup = (
        b"<p>Status:</p><table><tr><th>Printer</th><th>State</th></tr>"
        b"<tr><td>Floor 3</td><td>down</td></tr></table><ul><li>one<ul><li>two</li></ul></li></ul>"
    )
    msg = parse_message(simple("Subject: t\nContent-Type: text/html\n", markup))
    assert msg.body == "Status:\n\nPrinter  State\nFloor 3  down\n\n  * one\n      + two"


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


@st.composite
def uuencoded(draw: st.DrawFn) -> bytes:
    """uuencoded text as mailers write it, and broken: no begin line, bad modes, short or
    long lines, missing end, junk and blank lines."""
    data = draw(st.binary(max_size=200))
    lines = [binascii.b2a_uu(data[i : i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    lines = [b"begin 644 f.bin", *lines, b"`", b"end"]
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(lines)))
        junk = [b"", b"begin x f", b"begin 755", b"M" + b"!" * 70, b"#86)C", b" end ", b"\xff"]
        lines.insert(at, draw(st.sampled_from(junk)))
    if draw(st.booleans()):
        del lines[draw(st.integers(0, len(lines) - 1))]
    newline = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    return newline.join(lines) + draw(st.sampled_from([newline, b""]))


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(text=uuencoded(), chunk=st.integers(1, 64))
def test_property_uudecoding_a_chunk_of_lines_at_a_time_is_the_stdlibs(
    text: bytes, chunk: int
) -> None:
    """The stdlib splits the whole text into lines at once (twice its size for 20 MB)."""
    try:
        expected: bytes | str = stdlib_decode_uu(text)
    except ValueError as exc:
        expected = str(exc)
    try:
        got: bytes | str = uu_decode(text, chunk)
    except ValueError as exc:
        got = str(exc)
    assert got == expected


LINE_PIECES = st.sampled_from(["\r\n", "\n", "\r", " ", ">", "> ", "-- ", "x", "é", "\x00", "\t"])


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(text=st.lists(LINE_PIECES, max_size=40).map("".join))
def test_property_body_cleaning_is_the_regular_expressions_cleaning(text: str) -> None:
    """str.replace stands in for re.sub(r"\r\n?", "\n"), which made a string per line."""
    reference = re.sub(r"\r\n?", "\n", text)
    reference = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", reference)
    assert clean_body(text) == reference


@settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None)
@given(
    text=st.lists(LINE_PIECES, max_size=60).map(lambda p: "".join(p).replace("\r", "")),
    delsp=st.booleans(),
    chunk=st.integers(1, 30),
)
def test_property_flowed_text_undone_in_chunks_is_undone_at_once(
    text: str, delsp: bool, chunk: int
) -> None:
    """One chunk is the whole text split into lines at once, as before chunks."""
    assert _unflow(text, delsp, chunk) == _unflow(text, delsp, len(text) + 1)
