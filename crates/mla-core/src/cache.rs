//! The paged latent KV cache: a fixed pool of 64-token blocks, sequences that grow by
//! appending latent rows, prefix sharing with copy-on-write.
//!
//! Design:
//! - The pool is one tensor `[num_blocks, 64, 1, 576]` (bf16 or fp16) on the cache's device;
//!   it is what `decode` takes as `kv_cache`. All bookkeeping is plain host state: a
//!   refcount per block, a LIFO free list (the most recently freed block is reused first,
//!   so a fresh cache hands out blocks 0, 1, 2, ...), and per sequence its block list and
//!   length. No interior mutability: share a cache across threads behind a `Mutex`.
//! - `fork` shares every block of a sequence (refcounts + 1). A full block is never written
//!   again, so it stays shared for good. A partially filled last block that is shared is
//!   copied (only its used rows) into a fresh block before the first append writes to it.
//! - `append` is all-or-nothing: it reserves every block it needs (copy-on-write included)
//!   before it writes, and only commits the new length and block list once every write
//!   succeeded. Writes land in fresh blocks or in rows past the sequence's length in an
//!   unshared block, so a failed append leaves nothing visible behind.
//! - Sequence ids are never reused: a freed id stays unknown (`ERR_UNKNOWN_SEQUENCE`).

use std::collections::HashMap;

use crate::device::Device;
use crate::dtype::{f32_slice_to_half, DType};
use crate::error::{ErrorCode, MlaError, Result};
use crate::tensor::{as_bytes, Tensor};
use crate::{BLOCK_SIZE, HEAD_DIM};

/// What [`KvCache::batch`] writes into `block_table` entries past a sequence's blocks.
/// `decode` never reads those entries; the value is clearly invalid because a cache never
/// has more than this many blocks (checked in [`KvCache::new`]), so it is always
/// `>= num_blocks` and a stray read is caught by the block-index checks.
pub const BLOCK_TABLE_PAD: i32 = i32::MAX - 4095;

#[derive(Debug, Clone, Copy)]
pub struct KvCacheConfig {
    /// Blocks in the pool (each holds `BLOCK_SIZE` = 64 tokens); at least 1.
    pub num_blocks: usize,
    /// BF16 or F16 (the dtype of the queries that will read it).
    pub dtype: DType,
}

/// A sequence handle. Ids are unique for the cache's lifetime and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sequence {}", self.0)
    }
}

#[derive(Debug, Clone, Default)]
struct SeqState {
    blocks: Vec<u32>,
    len: usize,
}

/// A paged latent KV cache. See the module docs for the design.
pub struct KvCache {
    pool: Tensor,
    dtype: DType,
    num_blocks: usize,
    refcount: Vec<u32>,
    /// LIFO: `pop` takes the most recently freed block.
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqState>,
    next_id: u64,
}

/// Bytes of one latent row and of one block in the pool.
fn row_bytes(dtype: DType) -> usize {
    HEAD_DIM * dtype.size()
}
fn block_bytes(dtype: DType) -> usize {
    BLOCK_SIZE * row_bytes(dtype)
}

fn unknown(seq: SeqId) -> MlaError {
    MlaError::arg(ErrorCode::UnknownSequence, "seq", "a live sequence of this cache", format!("{} (freed or never created)", seq.0))
}

/// Appended data must be whole latent rows.
fn check_whole_rows(values: usize) -> Result<()> {
    if !values.is_multiple_of(HEAD_DIM) {
        return Err(MlaError::arg(
            ErrorCode::ShapeMismatch,
            "rows",
            format!("a multiple of {HEAD_DIM} values (whole latent rows)"),
            format!("{values} values"),
        ));
    }
    Ok(())
}

impl KvCache {
    /// A cache of `cfg.num_blocks` zeroed blocks on `device`.
    pub fn new(device: &Device, cfg: KvCacheConfig) -> Result<KvCache> {
        if !cfg.dtype.is_half() {
            return Err(MlaError::arg(ErrorCode::DtypeMismatch, "dtype", "bf16 or fp16", cfg.dtype));
        }
        if cfg.num_blocks == 0 || cfg.num_blocks > BLOCK_TABLE_PAD as usize {
            return Err(MlaError::arg(ErrorCode::InvalidArgument, "num_blocks", format!("within [1, {BLOCK_TABLE_PAD}]"), cfg.num_blocks));
        }
        if cfg.num_blocks.checked_mul(block_bytes(cfg.dtype)).is_none() {
            return Err(MlaError::arg(ErrorCode::InvalidArgument, "num_blocks", "a pool size that fits in memory", cfg.num_blocks));
        }
        let pool = Tensor::zeros(device, &[cfg.num_blocks, BLOCK_SIZE, 1, HEAD_DIM], cfg.dtype)?;
        Ok(KvCache {
            pool,
            dtype: cfg.dtype,
            num_blocks: cfg.num_blocks,
            refcount: vec![0; cfg.num_blocks],
            // Reversed so that `pop` hands out 0, 1, 2, ...: a fresh sequence gets
            // physically consecutive blocks, which `append` writes with one copy.
            free: (0..cfg.num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
            next_id: 0,
        })
    }

    /// The pool `[num_blocks, 64, 1, 576]`: pass it to `decode` as `kv_cache`.
    pub fn tensor(&self) -> &Tensor {
        &self.pool
    }
    pub fn device(&self) -> &Device {
        self.pool.device()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// Blocks no sequence references.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// A new, empty sequence (it takes no block until rows are appended).
    pub fn create_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, SeqState::default());
        id
    }

    /// Appends `rows.len() / 576` latent rows given as raw bits of the cache dtype.
    /// All-or-nothing: on `ERR_CACHE_EXHAUSTED` (or any error) the sequence is unchanged.
    pub fn append(&mut self, seq: SeqId, rows: &[u16]) -> Result<()> {
        check_whole_rows(rows.len())?;
        let state = self.seqs.get(&seq).ok_or_else(|| unknown(seq))?;
        let n = rows.len() / HEAD_DIM;
        if n == 0 {
            return Ok(());
        }
        let (old_len, new_len) = (state.len, state.len + n);
        if i32::try_from(new_len).is_err() {
            return Err(MlaError::arg(
                ErrorCode::InvalidArgument,
                "rows",
                format!("a sequence length within int32 (now {old_len})"),
                format!("{n} more rows"),
            ));
        }
        let used_in_last = old_len % BLOCK_SIZE;
        let cow = used_in_last != 0 && self.refcount[*state.blocks.last().unwrap() as usize] > 1;
        let grow = new_len.div_ceil(BLOCK_SIZE) - old_len.div_ceil(BLOCK_SIZE);
        let needed = grow + cow as usize;
        if needed > self.free.len() {
            return Err(MlaError::arg(
                ErrorCode::CacheExhausted,
                "free blocks",
                format!("{needed} to append {n} rows to {seq} (length {old_len})"),
                format!("{} free of {}", self.free.len(), self.num_blocks),
            ));
        }

        // Reserve, then write into a scratch block list; commit only when all writes passed.
        let mut blocks = state.blocks.clone();
        let fresh: Vec<u32> = (0..needed).map(|_| self.free.pop().unwrap()).collect();
        let res = self.write_rows(&mut blocks, &fresh, cow, old_len, rows);
        if let Err(e) = res {
            // Nothing references the fresh blocks yet: hand them back in the same order.
            self.free.extend(fresh.iter().rev());
            return Err(e);
        }
        for &b in &fresh {
            self.refcount[b as usize] = 1;
        }
        if cow {
            let old = self.seqs[&seq].blocks.last().copied().unwrap();
            // Shared (refcount > 1), so this never frees it.
            self.refcount[old as usize] -= 1;
        }
        let state = self.seqs.get_mut(&seq).unwrap();
        state.blocks = blocks;
        state.len = new_len;
        Ok(())
    }

    /// Copy-on-write (when `cow`) then the row writes, into `blocks` (the sequence's list,
    /// extended with `fresh`). Touches the pool only in `fresh` blocks and in rows at or past
    /// `old_len` of an unshared last block, i.e. nowhere another sequence can see.
    fn write_rows(&mut self, blocks: &mut Vec<u32>, fresh: &[u32], cow: bool, old_len: usize, rows: &[u16]) -> Result<()> {
        let (rb, bb) = (row_bytes(self.dtype), block_bytes(self.dtype));
        let mut fresh = fresh.iter().copied();
        if cow {
            let new = fresh.next().unwrap();
            let last = blocks.last_mut().unwrap();
            let used = old_len % BLOCK_SIZE;
            self.pool.copy_within(*last as usize * bb, new as usize * bb, used * rb)?;
            *last = new;
        }
        blocks.extend(fresh);

        // One write per run of rows that is contiguous in the pool (a block's rows, merged
        // with the next block's when the two are physically adjacent).
        let src = as_bytes(rows);
        let mut run: Option<(usize, usize, usize)> = None; // (pool offset, src offset, len)
        let mut pos = old_len;
        let mut done = 0;
        while done < src.len() {
            let (blk, row) = (blocks[pos / BLOCK_SIZE] as usize, pos % BLOCK_SIZE);
            let take = (BLOCK_SIZE - row).min((src.len() - done) / rb);
            let dst = blk * bb + row * rb;
            run = match run {
                Some((d, s, l)) if d + l == dst => Some((d, s, l + take * rb)),
                Some((d, s, l)) => {
                    self.pool.write_bytes(d, &src[s..s + l])?;
                    Some((dst, done, take * rb))
                }
                None => Some((dst, done, take * rb)),
            };
            pos += take;
            done += take * rb;
        }
        if let Some((d, s, l)) = run {
            self.pool.write_bytes(d, &src[s..s + l])?;
        }
        Ok(())
    }

    /// Appends rows given as f32, rounded to the cache dtype (round to nearest even).
    pub fn append_f32(&mut self, seq: SeqId, rows: &[f32]) -> Result<()> {
        check_whole_rows(rows.len())?;
        if !self.seqs.contains_key(&seq) {
            return Err(unknown(seq));
        }
        self.append(seq, &f32_slice_to_half(rows, self.dtype))
    }

    /// Tokens in the sequence.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.state(seq)?.len)
    }

    /// The sequence's blocks in token order (token t is at row t % 64 of block t / 64).
    pub fn block_ids(&self, seq: SeqId) -> Result<Vec<i32>> {
        Ok(self.state(seq)?.blocks.iter().map(|&b| b as i32).collect())
    }

    /// A new sequence with the same contents, sharing every block (no copy, no new block).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let state = self.state(seq)?.clone();
        for &b in &state.blocks {
            self.refcount[b as usize] += 1;
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, state);
        Ok(id)
    }

    /// Drops the sequence; blocks no other sequence shares go back to the free list.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        let state = self.seqs.remove(&seq).ok_or_else(|| unknown(seq))?;
        // Reversed so that the next allocations pop them in their old order.
        for &b in state.blocks.iter().rev() {
            let rc = &mut self.refcount[b as usize];
            *rc -= 1;
            if *rc == 0 {
                self.free.push(b);
            }
        }
        Ok(())
    }

    /// Live sequences, in creation order.
    pub fn sequences(&self) -> Vec<SeqId> {
        let mut v: Vec<SeqId> = self.seqs.keys().copied().collect();
        v.sort_by_key(|s| s.0);
        v
    }

    /// `block_table` `[seqs.len(), max_blocks_per_seq]` int32 and `cache_seqlens`
    /// `[seqs.len()]` int32 on the cache's device, ready for `plan` and `decode`.
    ///
    /// `max_blocks_per_seq`: `None` takes the most blocks any given sequence holds (at
    /// least 1); a given value must be at least that and at least 1 (`ERR_INVALID_ARGUMENT`).
    /// Entries past a sequence's blocks hold [`BLOCK_TABLE_PAD`]. A sequence may appear
    /// more than once.
    pub fn batch(&self, seqs: &[SeqId], max_blocks_per_seq: Option<usize>) -> Result<(Tensor, Tensor)> {
        let states = seqs.iter().map(|&s| self.state(s)).collect::<Result<Vec<_>>>()?;
        let need = states.iter().map(|s| s.blocks.len()).max().unwrap_or(0).max(1);
        let width = match max_blocks_per_seq {
            None => need,
            Some(m) if m >= need => m,
            Some(m) => {
                return Err(MlaError::arg(
                    ErrorCode::InvalidArgument,
                    "max_blocks_per_seq",
                    format!("at least {need} (the most blocks a given sequence holds, and at least 1)"),
                    m,
                ))
            }
        };
        let mut table = vec![BLOCK_TABLE_PAD; states.len() * width];
        for (row, s) in table.chunks_mut(width).zip(&states) {
            for (t, &b) in row.iter_mut().zip(&s.blocks) {
                *t = b as i32;
            }
        }
        // Lengths fit in i32: `append` refuses to grow past it.
        let lens: Vec<i32> = states.iter().map(|s| s.len as i32).collect();
        let dev = self.device();
        Ok((Tensor::from_i32(dev, &table, &[states.len(), width])?, Tensor::from_i32(dev, &lens, &[states.len()])?))
    }

    fn state(&self, seq: SeqId) -> Result<&SeqState> {
        self.seqs.get(&seq).ok_or_else(|| unknown(seq))
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("pool", &self.pool)
            .field("free_blocks", &self.free.len())
            .field("sequences", &self.seqs.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, seed: u16) -> Vec<u16> {
        (0..n * HEAD_DIM).map(|i| (i as u16).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn refcounts_balance_after_fork_cow_and_free() {
        let mut c = KvCache::new(&Device::Cpu, KvCacheConfig { num_blocks: 8, dtype: DType::BF16 }).unwrap();
        let a = c.create_sequence();
        c.append(a, &rows(100, 1)).unwrap(); // 2 blocks, last partial
        let f = c.fork(a).unwrap();
        assert_eq!(c.refcount.iter().filter(|&&r| r == 2).count(), 2);
        c.append(f, &rows(1, 2)).unwrap(); // copy-on-write of the last block
        let (shared, own) = (c.seqs[&a].blocks[1], c.seqs[&f].blocks[1]);
        assert_ne!(shared, own);
        assert_eq!((c.refcount[c.seqs[&a].blocks[0] as usize], c.refcount[shared as usize], c.refcount[own as usize]), (2, 1, 1));
        c.append(a, &rows(1, 3)).unwrap(); // now unshared: written in place, no new block
        assert_eq!(c.seqs[&a].blocks[1], shared);
        c.free(a).unwrap();
        c.free(f).unwrap();
        assert!(c.refcount.iter().all(|&r| r == 0));
        assert_eq!(c.free_blocks(), 8);
        let mut sorted = c.free.clone();
        sorted.sort();
        assert_eq!(sorted, (0..8).collect::<Vec<u32>>(), "every block is on the free list exactly once");
    }

    #[test]
    fn lifo_reuses_the_last_freed_blocks_first() {
        let mut c = KvCache::new(&Device::Cpu, KvCacheConfig { num_blocks: 4, dtype: DType::F16 }).unwrap();
        let a = c.create_sequence();
        let b = c.create_sequence();
        c.append(a, &rows(64, 0)).unwrap();
        c.append(b, &rows(64, 0)).unwrap();
        assert_eq!((c.seqs[&a].blocks[0], c.seqs[&b].blocks[0]), (0, 1));
        c.free(a).unwrap();
        let d = c.create_sequence();
        c.append(d, &rows(1, 0)).unwrap();
        assert_eq!(c.seqs[&d].blocks, vec![0]);
    }
}
