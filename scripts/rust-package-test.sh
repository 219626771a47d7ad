#!/usr/bin/env bash
# The Rust crates as a Rust user gets them: `cargo package` mla-kernels and mla-core, unpack
# the .crate files, and build a scratch project on them with NO CUDA compiler anywhere
# (no nvcc on PATH, no CUDA_HOME, no .cuda/ around the unpacked crates). It must run a CPU
# decode, report its kernels as built, and embed exactly the cubins of
# crates/mla-kernels/prebuilt/, which are those of the npm package's .node (both come from
# one build: scripts/prebuild-kernels.sh).
#
#   bash scripts/rust-package-test.sh     (after `npm run build`; `npm test` runs it)
#
# The scratch project's target folder is target/rust-package-test (kept: a rerun only
# rebuilds the two crates).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
die() { echo "rust-package-test: $*" >&2; exit 1; }
t0=$SECONDS

[[ -f crates/mla-kernels/prebuilt/MANIFEST.txt ]] || bash scripts/prebuild-kernels.sh
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

echo "== cargo package -p mla-kernels -p mla-core"
# --no-verify: the scratch build below is the verification, in a cleaner setting (no
# compiler); --allow-dirty: package the working tree as it is (prebuilt/ is git-ignored).
cargo package -q -p mla-kernels -p mla-core --no-verify --allow-dirty 2>&1 | grep -v 'manifest has no documentation\|= note: see\|^ *|$' || true
work=$(mktemp -d "${TMPDIR:-/tmp}/mla-rust-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/crates" "$work/app/src" "$work/cubins"
for c in mla-kernels mla-core; do
  f=target/package/$c-$version.crate
  [[ -f $f ]] || die "$f was not made"
  tar -xzf "$f" -C "$work/crates"
done
tar -tzf "target/package/mla-kernels-$version.crate" > "$work/kernels-files.txt"
for f in portable/decode/mla_decode.sm_80.cubin portable/decode/mla_decode.sm_86.cubin portable/decode/mla_decode.sm_89.cubin \
  portable/decode/mla_decode.sm_120.cubin portable/decode/mla_decode.compute_80.ptx common/plan/mla_plan.sm_90a.cubin sm90/decode/mla_decode_tma.sm_90a.cubin; do
  grep -q "prebuilt/$f" "$work/kernels-files.txt" || die "the mla-kernels crate carries no prebuilt $f"
done
[[ ! -e $work/crates/mla-kernels-$version/../../kernels ]] || die "a kernels/ folder sits above the unpacked crate"

cat > "$work/app/Cargo.toml" <<TOML
[package]
name = "mla-scratch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
mla-core = "$version"
mla-kernels = "$version"

# Not published: the unpacked .crate files stand in for crates.io.
[patch.crates-io]
mla-core = { path = "$work/crates/mla-core-$version" }
mla-kernels = { path = "$work/crates/mla-kernels-$version" }
TOML
cp Cargo.lock "$work/app/Cargo.lock"   # the versions the workspace was tested with
cat > "$work/app/src/main.rs" <<'RS'
use mla_core::{decode, plan, DType, DecodeOptions, Device, KvCache, KvCacheConfig, Tensor};

fn main() -> mla_core::Result<()> {
    let dev = Device::cpu();
    let mut cache = KvCache::new(&dev, KvCacheConfig { num_blocks: 4, dtype: DType::BF16 })?;
    let (a, b) = (cache.create_sequence(), cache.create_sequence());
    cache.append_f32(a, &vec![0.01; 100 * 576])?;
    cache.append_f32(b, &vec![0.02; 3 * 576])?;
    let (block_table, seqlens) = cache.batch(&[a, b], None)?;
    let (s_q, h_q) = (1, 16);
    let q = Tensor::from_f32(&dev, &vec![0.01; 2 * s_q * h_q * 576], &[2, s_q, h_q, 576], DType::BF16)?;
    let p = plan(&seqlens, s_q * h_q, 1)?;
    let r = decode(&q, cache.tensor(), &block_table, &seqlens, &p, &DecodeOptions::default())?;
    dev.synchronize()?;
    let out = r.out.to_f32()?;
    let lse = r.lse.to_f32()?;
    // Constant rows: out is the row value; lse = ln(len) + q.k * scale.
    assert!((out[0] - 0.01).abs() < 1e-4 && (out[out.len() - 1] - 0.02).abs() < 1e-4, "out {} {}", out[0], out[out.len() - 1]);
    let want = (100f32).ln() + 576.0 * 0.01 * 0.01 / 24.0;
    assert!((lse[0] - want).abs() < 1e-3, "lse {} vs {want}", lse[0]);
    println!("cpu decode: ok (out[0] = {}, lse[0] = {})", out[0], lse[0]);
    let s = mla_core::device::gpu_status();
    println!("kernels: built {} by {:?}; gpu: {:?}", s.kernels_built, s.kernels_compiler, s.reason);
    assert!(mla_kernels::available(), "no kernels: {}", mla_kernels::UNAVAILABLE_REASON);
    let dir = std::env::args().nth(1).expect("cubin output folder");
    for m in mla_kernels::MODULES {
        let ext = if m.is_ptx() { "ptx" } else { "cubin" };
        let path = format!("{dir}/{}.{}.{ext}", m.name.replace('/', "__"), m.arch);
        std::fs::write(&path, m.image).unwrap();
    }
    println!("modules: {} for {}", mla_kernels::MODULES.len(), mla_kernels::targets().join(", "));
    Ok(())
}
RS

echo "== build and run the scratch project (no CUDA compiler)"
# Nothing that could lead build.rs to a compiler: a PATH of system folders checked to hold
# no nvcc, and no CUDA variables.
clean_path=/usr/local/bin:/usr/bin:/bin
for d in ${clean_path//:/ }; do [[ ! -x $d/nvcc ]] || die "$d/nvcc exists: cannot test a build without nvcc"; done
cargo_bin=$(dirname "$(command -v cargo)")
(cd "$work/app" && env -u CUDA_HOME -u CUDA_PATH -u MLA_NVCC -u MLA_CUDA_DIR -u MLA_KERNELS_REBUILD -u NVCC_CCBIN \
  PATH="$cargo_bin:$clean_path" CARGO_TARGET_DIR="$root/target/rust-package-test" \
  cargo run -q --offline -- "$work/cubins") 2>&1 | tee "$work/run.log"
grep -q '^cpu decode: ok' "$work/run.log" || die "the scratch project did not decode"

echo "== the embedded cubins are the prebuilt ones, and the npm package's"
node_file=mla-decode.linux-x64-gnu.node
[[ -f $node_file ]] || die "$node_file is missing: run 'npm run build' first"
n=0
while read -r _ name arch; do
  ext=cubin; [[ $arch == compute_* ]] && ext=ptx
  f="$work/cubins/${name//\//__}.$arch.$ext"
  [[ -f $f ]] || die "the scratch project did not embed $name ($arch)"
  cmp -s "$f" "crates/mla-kernels/prebuilt/$name.$arch.$ext" || die "$name: the crate's image differs from prebuilt/$name.$arch.$ext"
  n=$((n + 1))
done < <(grep '^module ' crates/mla-kernels/prebuilt/MANIFEST.txt)
[[ $(ls "$work/cubins" | wc -l) == "$n" ]] || die "the scratch project embeds $(ls "$work/cubins" | wc -l) modules, the manifest lists $n"
python3 - "$node_file" "$work/cubins" <<'PY' || die "the .node does not embed the same cubins"
import os, sys
blob = open(sys.argv[1], "rb").read()
for f in sorted(os.listdir(sys.argv[2])):
    if open(os.path.join(sys.argv[2], f), "rb").read() not in blob:
        sys.exit(f"{f}: not in {sys.argv[1]}")
PY
echo "rust-package-test: ok ($n modules identical in the crate, prebuilt/ and $node_file; $((SECONDS - t0)) s)"
