/** The fixed sizes of MLA decoding (FlashMLA's), read from the core (`mla_core::consts`). */

import { native } from './native'

const c = native.constants()

/** Latent width of one cached token: 512 no-RoPE values + 64 RoPE values (576). */
export const HEAD_DIM: number = c.headDim
/** Width of V (the first 512 columns of the latent row) and of `out` (512). */
export const HEAD_DIM_V: number = c.headDimV
/** Tokens per cache block (FlashMLA's page size, 64). */
export const BLOCK_SIZE: number = c.blockSize
/** Default softmax scale, 1 / sqrt(576) = 1 / 24 (the core's default). */
export const DEFAULT_SOFTMAX_SCALE = 1 / Math.sqrt(HEAD_DIM)
/**
 * What block tables are padded with past a sequence's blocks (`mla_core::BLOCK_TABLE_PAD`,
 * i32::MAX - 4095); also the largest pool a cache may have, so no real block index equals it.
 * @internal
 */
export const BLOCK_TABLE_PAD: number = c.blockTablePad
