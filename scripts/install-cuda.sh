#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc, ptxas, cicc, the CUDA headers and CCCL) from
# NVIDIA's PyPI wheels into <repo root>/.cuda, laid out as a normal toolkit tree:
#
#   .cuda/bin/{nvcc,ptxas,cudafe++,fatbinary,nvlink,bin2c,nvcc.profile,crt/}
#   .cuda/nvvm/{bin/cicc,libdevice/libdevice.10.bc}
#   .cuda/include/{cuda_runtime.h,cuda_bf16.h,cuda_fp16.h,crt/,cccl/{cuda,cub,thrust,nv}/,...}
#   .cuda/lib/{libcudart.so.13,libcudart.so,libcudart_static.a,libcudadevrt.a,libnvvm.so.4}
#   .cuda/lib64 -> lib
#   .cuda/mla-cuda-pins.txt   (the wheel pins this tree was made from)
#
# Only the compiler is installed: no driver, no GPU needed. build.rs of crates/mla-kernels
# finds .cuda/bin/nvcc on its own. Idempotent: a tree whose nvcc reports release 13.0 and
# which was made from the same pins is kept as it is (use --force to reinstall).
#
# Needs: python3 with pip, network access to PyPI, a host C++ compiler (g++ <= 14).
# Environment: MLA_CUDA_DIR overrides the target folder (default <repo root>/.cuda).
set -euo pipefail

PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
)
WANT_RELEASE="13.0"

say() { printf 'install-cuda: %s\n' "$*"; }
die() { printf 'install-cuda: error: %s\n' "$*" >&2; exit 1; }

FORCE=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$a' (usage: $0 [--force])" ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${MLA_CUDA_DIR:-$ROOT/.cuda}"
PIN_TEXT="$(printf '%s\n' "${PINS[@]}")"

# A small kernel that exercises what the project's kernels need: bf16/fp16 headers
# (crt/ + CCCL through cuda_fp16.hpp), inline-PTX mma.sync, and sm_90a code generation.
smoke_test() { # $1 = toolkit dir
  local tk="$1" dir
  dir="$(mktemp -d)"
  cat >"$dir/smoke.cu" <<'EOF'
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/cstdint>
extern "C" __global__ void smoke(const __nv_bfloat16* a, const __half* b, float* o) {
    uint32_t A[4], B[2];
    float C[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < 4; ++i) A[i] = reinterpret_cast<const uint32_t*>(a)[threadIdx.x * 4 + i];
    for (int i = 0; i < 2; ++i) B[i] = reinterpret_cast<const uint32_t*>(a)[threadIdx.x * 2 + i + 128];
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(C[0]), "+f"(C[1]), "+f"(C[2]), "+f"(C[3])
        : "r"(A[0]), "r"(A[1]), "r"(A[2]), "r"(A[3]), "r"(B[0]), "r"(B[1]));
    __half h = __hadd(b[threadIdx.x], __float2half_rn(C[0]));
    o[threadIdx.x] = C[0] + C[1] + C[2] + C[3] + __half2float(h) + __bfloat162float(__float2bfloat16_rn(C[1]));
}
EOF
  local ok=0
  if "$tk/bin/nvcc" -gencode arch=compute_90a,code=sm_90a -cubin -O3 -std=c++17 \
       "$dir/smoke.cu" -o "$dir/smoke.cubin" >"$dir/log" 2>&1 \
     && [ "$(head -c 4 "$dir/smoke.cubin" | od -An -c | tr -d ' ')" = '177ELF' ]; then
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
  [ -x "$DEST/bin/nvcc" ] || return 1
  "$DEST/bin/nvcc" --version 2>/dev/null | grep -q "release $WANT_RELEASE," || return 1
  [ -f "$DEST/mla-cuda-pins.txt" ] && [ "$(cat "$DEST/mla-cuda-pins.txt")" = "$PIN_TEXT" ] || return 1
  [ -x "$DEST/bin/ptxas" ] && [ -x "$DEST/nvvm/bin/cicc" ] && [ -f "$DEST/include/cuda_runtime.h" ] \
    && [ -d "$DEST/include/crt" ] && [ -d "$DEST/include/cccl/cuda" ] || return 1
}

if [ "$FORCE" = 0 ] && installed_ok; then
  say "CUDA $WANT_RELEASE compiler already installed in $DEST ($("$DEST/bin/nvcc" --version | grep -o 'V[0-9][0-9.]*')); nothing to do"
  exit 0
fi

# --- prerequisites -------------------------------------------------------------------
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) die "the CUDA wheels pinned here are for Linux x86_64; this is $(uname -s)-$(uname -m)" ;;
esac
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "python3 not found (needed to fetch the CUDA wheels from PyPI)"
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work; install pip (e.g. apt-get install python3-pip)"
HOSTCXX="${NVCC_CCBIN:-}"
if [ -z "$HOSTCXX" ]; then
  for c in g++ c++ clang++; do command -v "$c" >/dev/null && { HOSTCXX="$c"; break; }; done
fi
[ -n "$HOSTCXX" ] || die "no host C++ compiler (g++) found; nvcc needs one (apt-get install g++)"

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

# All five wheels install under nvidia/cu13/ (bin, nvvm, include, lib); some older
# releases used nvidia/cuda_nvcc/ etc. instead, so find the tree rather than assume it.
SRC=""
for cand in "$STAGE/site/nvidia/cu13" "$STAGE/site/nvidia/cuda_nvcc"; do
  [ -x "$cand/bin/nvcc" ] && { SRC="$cand"; break; }
done
[ -n "$SRC" ] || die "unexpected wheel layout: no bin/nvcc under $STAGE/site/nvidia/* ($(ls "$STAGE/site/nvidia" 2>/dev/null | tr '\n' ' '))"
for p in bin/ptxas nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc include/cuda_runtime.h include/crt include/cccl/cuda include/cuda_bf16.h; do
  [ -e "$SRC/$p" ] || die "the wheels did not provide $p (wheel layout changed?)"
done

TREE="$STAGE/tree"
mv "$SRC" "$TREE"
rm -rf "$TREE/.metadata"
chmod -R a+rX "$TREE"
chmod a+x "$TREE"/bin/* "$TREE"/nvvm/bin/* 2>/dev/null || true
[ -e "$TREE/lib64" ] || ln -s lib "$TREE/lib64"
[ -e "$TREE/lib/libcudart.so" ] || [ ! -e "$TREE/lib/libcudart.so.13" ] || ln -s libcudart.so.13 "$TREE/lib/libcudart.so"
printf '%s\n' "$PIN_TEXT" >"$TREE/mla-cuda-pins.txt"

"$TREE/bin/nvcc" --version | grep -q "release $WANT_RELEASE," \
  || die "the installed nvcc does not report release $WANT_RELEASE: $("$TREE/bin/nvcc" --version 2>&1 | tail -2)"
say "testing: nvcc -gencode arch=compute_90a,code=sm_90a -cubin (bf16/fp16 headers, mma.sync) with host compiler $HOSTCXX"
smoke_test "$TREE" || die "the test kernel did not compile to an sm_90a cubin with $TREE/bin/nvcc (log above)"

rm -rf "$DEST"
mv "$TREE" "$DEST"
# build.rs of crates/mla-kernels cannot watch a .cuda that did not exist yet (cargo reruns a
# build script on every build while one of its watched paths is missing), so a build made
# before this install was CPU-only: touching build.rs makes the next cargo build look again.
[ -f "$ROOT/crates/mla-kernels/build.rs" ] && touch "$ROOT/crates/mla-kernels/build.rs" || true
t2=$(date +%s)
say "installed $("$DEST/bin/nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*') in $DEST ($(du -sh "$DEST" | cut -f1)); fetch $((t1 - t0)) s, total $((t2 - t0)) s"
say "build.rs of crates/mla-kernels uses $DEST/bin/nvcc automatically (or set MLA_NVCC)"
