#!/usr/bin/env bash
# `npm test`: the Rust tests of the core crates, then the TypeScript suite (ava) on the
# built native module, then the npm pack test. Prints a summary of all three at the end.
#
# Environment: MLA_TEST_DEVICE=cuda makes the GPU tests fail instead of skipping when no
# GPU is usable; MLA_TEST_SEED=<n> replays the random inputs of an earlier run;
# MLA_SKIP_CARGO_TEST=1 / MLA_SKIP_PACK_TEST=1 skip those stages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

logs=$(mktemp -d "${TMPDIR:-/tmp}/mla-test.XXXXXX")
trap 'rm -rf "$logs"' EXIT
declare -a summary=()
stage() { printf '\n=== %s\n' "$*"; }

if [[ ${MLA_SKIP_CARGO_TEST:-0} != 1 ]]; then
  stage "cargo test -p mla-core -p mla-kernels"
  t0=$SECONDS
  cargo test -p mla-core -p mla-kernels 2>&1 | tee "$logs/cargo.log"
  # The GPU tests pass vacuously without a GPU: show each one's SKIPPED line.
  cargo test -q -p mla-core --test gpu_decode -- --nocapture 2>&1 | grep -oE "SKIPPED .*" || true
  summary+=("cargo test: $(grep -c '^test result: ok' "$logs/cargo.log") suites ok, $(awk '/^test result:/ {p += $4; f += $6; i += $8} END {print p " passed, " f " failed, " i " ignored"}' "$logs/cargo.log") ($((SECONDS - t0)) s)")
fi

stage "tsc (index.ts, demo.ts, __test__)"
for f in mla-decode.linux-x64-gnu.node binding.js binding.d.ts; do
  [[ -f $f ]] || { echo "npm test: $f is missing: run 'npm run build' (or scripts/bootstrap.sh) first" >&2; exit 1; }
done
npx tsc -p tsconfig.json

stage "ava (dist/__test__/*.test.js)"
t0=$SECONDS
npx ava 2>&1 | tee "$logs/ava.log"
summary+=("ava: $(grep -E '^\s+[0-9]+ (tests?|known failures?|uncaught exceptions?|unhandled rejections?) ' "$logs/ava.log" | sed 's/^ *//' | paste -sd, - | sed 's/,/, /g') ($((SECONDS - t0)) s)")

if [[ ${MLA_SKIP_PACK_TEST:-0} != 1 ]]; then
  stage "npm pack test (scripts/pack-test.sh)"
  t0=$SECONDS
  bash scripts/pack-test.sh
  summary+=("pack test: ok ($((SECONDS - t0)) s)")
fi

stage "summary"
printf '%s\n' "${summary[@]}"
