"""The content-addressed attachment store: one file per distinct content, named by its sha256.

Names given by mail never reach the file system: they live only in the database. So no
attachment name, Content-ID or Content-Location can place a file outside this folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class FileStore:
    """Files under ``root/ab/abcdef…``; written and fsynced before the commit that cites them."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = root
        if create:  # not for a read-only store, whose folder may be read-only
            root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def write(self, digest: str, data: bytes) -> None:
        """Write one file; when this returns, it survives a power loss under its name (the
        file fsynced, renamed into place, its folder fsynced). Blocking.

        The folder is synced here, in the same worker thread, rather than once per folder
        at the commit: ~150 more trips to a thread per 2,000 messages, and the commit
        waited for them. Two files of one transaction in one folder sync it twice."""
        target = self.path_for(digest)
        try:
            if target.stat().st_size == len(data):
                # Its content was fsynced before the rename that named it; its name may not
                # be durable yet (a transaction rolled back before its folder was synced).
                self.sync_folder(target.parent)
                return
        except FileNotFoundError:
            pass
        try:
            target.parent.mkdir()
            self.sync_folder(self.root)  # a new shard folder is an entry of the root
        except FileExistsError:
            pass
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.sync_folder(target.parent)

    def sync_folder(self, folder: Path) -> None:
        """Make the renames into ``folder`` survive a power loss. Blocking."""
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()

    def all_digests(self) -> set[str]:
        return {p.name for p in self.root.glob("??/*") if not p.name.startswith(".")}

    def sweep(self, referenced: set[str]) -> int:
        """Remove files no row refers to (left by a crash before commit) and temp files."""
        removed = 0
        for p in self.root.glob("??/*"):
            if p.name.startswith(".tmp-") or p.name not in referenced:
                p.unlink(missing_ok=True)
                removed += 1
        return removed
