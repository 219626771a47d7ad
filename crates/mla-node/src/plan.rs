//! `Plan`: split-KV scheduling metadata (FlashMLA's get_mla_metadata).

use std::sync::Arc;

use mla_core::{ErrorCode, SharedPlan};
use napi_derive::napi;

use crate::error::{core, disposed, err, Result};
use crate::handles;
use crate::tensor::{with_all, Tensor, TensorSrc};

/// Native side of `Plan` in src/plan.ts: a handle to a core `SharedPlan` (its tensor views and
/// pending decodes hold their own references). The core orders decodes that share a plan
/// and serialises `update` with them.
#[napi]
pub struct Plan {
    inner: Option<Arc<SharedPlan>>,
    /// Its id in `handles` (0: not registered).
    pub(crate) slot: u32,
}

impl Drop for Plan {
    fn drop(&mut self) {
        if self.slot != 0 {
            crate::handles::release(self.slot);
        }
    }
}

impl Plan {
    pub fn wrap(p: mla_core::Plan) -> Plan {
        Plan::from_arc(Arc::new(SharedPlan::new(p)))
    }
    pub fn from_arc(p: Arc<SharedPlan>) -> Plan {
        Plan { inner: Some(p), slot: 0 }
    }
    pub fn get(&self) -> Result<&Arc<SharedPlan>> {
        self.inner.as_ref().ok_or_else(|| disposed("plan"))
    }
}

#[napi]
impl Plan {
    /// Number of parts the work is divided into (SM groups on CUDA, threads on the CPU).
    #[napi(getter)]
    pub fn num_parts(&self) -> Result<u32> {
        Ok(self.get()?.read().num_parts as u32)
    }

    /// Batch size the plan was made for.
    #[napi(getter)]
    pub fn batch(&self) -> Result<u32> {
        Ok(self.get()?.read().batch as u32)
    }

    /// Query rows per sequence and KV head (s_q * h_q / h_kv) the plan was made for.
    #[napi(getter)]
    pub fn rows(&self) -> Result<u32> {
        Ok(self.get()?.read().rows as u32)
    }

    /// Whether the plan is batch-invariant (`mla_core::Plan::batch_invariant`).
    #[napi(getter)]
    pub fn batch_invariant(&self) -> Result<bool> {
        Ok(self.get()?.read().batch_invariant())
    }

    /// [numParts, 8] int32 (a view of the plan's own tensor).
    #[napi(getter)]
    pub fn tile_scheduler_metadata(&self) -> Result<Tensor> {
        Ok(Tensor::view(TensorSrc::PlanMetadata(self.get()?.clone())))
    }

    /// [b + 1] int32 (a view of the plan's own tensor).
    #[napi(getter)]
    pub fn num_splits(&self) -> Result<Tensor> {
        Ok(Tensor::view(TensorSrc::PlanNumSplits(self.get()?.clone())))
    }

    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.inner.is_none()
    }

    #[napi]
    pub fn dispose(&mut self) {
        self.inner = None;
    }
}

/// `mla_core::Plan::replan` (`Plan.update` in src/plan.ts): re-plans `plan` in place for new
/// lengths (`cache_seqlens`, a [b] int32 tensor on the plan's device), with the plan's
/// options (a batch-invariant plan stays one); returns the step id (on CUDA the plan kernel
/// is enqueued). Both are ids (`handles`): this is on the serving path.
#[napi]
pub fn plan_update(plan: u32, cache_seqlens: u32) -> Result<i64> {
    mla_core::trace::mark("native:enter");
    // SAFETY: used within this call only, which runs no JS.
    let (p, src) = unsafe { (handles::plan(plan, "plan")?.get()?.clone(), handles::tensor(cache_seqlens, "cacheSeqlens")?.arg("cacheSeqlens")?) };
    if let TensorSrc::PlanMetadata(q) | TensorSrc::PlanNumSplits(q) = &src {
        if Arc::ptr_eq(q, &p) {
            return Err(err(ErrorCode::InvalidArgument, "cacheSeqlens: expected a lengths tensor, got a view of this plan's own metadata"));
        }
    }
    with_all(&[&src], &[], |t, _| core(|| p.replan(t[0]))).map(|id| {
        mla_core::trace::mark("native:exit");
        id as i64
    })
}

/// One named field of a scheduling-metadata row (`mla_core::plan::SchedMeta`).
#[napi(object)]
pub struct SchedMetaField {
    /// The field's name in Rust and CUDA (`begin_seq`, `begin_block`, `end_seq`,
    /// `end_block`, `begin_split`).
    pub name: String,
    /// Its index in a row of int32 (byte offset / 4).
    pub index: u32,
    /// Its byte offset in a row.
    pub offset: u32,
}

/// The layout of one row of `Plan.tileSchedulerMetadata` ([numParts, ints] int32): ints per
/// row and the named fields (the rest of a row is zero). One source with the core's
/// `SchedMeta` and the kernels' `MlaSchedMeta`, for code that reads the metadata (the TS
/// tests' host plan).
#[napi(object)]
pub struct SchedMetaLayout {
    /// Int32 values per row (8).
    pub ints: u32,
    pub fields: Vec<SchedMetaField>,
    /// The scheduler's cost of one split, in blocks (`split_fixed_cost()`: 5, or
    /// `MLA_SPLIT_FIXED_COST`), for code that re-derives a plan.
    pub split_fixed_cost: u32,
}

/// See [`SchedMetaLayout`].
#[napi]
pub fn sched_meta_layout() -> SchedMetaLayout {
    SchedMetaLayout {
        ints: mla_core::plan::META_INTS as u32,
        fields: mla_core::plan::SchedMeta::FIELDS
            .iter()
            .map(|&(name, offset)| SchedMetaField { name: name.to_string(), index: (offset / 4) as u32, offset: offset as u32 })
            .collect(),
        split_fixed_cost: mla_core::plan::split_fixed_cost() as u32,
    }
}
