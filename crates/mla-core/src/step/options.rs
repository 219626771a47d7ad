//! How a step runs: the decode's options and the plan's (with the chunk rule of a
//! batch-invariant plan). Plain data both backends read.

use std::borrow::Cow;
use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::consts::HEAD_DIM;
use crate::error::{ErrorCode, MlaError, Result};

#[derive(Clone, Default)]
pub struct DecodeOptions {
    /// Causal masking for s_q > 1: query token j of a length-L sequence sees keys
    /// 0 ..= L - s_q + j. With s_q = 1 it changes nothing. Default false (as FlashMLA).
    pub causal: bool,
    /// Defaults to 1 / sqrt(576).
    pub softmax_scale: Option<f32>,
    /// CUDA only: the stream to enqueue on (default: the device's own stream). Work on
    /// another stream is ordered after everything queued on the device's stream before it
    /// (allocations, uploads); while it may be pending, dropping a tensor waits for the
    /// device (see `gpu::buffer`).
    pub stream: Option<Arc<CudaStream>>,
    /// The step's label in error messages (default "decode"), e.g. "layer 3".
    pub label: Option<Cow<'static, str>>,
    /// When no plan is given (`decode::decode_auto`, `decode::enqueue`): make a batch-invariant one
    /// (see `crate::plan`). With a plan given, true requires a batch-invariant plan
    /// (`ERR_INVALID_ARGUMENT` otherwise); false accepts either.
    pub batch_invariant: bool,
}

impl DecodeOptions {
    pub fn scale(&self) -> f32 {
        self.softmax_scale.unwrap_or(1.0 / (HEAD_DIM as f32).sqrt())
    }
    /// The step's label (default "decode").
    pub fn label(&self) -> Cow<'static, str> {
        self.label.clone().unwrap_or(Cow::Borrowed("decode"))
    }
}

/// Blocks per chunk of a batch-invariant plan (4096 tokens: 64 measured 1.09x the default
/// plan's time on the H200 grid, 32 1.13x, 128 1.10x; BENCHMARKS.md), before [`INVARIANT_MAX_CHUNKS`]
/// makes chunks longer.
pub const INVARIANT_CHUNK_BLOCKS: usize = 64;
/// Chunks per sequence of a batch-invariant plan at most: bounds the plan's partial slots
/// (b * 8) whatever the lengths, so a CUDA plan can be re-planned on the device for any
/// lengths without growing its workspace.
pub const INVARIANT_MAX_CHUNKS: usize = 8;

/// How a batch-invariant plan cuts a sequence of `nb` blocks: into
/// `n = min(max_chunks, ceil(nb / chunk_blocks))` chunks of nearly equal size, chunk `k`
/// being blocks `[k * nb / n, (k + 1) * nb / n)` (rounded down): a function of `nb` alone.
/// With the standard rule (64, 8) a sequence of up to 32768 tokens gets chunks of 33 to 64
/// blocks, a longer one 8 chunks of nb / 8 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvariantChunks {
    pub chunk_blocks: usize,
    pub max_chunks: usize,
}

impl Default for InvariantChunks {
    fn default() -> InvariantChunks {
        InvariantChunks::standard()
    }
}

impl InvariantChunks {
    /// The rule of this build: [`INVARIANT_CHUNK_BLOCKS`], [`INVARIANT_MAX_CHUNKS`], or
    /// MLA_INVARIANT_CHUNK_BLOCKS / MLA_INVARIANT_MAX_CHUNKS when set (read once; for
    /// tuning experiments: outputs are invariant for one rule only).
    pub fn standard() -> InvariantChunks {
        static RULE: std::sync::OnceLock<InvariantChunks> = std::sync::OnceLock::new();
        *RULE.get_or_init(|| {
            let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).filter(|&v| v > 0).unwrap_or(d);
            InvariantChunks {
                chunk_blocks: env("MLA_INVARIANT_CHUNK_BLOCKS", INVARIANT_CHUNK_BLOCKS),
                max_chunks: env("MLA_INVARIANT_MAX_CHUNKS", INVARIANT_MAX_CHUNKS),
            }
        })
    }

    /// Chunks of a sequence of `nb` blocks (0 for an empty one).
    pub fn chunks(&self, nb: usize) -> usize {
        nb.div_ceil(self.chunk_blocks).min(self.max_chunks)
    }

    /// First block of chunk `k` of `n` of a sequence of `nb` blocks (`nb` for k = n).
    pub fn chunk_start(k: usize, nb: usize, n: usize) -> usize {
        (k as u64 * nb as u64 / n as u64) as usize
    }

    /// The chunk (of `n`) that holds block `x` of a sequence of `nb` blocks.
    pub fn chunk_of_block(x: usize, nb: usize, n: usize) -> usize {
        (((x as u64 + 1) * n as u64 - 1) / nb as u64) as usize
    }

    /// Both in [1, 2^20] (what the kernels' int32 arithmetic is checked for).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("chunk_blocks", self.chunk_blocks), ("max_chunks", self.max_chunks)] {
            if v == 0 || v > 1 << 20 {
                return Err(MlaError::arg(ErrorCode::InvalidArgument, &format!("invariant chunks: {name}"), "within [1, 1048576]", v));
            }
        }
        Ok(())
    }
}

/// How `plan::plan_with` schedules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Split points that depend on each sequence's own length only, so that a sequence's
    /// output is bit for bit the same whatever else is in the batch (see the module docs
    /// for what is and is not guaranteed). Default false: FlashMLA's schedule.
    pub batch_invariant: bool,
    /// The chunk rule of a batch-invariant plan (None: [`InvariantChunks::standard`]).
    pub chunks: Option<InvariantChunks>,
}

impl PlanOptions {
    /// A batch-invariant plan with the standard chunks.
    pub fn invariant() -> PlanOptions {
        PlanOptions { batch_invariant: true, chunks: None }
    }
    /// The chunk rule these options give (None: the default plan).
    pub fn chunk_rule(&self) -> Option<InvariantChunks> {
        self.batch_invariant.then(|| self.chunks.unwrap_or_else(InvariantChunks::standard))
    }
}
