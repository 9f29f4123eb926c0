"""The login's password: its scrypt hash, and a check begun before the engine has loaded.

scrypt is slow on purpose (~50 ms here, in a thread without the GIL), and every ``once``
from cron pays it. The store's check (``Store.check_login``) reads the stored hash and only
then runs scrypt, after ~100 ms of imports on the main thread. :class:`EarlyCheck` runs the
same check as soon as the command line is read, beside those imports; the store's check then
takes its answer only for the very hash it reads itself, so what the early check saw can
never decide alone (another process may change the password meanwhile).

Standard library only: it is imported before anything else of the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import threading
from pathlib import Path


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """scrypt, with parameters in the stored string so they can be raised later."""
    salt = salt or os.urandom(16)
    n, r, p = 2**14, 8, 1
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${key.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        algo, n, r, p, salt, key = stored.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), key)


class EarlyCheck:
    """The login checked in a thread against the SQLite store at ``database``, read-only.

    It never creates, changes or locks anything: a store that is missing, not yet migrated,
    busy or unreadable simply leaves the check to the store (:meth:`answer` says None).
    """

    def __init__(self, database: Path, login: str, password: str) -> None:
        self._done = threading.Event()
        self._stored: str | None = None  # the hash it checked, if it read one
        self._ok = False
        threading.Thread(
            target=self._check, args=(database, login, password), name="login", daemon=True
        ).start()

    def _check(self, database: Path, login: str, password: str) -> None:
        try:
            # mode=ro: a missing store stays missing (connect would create an empty one).
            uri = database.absolute().as_uri() + "?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=0.1, check_same_thread=False)
            try:
                row = db.execute(
                    "SELECT password_hash FROM users WHERE login = ?", (login,)
                ).fetchone()
            finally:
                db.close()
            if row is not None and isinstance(row[0], str) and row[0]:
                self._ok = verify_password(password, row[0])
                self._stored = row[0]
        except Exception:
            # Only a head start: whatever went wrong (a store missing, not migrated, busy),
            # the store's own check reads it again and says what is wrong.
            pass
        finally:
            self._done.set()

    async def answer(self, stored: str | None) -> bool | None:
        """Whether the password matches ``stored``, if that is the hash this check read;
        None otherwise (the caller runs scrypt itself)."""
        if not self._done.is_set():
            import anyio.to_thread

            await anyio.to_thread.run_sync(self._done.wait)
        if stored is None or self._stored != stored:
            return None
        return self._ok
