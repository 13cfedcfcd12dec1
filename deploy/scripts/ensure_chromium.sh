#!/usr/bin/env bash
# Make headless Chromium available for the audit HTML rendering test (tests/test_audit.py).
# Prints the browser's path on stdout and exits 0 when it is (or becomes) available; otherwise
# prints why on stderr and exits 1 (the test then skips with that reason).
#   bash deploy/scripts/ensure_chromium.sh        # install if missing (needs root + apt-get)
#   LVLM_NO_BROWSER_INSTALL=1 bash ...            # only look for it (fast test runs)
set -uo pipefail

find_browser() {
  for name in chromium chromium-browser google-chrome-stable google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  return 1
}

if path=$(find_browser); then echo "$path"; exit 0; fi

if [ "${LVLM_NO_BROWSER_INSTALL:-0}" = "1" ]; then
  echo "chromium is not installed (LVLM_NO_BROWSER_INSTALL=1: not installing it)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium is not installed and apt-get is not available to install it" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is not installed and installing it needs root (apt-get install -y chromium)" >&2
  exit 1
fi
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get install -y --no-install-recommends chromium >"$log" 2>&1 \
       || { apt-get update >>"$log" 2>&1 \
            && apt-get install -y --no-install-recommends chromium >>"$log" 2>&1; }; }; then
  echo "apt-get install chromium failed: $(tail -n 3 "$log" | tr '\n' ' ')" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
if path=$(find_browser); then echo "$path"; exit 0; fi
echo "apt-get installed chromium but no chromium executable is on PATH" >&2
exit 1
