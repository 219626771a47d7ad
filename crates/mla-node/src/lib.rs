//! Node.js binding of `mla-core` (napi-rs v3).
//!
//! This crate only translates: JS values in, `mla_core` calls, JS values out. Every
//! behaviour (checks, scheduling, the decode itself) lives in `mla-core`. The generated
//! `binding.js` / `binding.d.ts` are wrapped by the hand-written TS entry (`index.ts` over
//! `src/*.ts`), which is the package's public API.
//!
//! Errors: every `mla_core::MlaError` becomes a JS `Error` whose `code` is the stable
//! string of its `ErrorCode` (`ERR_SHAPE`, ...). A panic inside native code is caught and
//! reported as `ERR_INTERNAL` instead of aborting the process.

#![deny(clippy::all)]

mod bench;
mod cache;
mod consts;
mod convert;
mod decode;
mod device;
mod error;
mod handles;
mod plan;
mod step;
mod task;
mod tensor;

pub use cache::KvCache;
pub use decode::{decode, decode_sync, DecodeResult};
pub use device::{gpu_status, Device, DeviceInfo, GpuStatus};
pub use plan::Plan;
pub use step::CapturedStep;
pub use tensor::Tensor;
