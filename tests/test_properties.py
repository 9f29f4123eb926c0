"""Property: whatever bytes arrive, processing ends in a request, an activity, a refusal, an
ignored auto-reply or a failure event, committed with its ledger row; never an exception."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import DIRECTORY, LOGIN, mailbox_xml

from engine.config import load_mailbox
from engine.fetcher import make_envelope
from engine.store import open_store
from engine.writer import Envelope, Writer

HEADERS = st.sampled_from(
    [
        "Subject",
        "From",
        "To",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Auto-Submitted",
        "Date",
        "Content-Disposition",
    ]
)
VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "multipart/mixed; boundary=b",
            "text/plain; charset=utf-7",
            "text/html; charset=x-unknown",
            "=?utf-8?q?broken",
            "RE: [Incident] #1 printer",
            "base64",
            "quoted-printable",
            "attachment; filename*=UTF-8''..%2F..%2Fetc%2Fpasswd",
            "<a@b>",
            "auto-replied",
            "message/rfc822",
            "application/ms-tnef",
        ]
    ),
)
BODIES = st.one_of(st.binary(max_size=2000), st.text(max_size=2000).map(str.encode))


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(HEADERS, VALUES), max_size=8))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers).encode("utf-8", "surrogateescape")
    parts = draw(st.lists(BODIES, max_size=4))
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\n" + p + b"\r\n" for p in parts)
    return head + b"\r\n" + body + draw(st.binary(max_size=200))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raws=st.lists(raw_messages(), min_size=1, max_size=5))
def test_any_message_ends_in_a_committed_outcome(tmp_path: Path, raws: list[bytes]) -> None:
    cfg_path = tmp_path / "p.xml"
    if not cfg_path.exists():
        mailbox_xml(cfg_path, port=110, user="u", password="p-secret")
    cfg = load_mailbox(cfg_path)

    async def go() -> list[Envelope]:
        store = await open_store(tmp_path / f"data-{time.monotonic_ns()}")
        try:
            await store.begin()
            await store.import_directory(DIRECTORY)
            await store.commit()
            writer = Writer(store, created_by=LOGIN)
            envelopes = [make_envelope(cfg, f"u{i}", raw) for i, raw in enumerate(raws)]
            with anyio.fail_after(30):
                await writer.apply(list(envelopes))
            assert await store.counts() and (await store.counts())["ledger"] == len(raws)
            return envelopes
        finally:
            await store.close()

    for env in anyio.run(go):
        assert env.failure is None
        assert env.outcome is not None
        assert env.outcome in (
            "created",
            "activity",
            "ignored: auto-reply",
        ) or env.outcome.startswith(("failed: ", "refused: ")), env.outcome
