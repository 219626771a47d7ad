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
for t in gpu_decode gpu_pipeline gpu_invariant gpu_multi; do
  cargo test --release -p mla-core --test $t --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    try: m=json.loads(l)
    except: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' $t \
    | tail -1 | xargs -I{} cp {} "$out/bin/$t"
done
cp target/release/examples/gpu_bench "$out/bin/"
# The cubins, for reading their SASS there (cuobjdump).
mkdir -p "$out/cubins"
# Those of this build's manifest (one per module and cubin target; the PTX has no SASS).
kout=$(dirname "$(ls -t target/release/build/mla-kernels-*/out/MANIFEST.txt | head -1)")
while read -r _ name arch; do
  [[ $arch == compute_* ]] || cp "$kout/$name.$arch.cubin" "$out/cubins/${name//\//__}.$arch.cubin"
done < <(grep '^module ' "$kout/MANIFEST.txt")
strip "$out/bin/"* || true

# Anchors (bench/anchors/; the ava bench test reads them from pkg/bench/anchors).
cp bench/anchors/*.csv "$out/anchors/"

# TypeScript: node binary (xz), the compiled package and the test runner (ava alone,
# installed from the npm cache into a scratch folder: the project's node_modules holds
# the build tools too and is five times larger).
if [[ "${1:-}" != "--no-node" ]]; then
  [[ -f dist/index.js && -f mla-decode.linux-x64-gnu.node ]] || { echo "run npm run build first" >&2; exit 1; }
  xz -T2 -6 -c "$(command -v node)" > "$out/node.xz"
  mkdir -p "$out/pkg"
  cp -r dist package.json binding.js binding.d.ts mla-decode.linux-x64-gnu.node "$out/pkg/"
  # api.test.ts checks ERROR_CODES against the core's source (read from ../../crates).
  mkdir -p "$out/pkg/crates/mla-core/src" && cp crates/mla-core/src/error.rs "$out/pkg/crates/mla-core/src/"
  mkdir -p "$out/pkg/bench" && cp -r bench/anchors "$out/pkg/bench/"
  ava_version=$(node -p 'require("./node_modules/ava/package.json").version')
  scratch=$(mktemp -d)
  (cd "$scratch" && echo '{"name":"ava-only","version":"1.0.0"}' > package.json &&
    npm install --prefer-offline --no-audit --no-fund "ava@$ava_version" >/dev/null &&
    tar -cJf "$root/$out/node_modules.tar.xz" node_modules)
  rm -rf "$scratch"
fi
du -sh "$out" "$out"/* | sort -h
