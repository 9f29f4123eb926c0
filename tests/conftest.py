"""Shared fixtures: a real Dovecot for the whole session, and fresh mailboxes on it (a user, or
a whole `mailbox` with its `data` directory); an OAuth2 authorization server and a Dovecot that
checks its tokens; a throwaway PostgreSQL database per module; headless Chromium."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import Mailbox, data_dir

from tools.dovecot import Dovecot, find_dovecot, imap_available, make_certificates, start_dovecot
from tools.oauthserver import OAuthServer
from tools.postgres import postgres_available, server_dsn, throwaway_database

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A test marked ``interpreted_parser`` patches a module global of engine.parse. The
    compiled parser (engine.native) reads such globals from C, so the patch would change
    nothing and the test would hold trivially: where the compiled parser is in use, the test
    runs instead in a child pytest with MAILINTEGRATION_NO_NATIVE, and must pass there."""
    from engine import native

    if pyfuncitem.get_closest_marker("interpreted_parser") is None or not native.active:
        return None
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
        cwd=pyfuncitem.config.rootpath,
        env={**os.environ, "MAILINTEGRATION_NO_NATIVE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or "1 passed" not in done.stdout:
        pytest.fail(f"with the interpreted parser:\n{done.stdout[-4000:]}{done.stderr[-2000:]}")
    return True


def _ci() -> bool:
    # CI=true (GitHub Actions, GitLab, .ci/run) turns a missing Dovecot into a failure.
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_dovecot() -> None:
    """Skip the calling test or fixture when Dovecot is absent; fail instead under CI."""
    if find_dovecot() is None:
        message = "dovecot is not installed (apt-get install dovecot-core dovecot-pop3d)"
        if _ci():
            pytest.fail(f"{message}, and CI is set: Dovecot tests must run in CI")
        pytest.skip(message)


def _require_imap() -> None:
    """Skip the calling test when dovecot-imapd is absent; fail instead under CI."""
    _require_dovecot()
    if not imap_available():
        message = "dovecot-imapd is not installed (bash scripts/setup.sh installs it)"
        if _ci():
            pytest.fail(f"{message}, and CI is set: IMAP tests must run in CI")
        pytest.skip(message)


def _dovecot_base_dir() -> Path:
    """A fresh directory for a Dovecot, directly under the system temporary directory.

    Not under pytest's tmp_path: as root, Dovecot's mail processes (uid 5000) must
    traverse every parent, and each pytest session that starts on the machine, say a
    colleague's run, resets /tmp/pytest-of-<user> to mode 0700, locking them out mid-run
    (measured: "Permission denied ... missing +x perm: /tmp/pytest-of-root").
    """
    return Path(tempfile.mkdtemp(prefix="mailintegration-dovecot-"))


@pytest.fixture(scope="session")
def dovecot(request: pytest.FixtureRequest) -> Iterator[Dovecot]:
    """A real Dovecot on 127.0.0.1 (POP3 with STLS, and POP3S) for the whole session.

    Skipped when the `dovecot` binary is absent, unless CI is set: there the tests that
    need it must fail rather than silently not run. Its directory (log included) is kept
    when a test failed.
    """
    _require_dovecot()
    base = _dovecot_base_dir()
    server = start_dovecot(base)
    yield server
    server.stop()
    if request.session.testsfailed == 0:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pop3_user(dovecot: Dovecot) -> tuple[str, str]:
    """A new mailbox on the session's Dovecot, unique to this test: (name, password)."""
    name = f"user-{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(12)
    dovecot.add_user(name, password)
    return name, password


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data directory with the tests' directory (support.DIRECTORY) imported."""
    return data_dir(tmp_path)


@pytest.fixture
def gateway() -> str:
    """The protocol the `mailbox` fixture is read by; `support.both` runs a test for each."""
    return "pop3"


@pytest.fixture
def mailbox(data: Path, dovecot: Dovecot, pop3_user: tuple[str, str], gateway: str) -> Mailbox:
    """A fresh Dovecot user with its mailbox file (``m.xml``, support.mailbox_xml's defaults;
    ``mailbox.configure(...)`` rewrites it) and ``data``: deliver, once, check the store.
    Read by POP3, or by IMAP over STARTTLS where `gateway` says so."""
    if gateway == "imap":
        _require_imap()
    box = Mailbox(dovecot, *pop3_user, data=data, config=data.parent / "m.xml", gateway=gateway)
    box.configure()
    return box


@pytest.fixture
def new_mailbox(data: Path, dovecot: Dovecot) -> Callable[..., Mailbox]:
    """More mailboxes beside `mailbox`, sharing `data`: ``new_mailbox(path, **settings)``
    makes a Dovecot user and its mailbox file at ``path``."""

    def make(config: Path, **settings: Any) -> Mailbox:
        return Mailbox.create(dovecot, data, config, **settings)

    return make


@pytest.fixture
def require_imap() -> None:
    """Use it (`@pytest.mark.usefixtures("require_imap")`) in tests that need IMAP:
    skipped without Debian's dovecot-imapd, failed instead under CI."""
    _require_imap()


@pytest.fixture
def dovecot_dir() -> Iterator[Path]:
    """An empty directory for a Dovecot of the test's own (one it stops or restarts).

    Skips or fails like `dovecot` when Dovecot is absent. Removed afterwards.
    """
    _require_dovecot()
    base = _dovecot_base_dir()
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def oauth_base_dir() -> Iterator[Path]:
    """The directory of the module's `oauth_dovecot` and of the CA it shares."""
    base = _dovecot_base_dir()
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def oauth_server(oauth_base_dir: Path) -> Iterator[OAuthServer]:
    """An OAuth2 authorization server on 127.0.0.1 (tools/oauthserver.py) for the module.

    Its HTTPS listener uses the CA of `oauth_dovecot`, so one CA file verifies both.
    Tests change its settings (token lifetime, clients): module scope keeps that local.
    """
    with OAuthServer(certificates=make_certificates(oauth_base_dir / "tls")) as server:
        yield server


@pytest.fixture(scope="module")
def oauth_dovecot(oauth_server: OAuthServer, oauth_base_dir: Path) -> Iterator[Dovecot]:
    """A Dovecot (POP3, IMAP) that accepts XOAUTH2 and OAUTHBEARER tokens of `oauth_server`
    (checked by introspection) beside passwords, with the same test CA."""
    _require_imap()
    server = start_dovecot(oauth_base_dir, oauth2_introspection_url=oauth_server.introspection_url)
    yield server
    server.stop()


def _skip_or_fail(message: str) -> None:
    if _ci():
        pytest.fail(f"{message}, and CI is set: these tests must run in CI")
    pytest.skip(message)


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """The DSN of a fresh PostgreSQL database for this test module, dropped afterwards.

    Created on the server at MAILINTEGRATION_TEST_PG (scripts/setup.sh starts one);
    skipped when none answers, failed instead under CI.
    """
    if not postgres_available():
        _skip_or_fail(f"no PostgreSQL answers at {server_dsn()} (bash scripts/setup.sh)")
    with throwaway_database() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each store in turn: "sqlite" (the data directory's file), or "postgresql" (a fresh
    database for this test, which tests/support.py's helpers then use: ``once`` and
    ``import_directory`` pass ``--store``, ``requests``, ``ledger`` and ``store_rows``
    read it)."""
    import support

    if request.param == "sqlite":
        yield "sqlite"
        return
    if not postgres_available():
        _skip_or_fail(f"no PostgreSQL answers at {server_dsn()} (bash scripts/setup.sh)")
    with throwaway_database() as dsn:
        support.STORE = dsn
        try:
            yield "postgresql"
        finally:
            support.STORE = None


@pytest.fixture(scope="module")
def chromium_browser() -> Iterator[Browser]:
    """Headless Debian Chromium driven by Playwright (tools/browser.py), for the module.

    Skipped when /usr/bin/chromium is absent, failed instead under CI.
    """
    from tools.browser import find_chromium, launch_chromium

    if find_chromium() is None:
        _skip_or_fail("chromium is not installed (bash scripts/setup.sh installs it)")
    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def browser_page(chromium_browser: Browser) -> Iterator[Page]:
    """A page in a fresh browser context (its own cookies and storage), closed after."""
    context = chromium_browser.new_context()
    page = context.new_page()
    yield page
    context.close()
