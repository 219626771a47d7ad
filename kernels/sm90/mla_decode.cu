// Split-KV MLA decode on the tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// One thread block = 8 warps handles a tile of M = 16 * RG query rows of one sequence
// (rows are (token, head) pairs, r = j * h_q + h) over the segments the plan gave its
// part (blockIdx.x); blockIdx.y picks the row tile. Per 64-token cache block:
//   1. S = Q K^T   (M x 64, k = 576): warp (rg, cg) computes rows rg*16.. and 8*RG keys.
//   2. online softmax: row max / sum reduced across the warps of a row through shared
//      memory, P = exp2(S * scale * log2e - m) written to shared memory as T.
//   3. O += P V    (M x 512, k = 64): warp w owns columns w*64.. for all M rows, so the
//      fp32 accumulator (RG*8 mma tiles) stays in registers for the whole segment.
// Cache blocks stream through a two-stage cp.async pipeline; rows past the sequence end
// are zero-filled in shared memory (never read from memory that may hold NaN), and every
// block index is checked against num_blocks before it is dereferenced.
#include "mla_common.cuh"

namespace {

using namespace mla;
constexpr int THREADS = 256;  // 8 warps

// Byte offset of the 16-byte chunk `chunk` of row `row` in a swizzled tile whose rows
// are `row_bytes` long (a multiple of 128): XOR-ing the chunk with row % 8 spreads the
// 8 row addresses of an ldmatrix over all 32 banks.
__device__ __forceinline__ uint32_t swz(int row, int chunk, int row_bytes) {
    return row * row_bytes + ((chunk ^ (row & 7)) << 4);
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

// mma.sync m16n8k16, fp32 accumulation.
template <typename T> __device__ void mma16816(float* c, const uint32_t* a, const uint32_t* b);
template <> __device__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ void mma16816<__half>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Shared memory plan (bytes), kept in step with DecodeKernel::function() in gpu/ops.rs.
template <int M> struct Smem {
    static constexpr int Q = 0;
    static constexpr int K0 = Q + M * D * 2;
    static constexpr int K1 = K0 + BS * D * 2;
    static constexpr int P = K1 + BS * D * 2;
    static constexpr int RED_MAX = P + M * BS * 2;   // [8 / RG][M] floats
    static constexpr int RED_SUM = RED_MAX + 512;    // [8 / RG][M] floats
    static constexpr int ROW_M = RED_SUM + 512;      // running max (log2 units)
    static constexpr int ROW_L = ROW_M + M * 4;      // running sum
    static constexpr int ROW_A = ROW_L + M * 4;      // rescale factor of this block
    static constexpr int TOTAL = ROW_A + M * 4;
    static_assert(TOTAL <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

template <typename T, int RG>
__device__ void decode_tile(const MlaDecodeParams& p, char* smem) {
    constexpr int M = RG * 16;
    constexpr int NCG = 8 / RG;       // warps sharing one 16-row group in phase 1
    constexpr int NT1 = RG;           // 8-key mma tiles per warp in phase 1
    using L = Smem<M>;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int rg = warp % RG, cg = warp / RG;
    const int g = lane >> 2, t4 = lane & 3;
    const int r0 = blockIdx.y * M;    // first query row of this tile
    const uint32_t sbase = smem_u32(smem);
    float* red_max = reinterpret_cast<float*>(smem + L::RED_MAX);
    float* red_sum = reinterpret_cast<float*>(smem + L::RED_SUM);
    float* row_m = reinterpret_cast<float*>(smem + L::ROW_M);
    float* row_l = reinterpret_cast<float*>(smem + L::ROW_L);
    float* row_a = reinterpret_cast<float*>(smem + L::ROW_A);
    const char* kv = static_cast<const char*>(p.kv);

    for_each_segment(p, [&](const Segment& sg) {
        const int seq = sg.seq, len = sg.len, lo = sg.lo, hi = sg.hi;
        __syncthreads();  // the previous segment is done with the row stats and buffers
        if (tid < M) { row_m[tid] = -CUDART_INF_F; row_l[tid] = 0.f; }

        // Q tile: rows r0.. of this sequence; rows past `rows` are zero-filled.
        {
            const char* q = static_cast<const char*>(p.q) + ((size_t)seq * p.rows + r0) * D * 2;
            for (int c = tid; c < M * CHUNKS; c += THREADS) {
                const int row = c / CHUNKS, ch = c % CHUNKS;
                const bool ok = r0 + row < p.rows;
                cp_async16(sbase + L::Q + swz(row, ch, D * 2), ok ? q + (size_t)row * D * 2 + ch * 16 : q, ok ? 16 : 0);
            }
        }
        auto load_block = [&](int n, int stage) {
            bool bad;
            const int idx = checked_block(p, seq, n, bad);
            const int valid = min(BS, len - n * BS);
            const char* src = kv + (size_t)idx * BS * D * 2;
            const uint32_t dst = sbase + (stage ? L::K1 : L::K0);
            for (int c = tid; c < BS * CHUNKS; c += THREADS) {
                const int row = c / CHUNKS, ch = c % CHUNKS;
                const bool ok = !bad && row < valid;
                cp_async16(dst + swz(row, ch, D * 2), ok ? src + (size_t)row * D * 2 + ch * 16 : kv, ok ? 16 : 0);
            }
        };
        load_block(lo, 0);
        cp_async_commit();

        // This thread's two rows in phase 1 (g and g + 8 of row group rg) and the last
        // key each may attend to (exclusive bound).
        int key_end[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) key_end[h] = key_end_of_row(p, r0 + rg * 16 + g + h * 8, len);

        float o[RG][8][4];
#pragma unroll
        for (int a = 0; a < RG; ++a)
#pragma unroll
            for (int b = 0; b < 8; ++b)
#pragma unroll
                for (int c = 0; c < 4; ++c) o[a][b][c] = 0.f;

        for (int n = lo; n < hi; ++n) {
            const int stage = (n - lo) & 1;
            if (n + 1 < hi) load_block(n + 1, stage ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const uint32_t sk = sbase + (stage ? L::K1 : L::K0);

            // ---- 1. S = Q K^T for rows rg*16.., keys cg*8*RG.. ----
            float s[NT1][4];
#pragma unroll
            for (int a = 0; a < NT1; ++a)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[a][c] = 0.f;
            const int key0 = cg * 8 * NT1;
#pragma unroll 4
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t af[4];
                ldsm_x4(af, sbase + L::Q + swz(rg * 16 + (lane & 15), kk * 2 + (lane >> 4), D * 2));
                if constexpr (NT1 == 1) {
                    uint32_t bf[2];
                    ldsm_x2(bf, sk + swz(key0 + (lane & 7), kk * 2 + ((lane >> 3) & 1), D * 2));
                    mma16816<T>(s[0], af, bf);
                } else {
#pragma unroll
                    for (int np = 0; np < NT1 / 2; ++np) {
                        uint32_t bf[4];
                        const int grp = lane >> 3;
                        ldsm_x4(bf, sk + swz(key0 + np * 16 + (lane & 7) + (grp >> 1) * 8, kk * 2 + (grp & 1), D * 2));
                        mma16816<T>(s[np * 2], af, bf);
                        mma16816<T>(s[np * 2 + 1], af, bf + 2);
                    }
                }
            }

            // ---- 2. online softmax (log2 domain) ----
            float mloc[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
            for (int a = 0; a < NT1; ++a)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int h = c >> 1;
                    const int key = n * BS + key0 + a * 8 + t4 * 2 + (c & 1);
                    s[a][c] = key < key_end[h] ? s[a][c] * p.scale_log2 : -CUDART_INF_F;
                    mloc[h] = fmaxf(mloc[h], s[a][c]);
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mloc[h] = fmaxf(mloc[h], __shfl_xor_sync(0xffffffffu, mloc[h], 1));
                mloc[h] = fmaxf(mloc[h], __shfl_xor_sync(0xffffffffu, mloc[h], 2));
                if (t4 == 0) red_max[cg * M + rg * 16 + g + h * 8] = mloc[h];
            }
            __syncthreads();
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
            char* sp = smem + L::P;
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
                    *reinterpret_cast<uint32_t*>(sp + swz(row, col >> 3, BS * 2) + (col & 7) * 2) =
                        Ty<T>::pack(pv[h * 2], pv[h * 2 + 1]);
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                lsum[h] += __shfl_xor_sync(0xffffffffu, lsum[h], 1);
                lsum[h] += __shfl_xor_sync(0xffffffffu, lsum[h], 2);
                if (t4 == 0) red_sum[cg * M + rg * 16 + g + h * 8] = lsum[h];
            }
            __syncthreads();
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

            // ---- 3. O = O * alpha + P V, columns warp*64.. ----
#pragma unroll
            for (int a = 0; a < RG; ++a) {
                const float al0 = row_a[a * 16 + g], al1 = row_a[a * 16 + g + 8];
#pragma unroll
                for (int b = 0; b < 8; ++b) {
                    o[a][b][0] *= al0; o[a][b][1] *= al0;
                    o[a][b][2] *= al1; o[a][b][3] *= al1;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BS / 16; ++kk) {
                uint32_t pf[RG][4];
#pragma unroll
                for (int a = 0; a < RG; ++a)
                    ldsm_x4(pf[a], sbase + L::P + swz(a * 16 + (lane & 15), kk * 2 + (lane >> 4), BS * 2));
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t vf[4];
                    ldsm_x4_t(vf, sk + swz(kk * 16 + (lane & 15), warp * 8 + np * 2 + (lane >> 4), D * 2));
#pragma unroll
                    for (int a = 0; a < RG; ++a) {
                        mma16816<T>(o[a][np * 2], pf[a], vf);
                        mma16816<T>(o[a][np * 2 + 1], pf[a], vf + 2);
                    }
                }
            }
            __syncthreads();  // stage and P are free; row stats are final for this block
        }

        // ---- epilogue: normalise and write (final, or a partial for combine) ----
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
                    write_out2<T>(p, sg, r0 + row, warp * 64 + b * 8 + t4 * 2, o[a][b][h * 2] * inv, o[a][b][h * 2 + 1] * inv);
            }
        if (tid < M && r0 + tid < p.rows) write_lse(p, sg, r0 + tid, row_m[tid], row_l[tid]);
    });
}

}  // namespace

#define MLA_DECODE_KERNEL(NAME, T, RG)                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const MlaDecodeParams p) { \
        extern __shared__ __align__(128) char smem[];                                    \
        decode_tile<T, RG>(p, smem);                                                     \
    }

MLA_DECODE_KERNEL(mla_decode_bf16_m16, __nv_bfloat16, 1)
MLA_DECODE_KERNEL(mla_decode_bf16_m32, __nv_bfloat16, 2)
MLA_DECODE_KERNEL(mla_decode_bf16_m64, __nv_bfloat16, 4)
MLA_DECODE_KERNEL(mla_decode_fp16_m16, __half, 1)
MLA_DECODE_KERNEL(mla_decode_fp16_m32, __half, 2)
MLA_DECODE_KERNEL(mla_decode_fp16_m64, __half, 4)
