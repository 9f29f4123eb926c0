#!/usr/bin/env bash
# The whole test suite: set up, then lint, type-check and run every test against a real
# Dovecot (started by the tests on 127.0.0.1) and a real SMTP sink (aiosmtpd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check engine tests tools bench
.venv/bin/ruff format --check engine tests tools bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
