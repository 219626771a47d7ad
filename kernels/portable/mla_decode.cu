// Split-KV MLA decode on mma.sync with a two-stage cp.async pipeline: the portable path
// (Ampere-class instructions only), and the kernel forced with MLA_DECODE_KERNEL=mma.
//
// One thread block = 8 warps handles a tile of M = 16 * RG query rows of one sequence
// over the segments the plan gave its part (blockIdx.x); blockIdx.y picks the row tile.
// The per-block math is MmaTile (mma_tile.cuh). Cache blocks stream through two cp.async
// stages of 64 rows x 1152 bytes (swizzled); rows past the sequence end are zero-filled in
// shared memory (never read from memory that may hold NaN), and every block index is
// checked against num_blocks before it is dereferenced.
//
// Launch: grid (num_parts, ceil(rows / M)), block 256, dynamic smem Smem<M>::TOTAL.
#include "mma_tile.cuh"

namespace {

using namespace mla;
constexpr int THREADS = MMA_WARPS * 32;

// Shared memory plan (bytes), kept in step with DecodeKernel::function() in gpu/ops.rs.
template <int M> struct Smem {
    static constexpr int Q = 0;
    static constexpr int K0 = Q + M * D * 2;
    static constexpr int K1 = K0 + BS * D * 2;
    static constexpr int SCRATCH = K1 + BS * D * 2;
    static constexpr int TOTAL = SCRATCH + MmaScratch<M>::BYTES;
    static_assert(TOTAL <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

template <typename T, int RG>
__device__ void decode_tile(const MlaDecodeParams& p, char* smem) {
    using Tile = MmaTile<T, RG>;
    constexpr int M = Tile::M;
    using L = Smem<M>;
    const int tid = threadIdx.x;
    const int r0 = blockIdx.y * M;  // first query row of this tile
    const uint32_t sbase = smem_u32(smem);
    const char* kv = static_cast<const char*>(p.kv);
    const Tile tile(tid, smem + L::SCRATCH);
    const auto sync = [] { __syncthreads(); };
    const auto q_at = [&](int row, int chunk) { return sbase + L::Q + swz(row, chunk, D * 2); };

    for_each_segment(p, [&](const Segment& sg) {
        const int seq = sg.seq, len = sg.len, lo = sg.lo, hi = sg.hi;
        __syncthreads();  // the previous segment is done with the row stats and buffers
        MmaTileState<RG> st;
        tile.begin(p, tid, r0, len, st);

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

        for (int n = lo; n < hi; ++n) {
            const int stage = (n - lo) & 1;
            if (n + 1 < hi) load_block(n + 1, stage ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const uint32_t sk = sbase + (stage ? L::K1 : L::K0);
            const auto k_at = [&](int key, int chunk) { return sk + swz(key, chunk, D * 2); };
            tile.scores(p, tid, n, q_at, k_at, st, sync, [] {});
            tile.accumulate(k_at, st);
            __syncthreads();  // stage and P are free; row stats are final for this block
        }
        tile.finish(p, sg, tid, r0, st);
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
MLA_DECODE_KERNEL(mla_decode_fp16_m16, __half, 1)
MLA_DECODE_KERNEL(mla_decode_fp16_m32, __half, 2)
