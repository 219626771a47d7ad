/** The fixed sizes of MLA decoding (FlashMLA's). */

/** Latent width of one cached token: 512 no-RoPE values + 64 RoPE values. */
export const HEAD_DIM = 576
/** Width of V (the first 512 columns of the latent row) and of `out`. */
export const HEAD_DIM_V = 512
/** Tokens per cache block (FlashMLA's page size). */
export const BLOCK_SIZE = 64
/** Default softmax scale, 1 / sqrt(576) = 1 / 24. */
export const DEFAULT_SOFTMAX_SCALE = 1 / 24
