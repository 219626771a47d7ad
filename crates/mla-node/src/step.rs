//! `CapturedStep`: a whole decode step of L layers captured once
//! (`mla_core::gpu::graph::capture_step`) and replayed with new contents. Translation only:
//! the core owns the graph, the step's tensors, its plan and the pool checks.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use mla_core::gpu::graph::StepSpec;
use mla_core::ErrorCode;
use napi_derive::napi;

use crate::device::{parse_dtype, Device};
use crate::error::{core, disposed, err, Result};
use crate::tensor::{with_locked, StepPart, StepRef, Tensor, TensorSrc};

/// Native side of `CapturedStep` in src/step.ts.
#[napi]
pub struct CapturedStep {
    inner: Option<StepRef>,
    /// The pools the layers read (cache views or tensors of their own), held for replays.
    kv: Vec<TensorSrc>,
    layers: u32,
}

impl CapturedStep {
    fn get(&self) -> Result<&StepRef> {
        self.inner.as_ref().ok_or_else(|| disposed("captured step"))
    }
    fn layer(&self, l: u32) -> Result<usize> {
        if l >= self.layers {
            return Err(err(ErrorCode::InvalidArgument, format!("layer: expected an index below {}, got {l}", self.layers)));
        }
        Ok(l as usize)
    }
    fn view(&self, part: StepPart) -> Result<Tensor> {
        Ok(Tensor::view(TensorSrc::Step(self.get()?.clone(), part)))
    }
}

/// `Device.captureStep`: `mla_core::Device::capture_step` over `kv` (one pool per layer).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn capture_step(
    device: &Device,
    kv: Vec<&Tensor>,
    batch: u32,
    max_blocks_per_seq: u32,
    s_q: u32,
    h_q: u32,
    dtype: String,
    causal: Option<bool>,
    softmax_scale: Option<f64>,
    label: Option<String>,
    batch_invariant: Option<bool>,
) -> Result<CapturedStep> {
    let d = device.get()?.clone();
    let dtype = parse_dtype(&dtype)?;
    let srcs = kv
        .iter()
        .enumerate()
        .map(|(l, t)| match t.arg(&format!("kv[{l}]"))? {
            s @ (TensorSrc::Owned(_) | TensorSrc::CachePool(_)) => Ok(s),
            _ => Err(err(ErrorCode::InvalidArgument, format!("kv[{l}]: expected a cache pool or a tensor of its own, got a view of a plan or a step"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = StepSpec {
        batch: batch as usize,
        max_blocks_per_seq: max_blocks_per_seq as usize,
        s_q: s_q as usize,
        h_q: h_q as usize,
        layers: srcs.len(),
        dtype,
        causal: causal.unwrap_or(false),
        softmax_scale: softmax_scale.map(|s| s as f32),
        label: label.map(Cow::Owned),
    };
    let refs: Vec<&TensorSrc> = srcs.iter().collect();
    let step = with_locked(&refs, &[], None, |t, _, _| {
        let popts = mla_core::PlanOptions { batch_invariant: batch_invariant.unwrap_or(false), chunks: None };
        core(|| d.capture_step_with(&spec, t, &popts))
    })?;
    Ok(CapturedStep { inner: Some(Arc::new(Mutex::new(step))), layers: srcs.len() as u32, kv: srcs })
}

#[napi]
impl CapturedStep {
    /// Replays the step with the current contents of its tensors; returns the step id once
    /// it is queued (`CapturedStep::replay`).
    #[napi]
    pub fn replay(&self) -> Result<i64> {
        let s = self.get()?.clone();
        let refs: Vec<&TensorSrc> = self.kv.iter().collect();
        with_locked(&refs, &[], Some(&s), |t, _, st| core(|| st.unwrap().replay(t))).map(|id| id as i64)
    }

    /// The block table and lengths for `seqs` of `cache`, written into the step's own
    /// tensors (`KvCache::batch_into`).
    #[napi]
    pub fn set_batch(&self, cache: &crate::cache::KvCache, seqs: &[f64]) -> Result<()> {
        let s = self.get()?.clone();
        let pool = cache.pool_src()?;
        let ids = crate::cache::seq_ids(seqs)?;
        let c = pool.cache().expect("a pool view").clone();
        let (cg, mut sg) = crate::tensor::lock_two(&c, &s);
        let (bt, sl) = sg.lengths_mut();
        core(|| cg.batch_into(&ids, bt, sl))
    }

    #[napi(getter)]
    pub fn layers(&self) -> u32 {
        self.layers
    }

    /// Whether replays launch a CUDA graph (false on the CPU backend).
    #[napi(getter)]
    pub fn is_graph(&self) -> Result<bool> {
        Ok(crate::tensor::lock(self.get()?).is_graph())
    }

    /// Views of the step's own tensors.
    #[napi]
    pub fn q(&self, layer: u32) -> Result<Tensor> {
        self.view(StepPart::Q(self.layer(layer)?))
    }
    #[napi]
    pub fn out(&self, layer: u32) -> Result<Tensor> {
        self.view(StepPart::Out(self.layer(layer)?))
    }
    #[napi]
    pub fn lse(&self, layer: u32) -> Result<Tensor> {
        self.view(StepPart::Lse(self.layer(layer)?))
    }
    #[napi(getter)]
    pub fn block_table(&self) -> Result<Tensor> {
        self.view(StepPart::BlockTable)
    }
    #[napi(getter)]
    pub fn cache_seqlens(&self) -> Result<Tensor> {
        self.view(StepPart::Seqlens)
    }

    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.inner.is_none()
    }

    /// Releases this handle (views of the step's tensors keep the step alive).
    #[napi]
    pub fn dispose(&mut self) {
        self.inner = None;
        self.kv.clear();
    }
}
