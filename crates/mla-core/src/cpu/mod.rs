//! The CPU backend: the whole decode contract on host memory, multi-threaded with rayon,
//! following the same split-KV plan as the GPU (parts, partial results, combine).
//!
//! 1. The plan's metadata is turned into segments (sequence, block range, split slot), one
//!    list per part. A sequence with one split gets its output chunk handed to the part
//!    that computes it (written directly); the segments of a split sequence write a
//!    normalised partial output and a partial lse into their own workspace slot. With a
//!    batch-invariant plan every chunk of a sequence is its own segment and slot, also
//!    where one part holds several chunks (as the GPU's `for_each_segment` cuts them).
//! 2. Parts run in parallel (rayon); each owns disjoint mutable chunks, so no locking.
//! 3. A combine pass, parallel over sequences, merges the partials of split sequences and
//!    writes out = 0, lse = +inf for sequences of length 0.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod kernel;

use rayon::prelude::*;

use crate::consts::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};
use crate::dtype::{f32_to_half_bits, DType};
use crate::error::Result;
use crate::step::options::{DecodeOptions, InvariantChunks};
use crate::step::sched::{host_plan_for, SchedMeta, META_INTS};
use crate::step::shape::{DecodeInputs, DecodeShape};
use crate::tensor::Tensor;

use kernel::{Scratch, SegmentInput};

/// Everything one CPU decode step reads. Slices are the tensors' host elements
/// (bf16 / fp16 as raw bits).
pub struct CpuDecodeArgs<'a> {
    pub shape: DecodeShape,
    pub q: &'a [u16],
    pub kv: &'a [u16],
    pub block_table: &'a [i32],
    pub seqlens: &'a [i32],
    pub metadata: &'a [i32],
    pub num_splits: &'a [i32],
    pub num_parts: usize,
    /// The chunk rule of a batch-invariant plan (None: the default plan).
    pub chunks: Option<InvariantChunks>,
    pub causal: bool,
    pub scale: f32,
}

/// Which build of the inner loops runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Baseline instructions only (auto-vectorised, no FMA).
    Portable,
    /// x86-64 AVX2 + FMA.
    Avx2Fma,
}

impl Isa {
    /// The best build this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::Avx2::new().is_some() {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    }

    /// Whether this CPU can run `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2Fma => Isa::detect() == Isa::Avx2Fma,
        }
    }
}

/// The CPU backend's decode step over checked host tensors (what `decode` calls; the CUDA
/// backend's counterpart is `gpu::ops::decode_into`).
pub fn decode_into(s: &DecodeShape, inp: &DecodeInputs, opts: &DecodeOptions, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    let DecodeInputs { q, kv, block_table, seqlens, plan } = *inp;
    let args = CpuDecodeArgs {
        shape: *s,
        q: q.host().unwrap().as_u16(),
        kv: kv.host().unwrap().as_u16(),
        block_table: block_table.host().unwrap().as_i32(),
        seqlens: seqlens.host().unwrap().as_i32(),
        metadata: plan.metadata.host().unwrap().as_i32(),
        num_splits: plan.num_splits.host().unwrap().as_i32(),
        num_parts: plan.num_parts,
        chunks: plan.chunks,
        causal: opts.causal,
        scale: opts.scale(),
    };
    decode(&args, out.host_mut().unwrap().as_u16_mut(), lse.host_mut().unwrap().as_f32_mut());
    Ok(())
}

/// Writes out [b, s_q, h_q, 512] (q's dtype, as bits) and lse [b, h_q, s_q].
/// Inputs were validated (lengths and read block indices are in range).
pub fn decode(args: &CpuDecodeArgs, out: &mut [u16], lse: &mut [f32]) {
    decode_with_isa(args, out, lse, Isa::detect())
}

/// [`decode`] with a chosen build of the inner loops (tests compare them). An `isa` this
/// CPU lacks falls back to [`Isa::Portable`].
pub fn decode_with_isa(args: &CpuDecodeArgs, out: &mut [u16], lse: &mut [f32], isa: Isa) {
    let isa = if isa.supported() { isa } else { Isa::Portable };
    let s = &args.shape;
    let (b, rows) = (s.b, s.rows());
    assert_eq!(s.h_kv, 1, "the CPU backend handles h_kv = 1");
    assert!(s.dtype.is_half(), "q must be bf16 or fp16");
    assert_eq!(args.q.len(), b * rows * HEAD_DIM, "q length");
    assert_eq!(args.kv.len(), s.num_blocks * BLOCK_SIZE * HEAD_DIM, "kv_cache length");
    assert_eq!(args.block_table.len(), b * s.max_blocks_per_seq, "block_table length");
    assert_eq!(args.seqlens.len(), b, "cache_seqlens length");
    assert_eq!(out.len(), b * rows * HEAD_DIM_V, "out length");
    assert_eq!(lse.len(), b * rows, "lse length");
    if b == 0 {
        return;
    }
    // Lengths and the indices that will be read must be in range (checked by validate);
    // a violation here is a caller bug, so stop before reading out of bounds.
    for (i, &l) in args.seqlens.iter().enumerate() {
        assert!(l >= 0 && l as usize <= s.max_blocks_per_seq * BLOCK_SIZE, "cache_seqlens[{i}] = {l} out of range");
        let row = &args.block_table[i * s.max_blocks_per_seq..][..nblocks(l)];
        assert!(row.iter().all(|&x| x >= 0 && (x as usize) < s.num_blocks), "block_table[{i}] holds an index out of range");
    }

    // A plan computed from other lengths (not re-planned) would leave blocks out or read
    // past a sequence: use a fresh plan for these lengths instead.
    let fresh;
    let chunks = args.chunks;
    let (metadata, num_splits, num_parts) = if plan_matches(args.seqlens, args.metadata, args.num_splits, args.num_parts, chunks) {
        (args.metadata, args.num_splits, args.num_parts)
    } else {
        let parts = args.num_parts.max(1);
        fresh = host_plan_for(args.seqlens, parts, chunks);
        (&fresh.0[..], &fresh.1[..], parts)
    };
    let segs = segments(args.seqlens, metadata, num_parts, chunks);
    let splits = |i: usize| (num_splits[i + 1] - num_splits[i]) as usize;

    // Workspace slots (normalised partial output [rows, 512] and lse [rows]) for the
    // segments of split sequences only, numbered compactly.
    let mut ws_base = vec![usize::MAX; b];
    let mut ws_slots = 0usize;
    for (i, base) in ws_base.iter_mut().enumerate() {
        if splits(i) > 1 {
            *base = ws_slots;
            ws_slots += splits(i);
        }
    }
    let mut ws_o = vec![0f32; ws_slots * rows * HEAD_DIM_V];
    let mut ws_lse = vec![0f32; ws_slots * rows];

    {
        let mut direct: Vec<Option<(&mut [u16], &mut [f32])>> =
            out.chunks_mut(rows * HEAD_DIM_V).zip(lse.chunks_mut(rows)).map(|(o, l)| Some((o, l))).collect();
        let mut partial: Vec<Option<(&mut [f32], &mut [f32])>> =
            ws_o.chunks_mut(rows * HEAD_DIM_V).zip(ws_lse.chunks_mut(rows)).map(|(o, l)| Some((o, l))).collect();
        let mut work: Vec<Vec<(Segment, Dest)>> = Vec::with_capacity(num_parts);
        for part in segs {
            let mut w = Vec::with_capacity(part.len());
            for seg in part {
                let dest = if splits(seg.seq) == 1 {
                    let (o, l) = direct[seg.seq].take().expect("one segment per unsplit sequence");
                    Dest::Direct { out: o, lse: l }
                } else {
                    let (o, l) = partial[ws_base[seg.seq] + seg.split].take().expect("one segment per split slot");
                    Dest::Partial { o, lse: l }
                };
                w.push((seg, dest));
            }
            work.push(w);
        }
        work.into_par_iter().for_each(|part| {
            let mut sc = Scratch::default();
            for (seg, dest) in part {
                run_one(args, &seg, &mut sc, isa);
                finish(args, &sc, dest);
            }
        });
    }

    // Combine split sequences; sequences of length 0 get out = 0, lse = +inf.
    let (ws_o, ws_lse) = (&ws_o, &ws_lse);
    let dtype = s.dtype;
    let (s_q, h_q) = (s.s_q, s.h_q);
    out.par_chunks_mut(rows * HEAD_DIM_V).zip(lse.par_chunks_mut(rows)).enumerate().for_each(|(i, (o, l))| {
        let k = splits(i);
        if k == 0 {
            o.fill(f32_to_half_bits(0.0, dtype));
            l.fill(f32::INFINITY);
        } else if k > 1 {
            let base = ws_base[i];
            let mut acc = vec![0f32; HEAD_DIM_V];
            let mut w = vec![0f32; k];
            for r in 0..rows {
                let lses = (0..k).map(|x| ws_lse[(base + x) * rows + r]);
                let m = lses.clone().fold(f32::NEG_INFINITY, f32::max);
                let dst = &mut o[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V];
                let li = lse_index(r, s_q, h_q);
                if m == f32::NEG_INFINITY {
                    dst.fill(f32_to_half_bits(0.0, dtype));
                    l[li] = f32::INFINITY;
                    continue;
                }
                for (wx, lx) in w.iter_mut().zip(lses) {
                    *wx = (lx - m).exp();
                }
                let sum: f32 = w.iter().sum();
                acc.fill(0.0);
                for (x, &wx) in w.iter().enumerate() {
                    if wx == 0.0 {
                        continue;
                    }
                    let src = &ws_o[((base + x) * rows + r) * HEAD_DIM_V..][..HEAD_DIM_V];
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a += wx * v;
                    }
                }
                let inv = 1.0 / sum;
                for (d, &a) in dst.iter_mut().zip(&acc) {
                    *d = f32_to_half_bits(a * inv, dtype);
                }
                l[li] = m + sum.ln();
            }
        }
    });
}

fn nblocks(len: i32) -> usize {
    (len.max(0) as usize).div_ceil(BLOCK_SIZE)
}

/// Index in lse [h_q, s_q] of query row r = j * h_q + h.
#[inline]
fn lse_index(r: usize, s_q: usize, h_q: usize) -> usize {
    (r % h_q) * s_q + r / h_q
}

/// One segment: blocks lo..hi of sequence `seq`, split index `split` within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    seq: usize,
    lo: usize,
    hi: usize,
    split: usize,
}

enum Dest<'a> {
    /// The sequence's final out [rows, 512] and lse [h_q, s_q].
    Direct { out: &'a mut [u16], lse: &'a mut [f32] },
    /// A workspace slot: normalised partial output [rows, 512] f32 and lse [rows].
    Partial { o: &'a mut [f32], lse: &'a mut [f32] },
}

/// The segments of each part, as the plan describes them (the same walk as the GPU's):
/// with a chunk rule, a part's range of a sequence is cut at its chunk boundaries, each
/// piece with its chunk's split index.
fn segments(seqlens: &[i32], metadata: &[i32], num_parts: usize, chunks: Option<InvariantChunks>) -> Vec<Vec<Segment>> {
    let b = seqlens.len();
    (0..num_parts)
        .map(|p| {
            let m = SchedMeta::read(metadata, p);
            let (bs, bb, es, eb) = (m.begin_seq as usize, m.begin_block as usize, m.end_seq as usize, m.end_block as usize);
            let mut v = Vec::new();
            if bs >= b {
                return v;
            }
            for (seq, &len) in seqlens.iter().enumerate().take(es.min(b - 1) + 1).skip(bs) {
                let lo = if seq == bs { bb } else { 0 };
                let hi = if seq == es { eb } else { nblocks(len) };
                match chunks {
                    None if hi > lo => {
                        let split = if seq == bs { m.begin_split as usize } else { 0 };
                        v.push(Segment { seq, lo, hi, split });
                    }
                    None => {}
                    Some(c) => {
                        let nb = nblocks(len);
                        let n = c.chunks(nb);
                        let (mut a, hi) = (lo, hi.min(nb));
                        while a < hi {
                            let k = InvariantChunks::chunk_of_block(a, nb, n);
                            let e = hi.min(InvariantChunks::chunk_start(k + 1, nb, n));
                            v.push(Segment { seq, lo: a, hi: e, split: k });
                            a = e;
                        }
                    }
                }
            }
            v
        })
        .collect()
}

/// Whether the plan covers every block of every sequence exactly once, in the number of
/// splits it announces, with each split slot used once (with a chunk rule: each chunk
/// whole in one part, so one segment per chunk).
fn plan_matches(seqlens: &[i32], metadata: &[i32], num_splits: &[i32], num_parts: usize, chunks: Option<InvariantChunks>) -> bool {
    let b = seqlens.len();
    if num_parts == 0 || metadata.len() < num_parts * META_INTS || num_splits.len() != b + 1 || num_splits[0] != 0 {
        return false;
    }
    if num_splits.windows(2).any(|w| w[1] < w[0]) {
        return false;
    }
    for p in 0..num_parts {
        let m = SchedMeta::read(metadata, p);
        if m.named().iter().any(|&x| x < 0) || m.begin_seq > m.end_seq || (m.begin_seq as usize) > b || (m.end_seq as usize) > b {
            return false;
        }
    }
    let mut per_seq: Vec<Vec<Segment>> = vec![Vec::new(); b];
    for part in segments(seqlens, metadata, num_parts, chunks) {
        for seg in part {
            per_seq[seg.seq].push(seg);
        }
    }
    for (i, segs) in per_seq.iter_mut().enumerate() {
        let k = (num_splits[i + 1] - num_splits[i]) as usize;
        if segs.len() != k {
            return false;
        }
        segs.sort_by_key(|s| s.lo);
        let mut next = 0;
        let mut used = vec![false; k];
        for s in segs.iter() {
            if s.lo != next || s.split >= k || used[s.split] {
                return false;
            }
            used[s.split] = true;
            next = s.hi;
        }
        if next != nblocks(seqlens[i]) {
            return false;
        }
    }
    true
}

fn run_one(args: &CpuDecodeArgs, seg: &Segment, sc: &mut Scratch, isa: Isa) {
    let s = &args.shape;
    let rows = s.rows();
    let inp = SegmentInput {
        dtype: s.dtype,
        q: &args.q[seg.seq * rows * HEAD_DIM..(seg.seq + 1) * rows * HEAD_DIM],
        kv: args.kv,
        block_table: &args.block_table[seg.seq * s.max_blocks_per_seq..(seg.seq + 1) * s.max_blocks_per_seq],
        seqlen: args.seqlens[seg.seq] as usize,
        s_q: s.s_q,
        h_q: s.h_q,
        causal: args.causal,
        scale: args.scale,
        lo: seg.lo,
        hi: seg.hi,
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => match avx2::Avx2::new() {
            Some(token) => avx2::run_segment_avx2(token, &inp, sc),
            None => kernel::run_segment_portable(&inp, sc),
        },
        _ => kernel::run_segment_portable(&inp, sc),
    }
}

/// Normalises a finished segment into its destination.
fn finish(args: &CpuDecodeArgs, sc: &Scratch, dest: Dest) {
    let s = &args.shape;
    let rows = s.rows();
    let dtype: DType = s.dtype;
    match dest {
        Dest::Direct { out, lse } => {
            for r in 0..rows {
                let dst = &mut out[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V];
                let li = lse_index(r, s.s_q, s.h_q);
                let l = sc.l[r];
                if l == 0.0 {
                    dst.fill(f32_to_half_bits(0.0, dtype));
                    lse[li] = f32::INFINITY;
                    continue;
                }
                let inv = 1.0 / l;
                for (d, &a) in dst.iter_mut().zip(&sc.acc[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V]) {
                    *d = f32_to_half_bits(a * inv, dtype);
                }
                lse[li] = sc.m[r] + l.ln();
            }
        }
        Dest::Partial { o, lse } => {
            for r in 0..rows {
                let dst = &mut o[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V];
                let l = sc.l[r];
                if l == 0.0 {
                    dst.fill(0.0);
                    lse[r] = f32::NEG_INFINITY;
                    continue;
                }
                let inv = 1.0 / l;
                for (d, &a) in dst.iter_mut().zip(&sc.acc[r * HEAD_DIM_V..(r + 1) * HEAD_DIM_V]) {
                    *d = a * inv;
                }
                lse[r] = sc.m[r] + l.ln();
            }
        }
    }
}
