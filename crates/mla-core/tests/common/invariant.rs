//! Batch invariance, written once for any device: `tests/invariant.rs` runs these on the
//! CPU backend, `tests/gpu_invariant.rs` on CUDA (skipped visibly without a GPU).
//!
//! A target sequence (fresh random queries and cache rows) is decoded alone, then beside
//! mates of random lengths, at a random position, with every batch's blocks shuffled into
//! a fresh pool whose unused rows (and the target's rows past its end) hold fresh poison
//! (NaN, +-Inf, huge values). With a batch-invariant plan, the target's out and lse bits
//! must be the same in every batch; outputs are poisoned before each decode.

use mla_core::decode::decode_into;
use mla_core::plan::{plan_with, InvariantChunks, PlanOptions};
use mla_core::{DType, DecodeOptions, Device, Tensor};

use super::{assert_accuracy, encode, inf_bits, nan_bits, Case, Dist, Inputs, Rng, BS, D, DV, GARBAGE};

/// A sequence's own data: queries [s_q, h_q, 576] and its first `len` cache rows.
#[derive(Clone)]
pub struct Seq {
    pub len: usize,
    pub q: Vec<u16>,
    pub rows: Vec<u16>,
}

impl Seq {
    pub fn random(len: usize, s_q: usize, h_q: usize, dtype: DType, dist: Dist, rng: &mut Rng) -> Seq {
        let q = (0..s_q * h_q * D).map(|_| encode(dist.draw(rng), dtype)).collect();
        let rows = (0..len * D).map(|_| encode(dist.draw(rng), dtype)).collect();
        Seq { len, q, rows }
    }
    /// A batchmate: uniform values in [-0.5, 0.5) (cheaper to draw; only the target's
    /// values are checked).
    pub fn mate(len: usize, s_q: usize, h_q: usize, dtype: DType, rng: &mut Rng) -> Seq {
        let mut draw = || encode(rng.uniform() - 0.5, dtype);
        let q = (0..s_q * h_q * D).map(|_| draw()).collect();
        let rows = (0..len * D).map(|_| draw()).collect();
        Seq { len, q, rows }
    }
}

fn poison(dtype: DType, rng: &mut Rng) -> u16 {
    match rng.below(4) {
        0 => nan_bits(dtype),
        1 => inf_bits(dtype, false),
        2 => inf_bits(dtype, true),
        _ => encode(60000.0, dtype),
    }
}

/// The inputs of a batch of `seqs`: blocks shuffled into a pool with spare blocks, rows
/// past each sequence's end and the spare blocks poisoned, table tails garbage.
pub fn batch(seqs: &[&Seq], s_q: usize, h_q: usize, dtype: DType, rng: &mut Rng) -> Inputs {
    let b = seqs.len();
    let used: Vec<usize> = seqs.iter().map(|s| s.len.div_ceil(BS)).collect();
    let max_blocks = used.iter().copied().max().unwrap_or(0) + 1 + rng.below(3);
    let num_blocks = used.iter().sum::<usize>() + 1 + rng.below(4);
    let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
    rng.shuffle(&mut perm);
    // Rows no sequence reads: one poison value per row.
    let mut kv = vec![0u16; num_blocks * BS * D];
    for row in kv.chunks_mut(D) {
        row.fill(poison(dtype, rng));
    }
    let mut table = vec![GARBAGE; b * max_blocks];
    let mut next = 0;
    for (i, s) in seqs.iter().enumerate() {
        for j in 0..used[i] {
            let blk = perm[next] as usize;
            next += 1;
            table[i * max_blocks + j] = blk as i32;
            let n = (s.len - j * BS).min(BS);
            kv[blk * BS * D..][..n * D].copy_from_slice(&s.rows[j * BS * D..][..n * D]);
        }
        for j in used[i]..max_blocks {
            table[i * max_blocks + j] = [GARBAGE, -1, num_blocks as i32 + rng.below(1000) as i32][rng.below(3)];
        }
    }
    let lens: Vec<i32> = seqs.iter().map(|s| s.len as i32).collect();
    Inputs {
        case: Case::new(dtype, h_q, s_q, lens.clone()),
        seed: rng.seed,
        b,
        s_q,
        h_q,
        dtype,
        seqlens: lens,
        q: seqs.iter().flat_map(|s| s.q.iter().copied()).collect(),
        kv,
        num_blocks,
        block_table: table,
        max_blocks,
    }
}

/// Decodes `inp` on `dev` with a batch-invariant plan (`chunks`: None for the standard
/// rule), outputs poisoned first: (out bits, lse bits) of sequence `pos`.
pub fn decode_seq(dev: &Device, inp: &Inputs, pos: usize, causal: bool, chunks: Option<InvariantChunks>, invariant: bool) -> (Vec<u16>, Vec<u32>) {
    let t = inp.tensors(dev);
    let popts = PlanOptions { batch_invariant: invariant, chunks };
    let p = plan_with(&t.seqlens, inp.s_q * inp.h_q, 1, &popts).unwrap();
    assert_eq!(p.batch_invariant(), invariant);
    let mut out = Tensor::zeros(dev, &[inp.b, inp.s_q, inp.h_q, DV], inp.dtype).unwrap();
    let mut lse = Tensor::zeros(dev, &[inp.b, inp.h_q, inp.s_q], DType::F32).unwrap();
    out.fill_bytes(0xFF).unwrap();
    lse.fill_bytes(0xFF).unwrap();
    let opts = DecodeOptions { causal, batch_invariant: invariant, ..Default::default() };
    decode_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts, &mut out, &mut lse).unwrap();
    dev.synchronize().unwrap();
    let rows = inp.s_q * inp.h_q;
    let ob = out.to_bytes().unwrap();
    let lb = lse.to_bytes().unwrap();
    let o = ob[pos * rows * DV * 2..(pos + 1) * rows * DV * 2].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let l = lb[pos * rows * 4..(pos + 1) * rows * 4].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (o, l)
}

/// Elements whose bits differ.
pub fn differing<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

/// The body of the invariance tests: for h_q 16 and 128 and s_q 1 and 2, a target of
/// `target_len` tokens (a range) alone, then beside 1, 4, 16 and 40 mates of lengths drawn
/// from `mate_len`, at random positions: 0 differing bits of out and lse. The alone result
/// is also checked against the float64 reference (so that equal garbage cannot pass).
pub fn sequence_is_batch_invariant(dev: &Device, what: &str, chunks: Option<InvariantChunks>, target_len: (usize, usize), mate_len: usize) {
    let mut rng = Rng::new(what);
    let dtype = DType::BF16;
    for (h_q, s_q) in [(16, 1), (16, 2), (128, 1), (128, 2)] {
        let causal = s_q > 1;
        let len = target_len.0 + rng.below(target_len.1 - target_len.0 + 1);
        let dist = if rng.below(2) == 0 { Dist::Small } else { Dist::Normal };
        let target = Seq::random(len, s_q, h_q, dtype, dist, &mut rng);
        let alone_in = batch(&[&target], s_q, h_q, dtype, &mut rng);
        let alone = decode_seq(dev, &alone_in, 0, causal, chunks, true);
        let alone_default = decode_seq(dev, &alone_in, 0, causal, None, false);
        let (ref_out, ref_lse) = alone_in.reference(causal, Some(0));
        let out_f32: Vec<f32> = alone.0.iter().map(|&x| f32::from_bits((x as u32) << 16)).collect();
        let lse_f32: Vec<f32> = alone.1.iter().map(|&x| f32::from_bits(x)).collect();
        assert_accuracy(&out_f32, &lse_f32, &ref_out, &ref_lse, dtype, &format!("{what}: target alone, len {len}, h_q {h_q}, s_q {s_q}"));
        for mates in [1, 4, 16, 40] {
            let others: Vec<Seq> = (0..mates)
                .map(|_| {
                    let l = if rng.below(8) == 0 { 0 } else { rng.below(mate_len + 1) };
                    Seq::mate(l, s_q, h_q, dtype, &mut rng)
                })
                .collect();
            let pos = rng.below(mates + 1);
            let mut seqs: Vec<&Seq> = others.iter().collect();
            seqs.insert(pos, &target);
            let inp = batch(&seqs, s_q, h_q, dtype, &mut rng);
            let got = decode_seq(dev, &inp, pos, causal, chunks, true);
            let lens: Vec<usize> = seqs.iter().map(|s| s.len).collect();
            let ctx = format!("{what}: target len {len} at {pos} of {lens:?}, h_q {h_q}, s_q {s_q}, seed {}", rng.seed);
            assert_eq!(differing(&got.0, &alone.0), 0, "{ctx}: out elements differ from the target alone");
            assert_eq!(differing(&got.1, &alone.1), 0, "{ctx}: lse elements differ from the target alone");
            // For the record: what the default plan does with the same batch.
            let dflt = decode_seq(dev, &inp, pos, causal, None, false);
            println!(
                "[{what}] h_q {h_q} s_q {s_q} len {len} + {mates} mates: invariant plan 0 differing; default plan {} of {} out, {} of {} lse differ from the target alone",
                differing(&dflt.0, &alone_default.0),
                alone.0.len(),
                differing(&dflt.1, &alone_default.1),
                alone.1.len()
            );
        }
    }
}
