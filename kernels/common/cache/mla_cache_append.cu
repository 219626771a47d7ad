// The paged cache's batched append: scatters latent rows (from host rows staged on the
// device, or straight from a device tensor such as the model's output) to their token
// slots in the pool, in one launch for any number of sequences.
//
//   row r (row_vecs * 16 bytes at src + r * src_stride_vec * 16) -> pool slot slots[r]
//   (slot = block * 64 + row within the block; 1152 bytes = 72 x 16 bytes per bf16 row)
//
// The host computes the slots from blocks it owns, so they are always in range; the kernel
// still checks every slot: one outside [0, num_slots) is skipped (nothing is written) and
// flagged as MLA_ERR_BLOCK_INDEX in the step's error flag, which the host reports as a
// typed error naming the step. Caller: crates/mla-core/src/gpu/util.rs (cache_scatter).
#include <stdint.h>
#include "mla_params.cuh"

extern "C" __global__ void __launch_bounds__(256) mla_cache_append(
    uint4* __restrict__ pool,            // [num_slots, row_vecs] (the pool as 16-byte units)
    long long num_slots,                 // num_blocks * 64
    const uint4* __restrict__ src,       // row r at src + r * src_stride_vec
    long long src_stride_vec,            // in 16-byte units
    const long long* __restrict__ slots, // [n]
    long long n,
    int row_vecs,                        // 16-byte units per row (72 for 576 16-bit values)
    int* __restrict__ error_flag) {
    const long long total = n * (long long)row_vecs;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long r = i / row_vecs;
        const int v = (int)(i - r * row_vecs);
        const long long slot = slots[r];
        if (slot < 0 || slot >= num_slots) {
            if (v == 0) atomicOr(error_flag, MLA_ERR_BLOCK_INDEX);
            continue;
        }
        pool[slot * row_vecs + v] = src[r * src_stride_vec + v];
    }
}
