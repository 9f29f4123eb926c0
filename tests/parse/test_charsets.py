"""engine.parse.charsets: declared, undeclared, unknown and hostile charsets."""

from __future__ import annotations

import base64
import zlib

import pytest
from samples import parse, simple

from engine.parse import parse_message

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
