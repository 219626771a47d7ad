// Split-KV MLA decode on Hopper's warpgroup tensor-core instructions (wgmma), for tiles
// of 64 query rows (chosen for h_q * s_q > 32).
//
// Two warpgroups (256 threads); per 64-token cache block:
//   1. S = Q K^T: warpgroup wg computes the 64 x 32 scores of keys wg*32.. with 36
//      wgmma m64n32k16 reading Q and K from shared memory.
//   2. online softmax in registers; row max and sum meet in shared memory across the two
//      warpgroups; P (64 x 64, T) goes to shared memory.
//   3. O += P V: warpgroup wg owns output columns wg*256.. (64 x 256 fp32 = 128 registers
//      a thread) and issues 4 wgmma m64n256k16, reading V as an MN-major view of the very
//      same K tile (V is the first 512 columns of K: the cache is read once).
// Q, K and P use the canonical 128-byte-swizzled layout: a 64-row tile is stored as
// 128-byte-wide column regions of 64 rows (8 KiB each), 16-byte chunks XOR-ed with
// row % 8. Cache blocks stream through a two-stage cp.async pipeline; rows past the
// sequence end and blocks with a bad index are zero-filled, never read.
#include "mla_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

using namespace mla;
constexpr int THREADS = 256;
constexpr int M = 64;              // query rows per tile
constexpr int REGION = M * 128;    // one 128-byte-wide column region of a 64-row tile

// Byte offset of 16-byte chunk `chunk` (of 72) of row `row` in a swizzled 64-row tile.
__device__ __forceinline__ uint32_t tile_off(int row, int chunk) {
    return (chunk >> 3) * REGION + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

struct Smem {
    static constexpr int Q = 0;
    static constexpr int K0 = Q + M * D * 2;
    static constexpr int K1 = K0 + BS * D * 2;
    static constexpr int P = K1 + BS * D * 2;
    static constexpr int RED_MAX = P + M * BS * 2;  // [2][64] floats
    static constexpr int RED_SUM = RED_MAX + 2 * M * 4;
    static constexpr int ROW_M = RED_SUM + 2 * M * 4;
    static constexpr int ROW_L = ROW_M + M * 4;
    static constexpr int ROW_A = ROW_L + M * 4;
    static constexpr int TOTAL = ROW_A + M * 4;
    static constexpr int ALLOC = TOTAL + 1024;  // slack to align the base to a swizzle atom
    static_assert(ALLOC <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    __device__ static void qk(float* d, uint64_t a, uint64_t b) { wgmma_n32_bf16(d, a, b); }
    __device__ static void pv(float* d, uint64_t a, uint64_t b) { wgmma_n256t_bf16(d, a, b); }
};
template <> struct Mma<__half> {
    __device__ static void qk(float* d, uint64_t a, uint64_t b) { wgmma_n32_fp16(d, a, b); }
    __device__ static void pv(float* d, uint64_t a, uint64_t b) { wgmma_n256t_fp16(d, a, b); }
};

template <typename T>
__device__ void decode_tile_wg(const MlaDecodeParams& p, char* smem_raw) {
    using L = Smem;
    // Swizzle atoms are 1024 bytes: the hardware's pattern follows address bits, so the
    // tile bases must sit on 1024-byte boundaries.
    const uint32_t raw = smem_u32(smem_raw);
    char* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
    const uint32_t sbase = smem_u32(smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, wl = warp & 3;   // warpgroup, warp within it
    const int g = lane >> 2, t4 = lane & 3;
    const int r0 = blockIdx.y * M;
    float* red_max = reinterpret_cast<float*>(smem + L::RED_MAX);
    float* red_sum = reinterpret_cast<float*>(smem + L::RED_SUM);
    float* row_m = reinterpret_cast<float*>(smem + L::ROW_M);
    float* row_l = reinterpret_cast<float*>(smem + L::ROW_L);
    float* row_a = reinterpret_cast<float*>(smem + L::ROW_A);
    const char* kv = static_cast<const char*>(p.kv);
    // This thread's accumulator rows (both products): 16*wl + g and + 8.
    const int row0 = 16 * wl + g, row1 = row0 + 8;

    for_each_segment(p, [&](const Segment& sg) {
        const int len = sg.len;
        __syncthreads();  // the previous segment is done with the row stats and buffers
        if (tid < M) { row_m[tid] = -CUDART_INF_F; row_l[tid] = 0.f; }
        {
            const char* q = static_cast<const char*>(p.q) + ((size_t)sg.seq * p.rows + r0) * D * 2;
            for (int c = tid; c < M * CHUNKS; c += THREADS) {
                const int row = c / CHUNKS, ch = c % CHUNKS;
                const bool ok = r0 + row < p.rows;
                cp_async16(sbase + L::Q + tile_off(row, ch), ok ? q + (size_t)row * D * 2 + ch * 16 : q, ok ? 16 : 0);
            }
        }
        auto load_block = [&](int n, int stage) {
            bool bad;
            const int idx = checked_block(p, sg.seq, n, bad);
            const int valid = min(BS, len - n * BS);
            const char* src = kv + (size_t)idx * BS * D * 2;
            const uint32_t dst = sbase + (stage ? L::K1 : L::K0);
            for (int c = tid; c < BS * CHUNKS; c += THREADS) {
                const int row = c / CHUNKS, ch = c % CHUNKS;
                const bool ok = !bad && row < valid;
                cp_async16(dst + tile_off(row, ch), ok ? src + (size_t)row * D * 2 + ch * 16 : kv, ok ? 16 : 0);
            }
        };
        load_block(sg.lo, 0);
        cp_async_commit();

        const int key_end0 = key_end_of_row(p, r0 + row0, len), key_end1 = key_end_of_row(p, r0 + row1, len);
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        float s[16];

        // 1. issue S = Q K^T for keys wg*32 .. +32 of the block in stage `sk` (async).
        auto issue_s = [&](uint32_t sk) {
#pragma unroll
            for (int i = 0; i < 16; ++i) s[i] = 0.f;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const uint32_t off = (kk >> 2) * REGION + (kk & 3) * 32;
                Mma<T>::qk(s, sw128_desc(sbase + L::Q + off, 16, 1024), sw128_desc(sk + off + wg * 32 * 128, 16, 1024));
            }
            wgmma_commit();
        };

        // 2. online softmax of block n (log2 domain): P to shared memory, the rescale
        // factor of every row in row_a, running max and sum updated. Ends synchronised.
        auto softmax_to_p = [&](int n) {
            float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const int key = n * BS + wg * 32 + (i >> 2) * 8 + t4 * 2 + (i & 1);
                const bool hi_row = i & 2;
                s[i] = key < (hi_row ? key_end1 : key_end0) ? s[i] * p.scale_log2 : -CUDART_INF_F;
                if (hi_row) m1 = fmaxf(m1, s[i]); else m0 = fmaxf(m0, s[i]);
            }
            m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 1));
            m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 2));
            m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 1));
            m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 2));
            if (t4 == 0) { red_max[wg * M + row0] = m0; red_max[wg * M + row1] = m1; }
            __syncthreads();
            const float mn0 = fmaxf(row_m[row0], fmaxf(red_max[row0], red_max[M + row0]));
            const float mn1 = fmaxf(row_m[row1], fmaxf(red_max[row1], red_max[M + row1]));
            if (tid < M) {
                const float mold = row_m[tid];
                const float mnew = fmaxf(mold, fmaxf(red_max[tid], red_max[M + tid]));
                row_a[tid] = mnew == -CUDART_INF_F ? 1.f : exp2f(mold - mnew);
            }
            float l0 = 0.f, l1 = 0.f;
            char* sp = smem + L::P;
#pragma unroll
            for (int i = 0; i < 16; i += 4) {
                const float p00 = mn0 == -CUDART_INF_F ? 0.f : exp2f(s[i] - mn0);
                const float p01 = mn0 == -CUDART_INF_F ? 0.f : exp2f(s[i + 1] - mn0);
                const float p10 = mn1 == -CUDART_INF_F ? 0.f : exp2f(s[i + 2] - mn1);
                const float p11 = mn1 == -CUDART_INF_F ? 0.f : exp2f(s[i + 3] - mn1);
                l0 += p00 + p01;
                l1 += p10 + p11;
                const int key = wg * 32 + (i >> 2) * 8 + t4 * 2;  // within the block
                *reinterpret_cast<uint32_t*>(sp + tile_off(row0, key >> 3) + (key & 7) * 2) = Ty<T>::pack(p00, p01);
                *reinterpret_cast<uint32_t*>(sp + tile_off(row1, key >> 3) + (key & 7) * 2) = Ty<T>::pack(p10, p11);
            }
            l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
            l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
            l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
            if (t4 == 0) { red_sum[wg * M + row0] = l0; red_sum[wg * M + row1] = l1; }
            fence_proxy_async();  // P is read by wgmma next
            __syncthreads();
            if (tid < M) {
                row_l[tid] = row_l[tid] * row_a[tid] + red_sum[tid] + red_sum[M + tid];
                row_m[tid] = fmaxf(row_m[tid], fmaxf(red_max[tid], red_max[M + tid]));
            }
        };

        // 3. O = O * alpha + P V for columns wg*256 .. +256 of the block in `sk` (async).
        auto issue_pv = [&](uint32_t sk) {
            const float a0 = row_a[row0], a1 = row_a[row1];
            // Once a row's max settles its factor is exactly 1: skip 128 multiplies.
            if (!__all_sync(0xffffffffu, a0 == 1.f && a1 == 1.f)) {
#pragma unroll
                for (int i = 0; i < 128; i += 4) {
                    o[i] *= a0; o[i + 1] *= a0;
                    o[i + 2] *= a1; o[i + 3] *= a1;
                }
            }
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < BS / 16; ++ks)
                Mma<T>::pv(o, sw128_desc(sbase + L::P + ks * 32, 16, 1024),
                           sw128_desc(sk + wg * 4 * REGION + ks * 16 * 128, REGION, 1024));
            wgmma_commit();
        };
        auto stage_addr = [&](int st) { return sbase + (st ? L::K1 : L::K0); };

        // The next block's cp.async is issued while S(n) runs on the tensor cores.
        for (int n = sg.lo; n < sg.hi; ++n) {
            const int stage = (n - sg.lo) & 1;
            cp_async_wait<0>();   // block n (and Q) landed: the only group in flight
            fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads async
            __syncthreads();
            issue_s(stage_addr(stage));
            if (n + 1 < sg.hi) load_block(n + 1, stage ^ 1);
            cp_async_commit();
            wgmma_wait<0>();
            softmax_to_p(n);
            issue_pv(stage_addr(stage));
            wgmma_wait<0>();
            __syncthreads();  // the stage and P are free; row stats are final for this block
        }

        // ---- epilogue: normalise and write (final, or a partial for combine) ----
        const float l0 = row_l[row0], l1 = row_l[row1];
        const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
        for (int i = 0; i < 128; i += 4) {
            const int col = wg * 256 + (i >> 2) * 8 + t4 * 2;
            if (r0 + row0 < p.rows) write_out2<T>(p, sg, r0 + row0, col, o[i] * inv0, o[i + 1] * inv0);
            if (r0 + row1 < p.rows) write_out2<T>(p, sg, r0 + row1, col, o[i + 2] * inv1, o[i + 3] * inv1);
        }
        if (tid < M && r0 + tid < p.rows) write_lse(p, sg, r0 + tid, row_m[tid], row_l[tid]);
    });
}

}  // namespace

#define MLA_DECODE_WG_KERNEL(NAME, T)                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const MlaDecodeParams p) { \
        extern __shared__ __align__(1024) char smem[];                                       \
        mla::pdl_launch_dependents(); /* the combine may launch now */ \
        decode_tile_wg<T>(p, smem);                                                           \
    }

MLA_DECODE_WG_KERNEL(mla_decode_bf16_wg64, __nv_bfloat16)
MLA_DECODE_WG_KERNEL(mla_decode_fp16_wg64, __half)
