#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine with Python:
# - Dovecot with POP3 and IMAP (a real server, started by the demo and by the tests
#   themselves, never as a system service);
# - Chromium, for the headless browser tests (Debian's package: no tool ever downloads a
#   browser of its own);
# - a PostgreSQL answering on 127.0.0.1:5432 with trust auth and a database "test": one
#   that already answers is used as it is, otherwise Debian's is installed and started;
# - a virtual environment with the engine and its test tools.
# It runs before every test command: when everything is there it only stats a few files,
# asks PostgreSQL whether it is ready and compares one checksum (well under a second).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian package:a file it installs. A package counts as present when its file exists:
# a stat is much cheaper than asking dpkg on every run.
APT_PACKAGES=(
  dovecot-core:/usr/sbin/dovecot
  dovecot-pop3d:/usr/lib/dovecot/pop3
  dovecot-imapd:/usr/lib/dovecot/imap
  openssl:/usr/bin/openssl
  chromium:/usr/bin/chromium
)

apt_updated=no
apt_install() {
  # One `apt-get update` per run, and only when something is missing. Other engineers'
  # setups may hold the dpkg lock: wait for it rather than fail.
  [ "$#" -gt 0 ] || return 0
  echo "setup: installing $* from Debian's packages"
  if [ "$apt_updated" = no ]; then
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt_updated=yes
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install \
    -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
for entry in "${APT_PACKAGES[@]}"; do
  [ -e "${entry#*:}" ] || missing+=("${entry%%:*}")
done
apt_install "${missing[@]}"

# ------------------------------------------------------------------ PostgreSQL
# The port and cluster name are only ever changed to try this part on a machine whose
# 5432 is taken (SETUP_PG_PORT=5499 SETUP_PG_CLUSTER=scratch); the tests use 5432.
PG_HOST=127.0.0.1
PG_PORT=${SETUP_PG_PORT:-5432}
PG_CLUSTER=${SETUP_PG_CLUSTER:-main}

pg_answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null
  fi
}

start_postgres() {
  [ -x /usr/bin/pg_ctlcluster ] || apt_install postgresql
  local version conf hba trust
  version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  conf=/etc/postgresql/$version/$PG_CLUSTER
  if [ ! -d "$conf" ]; then
    echo "setup: creating PostgreSQL $version cluster $PG_CLUSTER on port $PG_PORT"
    as_root pg_createcluster --port "$PG_PORT" "$version" "$PG_CLUSTER" >/dev/null
  fi
  # pg_hba.conf is first-match: a trust line for loopback TCP goes first. Tests only:
  # the server listens on localhost alone (Debian's default listen_addresses).
  hba=$conf/pg_hba.conf
  trust="host all all $PG_HOST/32 trust"
  if ! as_root grep -qxF "$trust" "$hba"; then
    as_root sed -i "1i # mailintegration tests (scripts/setup.sh): trust on loopback\n$trust" "$hba"
  fi
  echo "setup: starting PostgreSQL $version/$PG_CLUSTER"
  if as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" status >/dev/null 2>&1; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" reload
  else
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" start
  fi
  for _ in $(seq 1 60); do
    pg_answers && break
    sleep 0.5
  done
  pg_answers || { echo "setup: PostgreSQL does not answer on $PG_HOST:$PG_PORT" >&2; exit 1; }
  if [ -z "$(psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'test'")" ]; then
    createdb -h "$PG_HOST" -p "$PG_PORT" -U postgres test
  fi
}

pg_answers || start_postgres

# ------------------------------------------------------------------ virtualenv
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    echo "setup: installing python3-venv"
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install \
      -y -qq python3-venv >/dev/null
    rm -rf .venv
    "$PY" -m venv .venv
  fi
fi
# pip takes about 6 s even when there is nothing to do: skip it while pyproject.toml (the
# engine is installed editable, so code changes need no reinstall) and the venv's Python
# are those of the last successful install.
stamp=.venv/.setup-stamp
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -VV | tr -d '\n')"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  printf '%s' "$wanted" >"$stamp"
fi

# ------------------------------------------------------------------ the compiled parser
# engine.parse compiled to C by mypyc (engine/native.py says when a build is used): about
# 20 s, and only when a source it was made from changed. It needs a C compiler and the
# Python headers; without them the parser runs interpreted, giving the same results.
if ! .venv/bin/python -m engine.nativebuild --check >/dev/null 2>&1; then
  include=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if ! command -v cc >/dev/null 2>&1; then
    apt_install gcc
  fi
  if [ ! -e "$include/Python.h" ] && [ "$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')" = /usr ]; then
    apt_install python3-dev  # Debian's Python: its headers
  fi
  echo "setup: compiling the parser (python -m engine.nativebuild)"
  if ! .venv/bin/python -m engine.nativebuild >.venv/nativebuild.log 2>&1; then
    echo "setup: the parser could not be compiled (.venv/nativebuild.log); it runs interpreted" >&2
  fi
fi
