"""One engine per data directory, and a data directory for its owner alone."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path
from typing import IO

from engine.errors import StoreError

log = logging.getLogger("engine.store")

# Made before umask 077 was set, or by hand: SQLite gives the -wal and -shm files the mode of
# the database file whatever the umask, so an old 0644 database would keep making them 0644.
_PRIVATE_FILES = (
    "mailintegration.sqlite3",
    "mailintegration.sqlite3-wal",
    "mailintegration.sqlite3-shm",
    "engine.lock",
)


class DataDirLock:
    """Only one engine per data directory: an flock on ``engine.lock`` holding our pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "engine.lock"
        self.fh: IO[str] | None = None

    def acquire(self) -> None:
        secure_data_dir(self.path.parent)
        try:
            fh = open(self.path, "a+", encoding="ascii")  # noqa: SIM115 - held for the process life
        except OSError as exc:
            raise StoreError(
                f"the data directory {self.path.parent} cannot be written "
                f"({exc.strerror or type(exc).__name__}): engine commands need to write there; "
                "'requests' and 'status' can read a read-only one"
            ) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read(32).strip() or "another process"  # a pid, whatever the file holds
            fh.close()
            raise StoreError(
                f"the data directory {self.path.parent} is in use by pid {holder}; "
                "only one engine may run per data directory"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def secure_data_dir(data_dir: Path) -> None:
    """Create the data directory (0700), or tighten one that other users could enter.

    It holds every mail, the login's password hash, and the logs: 0700 for the folder and
    0600 for the database files, whatever the umask they were made under. Loosening is
    logged as a warning; a folder that cannot be tightened (not ours, read-only) is too.
    """
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the data directory {data_dir}: {exc.strerror or type(exc).__name__}"
        ) from None
    private(data_dir, "data directory")
    for name in _PRIVATE_FILES:
        path = data_dir / name
        if path.exists():
            private(path, "file")


def private_file(path: Path) -> None:
    """Make an existing file (the log file) readable by its owner only."""
    if path.exists():
        private(path, "file")


def private(path: Path, what: str) -> None:
    """Take every permission of group and others away from ``path``, with a warning."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & 0o077:
            return
        os.chmod(path, mode & 0o700)
    except OSError as exc:
        log.warning(
            "the %s %s is open to other users and could not be made private: %s",
            what,
            path,
            exc.strerror or type(exc).__name__,
        )
        return
    log.warning(
        "the %s %s was open to other users (mode %04o); it is now %04o",
        what,
        path,
        mode,
        mode & 0o700,
    )
