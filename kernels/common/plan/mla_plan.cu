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
//
// A batch-invariant plan (chunk_blocks > 0) is host_plan_invariant instead:
//   1. as above, with each sequence's cost nb + chunks * fixed and the largest chunk cost;
//   2. all threads: the smallest part cost cap for which mla_invariant_walk covers the
//      batch, by a 256-way parallel search (each thread walks one candidate cap; the
//      infeasible caps are a prefix, counted by __syncthreads_count), the same cap as the
//      host's bisection; then thread 0 walks it once more, writing the metadata;
//   3. all threads: num_splits, the exclusive prefix sum of the chunk counts.
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
        MlaSchedMeta* m = reinterpret_cast<MlaSchedMeta*>(metadata + (size_t)part * MLA_META_INTS);
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
        m->begin_seq = begin_seq;
        m->begin_block = begin_blk;
        m->end_seq = seq;
        m->end_block = (int)blk;
        m->begin_split = begin_split;
        m->reserved[0] = 0;
        m->reserved[1] = 0;
        m->reserved[2] = 0;
    }
    return seq;
}

// host_plan_invariant's walk (plan.rs invariant_walk), line for line, in int64: parts of
// whole chunks in order, each while its cost stays within `cap`. Returns whether
// num_parts parts cover every chunk; with `metadata`, writes every part's row and the last
// part takes whatever is left. __host__ too, so that it can be checked on the CPU.
template <typename NbAt>
__host__ __device__ inline bool mla_invariant_walk(const NbAt& nb_at, int b, int num_parts, long long cap, long long fixed,
                                                   int chunk_blocks, int max_chunks, int* __restrict__ metadata) {
    const auto chunks = [&](long long nb) -> long long { return mla_chunks_of((int)nb, chunk_blocks, max_chunks); };
    // Cost of the chunks of a sequence (nb blocks, n chunks) before chunk k.
    const auto before = [&](long long nb, long long n, long long k) -> long long { return k == 0 ? 0 : k * nb / n + k * fixed; };
    int s = 0;
    long long k = 0, q = 0;  // position: chunk k of sequence s; q = cost of the sequences before s
    long long nb_s = b > 0 ? nb_at(0) : 0, n_s = chunks(nb_s);
    for (int part = 0; part < num_parts; ++part) {
        const int bs = s;
        const long long bk = k, b_nb = nb_s, b_n = n_s;
        if (metadata != nullptr && part + 1 == num_parts) {
            s = b;
            k = 0;
        } else if (s < b) {
            const long long lim = q + before(nb_s, n_s, k) + cap;
            while (s < b && q + nb_s + n_s * fixed <= lim) {
                q += nb_s + n_s * fixed;
                ++s;
                k = 0;
                nb_s = s < b ? nb_at(s) : 0;
                n_s = chunks(nb_s);
            }
            if (s < b) {
                // The last chunk boundary within lim: k0 or k0 + 1 (before(k) <= k * unit / n).
                const long long r = lim - q, unit = nb_s + n_s * fixed;
                k = r * n_s / unit;
                if (k > n_s - 1) k = n_s - 1;
                if (k + 1 < n_s && before(nb_s, n_s, k + 1) <= r) ++k;
            }
        }
        if (metadata != nullptr) {
            MlaSchedMeta* m = reinterpret_cast<MlaSchedMeta*>(metadata + (size_t)part * MLA_META_INTS);
            m->begin_seq = bs;
            m->begin_block = bs < b ? (int)(bk * b_nb / (b_n > 0 ? b_n : 1)) : 0;
            m->end_seq = s;
            m->end_block = s < b ? (int)(k * nb_s / (n_s > 0 ? n_s : 1)) : 0;
            m->begin_split = (int)bk;
            m->reserved[0] = 0;
            m->reserved[1] = 0;
            m->reserved[2] = 0;
        }
    }
    return s == b;
}

// The invariant cap search, in pieces shared with the host check (tests/plan_kernel_host.rs).
// The range: [max(avg, largest chunk cost), avg + largest chunk cost]; the upper end always
// covers (a part that stops early holds more than avg).
__host__ __device__ inline void mla_cap_range(long long total, long long max_cost, int num_parts, long long& lo, long long& hi) {
    if (total <= 0) {
        lo = hi = 1;
        return;
    }
    const long long avg = (total + num_parts - 1) / num_parts;
    lo = avg > max_cost ? avg : max_cost;
    hi = avg + max_cost;
}
// Candidate t of `threads` in [lo, hi): every integer of the range when it is that short.
__host__ __device__ inline long long mla_cap_candidate(long long lo, long long hi, int t, int threads) {
    return lo + (hi - lo) * t / threads;
}
// Narrows [lo, hi] once the first `fails` candidates (those below the smallest covering
// cap: they rise with t) did not cover.
__host__ __device__ inline void mla_cap_narrow(long long& lo, long long& hi, int fails, int threads) {
    const long long l = lo, h = hi;
    hi = fails < threads ? mla_cap_candidate(l, h, fails, threads) : h;
    lo = fails > 0 ? mla_cap_candidate(l, h, fails - 1, threads) + 1 : l;
}

#ifndef MLA_PLAN_HOST_CHECK
extern "C" __global__ void __launch_bounds__(MLA_PLAN_THREADS, 1) mla_plan_kernel(const MlaPlanParams p) {
    __shared__ int nb_s[MLA_PLAN_SMEM_SEQS];
    __shared__ long long warp_total[MLA_PLAN_THREADS / 32];
    __shared__ long long warp_max[MLA_PLAN_THREADS / 32];
    __shared__ int walk_end;
    __shared__ long long cap_lo, cap_hi;
    __shared__ int range_sum[MLA_PLAN_THREADS];

    const int b = p.b;
    const int tid = threadIdx.x;
    const long long fixed = p.fixed_cost;
    const bool chunked = p.chunk_blocks > 0;

    // 1. validate, block counts, total cost (and, invariant, the largest chunk cost).
    long long my_total = 0, my_max = 0;
    bool bad = false;
    for (int i = tid; i < b; i += MLA_PLAN_THREADS) {
        const int len = p.seqlens[i];
        p.plan_seqlens[i] = len;
        bad |= (len < 0 || len > p.max_seqlen);
        const int nb = blocks_of(len, p.max_seqlen, p.block_size);
        if (i < MLA_PLAN_SMEM_SEQS) nb_s[i] = nb;
        if (!chunked) {
            if (nb > 0) my_total += nb + fixed;
        } else if (nb > 0) {
            const long long n = mla_chunks_of(nb, p.chunk_blocks, p.max_chunks);
            my_total += nb + n * fixed;
            const long long c = (nb + n - 1) / n + fixed;
            if (c > my_max) my_max = c;
        }
    }
    if (__any_sync(0xffffffffu, bad) && (tid & 31) == 0 && p.error_flag != nullptr) {
        atomicOr(p.error_flag, MLA_ERR_SEQLEN);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        my_total += __shfl_down_sync(0xffffffffu, my_total, o);
        const long long m = __shfl_down_sync(0xffffffffu, my_max, o);
        if (m > my_max) my_max = m;
    }
    if ((tid & 31) == 0) {
        warp_total[tid >> 5] = my_total;
        warp_max[tid >> 5] = my_max;
    }
    __syncthreads();
    const auto nb_at = [&](int s) -> long long {
        if (s < MLA_PLAN_SMEM_SEQS) return nb_s[s];
        return blocks_of(p.seqlens[s], p.max_seqlen, p.block_size);
    };

    if (!chunked) {
        // 2. the greedy walk (host_plan, line for line).
        if (tid == 0) {
            long long total = 0;
#pragma unroll
            for (int w = 0; w < MLA_PLAN_THREADS / 32; ++w) total += warp_total[w];
            walk_end = mla_plan_walk(nb_at, b, p.num_parts, total, fixed, p.metadata, p.num_splits);
        }
        __syncthreads();

        // 3. entries the walk did not reach stay 0, as in host_plan.
        for (int i = walk_end + 1 + tid; i <= b; i += MLA_PLAN_THREADS) p.num_splits[i] = 0;
        return;
    }

    // 2. invariant: the smallest covering cap in [max(avg, max chunk), avg + max chunk].
    if (tid == 0) {
        long long total = 0, max_cost = 0;
#pragma unroll
        for (int w = 0; w < MLA_PLAN_THREADS / 32; ++w) {
            total += warp_total[w];
            if (warp_max[w] > max_cost) max_cost = warp_max[w];
        }
        long long lo, hi;
        mla_cap_range(total, max_cost, p.num_parts, lo, hi);
        cap_lo = lo;
        cap_hi = hi;
    }
    for (;;) {
        __syncthreads();  // cap_lo / cap_hi settled
        const long long lo = cap_lo, hi = cap_hi;
        if (lo >= hi) break;
        const long long x = mla_cap_candidate(lo, hi, tid, MLA_PLAN_THREADS);
        const bool ok = mla_invariant_walk(nb_at, b, p.num_parts, x, fixed, p.chunk_blocks, p.max_chunks, nullptr);
        // Candidates rise with tid, so the caps that do not cover are the first `fails`.
        const int fails = __syncthreads_count(!ok);
        if (tid == 0) {
            long long l = lo, h = hi;
            mla_cap_narrow(l, h, fails, MLA_PLAN_THREADS);
            cap_lo = l;
            cap_hi = h;
        }
    }
    if (tid == 0) mla_invariant_walk(nb_at, b, p.num_parts, cap_lo, fixed, p.chunk_blocks, p.max_chunks, p.metadata);

    // 3. num_splits: each thread scans a contiguous range of sequences.
    const int per = (b + MLA_PLAN_THREADS - 1) / MLA_PLAN_THREADS;
    const int i0 = min(b, tid * per), i1 = min(b, i0 + per);
    int sum = 0;
    for (int i = i0; i < i1; ++i) sum += mla_chunks_of((int)nb_at(i), p.chunk_blocks, p.max_chunks);
    range_sum[tid] = sum;
    __syncthreads();
    if (tid == 0) {
        int acc = 0;
        for (int t = 0; t < MLA_PLAN_THREADS; ++t) {
            const int v = range_sum[t];
            range_sum[t] = acc;
            acc += v;
        }
        p.num_splits[0] = 0;
    }
    __syncthreads();
    int acc = range_sum[tid];
    for (int i = i0; i < i1; ++i) {
        acc += mla_chunks_of((int)nb_at(i), p.chunk_blocks, p.max_chunks);
        p.num_splits[i + 1] = acc;
    }
}
#endif  // MLA_PLAN_HOST_CHECK
