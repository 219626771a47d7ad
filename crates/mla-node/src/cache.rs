//! `KvCache`: the paged latent cache of `mla_core::cache`, shared with async decodes.

use std::sync::{Arc, Mutex};

use mla_core::{ErrorCode, KvCacheConfig, SeqId};
use napi_derive::napi;

use crate::device::{parse_dtype, Device};
use crate::error::{core, disposed, err, Result};
use crate::tensor::{lock, lock_two, StepPart, Tensor, TensorSrc};

/// Native side of `KvCache` (src/cache.ts). The core cache sits behind a mutex: a decode
/// that reads the pool holds it while it runs, and cache calls made meanwhile wait.
#[napi]
pub struct KvCache {
    inner: Option<Arc<Mutex<mla_core::KvCache>>>,
}

/// `KvCache.batch()`: a block table and lengths for a list of sequences.
#[napi(object, object_from_js = false)]
pub struct CacheBatch {
    /// [b, max_blocks_per_seq] int32.
    pub block_table: Tensor,
    /// [b] int32.
    pub cache_seqlens: Tensor,
}

fn seq_id(seq: i64) -> Result<SeqId> {
    if seq < 0 {
        return Err(err(ErrorCode::UnknownSequence, format!("sequence: expected an id returned by this cache, got {seq}")));
    }
    Ok(SeqId(seq as u64))
}

/// Sequence ids as the TS entry passes them: a Float64Array of safe integers (`seqList`), read
/// in one go rather than one JS value at a time.
pub fn seq_ids(seqs: &[f64]) -> Result<Vec<SeqId>> {
    seqs.iter()
        .map(|&v| {
            if v.fract() != 0.0 || !(v.abs() <= 9007199254740991.0) {
                return Err(err(ErrorCode::InvalidArgument, format!("seqs: expected sequence ids (integers), got {v}")));
            }
            seq_id(v as i64)
        })
        .collect()
}

impl KvCache {
    /// The pool as a tensor source (a view).
    pub fn pool_src(&self) -> Result<TensorSrc> {
        Ok(TensorSrc::CachePool(self.get()?.clone()))
    }
    fn get(&self) -> Result<&Arc<Mutex<mla_core::KvCache>>> {
        self.inner.as_ref().ok_or_else(|| disposed("cache"))
    }
    fn with<R>(&self, f: impl FnOnce(&mut mla_core::KvCache) -> mla_core::Result<R>) -> Result<R> {
        let c = self.get()?;
        let mut g = lock(c);
        core(|| f(&mut g))
    }
}

#[napi]
impl KvCache {
    /// A pool of `num_blocks` blocks of 64 latent rows (576 values each) on `device`.
    #[napi(constructor)]
    pub fn new(device: &Device, num_blocks: i64, dtype: String) -> Result<KvCache> {
        let d = device.get()?;
        let dtype = parse_dtype(&dtype)?;
        // The same name and range as src/cache.ts and the core (which says num_blocks).
        let max = mla_core::cache::BLOCK_TABLE_PAD as i64;
        let num_blocks = core(|| mla_core::validate::int_within("numBlocks", num_blocks, 1, max))?;
        let c = core(|| mla_core::KvCache::new(d, KvCacheConfig { num_blocks, dtype }))?;
        Ok(KvCache { inner: Some(Arc::new(Mutex::new(c))) })
    }

    /// A new, empty sequence; returns its id.
    #[napi]
    pub fn create_sequence(&self) -> Result<i64> {
        self.with(|c| Ok(c.create_sequence().0 as i64))
    }

    /// Appends latent rows given as f32 (rounded to the cache's dtype); length must be a
    /// multiple of 576.
    #[napi]
    pub fn append_f32(&self, seq: i64, rows: &[f32]) -> Result<()> {
        let s = seq_id(seq)?;
        self.with(|c| c.append_f32(s, rows))
    }

    /// Appends latent rows given as raw bf16 / fp16 bits of the cache's dtype.
    #[napi]
    pub fn append_bits(&self, seq: i64, rows: &[u16]) -> Result<()> {
        let s = seq_id(seq)?;
        self.with(|c| c.append(s, rows))
    }

    /// `KvCache::append_batch_f32`: the same number of rows for each of `seqs` (distinct),
    /// in one call; returns the step id.
    #[napi]
    pub fn append_batch_f32(&self, seqs: &[f64], rows: &[f32]) -> Result<i64> {
        mla_core::trace::mark("native:enter");
        let ids = seq_ids(seqs)?;
        self.with(|c| c.append_batch_f32(&ids, rows)).map(|id| id as i64)
    }

    /// `KvCache::append_batch` with raw bits of the cache's dtype.
    #[napi]
    pub fn append_batch_bits(&self, seqs: &[f64], rows: &[u16]) -> Result<i64> {
        mla_core::trace::mark("native:enter");
        let ids = seq_ids(seqs)?;
        self.with(|c| c.append_batch(&ids, rows)).map(|id| id as i64)
    }

    /// `KvCache::append_batch_from`: the rows from a tensor of its own on the cache's device
    /// (on CUDA device to device).
    #[napi]
    pub fn append_batch_tensor(&self, seqs: &[f64], rows: &Tensor) -> Result<i64> {
        mla_core::trace::mark("native:enter");
        let ids = seq_ids(seqs)?;
        match rows.arg("rows")? {
            TensorSrc::Owned(t) => self.with(|c| c.append_batch_from(&ids, &t)).map(|id| id as i64),
            _ => Err(err(ErrorCode::InvalidArgument, "rows: expected a tensor of its own, got a view of a cache or a plan")),
        }
    }

    /// `KvCache::batch_into`: block table and lengths for `seqs` written into existing
    /// int32 tensors (tensors of their own, no pending operation on them).
    #[napi]
    pub fn batch_into(&self, seqs: &[f64], block_table: &mut Tensor, cache_seqlens: &mut Tensor) -> Result<()> {
        let ids = seq_ids(seqs)?;
        // Looked at by reference: a clone of an owned tensor's source would make it "in use".
        let (a, b) = (block_table.src()?, cache_seqlens.src()?);
        if let (TensorSrc::Step(s1, StepPart::BlockTable), TensorSrc::Step(s2, StepPart::Seqlens)) = (a, b) {
            if Arc::ptr_eq(s1, s2) {
                // A captured step's own block table and lengths.
                let (c, s) = (self.get()?.clone(), s1.clone());
                let (cg, mut sg) = lock_two(&c, &s);
                let (bt, sl) = sg.lengths_mut();
                return core(|| cg.batch_into(&ids, bt, sl));
            }
        }
        if matches!(a, TensorSrc::Step(..)) || matches!(b, TensorSrc::Step(..)) {
            return Err(err(
                ErrorCode::Unsupported,
                "blockTable, cacheSeqlens: expected tensors of their own, or a captured step's blockTable and cacheSeqlens together",
            ));
        }
        let bt = block_table.owned_mut("blockTable")?;
        let sl = cache_seqlens.owned_mut("cacheSeqlens")?;
        self.with(|c| c.batch_into(&ids, bt, sl))
    }

    /// A new sequence sharing `seq`'s blocks (copy-on-write); returns its id.
    #[napi]
    pub fn fork(&self, seq: i64) -> Result<i64> {
        let s = seq_id(seq)?;
        self.with(|c| c.fork(s).map(|n| n.0 as i64))
    }

    /// Frees `seq` (its blocks return to the pool when no other sequence shares them).
    #[napi]
    pub fn free(&self, seq: i64) -> Result<()> {
        let s = seq_id(seq)?;
        self.with(|c| c.free(s))
    }

    #[napi]
    pub fn seq_len(&self, seq: i64) -> Result<u32> {
        let s = seq_id(seq)?;
        self.with(|c| c.seq_len(s).map(|n| n as u32))
    }

    #[napi]
    pub fn block_ids(&self, seq: i64) -> Result<Vec<i32>> {
        let s = seq_id(seq)?;
        self.with(|c| c.block_ids(s))
    }

    /// Ids of the live sequences.
    #[napi]
    pub fn sequences(&self) -> Result<Vec<i64>> {
        self.with(|c| Ok(c.sequences().into_iter().map(|s| s.0 as i64).collect()))
    }

    #[napi(getter)]
    pub fn num_blocks(&self) -> Result<u32> {
        self.with(|c| Ok(c.num_blocks() as u32))
    }

    #[napi(getter)]
    pub fn free_blocks(&self) -> Result<u32> {
        self.with(|c| Ok(c.free_blocks() as u32))
    }

    #[napi(getter)]
    pub fn dtype(&self) -> Result<String> {
        self.with(|c| Ok(c.dtype().name().to_string()))
    }

    #[napi(getter)]
    pub fn device(&self) -> Result<Device> {
        self.with(|c| Ok(Device::wrap(c.device().clone())))
    }

    /// Block table [b, maxBlocksPerSeq] and lengths [b] for `seqs`, on the cache's device.
    #[napi]
    pub fn batch(&self, seqs: &[f64], max_blocks_per_seq: Option<u32>) -> Result<CacheBatch> {
        let ids = seq_ids(seqs)?;
        let (bt, lens) = self.with(|c| c.batch(&ids, max_blocks_per_seq.map(|m| m as usize)))?;
        Ok(CacheBatch { block_table: Tensor::owned(bt), cache_seqlens: Tensor::owned(lens) })
    }

    /// The pool [numBlocks, 64, 1, 576] as a tensor view (no copy), usable as `kvCache`.
    #[napi(getter)]
    pub fn tensor(&self) -> Result<Tensor> {
        Ok(Tensor::view(TensorSrc::CachePool(self.get()?.clone())))
    }

    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.inner.is_none()
    }

    /// Releases this handle (pool views and pending decodes keep the pool alive).
    #[napi]
    pub fn dispose(&mut self) {
        self.inner = None;
    }
}
