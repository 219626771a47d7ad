//! The step's vocabulary: what a decode step is made of, in the terms both backends share.
//!
//! - [`shape`]: the checked sizes of a step ([`shape::DecodeShape`]) and the tensors it
//!   reads ([`shape::DecodeInputs`]);
//! - [`options`]: how it runs ([`options::DecodeOptions`], [`options::PlanOptions`], the
//!   chunk rule of a batch-invariant plan);
//! - [`sched`]: the scheduler on the host and its metadata row ([`sched::SchedMeta`]);
//! - [`plan`]: the plan type and its workspace layout.
//!
//! These modules import the memory and device layers (`tensor`, `device`, the CUDA
//! runtime's buffers and streams) and never a backend (`crate::cpu`, `crate::gpu::ops`) or
//! a front module (`crate::decode`, `crate::plan`, `crate::validate`), which dispatch to
//! the backends: `tests/module_graph.rs` checks both.

pub mod options;
pub mod plan;
pub mod sched;
pub mod shape;
