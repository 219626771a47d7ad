// Split-KV MLA decode on mma.sync with a cp.async ring: the portable path (Ampere-class
// instructions only: cp.async, ldmatrix, mma.sync m16n8k16). Built as sm_80, sm_86, sm_89
// and sm_120 cubins and as compute_80 PTX (JIT-compiled by the driver on anything newer,
// and on Hopper when the portable path is forced).
//
// One thread block = 8 warps handles a tile of M = 16 * RG query rows of one sequence
// over the segments the plan gave its part (blockIdx.x); blockIdx.y picks the row tile.
// The per-block math is MmaTile (mma_tile.cuh), 64 keys at a time. The cache streams
// through a ring of NS shared-memory stages of KEYS keys x 1152 bytes (swizzled); a 64-key
// block takes BS / KEYS consecutive stages. Rows past the sequence end are zero-filled in
// shared memory (never read from memory that may hold NaN), and every block index is
// checked against num_blocks before it is dereferenced.
//
// Shared memory per block (bytes a block may opt into) is what picks the tiles per
// architecture; MLA_SMEM_BUDGET comes from __CUDA_ARCH__:
//   m16: 16 rows, 2 stages of 32 keys   95,424 B (93.2 KiB): every target (99 KiB on sm_86/89/120)
//   m32: 32 rows, 3 stages of 32 keys  152,960 B (149.4 KiB): only where the budget holds it (sm_80,
//        163 KiB; so also the compute_80 PTX, which the host launches only on a device whose
//        opt-in limit holds it)
// The 64-key stages of the sm_90 build this kernel came from (2 x 72 KiB + Q + scratch:
// 165 KiB at 16 rows, 185 KiB at 32) fit none of the 99 KiB parts and not even sm_80.
// With m16's two half-block stages a block's loads do not overlap its math (both stages
// hold the block until PV is done); m32's third stage keeps half a block in flight.
//
// Launch: grid (num_parts, ceil(rows / M)), block 256, dynamic smem MLA_PORTABLE_BYTES(M, ...);
// The launcher reads each entry's size from its MLA_ENTRY_SMEM constant (no host copy).
#include "mma_tile.cuh"

// Shared memory a block may opt into, per architecture (cudaDevAttrMaxSharedMemoryPerBlockOptin).
#if !defined(__CUDA_ARCH__)
#define MLA_SMEM_BUDGET 0  // no host code here
#elif __CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870
#define MLA_SMEM_BUDGET (163 * 1024)  // A100, Orin
#elif __CUDA_ARCH__ == 900 || __CUDA_ARCH__ == 1000 || __CUDA_ARCH__ == 1030
#define MLA_SMEM_BUDGET (227 * 1024)  // H100/H200, B200/B300 (not built today)
#else
#define MLA_SMEM_BUDGET (99 * 1024)  // sm_86, sm_89, sm_120 and anything not listed
#endif

// Bytes of one configuration: Q (M rows), NS stages of KEYS rows, MmaScratch<M>. A macro so
// that #if can test it; Smem<> below static_asserts that the layout agrees.
#define MLA_PORTABLE_BYTES(M, KEYS, NS) ((M) * 1152 + (NS) * (KEYS) * 1152 + (M) * 128 + 1024 + (M) * 12)
#define MLA_M16_KEYS 32
#define MLA_M16_STAGES 2
#define MLA_M32_KEYS 32
#define MLA_M32_STAGES 3
#if MLA_PORTABLE_BYTES(32, MLA_M32_KEYS, MLA_M32_STAGES) <= MLA_SMEM_BUDGET
#define MLA_HAS_M32 1
#else
#define MLA_HAS_M32 0
#endif

namespace {

using namespace mla;
constexpr int THREADS = MMA_WARPS * 32;

template <int RG> struct Cfg;
template <> struct Cfg<1> { static constexpr int KEYS = MLA_M16_KEYS, NS = MLA_M16_STAGES; };
#if MLA_HAS_M32
template <> struct Cfg<2> { static constexpr int KEYS = MLA_M32_KEYS, NS = MLA_M32_STAGES; };
#endif

// Shared memory plan (bytes); TOTAL is the entry's MLA_ENTRY_SMEM.
template <int M, int KEYS, int NS> struct Smem {
    static constexpr int STAGE = KEYS * D * 2;
    static constexpr int Q = 0;
    static constexpr int RING = Q + M * D * 2;
    static constexpr int SCRATCH = RING + NS * STAGE;
    static constexpr int TOTAL = SCRATCH + MmaScratch<M>::BYTES;
    static_assert(TOTAL == MLA_PORTABLE_BYTES(M, KEYS, NS), "MLA_PORTABLE_BYTES disagrees with the layout");
    static_assert(TOTAL <= MLA_SMEM_BUDGET, "shared memory over this architecture's per-block limit");
    static_assert(STAGE % 128 == 0 && RING % 128 == 0, "stages must stay 128-byte aligned for the swizzle");
};

template <typename T, int RG>
__device__ void decode_tile(const MlaDecodeParams& p, char* smem) {
    using Tile = MmaTile<T, RG>;
    constexpr int M = Tile::M;
    constexpr int KEYS = Cfg<RG>::KEYS, NS = Cfg<RG>::NS;
    constexpr int SPB = BS / KEYS;  // stages per 64-key block
    static_assert(BS % KEYS == 0 && KEYS % 8 == 0, "a stage is a whole number of swizzle rows of a block");
    static_assert(SPB <= 2 && NS >= SPB, "the ring must hold one whole block (k_at picks between two stages)");
    using L = Smem<M, KEYS, NS>;
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

        // Q tile: rows r0.. of this sequence; rows past `rows` are zero-filled. It joins
        // the first commit group.
        {
            const char* q = static_cast<const char*>(p.q) + ((size_t)seq * p.rows + r0) * D * 2;
            for (int c = tid; c < M * CHUNKS; c += THREADS) {
                const int row = c / CHUNKS, ch = c % CHUNKS;
                const bool ok = r0 + row < p.rows;
                cp_async16(sbase + L::Q + swz(row, ch, D * 2), ok ? q + (size_t)row * D * 2 + ch * 16 : q, ok ? 16 : 0);
            }
        }
        // Load unit u of the segment: keys (u % SPB) * KEYS.. of block lo + u / SPB, into
        // stage u % NS.
        const int units = (hi - lo) * SPB;
        auto load_unit = [&](int u) {
            const int n = lo + u / SPB, part = u % SPB;
            bool bad;
            const int idx = checked_block(p, seq, n, bad);
            const int valid = min(KEYS, len - n * BS - part * KEYS);  // <= 0: all zero-filled
            const char* src = kv + ((size_t)idx * BS + part * KEYS) * D * 2;
            const uint32_t dst = sbase + L::RING + (u % NS) * L::STAGE;
            for (int c = tid; c < KEYS * CHUNKS; c += THREADS) {
                const int row = c / CHUNKS, ch = c % CHUNKS;
                const bool ok = !bad && row < valid;
                cp_async16(dst + swz(row, ch, D * 2), ok ? src + (size_t)row * D * 2 + ch * 16 : kv, ok ? 16 : 0);
            }
        };
        // One commit group per unit, empty past the end, so that the count of groups still
        // in flight when a block is needed is always NS - SPB.
        for (int u = 0; u < NS; ++u) {
            if (u < units) load_unit(u);
            cp_async_commit();
        }

        for (int n = lo; n < hi; ++n) {
            const int u0 = (n - lo) * SPB;  // groups committed so far: u0 + NS
            cp_async_wait<NS - SPB>();
            __syncthreads();
            // Key `key` (0..63) of the block is row key % KEYS of stage (u0 + key / KEYS) % NS;
            // the swizzle only looks at key % 8, so each stage's base is offset by its first key.
            const uint32_t b0 = sbase + L::RING + (u0 % NS) * L::STAGE;
            const uint32_t b1 = sbase + L::RING + ((u0 + SPB - 1) % NS) * L::STAGE - (SPB - 1) * L::STAGE;
            const auto k_at = [&](int key, int chunk) { return (SPB == 1 || key < KEYS ? b0 : b1) + swz(key, chunk, D * 2); };
            tile.scores(p, tid, n, q_at, k_at, st, sync, [] {});
            tile.accumulate(k_at, st);
            __syncthreads();  // this block's stages and P are free; row stats are final
            for (int h = 0; h < SPB; ++h) {
                const int u = u0 + NS + h;
                if (u < units) load_unit(u);
                cp_async_commit();
            }
        }
        tile.finish(p, sg, tid, r0, st);
    });
}

}  // namespace

#define MLA_DECODE_KERNEL(NAME, T, RG)                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const MlaDecodeParams p) { \
        extern __shared__ __align__(128) char smem[];                                    \
        decode_tile<T, RG>(p, smem);                                                     \
    }                                                                                    \
    MLA_ENTRY_SMEM(NAME, (Smem<MmaTile<T, RG>::M, Cfg<RG>::KEYS, Cfg<RG>::NS>::TOTAL))

MLA_DECODE_KERNEL(mla_decode_bf16_m16, __nv_bfloat16, 1)
MLA_DECODE_KERNEL(mla_decode_fp16_m16, __half, 1)
#if MLA_HAS_M32
MLA_DECODE_KERNEL(mla_decode_bf16_m32, __nv_bfloat16, 2)
MLA_DECODE_KERNEL(mla_decode_fp16_m32, __half, 2)
#endif
