// Kernel parameter blocks shared by the CUDA kernels and the Rust launcher
// (crates/mla-core/src/gpu/params.rs mirrors them field for field, #[repr(C)]).
#pragma once
#include <stdint.h>

#include "mla_tma_map.cuh"

// Bits OR-ed into the device error flag (one int per device).
#define MLA_ERR_BLOCK_INDEX 1   // a block index that would be read is outside [0, num_blocks)
#define MLA_ERR_SEQLEN      2   // a cache_seqlens value is outside [0, max_blocks_per_seq * 64]
#define MLA_ERR_PLAN        4   // the plan does not fit the lengths (made for other cache_seqlens)

// Scheduling metadata, one MlaSchedMeta row (MLA_META_INTS ints) per SM part; mirrored by
// `SchedMeta` in crates/mla-core/src/step/sched.rs (#[repr(C)], const asserts there).
// num_splits has b + 1 ints: the exclusive prefix sum of splits per sequence.
#define MLA_META_INTS 8
struct MlaSchedMeta {
    int begin_seq;     // the part's first sequence
    int begin_block;   // its first block within begin_seq
    int end_seq;       // the sequence it ends in (b when it ends after the last one)
    int end_block;     // its end within end_seq, exclusive
    int begin_split;   // split index (within begin_seq) of the part's first segment
    int reserved[3];   // zero
};
static_assert(sizeof(MlaSchedMeta) == MLA_META_INTS * sizeof(int), "MlaSchedMeta is one metadata row");
// NVRTC has no offsetof: there, all-int members and the size of 8 ints (no padding) fix
// the offsets to the declaration order; nvcc and the host build of mla_plan.cu
// (tests/plan_kernel_host.rs) check them.
#if !defined(__CUDACC_RTC__)
static_assert(__builtin_offsetof(MlaSchedMeta, begin_seq) == 0 && __builtin_offsetof(MlaSchedMeta, begin_block) == 4 &&
                  __builtin_offsetof(MlaSchedMeta, end_seq) == 8 && __builtin_offsetof(MlaSchedMeta, end_block) == 12 &&
                  __builtin_offsetof(MlaSchedMeta, begin_split) == 16 && __builtin_offsetof(MlaSchedMeta, reserved) == 20,
              "MlaSchedMeta's offsets are SchedMeta's (step/sched.rs)");
#endif

// Batch-invariant plans (plan.rs, InvariantChunks): a sequence of nb blocks is cut into
// n = min(max_chunks, ceil(nb / chunk_blocks)) chunks, chunk k being blocks
// [k * nb / n, (k + 1) * nb / n), so its split points depend on its own length only.
__host__ __device__ __forceinline__ int mla_chunks_of(int nb, int chunk_blocks, int max_chunks) {
    const long long n = ((long long)nb + chunk_blocks - 1) / chunk_blocks;
    return n < max_chunks ? (int)n : max_chunks;
}
__host__ __device__ __forceinline__ int mla_chunk_start(int k, int nb, int n) { return (int)((long long)k * nb / n); }
__host__ __device__ __forceinline__ int mla_chunk_of_block(int x, int nb, int n) {
    return (int)(((long long)(x + 1) * n - 1) / nb);
}

struct MlaPlanParams {
    const int* seqlens;      // [b]
    int* metadata;           // [num_parts] MlaSchedMeta rows ([num_parts, MLA_META_INTS] ints)
    int* num_splits;         // [b + 1]
    int* plan_seqlens;       // [b]: the lengths the plan was made for (checked by combine)
    int* error_flag;         // 1 int
    int b;
    int num_parts;
    int block_size;          // 64
    int fixed_cost;          // work units one split costs on top of its blocks
    int max_seqlen;          // max_blocks_per_seq * block_size
    int chunk_blocks;        // batch-invariant plan: its chunk rule; 0 = the default plan
    int max_chunks;
};

struct MlaDecodeParams {
    const void* q;           // [b, s_q, h_q, 576]        bf16 / fp16
    const void* kv;          // [num_blocks, 64, 1, 576]  bf16 / fp16
    const int* block_table;  // [b, max_blocks_per_seq]
    const int* seqlens;      // [b]
    void* out;               // [b, s_q, h_q, 512]        bf16 / fp16
    float* lse;              // [b, h_q, s_q]
    float* oaccum;           // [slots, rows, 512] partial outputs of split sequences
    float* lseaccum;         // [slots, rows]   (slots: b + num_parts, or b * max_chunks)
    const int* metadata;     // [num_parts] MlaSchedMeta rows ([num_parts, MLA_META_INTS] ints)
    const int* num_splits;   // [b + 1]
    int* error_flag;
    int b;
    int s_q;
    int h_q;
    int rows;                // s_q * h_q (h_kv = 1): query rows per sequence
    int num_blocks;
    int max_blocks_per_seq;
    int num_parts;
    int causal;
    float scale;             // softmax scale
    float scale_log2;        // softmax scale * log2(e)
    int chunk_blocks;        // batch-invariant plan: every chunk its own segment; 0 = default plan
    int max_chunks;          // (then oaccum / lseaccum hold b * max_chunks slots)
    // Tensor maps of the TMA kernels (the cp.async kernels ignore them), encoded by the
    // host for these q / kv pointers (crates/mla-core/src/gpu/tma.rs):
    mla::TmaMap q_map;       // q as [b][rows][576], box 64 columns x tile rows, 128-byte swizzle
    mla::TmaMap kv_map;      // kv as [num_blocks][64][576], box 64 columns x 32 rows
};

struct MlaCombineParams {
    const float* oaccum;
    const float* lseaccum;
    const int* num_splits;
    const int* seqlens;      // [b] the lengths of this step
    const int* plan_seqlens; // [b] the lengths the plan was made for
    int* error_flag;
    void* out;
    float* lse;
    int b;
    int s_q;
    int h_q;
    int rows;
    int slots;               // b + num_parts: partial slots in oaccum / lseaccum
};

// The dynamic shared memory an entry is launched with, as a constant of the module: the
// build reads it from the PTX into the module's report (crates/mla-kernels/build/entries.rs)
// and the launcher takes it from there, so the host never restates a kernel's layout.
#define MLA_ENTRY_SMEM(NAME, BYTES) extern "C" __device__ const unsigned int NAME##_smem_bytes = (BYTES);
