//! The contract's fixed sizes and the values every layer shares. Imports nothing: every
//! module (the backends, the CUDA runtime, the vocabulary of a step) may import it.

/// Latent width of one cached token (512 no-RoPE + 64 RoPE values).
pub const HEAD_DIM: usize = 576;
/// Width of V (the first 512 columns of the latent row).
pub const HEAD_DIM_V: usize = 512;
/// Tokens per cache block (FlashMLA's page size).
pub const BLOCK_SIZE: usize = 64;
/// Work-unit cost of one split, in blocks, used by the scheduler (`plan`; overridden by
/// `MLA_SPLIT_FIXED_COST`, see `step::sched::split_fixed_cost`).
pub const SPLIT_FIXED_COST: usize = 5;

/// What [`KvCache::batch`](crate::cache::KvCache::batch) (and every other block table the
/// crate makes: a captured step's, the benchmarks') writes into `block_table` entries past
/// a sequence's blocks. `decode` never reads those entries; the value is clearly invalid
/// because a cache never has more than this many blocks (checked in `KvCache::new`), so it
/// is always `>= num_blocks` and a stray read is caught by the block-index checks.
pub const BLOCK_TABLE_PAD: i32 = i32::MAX - 4095;
