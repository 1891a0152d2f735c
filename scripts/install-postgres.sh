#!/usr/bin/env bash
# Storage tests run on a throwaway PostgreSQL cluster that tests/postgres.py builds with
# Debian's server programs (initdb, pg_ctl); nothing here creates or starts a cluster.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql)
if [ "$(id -u)" -eq 0 ]; then
  apt-get update -q
  "${install[@]}"
elif command -v sudo >/dev/null 2>&1; then
  sudo apt-get update -q
  sudo "${install[@]}"
else
  echo "PostgreSQL is missing and this user cannot install it: install the 'postgresql' package, then run make test again." >&2
  exit 1
fi
