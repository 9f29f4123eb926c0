"""One engine per data directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from engine.errors import StoreError


class DataDirLock:
    """Only one engine per data directory: an flock on ``engine.lock`` holding our pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "engine.lock"
        self.fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="ascii")  # noqa: SIM115 - held for the process life
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
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
