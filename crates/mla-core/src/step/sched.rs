//! The scheduler on the host (FlashMLA's `get_mla_metadata`) and the metadata row it
//! writes: pure computation over lengths, used by the CPU backend (which re-plans a stale
//! plan itself) and by `crate::plan` (which makes plans on either device). The GPU's plan
//! kernel (`kernels/common/mla_plan.cu`) computes exactly [`host_plan`] and
//! [`host_plan_invariant`] on the device.
//!
//! Every sequence's blocks are divided among `num_parts` workers (SM parts on the GPU,
//! threads on the CPU) so that each gets about the same cost, where a segment of `n`
//! blocks costs `n + SPLIT_FIXED_COST` (the fixed cost of a split: loading q, writing a
//! partial result, merging it). A sequence cut into several segments is merged by the
//! combine pass. The result depends only on `cache_seqlens` and the part count.
//!
//! Layout (int32): `metadata[num_parts][8]`, one [`SchedMeta`] per part; `num_splits[b + 1]`
//! = exclusive prefix sum of splits per sequence.

use std::mem::{offset_of, size_of};

use crate::consts::{BLOCK_SIZE, SPLIT_FIXED_COST};
use crate::device::Device;
use crate::step::options::InvariantChunks;

/// The split cost the scheduler uses: SPLIT_FIXED_COST, or MLA_SPLIT_FIXED_COST when set
/// (read once; for tuning experiments).
pub fn split_fixed_cost() -> usize {
    static COST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COST.get_or_init(|| std::env::var("MLA_SPLIT_FIXED_COST").ok().and_then(|v| v.parse().ok()).unwrap_or(SPLIT_FIXED_COST))
}

/// Ints per part in the scheduling metadata: `size_of::<SchedMeta>() / 4`.
pub const META_INTS: usize = 8;

/// One part's row of the scheduling metadata (`[num_parts, 8]` int32, FlashMLA's
/// `DecodingSchedMeta`): the part covers sequences `begin_seq ..= end_seq`, from block
/// `begin_block` of the first to block `end_block` (exclusive) of the last. Mirrored field
/// for field by `MlaSchedMeta` in `kernels/common/mla_params.cuh` (static_asserts there,
/// const asserts here), read by the CPU backend, the decode kernels (`for_each_segment`) and
/// the plan kernel; the Node binding exports the layout ([`SchedMeta::FIELDS`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedMeta {
    /// The part's first sequence.
    pub begin_seq: i32,
    /// Its first block within `begin_seq`.
    pub begin_block: i32,
    /// The sequence it ends in (`b` when it ends after the last one).
    pub end_seq: i32,
    /// Its end within `end_seq`, exclusive.
    pub end_block: i32,
    /// The split index within `begin_seq` of the part's first segment (default plan; in a
    /// batch-invariant plan the chunk index).
    pub begin_split: i32,
    /// Zero.
    pub reserved: [i32; 3],
}

const _: () = {
    assert!(size_of::<SchedMeta>() == META_INTS * 4);
    assert!(offset_of!(SchedMeta, begin_seq) == 0);
    assert!(offset_of!(SchedMeta, begin_block) == 4);
    assert!(offset_of!(SchedMeta, end_seq) == 8);
    assert!(offset_of!(SchedMeta, end_block) == 12);
    assert!(offset_of!(SchedMeta, begin_split) == 16);
    assert!(offset_of!(SchedMeta, reserved) == 20);
};

impl SchedMeta {
    /// The named fields and their byte offsets in a row (what the TS test helper reads).
    pub const FIELDS: [(&'static str, usize); 5] = [
        ("begin_seq", offset_of!(SchedMeta, begin_seq)),
        ("begin_block", offset_of!(SchedMeta, begin_block)),
        ("end_seq", offset_of!(SchedMeta, end_seq)),
        ("end_block", offset_of!(SchedMeta, end_block)),
        ("begin_split", offset_of!(SchedMeta, begin_split)),
    ];

    /// Row `p` of `metadata` (`[num_parts, 8]` int32).
    pub fn read(metadata: &[i32], p: usize) -> SchedMeta {
        let m = &metadata[p * META_INTS..(p + 1) * META_INTS];
        SchedMeta { begin_seq: m[0], begin_block: m[1], end_seq: m[2], end_block: m[3], begin_split: m[4], reserved: [m[5], m[6], m[7]] }
    }

    /// Writes this row as row `p` of `metadata`.
    pub fn write(&self, metadata: &mut [i32], p: usize) {
        let r = self.reserved;
        metadata[p * META_INTS..(p + 1) * META_INTS].copy_from_slice(&[
            self.begin_seq,
            self.begin_block,
            self.end_seq,
            self.end_block,
            self.begin_split,
            r[0],
            r[1],
            r[2],
        ]);
    }

    /// The named fields, in row order.
    pub fn named(&self) -> [i32; 5] {
        [self.begin_seq, self.begin_block, self.end_seq, self.end_block, self.begin_split]
    }
}

/// Query rows one GPU thread block handles (the part count of a CUDA plan divides the
/// multiprocessors by the row tiles).
pub const GPU_ROW_TILE: usize = 64;

/// Partial slots a plan needs for any lengths: the default plan makes at most one split
/// more per part than sequences; an invariant one at most max_chunks per sequence.
pub fn slots_for(b: usize, num_parts: usize, chunks: Option<InvariantChunks>) -> usize {
    match chunks {
        None => b + num_parts,
        Some(c) => b * c.max_chunks,
    }
}

/// How many parts the device splits the work into.
pub fn num_parts_for(device: &Device, rows: usize) -> usize {
    match device {
        Device::Cpu => rayon::current_num_threads().max(1),
        Device::Cuda(g) => (g.info().multiprocessors / rows.div_ceil(GPU_ROW_TILE).max(1)).max(1),
    }
}

/// The scheduler, on the host. Returns (metadata, num_splits). Lengths outside
/// [0, max_seqlen] must have been rejected before.
pub fn host_plan(seqlens: &[i32], num_parts: usize) -> (Vec<i32>, Vec<i32>) {
    let b = seqlens.len();
    let fixed = split_fixed_cost() as i64;
    let nb: Vec<i64> = seqlens.iter().map(|&l| (l.max(0) as i64 + BLOCK_SIZE as i64 - 1) / BLOCK_SIZE as i64).collect();
    let total: i64 = nb.iter().map(|&n| if n > 0 { n + fixed } else { 0 }).sum();
    // Each part wastes at most `fixed` units at its end, so this covers all the work.
    let payload = ((total + num_parts as i64 - 1) / num_parts as i64).max(1) + fixed;
    let mut meta = vec![0i32; num_parts * META_INTS];
    let mut num_splits = vec![0i32; b + 1];
    let (mut seq, mut blk, mut splits_in_seq) = (0usize, 0i64, 0i32);
    for p in 0..num_parts {
        let mut m = SchedMeta { begin_seq: seq as i32, begin_block: blk as i32, begin_split: splits_in_seq, ..SchedMeta::default() };
        let mut remain = payload;
        while seq < b {
            let left = nb[seq] - blk;
            if left > 0 {
                if remain <= fixed {
                    break;
                }
                let take = left.min(remain - fixed);
                remain -= take + fixed;
                blk += take;
                splits_in_seq += 1;
                if blk < nb[seq] {
                    break; // this part is full in the middle of the sequence
                }
            }
            num_splits[seq + 1] = num_splits[seq] + splits_in_seq;
            seq += 1;
            blk = 0;
            splits_in_seq = 0;
        }
        m.end_seq = seq as i32;
        m.end_block = blk as i32;
        m.write(&mut meta, p);
    }
    debug_assert_eq!(seq, b, "the plan must cover every sequence");
    (meta, num_splits)
}

/// [`host_plan`] or, with a chunk rule, [`host_plan_invariant`].
pub fn host_plan_for(seqlens: &[i32], num_parts: usize, chunks: Option<InvariantChunks>) -> (Vec<i32>, Vec<i32>) {
    match chunks {
        None => host_plan(seqlens, num_parts),
        Some(c) => host_plan_invariant(seqlens, num_parts, c),
    }
}

/// A sequence's blocks, chunks and cost (blocks + chunks * fixed) in an invariant plan.
fn seq_chunks(len: i32, c: InvariantChunks, fixed: i64) -> (i64, i64, i64) {
    let nb = (len.max(0) as i64 + BLOCK_SIZE as i64 - 1) / BLOCK_SIZE as i64;
    let n = c.chunks(nb as usize) as i64;
    (nb, n, nb + n * fixed)
}

/// The greedy walk of an invariant plan with part cost cap `cap`: each part takes whole
/// chunks, in order, while their cost (blocks + fixed each) stays within `cap`. Returns
/// whether `num_parts` parts cover every chunk. With `meta`, writes every part's row and
/// makes the last part take whatever is left (so the plan always covers the batch).
/// `mla_plan.cu` walks exactly the same way.
fn invariant_walk(nb: &[i64], n: &[i64], num_parts: usize, cap: i64, fixed: i64, mut meta: Option<&mut [i32]>) -> bool {
    let b = nb.len();
    let cost = |s: usize| nb[s] + n[s] * fixed;
    // Cost of the chunks of s before chunk k.
    let before = |s: usize, k: i64| if k == 0 { 0 } else { k * nb[s] / n[s] + k * fixed };
    let start_blk = |s: usize, k: i64| if s < b { (k * nb[s] / n[s].max(1)) as i32 } else { 0 };
    let (mut s, mut k, mut q) = (0usize, 0i64, 0i64); // position: chunk k of s; q = cost before s
    for p in 0..num_parts {
        let (bs, bk) = (s, k);
        if meta.is_some() && p + 1 == num_parts {
            (s, k) = (b, 0);
        } else if s < b {
            let lim = q + before(s, k) + cap;
            while s < b && q + cost(s) <= lim {
                q += cost(s);
                s += 1;
                k = 0;
            }
            if s < b {
                // The last chunk boundary within lim: k0 or k0 + 1 (before(k) <= k * unit / n).
                let (r, unit) = (lim - q, nb[s] + n[s] * fixed);
                k = (r * n[s] / unit).min(n[s] - 1);
                if k + 1 < n[s] && before(s, k + 1) <= r {
                    k += 1;
                }
            }
        }
        if let Some(m) = meta.as_deref_mut() {
            let row = SchedMeta {
                begin_seq: bs as i32,
                begin_block: start_blk(bs, bk),
                end_seq: s as i32,
                end_block: start_blk(s, k),
                begin_split: bk as i32,
                reserved: [0; 3],
            };
            row.write(m, p);
        }
    }
    s == b
}

/// The batch-invariant scheduler, on the host (see the module docs): every sequence is cut
/// into the chunks `c` gives its own length, each chunk is a split, and the parts are the
/// contiguous runs of whole chunks that minimise the largest part cost (the smallest cap
/// for which [`invariant_walk`] covers the batch, found by bisection; the device finds the
/// same cap by a parallel search). Returns (metadata, num_splits) in [`host_plan`]'s
/// layout; `num_splits` depends on each sequence's own length only.
pub fn host_plan_invariant(seqlens: &[i32], num_parts: usize, c: InvariantChunks) -> (Vec<i32>, Vec<i32>) {
    let fixed = split_fixed_cost() as i64;
    let b = seqlens.len();
    let (mut nb, mut n) = (Vec::with_capacity(b), Vec::with_capacity(b));
    let mut num_splits = vec![0i32; b + 1];
    let (mut total, mut max_cost) = (0i64, 0i64);
    for (i, &l) in seqlens.iter().enumerate() {
        let (blocks, chunks, cost) = seq_chunks(l, c, fixed);
        nb.push(blocks);
        n.push(chunks);
        num_splits[i + 1] = num_splits[i] + chunks as i32;
        total += cost;
        if chunks > 0 {
            max_cost = max_cost.max((blocks + chunks - 1) / chunks + fixed);
        }
    }
    let mut cap = 1;
    if total > 0 {
        let avg = (total + num_parts as i64 - 1) / num_parts as i64;
        // avg + max_cost always covers: a part that stops early holds more than avg.
        let (mut lo, mut hi) = (avg.max(max_cost), avg + max_cost);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if invariant_walk(&nb, &n, num_parts, mid, fixed, None) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        cap = lo;
    }
    let mut meta = vec![0i32; num_parts * META_INTS];
    invariant_walk(&nb, &n, num_parts, cap, fixed, Some(&mut meta));
    (meta, num_splits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::options::{INVARIANT_CHUNK_BLOCKS, INVARIANT_MAX_CHUNKS};

    fn covered(seqlens: &[i32], parts: usize) {
        let (meta, splits) = host_plan(seqlens, parts);
        let mut seen = vec![0i64; seqlens.len()];
        let mut seg_count = vec![0i32; seqlens.len()];
        for p in 0..parts {
            let m = &meta[p * META_INTS..];
            let (bs, bb, es, eb) = (m[0] as usize, m[1] as i64, m[2] as usize, m[3] as i64);
            for s in bs..=es.min(seqlens.len() - 1) {
                let nb = (seqlens[s] as i64 + 63) / 64;
                let lo = if s == bs { bb } else { 0 };
                let hi = if s == es { eb } else { nb };
                if hi > lo {
                    let local = if s == bs { m[4] } else { 0 };
                    assert_eq!(local, seg_count[s], "split index of seq {s} in part {p}");
                    seg_count[s] += 1;
                    seen[s] += hi - lo;
                }
            }
        }
        for (s, &l) in seqlens.iter().enumerate() {
            assert_eq!(seen[s], (l as i64 + 63) / 64, "blocks of seq {s}");
            assert_eq!(splits[s + 1] - splits[s], seg_count[s], "num_splits of seq {s}");
        }
    }

    #[test]
    fn every_block_is_assigned_once() {
        covered(&[4096; 128], 132);
        covered(&[1, 63, 64, 65, 140, 0, 0, 4096], 132);
        covered(&[4641, 45118, 1730, 1696], 132);
        covered(&[0, 0, 0], 7);
        covered(&[100, 0, 3000, 1, 0], 2);
        covered(&[70000], 1);
        for parts in [1, 2, 3, 16, 33, 66, 132] {
            covered(&[4096, 0, 8192, 64, 65, 1, 16384, 5000], parts);
        }
    }

    /// The chunks of each sequence that `meta` gives each part, checked against the rule:
    /// every chunk in exactly one part, whole. Returns the parts' costs.
    fn covered_invariant(seqlens: &[i32], parts: usize, c: InvariantChunks) -> Vec<i64> {
        let (meta, splits) = host_plan_invariant(seqlens, parts, c);
        let fixed = split_fixed_cost() as i64;
        let b = seqlens.len();
        let mut owner: Vec<Vec<Option<usize>>> = Vec::new();
        for (s, &l) in seqlens.iter().enumerate() {
            let nb = (l as usize).div_ceil(64);
            let n = c.chunks(nb);
            assert_eq!(splits[s + 1] - splits[s], n as i32, "num_splits of seq {s} (nb {nb})");
            owner.push(vec![None; n]);
        }
        let mut costs = vec![0i64; parts];
        for p in 0..parts {
            let m = &meta[p * META_INTS..(p + 1) * META_INTS];
            assert_eq!(&m[5..], &[0, 0, 0]);
            let (bs, bb, es, eb) = (m[0] as usize, m[1] as usize, m[2] as usize, m[3] as usize);
            assert!(bs <= es && es <= b, "part {p}: {m:?}");
            for s in bs..es.min(b.saturating_sub(1)) + 1 {
                if s >= b {
                    break;
                }
                let nb = (seqlens[s] as usize).div_ceil(64);
                let n = c.chunks(nb);
                let lo = if s == bs { bb } else { 0 };
                let hi = if s == es { eb } else { nb };
                if hi <= lo {
                    continue;
                }
                let k0 = InvariantChunks::chunk_of_block(lo, nb, n);
                assert_eq!(InvariantChunks::chunk_start(k0, nb, n), lo, "part {p} starts inside a chunk of seq {s}");
                if s == bs {
                    assert_eq!(m[4] as usize, k0, "split index of part {p}");
                }
                let k1 = InvariantChunks::chunk_of_block(hi - 1, nb, n);
                assert_eq!(InvariantChunks::chunk_start(k1 + 1, nb, n), hi, "part {p} ends inside a chunk of seq {s}");
                for k in k0..=k1 {
                    assert_eq!(owner[s][k], None, "chunk {k} of seq {s} in two parts");
                    owner[s][k] = Some(p);
                    costs[p] += (InvariantChunks::chunk_start(k + 1, nb, n) - InvariantChunks::chunk_start(k, nb, n)) as i64 + fixed;
                }
            }
        }
        for (s, o) in owner.iter().enumerate() {
            assert!(o.iter().all(|x| x.is_some()), "seq {s}: chunks without a part: {o:?}");
            assert!(o.windows(2).all(|w| w[0] <= w[1]), "seq {s}: parts out of order");
        }
        costs
    }

    /// The smallest possible largest part cost over contiguous runs of whole chunks
    /// (dynamic programming over chunk prefixes), for small batches.
    fn optimal_cap(seqlens: &[i32], parts: usize, c: InvariantChunks) -> i64 {
        let fixed = split_fixed_cost() as i64;
        let mut costs = Vec::new();
        for &l in seqlens {
            let nb = (l as usize).div_ceil(64);
            let n = c.chunks(nb);
            for k in 0..n {
                costs.push((InvariantChunks::chunk_start(k + 1, nb, n) - InvariantChunks::chunk_start(k, nb, n)) as i64 + fixed);
            }
        }
        let m = costs.len();
        let mut best = vec![vec![i64::MAX; m + 1]; parts + 1]; // best[p][i]: first i chunks in p parts
        best[0][0] = 0;
        for p in 1..=parts {
            for i in 0..=m {
                let mut run = 0;
                for j in (0..=i).rev() {
                    if j < i {
                        run += costs[j];
                    }
                    if best[p - 1][j] != i64::MAX {
                        best[p][i] = best[p][i].min(best[p - 1][j].max(run));
                    }
                }
            }
        }
        best[parts][m]
    }

    #[test]
    fn invariant_plans_cover_whole_chunks() {
        let std = InvariantChunks::standard();
        covered_invariant(&[4096; 128], 132, std);
        covered_invariant(&[1, 63, 64, 65, 140, 0, 0, 4096], 132, std);
        covered_invariant(&[0, 0, 0], 7, std);
        covered_invariant(&[70000, 0, 1], 1, std);
        covered_invariant(&[2_000_000_000], 5, std);
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = |n: u64| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for _ in 0..300 {
            let c = InvariantChunks { chunk_blocks: 1 + next(40) as usize, max_chunks: 1 + next(12) as usize };
            let b = 1 + next(60) as usize;
            let lens: Vec<i32> = (0..b).map(|_| if next(5) == 0 { 0 } else { next(30000) as i32 }).collect();
            let parts = 1 + next(140) as usize;
            covered_invariant(&lens, parts, c);
        }
    }

    #[test]
    fn invariant_plans_minimise_the_largest_part() {
        let mut x = 0x0ddc_0ffe_e15e_a5e5u64;
        let mut next = |n: u64| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for _ in 0..200 {
            let c = InvariantChunks { chunk_blocks: 1 + next(8) as usize, max_chunks: 1 + next(6) as usize };
            let b = 1 + next(8) as usize;
            let lens: Vec<i32> = (0..b).map(|_| if next(6) == 0 { 0 } else { next(1500) as i32 }).collect();
            let parts = 1 + next(9) as usize;
            let costs = covered_invariant(&lens, parts, c);
            let got = costs.iter().copied().max().unwrap();
            assert_eq!(got, optimal_cap(&lens, parts, c), "lens={lens:?} parts={parts} {c:?}: part costs {costs:?}");
        }
    }

    #[test]
    fn invariant_splits_depend_on_the_own_length_only() {
        // The chunks (split points) a sequence gets are the same alone and in any batch.
        let c = InvariantChunks::standard();
        for len in [1, 64, 4096, 4097, 7000, 32768, 32769, 100_000] {
            let alone = host_plan_invariant(&[len], 132, c).1;
            for batch in [vec![len, 5, 90000], vec![0, 3000, len], vec![len; 40]] {
                let pos = batch.iter().position(|&l| l == len).unwrap();
                let (_, splits) = host_plan_invariant(&batch, 7, c);
                assert_eq!(splits[pos + 1] - splits[pos], alone[1], "len {len} in {batch:?}");
            }
        }
        assert_eq!(c.chunks(1), 1);
        assert_eq!(c.chunks(INVARIANT_CHUNK_BLOCKS), 1);
        assert_eq!(c.chunks(INVARIANT_CHUNK_BLOCKS + 1), 2);
        assert_eq!(c.chunks(INVARIANT_CHUNK_BLOCKS * INVARIANT_MAX_CHUNKS), INVARIANT_MAX_CHUNKS);
        assert_eq!(c.chunks(100_000), INVARIANT_MAX_CHUNKS);
        assert_eq!((0..=4).map(|k| InvariantChunks::chunk_start(k, 110, 4)).collect::<Vec<_>>(), [0, 27, 55, 82, 110]);
    }

    #[test]
    fn short_sequences_are_not_split() {
        let (_, splits) = host_plan(&[64; 128], 132);
        for s in 0..128 {
            assert_eq!(splits[s + 1] - splits[s], 1);
        }
    }
}
