// Split-KV scheduling metadata on the device (FlashMLA's get_mla_metadata).
//
// Computes exactly crates/mla-core/src/plan.rs::host_plan from device-resident
// cache_seqlens, so that a decode step needs no host synchronisation and can be captured
// in a CUDA graph. Launch: grid 1, block MLA_PLAN_THREADS (256), no dynamic smem.
//
//   1. all threads: validate lengths (a length < 0 or > max_seqlen sets MLA_ERR_SEQLEN in
//      the error flag and counts as 0), blocks per sequence into shared memory, and the
//      total cost sum(nb > 0 ? nb + fixed_cost : 0) by a block reduction (int64);
//   2. thread 0: host_plan's greedy walk, literally, in int64 (O(b + num_parts) steps
//      reading shared memory only; stores go straight to global memory);
//   3. all threads: zero the num_splits entries the walk did not reach (never happens for
//      a consistent plan, but host_plan leaves them 0 and the buffers are reused).
#include "mla_params.cuh"

#define MLA_PLAN_THREADS 256
// Sequences whose block counts are kept in shared memory (40 KiB); beyond that the walk
// recomputes them from global memory (correct for any b, just slower).
#define MLA_PLAN_SMEM_SEQS 10240

namespace {

// Blocks of a valid length (as int64: l + block_size - 1 overflows int32 near INT_MAX).
__host__ __device__ __forceinline__ int blocks_of(int len, int max_seqlen, int block_size) {
    if (len < 0 || len > max_seqlen) return 0;
    return (int)(((long long)len + block_size - 1) / block_size);
}

}  // namespace

// host_plan's greedy walk, line for line, in int64. `nb_at(s)` gives the blocks of sequence
// s; `total` = sum over sequences of (nb > 0 ? nb + fixed : 0). Writes every metadata row
// and num_splits[0 ..= returned value]; returns the sequence the walk stopped at (b for a
// plan that covers every sequence). __host__ too, so that it can be checked on the CPU.
template <typename NbAt>
__host__ __device__ inline int mla_plan_walk(const NbAt& nb_at, int b, int num_parts, long long total,
                                             long long fixed, int* __restrict__ metadata,
                                             int* __restrict__ num_splits) {
    long long payload = (total + num_parts - 1) / num_parts;
    if (payload < 1) payload = 1;
    payload += fixed;

    num_splits[0] = 0;
    int seq = 0;
    long long blk = 0;
    int splits_in_seq = 0;
    int prefix = 0;  // num_splits[seq]
    long long nb_cur = seq < b ? nb_at(seq) : 0;  // blocks of the current sequence
    for (int part = 0; part < num_parts; ++part) {
        int* m = metadata + (size_t)part * MLA_META_INTS;
        const int begin_seq = seq, begin_blk = (int)blk, begin_split = splits_in_seq;
        long long remain = payload;
        while (seq < b) {
            const long long left = nb_cur - blk;
            if (left > 0) {
                if (remain <= fixed) break;
                const long long take = left < remain - fixed ? left : remain - fixed;
                remain -= take + fixed;
                blk += take;
                splits_in_seq += 1;
                if (blk < nb_cur) break;  // this part is full in the middle of the sequence
            }
            prefix += splits_in_seq;
            num_splits[seq + 1] = prefix;
            seq += 1;
            blk = 0;
            splits_in_seq = 0;
            nb_cur = seq < b ? nb_at(seq) : 0;
        }
        m[0] = begin_seq;
        m[1] = begin_blk;
        m[2] = seq;
        m[3] = (int)blk;
        m[4] = begin_split;
        m[5] = 0;
        m[6] = 0;
        m[7] = 0;
    }
    return seq;
}

extern "C" __global__ void __launch_bounds__(MLA_PLAN_THREADS, 1) mla_plan_kernel(const MlaPlanParams p) {
    __shared__ int nb_s[MLA_PLAN_SMEM_SEQS];
    __shared__ long long warp_total[MLA_PLAN_THREADS / 32];
    __shared__ int walk_end;

    const int b = p.b;
    const int tid = threadIdx.x;
    const long long fixed = p.fixed_cost;

    // 1. validate, block counts, total cost.
    long long my_total = 0;
    bool bad = false;
    for (int i = tid; i < b; i += MLA_PLAN_THREADS) {
        const int len = p.seqlens[i];
        p.plan_seqlens[i] = len;
        bad |= (len < 0 || len > p.max_seqlen);
        const int nb = blocks_of(len, p.max_seqlen, p.block_size);
        if (i < MLA_PLAN_SMEM_SEQS) nb_s[i] = nb;
        if (nb > 0) my_total += nb + fixed;
    }
    if (__any_sync(0xffffffffu, bad) && (tid & 31) == 0 && p.error_flag != nullptr) {
        atomicOr(p.error_flag, MLA_ERR_SEQLEN);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) my_total += __shfl_down_sync(0xffffffffu, my_total, o);
    if ((tid & 31) == 0) warp_total[tid >> 5] = my_total;
    __syncthreads();

    // 2. the greedy walk (host_plan, line for line).
    if (tid == 0) {
        long long total = 0;
#pragma unroll
        for (int w = 0; w < MLA_PLAN_THREADS / 32; ++w) total += warp_total[w];
        const auto nb_at = [&](int s) -> long long {
            if (s < MLA_PLAN_SMEM_SEQS) return nb_s[s];
            return blocks_of(p.seqlens[s], p.max_seqlen, p.block_size);
        };
        walk_end = mla_plan_walk(nb_at, b, p.num_parts, total, fixed, p.metadata, p.num_splits);
    }
    __syncthreads();

    // 3. entries the walk did not reach stay 0, as in host_plan.
    for (int i = walk_end + 1 + tid; i <= b; i += MLA_PLAN_THREADS) p.num_splits[i] = 0;
}
