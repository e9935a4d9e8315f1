#!/usr/bin/env bash
# The project's one test command: installs what the tests need (moto in .venv for the DynamoDB/SQS
# tests, the latest official Anthropic SDKs for the simulator's SDK tests, Debian's chromium and
# chromedriver for the dashboard browser test, Debian's redis-server and openssl for the shared-limits tests), then runs every check CI runs — formatting, clippy
# with warnings denied, all tests, and the latency budget gate on an optimised build.
# Usage: scripts/test.sh            (from anywhere; works on a fresh machine)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "installing test dependencies (moto server in .venv)"
scripts/ensure-moto.sh
export MOTO_SERVER="$PWD/.venv/bin/moto_server"

step "installing test dependencies (the latest anthropic Python SDK in .venv, @anthropic-ai/sdk in .sdk/node)"
# Latest on purpose, not pinned: those tests exist to catch the next wire change an SDK release makes.
scripts/ensure-anthropic-sdks.sh
export KEYVEX_SDK_PYTHON="$PWD/.venv/bin/python"
export KEYVEX_SDK_NODE_MODULES="$PWD/.sdk/node/node_modules"

step "installing test dependencies (chromium and chromedriver for the dashboard test)"
scripts/ensure-chromium.sh

step "installing test dependencies (redis-server for the shared limits and budgets, openssl for the TLS test's certificates)"
scripts/ensure-redis.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "the embedding example runs offline (engine/core/examples/pipeline.rs)"
# `cargo test` above built it (examples are built with the tests); run it without cargo.
example="${CARGO_TARGET_DIR:-target}/debug/examples/pipeline"
if [[ ! -x "$example" ]]; then
    echo "test.sh: $example was not built by cargo test" >&2
    exit 1
fi
"$example" >/dev/null

step "cargo doc of the embeddable core (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc -p keyvex-engine --no-deps --locked

step "latency budget gate: bench-gate built optimised (profile gate), budgets in benches/gate/budgets.toml"
# The budgets are for optimised code, what ships; everything above was built unoptimised. The
# gate's package depends on the engine core and the agents only, so this compiles that part of
# the tree once more with the `gate` profile (5–6 minutes on a fresh 2-core machine, ~30 s after
# an engine change), not the server, the stores or the cloud SDKs.
cargo build --locked --profile gate -p bench-gate --bin gate
"${CARGO_TARGET_DIR:-target}/gate/gate"
