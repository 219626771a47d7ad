#!/usr/bin/env bash
# Installs the CUDA 12.9 device compiler from NVIDIA's PyPI wheels into <repo root>/.cuda:
#
#   .cuda/bin/ptxas                      PTX -> sm_90a cubin (nvidia-cuda-nvcc-cu12)
#   .cuda/lib/libnvrtc.so.12 (+ builtins) CUDA C++ -> PTX (nvidia-cuda-nvrtc-cu12)
#   .cuda/include/{cuda_runtime.h,cuda_bf16.h,cuda_fp16.h,math_constants.h,crt/,cuda/,cub/,nv/,thrust/,...}
#   .cuda/lib/libcudart.so.12, .cuda/lib64 -> lib
#   .cuda/mla-cuda-pins.txt              (the wheel pins this tree was made from)
#
# Why NVRTC + ptxas and not nvcc: the CUDA 12.x wheels carry no nvcc driver (nor cicc,
# cudafe++, fatbinary): nvidia-cuda-nvcc-cu12 12.9.86 holds ptxas, the crt headers and
# libnvvm only. NVRTC is the same front end and NVVM optimizer as nvcc's device pass, and
# the kernels are device-only code, so NVRTC (to PTX) then ptxas (to the cubin) is the
# nvcc device pipeline without the host half. crates/mla-kernels/build.rs finds this tree
# on its own and drives both; a full toolkit's nvcc ($MLA_NVCC, $CUDA_HOME, PATH) also works.
#
# Why 12.9 and not 13.x: a cubin loads on a driver of the same CUDA major version or newer
# (minor-version compatibility within 12.x), so CUDA 12.9 cubins load on every driver from
# R525 (CUDA 12.0) on; CUDA 13 cubins need an R580 driver.
#
# No GPU or driver is needed, and no host C++ compiler either. Idempotent: a tree made from
# the same pins that passes the checks is kept as it is (use --force to reinstall).
#
# Needs: python3 with pip, network access to PyPI.
# Environment: MLA_CUDA_DIR overrides the target folder (default <repo root>/.cuda).
set -euo pipefail

PINS=(
  nvidia-cuda-nvcc-cu12==12.9.86
  nvidia-cuda-nvrtc-cu12==12.9.86
  nvidia-cuda-runtime-cu12==12.9.79
  nvidia-cuda-cccl-cu12==12.9.27
)
WANT_RELEASE="12.9"

say() { printf 'install-cuda: %s\n' "$*"; }
die() { printf 'install-cuda: error: %s\n' "$*" >&2; exit 1; }

FORCE=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$a' (usage: $0 [--force])" ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${MLA_CUDA_DIR:-$ROOT/.cuda}"
PIN_TEXT="$(printf '%s\n' "${PINS[@]}")"
PY="${PYTHON:-python3}"

# A small kernel that exercises what the project's kernels need, through the same pipeline
# as build.rs (NVRTC with its options, then ptxas): the bf16/fp16 headers, <stdint.h> and
# INFINITY (from crates/mla-kernels/nvrtc/, which stands in for the host headers nvcc
# includes), inline-PTX mma.sync and wgmma, TMA (cp.async.bulk.tensor), mbarrier and
# griddepcontrol, all assembled for sm_90a. The cubin must name the sm_90a features.
smoke_test() { # $1 = toolkit dir
  local tk="$1" dir
  dir="$(mktemp -d)"
  cat >"$dir/smoke.cu" <<'CU'
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>
#include <cuda/std/cstdint>
struct alignas(64) TmaDesc { unsigned char bytes[128]; };  // a CUtensorMap, opaque here
extern "C" __global__ void __launch_bounds__(128) smoke(const __nv_bfloat16* a, const __half* b, float* o,
                                                        const __grid_constant__ TmaDesc tmap) {
    __shared__ alignas(128) __nv_bfloat16 tile[64 * 64];
    __shared__ alignas(8) uint64_t bar;
    // Programmatic dependent launch: wait for the previous grid, let the next one start.
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    uint32_t bar_s = static_cast<uint32_t>(__cvta_generic_to_shared(&bar));
    uint32_t tile_s = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" :: "r"(bar_s));
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar_s), "r"(64 * 64 * 2));
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                     :: "r"(tile_s), "l"(reinterpret_cast<uint64_t>(&tmap)), "r"(0), "r"(0), "r"(bar_s) : "memory");
    }
    __syncthreads();
    asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n"
                 :: "r"(bar_s), "r"(0) : "memory");
    uint32_t A[4], B[2];
    float C[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < 4; ++i) A[i] = reinterpret_cast<const uint32_t*>(a)[threadIdx.x * 4 + i];
    for (int i = 0; i < 2; ++i) B[i] = reinterpret_cast<const uint32_t*>(a)[threadIdx.x * 2 + i + 128];
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(C[0]), "+f"(C[1]), "+f"(C[2]), "+f"(C[3])
        : "r"(A[0]), "r"(A[1]), "r"(A[2]), "r"(A[3]), "r"(B[0]), "r"(B[1]));
    // One warpgroup MMA, both operands from shared memory (descriptors of the TMA tile).
    float D[4] = {0.f, 0.f, 0.f, 0.f};
    uint64_t desc = (static_cast<uint64_t>((tile_s & 0x3FFFF) >> 4)) | (1ull << 16) | (64ull << 32) | (1ull << 62);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %6, 0;\n"
        " wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, %4, %5, p, 1, 1, 0, 0;\n}\n"
        : "+f"(D[0]), "+f"(D[1]), "+f"(D[2]), "+f"(D[3]) : "l"(desc), "l"(desc), "r"(0));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    __half h = __hadd(b[threadIdx.x], __float2half_rn(C[0]));
    float inf = (D[0] > 1e30f) ? INFINITY : CUDART_ZERO_F;
    cuda::std::int32_t one = 1;
    o[threadIdx.x] = C[0] + C[1] + C[2] + C[3] + D[0] + D[1] + D[2] + D[3] + __half2float(h)
                   + __bfloat162float(__float2bfloat16_rn(C[1])) + inf + float(one);
}
CU
  local ok=0
  if "$PY" "$ROOT/scripts/nvrtc-compile.py" --toolkit "$tk" --arch 90a \
       -I "$ROOT/crates/mla-kernels/nvrtc" --pre-include "$ROOT/crates/mla-kernels/nvrtc/mla_nvrtc_prelude.h" \
       "$dir/smoke.cu" -o "$dir/smoke.cubin" >"$dir/log" 2>&1 \
     && [ "$(head -c 4 "$dir/smoke.cubin" | od -An -c | tr -d ' ')" = '177ELF' ] \
     && grep -q "Compiling entry function 'smoke' for 'sm_90a'" "$dir/log"; then
    ok=1
  fi
  if [ "$ok" != 1 ]; then
    cat "$dir/log" >&2
    rm -rf "$dir"
    return 1
  fi
  rm -rf "$dir"
}

installed_ok() {
  [ -x "$DEST/bin/ptxas" ] || return 1
  # Captured first: with pipefail, `ptxas | grep -q` fails whenever grep exits before
  # ptxas has written everything (SIGPIPE).
  local v
  v=$("$DEST/bin/ptxas" --version 2>/dev/null) || return 1
  grep -q "release $WANT_RELEASE," <<<"$v" || return 1
  [ -f "$DEST/mla-cuda-pins.txt" ] && [ "$(cat "$DEST/mla-cuda-pins.txt")" = "$PIN_TEXT" ] || return 1
  [ -f "$DEST/lib/libnvrtc.so.12" ] && [ -f "$DEST/include/cuda_runtime.h" ] \
    && [ -d "$DEST/include/crt" ] && [ -d "$DEST/include/cuda/std" ] || return 1
}

if [ "$FORCE" = 0 ] && installed_ok; then
  say "CUDA $WANT_RELEASE compiler (NVRTC + ptxas) already installed in $DEST ($("$DEST/bin/ptxas" --version | grep -o 'V[0-9][0-9.]*')); nothing to do"
  exit 0
fi

# --- prerequisites -------------------------------------------------------------------
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) die "the CUDA wheels pinned here are for Linux x86_64; this is $(uname -s)-$(uname -m)" ;;
esac
command -v "$PY" >/dev/null || die "python3 not found (needed to fetch the CUDA wheels from PyPI)"
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work; install pip (e.g. apt-get install python3-pip)"

# --- fetch and lay out ---------------------------------------------------------------
mkdir -p "$(dirname "$DEST")"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/mla-cuda-stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

say "installing into $DEST from PyPI: ${PINS[*]}"
t0=$(date +%s)
# pip keeps the wheels in its cache, so a reinstall does not download them again.
if ! PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "$PY" -m pip install \
      --no-deps --only-binary=:all: --no-compile --ignore-installed --progress-bar off \
      --target "$STAGE/site" "${PINS[@]}" >"$STAGE/pip.log" 2>&1; then
  cat "$STAGE/pip.log" >&2
  die "pip could not install the CUDA wheels (see above)"
fi
grep -E '^ *(Downloading|Using cached)' "$STAGE/pip.log" | sed 's/^/install-cuda:   /' || true
t1=$(date +%s)

# The 12.x wheels install one folder each under nvidia/ (cuda_nvcc, cuda_nvrtc,
# cuda_runtime, cuda_cccl), each with its own bin/include/lib: merge them into one tree.
N="$STAGE/site/nvidia"
for p in cuda_nvcc/bin/ptxas cuda_nvcc/include/crt cuda_nvrtc/lib/libnvrtc.so.12 cuda_nvrtc/include/nvrtc.h \
         cuda_runtime/include/cuda_runtime.h cuda_runtime/include/cuda_bf16.h cuda_runtime/include/math_constants.h \
         cuda_runtime/lib/libcudart.so.12 cuda_cccl/include/cuda/std/cstdint; do
  [ -e "$N/$p" ] || die "the wheels did not provide nvidia/$p (wheel layout changed?); found: $(ls "$N" 2>/dev/null | tr '\n' ' ')"
done
ls "$N"/cuda_nvrtc/lib/libnvrtc-builtins.so.12.* >/dev/null 2>&1 || die "the NVRTC wheel has no libnvrtc-builtins.so.12.*"

TREE="$STAGE/tree"
mkdir -p "$TREE/bin" "$TREE/lib" "$TREE/include"
cp "$N/cuda_nvcc/bin/ptxas" "$TREE/bin/"
cp -r "$N"/cuda_nvcc/include/. "$N"/cuda_runtime/include/. "$N"/cuda_nvrtc/include/. "$N"/cuda_cccl/include/. "$TREE/include/"
# libnvrtc finds its builtins next to itself; the .alt variants are not used.
cp "$N"/cuda_nvrtc/lib/libnvrtc.so.12 "$N"/cuda_nvrtc/lib/libnvrtc-builtins.so.12.* "$TREE/lib/"
cp "$N"/cuda_runtime/lib/libcudart.so.12 "$TREE/lib/"
find "$TREE/include" -name '__init__.py' -delete
ln -s libnvrtc.so.12 "$TREE/lib/libnvrtc.so"
ln -s libcudart.so.12 "$TREE/lib/libcudart.so"
ln -s lib "$TREE/lib64"
chmod -R a+rX "$TREE"
chmod a+x "$TREE/bin/ptxas"
printf '%s\n' "$PIN_TEXT" >"$TREE/mla-cuda-pins.txt"

ptxas_version=$("$TREE/bin/ptxas" --version 2>&1) || die "the installed ptxas does not run: $ptxas_version"
grep -q "release $WANT_RELEASE," <<<"$ptxas_version" \
  || die "the installed ptxas does not report release $WANT_RELEASE: $(tail -2 <<<"$ptxas_version")"
say "testing: NVRTC + ptxas to an sm_90a cubin (bf16/fp16 headers, mma.sync, wgmma, TMA, mbarrier, griddepcontrol)"
smoke_test "$TREE" || die "the test kernel did not compile to an sm_90a cubin with the toolkit in $TREE (log above)"

rm -rf "$DEST"
mv "$TREE" "$DEST"
# build.rs of crates/mla-kernels cannot watch a .cuda that did not exist yet (cargo reruns a
# build script on every build while one of its watched paths is missing), so a build made
# before this install was CPU-only: touching build.rs makes the next cargo build look again.
[ -f "$ROOT/crates/mla-kernels/build.rs" ] && touch "$ROOT/crates/mla-kernels/build.rs" || true
t2=$(date +%s)
say "installed ptxas $("$DEST/bin/ptxas" --version | grep -o 'release [0-9.]*, V[0-9.]*') and NVRTC in $DEST ($(du -sh "$DEST" | cut -f1)); fetch $((t1 - t0)) s, total $((t2 - t0)) s"
say "build.rs of crates/mla-kernels uses $DEST automatically (or set MLA_NVCC to a full toolkit's nvcc)"
