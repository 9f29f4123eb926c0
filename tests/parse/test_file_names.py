"""Issue 20 item 4: an undeclared 8-bit attachment name is read as the message's declared
charsets suggest, before detection, and detection on it is bounded in bytes."""

from __future__ import annotations

import time

import pytest
from samples import multipart, top

from engine.parse import parse_message
from engine.parse.charsets import MAX_NAME_OCTETS, decode_8bit_name


def message_with_raw_name(name: bytes, charset: str, subject_charset: str | None = None) -> bytes:
    text = f"Content-Type: text/plain; charset={charset}\r\n\r\nsee attached".encode()
    file = (
        b'Content-Type: application/msword\r\nContent-Disposition: attachment; filename="'
        + name
        + b'"\r\n\r\nDOC'
    )
    raw = top(multipart(text, file))
    if subject_charset:
        raw = raw.replace(b"Subject: big", f"Subject: =?{subject_charset}?B?dGVzdA==?=".encode())
    return raw


@pytest.mark.parametrize(
    ("name", "charset"),
    [
        ("报告书.doc", "gb2312"),  # GB2312 octets that read as Korean in EUC-KR
        ("견적서.doc", "euc-kr"),
        ("見積書.doc", "shift_jis"),
        ("Отчёт.doc", "windows-1251"),
        ("Отчёт.doc", "koi8-r"),
        ("דוח.doc", "windows-1255"),
    ],
)
def test_raw_8bit_name_is_read_in_the_charset_the_message_declares(name: str, charset: str) -> None:
    codec = {"gb2312": "gb18030", "shift_jis": "cp932"}.get(charset, charset)
    msg = parse_message(message_with_raw_name(name.encode(codec), charset))
    assert [a.name for a in msg.attachments] == [name]


def test_the_same_octets_follow_the_declared_charset_both_ways() -> None:
    octets = "报告书".encode("gb2312")
    assert octets.decode("cp949") != "报告书"  # they are valid Korean too
    assert decode_8bit_name(octets, ("gb2312",)) == "报告书"
    assert decode_8bit_name(octets, ("euc-kr",)) == octets.decode("cp949")
    # Encoded words count as declarations; the most used charset wins.
    msg = parse_message(message_with_raw_name(octets + b".doc", "us-ascii", "gb2312"))
    assert [a.name for a in msg.attachments] == ["报告书.doc"]


def test_iso_2022_jp_mail_reads_an_8bit_name_as_shift_jis() -> None:
    octets = "見積書.xls".encode("cp932")
    assert decode_8bit_name(octets, ("iso-2022-jp",)) == "見積書.xls"


def test_utf8_names_stay_utf8_whatever_is_declared() -> None:
    assert decode_8bit_name("Grüße.pdf".encode(), ("windows-1252",)) == "Grüße.pdf"


def test_detection_on_a_name_is_bounded_in_bytes() -> None:
    huge = "报告".encode("gb2312") * 200_000  # 800 KB of "name"
    start = time.process_time()
    text = decode_8bit_name(huge, ())
    assert time.process_time() - start < 1.0
    assert len(text) <= MAX_NAME_OCTETS
    msg = parse_message(message_with_raw_name(huge, "us-ascii"))
    assert len(msg.attachments[0].name.encode()) <= 255
