"""Throwaway PostgreSQL databases for tests, on the server at MAILINTEGRATION_TEST_PG.

scripts/setup.sh makes sure a PostgreSQL answers on 127.0.0.1:5432 with trust auth and a
database "test"; scripts/test.sh exports the DSN (default below). Each test module that
needs a database gets its own, created from that server and dropped afterwards, even
when connections are still open (`DROP DATABASE ... WITH (FORCE)`, PostgreSQL 13+)::

    with throwaway_database() as dsn:   # postgresql://postgres@127.0.0.1:5432/mi_test_3f2a...
        with psycopg.connect(dsn) as conn:
            ...

psycopg 3 is used here only to create and drop databases; the store chooses its own driver.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import sql

__all__ = ["DEFAULT_DSN", "postgres_available", "server_dsn", "throwaway_database", "with_database"]

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
_CONNECT_TIMEOUT = 5


def server_dsn() -> str:
    """The server the tests use: MAILINTEGRATION_TEST_PG, or DEFAULT_DSN."""
    return os.environ.get("MAILINTEGRATION_TEST_PG") or DEFAULT_DSN


def with_database(dsn: str, name: str) -> str:
    """`dsn` pointing at database `name` (URL DSNs stay URLs, key=value ones stay so)."""
    if dsn.startswith(("postgres://", "postgresql://")):
        parts = urllib.parse.urlsplit(dsn)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name)))
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


def postgres_available(dsn: str | None = None, timeout: int = 3) -> bool:
    """Whether the server at `dsn` (default `server_dsn()`) accepts a connection."""
    try:
        with psycopg.connect(dsn or server_dsn(), connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def throwaway_database(dsn: str | None = None, *, prefix: str = "mi_test") -> Iterator[str]:
    """Create a database with a unique name, yield its DSN, drop it (and its sessions)."""
    admin = dsn or server_dsn()
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=_CONNECT_TIMEOUT) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=_CONNECT_TIMEOUT) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
