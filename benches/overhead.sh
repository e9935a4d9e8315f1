#!/usr/bin/env bash
# Runs the end-to-end overhead benchmark (`benches/src/bin/overhead.rs`) with the open-files limit
# raised first: a soak of N streams needs about 2×N+200 descriptors in the engine process, which
# inherits this shell's limit. Arguments are passed through, e.g. `benches/overhead.sh --soak 10000`.
set -euo pipefail
want=65536
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  # Raising the hard limit needs root (or CAP_SYS_RESOURCE); otherwise use what we may.
  ulimit -Hn "$want" 2>/dev/null || want=$hard
fi
ulimit -Sn "$want"
cd "$(dirname "$0")/.."
exec cargo run --release -p benches --bin overhead -- "$@"
