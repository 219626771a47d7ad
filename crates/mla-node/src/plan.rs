//! `Plan`: split-KV scheduling metadata (FlashMLA's get_mla_metadata).

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use napi_derive::napi;

use crate::error::{disposed, Result};
use crate::tensor::{Tensor, TensorSrc};

/// A core plan shared by JS handles, tensor views and pending decodes.
///
/// On CUDA a plan also owns the workspace of partial results that a decode writes and its
/// combine pass reads, so two decodes using the same plan at the same time (two pending
/// `decode()` promises) would overwrite each other's partials. `busy` serialises them:
/// a decode holds it from launch until its device synchronisation.
pub struct SharedPlan {
    plan: mla_core::Plan,
    pub busy: Mutex<()>,
}

impl Deref for SharedPlan {
    type Target = mla_core::Plan;
    fn deref(&self) -> &mla_core::Plan {
        &self.plan
    }
}

impl SharedPlan {
    pub fn new(plan: mla_core::Plan) -> Arc<SharedPlan> {
        Arc::new(SharedPlan {
            plan,
            busy: Mutex::new(()),
        })
    }
}

/// Native side of `Plan` in index.ts.
#[napi]
pub struct Plan {
    inner: Option<Arc<SharedPlan>>,
}

impl Plan {
    pub fn wrap(p: mla_core::Plan) -> Plan {
        Plan {
            inner: Some(SharedPlan::new(p)),
        }
    }
    pub fn from_arc(p: Arc<SharedPlan>) -> Plan {
        Plan { inner: Some(p) }
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
        Ok(self.get()?.num_parts as u32)
    }

    /// Batch size the plan was made for.
    #[napi(getter)]
    pub fn batch(&self) -> Result<u32> {
        Ok(self.get()?.batch as u32)
    }

    /// Query rows per sequence and KV head (s_q * h_q / h_kv) the plan was made for.
    #[napi(getter)]
    pub fn rows(&self) -> Result<u32> {
        Ok(self.get()?.rows as u32)
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
