// Split-KV MLA decode for the memory-bound shapes (h_q * s_q <= 32) on Hopper: a TMA
// producer warp streams the cache into a ring of shared-memory stages while 8 consumer
// warps run the mma.sync math of MmaTile (mma_tile.cuh).
//
// Roles (384 threads, three warpgroups): warps 0-7 consume, warp 8's lane 0 produces and
// the rest of its warpgroup exits. A 288-thread block would cap every thread at 168
// registers (3 warps on one SM sub-partition); with a whole producer warpgroup, setmaxnreg
// moves its registers to the consumers (CONSUMER_REGS), which the 32-row tile needs. The producer walks
// the same plan segments as the consumers (for_each_segment) and, per 64-token block,
// issues two half-block loads (32 keys x 576 columns = 9 TMA boxes of 64 columns, 128-byte
// swizzle, 4 KiB each) into the next two of NS = 5 stages; each stage has a full barrier
// (one arrival + the transaction bytes) and an empty barrier (one arrival per consumer
// warp once its PV has read the stage). So up to 3 half blocks (108 KiB) are in flight
// while a block computes, across segment boundaries too: the next segment's first half
// blocks are requested before its Q, and its Q as soon as the consumers have done the
// last S of the current segment (the Q buffer's own full / empty barriers).
//
// Untrusted input: a block index outside [0, num_blocks) is flagged (MLA_ERR_BLOCK_INDEX)
// and never becomes a TMA coordinate; its stage is zero-filled instead. Rows past the
// sequence end (which may hold NaN) are zero-filled in shared memory before PV reads
// them, and masked to -inf in S.
//
// Launch: grid (num_parts, ceil(rows / M)), block 384, dynamic smem Smem<M>::ALLOC;
// params passed as __grid_constant__ (the tensor maps are read in place).
#include "mma_tile.cuh"
#include "tma.cuh"

namespace {

using namespace mla;
constexpr int CONSUMERS = MMA_WARPS * 32;
constexpr int THREADS = CONSUMERS + 128;
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;  // 2 * 128 * 232 + 128 * 40 = 384 * 168
constexpr int NS = 5;                     // stages of half a block
constexpr int HALF = BS / 2;              // keys per stage
constexpr int HALF_BYTES = HALF * D * 2;  // 36 KiB
constexpr int HALF_REGION = HALF * 128;   // one 64-column box of a stage

// Shared memory plan (bytes from a 1024-aligned base); ALLOC is the entry's MLA_ENTRY_SMEM,
// which the launcher reads (no host copy of this layout).
template <int M> struct Smem {
    static constexpr int STAGE = HALF_BYTES;
    static constexpr int RING = 0;
    static constexpr int Q = RING + NS * STAGE;
    static constexpr int SCRATCH = Q + M * D * 2;
    static constexpr int BARS = (SCRATCH + MmaScratch<M>::BYTES + 7) / 8 * 8;  // full[NS], empty[NS], q_full, q_empty
    static constexpr int TOTAL = BARS + (2 * NS + 2) * 8;
    static constexpr int ALLOC = TOTAL + 1024;  // slack to align the base to a swizzle atom
    static_assert(ALLOC <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

// (The data-path-only and math-only modes BENCHMARKS.md measured are in git history, 9ef1bdd.)
template <typename T, int RG, int KS, int QR>
__device__ void decode_tma(const MlaDecodeParams& p, char* smem_raw) {
    using Tile = MmaTile<T, RG, KS, QR>;
    constexpr int M = Tile::M;
    using L = Smem<M>;
    constexpr int STAGE = L::STAGE;
    // TMA's 128-byte swizzle follows address bits: stage and Q bases sit on 1024 bytes.
    const uint32_t raw = smem_u32(smem_raw);
    char* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
    const uint32_t sbase = smem_u32(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int r0 = blockIdx.y * M;
    const uint32_t full0 = sbase + L::BARS, empty0 = full0 + NS * 8;
    const uint32_t q_full = empty0 + NS * 8, q_empty = q_full + 8;

    if (tid == 0) {
        for (int s = 0; s < NS; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, MMA_WARPS);
        }
        mbar_init(q_full, 1);
        mbar_init(q_empty, MMA_WARPS);
        mbar_init_fence();
    }
    if (warp == MMA_WARPS && lane == 0) {
        tma_prefetch_map(&p.q_map);
        tma_prefetch_map(&p.kv_map);
    }
    __syncthreads();

    if (warp >= MMA_WARPS) {
        // ---- producer ----
        regs_dec<PRODUCER_REGS>();
        if (warp != MMA_WARPS || lane != 0) return;
        const uint64_t kv_policy = l2_evict_first(), q_policy = l2_evict_last();
        Ring<NS> ring;
        uint32_t q_loads = 0;
        for_each_segment(p, [&](const Segment& sg) {
            const auto load_half = [&](int j) {
                const int n = sg.lo + (j >> 1), key0 = (j & 1) * HALF;
                const uint32_t full = full0 + 8 * ring.slot();
                const uint32_t dst = sbase + L::RING + ring.slot() * STAGE;
                mbar_wait(empty0 + 8 * ring.slot(), ring.phase() ^ 1);
                const int idx = p.block_table[(size_t)sg.seq * p.max_blocks_per_seq + n];
                if (idx < 0 || idx >= p.num_blocks) {
                    atomicOr(p.error_flag, MLA_ERR_BLOCK_INDEX);
                    uint4* z = reinterpret_cast<uint4*>(smem + L::RING + ring.slot() * STAGE);
                    for (int i = 0; i < STAGE / 16; ++i) z[i] = make_uint4(0, 0, 0, 0);
                    fence_async_smem();  // before a later TMA write of the same stage
                    mbar_arrive(full);
                } else {
                    mbar_arrive_expect_tx(full, HALF_BYTES);
#pragma unroll
                    for (int c = 0; c < D / 64; ++c) tma_load_3d(dst + c * HALF_REGION, &p.kv_map, c * 64, key0, idx, full, kv_policy);
                }
                ring.step();
            };
            const int halves = 2 * (sg.hi - sg.lo);
            const int before_q = min(halves, NS - 2);  // stages the current segment has released by now
            for (int j = 0; j < before_q; ++j) load_half(j);
            mbar_wait(q_empty, (q_loads & 1) ^ 1);
            mbar_arrive_expect_tx(q_full, M * D * 2);
#pragma unroll
            for (int c = 0; c < D / 64; ++c) tma_load_3d(sbase + L::Q + c * M * 128, &p.q_map, c * 64, r0, sg.seq, q_full, q_policy);
            ++q_loads;
            for (int j = before_q; j < halves; ++j) load_half(j);
        });
        return;
    }

    // ---- consumers ----
    regs_inc<CONSUMER_REGS>();
    const Tile tile(tid, smem + L::SCRATCH);
    const auto sync = [] { named_sync<1, CONSUMERS>(); };
    const auto q_at = [&](int row, int chunk) { return sbase + L::Q + region_off(row, chunk, M); };
    Ring<NS> ring;
    uint32_t q_loads = 0;
    for_each_segment(p, [&](const Segment& sg) {
        sync();  // the previous segment's epilogue is done with the row statistics
        typename Tile::State st;
        tile.begin(p, tid, r0, sg.len, st);
        mbar_wait(q_full, q_loads & 1);
        tile.load_q(q_at, st);
        if constexpr (QR == D / 16) {  // Q now lives in registers: its buffer is free for the next segment
            __syncwarp();
            if (lane == 0) mbar_arrive(q_empty);
        }
        for (int n = sg.lo; n < sg.hi; ++n) {
            const int s0 = ring.slot(), s1 = ring.next().slot();
            mbar_wait(full0 + 8 * s0, ring.phase());
            mbar_wait(full0 + 8 * s1, ring.next().phase());
            const uint32_t h0 = sbase + L::RING + s0 * STAGE, h1 = sbase + L::RING + s1 * STAGE;
            const int valid = sg.len - n * BS;
            if (valid < BS) {
                // The sequence ends inside this block: zero the V part of rows valid..63.
                for (int i = tid; i < (BS - valid) * 64; i += CONSUMERS) {
                    const int row = valid + (i >> 6);
                    char* base = smem + L::RING + (row < HALF ? s0 : s1) * STAGE;
                    *reinterpret_cast<uint4*>(base + ((i >> 3) & 7) * HALF_REGION + (row & (HALF - 1)) * 128 + (i & 7) * 16) =
                        make_uint4(0, 0, 0, 0);
                }
                fence_async_smem();  // before a later TMA write of the same stages
                sync();
            }
            const auto k_at = [&](int key, int chunk) { return (key < HALF ? h0 : h1) + region_off(key & (HALF - 1), chunk, HALF); };
            const bool last = n + 1 == sg.hi;
            const auto release_q = [&] {
                if (QR < D / 16 && last) {  // this warp has read Q for the segment's last time
                    __syncwarp();
                    if (lane == 0) mbar_arrive(q_empty);
                }
            };
            tile.scores(p, tid, n, q_at, k_at, st, sync, release_q);
            tile.accumulate(k_at, st);
            __syncwarp();
            if (lane == 0) {
                mbar_arrive(empty0 + 8 * s0);
                mbar_arrive(empty0 + 8 * s1);
            }
            ring.step(2);
            sync();  // P and the row statistics are free for the next block
        }
        ++q_loads;
        tile.finish(p, sg, tid, r0, st);
    });
}

}  // namespace

#define MLA_DECODE_TMA_KERNEL(NAME, T, RG, KS, QR)                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const __grid_constant__ MlaDecodeParams p) { \
        extern __shared__ __align__(1024) char smem[];                                                       \
        mla::pdl_launch_dependents(); /* the combine may launch now */ \
        decode_tma<T, RG, KS, QR>(p, smem);                                                                         \
    }                                                                                                               \
    MLA_ENTRY_SMEM(NAME, (Smem<MmaTile<T, RG, KS, QR>::M>::ALLOC))

// Q k-steps in registers: all 36 at 16 rows; at 32 rows the most that ptxas 12.9 keeps
// without spilling (12; 18 measured 13% faster with ptxas 13.0, which allocated it).
MLA_DECODE_TMA_KERNEL(mla_decode_bf16_tma16, __nv_bfloat16, 1, 2, 36)
MLA_DECODE_TMA_KERNEL(mla_decode_bf16_tma32, __nv_bfloat16, 2, 2, 12)
MLA_DECODE_TMA_KERNEL(mla_decode_fp16_tma16, __half, 1, 2, 36)
MLA_DECODE_TMA_KERNEL(mla_decode_fp16_tma32, __half, 2, 2, 12)
