// Split-KV MLA decode, warp-specialised wgmma with the seesaw schedule (issue 8, stage C2
// of the design brief): 64-row tiles, one persistent CTA per SM part, three warpgroups.
// Built to be measured against mla_decode_ws.cu (C1); selected by MLA_DECODE_KERNEL=ws2.
//
//   WG2 (producer): as in C1: warp 8's lane 0 streams Q once per segment and every 64-token
//       block into one of 2 full stages by TMA.
//   WG0 / WG1: WG w owns O's columns 256w .. 256w + 255 and computes S and the softmax of
//       the blocks of its parity (a CTA-wide block counter, so ownership alternates across
//       segments too). For its block j it runs S(j), then issues the other's block j - 1
//       (its P from shared memory, rescaled by that block's factors: SS), then the softmax of j
//       (using the reference max the other published with j - 1), publishes P(j) into the
//       rope region of j's stage (dead once S(j) is done) with the new reference max and
//       factors, and issues its own PV(j) with P from registers (RS). So one warpgroup's
//       softmax runs under the other's products; the softmaxes form a chain that
//       alternates between the two (the seesaw).
//   Lazy rescaling as in C1 (the reference max moves only past +LAZY_TAU).
// Handshakes: full / empty per stage (empty: one arrival per consumer warpgroup, after its
// last read of the stage), Q full / empty (one arrival per consumer warpgroup after its
// last S of the segment), published[2] (by block parity: 128 owner arrivals; the other
// warpgroup waits each once, in order), l_ready (both warpgroups at a segment's end: each
// hands the other its partial row sums, double-buffered by segment parity).
//
// Untrusted input as in C1: a bad block index never becomes a TMA coordinate (the stage is
// zero-filled, MLA_ERR_BLOCK_INDEX); rows past the sequence end are masked in S and zeroed
// in the stage (by the block's owner, before its S) before any product reads them as V.
//
// Launch: grid (num_parts, ceil(rows / 64)), block 384, dynamic smem Smem::ALLOC.
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

using namespace mla;
constexpr int M = 64;                  // query rows per tile
constexpr int THREADS = 384;
constexpr int REGION = M * 128;        // one 64-column box of a 64-row tile (8 KiB)
constexpr int TILE = D / 64 * REGION;  // 9 regions: Q, or one cache block (72 KiB)
constexpr int ROPE = 8 * REGION;       // the rope region of a stage: P of its block once S is done
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
    static constexpr int KV = Q + TILE;             // STAGES x TILE
    static constexpr int MREF = KV + STAGES * TILE;  // [2][64] f32: reference max after a block, by block parity
    static constexpr int SCALE = MREF + 2 * M * 4;   // [2][64] f32: a block's rescale factors, by block parity
    static constexpr int LSUM = SCALE + 2 * M * 4;   // [2][2][64] f32: partial row sums, by segment parity and warpgroup
    static constexpr int BARS = LSUM + 4 * M * 4;    // full[2], empty[2], q_full, q_empty, published[2], l_ready
    static constexpr int TOTAL = BARS + (2 * STAGES + 5) * 8;
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

// O *= the per-row factors (rows row0 / row1 of this thread), skipped when all are 1.
__device__ __forceinline__ void rescale(float* o, float a0, float a1) {
    if (!__all_sync(0xffffffffu, a0 == 1.f && a1 == 1.f)) {
#pragma unroll
        for (int i = 0; i < 128; i += 4) {
            o[i] *= a0; o[i + 1] *= a0;
            o[i + 2] *= a1; o[i + 3] *= a1;
        }
    }
}

template <typename T>
__device__ void decode_ws2(const MlaDecodeParams& p, char* smem_raw) {
    using L = Smem;
    const uint32_t raw = smem_u32(smem_raw);
    char* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
    const uint32_t sbase = smem_u32(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = warp >> 2, wt = tid & 127;  // warpgroup, thread within it
    const int r0 = blockIdx.y * M;
    const uint32_t full0 = sbase + L::BARS, empty0 = full0 + STAGES * 8;
    const uint32_t q_full = empty0 + STAGES * 8, q_empty = q_full + 8, pub0 = q_empty + 8, l_ready = pub0 + 16;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, 2);
        }
        mbar_init(q_full, 1);
        mbar_init(q_empty, 2);
        mbar_init(pub0, 128);
        mbar_init(pub0 + 8, 128);
        mbar_init(l_ready, 256);
        mbar_init_fence();
    }
    if (warp == 8 && lane == 0) {
        tma_prefetch_map(&p.q_map);
        tma_prefetch_map(&p.kv_map);
    }
    __syncthreads();

    if (wg == 2) {
        // ---- producer (as in C1) ----
        regs_dec<PRODUCER_REGS>();
        if (warp != 8 || lane != 0) return;
        const uint64_t kv_policy = l2_evict_first(), q_policy = l2_evict_last();
        Ring<STAGES> ring;
        uint32_t q_loads = 0;
        for_each_segment(p, [&](const Segment& sg) {
            const auto load_block = [&](int n) {
                const uint32_t full = full0 + 8 * ring.slot();
                mbar_wait(empty0 + 8 * ring.slot(), ring.phase() ^ 1);
                const int idx = p.block_table[(size_t)sg.seq * p.max_blocks_per_seq + n];
                if (idx < 0 || idx >= p.num_blocks) {
                    atomicOr(p.error_flag, MLA_ERR_BLOCK_INDEX);
                    uint4* z = reinterpret_cast<uint4*>(smem + L::KV + ring.slot() * TILE);
                    for (int i = 0; i < TILE / 16; ++i) z[i] = make_uint4(0, 0, 0, 0);
                    fence_async_smem();
                    mbar_arrive(full);
                } else {
                    mbar_arrive_expect_tx(full, TILE);
                    const uint32_t dst = sbase + L::KV + ring.slot() * TILE;
#pragma unroll
                    for (int c = 0; c < D / 64; ++c) tma_load_3d(dst + c * REGION, &p.kv_map, c * 64, 0, idx, full, kv_policy);
                }
                ring.step();
            };
            load_block(sg.lo);
            mbar_wait(q_empty, (q_loads & 1) ^ 1);
            mbar_arrive_expect_tx(q_full, TILE);
#pragma unroll
            for (int c = 0; c < D / 64; ++c) tma_load_3d(sbase + L::Q + c * REGION, &p.q_map, c * 64, r0, sg.seq, q_full, q_policy);
            ++q_loads;
            for (int n = sg.lo + 1; n < sg.hi; ++n) load_block(n);
        });
        return;
    }

    // ---- consumers: WG w = wg ----
    regs_inc<CONSUMER_REGS>();
    const int wl = warp & 3, g = lane >> 2, t4 = lane & 3;
    const int row0 = 16 * wl + g, row1 = row0 + 8;  // this thread's accumulator rows
    float* mref_s = reinterpret_cast<float*>(smem + L::MREF);
    float* scale_s = reinterpret_cast<float*>(smem + L::SCALE);
    float* lsum_s = reinterpret_cast<float*>(smem + L::LSUM);
    const float c = p.scale_log2;  // > 0 (checked on the host)
    uint32_t gb = 0;               // blocks of earlier segments: ring position and ownership parity
    uint32_t q_loads = 0, segs = 0;
    float o[128];

    for_each_segment(p, [&](const Segment& sg) {
        const int len = sg.len, nb = sg.hi - sg.lo;
        const int key_end0 = key_end_of_row(p, r0 + row0, len), key_end1 = key_end_of_row(p, r0 + row1, len);
        const auto stage_of = [&](int j) { return sbase + L::KV + ((gb + j) % STAGES) * TILE; };
        const auto release = [&](int j) {
            if (wt == 0) mbar_arrive(empty0 + 8 * ((gb + j) % STAGES));
        };
        // The other warpgroup's block j (own PVs retired before): wait for its P and
        // factors, O *= factors, O += P V-half (SS); its reference max becomes ours.
        float s[32];
        uint32_t pa[16];  // P of own block as A fragments of the 4 k-steps of PV
        float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F, l0 = 0.f, l1 = 0.f;
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        const auto other_block = [&](int j) {
            const uint32_t gj = gb + j;
            mbar_wait(pub0 + 8 * (gj & 1), (gj >> 1) & 1);
            const float a0 = scale_s[(gj & 1) * M + row0], a1 = scale_s[(gj & 1) * M + row1];
            m0 = mref_s[(gj & 1) * M + row0];
            m1 = mref_s[(gj & 1) * M + row1];
            l0 *= a0;
            l1 *= a1;
            rescale(o, a0, a1);
            const uint32_t st = stage_of(j);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < BS / 16; ++ks)
                Mma<T>::pv_ss(o, sw128_desc(st + ROPE + ks * 32, 16, 1024), sw128_desc(st + wg * 4 * REGION + ks * 16 * 128, REGION, 1024));
            wgmma_commit();
        };

        mbar_wait(q_full, q_loads & 1);
        ++q_loads;
        const int j0 = (int)((wg - gb) & 1);  // this warpgroup's first block of the segment
        if (j0 >= nb && wt == 0) mbar_arrive(q_empty);  // no S here: Q is free for this warpgroup
        for (int j = j0; j < nb; j += 2) {
            const int n = sg.lo + j;
            const uint32_t gj = gb + j, st = stage_of(j);
            // A: own PV(j - 2) retired and its stage released (with 2 stages, block j
            // lands in it), then S(j), after zeroing the V rows past the sequence end.
            if (j >= 2) {
                wgmma_wait<0>();
                release(j - 2);
            }
            mbar_wait(full0 + 8 * (gj % STAGES), (gj / STAGES) & 1);
            const int valid = len - n * BS;
            if (valid < BS) {
                char* sp = smem + L::KV + (gj % STAGES) * TILE;
                for (int i = wt; i < (BS - valid) * 64; i += 128) {
                    const int row = valid + (i >> 6);
                    *reinterpret_cast<uint4*>(sp + ((i >> 3) & 7) * REGION + row * 128 + (i & 7) * 16) = make_uint4(0, 0, 0, 0);
                }
                fence_async_smem();
                if (wg == 0) named_sync<2, 128>(); else named_sync<3, 128>();
            }
            wgmma_fence();
            Mma<T>::template qk<0>(s, sw128_desc(sbase + L::Q, 16, 1024), sw128_desc(st, 16, 1024));
#pragma unroll
            for (int kk = 1; kk < D / 16; ++kk) {
                const uint32_t off = (kk >> 2) * REGION + (kk & 3) * 32;
                Mma<T>::template qk<1>(s, sw128_desc(sbase + L::Q + off, 16, 1024), sw128_desc(st + off, 16, 1024));
            }
            wgmma_commit();
            // B: S(j) retired (O must not change while a product of this warpgroup is in
            // flight: ptxas would serialise), then the other's block j - 1.
            wgmma_wait<0>();
            if (j >= 1) other_block(j - 1);
            // C: the softmax of j, under PV(j - 1) and the other warpgroup's products.
            if (j + 2 >= nb && wt == 0) mbar_arrive(q_empty);  // this warpgroup's last S
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
            // Publish P(j) into the stage's rope region (S(j) was its last reader) with the
            // reference max and the factors.
            char* sp = smem + L::KV + (gj % STAGES) * TILE + ROPE;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const int key = k * 8 + t4 * 2;
                *reinterpret_cast<uint32_t*>(sp + tile_off(row0, key >> 3) + (key & 7) * 2) = pa[2 * k];
                *reinterpret_cast<uint32_t*>(sp + tile_off(row1, key >> 3) + (key & 7) * 2) = pa[2 * k + 1];
            }
            if (t4 == 0) {
                mref_s[(gj & 1) * M + row0] = mn0;
                mref_s[(gj & 1) * M + row1] = mn1;
                scale_s[(gj & 1) * M + row0] = a0;
                scale_s[(gj & 1) * M + row1] = a1;
            }
            fence_async_smem();  // P is read by the other's wgmma
            mbar_arrive(pub0 + 8 * (gj & 1));
            // D: PV(j - 1) retired, its stage done for this warpgroup; O *= a, O += P V-half (RS).
            wgmma_wait<0>();
            if (j >= 1) release(j - 1);
            l0 = l0 * a0 + ps0;
            l1 = l1 * a1 + ps1;
            rescale(o, a0, a1);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < BS / 16; ++ks) {
                const uint32_t a[4] = {pa[4 * ks], pa[4 * ks + 1], pa[4 * ks + 2], pa[4 * ks + 3]};
                Mma<T>::pv_rs(o, a, sw128_desc(st + wg * 4 * REGION + ks * 16 * 128, REGION, 1024));
            }
            wgmma_commit();
        }
        // The tail: the segment's last block, if it is the other's; own blocks retired.
        wgmma_wait<0>();
        const int jl = nb - 1;
        if (((gb + jl) & 1) != (uint32_t)wg) {
            if (jl >= 1) release(jl - 1);
            other_block(jl);
            wgmma_wait<0>();
        }
        release(jl);
        gb += nb;

        // Row sums: the 4 threads of a row hold partial sums; then the other warpgroup's.
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        float* ls = lsum_s + (segs & 1) * 2 * M;
        if (t4 == 0) {
            ls[wg * M + row0] = l0;
            ls[wg * M + row1] = l1;
        }
        mbar_arrive(l_ready);
        mbar_wait(l_ready, segs & 1);
        ++segs;
        l0 += ls[(wg ^ 1) * M + row0];
        l1 += ls[(wg ^ 1) * M + row1];
        if (wg == 0 && t4 == 0) {
            if (r0 + row0 < p.rows) write_lse(p, sg, r0 + row0, m0, l0);
            if (r0 + row1 < p.rows) write_lse(p, sg, r0 + row1, m1, l1);
        }
        const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
        for (int i = 0; i < 128; i += 4) {
            const int col = wg * 256 + (i >> 2) * 8 + t4 * 2;
            if (r0 + row0 < p.rows) write_out2<T>(p, sg, r0 + row0, col, o[i] * inv0, o[i + 1] * inv0);
            if (r0 + row1 < p.rows) write_out2<T>(p, sg, r0 + row1, col, o[i + 2] * inv1, o[i + 3] * inv1);
        }
    });
}

}  // namespace

#define MLA_DECODE_WS2_KERNEL(NAME, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const __grid_constant__ MlaDecodeParams p) { \
        extern __shared__ __align__(1024) char smem[];                                                       \
        mla::pdl_launch_dependents(); /* the combine may launch now */                                       \
        decode_ws2<T>(p, smem);                                                                              \
    }                                                                                                        \
    MLA_ENTRY_SMEM(NAME, Smem::ALLOC)

MLA_DECODE_WS2_KERNEL(mla_decode_bf16_ws64s, __nv_bfloat16)
MLA_DECODE_WS2_KERNEL(mla_decode_fp16_ws64s, __half)
