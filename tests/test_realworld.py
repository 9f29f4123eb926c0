"""Issue 5 end to end: every corpus message, replayed with `ingest`, ends in the right request
(or a failure event, or an ignored auto-reply) in a real store; never a crash, never a block."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    attachment_bytes,
    cli,
    ingest,
    ledger,
    mailbox_xml,
    message,
    requests,
)

from engine.parse import parse_message

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(p.stem for p in CORPUS.glob("*.eml"))


@pytest.fixture
def box(tmp_path: Path, data: Path) -> dict[str, Any]:
    # ingest never contacts the server: the port is only part of the ledger's account key.
    cfg = mailbox_xml(
        tmp_path / "support.xml",
        port=110,
        user="support",
        password="unused-pw",
        ignoredAttachments="*.vcf",
    )
    return {"data": data, "cfg": cfg, "tmp": tmp_path}


def test_every_corpus_message_ends_in_a_request_failure_or_ignored(box: dict[str, Any]) -> None:
    files = [CORPUS / f"{c}.eml" for c in CASES]
    code, out = ingest(box["data"], box["cfg"], *files)
    assert code in (0, 1), out
    rows = ledger(box["data"])
    assert len(rows) == len(files)
    for row in rows:
        assert row["outcome"] in ("created", "ignored: auto-reply") or row["outcome"].startswith(
            ("failed: ", "ignored: bounce ")
        ), dict(row)
    outcomes = [r["outcome"] for r in rows]
    assert outcomes.count("created") >= 30
    # Every message that is not an automatic answer became a request with its own text.
    by_case = {p.stem: p for p in files}
    created = {r["message_id"]: r for r in rows if r["outcome"] == "created"}
    reqs = {r["number"]: r for r in requests(box["data"])}
    for case, path in by_case.items():
        parsed = parse_message(path.read_bytes())
        found = created.get(parsed.message_id)
        if found is None:
            continue
        req = reqs[found["request_number"]]
        assert req["subject"] == (parsed.subject or "(no subject)"), case
        assert req["description"].startswith(parsed.body.rstrip("\n")[:200]), case
        stored = {a["name"]: attachment_bytes(box["data"], a["sha256"]) for a in req["attachments"]}
        for att in parsed.attachments:
            assert stored[att.name] == att.data, (case, att.name)
    # Ingesting the same files again is a no-op: the ledger keys them by content hash.
    ingest(box["data"], box["cfg"], *files)
    assert len(ledger(box["data"])) == len(files)


def test_html_only_mail_is_readable_text_with_sanitized_html(box: dict[str, Any]) -> None:
    assert ingest(box["data"], box["cfg"], CORPUS / "html-only.eml")[0] == 0
    [req] = requests(box["data"])
    assert "* Paper jam" in req["description"]
    assert "<script" not in req["html"] and "onerror" not in req["html"]


def test_hostile_charsets_never_execute_an_escape_codec(box: dict[str, Any]) -> None:
    files = [
        CORPUS / f"{c}.eml"
        for c in ("charset-utf-7", "charset-x-unknown", "undeclared-8bit-windows-1252")
    ]
    assert ingest(box["data"], box["cfg"], *files)[0] == 0
    descriptions = " ".join(r["description"] + r["subject"] for r in requests(box["data"]))
    assert "<script>" not in descriptions
    assert "+ADw-script+AD4-" in descriptions


def test_traversal_attachment_names_stay_inside_the_store(box: dict[str, Any]) -> None:
    before = {p for p in box["tmp"].rglob("*")}
    assert ingest(box["data"], box["cfg"], CORPUS / "attachment-traversal-names.eml")[0] == 0
    [req] = requests(box["data"])
    for att in req["attachments"]:
        assert "/" not in att["name"] and "\\" not in att["name"] and ".." not in att["name"]
        assert "\x00" not in att["name"]
    new = {p for p in box["tmp"].rglob("*")} - before
    for p in new:
        assert p.resolve().is_relative_to(box["data"].resolve()), p


def test_bounce_and_out_of_office_to_nothing_known_are_ignored(box: dict[str, Any]) -> None:
    files = [CORPUS / "dsn-bounce.eml", CORPUS / "auto-auto-submitted-auto-replied.eml"]
    assert ingest(box["data"], box["cfg"], *files)[0] == 0
    assert requests(box["data"]) == []
    # The DSN's permanent failure marks its recipient undeliverable (issue 20).
    assert [r["outcome"] for r in ledger(box["data"])] == [
        "ignored: bounce 5.1.1: 1 address(es) undeliverable",
        "ignored: auto-reply",
    ]


def test_reply_found_through_in_reply_to_without_subject_reference(box: dict[str, Any]) -> None:
    first = box["tmp"] / "first.eml"
    first.write_bytes(
        b"From: John Doe <john.doe@example.com>\r\nTo: support@example.com\r\n"
        b"Subject: Printer\r\nMessage-ID: <first-1@example.com>\r\n\r\nIt jams.\r\n"
    )
    answer = box["tmp"] / "answer.eml"
    answer.write_bytes(
        b"From: John Doe <john.doe@example.com>\r\nTo: support@example.com\r\n"
        b"Subject: Re: Printer\r\nMessage-ID: <second-1@example.com>\r\n"
        b"In-Reply-To: <first-1@example.com>\r\nReferences: <first-1@example.com>\r\n\r\n"
        b"Still jams.\r\n\r\nOn Friday John Doe wrote:\r\n> It jams.\r\n"
    )
    assert ingest(box["data"], box["cfg"], first, answer)[0] == 0
    [req] = requests(box["data"])
    [act] = req["activities"]
    assert act["body"].startswith("Still jams.")
    assert "earlier messages (quoted)" in act["body"] and "> It jams." in act["body"]


def test_oversized_attachment_is_left_out_with_a_note(box: dict[str, Any]) -> None:
    cfg = mailbox_xml(
        box["tmp"] / "limits.xml",
        port=110,
        user="support",
        password="unused-pw",
        maxAttachmentBytes="1000",
        maxAttachmentsBytes="1500",
    )
    raw = message(
        "Files",
        attachments=(
            ("small.txt", "text/plain", b"a" * 800),
            ("big.bin", "application/octet-stream", b"b" * 5000),
            ("second.txt", "text/plain", b"c" * 800),
            ("contact.vcf", "text/vcard", b"BEGIN:VCARD"),
        ),
    )
    f = box["tmp"] / "files.eml"
    f.write_bytes(raw)
    assert ingest(box["data"], cfg, f)[0] == 0
    [req] = requests(box["data"])
    assert [a["name"] for a in req["attachments"]] == ["small.txt", "contact.vcf"]
    assert "'big.bin' (5000 bytes) was left out" in req["description"]
    assert "maxAttachmentBytes (1000 bytes)" in req["description"]
    assert "'second.txt' (800 bytes) was left out" in req["description"]


def test_ignored_attachments_accept_globs(box: dict[str, Any]) -> None:
    f = box["tmp"] / "v.eml"
    f.write_bytes(
        message(
            "Card",
            attachments=(
                ("Jane.VCF", "text/vcard", b"x"),
                ("keep.pdf", "application/pdf", b"%PDF"),
            ),
        )
    )
    assert ingest(box["data"], box["cfg"], f)[0] == 0
    [req] = requests(box["data"])
    assert [a["name"] for a in req["attachments"]] == ["keep.pdf"]


def test_ingest_dry_run_writes_nothing(box: dict[str, Any]) -> None:
    code, out = cli(
        "ingest",
        CORPUS / "plain-utf8.eml",
        "--config",
        box["cfg"],
        "--data-dir",
        box["data"],
        "--login",
        LOGIN,
        "--password",
        LOGIN_PASSWORD,
        "--dry-run",
    )
    assert code == 0 and "new incident" in out
    assert ledger(box["data"]) == []
    code, out = cli("requests", "list", "--json", "--data-dir", box["data"])
    assert json.loads(out) == []


def test_joined_base64_blobs_are_stored_whole(box: dict[str, Any]) -> None:
    """Issue 12 item 2: two padded base64 blobs in one part of a 4 MB message were stored as
    the first one only (1,500,001 of 3,000,001 bytes), as "created", without a word."""
    first, second = os.urandom(1_500_001), os.urandom(1_500_000)
    raw = message("Scan", attachments=(("scan.bin", "application/octet-stream", b"placeholder"),))
    encoded = base64.encodebytes(b"placeholder").replace(b"\n", b"\r\n")
    joined = (base64.encodebytes(first) + base64.encodebytes(second)).replace(b"\n", b"\r\n")
    assert raw.count(encoded) == 1
    f = box["tmp"] / "scan.eml"
    f.write_bytes(raw.replace(encoded, joined))
    assert ingest(box["data"], box["cfg"], f)[0] == 0
    [req] = requests(box["data"])
    [stored] = req["attachments"]
    assert stored["name"] == "scan.bin"
    data = attachment_bytes(box["data"], stored["sha256"])
    assert len(data) == 3_000_001 and data == first + second


def test_a_to_of_1500_addresses_makes_a_request_that_says_what_was_left_out(
    box: dict[str, Any],
) -> None:
    """Issue 12 item 17d: a To with 1,500 addresses failed the message (max_addresses)."""
    to = ", ".join(f"Member {i} <member{i}@example.com>" for i in range(1500))
    f = box["tmp"] / "all.eml"
    f.write_bytes(message("Everyone").replace(b"To: support@example.com", b"To: " + to.encode()))
    assert ingest(box["data"], box["cfg"], f)[0] == 0
    [row] = ledger(box["data"])
    assert row["outcome"] == "created"
    [req] = requests(box["data"])
    assert req["description"].startswith("Hello, it does not work.")
    assert (
        "The To header lists up to 1500 addresses; only the first 1000 were read"
        in req["description"]
    )
