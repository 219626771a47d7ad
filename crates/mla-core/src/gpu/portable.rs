//! Host mirror of the portable decode kernel's configurations (`kernels/portable/mla_decode.cu`):
//! which row tiles exist and the dynamic shared memory each needs.

use crate::consts::{BLOCK_SIZE, HEAD_DIM};

/// (tile rows, keys per cp.async stage, stages): `MLA_M16_*` / `MLA_M32_*` in the kernel.
const CONFIGS: [(usize, usize, usize); 2] = [(16, 32, 2), (32, 32, 3)];

/// Dynamic shared memory of the `m{tile}` entries: Q, the stage ring, MmaScratch
/// (`MLA_PORTABLE_BYTES` in the kernel).
pub fn smem_bytes(tile: usize) -> usize {
    let &(m, keys, stages) = CONFIGS.iter().find(|c| c.0 == tile).expect("the portable kernel has tiles of 16 and 32 rows");
    let row = HEAD_DIM * 2;
    m * row + stages * keys * row + m * BLOCK_SIZE * 2 + 1024 + 3 * m * 4
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_match_the_kernel() {
        // The numbers written in mla_decode.cu's header, which its static_asserts check.
        assert_eq!(super::smem_bytes(16), 95_424);
        assert_eq!(super::smem_bytes(32), 152_960);
        // Both fit the architectures they are built for (99 KiB / 163 KiB opt-in a block).
        assert!(super::smem_bytes(16) <= 99 * 1024 && super::smem_bytes(32) <= 163 * 1024);
        assert!(super::smem_bytes(32) > 99 * 1024);
    }
}
