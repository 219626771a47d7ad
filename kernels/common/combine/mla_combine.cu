// Combine pass of split-KV decoding: merges the partial results of sequences that the
// plan cut into several splits.
//
// Launch: grid (b, ceil(rows / 8)), block 256 = 8 warps, no dynamic smem. One warp per
// query row r = blockIdx.y * 8 + warp of sequence i = blockIdx.x; each lane owns 16
// contiguous output columns (512 / 32).
//
//   n = num_splits[i + 1] - num_splits[i]
//   n == 1: nothing to do (the decode kernel wrote out and lse itself);
//   n == 0: out = 0, lse = +inf (no key attended);
//   n  > 1: slots s = num_splits[i] .. + n of
//             oaccum   [slot][rows][512] f32, each already normalised (o / l),
//             lseaccum [slot][rows]      f32 (-inf for a split that attended no key;
//             +inf is taken to mean the same);
//           m = max lse_s; m == -inf: out = 0, lse = +inf; otherwise
//           w_s = exp(lse_s - m), out = sum w_s o_s / sum w_s, lse = m + log(sum w_s).
//
// out: [b, s_q, h_q, 512] (row ((i * rows) + r) * 512), lse: [b, h_q, s_q], r = j * h_q + h.
// Accurate expf/logf (no fast math); outputs rounded to nearest. A split with weight 0 is
// skipped entirely, so whatever its oaccum holds (even NaN) cannot reach the result.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mla_params.cuh"

#define MLA_COMBINE_WARPS 8
#define MLA_DV 512
#define MLA_COLS_PER_LANE (MLA_DV / 32)

namespace {

template <typename T>
struct Pack;

template <>
struct Pack<__nv_bfloat16> {
    __device__ __forceinline__ static uint32_t two(float a, float b) {
        __nv_bfloat162 v = __floats2bfloat162_rn(a, b);  // .x = a (low half), .y = b
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

template <>
struct Pack<__half> {
    __device__ __forceinline__ static uint32_t two(float a, float b) {
        __half2 v = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// A split's lse; +inf (the final-output convention for "no key") counts as -inf too, so
// that an empty split has weight 0 whichever convention the decode kernel wrote.
__device__ __forceinline__ float split_lse(const float* ptr) {
    const float l = *ptr;
    return l == INFINITY ? -INFINITY : l;
}

// Plain loads, not __ldg: with programmatic dependent launch a read-only (.nc) load of the
// decode's partials could be scheduled above griddepcontrol.wait.
__device__ __forceinline__ float4 ld_f4(const float* ptr) {
    return *reinterpret_cast<const float4*>(ptr);
}

template <typename T>
__device__ __forceinline__ void combine(const MlaCombineParams& p) {
    // Launched as a programmatic dependent of the decode (MLA_PDL=1): nothing it wrote may be
    // read before this (a no-op in an ordinary launch).
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    const int i = blockIdx.x;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int rows = p.rows;
    const int r = blockIdx.y * MLA_COMBINE_WARPS + warp;
    if (i >= p.b || r >= rows) return;

    // A plan made for other lengths: report it (the combine visits every sequence).
    if (r == 0 && lane == 0 && p.seqlens[i] != p.plan_seqlens[i]) atomicOr(p.error_flag, MLA_ERR_PLAN);
    const int first = p.num_splits[i];
    int n = p.num_splits[i + 1] - first;
    if (n == 1) return;
    if (first < 0 || n < 0 || first + n > p.slots) {  // never index past the slots
        if (lane == 0) atomicOr(p.error_flag, MLA_ERR_PLAN);
        n = 0;
    }

    float acc[MLA_COLS_PER_LANE];
#pragma unroll
    for (int c = 0; c < MLA_COLS_PER_LANE; ++c) acc[c] = 0.f;
    float lse_out = INFINITY;

    if (n > 1) {
        const float* lse_in = p.lseaccum + (size_t)first * rows + r;  // stride rows per slot
        // Pass 1: max and sum of weights over the slots, lanes in parallel.
        float m = -INFINITY;
        for (int s = lane; s < n; s += 32) m = fmaxf(m, split_lse(lse_in + (size_t)s * rows));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (m != -INFINITY) {
            float sum = 0.f;
            for (int s = lane; s < n; s += 32) sum += expf(split_lse(lse_in + (size_t)s * rows) - m);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            const float inv_sum = 1.f / sum;  // sum >= 1: the max term is exp(0)
            lse_out = m + logf(sum);

            // Pass 2: weighted sum of the partial outputs (16 contiguous columns per lane).
            const float* o_in = p.oaccum + ((size_t)first * rows + r) * MLA_DV + lane * MLA_COLS_PER_LANE;
            const size_t slot_stride = (size_t)rows * MLA_DV;
            for (int s = 0; s < n; ++s) {
                const float l = split_lse(lse_in + (size_t)s * rows);  // same address in every lane
                if (l == -INFINITY) continue;              // weight 0: skip (warp-uniform)
                const float w = expf(l - m) * inv_sum;
                const float* src = o_in + (size_t)s * slot_stride;
                float4 v[MLA_COLS_PER_LANE / 4];
#pragma unroll
                for (int k = 0; k < MLA_COLS_PER_LANE / 4; ++k) v[k] = ld_f4(src + 4 * k);
#pragma unroll
                for (int k = 0; k < MLA_COLS_PER_LANE / 4; ++k) {
                    acc[4 * k + 0] = fmaf(w, v[k].x, acc[4 * k + 0]);
                    acc[4 * k + 1] = fmaf(w, v[k].y, acc[4 * k + 1]);
                    acc[4 * k + 2] = fmaf(w, v[k].z, acc[4 * k + 2]);
                    acc[4 * k + 3] = fmaf(w, v[k].w, acc[4 * k + 3]);
                }
            }
        }
    }

    // n == 0, all splits empty, or the merged result: 16 columns = 32 bytes per lane.
    uint4 packed[2];
    uint32_t* words = reinterpret_cast<uint32_t*>(packed);
#pragma unroll
    for (int c = 0; c < MLA_COLS_PER_LANE / 2; ++c) words[c] = Pack<T>::two(acc[2 * c], acc[2 * c + 1]);
    T* out = reinterpret_cast<T*>(p.out) + ((size_t)i * rows + r) * MLA_DV + lane * MLA_COLS_PER_LANE;
    reinterpret_cast<uint4*>(out)[0] = packed[0];
    reinterpret_cast<uint4*>(out)[1] = packed[1];
    if (lane == 0) {
        const int h = r % p.h_q, j = r / p.h_q;
        p.lse[(size_t)i * p.h_q * p.s_q + (size_t)h * p.s_q + j] = lse_out;
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(MLA_COMBINE_WARPS * 32) mla_combine_bf16(const MlaCombineParams p) {
    combine<__nv_bfloat16>(p);
}

extern "C" __global__ void __launch_bounds__(MLA_COMBINE_WARPS * 32) mla_combine_fp16(const MlaCombineParams p) {
    combine<__half>(p);
}
