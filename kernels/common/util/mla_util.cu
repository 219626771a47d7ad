// Small device utilities for benchmarks and tests: fill a tensor with pseudo-random
// values without a host round trip (a multi-GiB cache would take minutes from the host).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// SplitMix64: a cheap, well-mixed hash of (seed, index).
__device__ __forceinline__ uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// normal(0, std) by Box-Muller from two 32-bit uniforms, clamped to [-clamp, clamp]
// when clamp > 0.
__device__ __forceinline__ float normal(uint64_t seed, uint64_t i, float std, float clamp) {
    const uint64_t h = mix(seed ^ mix(i));
    const float u1 = ((float)(h >> 40) + 1.f) * (1.f / 16777217.f);  // (0, 1]
    const float u2 = (float)(h & 0xFFFFFF) * (1.f / 16777216.f);
    float v = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2) * std;
    if (clamp > 0.f) v = fminf(fmaxf(v, -clamp), clamp);
    return v;
}

template <typename T> __device__ T from_f(float);
template <> __device__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __half from_f(float v) { return __float2half_rn(v); }

template <typename T>
__device__ void fill(T* dst, uint64_t n, uint64_t seed, float std, float clamp) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x)
        dst[i] = from_f<T>(normal(seed, i, std, clamp));
}

}  // namespace

extern "C" __global__ void mla_fill_random_bf16(__nv_bfloat16* dst, uint64_t n, uint64_t seed, float std, float clamp) {
    fill(dst, n, seed, std, clamp);
}
extern "C" __global__ void mla_fill_random_fp16(__half* dst, uint64_t n, uint64_t seed, float std, float clamp) {
    fill(dst, n, seed, std, clamp);
}
