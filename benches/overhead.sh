#!/usr/bin/env bash
# Runs the end-to-end overhead benchmark (`benches/src/bin/overhead.rs`) with the open-files limit
# raised first: a soak of N streams needs about 2×N+200 descriptors in a relay over HTTP/1.1
# (`--soak-http 1`, one inbound and one outbound socket per stream) and about N+N/100+200 over h2c
# (`--soak-http 2`), and the children inherit this shell's limit. Arguments are passed through,
# e.g. `benches/overhead.sh --soak 10000 --soak-http 2 --soak-tokens-per-sec 1 --soak-secs 40`.
# OVERHEAD_BIN=path runs an already built binary instead of `cargo run --release`, so a
# benchmark lock (`flock /work/bench.lock benches/overhead.sh …`) is not held while compiling.
set -euo pipefail
want=65536
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  # Raising the hard limit needs root (or CAP_SYS_RESOURCE); otherwise use what we may.
  ulimit -Hn "$want" 2>/dev/null || want=$hard
fi
ulimit -Sn "$want"
cd "$(dirname "$0")/.."
if [ -n "${OVERHEAD_BIN:-}" ]; then
  exec "$OVERHEAD_BIN" "$@"
fi
exec cargo run --release -p benches --bin overhead -- "$@"
