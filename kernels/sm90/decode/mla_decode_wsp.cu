// Split-KV MLA decode, warp-specialised wgmma with blocks taken in pairs (issue 8, a seesaw
// that keeps each O half's products in one stream): 64-row tiles, one persistent CTA per SM
// part, three warpgroups. A variant measured against mla_decode_ws.cu (C1), selected by
// MLA_DECODE_KERNEL=wsp (BENCHMARKS.md row 12).
//
//   WG2 (producer): as in C1 (per-region full barriers, 2 stages, 2-CTA multicast).
//   A segment's blocks go in pairs (a, b) = (lo + 2q, lo + 2q + 1). WG0 owns O's columns
//   0-255 and computes S and the softmax of every a; WG1 owns 256-511 and those of every b.
//   The tensor pipe then sees S(a) S(b) PV(a) PV(b): the softmax of a runs under S(b), the
//   softmax of b under PV(a), and each stage is refilled under the other block's products.
//     WG0: S(a); softmax(a) against the reference max after the previous b; publish P(a)
//          (into a's rope region, dead after S(a)) with its factors and max; PV(a)-left
//          (RS); wait for P(b); PV(b)-left (SS) chained behind it in the same accumulator.
//     WG1: S(b); wait for P(a); PV(a)-right (SS); softmax(b) against a's max; publish P(b);
//          PV(b)-right (RS), chained behind PV(a)-right.
//   Lazy rescaling (the reference max moves only past +LAZY_TAU) makes a factor other than 1
//   rare; only then does a warpgroup wait for its in-flight product before scaling O. The
//   publisher decides that for its whole warpgroup (a barrier reduction) and publishes the
//   decision, so every wgmma wait stays warpgroup-uniform.
// Handshakes: full per region and empty per stage (2 arrivals per CTA of the cluster), Q full
// / empty (one arrival per consumer warpgroup after its last S of the segment), pub[slot]
// (128 arrivals of the block's owner), l_ready (both consumer warpgroups at a segment's end,
// row sums double-buffered by segment parity).
//
// Untrusted input as in C1: a bad block index never becomes a TMA coordinate (the stage is
// zero-filled, MLA_ERR_BLOCK_INDEX); rows past the sequence end are masked in S and zeroed in
// the stage by the block's owner before its S, so before any product reads them as V.
//
// Launch: grid (num_parts, ceil(rows / 64)), cluster (1, 1 or 2, 1), block 384, dynamic smem
// Smem::ALLOC; params as __grid_constant__.
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

using namespace mla;
constexpr int M = 64;                  // query rows per tile
constexpr int THREADS = 384;
constexpr int REGION = M * 128;        // one 64-column box of a 64-row tile (8 KiB)
constexpr int TILE = D / 64 * REGION;  // 9 regions: Q, or one cache block (72 KiB)
constexpr int ROPE = 8 * REGION;       // a stage's rope region: its block's P once S is done
constexpr int STAGES = 2;
constexpr int NR = D / 64;             // regions per block, each with its full barrier
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;  // 2 * 128 * 232 + 128 * 40 = 384 * 168
constexpr float LAZY_TAU = 8.f;  // log2 units the reference max may lag a row's true max

__device__ __forceinline__ uint32_t tile_off(int row, int chunk) {
    return (chunk >> 3) * REGION + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// Shared memory plan (bytes from a 1024-aligned base); ALLOC is the entry's MLA_ENTRY_SMEM.
struct Smem {
    static constexpr int Q = 0;
    static constexpr int KV = Q + TILE;              // STAGES x TILE
    static constexpr int MREF = KV + STAGES * TILE;  // [slot][64] f32: the reference max after the slot's block
    static constexpr int SCALE = MREF + STAGES * M * 4;  // [slot][64] f32: that block's rescale factors
    static constexpr int FLAG = SCALE + STAGES * M * 4;  // [slot] u32: some factor of that block is not 1
    static constexpr int LSUM = FLAG + 16;           // [segment parity][warpgroup][64] f32: partial row sums
    static constexpr int BARS = LSUM + 4 * M * 4;    // full[2][9], empty[2], q_full, q_empty, pub[2], l_ready
    static constexpr int TOTAL = BARS + (STAGES * NR + STAGES + 5) * 8;
    static constexpr int ALLOC = TOTAL + 1024;
    static_assert(ALLOC <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

// The mbarriers' shared addresses: full[slot][region], empty[slot], Q full / empty, pub[slot], l_ready.
struct Bars {
    uint32_t full0, empty0, q_full, q_empty, pub0, l_ready;
    __device__ explicit Bars(uint32_t sbase)
        : full0(sbase + Smem::BARS), empty0(full0 + STAGES * NR * 8), q_full(empty0 + STAGES * 8), q_empty(q_full + 8),
          pub0(q_empty + 8), l_ready(pub0 + STAGES * 8) {}
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

// Whether `v` holds for any thread of the 128 at named barrier ID (a warpgroup).
template <int ID>
__device__ __forceinline__ bool warpgroup_any(bool v) {
    uint32_t r;
    asm volatile(
        "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, 128, p;\n selp.u32 %0, 1, 0, q;\n}\n"
        : "=r"(r)
        : "r"((uint32_t)v), "n"(ID)
        : "memory");
    return r != 0;
}

__device__ __forceinline__ void scale_o(float* o, float a0, float a1) {
#pragma unroll
    for (int i = 0; i < 128; i += 4) {
        o[i] *= a0; o[i + 1] *= a0;
        o[i + 2] *= a1; o[i + 3] *= a1;
    }
}

// One consumer warpgroup: WG 0 owns the a blocks and O[:, 0:256], WG 1 the b blocks and
// O[:, 256:512]. A template per warpgroup, so neither's registers are allocated around the
// other's code (one function for both spilled).
template <typename T, int WG>
__device__ __forceinline__ void consume(const MlaDecodeParams& p, char* smem, uint32_t sbase) {
    using L = Smem;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wt = tid & 127;
    const int r0 = blockIdx.y * M;
    const Bars bars(sbase);
    const uint32_t full0 = bars.full0, empty0 = bars.empty0, q_full = bars.q_full, q_empty = bars.q_empty, pub0 = bars.pub0, l_ready = bars.l_ready;
    const uint32_t cs = cluster_size();
    const int wl = warp & 3, g = lane >> 2, t4 = lane & 3;
    const int row0 = 16 * wl + g, row1 = row0 + 8;  // this thread's accumulator rows
    float* mref_s = reinterpret_cast<float*>(smem + L::MREF);
    float* scale_s = reinterpret_cast<float*>(smem + L::SCALE);
    volatile uint32_t* flag_s = reinterpret_cast<volatile uint32_t*>(smem + L::FLAG);
    float* lsum_s = reinterpret_cast<float*>(smem + L::LSUM);
    const float c = p.scale_log2;  // > 0 (checked on the host)
    Ring<STAGES> ring;
    uint32_t q_loads = 0, segs = 0;
    float o[128];
    float s[32];
    uint32_t pa[16];  // P of this warpgroup's own block, as the A fragments of PV's 4 k-steps

    const auto release = [&](int slot) {
        if (wt != 0) return;
        if (cs == 1) {
            mbar_arrive(empty0 + 8 * slot);
        } else {
            for (uint32_t r = 0; r < cs; ++r) mbar_arrive_cluster(cluster_addr(empty0 + 8 * slot, r));
        }
    };
    const auto stage_of = [&](const Ring<STAGES>& r) { return sbase + L::KV + r.slot() * TILE; };
    // O-half += P V-half of the block at ring position r, P from that stage's rope region.
    const auto pv_ss = [&](const Ring<STAGES>& r) {
        const uint32_t st = stage_of(r);
#pragma unroll
        for (int ks = 0; ks < BS / 16; ++ks)
            Mma<T>::pv_ss(o, sw128_desc(st + ROPE + ks * 32, 16, 1024), sw128_desc(st + WG * 4 * REGION + ks * 16 * 128, REGION, 1024));
    };
    const auto pv_rs = [&](const Ring<STAGES>& r) {
        const uint32_t st = stage_of(r);
#pragma unroll
        for (int ks = 0; ks < BS / 16; ++ks) {
            const uint32_t a[4] = {pa[4 * ks], pa[4 * ks + 1], pa[4 * ks + 2], pa[4 * ks + 3]};
            Mma<T>::pv_rs(o, a, sw128_desc(st + WG * 4 * REGION + ks * 16 * 128, REGION, 1024));
        }
    };

    for_each_segment(p, [&](const Segment& sg) {
        const int len = sg.len;
        const int key_end0 = key_end_of_row(p, r0 + row0, len), key_end1 = key_end_of_row(p, r0 + row1, len);
        float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F, l0 = 0.f, l1 = 0.f;  // reference max (log2), partial sums
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;

        // Block n at ring position r, owned by this warpgroup: zero the V rows past the
        // sequence end, then S = Q K^T region by region as the block lands (one group).
        const auto issue_s = [&](int n, const Ring<STAGES>& r) {
            const uint32_t st = stage_of(r);
            const uint32_t full = full0 + 8 * NR * r.slot();
            const int valid = len - n * BS;
            if (valid < BS) {
                for (int k = 0; k < NR; ++k) mbar_wait(full + 8 * k, r.phase());
                char* sp = smem + L::KV + r.slot() * TILE;
                for (int i = wt; i < (BS - valid) * 64; i += 128) {
                    const int row = valid + (i >> 6);
                    *reinterpret_cast<uint4*>(sp + ((i >> 3) & 7) * REGION + row * 128 + (i & 7) * 16) = make_uint4(0, 0, 0, 0);
                }
                fence_async_smem();
                named_sync<2 + WG, 128>();
            }
            mbar_wait(full, r.phase());
            wgmma_fence();
            Mma<T>::template qk<0>(s, sw128_desc(sbase + L::Q, 16, 1024), sw128_desc(st, 16, 1024));
#pragma unroll
            for (int kk = 1; kk < D / 16; ++kk) {
                if ((kk & 3) == 0) {
                    mbar_wait(full + 8 * (kk >> 2), r.phase());
                    wgmma_fence();
                }
                const uint32_t off = (kk >> 2) * REGION + (kk & 3) * 32;
                Mma<T>::template qk<1>(s, sw128_desc(sbase + L::Q + off, 16, 1024), sw128_desc(st + off, 16, 1024));
            }
            wgmma_commit();
        };
        // The online softmax of block n (S retired) against the reference max (m0, m1), which
        // it may raise; P into pa, the row sums' update into l, the factors into (a0, a1).
        // Then P, the factors and the new max go to the block's slot for the other warpgroup.
        // Returns whether some factor of the warpgroup is not 1.
        const auto softmax_publish = [&](int n, const Ring<STAGES>& r, float& a0, float& a1) {
            // Keys past a row's end read as -inf. S itself is left alone: writing its
            // accumulator while the other product is in flight makes ptxas serialise (C7515).
            // Element i is key n * BS + 8 (i / 4) + 2 t4 + i % 2 of row (i & 2 ? row1 : row0).
            const int lim0 = key_end0 - n * BS - t4 * 2, lim1 = key_end1 - n * BS - t4 * 2;
            const auto sv = [&](int i) { return (i >> 2) * 8 + (i & 1) >= (i & 2 ? lim1 : lim0) ? -CUDART_INF_F : s[i]; };
            float mx0 = -CUDART_INF_F, mx1 = -CUDART_INF_F;
#pragma unroll
            for (int i = 0; i < 32; i += 4) {
                mx0 = fmaxf(mx0, fmaxf(sv(i), sv(i + 1)));
                mx1 = fmaxf(mx1, fmaxf(sv(i + 2), sv(i + 3)));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float b0 = mx0 * c, b1 = mx1 * c;
            const float mn0 = b0 > m0 + LAZY_TAU ? b0 : m0, mn1 = b1 > m1 + LAZY_TAU ? b1 : m1;
            a0 = mn0 == m0 ? 1.f : ex2_approx(m0 - mn0);
            a1 = mn1 == m1 ? 1.f : ex2_approx(m1 - mn1);
            m0 = mn0;
            m1 = mn1;
            const float u0 = mn0 == -CUDART_INF_F ? 0.f : mn0, u1 = mn1 == -CUDART_INF_F ? 0.f : mn1;
            float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
            for (int i = 0; i < 32; i += 4) {
                const float p00 = ex2_approx(fmaf(sv(i), c, -u0)), p01 = ex2_approx(fmaf(sv(i + 1), c, -u0));
                const float p10 = ex2_approx(fmaf(sv(i + 2), c, -u1)), p11 = ex2_approx(fmaf(sv(i + 3), c, -u1));
                ps0 += p00 + p01;
                ps1 += p10 + p11;
                pa[i >> 1] = Ty<T>::pack(p00, p01);        // row0, keys 8j + 2t
                pa[(i >> 1) + 1] = Ty<T>::pack(p10, p11);  // row1
            }
            l0 = l0 * a0 + ps0;
            l1 = l1 * a1 + ps1;
            const bool any = warpgroup_any<2 + WG>(a0 != 1.f || a1 != 1.f);
            char* sp = smem + L::KV + r.slot() * TILE + ROPE;  // S(n) was its last reader
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const int key = k * 8 + t4 * 2;
                *reinterpret_cast<uint32_t*>(sp + tile_off(row0, key >> 3) + (key & 7) * 2) = pa[2 * k];
                *reinterpret_cast<uint32_t*>(sp + tile_off(row1, key >> 3) + (key & 7) * 2) = pa[2 * k + 1];
            }
            if (t4 == 0) {
                mref_s[r.slot() * M + row0] = mn0;
                mref_s[r.slot() * M + row1] = mn1;
                scale_s[r.slot() * M + row0] = a0;
                scale_s[r.slot() * M + row1] = a1;
            }
            if (wt == 0) flag_s[r.slot()] = any ? 1u : 0u;
            fence_async_smem();  // P is read by the other warpgroup's wgmma
            mbar_arrive(pub0 + 8 * r.slot());
            return any;
        };
        // The other warpgroup's block at ring position r: its P, factors and max. The factors
        // scale this warpgroup's row sums; O is scaled by the caller. Returns the block's flag.
        const auto take = [&](const Ring<STAGES>& r, float& a0, float& a1) {
            mbar_wait(pub0 + 8 * r.slot(), r.phase());
            a0 = scale_s[r.slot() * M + row0];
            a1 = scale_s[r.slot() * M + row1];
            m0 = mref_s[r.slot() * M + row0];
            m1 = mref_s[r.slot() * M + row1];
            l0 *= a0;
            l1 *= a1;
            return flag_s[r.slot()] != 0;
        };

        mbar_wait(q_full, q_loads & 1);
        ++q_loads;
        bool prev_b = false;  // the previous pair had a b, whose stage this warpgroup still holds
        if (WG == 1 && sg.hi - sg.lo < 2 && wt == 0) mbar_arrive(q_empty);  // no b: no S here
        for (int a = sg.lo; a < sg.hi; a += 2) {
            const bool has_b = a + 1 < sg.hi;
            const Ring<STAGES> ra = ring, rb = ring.next();
            // This warpgroup's product of the previous b retires and its stage is released:
            // the next b lands there.
            wgmma_wait<0>();
            if (prev_b) release(Ring<STAGES>{ring.i - 1}.slot());
            float a0, a1;
            if (WG == 0) {
                issue_s(a, ra);
                wgmma_wait<0>();
                if (a + 2 >= sg.hi && wt == 0) mbar_arrive(q_empty);  // WG0's last S
                const bool any = softmax_publish(a, ra, a0, a1);
                if (any) scale_o(o, a0, a1);  // nothing of O in flight
                wgmma_fence();
                pv_rs(ra);
                wgmma_commit();
                if (has_b) {
                    if (take(rb, a0, a1)) {
                        wgmma_wait<0>();
                        scale_o(o, a0, a1);
                    }
                    wgmma_fence();
                    pv_ss(rb);
                    wgmma_commit();
                    wgmma_wait<1>();  // PV(a) retired
                } else {
                    wgmma_wait<0>();
                }
                release(ra.slot());
            } else {
                if (has_b) issue_s(a + 1, rb);
                if (take(ra, a0, a1)) {  // rare: S(b) retires first (ptxas serialises a def of O inside its stage)
                    wgmma_wait<0>();
                    scale_o(o, a0, a1);
                }
                wgmma_fence();
                pv_ss(ra);
                wgmma_commit();
                if (has_b) {
                    wgmma_wait<1>();  // S(b) retired
                    if (a + 3 >= sg.hi && wt == 0) mbar_arrive(q_empty);  // WG1's last S
                    if (softmax_publish(a + 1, rb, a0, a1)) {
                        wgmma_wait<0>();
                        scale_o(o, a0, a1);
                    }
                    wgmma_fence();
                    pv_rs(rb);
                    wgmma_commit();
                    wgmma_wait<1>();  // PV(a) retired
                } else {
                    wgmma_wait<0>();
                }
                release(ra.slot());
            }
            prev_b = has_b;
            ring.step(has_b ? 2 : 1);
        }
        wgmma_wait<0>();
        if (prev_b) release(Ring<STAGES>{ring.i - 1}.slot());

        // Row sums: the 4 threads of a row hold partial sums; then the other warpgroup's.
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        float* ls = lsum_s + (segs & 1) * 2 * M;
        if (t4 == 0) {
            ls[WG * M + row0] = l0;
            ls[WG * M + row1] = l1;
        }
        mbar_arrive(l_ready);
        mbar_wait(l_ready, segs & 1);
        ++segs;
        l0 += ls[(WG ^ 1) * M + row0];
        l1 += ls[(WG ^ 1) * M + row1];
        if (WG == 0 && t4 == 0) {
            if (r0 + row0 < p.rows) write_lse(p, sg, r0 + row0, m0, l0);
            if (r0 + row1 < p.rows) write_lse(p, sg, r0 + row1, m1, l1);
        }
        const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
        for (int i = 0; i < 128; i += 4) {
            const int col = WG * 256 + (i >> 2) * 8 + t4 * 2;
            if (r0 + row0 < p.rows) write_out2<T>(p, sg, r0 + row0, col, o[i] * inv0, o[i + 1] * inv0);
            if (r0 + row1 < p.rows) write_out2<T>(p, sg, r0 + row1, col, o[i + 2] * inv1, o[i + 3] * inv1);
        }
    });
}

template <typename T, int PF>
__device__ void decode_wsp(const MlaDecodeParams& p, char* smem_raw) {
    using L = Smem;
    const uint32_t raw = smem_u32(smem_raw);
    char* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
    const uint32_t sbase = smem_u32(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = warp >> 2;  // warpgroup
    const int r0 = blockIdx.y * M;
    const Bars bars(sbase);
    const uint32_t full0 = bars.full0, empty0 = bars.empty0, q_full = bars.q_full, q_empty = bars.q_empty, pub0 = bars.pub0, l_ready = bars.l_ready;
    const uint32_t cs = cluster_size(), rank = cluster_rank();

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            for (int c = 0; c < NR; ++c) mbar_init(full0 + 8 * (s * NR + c), 1);
            mbar_init(empty0 + 8 * s, 2 * cs);
            mbar_init(pub0 + 8 * s, 128);
        }
        mbar_init(q_full, 1);
        mbar_init(q_empty, 2);
        mbar_init(l_ready, 256);
        mbar_init_fence();
    }
    if (warp == 8 && lane == 0) {
        tma_prefetch_map(&p.q_map);
        tma_prefetch_map(&p.kv_map);
    }
    if (cs > 1) cluster_sync(); else __syncthreads();

    if (wg == 2) {
        // ---- producer (as in C1) ----
        regs_dec<PRODUCER_REGS>();
        if (warp != 8 || lane != 0) return;
        const uint64_t kv_policy = l2_evict_first(), q_policy = l2_evict_last();
        Ring<STAGES> ring;
        uint32_t q_loads = 0;
        for_each_segment(p, [&](const Segment& sg) {
            const auto load_block = [&](int n) {
                const uint32_t full = full0 + 8 * NR * ring.slot();
                mbar_wait(empty0 + 8 * ring.slot(), ring.phase() ^ 1);
                const int idx = p.block_table[(size_t)sg.seq * p.max_blocks_per_seq + n];
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
                        for (int c = 0; c < NR; ++c) tma_load_3d(dst + c * REGION, &p.kv_map, c * 64, 0, idx, full + 8 * c, kv_policy);
                    } else {
                        for (int c = rank; c < NR; c += cs)
                            tma_load_3d_multicast(dst + c * REGION, &p.kv_map, c * 64, 0, idx, full + 8 * c, (uint16_t)((1u << cs) - 1), kv_policy);
                    }
                }
                // PF > 0 (an experiment, BENCHMARKS.md row 12): block n + PF of the segment
                // into L2 now, so its TMA load later comes from L2; one CTA of a cluster per block.
                if (PF > 0 && n + PF < sg.hi && (cs == 1 || (uint32_t)(n & 1) == rank)) {
                    const int pidx = p.block_table[(size_t)sg.seq * p.max_blocks_per_seq + n + PF];
                    if (pidx >= 0 && pidx < p.num_blocks)
                        bulk_prefetch_l2(static_cast<const char*>(p.kv) + (size_t)pidx * TILE, TILE);
                }
                ring.step();
            };
            load_block(sg.lo);
            mbar_wait(q_empty, (q_loads & 1) ^ 1);
            mbar_arrive_expect_tx(q_full, TILE);
#pragma unroll
            for (int c = 0; c < NR; ++c) tma_load_3d(sbase + L::Q + c * REGION, &p.q_map, c * 64, r0, sg.seq, q_full, q_policy);
            ++q_loads;
            for (int n = sg.lo + 1; n < sg.hi; ++n) load_block(n);
        });
        for (int s = 0; s < STAGES; ++s) {
            mbar_wait(empty0 + 8 * ring.slot(), ring.phase() ^ 1);
            ring.step();
        }
        return;
    }

    // ---- consumers ----
    regs_inc<CONSUMER_REGS>();
    if (wg == 0) consume<T, 0>(p, smem, sbase); else consume<T, 1>(p, smem, sbase);
}

}  // namespace

#define MLA_DECODE_WSP_KERNEL(NAME, T, PF)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const __grid_constant__ MlaDecodeParams p) { \
        extern __shared__ __align__(1024) char smem[];                                                       \
        mla::pdl_launch_dependents(); /* the combine may launch now */                                       \
        decode_wsp<T, PF>(p, smem);                                                                              \
    }                                                                                                        \
    MLA_ENTRY_SMEM(NAME, Smem::ALLOC)

MLA_DECODE_WSP_KERNEL(mla_decode_bf16_ws64p, __nv_bfloat16, 0)
MLA_DECODE_WSP_KERNEL(mla_decode_fp16_ws64p, __half, 0)
MLA_DECODE_WSP_KERNEL(mla_decode_bf16_ws64p2, __nv_bfloat16, 2)
MLA_DECODE_WSP_KERNEL(mla_decode_fp16_ws64p2, __half, 2)
MLA_DECODE_WSP_KERNEL(mla_decode_bf16_ws64p4, __nv_bfloat16, 4)
MLA_DECODE_WSP_KERNEL(mla_decode_fp16_ws64p4, __half, 4)
