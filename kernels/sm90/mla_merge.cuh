// The combine step of split-KV decoding, fused into the decode kernels: the last thread
// block to finish a split sequence's row tile merges the partial results of its splits.
// (It was a separate kernel launch; fusing it removes that launch and its gap.)
//
//   n = num_splits[i + 1] - num_splits[i] partial slots s = num_splits[i] .. + n of
//     oaccum   [slot][rows][512] f32, each already normalised (o / l),
//     lseaccum [slot][rows]      f32 (-inf for a split that attended no key);
//   m = max lse_s; m == -inf: out = 0, lse = +inf; otherwise w_s = exp(lse_s - m),
//   out = sum w_s o_s / sum w_s, lse = m + log(sum w_s). A split of weight 0 is skipped,
//   so whatever its slot holds cannot reach the result.
#pragma once
#include "mla_common.cuh"

namespace mla {

// Writes out row r of sequence `seq` (and its lse) from its n partial slots; n == 0 gives
// out = 0, lse = +inf. One warp per row: each lane owns 16 contiguous columns.
template <typename T>
__device__ void merge_row(const MlaDecodeParams& p, int seq, int r, int first, int n, int lane) {
    constexpr int COLS = DV / 32;
    float acc[COLS];
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[c] = 0.f;
    float lse_out = CUDART_INF_F;
    const float* lse_in = p.lseaccum + (size_t)first * p.rows + r;  // stride rows per slot
    float m = -CUDART_INF_F;
    for (int s = lane; s < n; s += 32) m = fmaxf(m, __ldcg(lse_in + (size_t)s * p.rows));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (m != -CUDART_INF_F) {
        float sum = 0.f;
        for (int s = lane; s < n; s += 32) sum += expf(__ldcg(lse_in + (size_t)s * p.rows) - m);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        const float inv_sum = 1.f / sum;  // sum >= 1: the max term is exp(0)
        lse_out = m + logf(sum);
        const float* o_in = p.oaccum + ((size_t)first * p.rows + r) * DV + lane * COLS;
        for (int s = 0; s < n; ++s) {
            const float l = __ldcg(lse_in + (size_t)s * p.rows);
            if (l == -CUDART_INF_F) continue;  // weight 0 (warp-uniform)
            const float w = expf(l - m) * inv_sum;
            const float4* src = reinterpret_cast<const float4*>(o_in + (size_t)s * p.rows * DV);
#pragma unroll
            for (int k = 0; k < COLS / 4; ++k) {
                const float4 v = __ldcg(src + k);
                acc[4 * k + 0] = fmaf(w, v.x, acc[4 * k + 0]);
                acc[4 * k + 1] = fmaf(w, v.y, acc[4 * k + 1]);
                acc[4 * k + 2] = fmaf(w, v.z, acc[4 * k + 2]);
                acc[4 * k + 3] = fmaf(w, v.w, acc[4 * k + 3]);
            }
        }
    }
    uint4 packed[2];
    uint32_t* words = reinterpret_cast<uint32_t*>(packed);
#pragma unroll
    for (int c = 0; c < COLS / 2; ++c) words[c] = Ty<T>::pack(acc[2 * c], acc[2 * c + 1]);
    uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + ((size_t)seq * p.rows + r) * DV + lane * COLS);
    out[0] = packed[0];
    out[1] = packed[1];
    if (lane == 0) p.lse[((size_t)seq * p.h_q + r % p.h_q) * p.s_q + r / p.h_q] = lse_out;
}

// After a split segment's partial rows r0 .. r0 + tile_rows are written: count this tile
// of the sequence done; the block that completes the count merges the tile's rows and
// resets the counter for the next step. Every thread of the block must call it.
template <typename T>
__device__ void finish_split(const MlaDecodeParams& p, const Segment& sg, int r0, int tile_rows, int* flag_smem) {
    const int tile = r0 / tile_rows;
    int* counter = p.counters + (size_t)sg.seq * ((p.rows + 15) / 16) + tile;
    __threadfence();  // this block's partials are visible before it is counted
    __syncthreads();
    if (threadIdx.x == 0) *flag_smem = atomicAdd(counter, 1) == sg.count - 1;
    __syncthreads();
    if (!*flag_smem) return;
    __threadfence();  // the other blocks' partials, counted before us, are visible now
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int r = r0 + warp; r < min(r0 + tile_rows, p.rows); r += warps) merge_row<T>(p, sg.seq, r, sg.first, sg.count, lane);
    if (threadIdx.x == 0) *counter = 0;
}

// Sequences of length 0 get no segment: part blockIdx.x writes out = 0, lse = +inf for
// those with index = part (mod num_parts), rows of its tile.
template <typename T>
__device__ void write_empty_sequences(const MlaDecodeParams& p, int r0, int tile_rows) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int seq = blockIdx.x; seq < p.b; seq += gridDim.x) {
        if (p.num_splits[seq + 1] != p.num_splits[seq]) continue;
        for (int r = r0 + warp; r < min(r0 + tile_rows, p.rows); r += warps) merge_row<T>(p, seq, r, 0, 0, lane);
    }
}

}  // namespace mla
