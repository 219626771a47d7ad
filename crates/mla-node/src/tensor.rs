//! `Tensor`: a JS handle to a core tensor. The handle may own the tensor or view one
//! owned by something else (the paged cache's pool, a plan's metadata), so that those can
//! be passed to `decode` without copying. Everything is reference counted: async work
//! keeps what it reads alive even when the JS side disposes its handles meanwhile.

use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard};

use mla_core::{ErrorCode, SharedPlan};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::device::Device;
use crate::error::{core, disposed, err, Result};
use crate::plan::Plan;
use crate::task::CoreTask;

/// Locks a cache or a captured step, ignoring poisoning (a panic is reported where it
/// happened).
pub fn lock<T>(c: &Mutex<T>) -> MutexGuard<'_, T> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// A captured step shared by its JS handle and the views of its tensors.
pub type StepRef = Arc<Mutex<mla_core::gpu::graph::CapturedStep>>;

/// Which tensor of a captured step a view shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPart {
    Q(usize),
    Out(usize),
    Lse(usize),
    BlockTable,
    Seqlens,
}

impl StepPart {
    pub fn of(self, s: &mla_core::gpu::graph::CapturedStep) -> &mla_core::Tensor {
        match self {
            StepPart::Q(l) => s.q(l),
            StepPart::Out(l) => s.out(l),
            StepPart::Lse(l) => s.lse(l),
            StepPart::BlockTable => s.block_table(),
            StepPart::Seqlens => s.seqlens(),
        }
    }
    pub fn of_mut(self, s: &mut mla_core::gpu::graph::CapturedStep) -> &mut mla_core::Tensor {
        match self {
            StepPart::Q(l) => s.q_mut(l),
            StepPart::Out(l) => s.outputs_mut(l).0,
            StepPart::Lse(l) => s.outputs_mut(l).1,
            StepPart::BlockTable => s.lengths_mut().0,
            StepPart::Seqlens => s.lengths_mut().1,
        }
    }
}

/// Locks two mutexes in address order (the global lock order of the binding).
pub fn lock_two<'a, A, B>(a: &'a Arc<Mutex<A>>, b: &'a Arc<Mutex<B>>) -> (MutexGuard<'a, A>, MutexGuard<'a, B>) {
    if (Arc::as_ptr(a) as *const u8 as usize) < (Arc::as_ptr(b) as *const u8 as usize) {
        let ga = lock(a);
        (ga, lock(b))
    } else {
        let gb = lock(b);
        (lock(a), gb)
    }
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
    /// A tensor a captured step owns (its queries, outputs, block table, lengths).
    Step(StepRef, StepPart),
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
            TensorSrc::Step(s, part) => f(part.of(&lock(s))),
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

/// Calls `f` with the core tensors of `srcs` and the core plans of `plans`: see
/// [`with_locked`].
pub fn with_all<R>(srcs: &[&TensorSrc], plans: &[&Arc<SharedPlan>], f: impl FnOnce(&[&mla_core::Tensor], &[&mla_core::Plan]) -> R) -> R {
    with_locked(srcs, plans, None, |t, p, _| f(t, p))
}

enum Lockable<'a> {
    Cache(&'a Arc<Mutex<mla_core::KvCache>>),
    Step(&'a StepRef),
}

impl Lockable<'_> {
    fn addr(&self) -> usize {
        match self {
            Lockable::Cache(c) => Arc::as_ptr(c) as *const u8 as usize,
            Lockable::Step(s) => Arc::as_ptr(s) as *const u8 as usize,
        }
    }
}

/// Calls `f` with the core tensors of `srcs`, the core plans of `plans`, and (when `held`
/// is given) that captured step for writing, locking each distinct cache and step once
/// and taking each distinct plan's read lock once. `held` must not also be viewed by one of
/// `srcs` (the caller rejects that first).
///
/// Caches and steps are locked in one global order (by address), never in argument order:
/// a pool view is a valid tensor for any argument, so `decode(q = A.tensor, kv = B)` running
/// beside `decode(q = B.tensor, kv = A)` would otherwise lock A then B on one libuv thread
/// and B then A on another, and deadlock. Plans are read-locked after them (a plan's write
/// lock, `Plan.update`, is never held while locking a cache or a step).
pub fn with_locked<R>(
    srcs: &[&TensorSrc],
    plans: &[&Arc<SharedPlan>],
    held: Option<&StepRef>,
    f: impl FnOnce(&[&mla_core::Tensor], &[&mla_core::Plan], Option<&mut mla_core::gpu::graph::CapturedStep>) -> R,
) -> R {
    let mut order: Vec<Lockable<'_>> = srcs
        .iter()
        .filter_map(|s| match s {
            TensorSrc::CachePool(c) => Some(Lockable::Cache(c)),
            TensorSrc::Step(st, _) => Some(Lockable::Step(st)),
            _ => None,
        })
        .chain(held.map(Lockable::Step))
        .collect();
    order.sort_by_key(|l| l.addr());
    order.dedup_by(|a, b| a.addr() == b.addr());
    let held_addr = held.map(|h| Arc::as_ptr(h) as *const u8 as usize);
    let mut caches: Vec<(usize, MutexGuard<'_, mla_core::KvCache>)> = Vec::new();
    let mut steps: Vec<(usize, MutexGuard<'_, mla_core::gpu::graph::CapturedStep>)> = Vec::new();
    let mut held_guard = None;
    for l in &order {
        match l {
            Lockable::Cache(c) => caches.push((l.addr(), lock(c))),
            Lockable::Step(s) if Some(l.addr()) == held_addr => held_guard = Some(lock(s)),
            Lockable::Step(s) => steps.push((l.addr(), lock(s))),
        }
    }
    let mut all_plans: Vec<&Arc<SharedPlan>> = srcs.iter().filter_map(|s| s.plan()).chain(plans.iter().copied()).collect();
    all_plans.sort_by_key(|p| Arc::as_ptr(p) as usize);
    all_plans.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let plan_guards: Vec<RwLockReadGuard<'_, mla_core::Plan>> = all_plans.iter().map(|p| p.read()).collect();
    let plan_of = |p: &Arc<SharedPlan>| -> &mla_core::Plan {
        let i = all_plans.iter().position(|k| Arc::ptr_eq(k, p)).unwrap();
        &plan_guards[i]
    };
    let tensors: Vec<&mla_core::Tensor> = srcs
        .iter()
        .map(|s| match s {
            TensorSrc::Owned(t) => &**t,
            TensorSrc::CachePool(c) => {
                let a = Arc::as_ptr(c) as *const u8 as usize;
                caches.iter().find(|(k, _)| *k == a).unwrap().1.tensor()
            }
            TensorSrc::PlanMetadata(p) => plan_of(p).metadata(),
            TensorSrc::PlanNumSplits(p) => plan_of(p).num_splits(),
            TensorSrc::Step(st, part) => {
                let a = Arc::as_ptr(st) as *const u8 as usize;
                part.of(&steps.iter().find(|(k, _)| *k == a).expect("a held step is not viewed too").1)
            }
        })
        .collect();
    let plans: Vec<&mla_core::Plan> = plans.iter().map(|p| plan_of(p)).collect();
    f(&tensors, &plans, held_guard.as_deref_mut())
}

/// A dense tensor (native side of `Tensor` in src/tensor.ts).
#[napi]
pub struct Tensor {
    src: Option<TensorSrc>,
    /// Its id in `handles` (0: not registered).
    pub(crate) slot: u32,
}

impl Drop for Tensor {
    fn drop(&mut self) {
        if self.slot != 0 {
            crate::handles::release(self.slot);
        }
    }
}

impl Tensor {
    pub fn owned(t: mla_core::Tensor) -> Tensor {
        Tensor::view(TensorSrc::Owned(Arc::new(t)))
    }
    pub fn view(src: TensorSrc) -> Tensor {
        Tensor { src: Some(src), slot: 0 }
    }
    pub fn src(&self) -> Result<&TensorSrc> {
        self.src.as_ref().ok_or_else(|| disposed("tensor"))
    }
    /// Calls `f` with the core tensor for writing: a tensor of its own that no pending
    /// operation uses, or a writable tensor of a captured step (its queries, block table,
    /// lengths; under the step's lock).
    pub fn with_mut<R>(&mut self, name: &str, f: impl FnOnce(&mut mla_core::Tensor) -> Result<R>) -> Result<R> {
        if let Some(TensorSrc::Step(s, part)) = &self.src {
            let (s, part) = (s.clone(), *part);
            return f(part.of_mut(&mut lock(&s)));
        }
        f(self.owned_mut(name)?)
    }

    /// The core tensor of a tensor of its own, for writing: not a view, and not used by a
    /// pending operation (which holds a reference to it).
    pub fn owned_mut(&mut self, name: &str) -> Result<&mut mla_core::Tensor> {
        match self.src.as_mut().ok_or_else(|| disposed(&format!("tensor '{name}'")))? {
            TensorSrc::Owned(t) => Arc::get_mut(t).ok_or_else(|| {
                err(ErrorCode::InvalidArgument, format!("{name}: expected a tensor no pending operation uses, got one in use (a pending read or decode)"))
            }),
            _ => Err(err(ErrorCode::Unsupported, format!("{name}: expected a tensor of its own, got a view of a cache, a plan or a captured step"))),
        }
    }

    /// The source, with the argument's name in the disposed error.
    pub fn arg(&self, name: &str) -> Result<TensorSrc> {
        self.src.clone().ok_or_else(|| disposed(&format!("tensor '{name}'")))
    }
}

#[derive(Clone, Copy)]
enum ReadAs {
    F32,
    I32,
    Bits,
}

fn read(t: &mla_core::Tensor, how: ReadAs) -> Result<Either3<Float32Array, Int32Array, Uint16Array>> {
    match how {
        ReadAs::F32 => Ok(Either3::A(Float32Array::new(core(|| t.to_f32())?))),
        ReadAs::I32 => Ok(Either3::B(Int32Array::new(core(|| t.to_i32())?))),
        ReadAs::Bits => {
            if !t.dtype().is_half() {
                return Err(err(ErrorCode::DtypeMismatch, format!("tensor: expected bf16 or fp16, got {}", t.dtype())));
            }
            let bytes = core(|| t.to_bytes())?;
            let bits = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            Ok(Either3::C(Uint16Array::new(bits)))
        }
    }
}

#[napi]
impl Tensor {
    #[napi(getter)]
    pub fn shape(&self) -> Result<Vec<u32>> {
        Ok(self.src()?.with(|t| t.shape().iter().map(|&d| d as u32).collect()))
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

    /// "owned", "cache" (a paged cache's pool), "plan" (a plan's metadata) or "step" (a
    /// captured step's tensor).
    #[napi(getter)]
    pub fn storage(&self) -> Result<String> {
        Ok(match self.src()? {
            TensorSrc::Owned(_) => "owned",
            TensorSrc::CachePool(_) => "cache",
            TensorSrc::PlanMetadata(_) | TensorSrc::PlanNumSplits(_) => "plan",
            TensorSrc::Step(..) => "step",
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
            TensorSrc::PlanMetadata(p) | TensorSrc::PlanNumSplits(p) => Some(Plan::from_arc(p.clone())),
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
            (TensorSrc::Step(a, x), TensorSrc::Step(b, y)) => Arc::ptr_eq(a, b) && x == y,
            _ => false,
        })
    }

    /// Values as f32 (bf16 / fp16 widened exactly), copied to the host off the JS thread.
    #[napi]
    pub fn to_float32_array(&self) -> Result<AsyncTask<ReadTask>> {
        Ok(read_task(self.src()?.clone(), ReadAs::F32))
    }
    #[napi]
    pub fn to_int32_array(&self) -> Result<AsyncTask<ReadTask>> {
        Ok(read_task(self.src()?.clone(), ReadAs::I32))
    }
    /// Raw bf16 / fp16 bits.
    #[napi]
    pub fn to_uint16_array(&self) -> Result<AsyncTask<ReadTask>> {
        Ok(read_task(self.src()?.clone(), ReadAs::Bits))
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
            return Err(err(ErrorCode::InvalidArgument, format!("byte: expected 0..=255, got {byte}")));
        }
        match self.src.as_mut().ok_or_else(|| disposed("tensor"))? {
            TensorSrc::Owned(t) => match Arc::get_mut(t) {
                Some(t) => core(|| t.fill_bytes(byte as u8)),
                None => Err(err(ErrorCode::InvalidArgument, "tensor: it is in use by a pending operation")),
            },
            TensorSrc::Step(..) => self.with_mut("tensor", |t| core(|| t.fill_bytes(byte as u8))),
            _ => Err(err(ErrorCode::Unsupported, "fill: only tensors of their own (or of a captured step) can be filled, not views of a cache or a plan")),
        }
    }

    /// Overwrites the tensor with f32 values rounded to its dtype (bf16, fp16 or fp32); on
    /// CUDA the copy is queued (staged in pinned memory) and this returns at once.
    #[napi]
    pub fn write_f32(&mut self, data: &[f32]) -> Result<()> {
        self.with_mut("tensor", |t| write_f32_into(t, data))
    }

    /// Overwrites a bf16 / fp16 tensor with raw bits.
    #[napi]
    pub fn write_bits(&mut self, data: &[u16]) -> Result<()> {
        self.with_mut("tensor", |t| {
            if !t.dtype().is_half() {
                return Err(err(ErrorCode::DtypeMismatch, format!("tensor: expected bf16 or fp16 for Uint16Array data, got {}", t.dtype())));
            }
            write_all(t, mla_core::tensor::as_bytes(data), data.len())
        })
    }

    /// Overwrites an int32 tensor.
    #[napi]
    pub fn write_i32(&mut self, data: &[i32]) -> Result<()> {
        self.with_mut("tensor", |t| {
            if t.dtype() != mla_core::DType::I32 {
                return Err(err(ErrorCode::DtypeMismatch, format!("tensor: expected int32 for Int32Array data, got {}", t.dtype())));
            }
            write_all(t, mla_core::tensor::as_bytes(data), data.len())
        })
    }

    /// Overwrites the tensor with `src`'s bytes (same device and byte size): on CUDA a
    /// device-to-device copy, queued.
    #[napi]
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        let s = src.arg("src")?;
        if let (Some(TensorSrc::Step(a, _)), TensorSrc::Step(b, _)) = (&self.src, &s) {
            if Arc::ptr_eq(a, b) {
                return Err(err(ErrorCode::Unsupported, "src: expected a tensor outside this captured step, got one of its own tensors"));
            }
        }
        if let Some(TensorSrc::Step(held, part)) = self.src.clone() {
            return with_locked(&[&s], &[], Some(&held), |x, _, st| core(|| part.of_mut(st.unwrap()).copy_from(x[0])));
        }
        let t = self.owned_mut("tensor")?;
        with_all(&[&s], &[], |x, _| core(|| t.copy_from(x[0])))
    }

    /// Releases this handle's reference (the memory goes when nothing else uses it).
    #[napi]
    pub fn dispose(&mut self) {
        self.src = None;
    }
}

fn write_f32_into(t: &mut mla_core::Tensor, data: &[f32]) -> Result<()> {
    {
        let bytes: Vec<u8> = match t.dtype() {
            mla_core::DType::F32 => mla_core::tensor::as_bytes(data).to_vec(),
            d if d.is_half() => mla_core::tensor::as_bytes(&mla_core::dtype::f32_slice_to_half(data, d)).to_vec(),
            d => return Err(err(ErrorCode::DtypeMismatch, format!("tensor: expected a floating tensor for Float32Array data, got {d}"))),
        };
        write_all(t, &bytes, data.len())
    }
}

/// Writes `bytes` (of `n` elements) over the whole tensor.
fn write_all(t: &mut mla_core::Tensor, bytes: &[u8], n: usize) -> Result<()> {
    if n != t.numel() {
        return Err(err(ErrorCode::ShapeMismatch, format!("data: expected {} elements (shape {:?}), got {n}", t.numel(), t.shape())));
    }
    core(|| t.write_bytes(0, bytes))
}

/// Copies a tensor to the host on the libuv thread pool.
pub type ReadTask = CoreTask<Either3<Float32Array, Int32Array, Uint16Array>, Either3<Float32Array, Int32Array, Uint16Array>>;

fn read_task(src: TensorSrc, how: ReadAs) -> AsyncTask<ReadTask> {
    CoreTask::new(move || src.with(|t| read(t, how)), |v| v)
}
