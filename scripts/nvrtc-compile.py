#!/usr/bin/env python3
"""Compiles one CUDA C++ file to a cubin the way crates/mla-kernels/build.rs does with the
.cuda/ toolkit of scripts/install-cuda.sh: NVRTC (CUDA C++ -> PTX), then ptxas (PTX ->
cubin, with its resource report). For the install smoke test and for checking a kernel by
hand:

  python3 scripts/nvrtc-compile.py kernels/sm90/decode/mla_decode_tma.cu -o /tmp/d.cubin \\
      -I kernels/sm90 -I kernels/common -I kernels -I crates/mla-kernels/nvrtc \\
      --pre-include crates/mla-kernels/nvrtc/mla_nvrtc_prelude.h

Keep the options in step with build.rs (nvrtc_options / ptxas_args there).
"""
import argparse
import ctypes
import os
import subprocess
import sys


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("-o", "--output", required=True, help="cubin to write (the PTX goes next to it)")
    ap.add_argument("--toolkit", default=os.path.join(root, ".cuda"))
    ap.add_argument("--arch", default="90a", help="compute_<arch> / sm_<arch>")
    ap.add_argument("-I", dest="includes", action="append", default=[])
    ap.add_argument("--pre-include", dest="pre", action="append", default=[])
    a = ap.parse_args()

    lib = ctypes.CDLL(os.path.join(a.toolkit, "lib", "libnvrtc.so.12"))
    with open(a.src, "rb") as f:
        src = f.read()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, a.src.encode(), 0, None, None)
    if rc != 0:
        print(f"nvrtcCreateProgram failed: {rc}", file=sys.stderr)
        return 1
    opts = [f"--gpu-architecture=compute_{a.arch}", "-std=c++17", "--generate-line-info"]
    opts += [f"--pre-include={p}" for p in a.pre]
    opts += [f"-I{i}" for i in a.includes] + [f"-I{os.path.join(a.toolkit, 'include')}"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    if text:
        print(text)
    if rc != 0:
        print(f"NVRTC failed ({rc}): nvrtc {' '.join(opts)} {a.src}", file=sys.stderr)
        return 1
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    ptx_path = os.path.splitext(a.output)[0] + ".ptx"
    with open(ptx_path, "wb") as f:
        f.write(ptx.value)
    cmd = [os.path.join(a.toolkit, "bin", "ptxas"), f"-arch=sm_{a.arch}", "-O3", "-v",
           "--generate-line-info", ptx_path, "-o", a.output]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(r.stdout, end="")
    if r.returncode != 0:
        print(f"ptxas failed ({r.returncode}): {' '.join(cmd)}", file=sys.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
