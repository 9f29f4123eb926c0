"""Issue 20: the realworld2 corpus (tests/corpus/realworld2, written by its generate.py)
replayed through ``ingest`` into a real store, each message held to its sidecar: subject,
sender, body text, attachment names and verdict (a request, an ignored bounce or automatic
answer, or a failure event); bounces also to their status, failed recipients and the
Message-ID of the message that bounced.

Also here, through ``ingest``: issue 20 items 6 (plain-text bounces are not incidents),
7 (an empty file or one that is not mail is a failure event) and 8 (a header continued on
unindented lines)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from support import data_dir, ingest, ledger, mailbox_xml, requests

from engine.parse import parse_message

CORPUS = Path(__file__).parent / "corpus" / "realworld2"
CASES = sorted(p.stem for p in CORPUS.glob("*.eml"))


def expected(case: str) -> dict[str, Any]:
    return dict(json.loads((CORPUS / f"{case}.json").read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every corpus message ingested once into one store: ledger rows by sha256, requests by
    number."""
    tmp = tmp_path_factory.mktemp("realworld2")
    data = data_dir(tmp)
    cfg = mailbox_xml(tmp / "support.xml", port=110, user="support", password="unused-pw")
    code, out = ingest(data, cfg, *(CORPUS / f"{c}.eml" for c in CASES))
    assert code in (0, 1), out
    rows = {r["sha256"]: dict(r) for r in ledger(data)}
    reqs = {r["number"]: r for r in requests(data)}
    return {"rows": rows, "requests": reqs}


def test_the_corpus_has_150_messages_of_every_class_the_issue_names() -> None:
    classes: dict[str, int] = {}
    for case in CASES:
        cls = expected(case)["cls"]
        classes[cls] = classes.get(cls, 0) + 1
    assert len(CASES) >= 150
    for cls in ("phone", "outlook-forward", "applemail-forward", "cid-image"):
        assert classes[cls] >= 10, cls
    for cls in ("dsn-postfix", "dsn-exchange", "dsn-exim", "dsn-qmail", "dsn-gmail"):
        assert classes[cls] >= 8, cls
    for cls in ("japanese", "chinese", "russian", "hebrew"):
        assert classes[cls] >= 10, cls


@pytest.mark.parametrize("case", CASES)
def test_corpus_message_ends_as_its_sidecar_says(case: str, replayed: dict[str, Any]) -> None:
    want = expected(case)
    raw = (CORPUS / f"{case}.eml").read_bytes()
    row = replayed["rows"][hashlib.sha256(raw).hexdigest()]
    if want["verdict"] == "failure":
        assert row["outcome"].startswith("failed: "), row
        failure = replayed["requests"][row["request_number"]]
        assert failure["kind"] == "message-failure"
        return
    msg = parse_message(raw)
    assert msg.subject == want["subject"]
    assert msg.from_addr.lower() == want["sender"].lower()
    at = 0
    for text in want["body_contains"]:
        found = msg.body.find(text, at)
        assert found >= 0, (text, msg.body)
        at = found + len(text)
    assert [a.name for a in msg.attachments] == want["attachments"]
    assert all(a.data for a in msg.attachments)
    if want["verdict"] == "bounce":
        assert msg.is_bounce, msg.auto_reason
        assert msg.bounce_status == want["bounce_status"]
        assert list(msg.bounce_recipients) == want["bounce_recipients"]
        assert msg.bounce_message_id == want["bounce_message_id"]
        assert row["outcome"] != "created" and not row["outcome"].startswith("failed"), row
        return
    assert not msg.is_bounce and not msg.auto_submitted, msg.auto_reason
    assert row["outcome"] == "created", row
    req = replayed["requests"][row["request_number"]]
    assert req["subject"] == want["subject"]
    for text in want["body_contains"]:
        assert text in req["description"], text
    assert [a["name"] for a in req["attachments"]] == want["attachments"]
