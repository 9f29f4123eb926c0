#!/usr/bin/env bash
# Refresh requirements.lock: every dependency of the image (pyproject.toml's, not the tests'),
# pinned with the hashes of its files, which the Dockerfile installs with --require-hashes.
#
#   bash scripts/lock.sh              # pin what pyproject.toml asks for, keeping current pins
#   bash scripts/lock.sh --upgrade    # move every pin to the newest version allowed
#
# tests/test_lock.py fails while the lock is out of step with pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
"$python" -m piptools --version >/dev/null 2>&1 || "$python" -m pip install -q "pip-tools>=7.4"
"$python" -m piptools compile --quiet --generate-hashes --strip-extras --allow-unsafe --build-deps-for wheel \
    --no-emit-index-url --no-emit-find-links --output-file requirements.lock "$@" pyproject.toml
