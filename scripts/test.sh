#!/usr/bin/env bash
# `npm test`: the format checks of the TypeScript (prettier) and the Rust (rustfmt), the
# Rust tests of the core crates, the TypeScript suite (ava) on the built native module, the npm pack test and the
# Rust package test; then a summary of passed / failed / skipped per stage. Every stage
# runs even when an earlier one failed; the exit status is non-zero when any failed.
#
# It reuses the build of bootstrap.sh / `npm run build`: that build is brought up to date
# first (a no-op when nothing changed), and cargo test runs in the same profile and target
# (release, the host triple, as `napi build --platform` does), so only the test harnesses
# are compiled, not the crates and their dependencies again.
#
# Skips are counted as skips: the cargo GPU tests, which print `SKIPPED <test> (no GPU: ...)`
# and return without a usable GPU, the ava GPU tests (registered as skipped), and ignored
# tests.
#
# The format checks are stages like the others: a file that `npm run format` (prettier) or
# `cargo fmt --all` (rustfmt) would change fails them.
#
# Environment: MLA_TEST_DEVICE=cuda makes the GPU tests fail instead of skipping when no
# GPU is usable; MLA_TEST_SEED=<n> replays the random inputs of an earlier run;
# MLA_SKIP_CARGO_TEST=1 / MLA_SKIP_PACK_TEST=1 / MLA_SKIP_RUST_PACKAGE_TEST=1 skip those
# stages (shown as skipped in the summary).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

logs=$(mktemp -d "${TMPDIR:-/tmp}/mla-test.XXXXXX")
trap 'rm -rf "$logs"' EXIT
declare -a summary=()
failed=0
stage() { printf '\n=== %s\n' "$*"; }
row() { summary+=("$(printf '%-20s %4s passed  %4s failed  %4s skipped  %s' "$@")"); }

stage "build (npm run build: up to date, or brought up to date)"
if ! npm run --silent build >"$logs/build.log" 2>&1; then
  cat "$logs/build.log"
  echo "npm test: the build failed" >&2
  exit 1
fi
tail -3 "$logs/build.log"
triple=$(rustc -vV | sed -n 's/^host: //p')

stage "format check (npm run format:check: prettier --check of the TypeScript files)"
t0=$SECONDS
# --log-level debug names every file checked ("resolve config from <file>"), so that the
# files that pass are counted too; those that fail are the [warn] (not formatted) and
# [error] (not parsed) lines naming a file. --no-color, and the escapes stripped all the
# same: with FORCE_COLOR set (CI runners set it) prettier colours its level tags, and
# '^\[debug\]' then matched nothing (CI counted 0 files and failed the stage).
npm run --silent format:check -- --log-level debug --no-color 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >"$logs/format.log"
rc=${PIPESTATUS[0]}
grep -v '^\[debug\]' "$logs/format.log"
n=$(grep -c '^\[debug\] resolve config from ' "$logs/format.log")
f=$(grep -oE '^\[(warn|error)\] [^ :]+\.ts' "$logs/format.log" | sort -u | grep -c .)
# Should a prettier version name no files at debug level, its own all-clear still counts
# (with the tracked .ts files, less the ignored folders, as the number checked).
if [[ $n == 0 ]] && grep -q 'All matched files use Prettier code style' "$logs/format.log"; then
  n=$(git ls-files '*.ts' | grep -vcE '^(npm|crates|kernels|dist)/|(^|/)binding\.d\.ts$')
fi
[[ $rc == 0 && $n -gt 0 ]] || { failed=1; [[ $f -gt 0 ]] || f="$f+exit $rc"; }
row "format check" "$((n > ${f%%+*} ? n - ${f%%+*} : 0))" "$f" 0 "(npm run format fixes it; $((SECONDS - t0)) s)"

stage "rust format check (cargo fmt --all -- --check, rustfmt.toml)"
t0=$SECONDS
# rustfmt prints a "Diff in <file>:<line>:" header per hunk; the failed count is the files
# named. The passed count is the workspace's .rs files less those.
if ! cargo fmt --version >/dev/null 2>&1; then
  echo "npm test: rustfmt is not installed (rustup component add rustfmt)" >&2
  failed=1
  row "rust format check" 0 "1+no rustfmt" 0 "($((SECONDS - t0)) s)"
else
  cargo fmt --all -- --check --color never >"$logs/rustfmt.log" 2>&1
  rc=$?
  grep -E '^Diff in ' "$logs/rustfmt.log" | sed -E 's/:[0-9]+:$//' | sort | uniq -c
  f=$(grep -oE '^Diff in [^:]+' "$logs/rustfmt.log" | sort -u | grep -c .)
  n=$(git ls-files 'crates/*.rs' | grep -c .)
  if [[ $rc != 0 ]]; then
    failed=1
    [[ $f -gt 0 ]] || { grep -v '^Diff in ' "$logs/rustfmt.log" | head -20; f="$f+exit $rc"; }
  fi
  row "rust format check" "$((n > ${f%%+*} ? n - ${f%%+*} : 0))" "$f" 0 "(cargo fmt --all fixes it; $((SECONDS - t0)) s)"
fi

if [[ ${MLA_SKIP_CARGO_TEST:-0} != 1 ]]; then
  stage "cargo test --release --target $triple -p mla-core -p mla-kernels"
  t0=$SECONDS
  cargo test --release --target "$triple" -p mla-core -p mla-kernels --no-fail-fast 2>&1 | tee "$logs/cargo.log"
  rc=${PIPESTATUS[0]}
  # The GPU tests pass vacuously without a GPU: list their SKIPPED lines (a rerun of the
  # built gpu_decode, gpu_invariant and gpu_multi binaries with their output shown) and count them as
  # skipped, not passed.
  cargo test -q --release --target "$triple" -p mla-core --test gpu_decode --test gpu_invariant --test gpu_multi -- --nocapture 2>/dev/null \
    | grep -oE 'SKIPPED [A-Za-z0-9_:]+ \(.*\)' | tee "$logs/skipped.txt"
  read -r p f i < <(awk '/^test result:/ {p += $4; f += $6; i += $8} END {print p + 0, f + 0, i + 0}' "$logs/cargo.log")
  s=$(grep -c . "$logs/skipped.txt")
  suites=$(grep -c '^test result:' "$logs/cargo.log")
  [[ $rc == 0 && $suites -gt 0 ]] || { failed=1; [[ $f -gt 0 ]] || f="$f+build"; }
  row "cargo test" "$((p - s))" "$f" "$((s + i))" "($s GPU tests without a GPU, $i ignored; $suites suites; $((SECONDS - t0)) s)"
else
  row "cargo test" - - - "(MLA_SKIP_CARGO_TEST=1)"
fi

stage "ava (dist/__test__/*.test.js)"
t0=$SECONDS
npx ava 2>&1 | tee "$logs/ava.log"
rc=${PIPESTATUS[0]}
# Counted from the log without its colour escapes (FORCE_COLOR colours ava's ✔ and its
# summary even into a pipe).
sed 's/\x1b\[[0-9;]*m//g' "$logs/ava.log" >"$logs/ava.txt"
count() { # the number before "<word>" in ava's summary ("116 tests passed", "1 test failed")
  grep -E "^\s+[0-9]+ $1" "$logs/ava.txt" | awk '{s += $1} END {print s + 0}'
}
# Passed: the tests' own ✔ lines (ava prints no "N tests passed" line when a test failed);
# "✔ [expected fail]" is a known failure, counted below.
p=$(grep -E '^\s+✔ ' "$logs/ava.txt" | grep -vc '✔ \[expected fail\]')
s=$(count 'tests? skipped'); todo=$(count 'tests? todo')
f=$(( $(count 'tests? failed') + $(count 'known failures?') + $(count 'uncaught exceptions?') + $(count 'unhandled rejections?') ))
[[ $rc == 0 ]] || { failed=1; [[ $f -gt 0 ]] || f="$f+exit $rc"; }
# A run that passed nothing tested nothing: a failure, whatever ava's exit status.
[[ $p -gt 0 ]] || { failed=1; [[ $f != 0 ]] || f="0+none passed"; }
row "ava" "$p" "$f" "$((s + todo))" "($((SECONDS - t0)) s)"

if [[ ${MLA_SKIP_PACK_TEST:-0} != 1 ]]; then
  stage "npm pack test (scripts/pack-test.sh: npm run package, install, load)"
  t0=$SECONDS
  if MLA_PACKAGE_NO_BUILD=1 bash scripts/pack-test.sh; then row "pack test" 1 0 0 "($((SECONDS - t0)) s)"
  else failed=1; row "pack test" 0 1 0 "($((SECONDS - t0)) s)"; fi
else
  row "pack test" - - - "(MLA_SKIP_PACK_TEST=1)"
fi

if [[ ${MLA_SKIP_RUST_PACKAGE_TEST:-0} != 1 ]]; then
  stage "Rust package test (scripts/rust-package-test.sh: cargo package, scratch project without nvcc)"
  t0=$SECONDS
  if [[ $(node -p "String(require('./dist').gpuStatus().kernelsBuilt)") != true ]]; then
    echo "skipped: this build has no GPU kernels, so there are no cubins to package"
    row "rust package test" 0 0 1 "(a CPU-only build: no cubins to package)"
  elif bash scripts/rust-package-test.sh; then row "rust package test" 1 0 0 "($((SECONDS - t0)) s)"
  else failed=1; row "rust package test" 0 1 0 "($((SECONDS - t0)) s)"; fi
else
  row "rust package test" - - - "(MLA_SKIP_RUST_PACKAGE_TEST=1)"
fi

stage "summary"
printf '%s\n' "${summary[@]}"
if [[ $failed != 0 ]]; then
  echo "npm test: FAILED" >&2
  exit 1
fi
echo "npm test: ok"
