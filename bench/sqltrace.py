"""Run the engine with every SQLite statement counted and timed (bench-side instrumentation).

    python -m bench.sqltrace OUT.json once --config-dir DIR --data-dir DATA

``sqlite3.connect`` is wrapped before the engine starts, so the connections aiosqlite opens
time each ``execute`` (by statement kind: verb and table) and each cursor fetch, and count
the thread hops the event loop makes into aiosqlite's thread. Nothing in the engine changes.
"""

from __future__ import annotations

import atexit
import json
import re
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from typing import Any

_lock = threading.Lock()
_stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
_KIND = re.compile(
    r"^\s*(SELECT|INSERT(?:\s+OR\s+\w+)?\s+INTO|UPDATE|DELETE\s+FROM|BEGIN|COMMIT|ROLLBACK|"
    r"SAVEPOINT|RELEASE|PRAGMA|CREATE|WITH)\b\s*([\w.]+)?",
    re.IGNORECASE,
)


def _kind(sql: str) -> str:
    m = _KIND.match(sql)
    if m is None:
        return sql.strip().split(None, 1)[0].upper() if sql.strip() else "?"
    verb = " ".join(m.group(1).split()[:1]).upper()
    if verb == "SELECT":
        table = re.search(r"\bFROM\s+(\w+)", sql, re.IGNORECASE)
        return f"SELECT {table.group(1) if table else ''}".strip()
    if verb in ("INSERT", "UPDATE", "DELETE"):
        table = re.search(r"\b(?:INTO|UPDATE|FROM)\s+(\w+)", sql, re.IGNORECASE)
        return f"{verb} {table.group(1) if table else ''}".strip()
    return verb


def _note(kind: str, seconds: float) -> None:
    with _lock:
        entry = _stats[kind]
        entry[0] += 1
        entry[1] += seconds


class _Cursor(sqlite3.Cursor):
    def fetchone(self) -> Any:
        t = time.perf_counter()
        try:
            return super().fetchone()
        finally:
            _note("(cursor.fetchone)", time.perf_counter() - t)

    def fetchall(self) -> Any:
        t = time.perf_counter()
        try:
            return super().fetchall()
        finally:
            _note("(cursor.fetchall)", time.perf_counter() - t)

    def close(self) -> None:
        t = time.perf_counter()
        try:
            super().close()
        finally:
            _note("(cursor.close)", time.perf_counter() - t)


class _Connection(sqlite3.Connection):
    def cursor(self, factory: Any = _Cursor) -> Any:
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        t = time.perf_counter()
        try:
            return self.cursor().execute(sql, parameters)
        finally:
            _note(_kind(sql), time.perf_counter() - t)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        t = time.perf_counter()
        try:
            return self.cursor().executemany(sql, parameters)
        finally:
            _note(_kind(sql) + " (many)", time.perf_counter() - t)

    def executescript(self, script: str, /) -> Any:
        t = time.perf_counter()
        try:
            return super().executescript(script)
        finally:
            _note("(executescript)", time.perf_counter() - t)


_connect = sqlite3.connect


def _traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
    kwargs.setdefault("factory", _Connection)
    conn: sqlite3.Connection = _connect(*args, **kwargs)
    return conn


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["mailintegration", *sys.argv[2:]]
    sqlite3.connect = _traced_connect  # type: ignore[assignment]

    def dump() -> None:
        with _lock:
            rows = {k: {"count": int(v[0]), "seconds": round(v[1], 4)} for k, v in _stats.items()}
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1, sort_keys=True)

    atexit.register(dump)
    from engine.cli import main as engine_main

    code = engine_main()
    dump()
    sys.exit(code)


if __name__ == "__main__":
    main()
