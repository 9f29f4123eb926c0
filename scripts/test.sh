#!/usr/bin/env bash
# The whole test suite: set up, then lint, type-check and run every test against a real
# Dovecot (started by the tests on 127.0.0.1), a real SMTP sink (aiosmtpd), the PostgreSQL
# that setup.sh makes sure of, and Debian's Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The PostgreSQL the tests create their throwaway databases on (tools/postgres.py).
export MAILINTEGRATION_TEST_PG="${MAILINTEGRATION_TEST_PG:-postgresql://postgres@127.0.0.1:5432/test}"
.venv/bin/ruff check engine tests tools bench
.venv/bin/ruff format --check engine tests tools bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
