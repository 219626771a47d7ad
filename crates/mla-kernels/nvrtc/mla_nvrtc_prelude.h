// Pre-included into every kernel compiled with NVRTC (build.rs, scripts/nvrtc-compile.py):
// what nvcc's implicit host headers (cuda_runtime.h -> math.h, limits.h) give the kernels
// and NVRTC does not. Only what kernels/ uses; extend when a kernel needs more.
#pragma once
#include <stdint.h>
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif
#ifndef INT_MAX
#define INT_MAX 2147483647
#endif
#ifndef INT_MIN
#define INT_MIN (-INT_MAX - 1)
#endif
#ifndef UINT_MAX
#define UINT_MAX 4294967295u
#endif
