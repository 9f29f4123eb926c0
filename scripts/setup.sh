#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine with Python:
# Dovecot (a real POP3 server, started by the demo and by the tests themselves, never as a
# system service) and a virtual environment with the engine and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v dovecot >/dev/null 2>&1 || ! [ -e /usr/lib/dovecot/pop3 ]; then
  echo "setup: installing Dovecot (dovecot-core dovecot-pop3d) from Debian's packages"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    dovecot-core dovecot-pop3d openssl >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    echo "setup: installing python3-venv"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf .venv
    "$PY" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
