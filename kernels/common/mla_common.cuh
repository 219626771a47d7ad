// Device helpers shared by the sm_90 decode kernels: sizes, shared-memory swizzles,
// cp.async, per-type tensor-core ops and the walk over a part's plan segments.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

#include "mla_params.cuh"

namespace mla {

constexpr int D = 576;         // latent width (K)
constexpr int DV = 512;        // V width (first DV columns of K)
constexpr int BS = 64;         // tokens per cache block
constexpr int CHUNKS = D / 8;  // 16-byte chunks per latent row

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 2^x by the SFU alone (one MUFU.EX2; 2^-22 relative error, subnormal results flushed to
// 0, 2^-inf = 0): the softmax's probabilities, which are rounded to 16 bits next anyway.
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T> struct Ty;
template <> struct Ty<__nv_bfloat16> {
    __device__ static uint32_t pack(float x, float y) {
        __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Ty<__half> {
    __device__ static uint32_t pack(float x, float y) {
        __half2 v = __floats2half2_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// One segment of a part's work: blocks [lo, hi) of sequence `seq` (length `len`), whose
// result goes straight to out/lse when the sequence has one split, else to partial slot
// `slot` for the combine pass.
struct Segment {
    int seq, len, lo, hi, slot;
    bool direct;
};

// Calls f(Segment) for each non-empty segment the plan gave part blockIdx.x. Lengths
// outside [0, max_blocks_per_seq * 64] are flagged and treated as 0, and block ranges are
// clipped to the sequence, so a stale or foreign plan can never send a read past the
// block-table entries a sequence uses. With a batch-invariant plan (chunk_blocks > 0) a
// part's range of a sequence is cut at the sequence's chunk boundaries: each chunk is its
// own segment with its own slot (the sequence's first + chunk index), direct only when the
// sequence is one chunk, so what a chunk computes never depends on the part holding it.
template <typename F>
__device__ __forceinline__ void for_each_segment(const MlaDecodeParams& p, F&& f) {
    const MlaSchedMeta* meta = reinterpret_cast<const MlaSchedMeta*>(p.metadata + blockIdx.x * MLA_META_INTS);
    // One call site of f, and only (seq, next block) live across it: the rest is re-read
    // per segment (the decode kernels have no register to spare).
    int seq = max(meta->begin_seq, 0), at = 0;
    while (seq <= min(meta->end_seq, p.b - 1)) {
        const int begin_seq = meta->begin_seq, begin_blk = meta->begin_block, end_seq = meta->end_seq, end_blk = meta->end_block;
        int len = p.seqlens[seq];
        if (len < 0 || len > p.max_blocks_per_seq * BS) {
            if (threadIdx.x == 0) atomicOr(p.error_flag, MLA_ERR_SEQLEN);
            len = 0;
        }
        const int nblk = (len + BS - 1) / BS;
        const int lo = max(max(seq == begin_seq ? begin_blk : 0, 0), at);
        const int hi = min(seq == end_seq ? end_blk : nblk, nblk);
        if (hi <= lo) {
            ++seq;
            at = 0;
            continue;
        }
        const int first = p.num_splits[seq], next = p.num_splits[seq + 1];
        const bool chunked = p.chunk_blocks > 0;
        const long long slots = chunked ? (long long)p.b * p.max_chunks : (long long)p.b + p.num_parts;
        int n, slot, e = hi;
        bool fits;
        if (chunked) {
            n = mla_chunks_of(nblk, p.chunk_blocks, p.max_chunks);
            const int k = mla_chunk_of_block(lo, nblk, n);
            e = min(hi, mla_chunk_start(k + 1, nblk, n));
            slot = first + k;
            fits = first >= 0 && next <= slots && next - first == n;
        } else {
            n = next - first;
            slot = first + (seq == begin_seq ? meta->begin_split : 0);
            fits = first >= 0 && next <= slots && n >= 1 && slot >= first && slot < next;
        }
        if (!fits) {
            // Metadata that does not fit: never let it steer a write.
            if (threadIdx.x == 0) atomicOr(p.error_flag, MLA_ERR_PLAN);
            ++seq;
            at = 0;
            continue;
        }
        Segment s{seq, len, lo, e, slot, n == 1};
        f(s);
        at = e;
    }
}

// Block index `n` of a segment's sequence, checked: a bad one is flagged and replaced by
// block 0 with `bad` set (its rows are then zero-filled, never read).
__device__ __forceinline__ int checked_block(const MlaDecodeParams& p, int seq, int n, bool& bad) {
    int idx = p.block_table[(size_t)seq * p.max_blocks_per_seq + n];
    bad = idx < 0 || idx >= p.num_blocks;
    if (bad) {
        if (threadIdx.x == 0) atomicOr(p.error_flag, MLA_ERR_BLOCK_INDEX);
        idx = 0;
    }
    return idx;
}

// Exclusive bound of the keys query row r may attend to (0 for padding rows).
__device__ __forceinline__ int key_end_of_row(const MlaDecodeParams& p, int r, int len) {
    if (r >= p.rows) return 0;
    return p.causal ? len - p.s_q + 1 + r / p.h_q : len;
}

// Writes row r's lse from the running max m (log2 units) and sum l: ln(sum exp(s)) =
// (m + log2 l) * ln 2. A row with no key gets +inf (final) or -inf (partial: weight 0).
__device__ __forceinline__ void write_lse(const MlaDecodeParams& p, const Segment& s, int r, float m, float l) {
    const float lse = l > 0.f ? (m + log2f(l)) * 0.69314718055994531f : (s.direct ? CUDART_INF_F : -CUDART_INF_F);
    if (s.direct) {
        p.lse[((size_t)s.seq * p.h_q + r % p.h_q) * p.s_q + r / p.h_q] = lse;
    } else {
        p.lseaccum[(size_t)s.slot * p.rows + r] = lse;
    }
}

// Stores two adjacent output columns (col, col + 1) of row r, already normalised.
template <typename T>
__device__ __forceinline__ void write_out2(const MlaDecodeParams& p, const Segment& s, int r, int col, float x, float y) {
    if (s.direct) {
        T* out = static_cast<T*>(p.out) + ((size_t)s.seq * p.rows + r) * DV + col;
        *reinterpret_cast<uint32_t*>(out) = Ty<T>::pack(x, y);
    } else {
        *reinterpret_cast<float2*>(p.oaccum + ((size_t)s.slot * p.rows + r) * DV + col) = make_float2(x, y);
    }
}

}  // namespace mla
