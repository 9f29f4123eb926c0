"""The token store: one JSON file per account under ``DATA_DIR/oauth``, readable by its owner
only, each write atomic and durable.

A refresh token may rotate on every use (Entra and the generic grant do): the new one is
the only one that works from then on. So a refreshed record is written to a new file,
fsynced, and renamed over the old one (then the folder fsynced) before the new access token
is used: a crash leaves the old record or the new one, never none, and never a new token
that was used and lost. The account's lock (a thread lock and an flock, so that ``check``
or ``oauth login`` in another process does not race the daemon) is held across the
read, the token request and the write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TokenRecord", "TokenStore"]

# A record is a few KiB; a larger file is not ours.
MAX_RECORD_BYTES = 256 * 1024


@dataclass
class TokenRecord:
    """What is known about one account's tokens. Times are epoch seconds (0: never)."""

    account: str
    source: str = ""
    access_token: str = field(default="", repr=False)
    expires_at: float = 0.0
    lifetime: float = 0.0
    scopes: list[str] = field(default_factory=list)
    refresh_token: str = field(default="", repr=False)
    refresh_obtained_at: float = 0.0
    refresh_last_used: float = 0.0
    last_refresh: float = 0.0
    last_error: str = ""
    last_error_at: float = 0.0
    last_sign_in: float = 0.0
    mechanism: str = ""

    def public(self) -> dict[str, Any]:
        """The record without its tokens: what ``oauth status`` and the metrics show."""
        out = asdict(self)
        out.pop("access_token")
        out["has_refresh_token"] = bool(out.pop("refresh_token"))
        return out


class TokenStore:
    """The ``oauth`` folder of a data directory (created 0700 on first write)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def path_for(self, account: str) -> Path:
        """The record's file: a hash of the account, so any account name is a safe name."""
        digest = hashlib.sha256(account.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self.folder / f"{digest}.json"

    @contextlib.contextmanager
    def locked(self, account: str) -> Iterator[None]:
        """Hold the account's lock: one refresh at a time, in this process and any other."""
        with self._guard:
            lock = self._locks.setdefault(account, threading.Lock())
        with lock:
            self._ensure_folder()
            path = self.path_for(account).with_suffix(".lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def load(self, account: str) -> TokenRecord:
        """The account's record; an empty one when there is none (or it is unreadable)."""
        path = self.path_for(account)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_RECORD_BYTES + 1)
            raw = json.loads(data) if len(data) <= MAX_RECORD_BYTES else None
        except (OSError, ValueError):
            raw = None
        if not isinstance(raw, dict) or raw.get("account") != account:
            return TokenRecord(account=account)
        known = {f.name for f in fields(TokenRecord)}
        return TokenRecord(**{k: v for k, v in raw.items() if k in known})

    def save(self, record: TokenRecord) -> None:
        """Write ``record`` atomically and durably (new file, fsync, rename, fsync folder)."""
        self._ensure_folder()
        path = self.path_for(record.account)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(asdict(record)).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def records(self) -> list[TokenRecord]:
        """Every record in the folder (for ``oauth status`` across mailboxes)."""
        out = []
        for path in sorted(self.folder.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):
                raw = json.loads(path.read_bytes()[:MAX_RECORD_BYTES])
                if isinstance(raw, dict) and isinstance(raw.get("account"), str):
                    out.append(self.load(raw["account"]))
        return out

    def _ensure_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.folder.stat().st_mode & 0o077:
            os.chmod(self.folder, 0o700)
