//! `Tensor`: a JS handle to a core tensor. The handle may own the tensor or view one
//! owned by something else (the paged cache's pool, a plan's metadata), so that those can
//! be passed to `decode` without copying. Everything is reference counted: async work
//! keeps what it reads alive even when the JS side disposes its handles meanwhile.

use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard};

use mla_core::{ErrorCode, SharedPlan};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::device::Device;
use crate::error::{core, core_async, disposed, err, reject_with_code, Failure, Result};
use crate::plan::Plan;

/// Locks the cache, ignoring poisoning (a panic is reported where it happened).
pub fn lock(c: &Mutex<mla_core::KvCache>) -> MutexGuard<'_, mla_core::KvCache> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a tensor's memory lives.
#[derive(Clone)]
pub enum TensorSrc {
    /// A tensor of its own (created by `device.tensor`, a decode output, a cache batch).
    Owned(Arc<mla_core::Tensor>),
    /// The block pool of a paged cache (`KvCache.tensor`): a view, no copy.
    CachePool(Arc<Mutex<mla_core::KvCache>>),
    /// A plan's tile-scheduler metadata.
    PlanMetadata(Arc<SharedPlan>),
    /// A plan's num_splits.
    PlanNumSplits(Arc<SharedPlan>),
}

impl TensorSrc {
    /// Calls `f` with the core tensor (holding the cache's lock for a pool view, the
    /// plan's read lock for a plan view).
    pub fn with<R>(&self, f: impl FnOnce(&mla_core::Tensor) -> R) -> R {
        match self {
            TensorSrc::Owned(t) => f(t),
            TensorSrc::CachePool(c) => f(lock(c).tensor()),
            TensorSrc::PlanMetadata(p) => f(p.read().metadata()),
            TensorSrc::PlanNumSplits(p) => f(p.read().num_splits()),
        }
    }

    fn plan(&self) -> Option<&Arc<SharedPlan>> {
        match self {
            TensorSrc::PlanMetadata(p) | TensorSrc::PlanNumSplits(p) => Some(p),
            _ => None,
        }
    }

    pub fn cache(&self) -> Option<&Arc<Mutex<mla_core::KvCache>>> {
        match self {
            TensorSrc::CachePool(c) => Some(c),
            _ => None,
        }
    }
}

/// Calls `f` with the core tensors of `srcs` and the core plans of `plans`, locking each
/// distinct cache once (the same pool may be passed twice) and taking each distinct plan's
/// read lock once.
///
/// Caches are locked in one global order (by address), never in argument order: a pool
/// view is a valid tensor for any argument, so `decode(q = A.tensor, kv = B)` running
/// beside `decode(q = B.tensor, kv = A)` would otherwise lock A then B on one libuv thread
/// and B then A on another, and deadlock. Plans are read-locked after the caches (a plan's
/// write lock, `Plan.update`, is never held while locking a cache).
pub fn with_all<R>(
    srcs: &[&TensorSrc],
    plans: &[&Arc<SharedPlan>],
    f: impl FnOnce(&[&mla_core::Tensor], &[&mla_core::Plan]) -> R,
) -> R {
    let mut caches: Vec<&Arc<Mutex<mla_core::KvCache>>> =
        srcs.iter().filter_map(|s| s.cache()).collect();
    caches.sort_by_key(|c| Arc::as_ptr(c) as usize);
    caches.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let mut all_plans: Vec<&Arc<SharedPlan>> = srcs
        .iter()
        .filter_map(|s| s.plan())
        .chain(plans.iter().copied())
        .collect();
    all_plans.sort_by_key(|p| Arc::as_ptr(p) as usize);
    all_plans.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let guards: Vec<MutexGuard<'_, mla_core::KvCache>> = caches.iter().map(|c| lock(c)).collect();
    let plan_guards: Vec<RwLockReadGuard<'_, mla_core::Plan>> =
        all_plans.iter().map(|p| p.read()).collect();
    let plan_of = |p: &Arc<SharedPlan>| -> &mla_core::Plan {
        let i = all_plans.iter().position(|k| Arc::ptr_eq(k, p)).unwrap();
        &plan_guards[i]
    };
    let tensors: Vec<&mla_core::Tensor> = srcs
        .iter()
        .map(|s| match s {
            TensorSrc::Owned(t) => &**t,
            TensorSrc::CachePool(c) => {
                let i = caches.iter().position(|k| Arc::ptr_eq(k, c)).unwrap();
                guards[i].tensor()
            }
            TensorSrc::PlanMetadata(p) => plan_of(p).metadata(),
            TensorSrc::PlanNumSplits(p) => plan_of(p).num_splits(),
        })
        .collect();
    let plans: Vec<&mla_core::Plan> = plans.iter().map(|p| plan_of(p)).collect();
    f(&tensors, &plans)
}

/// A dense tensor (native side of `Tensor` in index.ts).
#[napi]
pub struct Tensor {
    src: Option<TensorSrc>,
}

impl Tensor {
    pub fn owned(t: mla_core::Tensor) -> Tensor {
        Tensor {
            src: Some(TensorSrc::Owned(Arc::new(t))),
        }
    }
    pub fn view(src: TensorSrc) -> Tensor {
        Tensor { src: Some(src) }
    }
    pub fn src(&self) -> Result<&TensorSrc> {
        self.src.as_ref().ok_or_else(|| disposed("tensor"))
    }
    /// The core tensor of a tensor of its own, for writing: not a view, and not used by a
    /// pending operation (which holds a reference to it).
    pub fn owned_mut(&mut self, name: &str) -> Result<&mut mla_core::Tensor> {
        match self.src.as_mut().ok_or_else(|| disposed(&format!("tensor '{name}'")))? {
            TensorSrc::Owned(t) => Arc::get_mut(t).ok_or_else(|| {
                err(
                    ErrorCode::InvalidArgument,
                    format!("{name}: expected a tensor no pending operation uses, got one in use (a pending read or decode)"),
                )
            }),
            _ => Err(err(
                ErrorCode::Unsupported,
                format!("{name}: expected a tensor of its own, got a view of a cache or a plan"),
            )),
        }
    }

    /// The source, with the argument's name in the disposed error.
    pub fn arg(&self, name: &str) -> Result<TensorSrc> {
        self.src
            .clone()
            .ok_or_else(|| disposed(&format!("tensor '{name}'")))
    }
}

#[derive(Clone, Copy)]
enum ReadAs {
    F32,
    I32,
    Bits,
}

fn read(
    t: &mla_core::Tensor,
    how: ReadAs,
) -> Result<Either3<Float32Array, Int32Array, Uint16Array>> {
    match how {
        ReadAs::F32 => Ok(Either3::A(Float32Array::new(core(|| t.to_f32())?))),
        ReadAs::I32 => Ok(Either3::B(Int32Array::new(core(|| t.to_i32())?))),
        ReadAs::Bits => {
            if !t.dtype().is_half() {
                return Err(err(
                    ErrorCode::DtypeMismatch,
                    format!("tensor: expected bf16 or fp16, got {}", t.dtype()),
                ));
            }
            let bytes = core(|| t.to_bytes())?;
            let bits = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            Ok(Either3::C(Uint16Array::new(bits)))
        }
    }
}

#[napi]
impl Tensor {
    #[napi(getter)]
    pub fn shape(&self) -> Result<Vec<u32>> {
        Ok(self
            .src()?
            .with(|t| t.shape().iter().map(|&d| d as u32).collect()))
    }

    /// "bf16", "fp16", "fp32" or "int32".
    #[napi(getter)]
    pub fn dtype(&self) -> Result<String> {
        Ok(self.src()?.with(|t| t.dtype().name().to_string()))
    }

    #[napi(getter)]
    pub fn device(&self) -> Result<Device> {
        Ok(Device::wrap(self.src()?.with(|t| t.device().clone())))
    }

    /// The CUDA device pointer (null on the CPU backend).
    #[napi(getter)]
    pub fn device_ptr(&self) -> Result<Option<BigInt>> {
        Ok(self.src()?.with(|t| t.device_ptr()).map(BigInt::from))
    }

    #[napi(getter)]
    pub fn nbytes(&self) -> Result<f64> {
        Ok(self.src()?.with(|t| t.nbytes()) as f64)
    }

    /// "owned", "cache" (a paged cache's pool) or "plan" (a plan's metadata).
    #[napi(getter)]
    pub fn storage(&self) -> Result<String> {
        Ok(match self.src()? {
            TensorSrc::Owned(_) => "owned",
            TensorSrc::CachePool(_) => "cache",
            TensorSrc::PlanMetadata(_) | TensorSrc::PlanNumSplits(_) => "plan",
        }
        .to_string())
    }

    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.src.is_none()
    }

    /// The plan this tensor belongs to, when it is a plan's metadata or num_splits.
    #[napi]
    pub fn source_plan(&self) -> Result<Option<Plan>> {
        Ok(match self.src()? {
            TensorSrc::PlanMetadata(p) | TensorSrc::PlanNumSplits(p) => {
                Some(Plan::from_arc(p.clone()))
            }
            _ => None,
        })
    }

    /// Whether this is a view of the same memory as `other` (same cache pool, same plan
    /// tensor, or the same tensor).
    #[napi]
    pub fn same_storage(&self, other: &Tensor) -> Result<bool> {
        Ok(match (self.src()?, other.src()?) {
            (TensorSrc::Owned(a), TensorSrc::Owned(b)) => Arc::ptr_eq(a, b),
            (TensorSrc::CachePool(a), TensorSrc::CachePool(b)) => Arc::ptr_eq(a, b),
            (TensorSrc::PlanMetadata(a), TensorSrc::PlanMetadata(b)) => Arc::ptr_eq(a, b),
            (TensorSrc::PlanNumSplits(a), TensorSrc::PlanNumSplits(b)) => Arc::ptr_eq(a, b),
            _ => false,
        })
    }

    /// Values as f32 (bf16 / fp16 widened exactly), copied to the host off the JS thread.
    #[napi]
    pub fn to_float32_array(&self) -> Result<AsyncTask<ReadTask>> {
        Ok(AsyncTask::new(ReadTask::new(
            self.src()?.clone(),
            ReadAs::F32,
        )))
    }
    #[napi]
    pub fn to_int32_array(&self) -> Result<AsyncTask<ReadTask>> {
        Ok(AsyncTask::new(ReadTask::new(
            self.src()?.clone(),
            ReadAs::I32,
        )))
    }
    /// Raw bf16 / fp16 bits.
    #[napi]
    pub fn to_uint16_array(&self) -> Result<AsyncTask<ReadTask>> {
        Ok(AsyncTask::new(ReadTask::new(
            self.src()?.clone(),
            ReadAs::Bits,
        )))
    }

    #[napi]
    pub fn to_float32_array_sync(&self) -> Result<Float32Array> {
        match self.src()?.with(|t| read(t, ReadAs::F32))? {
            Either3::A(a) => Ok(a),
            _ => unreachable!(),
        }
    }
    #[napi]
    pub fn to_int32_array_sync(&self) -> Result<Int32Array> {
        match self.src()?.with(|t| read(t, ReadAs::I32))? {
            Either3::B(a) => Ok(a),
            _ => unreachable!(),
        }
    }
    #[napi]
    pub fn to_uint16_array_sync(&self) -> Result<Uint16Array> {
        match self.src()?.with(|t| read(t, ReadAs::Bits))? {
            Either3::C(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    /// Sets every byte to `byte` (0xFF: NaN in every float type). Only for tensors of
    /// their own that no pending operation is reading.
    #[napi]
    pub fn fill(&mut self, byte: u32) -> Result<()> {
        if byte > 255 {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("byte: expected 0..=255, got {byte}"),
            ));
        }
        match self.src.as_mut().ok_or_else(|| disposed("tensor"))? {
            TensorSrc::Owned(t) => match Arc::get_mut(t) {
                Some(t) => core(|| t.fill_bytes(byte as u8)),
                None => Err(err(
                    ErrorCode::InvalidArgument,
                    "tensor: it is in use by a pending operation",
                )),
            },
            _ => Err(err(
                ErrorCode::Unsupported,
                "fill: only tensors of their own can be filled, not views of a cache or a plan",
            )),
        }
    }

    /// Overwrites the tensor with f32 values rounded to its dtype (bf16, fp16 or fp32); on
    /// CUDA the copy is queued (staged in pinned memory) and this returns at once.
    #[napi]
    pub fn write_f32(&mut self, data: &[f32]) -> Result<()> {
        let t = self.owned_mut("tensor")?;
        let bytes: Vec<u8> = match t.dtype() {
            mla_core::DType::F32 => mla_core::tensor::as_bytes(data).to_vec(),
            d if d.is_half() => {
                mla_core::tensor::as_bytes(&mla_core::dtype::f32_slice_to_half(data, d)).to_vec()
            }
            d => {
                return Err(err(
                    ErrorCode::DtypeMismatch,
                    format!("tensor: expected a floating tensor for Float32Array data, got {d}"),
                ))
            }
        };
        write_all(t, &bytes, data.len())
    }

    /// Overwrites a bf16 / fp16 tensor with raw bits.
    #[napi]
    pub fn write_bits(&mut self, data: &[u16]) -> Result<()> {
        let t = self.owned_mut("tensor")?;
        if !t.dtype().is_half() {
            return Err(err(
                ErrorCode::DtypeMismatch,
                format!(
                    "tensor: expected bf16 or fp16 for Uint16Array data, got {}",
                    t.dtype()
                ),
            ));
        }
        write_all(t, mla_core::tensor::as_bytes(data), data.len())
    }

    /// Overwrites an int32 tensor.
    #[napi]
    pub fn write_i32(&mut self, data: &[i32]) -> Result<()> {
        let t = self.owned_mut("tensor")?;
        if t.dtype() != mla_core::DType::I32 {
            return Err(err(
                ErrorCode::DtypeMismatch,
                format!(
                    "tensor: expected int32 for Int32Array data, got {}",
                    t.dtype()
                ),
            ));
        }
        write_all(t, mla_core::tensor::as_bytes(data), data.len())
    }

    /// Overwrites the tensor with `src`'s bytes (same device and byte size): on CUDA a
    /// device-to-device copy, queued.
    #[napi]
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        let s = src.arg("src")?;
        let t = self.owned_mut("tensor")?;
        with_all(&[&s], &[], |x, _| core(|| t.copy_from(x[0])))
    }

    /// Releases this handle's reference (the memory goes when nothing else uses it).
    #[napi]
    pub fn dispose(&mut self) {
        self.src = None;
    }
}

/// Writes `bytes` (of `n` elements) over the whole tensor.
fn write_all(t: &mut mla_core::Tensor, bytes: &[u8], n: usize) -> Result<()> {
    if n != t.numel() {
        return Err(err(
            ErrorCode::ShapeMismatch,
            format!(
                "data: expected {} elements (shape {:?}), got {n}",
                t.numel(),
                t.shape()
            ),
        ));
    }
    core(|| t.write_bytes(0, bytes))
}

/// Copies a tensor to the host on the libuv thread pool.
pub struct ReadTask {
    src: TensorSrc,
    how: ReadAs,
    failure: Option<Failure>,
}

impl ReadTask {
    fn new(src: TensorSrc, how: ReadAs) -> Self {
        ReadTask {
            src,
            how,
            failure: None,
        }
    }
}

impl Task for ReadTask {
    type Output = Option<Either3<Float32Array, Int32Array, Uint16Array>>;
    type JsValue = Either3<Float32Array, Int32Array, Uint16Array>;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        let (src, how) = (&self.src, self.how);
        match core_async(|| src.with(|t| read(t, how))) {
            Ok(v) => Ok(Some(v)),
            Err(f) => {
                self.failure = Some(f);
                Ok(None)
            }
        }
    }

    fn resolve(&mut self, env: Env, out: Self::Output) -> napi::Result<Self::JsValue> {
        match (out, self.failure.take()) {
            (Some(v), _) => Ok(v),
            (None, Some(f)) => Err(reject_with_code(&env, f)),
            (None, None) => unreachable!(),
        }
    }
}
