// Split-KV MLA decode, warp-specialised wgmma (issue 8, stage C1 of the design brief):
// 64-row tiles, one persistent CTA per SM part, three warpgroups.
//
//   WG2 (producer): warp 8's lane 0 walks the part's segments (for_each_segment) and
//       streams each 64-token block into one of 2 full stages by TMA (9 boxes of 64
//       columns x 64 rows, 128-byte swizzle), each region completing on its own full
//       mbarrier, so S starts on the first region while the rest is in flight; Q
//       (64 rows x 576) likewise once per segment. Its other warps exit; setmaxnreg gives
//       its registers to the consumers.
//   WG0: S = Q K^T of every block (36 x m64n64k16 from shared memory: each warp owns 16
//       whole rows, so the softmax needs no cross-warp reduction), the online softmax in
//       registers, P published to shared memory with the per-row rescale factors, and the
//       left half of O (V columns 0-255, 4 x m64n256k16 with P from registers). Before
//       S of block n + 1 it waits for PV-left of block n and releases n's stage, so the
//       load of block n + 2 is under way while S(n + 1) runs.
//   WG1: the right half of O (V columns 256-511, P from shared memory), rescaled by the
//       factors WG0 published. Its PV of block n runs under WG0's S of block n + 1.
// Clusters: the row tiles of a part may run as a 2-CTA cluster (the launcher decides,
//       BENCHMARKS.md row 9); each producer then loads half of every block's regions and
//       multicasts them to both CTAs, and a stage is free once both CTAs' consumers are done.
// Handshakes: full per region and empty per stage (empty counts WG0 and WG1 of every CTA
// of the cluster), Q full / empty, P full and P free per stage (128 WG0 / WG1 arrivals; the
// factors by stage; in a cluster P lives in the stage's rope region, alone in the P region,
// which P free guards), and at a segment's end inverse full / free, where WG0 hands WG1 the
// row sums' inverses.
//
// Untrusted input as in the other kernels: a bad block index never becomes a TMA
// coordinate (its stage is zero-filled, MLA_ERR_BLOCK_INDEX); rows past the sequence end
// are masked in S and zeroed in the stage before any product reads them as V.
//
// Launch: grid (num_parts, ceil(rows / 64)), cluster (1, 1 or 2, 1) (the CTAs of a cluster
// must share blockIdx.x: they walk the same segments), block 384, dynamic smem Smem::ALLOC;
// params as __grid_constant__. The default for 32 rows and more (BENCHMARKS.md).
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "phase_clock.cuh"

namespace {

using namespace mla;
constexpr int M = 64;                     // query rows per tile
constexpr int THREADS = 384;
constexpr int REGION = M * 128;           // one 64-column box of a 64-row tile (8 KiB)
constexpr int TILE = D / 64 * REGION;     // 9 regions: Q, or one cache block (72 KiB)
constexpr int STAGES = 2;
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;  // 2 * 128 * 232 + 128 * 40 = 384 * 168
constexpr float LAZY_TAU = 8.f;  // log2 units the reference max may lag a row's true max

__device__ __forceinline__ uint32_t tile_off(int row, int chunk) {
    return (chunk >> 3) * REGION + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// Shared memory plan (bytes from a 1024-aligned base); ALLOC is the entry's MLA_ENTRY_SMEM,
// which the launcher reads (no host copy of this layout).
struct Smem {
    static constexpr int Q = 0;
    static constexpr int KV = Q + TILE;                // STAGES x TILE
    static constexpr int P = KV + STAGES * TILE;       // 64 x 64 T, one swizzled region: P without clusters
    static constexpr int SCALE = P + REGION;           // [STAGES][64] f32: a block's rescale factors, by its stage
    static constexpr int INV = SCALE + STAGES * M * 4; // [64] f32: 1 / l at a segment's end
    static constexpr int BARS = INV + M * 4;           // full[2][9] (one per region), empty[2], q_full, q_empty, p_full[2], p_free[2], inv_full, inv_free
    static constexpr int TS = BARS + (STAGES * (D / 64) + 3 * STAGES + 4) * 8;  // timing builds: [STAGES] u32 load issue clocks
    static constexpr int MARKS = TS + STAGES * 4;  // [THREADS / 32] u32 phase marks, timing builds only
    static constexpr int TOTAL = MLA_PHASE_TIMING ? MARKS + THREADS / 32 * 4 : TS;
    static constexpr int ALLOC = TOTAL + 1024;
    static_assert(ALLOC <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    template <int ACC> __device__ static void qk(float* d, uint64_t a, uint64_t b) { wgmma_n64_bf16<ACC>(d, a, b); }
    __device__ static void pv_rs(float* d, const uint32_t* a, uint64_t b) { wgmma_n256t_rs_bf16(d, a, b); }
    __device__ static void pv_ss(float* d, uint64_t a, uint64_t b) { wgmma_n256t_bf16(d, a, b); }
};
template <> struct Mma<__half> {
    template <int ACC> __device__ static void qk(float* d, uint64_t a, uint64_t b) { wgmma_n64_fp16<ACC>(d, a, b); }
    __device__ static void pv_rs(float* d, const uint32_t* a, uint64_t b) { wgmma_n256t_rs_fp16(d, a, b); }
    __device__ static void pv_ss(float* d, uint64_t a, uint64_t b) { wgmma_n256t_fp16(d, a, b); }
};

// O (this warpgroup's 64 x 256 half) += P V-half of the block in `stage`, 4 k-steps of 16 keys.
template <typename T>
__device__ __forceinline__ void issue_pv_ss(float* o, uint32_t p_addr, uint32_t stage, int half) {
#pragma unroll
    for (int ks = 0; ks < BS / 16; ++ks)
        Mma<T>::pv_ss(o, sw128_desc(p_addr + ks * 32, 16, 1024), sw128_desc(stage + half * 4 * REGION + ks * 16 * 128, REGION, 1024));
}

template <typename T>
__device__ void decode_ws(const MlaDecodeParams& p, char* smem_raw) {
    using L = Smem;
    const uint32_t raw = smem_u32(smem_raw);
    char* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
    const uint32_t sbase = smem_u32(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = warp >> 2, wt = tid & 127;  // warpgroup, thread within it
    const int r0 = blockIdx.y * M;
    constexpr int NR = D / 64;  // regions per block, each with its full barrier
    const uint32_t full0 = sbase + L::BARS, empty0 = full0 + STAGES * NR * 8;
    const uint32_t q_full = empty0 + STAGES * 8, q_empty = q_full + 8, p_full0 = q_empty + 8, p_free0 = p_full0 + STAGES * 8, inv_full = p_free0 + STAGES * 8, inv_free = inv_full + 8;
    // A cluster (1 x CS x 1) holds row tiles of the same part: they read the same blocks, so
    // each CTA loads 1 / CS of every block and multicasts it to all (rank r: the 64-column
    // regions c with c % CS == r). A stage is then written by every CTA of the cluster, so
    // it is free only when the consumers of all of them are done with it (CS x 2 arrivals).
    const uint32_t cs = cluster_size(), rank = cluster_rank();

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            for (int c = 0; c < NR; ++c) mbar_init(full0 + 8 * (s * NR + c), 1);
            mbar_init(empty0 + 8 * s, 2 * cs);
        }
        mbar_init(q_full, 1);
        mbar_init(q_empty, 1);
        for (int s = 0; s < STAGES; ++s) mbar_init(p_full0 + 8 * s, 128);
        for (int s = 0; s < STAGES; ++s) mbar_init(p_free0 + 8 * s, 128);
        mbar_init(inv_full, 128);
        mbar_init(inv_free, 128);
        mbar_init_fence();
    }
    if (warp == 8 && lane == 0) {
        tma_prefetch_map(&p.q_map);
        tma_prefetch_map(&p.kv_map);
    }
    // Every barrier of the cluster is initialised before any CTA multicasts into another.
    if (cs > 1) cluster_sync(); else __syncthreads();

    if (wg == 2) {
        // ---- producer ----
        regs_dec<PRODUCER_REGS>();
        if (warp != 8 || lane != 0) return;
        const uint64_t kv_policy = l2_evict_first(), q_policy = l2_evict_last();
        Ring<STAGES> ring;
        uint32_t q_loads = 0;
        PhaseClock<4> pc;  // timing builds (role 0): empty wait, issue, Q-empty wait, blocks
        pc.start(reinterpret_cast<uint32_t*>(smem + L::MARKS) + warp);
        for_each_segment(p, [&](const Segment& sg) {
            const int* table = p.block_table + (size_t)sg.seq * p.max_blocks_per_seq;
            int idx_next = table[sg.lo];
            const auto load_block = [&](int n) {
                const uint32_t full = full0 + 8 * NR * ring.slot();  // region c: full + 8 c
                // The next entry is read before this stage's wait, so its latency runs under
                // the wait (BENCHMARKS.md row 22).
                const int idx = idx_next;
                if (n + 1 < sg.hi) idx_next = table[n + 1];
                mbar_wait(empty0 + 8 * ring.slot(), ring.phase() ^ 1);
                pc.lap(0);
#if MLA_PHASE_TIMING
                reinterpret_cast<volatile uint32_t*>(smem + L::TS)[ring.slot()] = pc.now();
#endif
                // Both CTAs of a cluster read this same entry (the table, like every input,
                // must not change while the decode runs), so a bad one is seen by both: each
                // zero-fills its whole stage and neither multicasts.
                if (idx < 0 || idx >= p.num_blocks) {
                    atomicOr(p.error_flag, MLA_ERR_BLOCK_INDEX);
                    uint4* z = reinterpret_cast<uint4*>(smem + L::KV + ring.slot() * TILE);
                    for (int i = 0; i < TILE / 16; ++i) z[i] = make_uint4(0, 0, 0, 0);
                    fence_async_smem();
                    for (int c = 0; c < NR; ++c) mbar_arrive(full + 8 * c);
                } else {
                    for (int c = 0; c < NR; ++c) mbar_arrive_expect_tx(full + 8 * c, REGION);
                    const uint32_t dst = sbase + L::KV + ring.slot() * TILE;
                    if (cs == 1) {
#pragma unroll
                        for (int c = 0; c < D / 64; ++c) tma_load_3d(dst + c * REGION, &p.kv_map, c * 64, 0, idx, full + 8 * c, kv_policy);
                    } else {
                        for (int c = rank; c < D / 64; c += cs)
                            tma_load_3d_multicast(dst + c * REGION, &p.kv_map, c * 64, 0, idx, full + 8 * c, (uint16_t)((1u << cs) - 1), kv_policy);
                    }
                }
                ring.step();
                pc.lap(1);
                pc.add(3, 1);
            };
            // The first block needs a stage the previous segment frees before its last S,
            // Q the consumers free after that S.
            load_block(sg.lo);
            mbar_wait(q_empty, (q_loads & 1) ^ 1);
            pc.lap(2);
            mbar_arrive_expect_tx(q_full, TILE);
#pragma unroll
            for (int c = 0; c < D / 64; ++c) tma_load_3d(sbase + L::Q + c * REGION, &p.q_map, c * 64, r0, sg.seq, q_full, q_policy);
            ++q_loads;
            for (int n = sg.lo + 1; n < sg.hi; ++n) load_block(n);
        });
        // The other CTAs of the cluster arrive on this one's empty barriers until their last
        // block: wait for every stage's last release before this CTA may exit.
        for (int s = 0; s < STAGES; ++s) {
            mbar_wait(empty0 + 8 * ring.slot(), ring.phase() ^ 1);
            ring.step();
        }
        pc.flush(0);
        return;
    }

    // ---- consumers ----
    regs_inc<CONSUMER_REGS>();
    const int wl = warp & 3, g = lane >> 2, t4 = lane & 3;
    const int row0 = 16 * wl + g, row1 = row0 + 8;  // this thread's accumulator rows
    float* const scale0 = reinterpret_cast<float*>(smem + L::SCALE);
    float* const inv_s = reinterpret_cast<float*>(smem + L::INV);
    Ring<STAGES> ring;
    uint32_t segs = 0;  // segments done
    const bool p_in_stage = cs > 1;
    float o[128];
    // Timing builds (phase_clock.cuh, roles 1 + wg). WG0: 0 PV-left(n - 1) wait + release,
    // 1 first region wait, 2 rest of S's issue (its region waits), 3 S wait, 4 softmax, 5 P-free wait,
    // 6 publish, 7 rescale + PV-left issue, 8 Q wait, 12 / 13 first / last region landed
    // after its load's issue. WG1: 0 P wait, 1 rescale + PV-right issue, 2 its wait,
    // 3 release. Both: 9 segment tail, 10 epilogue, 11 blocks, 14 segments.
    PhaseClock<15> pc;
    pc.start(reinterpret_cast<uint32_t*>(smem + L::MARKS) + warp);
    // Releases a stage: one arrival on its empty barrier in every CTA of the cluster.
    const auto release = [&](int slot) {
        if (wt != 0) return;
        if (cs == 1) {
            mbar_arrive(empty0 + 8 * slot);
        } else {
            for (uint32_t r = 0; r < cs; ++r) mbar_arrive_cluster(cluster_addr(empty0 + 8 * slot, r));
        }
    };

    for_each_segment(p, [&](const Segment& sg) {
        const int len = sg.len;
        const int key_end0 = key_end_of_row(p, r0 + row0, len), key_end1 = key_end_of_row(p, r0 + row1, len);
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        float inv0, inv1;  // 1 / row sum, for the epilogue

        if (wg == 0) {
            float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F, l0 = 0.f, l1 = 0.f;  // running max (log2), partial sums
            float s[32];
            uint32_t pa[16];  // P as A fragments of the 4 k-steps of PV
            // Waits for block n's stage (ring position r), zero-fills the V part of the rows
            // past the sequence end (they may hold NaN) before any product reads the stage,
            // and issues S = Q K^T as one commit group.
            const auto issue_s = [&](int n, const Ring<STAGES>& r) {
                const uint32_t stage = sbase + L::KV + r.slot() * TILE;
                const uint32_t full = full0 + 8 * NR * r.slot();
                const int valid = len - n * BS;
                if (valid < BS) {
                    for (int c = 0; c < NR; ++c) mbar_wait(full + 8 * c, r.phase());
                    char* st = smem + L::KV + r.slot() * TILE;
                    for (int i = wt; i < (BS - valid) * 64; i += 128) {
                        const int row = valid + (i >> 6);
                        *reinterpret_cast<uint4*>(st + ((i >> 3) & 7) * REGION + row * 128 + (i & 7) * 16) = make_uint4(0, 0, 0, 0);
                    }
                    fence_async_smem();
                    named_sync<2, 128>();
                }
                // Each region's 4 k-steps go in as soon as that region has landed, so S
                // runs under the rest of the block's load (BENCHMARKS.md row 10). The first
                // k-step overwrites S (scale-d 0): no register of S is written while the PV
                // before it is in flight.
                mbar_wait(full, r.phase());
                pc.lap(1);
#if MLA_PHASE_TIMING
                const uint32_t issued = reinterpret_cast<volatile uint32_t*>(smem + L::TS)[r.slot()];
                pc.add(12, pc.now() - issued);
#endif
                wgmma_fence();
                Mma<T>::template qk<0>(s, sw128_desc(sbase + L::Q, 16, 1024), sw128_desc(stage, 16, 1024));
#pragma unroll
                for (int kk = 1; kk < D / 16; ++kk) {
                    if ((kk & 3) == 0) {
                        mbar_wait(full + 8 * (kk >> 2), r.phase());
#if MLA_PHASE_TIMING
                        if (kk == D / 16 - 4) pc.add(13, pc.now() - issued);
#endif
                        wgmma_fence();  // after the wait's own registers, as ptxas wants (C7519)
                    }
                    const uint32_t off = (kk >> 2) * REGION + (kk & 3) * 32;
                    Mma<T>::template qk<1>(s, sw128_desc(sbase + L::Q + off, 16, 1024), sw128_desc(stage + off, 16, 1024));
                }
                wgmma_commit();
                pc.lap(2);
            };
            mbar_wait(q_full, segs & 1);
            pc.lap(8);
            pc.add(14, 1);
            for (int n = sg.lo; n < sg.hi; ++n) {
                const uint32_t stage = sbase + L::KV + ring.slot() * TILE;
                // PV-left(n - 1) retires and block n - 1's stage is released (for this
                // warpgroup) before S(n) goes in: the producer refills it under S(n)
                // (BENCHMARKS.md row 11). Q is free after the last S.
                if (n > sg.lo) {
                    wgmma_wait<0>();
                    release(Ring<STAGES>{ring.i - 1}.slot());
                }
                pc.lap(0);
                issue_s(n, ring);
                wgmma_wait<0>();
                pc.lap(3);
                if (n + 1 == sg.hi && wt == 0) mbar_arrive(q_empty);

                // Online softmax of block n (log2 domain), rows row0 / row1. Only a block
                // with keys past a row's end needs the mask.
                const float c = p.scale_log2;  // > 0 (checked on the host)
                if ((n + 1) * BS > min(key_end0, key_end1)) {
#pragma unroll
                    for (int i = 0; i < 32; ++i) {
                        const int key = n * BS + (i >> 2) * 8 + t4 * 2 + (i & 1);
                        if (key >= (i & 2 ? key_end1 : key_end0)) s[i] = -CUDART_INF_F;
                    }
                }
                float mx0 = -CUDART_INF_F, mx1 = -CUDART_INF_F;
#pragma unroll
                for (int i = 0; i < 32; i += 4) {
                    mx0 = fmaxf(mx0, fmaxf(s[i], s[i + 1]));
                    mx1 = fmaxf(mx1, fmaxf(s[i + 2], s[i + 3]));
                }
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
                // Lazy rescaling: the reference max moves only when the block's max passes
                // it by more than LAZY_TAU, so nearly every factor is exactly 1 and O is left
                // alone; P = 2^(s c - m) then stays below 2^LAZY_TAU.
                const float b0 = mx0 * c, b1 = mx1 * c;
                const float mn0 = b0 > m0 + LAZY_TAU ? b0 : m0, mn1 = b1 > m1 + LAZY_TAU ? b1 : m1;
                const float a0 = mn0 == m0 ? 1.f : ex2_approx(m0 - mn0);
                const float a1 = mn1 == m1 ? 1.f : ex2_approx(m1 - mn1);
                m0 = mn0;
                m1 = mn1;
                const float u0 = mn0 == -CUDART_INF_F ? 0.f : mn0, u1 = mn1 == -CUDART_INF_F ? 0.f : mn1;
                float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
                for (int i = 0; i < 32; i += 4) {
                    const float p00 = ex2_approx(fmaf(s[i], c, -u0)), p01 = ex2_approx(fmaf(s[i + 1], c, -u0));
                    const float p10 = ex2_approx(fmaf(s[i + 2], c, -u1)), p11 = ex2_approx(fmaf(s[i + 3], c, -u1));
                    ps0 += p00 + p01;
                    ps1 += p10 + p11;
                    pa[i >> 1] = Ty<T>::pack(p00, p01);      // row0, keys 8j + 2t
                    pa[(i >> 1) + 1] = Ty<T>::pack(p10, p11);  // row1
                }
                l0 = l0 * a0 + ps0;
                l1 = l1 * a1 + ps1;

                // Publish P and the factors for WG1, the factors by stage. In a cluster P goes
                // into the stage's rope region (only S reads it, and S has retired), so the
                // ring double-buffers it: WG1 releases the stage after its PV. Alone, into the
                // P region once WG1 is done with the previous P (one-tile shapes measured 2%
                // faster so, BENCHMARKS.md row 22).
                pc.lap(4);
                // P free per stage (WG1 arrives once its PV of the stage's block has retired):
                // in a cluster, the use of this stage two blocks back (a fresh barrier passes
                // its first wait), which the ring has ordered already; alone, the block before.
                if (p_in_stage) {
                    mbar_wait(p_free0 + 8 * ring.slot(), ring.phase() ^ 1);
                } else if (ring.i > 0) {
                    const Ring<STAGES> prev{ring.i - 1};
                    mbar_wait(p_free0 + 8 * prev.slot(), prev.phase());
                }
                pc.lap(5);
                char* sp = p_in_stage ? smem + L::KV + ring.slot() * TILE + 8 * REGION : smem + L::P;
                float* const scale_s = scale0 + ring.slot() * M;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int key = j * 8 + t4 * 2;
                    *reinterpret_cast<uint32_t*>(sp + tile_off(row0, key >> 3) + (key & 7) * 2) = pa[2 * j];
                    *reinterpret_cast<uint32_t*>(sp + tile_off(row1, key >> 3) + (key & 7) * 2) = pa[2 * j + 1];
                }
                if (t4 == 0) {
                    scale_s[row0] = a0;
                    scale_s[row1] = a1;
                }
                fence_async_smem();  // P is read by wgmma next
                mbar_arrive(p_full0 + 8 * ring.slot());
                pc.lap(6);

                // O_left = O_left * a + P V[:, 0:256], P from registers. Accumulator groups 2ks
                // and 2ks + 1 (pa[4ks .. 4ks + 3]) are k-step ks's A fragment.
                if (!__all_sync(0xffffffffu, a0 == 1.f && a1 == 1.f)) {
#pragma unroll
                    for (int i = 0; i < 128; i += 4) {
                        o[i] *= a0; o[i + 1] *= a0;
                        o[i + 2] *= a1; o[i + 3] *= a1;
                    }
                }
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < BS / 16; ++ks) {
                    const uint32_t a[4] = {pa[4 * ks], pa[4 * ks + 1], pa[4 * ks + 2], pa[4 * ks + 3]};
                    Mma<T>::pv_rs(o, a, sw128_desc(stage + ks * 16 * 128, REGION, 1024));
                }
                wgmma_commit();
                ring.step();
                pc.lap(7);
                pc.add(11, 1);
            }
            wgmma_wait<0>();
            release(Ring<STAGES>{ring.i - 1}.slot());
            // Row sums: the 4 threads of a row hold partial sums.
            l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
            l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
            inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
            inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
            // Hand WG1 the inverses (once it has read the previous segment's).
            if (segs > 0) mbar_wait(inv_free, (segs - 1) & 1);
            if (t4 == 0) {
                inv_s[row0] = inv0;
                inv_s[row1] = inv1;
                if (r0 + row0 < p.rows) write_lse(p, sg, r0 + row0, m0, l0);
                if (r0 + row1 < p.rows) write_lse(p, sg, r0 + row1, m1, l1);
            }
            mbar_arrive(inv_full);
            pc.lap(9);
        } else {
            pc.add(14, 1);
            for (int n = sg.lo; n < sg.hi; ++n) {
                const uint32_t stage = sbase + L::KV + ring.slot() * TILE;
                mbar_wait(p_full0 + 8 * ring.slot(), ring.phase());
                pc.lap(0);
                const float* const scale_s = scale0 + ring.slot() * M;
                const float a0 = scale_s[row0], a1 = scale_s[row1];
                if (!__all_sync(0xffffffffu, a0 == 1.f && a1 == 1.f)) {
#pragma unroll
                    for (int i = 0; i < 128; i += 4) {
                        o[i] *= a0; o[i + 1] *= a0;
                        o[i + 2] *= a1; o[i + 3] *= a1;
                    }
                }
                wgmma_fence();
                issue_pv_ss<T>(o, p_in_stage ? stage + 8 * REGION : sbase + L::P, stage, 1);
                wgmma_commit();
                pc.lap(1);
                wgmma_wait<0>();
                pc.lap(2);
                mbar_arrive(p_free0 + 8 * ring.slot());
                release(ring.slot());
                ring.step();
                pc.lap(3);
                pc.add(11, 1);
            }
            mbar_wait(inv_full, segs & 1);
            inv0 = inv_s[row0];
            inv1 = inv_s[row1];
            mbar_arrive(inv_free);
            pc.lap(9);
        }
#pragma unroll
        for (int i = 0; i < 128; i += 4) {
            const int col = wg * 256 + (i >> 2) * 8 + t4 * 2;
            if (r0 + row0 < p.rows) write_out2<T>(p, sg, r0 + row0, col, o[i] * inv0, o[i + 1] * inv0);
            if (r0 + row1 < p.rows) write_out2<T>(p, sg, r0 + row1, col, o[i + 2] * inv1, o[i + 3] * inv1);
        }
        pc.lap(10);
        ++segs;
    });
    if (wt == 0) pc.flush(1 + wg);
}

}  // namespace

#define MLA_DECODE_WS_KERNEL(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const __grid_constant__ MlaDecodeParams p) { \
        extern __shared__ __align__(1024) char smem[];                                                       \
        mla::pdl_launch_dependents(); /* the combine may launch now */ \
        decode_ws<T>(p, smem);                                                                               \
    }                                                                                                        \
    MLA_ENTRY_SMEM(NAME, Smem::ALLOC)

MLA_DECODE_WS_KERNEL(mla_decode_bf16_ws64, __nv_bfloat16)
MLA_DECODE_WS_KERNEL(mla_decode_fp16_ws64, __half)
