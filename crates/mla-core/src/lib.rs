//! MLA (DeepSeek-V2/V3 Multi-head Latent Attention) decoding over a paged latent KV cache.
//!
//! The contract (shapes, semantics, accuracy) is FlashMLA's dense decoder: one 576-wide latent
//! row per token (d = 576), V is the first dv = 512 columns of K, one KV head, block size 64.
//!
//! ```no_run
//! use mla_core::{Device, DType, Tensor, plan, decode, DecodeOptions};
//! let dev = Device::best();                       // CUDA if usable, else the CPU backend
//! let (b, s_q, h_q) = (2, 1, 16);
//! let q = Tensor::from_f32(&dev, &vec![0.01; b * s_q * h_q * 576], &[b, s_q, h_q, 576], DType::BF16)?;
//! let kv = Tensor::from_f32(&dev, &vec![0.01; 4 * 64 * 576], &[4, 64, 1, 576], DType::BF16)?;
//! let block_table = Tensor::from_i32(&dev, &[0, 1, 2, 3], &[2, 2])?;
//! let seqlens = Tensor::from_i32(&dev, &[100, 70], &[2])?;
//! let p = plan(&seqlens, s_q * h_q, 1)?;
//! let r = decode(&q, &kv, &block_table, &seqlens, &p, &DecodeOptions::default())?;
//! dev.synchronize()?;
//! let out = r.out.to_f32()?;   // [b, s_q, h_q, 512]
//! # Ok::<(), mla_core::MlaError>(())
//! ```

pub mod bench;
pub mod cache;
pub mod consts;
pub mod cpu;
pub mod decode;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gpu;
pub mod host;
pub mod plan;
pub mod step;
pub mod tensor;
pub mod trace;
pub mod validate;

pub use cache::{KvCache, KvCacheConfig, SeqId, BLOCK_TABLE_PAD};
pub use decode::{decode, DecodeOptions, DecodeOutput};
pub use device::{Device, DeviceInfo, DeviceOptions, KernelPath, MemoryStats, StepId};
pub use dtype::DType;
pub use error::{ErrorCode, MlaError, Result};
pub use plan::{plan, plan_with, InvariantChunks, Plan, PlanOptions, SharedPlan};
pub use tensor::Tensor;

pub use consts::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V, SPLIT_FIXED_COST};
