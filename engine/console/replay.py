"""Replay from the console: a failure event's message goes through the ``ingest`` path,
as ``mailintegration ingest message.eml --config <its mailbox>.xml`` would take it.

In the daemon (``run --console``) the daemon's engine ingests it, through its one running
writer (:meth:`engine.supervisor.Engine.ingest` joins the writer's queue). The ``console``
command has no engine: it takes the data directory's lock for the replay, opens the store
for writing, ingests and lets go; while a daemon holds the lock, it says to replay from the
daemon's console instead. The failure event is left as it is: nothing is wiped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread

from engine.console.app import ReplayResult
from engine.errors import EngineError
from engine.items import Kind
from engine.logs import scrub
from engine.store import DataDirLock, Store
from engine.supervisor import Engine, EngineSettings, MailboxSource, discover


def find_mailbox(config_dir: Path, name: str, *, follow_symlinks: bool = False) -> MailboxSource:
    """The mailbox file of that name in the config folder (as the daemon discovers it)."""
    for src in discover(config_dir, follow_symlinks=follow_symlinks):
        if src.name == name:
            return src
    raise EngineError(f"no mailbox file {name}.xml in {config_dir}: it was removed or renamed")


def _write_private(folder: str, raw: bytes) -> Path:
    path = Path(folder) / "message.eml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    return path


async def replay_in(
    engine: Engine, config_dir: Path, mailbox: str, raw: bytes, retry: int = 0
) -> ReplayResult:
    """Ingest ``raw`` as if fetched from ``mailbox``; what happened, in words."""
    follow = engine.settings.follow_symlinks
    try:
        src = await anyio.to_thread.run_sync(
            lambda: find_mailbox(config_dir, mailbox, follow_symlinks=follow)
        )
        # A file of the data directory's own (a private temporary folder): ingest reads
        # files, and the message must not be readable by others on its way.
        with tempfile.TemporaryDirectory(dir=engine.settings.data_dir, prefix="replay-") as tmp:
            path = await anyio.to_thread.run_sync(_write_private, tmp, raw)
            results = await engine.ingest(src, [path], retry=retry)
    except EngineError as exc:
        return ReplayResult(False, scrub(f"not replayed: {exc}"))
    env = results[0][1]
    if env.failure is not None or env.outcome is None:
        return ReplayResult(False, scrub(f"not committed: {env.failure}"))
    outcome = env.outcome
    ok = outcome.kind in (Kind.CREATED, Kind.ACTIVITY, Kind.IGNORED, Kind.REFUSED)
    text = str(outcome) + (f" ({outcome.note})" if outcome.note else "")
    return ReplayResult(ok, scrub(text), outcome.request_number)


def standalone(
    data_dir: Path,
    config_dir: Path,
    open_store: Callable[[], Awaitable[Store]],
    *,
    lock: bool,
) -> Callable[[str, bytes, str, int], Awaitable[ReplayResult]]:
    """The ``console`` command's replay: an engine of its own for each replay, under the
    data directory's lock (SQLite: ``lock``), recording the signed-in login as creator."""

    async def replay(mailbox: str, raw: bytes, login: str, retry: int) -> ReplayResult:
        held = DataDirLock(data_dir) if lock else None
        if held is not None:
            try:
                held.acquire()
            except EngineError as exc:
                return ReplayResult(
                    False,
                    f"not replayed: {exc}. While the daemon runs, replay from its console "
                    "(run --console).",
                )
        try:
            store = await open_store()
            try:
                settings = EngineSettings(
                    data_dir=data_dir, created_by=login, metrics=False, parse_processes=0
                )
                engine = Engine(store, settings)
                return await replay_in(engine, config_dir, mailbox, raw, retry)
            finally:
                with anyio.CancelScope(shield=True):
                    await store.close()
        finally:
            if held is not None:
                held.release()

    return replay
