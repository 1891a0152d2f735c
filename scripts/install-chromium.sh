#!/usr/bin/env bash
# Browser tests drive the system Chromium through Playwright (never `playwright install`).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  apt-get update -q
  apt-get install -y -q chromium
elif command -v sudo >/dev/null 2>&1; then
  sudo apt-get update -q
  sudo apt-get install -y -q chromium
else
  echo "Chromium is missing and this user cannot install it: install the 'chromium' package, then run make test again." >&2
  exit 1
fi
