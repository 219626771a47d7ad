#!/usr/bin/env bash
# Builds here everything the GPU suite needs and lays it out in .device/ (git-ignored),
# which the device tool carries to the lent GPU machine (no cargo, no node there).
#   bash scripts/prepare-device.sh [--no-node]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=.device
rm -rf "$out"
mkdir -p "$out/bin" "$out/anchors"

# Rust: the GPU tests and the benchmark, release builds with the embedded cubins.
cargo build --release -p mla-core --example gpu_bench
cargo test --release -p mla-core --test gpu_decode --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys,json
for l in sys.stdin:
    try: m=json.loads(l)
    except: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="gpu_decode": print(m["executable"])' \
  | tail -1 | xargs -I{} cp {} "$out/bin/gpu_decode"
cp target/release/examples/gpu_bench "$out/bin/"
# The cubins, for reading their SASS there (cuobjdump).
mkdir -p "$out/cubins"
cp "$(ls -td target/release/build/mla-kernels-*/out | head -1)"/*/*.cubin "$out/cubins/"
strip "$out/bin/"* || true

# Anchors (../shared does not travel with the working tree).
cp ../shared/anchors/*.csv "$out/anchors/" 2>/dev/null || true

# TypeScript: node binary (xz), the compiled package and the test runner.
if [[ "${1:-}" != "--no-node" && -f dist/index.js ]]; then
  xz -T2 -6 -c "$(command -v node)" > "$out/node.xz"
  mkdir -p "$out/pkg"
  cp -r dist package.json "$out/pkg/"
  cp binding.js binding.d.ts "$out/pkg/" 2>/dev/null || true
  cp ./*.node "$out/pkg/" 2>/dev/null || true
  # ava and its dependencies, pruned of docs
  if [[ -d node_modules ]]; then
    tar -C . -cJf "$out/node_modules.tar.xz" node_modules
  fi
fi
du -sh "$out" "$out"/* | sort -h
