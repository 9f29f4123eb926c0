"""Cancellation, in-process: a cancel scope around ``Engine.once`` may fall anywhere (mid-RETR,
mid-transaction, between COMMIT and DELE). Nothing the store has not committed is ever deleted,
and a rerun completes with every message exactly once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import anyio
import pytest
from support import (
    LOGIN,
    assert_exactly_once,
    ledger,
    mailbox_xml,
    message,
    requests,
)

from engine.model import Attachment
from engine.session import make_envelope
from engine.store import open_store
from engine.store.sqlite import SqliteTransaction
from engine.supervisor import Engine, EngineSettings, MailboxOutcome, MailboxSource
from tools.fakepop3 import FakePOP3Server, Script


def messages(n: int = 3) -> list[bytes]:
    return [
        message(
            f"Cancel case {i}",
            message_id=f"<cancel-{i}@example.com>",
            attachments=(("notes.bin", "application/octet-stream", b"notes %d" % i),),
        )
        for i in range(n)
    ]


async def run_once(
    data: Path,
    cfg: Path,
    *,
    cancel_when: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[MailboxOutcome], bool]:
    """One ``Engine.once`` over ``cfg``; cancelled once ``cancel_when`` returns. Returns the
    outcomes and whether the cancel scope was cancelled."""
    store = await open_store(data, sweep=True)
    engine = Engine(store, EngineSettings(data_dir=data, created_by=LOGIN))
    outcomes: list[MailboxOutcome] = []
    try:
        async with anyio.create_task_group() as tg:

            async def work() -> None:
                outcomes.extend(await engine.once([MailboxSource(cfg.stem, cfg)]))
                tg.cancel_scope.cancel()

            async def canceller() -> None:
                assert cancel_when is not None
                with anyio.fail_after(30):
                    await cancel_when()
                tg.cancel_scope.cancel()

            tg.start_soon(work)
            if cancel_when is not None:
                tg.start_soon(canceller)
        cancelled = not outcomes
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
    return outcomes, cancelled


async def until(check: Callable[[], bool], pause: float = 0.0) -> None:
    """Poll ``check`` (at most 30 s), then wait ``pause`` more seconds."""
    for _ in range(1500):
        if check():
            break
        await anyio.sleep(0.02)
    else:
        raise AssertionError("the moment to cancel never came")
    await anyio.sleep(pause)


def committed_ids(data: Path) -> set[int]:
    """The fake server's message ids whose ledger row is committed (UIDL ``uid-<id>``)."""
    return {int(r["uidl"].removeprefix("uid-")) for r in ledger(data)}


def rerun_completes(data: Path, cfg: Path, fake: FakePOP3Server, raws: list[bytes]) -> None:
    outcomes, cancelled = anyio.run(lambda: run_once(data, cfg))
    assert not cancelled
    [outcome] = outcomes
    assert outcome.error is None
    fake.wait_idle()
    assert sorted(fake.deleted) == list(range(1, len(raws) + 1))
    assert_exactly_once(data, raws)


def test_cancel_mid_retr_deletes_nothing_and_the_rerun_completes(
    tmp_path: Path, data: Path
) -> None:
    raws = messages()
    script = Script(messages=raws, stall_on_retr=2, stall_timeout=60, fault_sessions=1)
    with FakePOP3Server(script) as fake:
        # A long timeout: it is the cancellation that must end the stalled RETR, not the socket.
        cfg = mailbox_xml(tmp_path / "box.xml", port=fake.port, user="u", password="p", timeout=60)

        async def mid_retr() -> None:
            await until(lambda: "RETR 2" in fake.commands, pause=0.3)

        started = time.monotonic()
        _, cancelled = anyio.run(lambda: run_once(data, cfg, cancel_when=mid_retr))
        assert cancelled
        assert time.monotonic() - started < 20
        assert fake.wait_idle(10)
        # Nothing deleted that is not committed; in fact nothing at all (no QUIT was sent).
        assert set(fake.deleted) <= committed_ids(data)
        assert fake.deleted == []
        assert 2 not in committed_ids(data)
        rerun_completes(data, cfg, fake, raws)


def test_cancel_in_the_writer_mid_transaction_rolls_back_and_deletes_nothing(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raws = messages()
    state = {"inside": False}
    real = SqliteTransaction.add_attachments

    async def slow(
        self: SqliteTransaction, number: int, activity_id: int | None, atts: Iterable[Attachment]
    ) -> None:
        state["inside"] = True
        await anyio.sleep(60)  # the writer hangs inside its transaction
        await real(self, number, activity_id, atts)

    with FakePOP3Server(Script(messages=raws)) as fake:
        cfg = mailbox_xml(tmp_path / "box.xml", port=fake.port, user="u", password="p")

        async def mid_transaction() -> None:
            await until(lambda: state["inside"], pause=0.2)

        with monkeypatch.context() as m:
            m.setattr(SqliteTransaction, "add_attachments", slow)
            _, cancelled = anyio.run(lambda: run_once(data, cfg, cancel_when=mid_transaction))
        assert cancelled
        assert fake.wait_idle(10)
        assert ledger(data) == []  # the transaction was rolled back
        assert requests(data) == []
        assert set(fake.deleted) <= committed_ids(data)
        assert fake.deleted == []
        rerun_completes(data, cfg, fake, raws)


def test_cancel_between_commit_and_dele_loses_and_duplicates_nothing(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raws = messages()
    state = {"committed": 0}
    real_commit = SqliteTransaction.commit
    real_add = SqliteTransaction.add_attachments
    carries_mail = {"now": False}

    async def add(
        self: SqliteTransaction, number: int, activity_id: int | None, atts: Iterable[Attachment]
    ) -> None:
        carries_mail["now"] = True
        await real_add(self, number, activity_id, atts)

    async def commit(self: SqliteTransaction) -> None:
        await real_commit(self)
        if carries_mail["now"]:
            state["committed"] += 1
            await anyio.sleep(60)  # committed; the answer to the fetcher is not given yet

    with FakePOP3Server(Script(messages=raws)) as fake:
        cfg = mailbox_xml(tmp_path / "box.xml", port=fake.port, user="u", password="p")

        async def after_commit() -> None:
            await until(lambda: state["committed"] > 0, pause=0.2)

        with monkeypatch.context() as m:
            m.setattr(SqliteTransaction, "commit", commit)
            m.setattr(SqliteTransaction, "add_attachments", add)
            _, cancelled = anyio.run(lambda: run_once(data, cfg, cancel_when=after_commit))
        assert cancelled
        assert fake.wait_idle(10)
        committed = committed_ids(data)
        assert committed  # the batch is durable ...
        assert set(fake.deleted) <= committed
        assert fake.deleted == []  # ... but its answer never came: nothing was deleted
        rerun_completes(data, cfg, fake, raws)


def test_cancel_while_connecting_never_logs_in_afterwards(tmp_path: Path, data: Path) -> None:
    """A cancelled session whose abandoned thread is still waiting for the greeting must not
    go on to log in (and hold a session nobody closes) once the greeting arrives."""
    password = "Canary-connecting-4b1e"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)
    accepted, release, finished = threading.Event(), threading.Event(), threading.Event()
    seen = bytearray()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            accepted.set()
            release.wait(30)
            conn.sendall(b"+OK late greeting\r\n")
            conn.settimeout(5)
            try:
                while chunk := conn.recv(4096):
                    seen.extend(chunk)
            except OSError:
                pass
        finished.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        port = listener.getsockname()[1]
        cfg = mailbox_xml(tmp_path / "box.xml", port=port, user="u", password=password, timeout=60)

        async def go() -> bool:
            async def connecting() -> None:
                await until(accepted.is_set, pause=0.2)

            _, cancelled = await run_once(data, cfg, cancel_when=connecting)
            # The worker thread was abandoned, still in the greeting: let it go on now.
            release.set()
            await until(finished.is_set)
            return cancelled

        started = time.monotonic()
        assert anyio.run(go)
        assert time.monotonic() - started < 20
    finally:
        release.set()
        server.join(10)
        listener.close()
    assert bytes(seen) == b""  # no USER, no PASS: it closed without a word
    assert ledger(data) == []


def test_cancel_scope_outside_once_is_reported_as_cancelled(tmp_path: Path, data: Path) -> None:
    """The helper really cancels: with nothing to wait for, the run completes instead."""
    raws = messages(1)
    with FakePOP3Server(Script(messages=raws)) as fake:
        cfg = mailbox_xml(tmp_path / "box.xml", port=fake.port, user="u", password="p")
        outcomes, cancelled = anyio.run(lambda: run_once(data, cfg))
        assert not cancelled and [o.error for o in outcomes] == [None]
        fake.wait_idle()
        assert fake.deleted == [1]
    assert_exactly_once(data, raws)


def test_a_cancelled_writer_answers_not_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetcher that outlives a cancelled writer must never read its answer as durable."""
    from support import DIRECTORY

    from engine.config import load_mailbox
    from engine.items import Envelope
    from engine.writer import Writer

    cfg = load_mailbox(mailbox_xml(tmp_path / "w.xml", port=110, user="u", password="p-secret"))

    async def go() -> list[Envelope]:
        store = await open_store(tmp_path / "data")
        async with store.transaction() as tx:
            await tx.import_directory(DIRECTORY)
        writer = Writer(store, created_by="system")

        async def hang(*args: object, **kwargs: object) -> None:
            await anyio.sleep(3600)

        monkeypatch.setattr(SqliteTransaction, "add_attachments", hang)
        envelopes = [
            make_envelope(cfg, f"u{i}", message(f"m{i}", attachments=(("a", "text/plain", b"a"),)))
            for i in range(3)
        ]
        with anyio.move_on_after(0.5):
            await writer.apply(list(envelopes))
        assert (await store.counts())["ledger"] == 0
        await store.close()
        return envelopes

    for env in anyio.run(go):
        assert env.done.is_set()
        assert env.failure is not None
