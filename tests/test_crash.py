"""Crash consistency: SIGKILL the engine anywhere, restart it, and every message is in the store
exactly once; and the store refuses to run without the durability it relies on.

The short CI version of ``python -m tools.crash`` lives here (select it with ``-k crash`` or by
this file); the long runs and their figures are in RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest
import support
from support import Delivered, check_exactly_once, import_directory, mailbox_xml, message, once

from engine.errors import StoreError
from engine.store import open_store
from engine.store.sqlite import SqliteTransaction
from tools import crash
from tools.crashpoints import POINTS
from tools.dovecot import Dovecot
from tools.fakepop3 import FakePOP3Server, Script


@pytest.fixture(scope="module")
def fork_launcher() -> Iterator[crash.Launcher]:
    # A real exec per run, as a cron start is. (The forkserver launcher of the long runs
    # now and then could not read a child's exit status, multiprocessing then reporting 255:
    # it now reads the status the child wrote, see the tests at the end.)
    launcher = crash.ExecLauncher()
    yield launcher
    launcher.close()


def _assert_clean(figures: crash.Figures, iterations: int) -> None:
    assert figures.iterations == iterations
    assert figures.failed == [], figures.as_dict()
    assert figures.losses == 0 and figures.duplicates == 0
    assert figures.messages >= 6 * iterations


def test_crash_harness_uses_the_tests_login() -> None:
    assert (crash.LOGIN, crash.LOGIN_PASSWORD) == (support.LOGIN, support.LOGIN_PASSWORD)


@pytest.mark.dovecot
def test_crash_random_kills_and_crash_points_lose_and_duplicate_nothing(
    dovecot: Dovecot, fork_launcher: crash.Launcher
) -> None:
    """25 iterations, 2 to 3 mailboxes each, 1 to 3 SIGKILLs each then a run to the end.

    The first iterations kill at each dangerous point for sure (N = 1), and twice at random;
    the rest draw their kills at random. Each run is a process forked from one that has
    imported the engine; ``test_crash_points_with_the_real_command_line`` covers the exec path.
    """
    base = Path(tempfile.mkdtemp(prefix="mailintegration-crash-ci-"))
    forced = [[f"{point}:1"] for point in POINTS] + [["random", "random", "random"]]
    try:
        figures = crash.run_iterations(
            dovecot, base, 25, launcher=fork_launcher, seed=2026, workers=2, forced_modes=forced
        )
        _assert_clean(figures, 25)
        for point in POINTS:
            assert figures.kills[point] >= 1, (point, figures.as_dict())
        assert figures.kills["random"] >= 3
        # Most iterations kill at least once; not all: a random delay may outlast a short run,
        # and a drawn N may pass the run's last file or message (24 of 25 seen in CI).
        assert sum(figures.kills.values()) >= 20
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.dovecot
def test_crash_points_with_the_real_command_line(dovecot: Dovecot) -> None:
    """``python -m tools.crashpoints POINT 1 -- once …`` then ``python -m engine once …``."""
    base = Path(tempfile.mkdtemp(prefix="mailintegration-crash-exec-"))
    forced = [[f"{point}:1"] for point in POINTS]
    try:
        figures = crash.run_iterations(
            dovecot,
            base,
            len(forced),
            launcher=crash.ExecLauncher(),
            seed=7,
            workers=2,
            forced_modes=forced,
        )
        _assert_clean(figures, len(forced))
        assert dict(figures.kills) == dict.fromkeys(POINTS, 1)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.dovecot
@pytest.mark.usefixtures("require_imap")
@pytest.mark.parametrize("after", ["delete", "move", "keep"])
def test_crash_over_imap_in_each_disposal_mode_loses_and_duplicates_nothing(
    dovecot: Dovecot, fork_launcher: crash.Launcher, after: str
) -> None:
    """Each kill point once, and random kills, over IMAP; the server state each disposal
    mode promises is checked too (crash._check_server)."""
    base = Path(tempfile.mkdtemp(prefix=f"mailintegration-crash-imap-{after}-"))
    forced = [[f"{point}:1"] for point in POINTS] + [["random", "random"]]
    try:
        figures = crash.run_iterations(
            dovecot,
            base,
            len(forced),
            launcher=fork_launcher,
            seed=15,
            workers=2,
            forced_modes=forced,
            target=crash.Target("imap", after),
        )
        _assert_clean(figures, len(forced))
        for point in POINTS:
            assert figures.kills[point] >= 1, (point, figures.as_dict())
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.dovecot
@pytest.mark.usefixtures("require_imap")
def test_crash_verification_of_imap_server_states(dovecot: Dovecot, tmp_path: Path) -> None:
    """The server checks are not vacuous: mail left, unmarked or not moved is reported."""
    user = f"verify-{uuid.uuid4().hex[:8]}"
    dovecot.add_user(user, "verify-pw")
    raw = message("Left behind")
    dovecot.deliver(user, raw)
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    d = [Delivered.of(raw, user)]
    kept = check_exactly_once(data, d, dovecot, disposal="keep").problems
    assert any("without $MailIntegrationProcessed" in p for p in kept)
    moved = check_exactly_once(data, d, dovecot, disposal="move", move_folder="Done").problems
    assert any("left on the server" in p for p in moved)
    assert any("Done holds 0 of 1" in p for p in moved)


@pytest.mark.dovecot
def test_crash_verification_notices_loss_duplicates_and_stray_files(
    dovecot: Dovecot, fork_launcher: crash.Launcher, tmp_path: Path
) -> None:
    """The harness is not vacuous: damage done to a good store is reported."""
    template = crash.make_template(tmp_path / "template" / "data")
    rng = random.Random(5)
    result = crash.iteration(
        dovecot, tmp_path, template, 0, rng, fork_launcher, crash._BusyTime(0.5), modes=[]
    )
    assert result.problems == [] and result.runs == [("final", 0, 0)]
    data = tmp_path / "it-00000" / "data"
    assert not data.exists()  # a clean iteration leaves nothing behind

    rng = random.Random(5)
    result = crash.iteration(
        dovecot,
        tmp_path,
        template,
        1,
        rng,
        fork_launcher,
        crash._BusyTime(0.5),
        modes=[],
        keep=True,
    )
    assert result.problems == []
    data = tmp_path / "it-00001" / "data"
    db = sqlite3.connect(data / "mailintegration.sqlite3")
    mids = [r[0] for r in db.execute("SELECT message_id FROM ledger ORDER BY id")]
    nobody = f"nobody-{uuid.uuid4().hex[:8]}"
    dovecot.add_user(nobody, "nobody-pw")
    delivered = [
        Delivered(nobody, mid, sha, frozenset())
        for mid, sha in db.execute("SELECT message_id, sha256 FROM ledger ORDER BY id")
    ]
    with db:
        db.execute("DELETE FROM ledger WHERE message_id = ?", (mids[0],))
        db.execute(
            "INSERT INTO ledger(account, uidl, mailbox, message_id, sha256, outcome, "
            "processed_at) SELECT account, uidl || 'x', mailbox, message_id, sha256, outcome, "
            "processed_at FROM ledger WHERE message_id = ?",
            (mids[1],),
        )
        # A request for a message nobody delivered, and an outage nobody expected.
        for kind, mid in (("mail", "stranger@example.com"), ("outage", None)):
            db.execute(
                "INSERT INTO requests(team_id, type, status, kind, subject, description, "
                "message_id, created_at, created_by) "
                "VALUES (1, 'incident', 'new', ?, 'x', 'x', ?, '2026-12-04', 'test')",
                (kind, mid),
            )
    db.close()
    orphan = b"nobody cites me"
    digest = hashlib.sha256(orphan).hexdigest()
    (data / "attachments" / digest[:2]).mkdir(exist_ok=True)
    (data / "attachments" / digest[:2] / digest).write_bytes(orphan)
    (data / "attachments" / digest[:2] / ".tmp-abc").write_bytes(b"half")
    check = check_exactly_once(data, delivered, dovecot)
    assert check.losses == 1 and check.duplicates == 1
    text = "\n".join(check.problems)
    assert f"lost {mids[0]}" in text
    assert f"duplicated {mids[1]}" in text
    assert "orphan attachment files" in text
    assert "stray file in attachments/: " in text
    assert "requests or activities never delivered: ['stranger@example.com']" in text
    assert "unexpected events: " in text


# -- durability settings -------------------------------------------------------------------


def _rewrite_pragma(monkeypatch: pytest.MonkeyPatch, old: str, new: str) -> None:
    real = aiosqlite.Connection.execute

    def execute(self: aiosqlite.Connection, sql: str, *args: Any) -> Any:
        return real(self, sql.replace(old, new), *args)

    monkeypatch.setattr(aiosqlite.Connection, "execute", execute)


@pytest.mark.parametrize("level", ["NORMAL", "OFF"])
def test_store_refuses_synchronous_below_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    _rewrite_pragma(monkeypatch, "PRAGMA synchronous = FULL", f"PRAGMA synchronous = {level}")
    with pytest.raises(StoreError, match="synchronous=FULL"):
        anyio.run(open_store, tmp_path / "data")


def test_store_refuses_to_run_without_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rewrite_pragma(monkeypatch, "PRAGMA journal_mode = WAL", "PRAGMA journal_mode = DELETE")
    with pytest.raises(StoreError, match="WAL"):
        anyio.run(open_store, tmp_path / "data")


def test_store_accepts_synchronous_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rewrite_pragma(monkeypatch, "PRAGMA synchronous = FULL", "PRAGMA synchronous = EXTRA")

    async def go() -> int:
        store = await open_store(tmp_path / "data")
        try:
            async with store.db.execute("PRAGMA synchronous") as cur:
                row = await cur.fetchone()
            assert row is not None
            return int(row[0])
        finally:
            await store.close()

    assert anyio.run(go) == 3


def test_every_engine_connection_is_wal_and_synchronous_full(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked on the engine's own connections, while it writes: synchronous = 2 (FULL), WAL."""
    opened: list[aiosqlite.Connection] = []
    seen: dict[int, tuple[int, str]] = {}
    real_connect = aiosqlite.connect
    real_commit = SqliteTransaction.commit

    def connect(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
        conn = real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    async def commit(self: SqliteTransaction) -> None:
        async with self.db.execute("PRAGMA synchronous") as cur:
            sync = await cur.fetchone()
        async with self.db.execute("PRAGMA journal_mode") as cur:
            mode = await cur.fetchone()
        assert sync is not None and mode is not None
        seen[id(self.db)] = (int(sync[0]), str(mode[0]).lower())
        await real_commit(self)

    monkeypatch.setattr(aiosqlite, "connect", connect)
    monkeypatch.setattr(SqliteTransaction, "commit", commit)
    script = Script(messages=[message("Durable", attachments=(("a.bin", "x/y", b"1"),))])
    with FakePOP3Server(script) as fake:
        cfg = mailbox_xml(tmp_path / "m.xml", port=fake.port, user="u", password="p")
        assert once(data, cfg) == 0
        assert fake.deleted == [1]
    assert opened, "the engine opened no connection through aiosqlite.connect"
    assert {id(c) for c in opened} == set(seen)
    assert set(seen.values()) == {(2, "wal")}


def test_a_status_the_forkserver_lost_is_read_from_the_one_the_child_wrote(tmp_path: Path) -> None:
    """multiprocessing's forkserver reports 255 when it cannot read a child's exit status
    back (once in the 1,000-iteration IMAP run, on a final run whose log showed it had
    finished): the status fork_child wrote beside its log is the engine's. Without one, the
    child never reached its end: a signal killed it (once in a POP3 run, at a kill point)."""

    class Lost:
        pid, exitcode = 1, crash.FORKSERVER_LOST_STATUS

        def join(self, timeout: float) -> None:
            pass

    log = tmp_path / "final.log"
    handle = crash._ProcessHandle(Lost(), log)  # type: ignore[arg-type]
    assert handle.wait(1) == -signal.SIGKILL  # no status written: killed before its end
    log.with_name("final.log.status").write_text("0")
    assert handle.wait(1) == 0


def test_a_forked_run_writes_its_status_beside_its_log(tmp_path: Path) -> None:
    launcher = crash.ForkLauncher()
    log = tmp_path / "run.log"
    handle = launcher.start(["--version-of-nothing"], "none", 0, log)
    code = handle.wait(60)
    assert code == 2  # argparse's usage error, the engine's own status
    assert log.with_name("run.log.status").read_text() == "2"
    assert "usage" in log.read_text()
