"""The shared vocabulary: the typed outcome keeps the ledger's texts byte for byte."""

from __future__ import annotations

import pytest

from engine.items import Kind, Outcome

# Every ledger text the engine has ever written, as stored.
LEDGER_TEXTS = [
    "created",
    "activity",
    "duplicate",
    "dry-run",
    "ignored: auto-reply",
    "refused: replied",
    "refused: no reply (rate limit)",
    "refused: no reply (our own loop header or Message-ID)",
    "refused: no reply (event mailboxes never reply)",
    "refused: no reply (the address x: y is not valid)",
    "failed: processor-error",
    "failed: unknown-fallback-user",
    "kept: line-too-long",
    "kept: too-large",
]


@pytest.mark.parametrize("text", LEDGER_TEXTS)
def test_a_ledger_text_reads_back_as_the_same_text(text: str) -> None:
    outcome = Outcome.from_ledger(text, 7)
    assert str(outcome) == text
    assert outcome.request_number == 7
    assert outcome.kind.value == text.split(":")[0]


def test_an_unknown_ledger_text_is_refused() -> None:
    with pytest.raises(ValueError):
        Outcome.from_ledger("exploded: somehow")


def test_what_a_session_may_do_after_each_kind() -> None:
    """Only a message left on the server (kept) or a dry run stays; failures are counted
    once, when their failure event is made, not when a kept message is met again."""
    deletes = {kind: Outcome(kind, "x").deletes for kind in Kind}
    assert [k for k, d in deletes.items() if not d] == [Kind.KEPT, Kind.DRY_RUN, Kind.SKIPPED]
    failed = {kind: Outcome(kind, "x").failed for kind in Kind}
    assert [k for k, f in failed.items() if f] == [Kind.FAILED, Kind.KEPT]
    again = Outcome.kept_again(12)
    assert again.again and not again.failed and not again.deletes
    assert again.request_number == 12
    assert not Outcome(Kind.KEPT, "too-large").again
