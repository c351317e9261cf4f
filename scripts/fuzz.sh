#!/usr/bin/env bash
# Run every fuzz target in fuzz/ for a while, starting from its checked-in corpus
# (fuzz/corpus/<target>/). Usage: scripts/fuzz.sh [seconds per target, default 45] [target...]
#
# cargo-fuzz passes nightly-only flags to rustc; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them. Targets are built without a sanitizer (the code is safe Rust; what we look for
# are panics, failed invariants and 5xx answers) and with 16 codegen units (builds about twice
# as fast, runs a little slower), in a target dir that outlives the checkout, so reruns are
# incremental. New inputs go to a scratch dir, not into the checked-in corpus; a
# crash leaves its input in fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-45}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode_request transaction_commands canonical_json)

if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/countersign-fuzz-target}"
flags=(--sanitizer none --codegen-units 16 --target-dir "$CARGO_TARGET_DIR")

cargo fuzz build "${flags[@]}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target"
  echo "fuzzing $target for ${seconds}s"
  cargo fuzz run "${flags[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 2>&1 \
    | grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)'
done
