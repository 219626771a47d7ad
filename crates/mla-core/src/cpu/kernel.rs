//! The per-segment attention math of the CPU backend: one sequence, a range of its KV
//! blocks, every query row of the sequence at once (online softmax, one block at a time).
//!
//! The segment loop is written once, generic over [`Arith`] (the two matrix products of a
//! block), and instantiated twice: a portable build (plain loops that LLVM vectorises with
//! the baseline ISA) and, on x86-64, an AVX2 + FMA build (register-tiled intrinsics in
//! `avx2.rs`, which instantiates it: this module does not know that build), chosen at
//! run time.

use crate::consts::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};
use crate::dtype::DType;

const D: usize = HEAD_DIM;
const DV: usize = HEAD_DIM_V;
const BS: usize = BLOCK_SIZE;

/// The two matrix products of a block, in one build or another.
pub(crate) trait Arith {
    /// s[rows, 64-stride] = q[rows, 576] · k[n, 576]^T (first n columns of each row).
    fn qk(&self, q: &[f32], k: &[f32], s: &mut [f32], rows: usize, n: usize);
    /// acc[rows, 512] = acc * corr (per row) + p[rows, 0..n] · v[n, 0..512] (v with row stride 576).
    fn pv(&self, p: &[f32], v: &[f32], acc: &mut [f32], corr: &[f32], rows: usize, n: usize);
}

/// Portable code (auto-vectorised with the baseline ISA, `a * b + c`, never a libm call).
pub(crate) struct Plain;
impl Arith for Plain {
    #[inline(always)]
    fn qk(&self, q: &[f32], k: &[f32], s: &mut [f32], rows: usize, n: usize) {
        qk(q, k, s, rows, n)
    }
    #[inline(always)]
    fn pv(&self, p: &[f32], v: &[f32], acc: &mut [f32], corr: &[f32], rows: usize, n: usize) {
        pv(p, v, acc, corr, rows, n)
    }
}

/// What one segment reads: the sequence's query rows, its blocks and its length.
pub(crate) struct SegmentInput<'a> {
    pub dtype: DType,
    /// The sequence's query rows [rows, 576] (bits).
    pub q: &'a [u16],
    /// The whole cache (bits).
    pub kv: &'a [u16],
    /// The sequence's row of the block table.
    pub block_table: &'a [i32],
    pub seqlen: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub causal: bool,
    pub scale: f32,
    /// Blocks lo..hi of the sequence.
    pub lo: usize,
    pub hi: usize,
}

/// Per-worker buffers, reused across segments.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Scaled query rows, f32 [rows, 576].
    q: Vec<f32>,
    /// One KV block in f32 [64, 576].
    k: Vec<f32>,
    /// Scores then probabilities [rows, 64].
    s: Vec<f32>,
    /// Unnormalised output [rows, 512].
    pub acc: Vec<f32>,
    /// Running max and sum per row.
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    corr: Vec<f32>,
    /// Keys each row attends to in total (causal limit), as a count.
    keys: Vec<usize>,
}

impl Scratch {
    fn prepare(&mut self, rows: usize) {
        self.q.resize(rows * D, 0.0);
        self.k.resize(BS * D, 0.0);
        self.s.resize(rows * BS, 0.0);
        self.acc.clear();
        self.acc.resize(rows * DV, 0.0);
        self.m.clear();
        self.m.resize(rows, f32::NEG_INFINITY);
        self.l.clear();
        self.l.resize(rows, 0.0);
        self.corr.resize(rows, 1.0);
        self.keys.resize(rows, 0);
    }
}

/// Widens 16-bit float bits to f32 (exact), multiplied by `mul` (1.0 keeps them exact).
#[inline(always)]
fn widen(src: &[u16], dst: &mut [f32], dtype: DType, mul: f32) {
    debug_assert_eq!(src.len(), dst.len());
    match dtype {
        DType::BF16 => {
            for (d, &b) in dst.iter_mut().zip(src) {
                *d = f32::from_bits((b as u32) << 16) * mul;
            }
        }
        _ => {
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            let h: &[half::f16] = src.reinterpret_cast();
            h.convert_to_f32_slice(dst);
            if mul != 1.0 {
                for d in dst.iter_mut() {
                    *d *= mul;
                }
            }
        }
    }
}

/// Portable s[r, t] = q[r] · k[t]: one dot product at a time, 16 independent lanes.
#[inline(always)]
fn qk(q: &[f32], k: &[f32], s: &mut [f32], rows: usize, n: usize) {
    for r in 0..rows {
        let qr: &[f32; D] = q[r * D..(r + 1) * D].try_into().unwrap();
        for t in 0..n {
            let kr: &[f32; D] = k[t * D..(t + 1) * D].try_into().unwrap();
            let mut acc = [0f32; 16];
            for c in 0..D / 16 {
                let qc: &[f32; 16] = qr[c * 16..c * 16 + 16].try_into().unwrap();
                let kc: &[f32; 16] = kr[c * 16..c * 16 + 16].try_into().unwrap();
                for x in 0..16 {
                    acc[x] += qc[x] * kc[x];
                }
            }
            let mut h = [0f32; 8];
            for x in 0..8 {
                h[x] = acc[x] + acc[x + 8];
            }
            s[r * BS + t] = ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
        }
    }
}

/// Portable acc[r] = acc[r] * corr[r] + sum_t p[r, t] v[t], a row at a time.
#[inline(always)]
fn pv(p: &[f32], v: &[f32], acc: &mut [f32], corr: &[f32], rows: usize, n: usize) {
    for r in 0..rows {
        let a: &mut [f32; DV] = (&mut acc[r * DV..(r + 1) * DV]).try_into().unwrap();
        let c = corr[r];
        if c != 1.0 {
            for x in a.iter_mut() {
                *x *= c;
            }
        }
        for t in 0..n {
            let pt = p[r * BS + t];
            if pt == 0.0 {
                continue;
            }
            let vt: &[f32; DV] = v[t * D..t * D + DV].try_into().unwrap();
            for x in 0..DV {
                a[x] += pt * vt[x];
            }
        }
    }
}

/// Runs blocks lo..hi of one sequence for all its rows. On return `sc.acc` holds the
/// unnormalised output, `sc.m` the running max (-inf for a row that saw no key) and
/// `sc.l` the sum of exp(score - m) (0 for such a row).
#[inline(always)]
pub(crate) fn run_segment<A: Arith>(ar: &A, inp: &SegmentInput, sc: &mut Scratch) {
    let rows = inp.s_q * inp.h_q;
    sc.prepare(rows);
    widen(&inp.q[..rows * D], &mut sc.q[..rows * D], inp.dtype, inp.scale);
    let l_seq = inp.seqlen;
    for r in 0..rows {
        let j = r / inp.h_q;
        // Keys 0 .. keys[r] are attended: L - s_q + j + 1 when causal, else L.
        sc.keys[r] = if inp.causal && inp.s_q > 1 { (l_seq + j + 1).saturating_sub(inp.s_q) } else { l_seq };
    }
    for blk in inp.lo..inp.hi {
        let base = blk * BS;
        // Valid rows of this block: the rest (past L) may hold anything and is never read.
        let n = BS.min(l_seq.saturating_sub(base));
        let n_att = sc.keys.iter().map(|&kr| kr.saturating_sub(base).min(n)).max().unwrap_or(0);
        if n_att == 0 {
            continue;
        }
        let idx = inp.block_table[blk] as usize;
        let src = &inp.kv[idx * BS * D..idx * BS * D + n_att * D];
        widen(src, &mut sc.k[..n_att * D], inp.dtype, 1.0);
        ar.qk(&sc.q, &sc.k, &mut sc.s, rows, n_att);
        for r in 0..rows {
            let nk = sc.keys[r].saturating_sub(base).min(n_att);
            let srow = &mut sc.s[r * BS..r * BS + n_att];
            if nk == 0 {
                sc.corr[r] = 1.0;
                srow.fill(0.0);
                continue;
            }
            let mb = srow[..nk].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let m_old = sc.m[r];
            let m_new = m_old.max(mb);
            // exp(-inf) = 0 for the first block a row sees.
            let corr = (m_old - m_new).exp();
            let mut sum = 0.0f32;
            for x in srow[..nk].iter_mut() {
                let e = (*x - m_new).exp();
                *x = e;
                sum += e;
            }
            srow[nk..].fill(0.0);
            sc.m[r] = m_new;
            sc.l[r] = sc.l[r] * corr + sum;
            sc.corr[r] = corr;
        }
        ar.pv(&sc.s, &sc.k, &mut sc.acc, &sc.corr, rows, n_att);
    }
}

/// The portable build.
pub(crate) fn run_segment_portable(inp: &SegmentInput, sc: &mut Scratch) {
    run_segment(&Plain, inp, sc)
}
