"""Throwaway PostgreSQL databases (tools/postgres.py and the pg_database fixture)."""

from __future__ import annotations

import psycopg
import pytest
from support import free_port

from tools.postgres import postgres_available, server_dsn, throwaway_database, with_database

pytestmark = pytest.mark.postgres


def databases() -> set[str]:
    with psycopg.connect(server_dsn()) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def test_module_database_is_fresh_and_writable(pg_database: str) -> None:
    with psycopg.connect(pg_database) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        assert name is not None and name[0].startswith("mi_test_")
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE ledger (mailbox text, uid text, UNIQUE (mailbox, uid))")
        conn.execute("INSERT INTO ledger VALUES ('box1', 'a')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO ledger VALUES ('box1', 'a')")


def test_throwaway_database_is_dropped_with_its_open_sessions() -> None:
    if not postgres_available():
        pytest.skip("no PostgreSQL")
    with throwaway_database(prefix="mi_drop") as dsn:
        name = dsn.rsplit("/", 1)[1]
        assert name in databases()
        lingering = psycopg.connect(dsn)  # a session the test forgot to close
        lingering.execute("CREATE TABLE t (x int)")
        lingering.commit()
        with throwaway_database(prefix="mi_drop") as other:
            assert other != dsn  # names never collide
    assert name not in databases()
    with pytest.raises(psycopg.OperationalError):
        lingering.execute("SELECT 1")  # terminated by DROP DATABASE ... WITH (FORCE)
    lingering.close()


def test_dsn_rewriting_and_an_unreachable_server() -> None:
    assert with_database("postgresql://u@h:5/test", "x") == "postgresql://u@h:5/x"
    conninfo = psycopg.conninfo.conninfo_to_dict(with_database("host=h dbname=test", "x"))
    assert conninfo == {"host": "h", "dbname": "x"}
    port = free_port()  # a loopback port nobody listens on
    assert not postgres_available(f"postgresql://postgres@127.0.0.1:{port}/test", timeout=2)
