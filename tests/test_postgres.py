"""Issue 16: the PostgreSQL store from the command line: every command against it, the
password never echoed, migrations raced by three processes, attachments by content."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import support
from support import (
    LOGIN,
    LOGIN_PASSWORD,
    cli,
    import_directory,
    mailbox_xml,
    message,
    store_args,
    store_rows,
)

from engine.store.schema import MIGRATIONS, POSTGRES_MIGRATIONS
from tools.postgres import postgres_available, throwaway_database

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pg(store: str) -> str:
    """Only the PostgreSQL run of the ``store`` fixture."""
    if store != "postgresql":
        pytest.skip("PostgreSQL only")
    assert support.STORE is not None
    return support.STORE


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_every_command_works_against_postgresql(tmp_path: Path, pg: str) -> None:
    """``directory import``, ``ingest``, ``requests list/show`` and ``status`` with
    ``--store``: nothing is written to the data directory's SQLite file."""
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    cfg = mailbox_xml(tmp_path / "desk.xml", port=1, user="u", password="p")
    eml = tmp_path / "a.eml"
    eml.write_bytes(message("Printer on fire", attachments=(("log.txt", "text/plain", b"smoke"),)))
    login = ["--login", LOGIN, "--password", LOGIN_PASSWORD]
    code, out = cli("ingest", eml, "--config", cfg, "--data-dir", data, *login, *store_args())
    assert code == 0 and "#1" in out, out
    # The same file again (the login's password from a file): the ledger knows it.
    secret = tmp_path / "login-password"
    secret.write_text(LOGIN_PASSWORD + "\n")
    by_file = ["--login", LOGIN, "--password-file", secret]
    code, out = cli("ingest", eml, "--config", cfg, "--data-dir", data, *by_file, *store_args())
    assert code == 0 and "duplicate" in out, out
    code, out = cli("requests", "list", "--json", "--data-dir", data, *store_args())
    assert code == 0
    [row] = json.loads(out)
    assert row["subject"] == "Printer on fire" and row["requester"] == "jdoe"
    code, out = cli("requests", "show", "1", "--json", "--data-dir", data, *store_args())
    detail = json.loads(out)
    assert [a["name"] for a in detail["attachments"]] == ["log.txt"]
    assert support.attachment_bytes(data, detail["attachments"][0]["sha256"]) == b"smoke"
    code, out = cli("status", "--json", "--data-dir", data, *store_args())
    assert code == 0 and json.loads(out) == []
    assert not (data / "mailintegration.sqlite3").exists()


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_attachments_are_stored_once_by_content(tmp_path: Path, pg: str) -> None:
    data = tmp_path / "data"
    import_directory(data, tmp_path)
    cfg = mailbox_xml(tmp_path / "desk.xml", port=1, user="u", password="p")
    login = ["--login", LOGIN, "--password", LOGIN_PASSWORD]
    files = []
    for i in range(3):
        eml = tmp_path / f"{i}.eml"
        eml.write_bytes(message(f"Same file {i}", attachments=(("a.bin", "x/y", b"same" * 99),)))
        files.append(eml)
    code, _ = cli("ingest", *files, "--config", cfg, "--data-dir", data, *login, *store_args())
    assert code == 0
    assert store_rows(data, "SELECT count(*) AS n FROM attachments") == [{"n": 3}]
    assert store_rows(data, "SELECT count(*) AS n FROM attachment_blobs") == [{"n": 1}]


def test_the_password_is_never_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In the DSN or in a password file, a failing connection names the DSN without it."""
    secret_file = tmp_path / "pw"
    secret_file.write_text("file-Secr3t-pw\n")
    dsn = "postgresql://mi:dsn-Secr3t-pw@127.0.0.1:1/nowhere"
    for extra in ([], ["--store-password-file", secret_file]):
        code, out = cli("status", "--data-dir", tmp_path, "--store", dsn, *extra)
        err = capsys.readouterr().err
        assert code == 2
        assert "cannot connect to the store postgresql://mi:***@127.0.0.1:1/nowhere" in err
        for text in (out, err):
            assert "Secr3t" not in text


def test_a_store_that_is_not_postgresql_is_refused(tmp_path: Path) -> None:
    code, _ = cli("status", "--data-dir", tmp_path, "--store", "mysql://x")
    assert code == 2


def test_both_stores_know_the_same_versions() -> None:
    """One list of versions: each SQLite version has its PostgreSQL form."""
    assert set(range(1, len(MIGRATIONS) + 1)) <= set(POSTGRES_MIGRATIONS)


_MIGRATE = """
import sys, anyio, asyncpg
from engine.store.postgres import migrate

async def main():
    conn = await asyncpg.connect(sys.argv[1])
    print(sys.argv[2], flush=True)  # connected: the parent then lets all three go at once
    sys.stdin.readline()
    print(",".join(map(str, await migrate(conn))), flush=True)
    await conn.close()

anyio.run(main)
"""


def test_three_processes_migrating_at_once_migrate_once(tmp_path: Path) -> None:
    """Three processes connected to an empty database are let go at once: one applies
    every version under the advisory lock, the two others wait and find nothing to do."""
    if not postgres_available():
        pytest.skip("no PostgreSQL")
    with throwaway_database() as dsn:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _MIGRATE, dsn, f"ready{i}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for i in range(3)
        ]
        outs: list[str] = []
        try:
            for i, p in enumerate(procs):
                assert p.stdout is not None and p.stdout.readline().strip() == f"ready{i}"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            for p in procs:
                out, _ = p.communicate(timeout=60)
                assert p.returncode == 0
                outs.append(out.strip())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        expected = ",".join(map(str, sorted(POSTGRES_MIGRATIONS)))
        assert sorted(outs) == ["", "", expected]
        with psycopg.connect(dsn) as conn:
            rows: list[Any] = conn.execute("SELECT version FROM schema_versions").fetchall()
        assert sorted(r[0] for r in rows) == sorted(POSTGRES_MIGRATIONS)


def test_the_compose_profile_and_the_kubernetes_example_hold_together() -> None:
    """The "replicas" profile: PostgreSQL and two replicas reading the store's password from
    a secret file; the Kubernetes example: 3 replicas, readiness on /healthz, secrets as
    files, a PodDisruptionBudget; every option they pass is one the engine knows."""
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = [n for n, s in services.items() if n.startswith("replica-")]
    assert len(replicas) == 2 and "postgres" in services
    for name in [*replicas, "postgres", "directory-pg"]:
        assert services[name]["profiles"] == ["replicas"]
    for name in replicas:
        env = services[name]["environment"]
        assert env["MAILINTEGRATION_STORE"].startswith("postgresql://")
        assert (
            "@" in env["MAILINTEGRATION_STORE"]
            and ":" not in env["MAILINTEGRATION_STORE"][13:].split("@")[0]
        )
        assert env["MAILINTEGRATION_STORE_PASSWORD_FILE"] == "/run/secrets/store_password"
    assert (ROOT / compose["secrets"]["store_password"]["file"]).exists()
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/mailintegration.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "PodDisruptionBudget", "Secret", "ConfigMap"} <= kinds.keys()
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MAILINTEGRATION_STORE_PASSWORD_FILE"].startswith("/run/secrets/")
    assert env["MAILINTEGRATION_PASSWORD_FILE"].startswith("/run/secrets/")
    assert not any("PASSWORD" in n and not n.endswith("_FILE") for n in env)
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] == 2
    from engine.cli import build_parser

    args = build_parser().parse_args(container["args"])
    assert args.follow_symlinks and args.http_port == 8080


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_a_directory_import_by_another_process_is_seen_by_the_next_transaction(
    tmp_path: Path, pg: str
) -> None:
    """The store keeps its directory lookups between transactions, until a directory import
    by any process (here the command line, beside an open store) bumps the version."""
    import anyio

    from engine.store.postgres import open_postgres

    data = tmp_path / "data"
    import_directory(data, tmp_path)
    newcomer = {"login": "newcomer", "email": "new@example.com", "name": "New"}

    async def go() -> tuple[object, object]:
        store = await open_postgres(pg)
        try:
            async with store.transaction() as tx:
                before = await tx.user_by_login("newcomer")
                assert await tx.user_by_login("jdoe") is not None  # cached too
            directory = {**support.DIRECTORY, "users": [newcomer]}
            await anyio.to_thread.run_sync(import_directory, data, tmp_path, directory)
            async with store.transaction() as tx:
                after = await tx.user_by_login("newcomer")
            return before, after
        finally:
            await store.close()

    before, after = anyio.run(go)
    assert before is None and after is not None
