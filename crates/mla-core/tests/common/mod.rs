//! Shared test helpers: a float64 reference decode written straight from the contract,
//! random inputs (permuted block tables with garbage tails, NaN / Inf past each sequence's
//! end, shared blocks) and the contract's accuracy metrics.
//!
//! Nothing here uses the crate's own conversions or plan: 16-bit floats are decoded by hand
//! (`half_to_f64`), encoded with the `half` crate.

#![allow(dead_code)]

use mla_core::{DType, Device, Tensor};

pub const D: usize = 576;
pub const DV: usize = 512;
pub const BS: usize = 64;
/// A block-table entry past a sequence's blocks: out of range, must never be read.
pub const GARBAGE: i32 = 2_147_480_000;

// ---------------------------------------------------------------------------------------
// Random numbers

/// SplitMix64 with Box-Muller normals. Every test prints its seed (shown on failure);
/// `MLA_TEST_SEED=<n>` replays one.
pub struct Rng {
    state: u64,
    pub seed: u64,
}

impl Rng {
    /// A fresh seed (from the clock) unless MLA_TEST_SEED is set; prints it with `what`.
    pub fn new(what: &str) -> Rng {
        let seed = match std::env::var("MLA_TEST_SEED") {
            Ok(s) => s.parse().expect("MLA_TEST_SEED must be an integer"),
            Err(_) => {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
                (t.as_nanos() as u64) ^ ((what.len() as u64) << 48) ^ (std::process::id() as u64) << 20
            }
        };
        println!("[{what}] seed = {seed} (replay with MLA_TEST_SEED={seed})");
        Rng { state: seed, seed }
    }

    /// A fresh seed (MLA_TEST_SEED replays one), printed.
    pub fn fresh() -> Rng {
        Rng::new("rng")
    }

    pub fn from_seed(seed: u64) -> Rng {
        Rng { state: seed, seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for k in (1..v.len()).rev() {
            let j = self.below(k + 1);
            v.swap(k, j);
        }
    }
}

/// How q and the cache are drawn (the contract's two distributions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    /// N(0, 1) / 10 clamped to [-1, 1].
    Small,
    /// N(0, 1).
    Normal,
}

impl Dist {
    pub fn draw(self, rng: &mut Rng) -> f64 {
        match self {
            Dist::Small => (rng.normal() / 10.0).clamp(-1.0, 1.0),
            Dist::Normal => rng.normal(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// 16-bit floats

/// Round-to-nearest-even encoding (the `half` crate).
pub fn encode(x: f64, dtype: DType) -> u16 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(x).to_bits(),
        DType::F16 => half::f16::from_f64(x).to_bits(),
        _ => panic!("not a 16-bit type"),
    }
}

/// Exact decoding, written out by hand.
pub fn half_to_f64(bits: u16, dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => f32::from_bits((bits as u32) << 16) as f64,
        DType::F16 => {
            let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
            let e = ((bits >> 10) & 0x1f) as i32;
            let m = (bits & 0x3ff) as f64;
            sign * match e {
                0 => m * 2f64.powi(-24),
                31 if m == 0.0 => f64::INFINITY,
                31 => f64::NAN,
                _ => (1.0 + m / 1024.0) * 2f64.powi(e - 15),
            }
        }
        _ => panic!("not a 16-bit type"),
    }
}

pub fn nan_bits(dtype: DType) -> u16 {
    match dtype {
        DType::BF16 => 0x7fc0,
        _ => 0x7e00,
    }
}

pub fn inf_bits(dtype: DType, neg: bool) -> u16 {
    let b = match dtype {
        DType::BF16 => 0x7f80,
        _ => 0x7c00,
    };
    if neg {
        b | 0x8000
    } else {
        b
    }
}

// ---------------------------------------------------------------------------------------
// Inputs

/// The shape of one test step: dtype, heads, tokens per sequence and lengths.
#[derive(Debug, Clone)]
pub struct Case {
    pub dtype: DType,
    pub h_q: usize,
    pub s_q: usize,
    pub lens: Vec<i32>,
    /// Each sequence starts with the previous one's full blocks (prefix sharing).
    pub shared: bool,
    /// Give every sequence valid cache rows (and table entries) for this many tokens, so
    /// that lengths up to it can be written later (`Inputs::with_lens`).
    pub max_len: Option<usize>,
}

impl Case {
    pub fn new(dtype: DType, h_q: usize, s_q: usize, lens: Vec<i32>) -> Case {
        Case { dtype, h_q, s_q, lens, shared: false, max_len: None }
    }
    pub fn shared_blocks(mut self, on: bool) -> Case {
        self.shared = on;
        self
    }
    pub fn max_len(mut self, n: usize) -> Case {
        self.max_len = Some(n);
        self
    }
    pub fn b(&self) -> usize {
        self.lens.len()
    }
}

/// One decode step's inputs on the host, as bits.
#[derive(Clone)]
pub struct Inputs {
    pub case: Case,
    /// Seed of the RNG that drew these inputs.
    pub seed: u64,
    pub b: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub dtype: DType,
    pub seqlens: Vec<i32>,
    /// [b, s_q, h_q, 576]
    pub q: Vec<u16>,
    /// [num_blocks, 64, 1, 576]
    pub kv: Vec<u16>,
    pub num_blocks: usize,
    /// [b, max_blocks]
    pub block_table: Vec<i32>,
    pub max_blocks: usize,
}

/// The four input tensors of one step on a device.
pub struct Tensors {
    pub q: Tensor,
    pub kv: Tensor,
    pub block_table: Tensor,
    pub seqlens: Tensor,
}

pub fn nblocks(l: i32) -> usize {
    (l.max(0) as usize).div_ceil(BS)
}

/// Random inputs (see [`Inputs::generate`]).
pub fn make_inputs(rng: &mut Rng, s_q: usize, h_q: usize, seqlens: &[i32], dtype: DType, dist: Dist, share: bool) -> Inputs {
    Inputs::generate(Case::new(dtype, h_q, s_q, seqlens.to_vec()).shared_blocks(share), dist, rng)
}

impl Inputs {
    /// Random inputs drawn from N(0,1)/10 clamped (or N(0,1) with `unit_normal`).
    pub fn random(case: Case, unit_normal: bool, rng: &mut Rng) -> Inputs {
        Inputs::generate(case, if unit_normal { Dist::Normal } else { Dist::Small }, rng)
    }

    /// Each sequence gets its own blocks in a shuffled cache (with spare blocks full of
    /// poison), table entries past the used ones hold garbage (out-of-range indices), and
    /// every row that no sequence reads holds NaN / Inf / a huge value. With
    /// `case.shared`, each sequence starts with as many of the previous sequence's full
    /// blocks as it can use. The inputs come from their own seed (`self.seed`), drawn
    /// from `rng`.
    pub fn generate(case: Case, dist: Dist, rng: &mut Rng) -> Inputs {
        let seed = rng.next_u64();
        let mut rng = Rng::from_seed(seed);
        let rng = &mut rng;
        let (dtype, s_q, h_q) = (case.dtype, case.s_q, case.h_q);
        let seqlens = case.lens.clone();
        let b = seqlens.len();
        // Tokens each sequence holds valid rows for.
        let held: Vec<usize> = seqlens.iter().map(|&l| case.max_len.unwrap_or(0).max(l.max(0) as usize)).collect();
        let used: Vec<usize> = held.iter().map(|&l| l.div_ceil(BS)).collect();
        let max_blocks = used.iter().copied().max().unwrap_or(0) + 1 + rng.below(3);
        let spare = 1 + rng.below(4);
        let num_blocks = used.iter().sum::<usize>() + spare;
        let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
        rng.shuffle(&mut perm);
        let mut next = 0usize;
        let mut table = vec![0i32; b * max_blocks];
        for i in 0..b {
            let shared = if case.shared && i > 0 { (held[i - 1] / BS).min(used[i]) } else { 0 };
            for j in 0..max_blocks {
                table[i * max_blocks + j] = if j < shared {
                    table[(i - 1) * max_blocks + j]
                } else if j < used[i] {
                    next += 1;
                    perm[next - 1]
                } else {
                    match rng.below(4) {
                        0 => GARBAGE,
                        1 => -1 - rng.below(1000) as i32,
                        2 => num_blocks as i32 + rng.below(1000) as i32,
                        _ => i32::MIN,
                    }
                };
            }
        }
        // Rows each block must keep valid: the most any sequence holds of it.
        let mut valid_rows = vec![0usize; num_blocks];
        for i in 0..b {
            for j in 0..used[i] {
                let blk = table[i * max_blocks + j] as usize;
                valid_rows[blk] = valid_rows[blk].max((held[i] - j * BS).min(BS));
            }
        }
        let mut kv = vec![0u16; num_blocks * BS * D];
        for (blk, &valid) in valid_rows.iter().enumerate() {
            for row in 0..BS {
                let dst = &mut kv[(blk * BS + row) * D..(blk * BS + row + 1) * D];
                if row < valid {
                    for x in dst.iter_mut() {
                        *x = encode(dist.draw(rng), dtype);
                    }
                } else {
                    // Never read: NaN, +-Inf or a huge finite value.
                    let poison = match rng.below(4) {
                        0 => nan_bits(dtype),
                        1 => inf_bits(dtype, false),
                        2 => inf_bits(dtype, true),
                        _ => encode(60000.0, dtype),
                    };
                    dst.fill(poison);
                }
            }
        }
        let q = (0..b * s_q * h_q * D).map(|_| encode(dist.draw(rng), dtype)).collect();
        Inputs { case, seed, b, s_q, h_q, dtype, seqlens, q, kv, num_blocks, block_table: table, max_blocks }
    }

    /// Inputs read back from (device) tensors q and kv, with a host block table.
    pub fn from_device(q: &Tensor, kv: &Tensor, table: &[i32], max_blocks: usize, lens: &[i32], dtype: DType, seed: u64) -> Inputs {
        let bits = |t: &Tensor| -> Vec<u16> { t.to_bytes().unwrap().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect() };
        let (b, s_q, h_q) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        assert_eq!(b, lens.len());
        assert_eq!(table.len(), b * max_blocks);
        Inputs {
            case: Case::new(dtype, h_q, s_q, lens.to_vec()),
            seed,
            b,
            s_q,
            h_q,
            dtype,
            seqlens: lens.to_vec(),
            q: bits(q),
            kv: bits(kv),
            num_blocks: kv.shape()[0],
            block_table: table.to_vec(),
            max_blocks,
        }
    }

    /// The same cache and queries with other lengths (valid up to the case's max_len).
    pub fn with_lens(&self, lens: &[i32]) -> Inputs {
        assert_eq!(lens.len(), self.b);
        let limit = self.case.max_len.unwrap_or(0);
        for (i, &l) in lens.iter().enumerate() {
            assert!(l >= 0 && (l <= self.seqlens[i] || l as usize <= limit), "length {l} of sequence {i} is past its valid rows");
        }
        let mut x = self.clone();
        x.seqlens = lens.to_vec();
        x.case.lens = lens.to_vec();
        x
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn tensors(&self, dev: &Device) -> Tensors {
        Tensors {
            q: Tensor::from_half_bits(dev, &self.q, &[self.b, self.s_q, self.h_q, D], self.dtype).unwrap(),
            kv: Tensor::from_half_bits(dev, &self.kv, &[self.num_blocks, BS, 1, D], self.dtype).unwrap(),
            block_table: Tensor::from_i32(dev, &self.block_table, &[self.b, self.max_blocks]).unwrap(),
            seqlens: Tensor::from_i32(dev, &self.seqlens, &[self.b]).unwrap(),
        }
    }

    /// The float64 reference with the default scale 1/24: (out, lse) of every sequence
    /// ([b, s_q, h_q, 512] and [b, h_q, s_q]), or of sequence `seq` only
    /// ([s_q, h_q, 512] and [h_q, s_q]).
    pub fn reference(&self, causal: bool, seq: Option<usize>) -> (Vec<f64>, Vec<f64>) {
        match seq {
            Some(i) => reference_seq(self, i, causal, 1.0 / 24.0),
            None => {
                let r = reference(self, causal, 1.0 / 24.0);
                (r.out, r.lse)
            }
        }
    }
}

/// Tensors (q, kv_cache, block_table, cache_seqlens) on `dev`.
pub fn tensors(inp: &Inputs, dev: &Device) -> (Tensor, Tensor, Tensor, Tensor) {
    let t = inp.tensors(dev);
    (t.q, t.kv, t.block_table, t.seqlens)
}

// ---------------------------------------------------------------------------------------
// The float64 reference

pub struct Reference {
    /// [b, s_q, h_q, 512]
    pub out: Vec<f64>,
    /// [b, h_q, s_q]; +inf for a row with no key.
    pub lse: Vec<f64>,
}

/// The contract, literally: every (i, j, h), every attended key, in float64.
pub fn reference(inp: &Inputs, causal: bool, scale: f32) -> Reference {
    let mut out = Vec::with_capacity(inp.b * inp.s_q * inp.h_q * DV);
    let mut lse = Vec::with_capacity(inp.b * inp.h_q * inp.s_q);
    for i in 0..inp.b {
        let (o, l) = reference_seq(inp, i, causal, scale);
        out.extend(o);
        lse.extend(l);
    }
    Reference { out, lse }
}

/// Sequence i's out [s_q, h_q, 512] and lse [h_q, s_q] in float64 (rows in parallel).
pub fn reference_seq(inp: &Inputs, i: usize, causal: bool, scale: f32) -> (Vec<f64>, Vec<f64>) {
    use rayon::prelude::*;
    let (s_q, h_q, dt) = (inp.s_q, inp.h_q, inp.dtype);
    let scale = scale as f64;
    let len = inp.seqlens[i] as i64;
    // Token t is row t % 64 of block block_table[i][t / 64]; only t < len is read.
    let keys: Vec<Vec<f64>> = (0..len.max(0) as usize)
        .map(|t| {
            let blk = inp.block_table[i * inp.max_blocks + t / BS] as usize;
            inp.kv[(blk * BS + t % BS) * D..][..D].iter().map(|&x| half_to_f64(x, dt)).collect()
        })
        .collect();
    let mut out = vec![0f64; s_q * h_q * DV];
    let mut lse_jh = vec![0f64; s_q * h_q];
    out.par_chunks_mut(DV).zip(lse_jh.par_iter_mut()).enumerate().for_each(|(r, (orow, lse))| {
        let (j, h) = (r / h_q, r % h_q);
        let last = if causal { len - s_q as i64 + j as i64 } else { len - 1 };
        if last < 0 {
            *lse = f64::INFINITY;
            return;
        }
        let qrow: Vec<f64> = inp.q[((i * s_q + j) * h_q + h) * D..][..D].iter().map(|&x| half_to_f64(x, dt)).collect();
        let scores: Vec<f64> = keys[..=last as usize].iter().map(|k| scale * k.iter().zip(&qrow).map(|(k, q)| k * q).sum::<f64>()).collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for (t, &s) in scores.iter().enumerate() {
            let p = (s - m).exp();
            sum += p;
            for (a, &v) in orow.iter_mut().zip(&keys[t][..DV]) {
                *a += p * v;
            }
        }
        for o in orow.iter_mut() {
            *o /= sum;
        }
        *lse = m + sum.ln();
    });
    // lse is [h_q, s_q].
    let mut lse = vec![0f64; h_q * s_q];
    for j in 0..s_q {
        for h in 0..h_q {
            lse[h * s_q + j] = lse_jh[j * h_q + h];
        }
    }
    (out, lse)
}

// ---------------------------------------------------------------------------------------
// Metrics

/// ||out - ref|| / ||ref|| (0 when both are zero).
pub fn rel_l2(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut num, mut den) = (0.0, 0.0);
    for (&o, &r) in out.iter().zip(reference) {
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 5e-3,
        DType::F16 => 1e-3,
        _ => panic!(),
    }
}

pub fn decode_bits(bits: &[u16], dtype: DType) -> Vec<f64> {
    bits.iter().map(|&x| half_to_f64(x, dtype)).collect()
}

/// The contract's checks of a result (values widened to f32, any shape) against the
/// reference: no NaN / Inf in out, rel L2 within the dtype's bound, rows the reference
/// leaves at zero (no key) exactly 0, lse = +inf exactly where the reference's is, and
/// |lse - ref| <= 1e-5 * max(|ref|, 1) elsewhere. Returns the rel L2 error.
pub fn assert_accuracy(out: &[f32], lse: &[f32], ref_out: &[f64], ref_lse: &[f64], dtype: DType, what: &str) -> f64 {
    assert_eq!(out.len(), ref_out.len(), "{what}: out length");
    assert_eq!(lse.len(), ref_lse.len(), "{what}: lse length");
    if let Some(k) = out.iter().position(|x| !x.is_finite()) {
        panic!("{what}: out[{k}] = {} is not finite", out[k]);
    }
    let out64: Vec<f64> = out.iter().map(|&x| x as f64).collect();
    let err = rel_l2(&out64, ref_out);
    let tol = tolerance(dtype);
    assert!(err <= tol, "{what}: rel L2 {err:.3e} > {tol:.0e}");
    for (r, (o, want)) in out.chunks(DV).zip(ref_out.chunks(DV)).enumerate() {
        if want.iter().all(|&x| x == 0.0) {
            assert!(o.iter().all(|&x| x == 0.0), "{what}: out row {r} must be 0 (no key)");
        }
    }
    for (k, (&got, &want)) in lse.iter().zip(ref_lse).enumerate() {
        if want == f64::INFINITY {
            assert!(got == f32::INFINITY, "{what}: lse[{k}] = {got}, want +inf (no key)");
        } else {
            let tol = 1e-5 * want.abs().max(1.0);
            assert!(got.is_finite() && (got as f64 - want).abs() <= tol, "{what}: lse[{k}] = {got}, want {want} (tol {tol:.1e})");
        }
    }
    err
}

/// Two backends' results on the same inputs agree within the rounding of the output type
/// (rel L2 within the dtype's bound), with +inf lse in the same places and finite lse
/// within 2e-5 * max(|lse|, 1).
pub fn assert_close_to_cpu(out: &[f32], lse: &[f32], cpu_out: &[f32], cpu_lse: &[f32], dtype: DType, what: &str) {
    assert_eq!(out.len(), cpu_out.len(), "{what}: out length");
    assert_eq!(lse.len(), cpu_lse.len(), "{what}: lse length");
    let a: Vec<f64> = out.iter().map(|&x| x as f64).collect();
    let b: Vec<f64> = cpu_out.iter().map(|&x| x as f64).collect();
    let d = rel_l2(&a, &b);
    assert!(d <= tolerance(dtype), "{what}: differs from the CPU backend by rel L2 {d:.3e}");
    for (k, (&x, &y)) in lse.iter().zip(cpu_lse).enumerate() {
        let ok = if y.is_infinite() { x == y } else { x.is_finite() && (x - y).abs() <= 2e-5 * y.abs().max(1.0) };
        assert!(ok, "{what}: lse[{k}] = {x}, CPU backend {y}");
    }
}

/// [`assert_accuracy`] for 16-bit output bits, plus: a keyless row's out is +0.0 bits.
pub fn check(what: &str, inp: &Inputs, out_bits: &[u16], lse: &[f32], r: &Reference) -> f64 {
    let out: Vec<f32> = out_bits.iter().map(|&x| half_to_f64(x, inp.dtype) as f32).collect();
    let err = assert_accuracy(&out, lse, &r.out, &r.lse, inp.dtype, what);
    let (s_q, h_q) = (inp.s_q, inp.h_q);
    for i in 0..inp.b {
        for h in 0..h_q {
            for j in 0..s_q {
                if r.lse[i * h_q * s_q + h * s_q + j] == f64::INFINITY {
                    let orow = ((i * s_q + j) * h_q + h) * DV;
                    assert!(out_bits[orow..orow + DV].iter().all(|&x| x == 0), "{what}: out row ({i},{j},{h}) of a keyless row is not +0");
                }
            }
        }
    }
    err
}

pub mod invariant;
pub mod serve;

/// CUDA device 0 for a GPU test, or None after printing "SKIPPED <test> (no GPU: ...)";
/// with MLA_TEST_DEVICE=cuda (the GPU suite sets it) a missing GPU fails the test instead.
pub fn gpu(test: &str) -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("MLA_TEST_DEVICE").as_deref() == Ok("cuda") {
                panic!("MLA_TEST_DEVICE=cuda but no usable GPU: {e}");
            }
            println!("SKIPPED {test} (no GPU: {e})");
            None
        }
    }
}
