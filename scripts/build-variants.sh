#!/usr/bin/env bash
# Kernel variants as separate gpu_bench binaries, for one device call to compare them:
# each NAME=FLAGS builds the bench with MLA_NVCC_FLAGS=FLAGS (e.g. -DMLA_PHASE_TIMING=1, or a
# variant's own -D switch) in target-variants/ (the production build in target/ is left
# alone; build.rs caches each module by its flags, so switching back and forth is cheap) and
# copies it to .device/bin/gpu_bench_NAME. Run after scripts/prepare-device.sh (which wipes
# .device/); then on the device: BENCH_BINS="NAME ..." scripts/gpu-suite.sh bench-bins, or
# PHASE_BINS=... for the timing builds' per-phase clocks (stage phases). The device tool
# carries at most 64 MiB: each binary is ~6 MB, so pack them with scripts/pack-device.sh
# (xz: ~0.7 MB each; gpu-suite.sh unpacks) and name .device in the call's carry.
#   bash scripts/build-variants.sh base="" timed="-DMLA_PHASE_TIMING=1" x="-DMY_SWITCH=1"
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -d .device/bin ]] || { echo "run scripts/prepare-device.sh first" >&2; exit 1; }
for spec in "$@"; do
  name=${spec%%=*}
  flags=${spec#*=}
  [[ $name =~ ^[A-Za-z0-9_-]+$ ]] || { echo "bad variant name '$name'" >&2; exit 1; }
  echo "== $name: MLA_NVCC_FLAGS='$flags'"
  MLA_NVCC_FLAGS="$flags" MLA_KERNELS_REBUILD=1 cargo build --release -p mla-core --example gpu_bench --target-dir target-variants 2>&1 | tail -1
  cp target-variants/release/examples/gpu_bench ".device/bin/gpu_bench_$name"
  strip ".device/bin/gpu_bench_$name" || true
done
du -sh .device
