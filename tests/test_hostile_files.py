"""Issue 12: the files the engine meets are read no further than they should be.

The config folder may hold links to anything and files that are no mailbox at all: they are
never read past a bounded prefix, never attached to an event, and each is reported as a config
outage. Whatever the umask, what the engine writes is for its owner alone. A corrupt database
or a read-only data directory gives one clear line and exit status 2, never a traceback, and
the read-only commands still work on a read-only directory. A store error mid-run is reported
per mailbox, never as "no mailbox".

Every engine run here is a real ``python -m engine`` process, against the scripted POP3 server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    free_port,
    import_directory,
    mailbox_xml,
    message,
    requests,
)

from engine.store.sqlite import BLOB_MAX
from tools.fakepop3 import FakePOP3Server, Script

ROOT = Path(__file__).resolve().parent.parent
LARGE_PDF = b"%PDF-1.7\n" + bytes(BLOB_MAX)  # stored as a file, not a row


@dataclass
class Run:
    code: int
    out: str
    err: str
    peak_kib: int  # the engine process's peak RSS (ru_maxrss), from the kernel


def engine(
    *args: str | Path,
    env: dict[str, str] | None = None,
    umask: int | None = None,
    prefix: Sequence[str] = (),
    module: Sequence[str] = ("engine",),
    timeout: float = 90,
) -> Run:
    """Run the command line in a process of its own and wait for it, bounded by ``timeout``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", *module, *map(str, args)],
            cwd=ROOT,
            env={
                **os.environ,
                "MAILINTEGRATION_LOGIN": LOGIN,
                "MAILINTEGRATION_PASSWORD": LOGIN_PASSWORD,
                **(env or {}),
            },
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            preexec_fn=None if umask is None else (lambda: os.umask(umask)),
        )
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"the engine ran over {timeout} s: {args}")
            time.sleep(0.02)
        else:  # pragma: no cover - the deadline ends the loop first
            raise AssertionError("unreachable")
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            int(usage.ru_maxrss),
        )


def everything_under(*roots: Path) -> bytes:
    blob = b""
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                blob += p.read_bytes()
    return blob


# ------------------------------------------------------------------ the config folder


def test_links_and_foreign_files_in_the_config_folder_are_never_read(
    tmp_path: Path, data: Path
) -> None:
    """A link to a secret outside the folder, a link to /proc/self/environ, a symlinked team
    folder, an SSH key saved as key.xml and a 128 MiB file: each is a config outage with no
    attachment, and no byte of any of them reaches the store, the log or the terminal. A
    link that stays inside the folder is read only with --follow-symlinks."""
    canaries = {
        "outside": "Canary-Outside-3f9a1c",
        "environ": "Canary-Environ-77b2e0",
        "team": "Canary-TeamLink-0c4d51",
        "key": "Canary-SshKey-a8e3f6",
        "huge": "Canary-Huge-5d1b92",
    }
    outside = tmp_path / "outside"
    (outside / "team").mkdir(parents=True)
    (outside / "secret.xml").write_text(
        f"<mailIntegration><note>{canaries['outside']}</note></mailIntegration>\n"
    )
    (outside / "team" / "x.xml").write_text(
        f"<mailIntegration><!-- {canaries['team']} --></mailIntegration>\n"
    )
    conf = tmp_path / "mailboxes.d"
    (conf / ".shared").mkdir(parents=True)
    (conf / "leak.xml").symlink_to(outside / "secret.xml")
    (conf / "environ.xml").symlink_to("/proc/self/environ")
    (conf / "teamlink").symlink_to(outside / "team")
    (conf / "key.xml").write_text(
        f"-----BEGIN OPENSSH PRIVATE KEY-----\n{canaries['key']}\n"
        "-----END OPENSSH PRIVATE KEY-----\n"
    )
    huge = conf / "huge.xml"
    with huge.open("wb") as fh:  # sparse: 128 MiB to read, none on the disk
        fh.write(f"<mailIntegration><!-- {canaries['huge']} -->".encode())
        fh.truncate(128 * 1024 * 1024)
    logs = tmp_path / "logs"
    logs.mkdir()
    log_file = logs / "engine.log"

    ok_server = FakePOP3Server(Script(messages=[message("Regular file")]))
    inner_server = FakePOP3Server(Script(messages=[message("Through a link inside")]))
    runs: list[Run] = []
    with ok_server, inner_server:
        mailbox_xml(conf / "ok.xml", port=ok_server.port, user="u", password="pw-ok")
        mailbox_xml(conf / ".shared" / "inner.xml", port=inner_server.port, user="u", password="p")
        (conf / "inner.xml").symlink_to(".shared/inner.xml")
        common = ("--config-dir", conf, "--data-dir", data, "--log-file", log_file)
        env = {"MI_TEST_SECRET": canaries["environ"]}

        runs.append(engine("once", *common, env=env))
        assert runs[-1].code == 1, runs[-1].err
        outages = {r["mailbox"]: r for r in requests(data) if r["kind"] == "outage"}
        assert set(outages) == {"leak", "environ", "teamlink/", "key", "huge", "inner"}
        for name, outage in outages.items():
            assert outage["cause"] == "config", name
            assert outage["attachments"] == [], name
            assert "No copy of the configuration is attached" in outage["description"]
        assert "symbolic link" in outages["leak"]["description"]
        assert "over 1048576 bytes" in outages["huge"]["description"]
        assert [r["subject"] for r in requests(data) if r["kind"] == "mail"] == ["Regular file"]
        assert inner_server.deleted == []  # never read, so never fetched

        # Allowed to follow links: the one inside the folder works; those leading out do not.
        runs.append(engine("once", "--follow-symlinks", *common, env=env))
        assert runs[-1].code == 1, runs[-1].err
        assert inner_server.wait_idle() and inner_server.deleted == [1]

    reqs = requests(data)
    outages = {r["mailbox"]: r for r in reqs if r["kind"] == "outage"}
    assert outages["inner"]["status"] == "processed"  # closed: the mailbox works now
    assert "outside the config folder" in outages["leak"]["activities"][-1]["body"]
    assert "outside the config folder" in outages["teamlink/"]["activities"][-1]["body"]
    assert sorted(r["subject"] for r in reqs if r["kind"] == "mail") == [
        "Regular file",
        "Through a link inside",
    ]
    seen = everything_under(data, logs) + "".join(r.out + r.err for r in runs).encode()
    for name, canary in canaries.items():
        assert canary.encode() not in seen, name

    # The 128 MiB file was never read whole: without it, the same run peaks as high.
    huge.unlink()
    baseline = engine("once", *common, env=env)
    assert runs[0].peak_kib < baseline.peak_kib + 32 * 1024, (runs[0].peak_kib, baseline.peak_kib)


# ------------------------------------------------------------------ permissions


def modes_under(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]
    }


def test_every_file_the_engine_makes_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Under umask 022, a real run with --debug and --log-file (requests, an attachment, a
    failure event, an outage with its config copy): every folder it made is 0700 and every
    file 0600, the database's -wal and -shm included. A data directory left open by an older
    version is closed, with a warning, and so is its database (SQLite gives -wal and -shm
    the database file's mode, whatever the umask)."""
    data = tmp_path / "data"
    logs = tmp_path / "logs"
    logs.mkdir()
    log_file = logs / "MailIntegration.log"
    directory = tmp_path / "directory.json"
    import_directory(tmp_path / "unused", tmp_path)  # writes directory.json
    run = engine("directory", "import", directory, "--data-dir", data, umask=0o022)
    assert run.code == 0, run.err
    conf = tmp_path / "mailboxes.d"
    conf.mkdir()
    raws = [
        # Larger than BLOB_MAX: a file, whose mode is checked below.
        message("With an attachment", attachments=(("a.pdf", "application/pdf", LARGE_PDF),)),
        message("Too big", body="x" * 200_000 + "\n"),
    ]
    with FakePOP3Server(Script(messages=raws)) as server:
        mailbox_xml(
            conf / "ok.xml", port=server.port, user="u", password="pw-ok", maxMessageBytes="150000"
        )
        mailbox_xml(conf / "down.xml", port=free_port(), user="u", password="pw-down")
        args = ("--config-dir", conf, "--data-dir", data, "--debug", "--log-file", log_file)
        # Killed after its first commit: the -wal and -shm are left to be looked at.
        run = engine(
            "after-commit", "1", "--", "once", *args, umask=0o022, module=("tools.crashpoints",)
        )
        assert run.code == -9, run.err
        assert (data / "mailintegration.sqlite3-wal").exists()
        assert (data / "mailintegration.sqlite3-shm").exists()
        wal_modes = modes_under(data)
        server.add_message(message("Into data/logs"))  # --debug without --log-file
        run = engine("once", "--config-dir", conf, "--data-dir", data, "--debug", umask=0o022)
        assert run.code == 1, run.err
        run = engine("once", *args, umask=0o022)
        assert run.code == 1, run.err
    kinds = {r["kind"] for r in requests(data)}
    assert kinds == {"mail", "message-failure", "outage"}
    assert list(logs.glob("RawMessage-*.eml")) and list((data / "logs").glob("RawMessage-*"))
    assert list((data / "attachments").glob("??/*"))

    for modes in (wal_modes, modes_under(data)):
        for name, mode in modes.items():
            path = data / name
            want = 0o700 if path.is_dir() else 0o600
            assert mode == want, f"{name}: {mode:04o}"
    for path in [log_file, *logs.glob("RawMessage-*.eml")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    # As an older version under umask 022 would have left it.
    os.chmod(data, 0o755)
    os.chmod(data / "mailintegration.sqlite3", 0o644)
    run = engine("once", "--config-dir", conf, "--data-dir", data, umask=0o022)
    assert "was open to other users (mode 0755); it is now 0700" in run.err
    assert "mailintegration.sqlite3 was open to other users (mode 0644)" in run.err
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "mailintegration.sqlite3").stat().st_mode) == 0o600


# ------------------------------------------------------------------ the store's files


def test_a_corrupt_or_truncated_database_is_a_clear_error_with_status_2(tmp_path: Path) -> None:
    conf = mailbox_xml(tmp_path / "box.xml", port=free_port(), user="u", password="p")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "mailintegration.sqlite3").write_bytes(hashlib.sha512(b"x").digest() * 100)
    truncated = tmp_path / "truncated"
    import_directory(truncated, tmp_path)
    run = engine("once", "--config", conf, "--data-dir", truncated)  # an outage: some rows
    assert run.code == 1, run.err
    db = truncated / "mailintegration.sqlite3"
    os.truncate(db, db.stat().st_size // 2)

    for data in (garbage, truncated):
        expected = f"mailintegration: {data}/mailintegration.sqlite3 is not a valid database ("
        for args in (
            ("once", "--config", conf),
            ("requests", "list"),
            ("requests", "show", "1"),
            ("status",),
        ):
            run = engine(*args, "--data-dir", data)
            assert run.code == 2, (args, run.err)
            assert expected in run.err, (args, run.err)
            assert "Traceback" not in run.err, (args, run.err)


@pytest.fixture(autouse=True)
def _no_stray_mounts() -> Iterator[None]:
    """The read-only mounts live in private namespaces that die with their process: nothing
    of them may outlive a test (checked, since a leak would break every later test)."""
    yield
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        assert "pytest-of" not in fh.read()


def _read_only_prefix(path: Path) -> list[str]:
    """A command prefix that runs the engine with ``path`` read-only: a private read-only bind
    mount for root (whom permission bits do not stop), or no write bits for anyone else."""
    if os.geteuid() != 0:
        for p in [path, *path.rglob("*")]:
            os.chmod(p, stat.S_IMODE(p.stat().st_mode) & ~0o222)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("unshare is needed to make a folder read-only for root")
    prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind -o ro "{path}" "{path}" && exec "$@"',
        "sh",
    ]
    probe = subprocess.run(
        [*prefix, "touch", str(path / "probe")], capture_output=True, timeout=30, check=False
    )
    if probe.returncode == 0 or (path / "probe").exists():
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr!r}")
    return prefix


def test_read_only_data_directory(tmp_path: Path) -> None:
    """Engine commands exit 2 with a clear line; ``requests`` and ``status`` work, whether the
    engine shut down cleanly (no -wal, no -shm: read as an immutable file) or was killed
    after a commit (read through its -wal and -shm). A -wal without its -shm cannot be read
    without write access: that too is said in one line."""
    with FakePOP3Server(Script(messages=[message("First"), message("Second")])) as server:
        clean = tmp_path / "clean"
        import_directory(clean, tmp_path)
        conf = mailbox_xml(tmp_path / "box.xml", port=server.port, user="u", password="p")
        assert engine("once", "--config", conf, "--data-dir", clean).code == 0
    assert not (clean / "mailintegration.sqlite3-wal").exists()
    with FakePOP3Server(Script(messages=[message("Committed, then killed")])) as server:
        killed = tmp_path / "killed"
        import_directory(killed, tmp_path)
        conf = mailbox_xml(tmp_path / "box2.xml", port=server.port, user="u", password="p")
        run = engine(
            "after-commit",
            "1",
            "--",
            "once",
            "--config",
            conf,
            "--data-dir",
            killed,
            module=("tools.crashpoints",),
        )
        assert run.code == -9, run.err
    assert (killed / "mailintegration.sqlite3-wal").stat().st_size > 0
    no_shm = tmp_path / "no-shm"
    shutil.copytree(killed, no_shm)
    (no_shm / "mailintegration.sqlite3-shm").unlink()

    # The killed run never recorded its session: no status line for it yet.
    cases = [(clean, ["First", "Second"], "box "), (killed, ["Committed, then killed"], "")]
    for data, subjects, status in cases:
        before = modes_under(data), everything_under(data)
        prefix = _read_only_prefix(data)
        run = engine("requests", "list", "--data-dir", data, prefix=prefix)
        assert run.code == 0, run.err
        assert [s for s in subjects if s in run.out] == subjects, run.out
        run = engine("requests", "show", "1", "--data-dir", data, prefix=prefix)
        assert run.code == 0 and subjects[0] in run.out, run.err
        run = engine("status", "--data-dir", data, prefix=prefix)
        assert run.code == 0 and run.out.startswith(status), run.err
        run = engine("once", "--config", conf, "--data-dir", data, prefix=prefix)
        assert run.code == 2, run.err
        assert f"mailintegration: the data directory {data} cannot be written" in run.err
        assert "'requests' and 'status' can read a read-only one" in run.err
        assert "Traceback" not in run.err
        assert (modes_under(data), everything_under(data)) == before  # nothing changed

    prefix = _read_only_prefix(no_shm)
    run = engine("requests", "list", "--data-dir", no_shm, prefix=prefix)
    assert run.code == 2 and "Traceback" not in run.err, run.err
    assert "its -wal file holds commits" in run.err


# ------------------------------------------------------------------ a store error mid-run


def test_a_store_error_is_reported_per_mailbox_never_as_no_mailbox(
    tmp_path: Path, data: Path
) -> None:
    """The attachment's folder is taken by a file, so the transaction holding the message
    fails: nothing is deleted, the run exits 1, and its summary names the mailbox, its
    counts and the store error (it read "once: no mailbox")."""
    payload = b"%PDF-1.7 blocked" + LARGE_PDF  # a file (a small one would be a row)
    digest = hashlib.sha256(payload).hexdigest()
    (data / "attachments").mkdir(exist_ok=True)
    (data / "attachments" / digest[:2]).write_text("a file where the folder should be")
    raw = message("Held back", attachments=(("x.pdf", "application/pdf", payload),))
    with FakePOP3Server(Script(messages=[raw])) as server:
        conf = mailbox_xml(tmp_path / "box.xml", port=server.port, user="u", password="p")
        run = engine("once", "--config", conf, "--data-dir", data)
        assert server.wait_idle()
        assert server.deleted == []
    assert run.code == 1, run.err
    assert "once: no mailbox" not in run.err
    [summary] = [line for line in run.err.splitlines() if "engine.cli: once:" in line]
    assert "once: box: fetched 1 processed 0 failed 0 (store: " in summary, summary
    assert "cannot write attachment files" in summary, summary
    db = sqlite3.connect(data / "mailintegration.sqlite3")
    try:
        assert db.execute("SELECT count(*) FROM ledger").fetchone()[0] == 0
    finally:
        db.close()


# ------------------------------------------------------------------ files to replay


def test_ingest_refuses_a_file_over_max_message_bytes_before_reading_it(
    tmp_path: Path, data: Path
) -> None:
    """``ingest`` read each file whole: a 256 MiB file became a 256 MiB failure event (and as
    much memory). A file over the mailbox's maxMessageBytes is now refused before any file
    is read or processed, with status 2."""
    conf = mailbox_xml(tmp_path / "box.xml", port=110, user="u", password="p")
    small = tmp_path / "small.eml"
    small.write_bytes(message("Small enough"))
    big = tmp_path / "big.eml"
    with big.open("wb") as fh:  # sparse: 256 MiB to read, none on the disk
        fh.write(message("Too big"))
        fh.truncate(256 * 1024 * 1024)
    run = engine("ingest", small, big, "--config", conf, "--data-dir", data)
    assert run.code == 2, run.err
    assert f"{big} is 268435456 bytes, over the mailbox's maxMessageBytes (26214400)" in run.err
    assert requests(data) == []  # not even the small one: nothing is half done
    baseline = engine("ingest", small, "--config", conf, "--data-dir", data)
    assert baseline.code == 0, baseline.err
    assert run.peak_kib < baseline.peak_kib + 32 * 1024, (run.peak_kib, baseline.peak_kib)
