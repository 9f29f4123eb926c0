#!/usr/bin/env bash
# The demo, end to end: set up, start a local Dovecot with a demo mailbox, run the engine,
# show the requests it created.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tools.demo "$@"
