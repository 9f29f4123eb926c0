"""Shared fixtures: a real Dovecot for the whole session, and fresh mailboxes on it."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator

import pytest

from tools.dovecot import Dovecot, find_dovecot, start_dovecot


def _ci() -> bool:
    # CI=true (GitHub Actions, GitLab, .ci/run) turns a missing Dovecot into a failure.
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A real Dovecot on 127.0.0.1 (POP3 with STLS, and POP3S) for the whole session.

    Skipped when the `dovecot` binary is absent, unless CI is set: there the tests that
    need it must fail rather than silently not run.
    """
    if find_dovecot() is None:
        message = "dovecot is not installed (apt-get install dovecot-core dovecot-pop3d)"
        if _ci():
            pytest.fail(f"{message}, and CI is set: Dovecot tests must run in CI")
        pytest.skip(message)
    server = start_dovecot(tmp_path_factory.mktemp("dovecot"))
    yield server
    server.stop()


@pytest.fixture
def pop3_user(dovecot: Dovecot) -> tuple[str, str]:
    """A new mailbox on the session's Dovecot, unique to this test: (name, password)."""
    name = f"user-{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(12)
    dovecot.add_user(name, password)
    return name, password
