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
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;

use crate::consts::{BLOCK_SIZE, HEAD_DIM};
use crate::device::{Device, StepId};
use crate::dtype::{f32_slice_to_half, DType};
use crate::error::{ErrorCode, MlaError, Result};
use crate::gpu::{DeviceBuffer, GpuDevice, StagePart};
use crate::tensor::{as_bytes, Tensor};

pub use crate::consts::BLOCK_TABLE_PAD;

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
    /// The batched call that last named this sequence (see `KvCache::reserve_batch`): a
    /// second mention in the same call is a duplicate.
    mark: u64,
}

/// Hashes sequence ids with one multiply (they are small sequential integers handed out
/// by the cache): every batched call looks each of its sequences up, so SipHash's cost
/// per lookup showed at b = 128.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type SeqMap = HashMap<SeqId, SeqState, BuildHasherDefault<IdHasher>>;

/// An append's blocks, taken from the free list but not committed to the sequence yet.
/// The blocks themselves are in the call's `taken` list (the order they were popped in),
/// so a reservation allocates nothing.
struct Reservation {
    seq: SeqId,
    old_len: usize,
    new_len: usize,
    /// The block that holds row `old_len` when that row is inside a partly filled block
    /// (the copy-on-write copy when `cow` is set).
    tail: Option<u32>,
    /// Copy-on-write of a shared partial last block: (shared block, its copy, rows to copy).
    cow: Option<(u32, u32, usize)>,
    /// This reservation's blocks in `taken` (the copy-on-write block first).
    taken: Range<usize>,
}

impl Reservation {
    /// The pool block that row `pos` (`old_len <= pos < new_len`) of the sequence goes to.
    fn block_of(&self, taken: &[u32], pos: usize) -> u32 {
        let (bi, first_whole) = (pos / BLOCK_SIZE, self.old_len.div_ceil(BLOCK_SIZE));
        if bi < first_whole {
            self.tail.expect("a partial last block")
        } else {
            taken[self.taken.start + self.cow.is_some() as usize + (bi - first_whole)]
        }
    }
}

/// Where appended rows come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// Raw bits of the cache's dtype.
    Host(&'a [u16]),
    /// f32 values, rounded to the cache's dtype on the way.
    HostF32(&'a [f32]),
    /// Device address of `[rows, 576]` contiguous rows of the cache's dtype.
    Device(u64),
}

/// A paged latent KV cache. See the module docs for the design.
pub struct KvCache {
    pool: Tensor,
    dtype: DType,
    num_blocks: usize,
    refcount: Vec<u32>,
    /// LIFO: `pop` takes the most recently freed block.
    free: Vec<u32>,
    seqs: SeqMap,
    next_id: u64,
    /// The last batched call's mark (see `SeqState::mark`).
    batch_mark: u64,
    /// CUDA: device scratch for batched appends (destinations and rows), reused in stream
    /// order.
    scratch: Option<DeviceBuffer>,
    /// Host scratch of batched appends, kept between calls (no allocation per call): the
    /// reservations, the blocks they took, the rows' token slots.
    reservations: Vec<Reservation>,
    taken: Vec<u32>,
    slots: Vec<i64>,
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

/// Blocks that appending `n` rows to `seq` (in `state`) takes from the free list, and the
/// shared partial last block it copies first (copy-on-write), if any; checks the length
/// stays within int32. `dropping` counts references that reservations made earlier in the
/// same batch are about to drop (their own copy-on-write of the same block).
fn blocks_needed(seq: SeqId, state: &SeqState, refcount: &[u32], n: usize, dropping: &HashMap<u32, u32>) -> Result<(usize, Option<u32>)> {
    let (old_len, new_len) = (state.len, state.len + n);
    if i32::try_from(new_len).is_err() {
        return Err(MlaError::arg(
            ErrorCode::InvalidArgument,
            "rows",
            format!("a sequence length within int32 (now {old_len} for {seq})"),
            format!("{n} more rows"),
        ));
    }
    // Nothing to write, nothing to copy (a batch of zero rows per sequence only checks).
    let cow = if old_len % BLOCK_SIZE != 0 && n > 0 {
        let last = *state.blocks.last().unwrap();
        (refcount[last as usize] - dropping.get(&last).copied().unwrap_or(0) > 1).then_some(last)
    } else {
        None
    };
    Ok((new_len.div_ceil(BLOCK_SIZE) - old_len.div_ceil(BLOCK_SIZE) + cow.is_some() as usize, cow))
}

/// Takes `needed` blocks (there must be enough) from the free list onto `taken` for
/// appending `n` rows to `seq`; the reservation, uncommitted.
fn take_blocks(free: &mut Vec<u32>, taken: &mut Vec<u32>, seq: SeqId, state: &SeqState, n: usize, needed: usize, cow: Option<u32>) -> Reservation {
    let start = taken.len();
    taken.extend((0..needed).map(|_| free.pop().expect("checked by the caller")));
    let old_len = state.len;
    let partial = !old_len.is_multiple_of(BLOCK_SIZE);
    let cow = cow.map(|old| (old, taken[start], old_len % BLOCK_SIZE));
    let tail = match cow {
        Some((_, new, _)) => Some(new),
        None if partial => state.blocks.last().copied(),
        None => None,
    };
    Reservation { seq, old_len, new_len: old_len + n, tail, cow, taken: start..taken.len() }
}

/// Gives reserved blocks back (nothing references them yet), newest first, so that the
/// free list is as it was.
fn give_back(free: &mut Vec<u32>, taken: &[u32]) {
    free.extend(taken.iter().rev());
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
            seqs: SeqMap::default(),
            next_id: 0,
            batch_mark: 0,
            scratch: None,
            reservations: Vec::new(),
            taken: Vec::new(),
            slots: Vec::new(),
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
        let (needed, cow) = blocks_needed(seq, state, &self.refcount, n, &HashMap::new())?;
        if needed > self.free.len() {
            return Err(MlaError::arg(
                ErrorCode::CacheExhausted,
                "free blocks",
                format!("{needed} to append {n} rows to {seq} (length {})", state.len),
                format!("{} free of {}", self.free.len(), self.num_blocks),
            ));
        }
        // Reserve, then write; commit only when all writes passed.
        let mut taken = Vec::new();
        let r = take_blocks(&mut self.free, &mut taken, seq, state, n, needed, cow);
        if let Err(e) = self.write_rows(&r, &taken, Source::Host(rows)) {
            give_back(&mut self.free, &taken);
            return Err(e);
        }
        self.commit(&r, &taken);
        Ok(())
    }

    /// Makes a reservation the sequence's state.
    fn commit(&mut self, r: &Reservation, taken: &[u32]) {
        for &b in &taken[r.taken.clone()] {
            self.refcount[b as usize] = 1;
        }
        let state = self.seqs.get_mut(&r.seq).unwrap();
        if let Some((old, new, _)) = r.cow {
            // Shared (refcount > 1), so this never frees it.
            self.refcount[old as usize] -= 1;
            *state.blocks.last_mut().unwrap() = new;
        }
        state.blocks.extend_from_slice(&taken[r.taken.start + r.cow.is_some() as usize..r.taken.end]);
        state.len = r.new_len;
    }

    /// Copy-on-write (when reserved) then the row writes of a reservation, from `src` (the
    /// reservation's own rows). Touches the pool only in fresh blocks and in rows at or past
    /// `old_len` of an unshared last block, i.e. nowhere another sequence can see.
    fn write_rows(&mut self, r: &Reservation, taken: &[u32], src: Source<'_>) -> Result<()> {
        let (rb, bb) = (row_bytes(self.dtype), block_bytes(self.dtype));
        if let Some((old, new, used)) = r.cow {
            self.pool.copy_within(old as usize * bb, new as usize * bb, used * rb)?;
        }
        let converted;
        let src: &[u8] = match src {
            Source::Host(bits) => as_bytes(bits),
            Source::HostF32(values) => {
                converted = f32_slice_to_half(values, self.dtype);
                as_bytes(&converted)
            }
            Source::Device(_) => unreachable!("device rows are scattered by the kernel"),
        };
        // One write per run of rows that is contiguous in the pool (a block's rows, merged
        // with the next block's when the two are physically adjacent).
        let mut run: Option<(usize, usize, usize)> = None; // (pool offset, src offset, len)
        let mut pos = r.old_len;
        let mut done = 0;
        while done < src.len() {
            let (blk, row) = (r.block_of(taken, pos) as usize, pos % BLOCK_SIZE);
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

    /// Checks `values` latent values for a batch of `seqs` sequences; returns the rows per
    /// sequence. (The sequences themselves are checked by [`KvCache::reserve_batch`].)
    fn check_batch_rows(seqs: usize, values: usize) -> Result<usize> {
        check_whole_rows(values)?;
        let rows = values / HEAD_DIM;
        if seqs == 0 {
            if rows != 0 {
                return Err(MlaError::arg(ErrorCode::ShapeMismatch, "rows", "no rows for no sequences", format!("{rows} rows")));
            }
            return Ok(0);
        }
        if !rows.is_multiple_of(seqs) {
            return Err(MlaError::arg(
                ErrorCode::ShapeMismatch,
                "rows",
                format!("the same number of rows for each of the {seqs} sequences (a multiple of {seqs} rows)"),
                format!("{rows} rows"),
            ));
        }
        Ok(rows / seqs)
    }

    /// Reserves blocks for appending `n` rows to each of `seqs` (all or nothing) into
    /// `self.reservations` / `self.taken`, as the same appends one after the other would:
    /// once one of several sequences sharing a partial last block has copied it, the next
    /// ones see one reference fewer (the last one left writes it in place).
    ///
    /// One pass, one lookup per sequence. Errors, in this order whatever the positions: an
    /// unknown or repeated sequence (the first), a length past int32 (the first), too few
    /// free blocks (naming all that the batch needs). On an error nothing is reserved.
    fn reserve_batch(&mut self, seqs: &[SeqId], n: usize) -> Result<()> {
        self.reservations.clear();
        self.taken.clear();
        self.batch_mark += 1;
        let mark = self.batch_mark;
        let mut dropping = HashMap::new();
        let (mut needed, mut short, mut too_long) = (0usize, false, None);
        for (i, &s) in seqs.iter().enumerate() {
            let Some(state) = self.seqs.get_mut(&s) else {
                give_back(&mut self.free, &self.taken);
                return Err(MlaError::new(ErrorCode::UnknownSequence, format!("seqs[{i}]: {}", unknown(s).message)));
            };
            if state.mark == mark {
                give_back(&mut self.free, &self.taken);
                return Err(MlaError::arg(ErrorCode::InvalidArgument, &format!("seqs[{i}]"), "distinct sequences", format!("{s} twice")));
            }
            state.mark = mark;
            if too_long.is_some() {
                continue;
            }
            let (k, cow) = match blocks_needed(s, state, &self.refcount, n, &dropping) {
                Ok(x) => x,
                Err(e) => {
                    too_long = Some(e);
                    continue;
                }
            };
            needed += k;
            if let Some(b) = cow {
                *dropping.entry(b).or_default() += 1;
            }
            short |= needed > self.free.len();
            if !short {
                let r = take_blocks(&mut self.free, &mut self.taken, s, state, n, k, cow);
                self.reservations.push(r);
            }
        }
        let err = match (too_long, short) {
            (Some(e), _) => e,
            (None, true) => MlaError::arg(
                ErrorCode::CacheExhausted,
                "free blocks",
                format!("{needed} to append {n} rows to each of {} sequences", seqs.len()),
                format!("{} free of {}", self.free.len() + self.taken.len(), self.num_blocks),
            ),
            (None, false) => return Ok(()),
        };
        give_back(&mut self.free, &self.taken);
        self.reservations.clear();
        self.taken.clear();
        Err(err)
    }

    /// Writes the reserved rows from `src` (`n` per sequence) as one step and commits the
    /// reservations; on an error gives their blocks back.
    fn write_batch(&mut self, n: usize, src: Source<'_>) -> Result<StepId> {
        let rs = std::mem::take(&mut self.reservations);
        let taken = std::mem::take(&mut self.taken);
        let written = match self.pool.device().clone() {
            Device::Cpu => Device::Cpu.step("appendBatch", || {
                let per = n * HEAD_DIM;
                for (i, r) in rs.iter().enumerate() {
                    let part = match src {
                        Source::Host(bits) => Source::Host(&bits[i * per..(i + 1) * per]),
                        Source::HostF32(values) => Source::HostF32(&values[i * per..(i + 1) * per]),
                        Source::Device(_) => unreachable!("a CPU cache takes host rows"),
                    };
                    self.write_rows(r, &taken, part)?;
                }
                Ok(())
            }),
            Device::Cuda(g) => self.scatter(&g, &rs, &taken, src),
        };
        match written {
            Ok(_) => {
                for r in &rs {
                    self.commit(r, &taken);
                }
            }
            Err(_) => give_back(&mut self.free, &taken),
        }
        crate::trace::mark("append:written");
        // The scratch vectors go back for the next call.
        (self.reservations, self.taken) = (rs, taken);
        self.reservations.clear();
        self.taken.clear();
        written.map(|(id, ())| id)
    }

    /// Appends the same number of latent rows to each of several distinct sequences in one
    /// call: `rows` holds `seqs.len() * n * 576` raw bits of the cache dtype, the `n` rows of
    /// `seqs[0]` first. All or nothing across the batch: on `ERR_CACHE_EXHAUSTED` (or any
    /// error) no sequence changed. Returns the step that writes the rows.
    ///
    /// On CUDA this is one host-to-device copy (the rows and their destinations, staged in
    /// pinned memory) and one scatter kernel (`kernels/common/cache/mla_cache_append.cu`), queued
    /// without waiting; work queued before it still sees the old lengths' rows (new rows
    /// land past them, or in copy-on-write blocks). On the CPU backend the rows are written
    /// now. Equals one [`KvCache::append`] per sequence.
    ///
    /// ```
    /// use mla_core::{DType, Device, KvCache, KvCacheConfig};
    /// let mut c = KvCache::new(&Device::cpu(), KvCacheConfig { num_blocks: 8, dtype: DType::BF16 })?;
    /// let (a, b) = (c.create_sequence(), c.create_sequence());
    /// c.append_batch(&[a, b], &vec![0x3f80; 2 * 576])?;   // one token each (1.0 in bf16)
    /// assert_eq!((c.seq_len(a)?, c.seq_len(b)?), (1, 1));
    /// # Ok::<(), mla_core::MlaError>(())
    /// ```
    pub fn append_batch(&mut self, seqs: &[SeqId], rows: &[u16]) -> Result<StepId> {
        let n = Self::check_batch_rows(seqs.len(), rows.len())?;
        self.reserve_batch(seqs, n)?;
        crate::trace::mark("append:reserved");
        self.write_batch(n, Source::Host(rows))
    }

    /// [`KvCache::append_batch`] with f32 rows, rounded to the cache dtype (on CUDA straight
    /// into the pinned staging memory of the one copy: no intermediate buffer).
    pub fn append_batch_f32(&mut self, seqs: &[SeqId], rows: &[f32]) -> Result<StepId> {
        let n = Self::check_batch_rows(seqs.len(), rows.len())?;
        self.reserve_batch(seqs, n)?;
        crate::trace::mark("append:reserved");
        self.write_batch(n, Source::HostF32(rows))
    }

    /// [`KvCache::append_batch`] with the rows in a tensor on the cache's device, e.g. the
    /// model's own output: shape `[seqs.len(), ..., 576]` (the rows of `seqs[0]` first), the
    /// cache's dtype. On CUDA the rows go device to device (a scatter kernel reading the
    /// tensor), with no host round trip; only their destinations are copied from the host.
    pub fn append_batch_from(&mut self, seqs: &[SeqId], rows: &Tensor) -> Result<StepId> {
        if !rows.device().same(self.device()) {
            return Err(MlaError::arg(
                ErrorCode::DeviceMismatch,
                "rows",
                format!("a tensor on {:?} (the cache's device)", self.device()),
                format!("{:?}", rows.device()),
            ));
        }
        if rows.dtype() != self.dtype {
            return Err(MlaError::arg(ErrorCode::DtypeMismatch, "rows", self.dtype, rows.dtype()));
        }
        let sh = rows.shape();
        if sh.len() < 2 || sh[0] != seqs.len() || sh[sh.len() - 1] != HEAD_DIM {
            return Err(MlaError::arg(ErrorCode::ShapeMismatch, "rows", format!("[{}, ..., {HEAD_DIM}]", seqs.len()), format!("{sh:?}")));
        }
        let n = Self::check_batch_rows(seqs.len(), rows.numel())?;
        self.reserve_batch(seqs, n)?;
        crate::trace::mark("append:reserved");
        let src = match rows.host() {
            Some(h) => Source::Host(h.as_u16()),
            None => Source::Device(rows.device_ptr().unwrap()),
        };
        self.write_batch(n, src)
    }

    /// CUDA: the copy-on-write copies, then the rows of every reservation scattered to their
    /// token slots by one kernel, as one step: one staged host-to-device copy of the slots
    /// (and host rows, converted on the way from f32), one launch.
    fn scatter(&mut self, g: &GpuDevice, rs: &[Reservation], taken: &[u32], src: Source<'_>) -> Result<(StepId, ())> {
        let (rb, bb) = (row_bytes(self.dtype), block_bytes(self.dtype));
        let slots = &mut self.slots;
        slots.clear();
        for r in rs {
            for pos in r.old_len..r.new_len {
                slots.push(r.block_of(taken, pos) as i64 * BLOCK_SIZE as i64 + (pos % BLOCK_SIZE) as i64);
            }
        }
        let total = slots.len();
        let slot_bytes = (total * 8).next_multiple_of(16);
        let need = slot_bytes
            + match src {
                Source::Host(h) => h.len() * 2,
                Source::HostF32(v) => v.len() * 2,
                Source::Device(_) => 0,
            };
        if self.scratch.as_ref().is_none_or(|s| s.len() < need) {
            self.scratch = Some(g.alloc_uninit(need.next_power_of_two().max(1 << 16))?);
        }
        let pool = &mut self.pool;
        let scratch = self.scratch.as_mut().unwrap();
        let num_slots = (self.num_blocks * BLOCK_SIZE) as i64;
        let dtype = self.dtype;
        let slots = &self.slots;
        g.step("appendBatch", &g.stream().clone(), || {
            for r in rs {
                if let Some((old, new, used)) = r.cow {
                    pool.copy_within(old as usize * bb, new as usize * bb, used * rb)?;
                }
            }
            if total == 0 {
                return Ok(());
            }
            // One host-to-device copy: the destinations, then (host rows) the rows.
            let pad = [0u8; 16];
            let slot_part = StagePart::Bytes(as_bytes(slots));
            let pad_part = StagePart::Bytes(&pad[..slot_bytes - total * 8]);
            let src_ptr = match src {
                Source::Host(rows) => {
                    scratch.write_staged(0, &[slot_part, pad_part, StagePart::Bytes(as_bytes(rows))])?;
                    scratch.ptr() + slot_bytes as u64
                }
                Source::HostF32(values) => {
                    scratch.write_staged(0, &[slot_part, pad_part, StagePart::Half(values, dtype)])?;
                    scratch.ptr() + slot_bytes as u64
                }
                Source::Device(ptr) => {
                    scratch.write_staged(0, &[slot_part])?;
                    ptr
                }
            };
            crate::trace::mark("append:staged");
            crate::gpu::util::cache_scatter(g, pool.device_ptr().unwrap(), num_slots, src_ptr, rb as i64, scratch.ptr(), total as i64, rb as i32)
        })
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

    /// [`KvCache::batch`] into existing tensors (no allocation): `block_table`
    /// `[seqs.len(), W]` int32 (W at least the most blocks a given sequence holds) and
    /// `cache_seqlens` `[seqs.len()]` int32, on the cache's device. On CUDA two copies are
    /// queued (staged in pinned memory) and this returns at once; work queued earlier that
    /// reads the tensors still sees the old values (stream order). For a serving loop and
    /// for captured steps, whose graphs read fixed addresses.
    pub fn batch_into(&self, seqs: &[SeqId], block_table: &mut Tensor, cache_seqlens: &mut Tensor) -> Result<()> {
        let states = seqs.iter().map(|&s| self.state(s)).collect::<Result<Vec<_>>>()?;
        let need = states.iter().map(|s| s.blocks.len()).max().unwrap_or(0);
        for (name, t) in [("block_table", &*block_table), ("cache_seqlens", &*cache_seqlens)] {
            if !t.device().same(self.device()) {
                return Err(MlaError::arg(
                    ErrorCode::DeviceMismatch,
                    name,
                    format!("a tensor on {:?} (the cache's device)", self.device()),
                    format!("{:?}", t.device()),
                ));
            }
            if t.dtype() != DType::I32 {
                return Err(MlaError::arg(ErrorCode::DtypeMismatch, name, DType::I32, t.dtype()));
            }
        }
        let b = seqs.len();
        let bt = block_table.shape().to_vec();
        if bt.len() != 2 || bt[0] != b || bt[1] < need.max(1) {
            return Err(MlaError::arg(
                ErrorCode::ShapeMismatch,
                "block_table",
                format!("[{b}, W] with W >= {} (the most blocks a given sequence holds, and at least 1)", need.max(1)),
                format!("{bt:?}"),
            ));
        }
        if cache_seqlens.shape() != [b] {
            return Err(MlaError::arg(ErrorCode::ShapeMismatch, "cache_seqlens", format!("[{b}]"), format!("{:?}", cache_seqlens.shape())));
        }
        let width = bt[1];
        let mut table = vec![BLOCK_TABLE_PAD; b * width];
        for (row, s) in table.chunks_mut(width).zip(&states) {
            for (t, &blk) in row.iter_mut().zip(&s.blocks) {
                *t = blk as i32;
            }
        }
        let lens: Vec<i32> = states.iter().map(|s| s.len as i32).collect();
        block_table.write_bytes(0, as_bytes(&table))?;
        cache_seqlens.write_bytes(0, as_bytes(&lens))
    }

    fn state(&self, seq: SeqId) -> Result<&SeqState> {
        self.seqs.get(&seq).ok_or_else(|| unknown(seq))
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache").field("pool", &self.pool).field("free_blocks", &self.free.len()).field("sequences", &self.seqs.len()).finish()
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
