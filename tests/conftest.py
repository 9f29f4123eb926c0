"""Shared fixtures: a real Dovecot for the whole session, and fresh mailboxes on it."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.dovecot import Dovecot, find_dovecot, start_dovecot


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
def dovecot_dir() -> Iterator[Path]:
    """An empty directory for a Dovecot of the test's own (one it stops or restarts).

    Skips or fails like `dovecot` when Dovecot is absent. Removed afterwards.
    """
    _require_dovecot()
    base = _dovecot_base_dir()
    yield base
    shutil.rmtree(base, ignore_errors=True)
