"""engine.parse.attachments: file names, attached messages and TNEF."""

from __future__ import annotations

import base64
import struct
import time
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from samples import CRLF_RE, FAST, load, parse, simple

from engine.parse import ParseLimits, parse_message, safe_filename


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
    # Issue 20: the description marks where the image sat, by its Content-ID.
    assert msg.body == "See the error:\n\n[image: error (cid:screenshot.01@client.example.org)]"


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
    start = time.process_time()
    (attached,) = parse_message(raw).attachments
    assert time.process_time() - start < FAST
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
    start = time.process_time()
    msg = parse_message(tnef_message(winmail))
    assert time.process_time() - start < FAST
    (kept,) = msg.attachments
    assert (kept.name, kept.content_type, kept.data) == (
        "winmail.dat",
        "application/ms-tnef",
        winmail,
    )


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
