#!/usr/bin/env bash
# Installs Debian's `redis-server`, which the tests of the shared limits and budgets start on a
# free port each (engine/testkit/src/redis.rs), like moto, and `openssl`, which makes the
# certificates of the TLS test's server. Idempotent: does nothing when both binaries exist; quiet
# on success.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO="sudo"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The package lists may be stale or absent in a fresh container; refresh them first.
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server openssl; } >"$log" 2>&1; then
    echo "ensure-redis: apt-get could not install redis-server and openssl; output follows" >&2
    cat "$log" >&2
    exit 1
fi

for bin in redis-server openssl; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        echo "ensure-redis: $bin was installed but is not on PATH" >&2
        exit 1
    fi
done
