// One 64-key cache block of split-KV MLA decode on mma.sync (m16n8k16, fp32 accumulation),
// shared by the cp.async kernel (mla_decode.cu, the portable path) and the TMA kernel
// (mla_decode_tma.cu). The caller decides where Q and the block sit in shared memory
// (layout functors returning a shared-memory address) and how its 8 compute warps meet
// (a barrier functor), and owns the loads.
//
// A tile is M = 16 * RG query rows (rows are (token, head) pairs, r = j * h_q + h). Per block:
//   1. S = Q K^T   (M x 64, k = 576): warp (rg, cg) computes rows rg*16.. and 8*RG keys.
//   2. online softmax: row max / sum reduced across the warps of a row through shared
//      memory, P = exp2(S * scale * log2e - m) written to shared memory as T.
//   3. O += P V    (M x 512, k = 64): warp w owns columns w*64.. for all M rows, so the
//      fp32 accumulator (RG*8 mma tiles) stays in registers for the whole segment.
#pragma once
#include "mla_common.cuh"

namespace mla {

constexpr int MMA_WARPS = 8;

// Byte offset of the 16-byte chunk `chunk` of row `row` in a swizzled tile whose rows
// are `row_bytes` long (a multiple of 128): XOR-ing the chunk with row % 8 spreads the
// 8 row addresses of an ldmatrix over all 32 banks.
__device__ __forceinline__ uint32_t swz(int row, int chunk, int row_bytes) {
    return row * row_bytes + ((chunk ^ (row & 7)) << 4);
}
// The same XOR in the 128-byte-wide column-region layout that TMA's 128-byte swizzle
// writes: a tile of `rows` rows is 72 / 8 regions of rows x 128 bytes.
__device__ __forceinline__ uint32_t region_off(int row, int chunk, int rows) {
    return (chunk >> 3) * (rows * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

__device__ __forceinline__ void ldsm_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <typename T> __device__ void mma16816(float* c, const uint32_t* a, const uint32_t* b);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Shared-memory scratch of the softmax: P and the per-row statistics.
template <int M>
struct MmaScratch {
    static constexpr int P = 0;                      // M x 64 T, rows of 128 bytes, swizzled
    static constexpr int RED_MAX = P + M * BS * 2;   // [8 / RG][M] floats
    static constexpr int RED_SUM = RED_MAX + 512;    // [8 / RG][M] floats
    static constexpr int ROW_M = RED_SUM + 512;      // running max (log2 units)
    static constexpr int ROW_L = ROW_M + M * 4;      // running sum
    static constexpr int ROW_A = ROW_L + M * 4;      // rescale factor of this block
    static constexpr int BYTES = ROW_A + M * 4;
};

// Per-thread state of one tile over one segment. The first QR of the 36 k-steps of the
// warp's Q fragments (its 16 rows: 4 registers a k-step, 144 for all) stay in registers
// for the whole segment, so S reads that much less from shared memory (8 warps would
// otherwise read all of Q once each per block).
template <int RG, int QR = 0>
struct MmaTileState {
    float o[RG][8][4];
    int key_end[2];  // exclusive key bound of this thread's two phase-1 rows
    uint32_t qf[QR > 0 ? QR : 1][4];
};

// KS: independent accumulator sets for S (the 36 k-steps form KS dependency chains of
// 36 / KS mma each instead of one).
template <typename T, int RG, int KS = 1, int QR = 0>
struct MmaTile {
    static_assert(QR >= 0 && QR <= D / 16 && QR % KS == 0, "QR counts k-steps, whole rounds of KS");
    static_assert((D / 16) % KS == 0, "KS must divide the 36 k-steps");
    static constexpr int M = RG * 16;
    static constexpr int NCG = MMA_WARPS / RG;  // warps sharing one 16-row group in phase 1
    static constexpr int NT1 = RG;              // 8-key mma tiles per warp in phase 1
    using L = MmaScratch<M>;
    using State = MmaTileState<RG, QR>;

    int lane, warp, rg, cg, g, t4;
    char* scratch;         // MmaScratch<M> bytes (generic pointer)
    uint32_t scratch_u32;  // the same, as a shared-memory address

    __device__ MmaTile(int tid, char* scratch_) : scratch(scratch_) {
        lane = tid & 31;
        warp = tid >> 5;
        rg = warp % RG;
        cg = warp / RG;
        g = lane >> 2;
        t4 = lane & 3;
        scratch_u32 = smem_u32(scratch_);
    }
    __device__ float* f(int off) const { return reinterpret_cast<float*>(scratch + off); }

    // Starts a segment: running statistics and the accumulator reset (call after a barrier
    // that ends the previous segment's epilogue; `tid` < M threads write the statistics).
    __device__ void begin(const MlaDecodeParams& p, int tid, int r0, int len, State& st) const {
        if (tid < M) { f(L::ROW_M)[tid] = -CUDART_INF_F; f(L::ROW_L)[tid] = 0.f; }
#pragma unroll
        for (int h = 0; h < 2; ++h) st.key_end[h] = key_end_of_row(p, r0 + rg * 16 + g + h * 8, len);
#pragma unroll
        for (int a = 0; a < RG; ++a)
#pragma unroll
            for (int b = 0; b < 8; ++b)
#pragma unroll
                for (int c = 0; c < 4; ++c) st.o[a][b][c] = 0.f;
    }

    // The first QR k-steps of this warp's Q fragments into registers (once per segment,
    // after Q landed).
    template <typename QAt>
    __device__ void load_q(const QAt& q_at, State& st) const {
#pragma unroll
        for (int kk = 0; kk < QR; ++kk) ldsm_x4(st.qf[kk], q_at(rg * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    }

    // Phase 1 and 2 of block n: S = Q K^T, then the online softmax into P and the row
    // statistics. q_at(row, chunk) / k_at(key, chunk) give the shared-memory address of a
    // 16-byte chunk of Q row `row` / K row `key` (0..63) of the block. `after_s()` runs once
    // this warp has read Q and K for S. Ends with P and the factors in shared memory,
    // behind a barrier.
    template <typename QAt, typename KAt, typename Sync, typename AfterS>
    __device__ void scores(const MlaDecodeParams& p, int tid, int n, const QAt& q_at, const KAt& k_at, State& st,
                           const Sync& sync, const AfterS& after_s) const {
        float* red_max = f(L::RED_MAX);
        float* red_sum = f(L::RED_SUM);
        float* row_m = f(L::ROW_M);
        float* row_l = f(L::ROW_L);
        float* row_a = f(L::ROW_A);

        float s[NT1][4], sk[KS][NT1][4];
#pragma unroll
        for (int u = 0; u < KS; ++u)
#pragma unroll
            for (int a = 0; a < NT1; ++a)
#pragma unroll
                for (int c = 0; c < 4; ++c) sk[u][a][c] = 0.f;
        const int key0 = cg * 8 * NT1;
        // k-step kk into accumulator set u; A from registers for the first QR k-steps.
        const auto step = [&](int kk, int u) {
            uint32_t qa[4];
            if (kk >= QR) ldsm_x4(qa, q_at(rg * 16 + (lane & 15), kk * 2 + (lane >> 4)));
            const uint32_t* af = kk < QR ? st.qf[kk < QR ? kk : 0] : qa;
            if constexpr (NT1 == 1) {
                uint32_t bf[2];
                ldsm_x2(bf, k_at(key0 + (lane & 7), kk * 2 + ((lane >> 3) & 1)));
                mma16816<T>(sk[u][0], af, bf);
            } else {
#pragma unroll
                for (int np = 0; np < NT1 / 2; ++np) {
                    uint32_t bf[4];
                    const int grp = lane >> 3;
                    ldsm_x4(bf, k_at(key0 + np * 16 + (lane & 7) + (grp >> 1) * 8, kk * 2 + (grp & 1)));
                    mma16816<T>(sk[u][np * 2], af, bf);
                    mma16816<T>(sk[u][np * 2 + 1], af, bf + 2);
                }
            }
        };
        constexpr int QRK = QR / KS * KS;  // register k-steps, whole accumulator rounds
#pragma unroll
        for (int k0 = 0; k0 < QRK; k0 += KS)
#pragma unroll
            for (int u = 0; u < KS; ++u) step(k0 + u, u);
#pragma unroll(4 / KS > 0 ? 4 / KS : 1)
        for (int k0 = QRK; k0 < D / 16; k0 += KS)
#pragma unroll
            for (int u = 0; u < KS; ++u) step(k0 + u, u);
#pragma unroll
        for (int a = 0; a < NT1; ++a)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float x = sk[0][a][c];
#pragma unroll
                for (int u = 1; u < KS; ++u) x += sk[u][a][c];
                s[a][c] = x;
            }
        after_s();

        // Online softmax (log2 domain). Keys past a row's bound (the sequence end, causal
        // masking, padding rows) are -inf whatever S holds there (NaN rows of a partial
        // last block included).
        float mloc[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
        for (int a = 0; a < NT1; ++a)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int h = c >> 1;
                const int key = n * BS + key0 + a * 8 + t4 * 2 + (c & 1);
                s[a][c] = key < st.key_end[h] ? s[a][c] * p.scale_log2 : -CUDART_INF_F;
                mloc[h] = fmaxf(mloc[h], s[a][c]);
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            mloc[h] = fmaxf(mloc[h], __shfl_xor_sync(0xffffffffu, mloc[h], 1));
            mloc[h] = fmaxf(mloc[h], __shfl_xor_sync(0xffffffffu, mloc[h], 2));
            if (t4 == 0) red_max[cg * M + rg * 16 + g + h * 8] = mloc[h];
        }
        sync();
        float mnew[2], lsum[2] = {0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = rg * 16 + g + h * 8;
            float m = row_m[row];
#pragma unroll
            for (int w = 0; w < NCG; ++w) m = fmaxf(m, red_max[w * M + row]);
            mnew[h] = m;
        }
        if (tid < M) {
            float m = row_m[tid];
            const float mold = m;
#pragma unroll
            for (int w = 0; w < NCG; ++w) m = fmaxf(m, red_max[w * M + tid]);
            row_a[tid] = m == -CUDART_INF_F ? 1.f : exp2f(mold - m);
        }
        char* sp = scratch + L::P;
#pragma unroll
        for (int a = 0; a < NT1; ++a) {
            float pv[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int h = c >> 1;
                pv[c] = mnew[h] == -CUDART_INF_F ? 0.f : exp2f(s[a][c] - mnew[h]);
                lsum[h] += pv[c];
            }
            const int col = key0 + a * 8 + t4 * 2;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = rg * 16 + g + h * 8;
                *reinterpret_cast<uint32_t*>(sp + swz(row, col >> 3, BS * 2) + (col & 7) * 2) = Ty<T>::pack(pv[h * 2], pv[h * 2 + 1]);
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            lsum[h] += __shfl_xor_sync(0xffffffffu, lsum[h], 1);
            lsum[h] += __shfl_xor_sync(0xffffffffu, lsum[h], 2);
            if (t4 == 0) red_sum[cg * M + rg * 16 + g + h * 8] = lsum[h];
        }
        sync();
        if (tid < M) {
            float m = row_m[tid], l = 0.f;
#pragma unroll
            for (int w = 0; w < NCG; ++w) {
                m = fmaxf(m, red_max[w * M + tid]);
                l += red_sum[w * M + tid];
            }
            row_l[tid] = row_l[tid] * row_a[tid] + l;
            row_m[tid] = m;
        }
    }

    // Phase 3 of a block: O = O * alpha + P V over columns warp*64.., V read through
    // v_at(key, chunk) (the first 64 chunks of the block's K rows).
    template <typename VAt>
    __device__ void accumulate(const VAt& v_at, State& st) const {
        const float* row_a = f(L::ROW_A);
#pragma unroll
        for (int a = 0; a < RG; ++a) {
            const float al0 = row_a[a * 16 + g], al1 = row_a[a * 16 + g + 8];
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                st.o[a][b][0] *= al0; st.o[a][b][1] *= al0;
                st.o[a][b][2] *= al1; st.o[a][b][3] *= al1;
            }
        }
#pragma unroll
        for (int kk = 0; kk < BS / 16; ++kk) {
            uint32_t pf[RG][4];
#pragma unroll
            for (int a = 0; a < RG; ++a) ldsm_x4(pf[a], scratch_u32 + L::P + swz(a * 16 + (lane & 15), kk * 2 + (lane >> 4), BS * 2));
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t vf[4];
                ldsm_x4_t(vf, v_at(kk * 16 + (lane & 15), warp * 8 + np * 2 + (lane >> 4)));
#pragma unroll
                for (int a = 0; a < RG; ++a) {
                    mma16816<T>(st.o[a][np * 2], pf[a], vf);
                    mma16816<T>(st.o[a][np * 2 + 1], pf[a], vf + 2);
                }
            }
        }
    }

    // Epilogue of a segment: normalise and write (final, or a partial for combine), from
    // registers. Call after the barrier that ends the segment's last block.
    __device__ void finish(const MlaDecodeParams& p, const Segment& sg, int tid, int r0, const State& st) const {
        const float* row_m = f(L::ROW_M);
        const float* row_l = f(L::ROW_L);
#pragma unroll
        for (int a = 0; a < RG; ++a)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = a * 16 + g + h * 8;
                if (r0 + row >= p.rows) continue;
                const float l = row_l[row];
                const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
                for (int b = 0; b < 8; ++b)
                    write_out2<T>(p, sg, r0 + row, warp * 64 + b * 8 + t4 * 2, st.o[a][b][h * 2] * inv, st.o[a][b][h * 2 + 1] * inv);
            }
        if (tid < M && r0 + tid < p.rows) write_lse(p, sg, r0 + tid, row_m[tid], row_l[tid]);
    }
};

}  // namespace mla
