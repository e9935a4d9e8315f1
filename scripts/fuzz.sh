#!/usr/bin/env bash
# Runs the cargo-fuzz targets of the hand-written parsers (engine/fuzz) for a while each: the SSE
# framer and OpenAI chunk decoder, the Anthropic event decoder, PartialJson and the formula parser.
# Too long for CI; the same properties run briefly in `cargo test` as proptests.
#
# Usage: scripts/fuzz.sh [TARGET] [SECONDS]      (from anywhere)
#   TARGET   one of: openai_stream anthropic_stream partial_json formula (default: all, in turn)
#   SECONDS  how long each target runs (default 60)
# Exits non-zero on the first crash, naming the input libFuzzer saved; replay it with
#   cargo +nightly fuzz run --fuzz-dir engine/fuzz TARGET ARTIFACT
#
# Toolchain: libFuzzer's AddressSanitizer build needs nightly `-Z` flags. With a nightly
# toolchain installed it is used (`cargo +nightly`); without one the stable compiler is asked to
# accept them (RUSTC_BOOTSTRAP=1); FUZZ_SANITIZER=none builds without the sanitizer. One libFuzzer
# process per target, so one core.
set -euo pipefail
cd "$(dirname "$0")/.."

all_targets=(openai_stream anthropic_stream partial_json formula)
targets=("${all_targets[@]}")
seconds=60
if [[ $# -ge 1 ]]; then
    if [[ " ${all_targets[*]} " != *" $1 "* ]]; then
        echo "fuzz.sh: unknown target '$1'; the targets are: ${all_targets[*]}" >&2
        exit 2
    fi
    targets=("$1")
fi
if [[ $# -ge 2 ]]; then
    if ! [[ $2 =~ ^[1-9][0-9]*$ ]]; then
        echo "fuzz.sh: SECONDS must be a positive whole number, got '$2'" >&2
        exit 2
    fi
    seconds=$2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cargo_fuzz=(cargo)
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    cargo_fuzz=(cargo +nightly)
    echo "fuzz.sh: using the nightly toolchain" >&2
else
    export RUSTC_BOOTSTRAP=1
    echo "fuzz.sh: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1" >&2
fi
cargo_fuzz+=(fuzz)
sanitizer=${FUZZ_SANITIZER:-address}

# New inputs libFuzzer finds go to a scratch corpus (git-ignored); the committed seeds are read only.
work=engine/fuzz/work
summary=()
for target in "${targets[@]}"; do
    mkdir -p "$work/$target"
    log="$work/$target.log"
    echo "== $target for ${seconds}s (log: $log)" >&2
    status=0
    # -timeout: an input that takes seconds is a quadratic (or worse) path, reported as a crash.
    "${cargo_fuzz[@]}" run --fuzz-dir engine/fuzz --sanitizer "$sanitizer" "$target" \
        "$work/$target" "engine/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 2>&1 | tee "$log" >&2 ||
        status=$?
    if [[ $status -ne 0 ]]; then
        artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | cut -d' ' -f5- || true)
        echo "fuzz.sh: $target FAILED (exit $status); input: ${artifact:-none saved, see $log}" >&2
        exit 1
    fi
    stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 | tr -s '[:space:]' ' ')
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    summary+=("$target: ${execs:-?} execs; $stats")
done
printf '\n== no crashes\n' >&2
printf '%s\n' "${summary[@]}"
