#!/usr/bin/env bash
# Installs Debian's headless browser pair used by the dashboard end-to-end test
# (engine/tests/it/dashboard.rs): `chromium` and the matching `chromium-driver`.
# Idempotent: does nothing when both binaries exist; quiet on success.
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO="sudo"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The package lists may be stale or absent in a fresh container; refresh them first.
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >"$log" 2>&1; then
    echo "ensure-chromium: apt-get could not install chromium/chromium-driver; output follows" >&2
    cat "$log" >&2
    exit 1
fi

if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "ensure-chromium: packages installed but /usr/bin/chromium or /usr/bin/chromedriver is missing" >&2
    exit 1
fi
