#!/usr/bin/env bash
# The accessibility checks of the browser tests inject axe-core (npm's axe.min.js) into the page.
# It goes into the git-ignored .venv, next to the other test tools; the version is pinned so a
# new axe release cannot change what the tests report.
set -euo pipefail
AXE_VERSION="4.14.1"
PREFIX="${1:-.venv/axe-core}"
TARGET="$PREFIX/node_modules/axe-core"
if [ -f "$TARGET/axe.min.js" ] && grep -q "\"version\": \"$AXE_VERSION\"" "$TARGET/package.json"; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -q && apt-get install -y -q npm
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -q && sudo apt-get install -y -q npm
  else
    echo "npm is missing and this user cannot install it: install the 'npm' package, then run make test again." >&2
    exit 1
  fi
fi
npm install --prefix "$PREFIX" --no-audit --no-fund --ignore-scripts --save-exact "axe-core@$AXE_VERSION"
test -f "$TARGET/axe.min.js"
