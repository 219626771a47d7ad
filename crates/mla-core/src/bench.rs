//! The contract's benchmark ("Measuring" in the spec), usable from Rust and the binding.
//!
//! - configurations: FlashMLA's grid ([`grid_configs`]), the beyond-grid shapes
//!   ([`beyond_configs`]), a reduced grid for the CPU backend ([`cpu_configs`]) and a tiny
//!   set for tests ([`tiny_configs`]); [`suite_configs`] picks one by name;
//! - [`run_config`]: random inputs (never zeros; generated on the device on CUDA), block
//!   tables mapping each sequence to its own blocks, one plan, warm-up, then the median of
//!   `reps` timed `decode_into` runs (CUDA events on CUDA, `Instant` on the CPU);
//! - [`copy_ceiling_gbps`]: the copy ceiling of the same device, measured in the same run;
//! - [`load_anchors`]: FlashMLA's times from the anchor CSVs (`bench/anchors/`).
//!
//! GB/s = (sum(seqlens) * d + b*s_q*h_q*d + b*s_q*h_q*dv) * 2 bytes / time, and
//! TFLOPS = 2 * s_q * sum(seqlens) * h_q * (d + dv) / time ([`decode_bytes`], [`decode_flops`]).

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;

use crate::decode::{decode_into, DecodeOptions};
use crate::device::Device;
use crate::dtype::{f32_to_half_bits, DType};
use crate::error::{ErrorCode, MlaError, Result};
use crate::plan::{plan, plan_with, Plan, PlanOptions};
use crate::tensor::Tensor;
use crate::consts::{BLOCK_SIZE, BLOCK_TABLE_PAD, HEAD_DIM, HEAD_DIM_V};

/// Seed of the benchmark's random lengths and inputs: with it, the varlen lengths of
/// FlashMLA's grid are the ones the `gpu_bench` example always drew.
pub const DEFAULT_SEED: u64 = 0x5EED;
/// Mean lengths of FlashMLA's grid.
pub const GRID_MEANS: [usize; 3] = [4096, 8192, 16384];
/// Batch size of FlashMLA's grid.
pub const GRID_BATCH: usize = 128;
/// The lengths of the "imbalanced" beyond-grid shape (a small batch, one long sequence).
pub const IMBALANCED_LENS: [i32; 4] = [4641, 45118, 1730, 1696];
/// Bytes of the host buffer the CPU copy ceiling copies.
pub const CPU_COPY_BYTES: usize = 256 << 20;
/// Bytes the CUDA copy ceiling copies (the contract's 1 GiB).
pub const CUDA_COPY_BYTES: usize = 1 << 30;

/// One benchmark shape: `b` sequences (of mean length `mean`, fixed or Normal(mean,
/// mean/2) when `varlen`; or exactly `lens`), `s_q` query tokens, `h_q` heads; bf16 or
/// fp16, causal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchConfig {
    /// "grid", "short", "imbalanced", "mtp" (FlashMLA's names), or anything else.
    pub tag: String,
    pub b: usize,
    pub s_q: usize,
    /// Mean length (0 when `lens` is given, as in the anchors file).
    pub mean: usize,
    pub h_q: usize,
    pub varlen: bool,
    /// Exact lengths (then `b == lens.len()`).
    pub lens: Option<Vec<i32>>,
}

impl BenchConfig {
    pub fn new(tag: &str, b: usize, s_q: usize, mean: usize, h_q: usize, varlen: bool) -> BenchConfig {
        BenchConfig { tag: tag.to_string(), b, s_q, mean, h_q, varlen, lens: None }
    }

    /// "tag/s_q/mean/h_q/varlen", e.g. `grid/1/4096/64/0`: the key of [`load_anchors`] and
    /// the prefix `--filter` matches.
    pub fn label(&self) -> String {
        format!("{}/{}/{}/{}/{}", self.tag, self.s_q, self.mean, self.h_q, self.varlen as u8)
    }

    /// Whether this is one of FlashMLA's own shapes (grid or beyond), i.e. one its anchor
    /// times apply to (same label and the same batch size and lengths).
    pub fn is_flashmla_shape(&self) -> bool {
        grid_configs(&GRID_MEANS).iter().chain(beyond_configs().iter()).any(|c| c == self)
    }

    /// Checks the sizes (a typed error naming the field).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, expected: &str, got: String| Err(MlaError::arg(ErrorCode::InvalidArgument, &format!("bench config {}: {what}", self.label()), expected, got));
        if self.b == 0 {
            return bad("b", "at least 1", self.b.to_string());
        }
        if self.s_q == 0 {
            return bad("s_q", "at least 1", self.s_q.to_string());
        }
        if self.h_q == 0 {
            return bad("h_q", "at least 1", self.h_q.to_string());
        }
        if self.mean > i32::MAX as usize / 4 {
            return bad("mean", "at most 2^29", self.mean.to_string());
        }
        if let Some(l) = &self.lens {
            if l.len() != self.b {
                return bad("lens", &format!("{} lengths (b)", self.b), l.len().to_string());
            }
            if let Some(x) = l.iter().find(|&&x| x < 0) {
                return bad("lens", "non-negative lengths", x.to_string());
            }
        }
        Ok(())
    }
}

/// FlashMLA's grid for the given mean lengths: b = 128; h_q in {16, 32, 64, 128};
/// s_q in {1, 2}; fixed and variable lengths. Order: mean, h_q, s_q, varlen.
pub fn grid_configs(means: &[usize]) -> Vec<BenchConfig> {
    grid_configs_with(means, GRID_BATCH, &[16, 32, 64, 128], &[1, 2])
}

/// A grid of `b` sequences over the given means, h_q and s_q values (fixed and variable
/// lengths each), tagged "grid".
pub fn grid_configs_with(means: &[usize], b: usize, h_qs: &[usize], s_qs: &[usize]) -> Vec<BenchConfig> {
    let mut v = Vec::new();
    for &mean in means {
        for &h_q in h_qs {
            for &s_q in s_qs {
                for varlen in [false, true] {
                    v.push(BenchConfig::new("grid", b, s_q, mean, h_q, varlen));
                }
            }
        }
    }
    v
}

/// FlashMLA's shapes beyond its grid (`flashmla-h100-beyond.csv`): short contexts
/// (b = 128, 1024 tokens), a small imbalanced batch ([`IMBALANCED_LENS`]) and multi-token
/// prediction (b = 128, 4096 tokens, s_q 4 and 8).
pub fn beyond_configs() -> Vec<BenchConfig> {
    beyond_configs_with(GRID_BATCH)
}

fn beyond_configs_with(b: usize) -> Vec<BenchConfig> {
    let mut v = Vec::new();
    for h_q in [16, 128] {
        v.push(BenchConfig::new("short", b, 1, 1024, h_q, false));
    }
    for s_q in [4, 1] {
        v.push(BenchConfig { lens: Some(IMBALANCED_LENS.to_vec()), ..BenchConfig::new("imbalanced", IMBALANCED_LENS.len(), s_q, 0, 16, false) });
    }
    for h_q in [16, 128] {
        for s_q in [4, 8] {
            v.push(BenchConfig::new("mtp", b, s_q, 4096, h_q, false));
        }
    }
    v
}

/// The reduced suite for the CPU backend (FlashMLA's b = 128 grid would take hours on a
/// few cores): b = 8; means 1024 and 4096 (`quick`: 1024 only); h_q 16 and 128; s_q 1 and
/// 2; fixed and variable lengths; then the imbalanced batch and (not `quick`)
/// multi-token prediction at b = 8.
pub fn cpu_configs(quick: bool) -> Vec<BenchConfig> {
    let means: &[usize] = if quick { &[1024] } else { &[1024, 4096] };
    let mut v = grid_configs_with(means, 8, &[16, 128], &[1, 2]);
    v.extend(beyond_configs_with(8).into_iter().filter(|c| c.tag == "imbalanced" || (c.tag == "mtp" && !quick)));
    v
}

/// A few small shapes that run in milliseconds on the CPU backend (for tests).
pub fn tiny_configs() -> Vec<BenchConfig> {
    vec![
        BenchConfig::new("grid", 2, 1, 256, 16, false),
        BenchConfig::new("grid", 2, 2, 256, 16, true),
        BenchConfig { lens: Some(vec![300, 40, 1, 129]), ..BenchConfig::new("imbalanced", 4, 4, 0, 16, false) },
    ]
}

/// A suite by name: "flashmla" (FlashMLA's grid then the beyond shapes; `quick`: mean
/// 4096 only), "cpu" ([`cpu_configs`]) or "tiny" ([`tiny_configs`]).
pub fn suite_configs(name: &str, quick: bool) -> Result<Vec<BenchConfig>> {
    match name {
        "flashmla" => {
            let means: &[usize] = if quick { &GRID_MEANS[..1] } else { &GRID_MEANS };
            let mut v = grid_configs(means);
            v.extend(beyond_configs());
            Ok(v)
        }
        "cpu" => Ok(cpu_configs(quick)),
        "tiny" => Ok(tiny_configs()),
        s => Err(MlaError::arg(ErrorCode::InvalidArgument, "suite", "'flashmla', 'cpu' or 'tiny'", format!("'{s}'"))),
    }
}

/// The suite for a device: FlashMLA's on CUDA, the reduced one on the CPU backend.
pub fn default_suite(dev: &Device) -> &'static str {
    if dev.is_cuda() {
        "flashmla"
    } else {
        "cpu"
    }
}

/// xorshift64* with Box-Muller normals: enough for drawing lengths (and the sequence the
/// `gpu_bench` example has always drawn).
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next_f64().max(1e-300), self.next_f64());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// SplitMix64 step.
fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, to derive per-configuration seeds from labels.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, c| (h ^ c as u64).wrapping_mul(0x100_0000_01b3))
}

/// The lengths of `cfg`: `lens` when given, `mean` for fixed lengths, else Normal(mean,
/// mean/2) rounded and clamped to >= s_q, drawn from `seed`. For the varlen configurations
/// of FlashMLA's grid the draws continue one stream in grid order (as the `gpu_bench`
/// example always did), so every run with the same seed, quick or full, filtered or not,
/// measures the same lengths.
pub fn seqlens_for(cfg: &BenchConfig, seed: u64) -> Vec<i32> {
    if let Some(l) = &cfg.lens {
        return l.clone();
    }
    if !cfg.varlen {
        return vec![cfg.mean as i32; cfg.b];
    }
    let ordinal = grid_configs(&GRID_MEANS).iter().filter(|c| c.varlen).position(|c| c == cfg);
    let mut rng = match ordinal {
        Some(k) => {
            let mut r = Rng::new(seed);
            for _ in 0..k * GRID_BATCH * 2 {
                r.next_f64();
            }
            r
        }
        None => Rng::new(seed ^ fnv1a(&cfg.label()) ^ (cfg.b as u64).rotate_left(32)),
    };
    (0..cfg.b)
        .map(|_| {
            let x = cfg.mean as f64 + rng.normal() * cfg.mean as f64 / 2.0;
            (x.round() as i64).clamp(cfg.s_q as i64, i32::MAX as i64 / 2) as i32
        })
        .collect()
}

/// Bytes one decode step moves (the contract's GB/s numerator):
/// (sum(seqlens) * 576 + b*s_q*h_q*576 + b*s_q*h_q*512) * 2.
pub fn decode_bytes(seqlens: &[i32], s_q: usize, h_q: usize) -> f64 {
    let total: f64 = seqlens.iter().map(|&l| l as f64).sum();
    let rows = (seqlens.len() * s_q * h_q) as f64;
    (total * HEAD_DIM as f64 + rows * HEAD_DIM as f64 + rows * HEAD_DIM_V as f64) * 2.0
}

/// Floating-point operations of one decode step (the contract's TFLOPS numerator):
/// 2 * s_q * sum(seqlens) * h_q * (576 + 512).
pub fn decode_flops(seqlens: &[i32], s_q: usize, h_q: usize) -> f64 {
    let total: f64 = seqlens.iter().map(|&l| l as f64).sum();
    2.0 * s_q as f64 * total * h_q as f64 * (HEAD_DIM + HEAD_DIM_V) as f64
}

/// The result of [`run_config`].
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Median time of one decode step, milliseconds.
    pub ms: f64,
    /// Fastest and slowest timed run, milliseconds.
    pub min_ms: f64,
    pub max_ms: f64,
    /// Timed runs.
    pub reps: usize,
    /// Batch size and sum of the lengths actually measured.
    pub b: usize,
    pub total_seqlen: u64,
    /// [`decode_bytes`] and [`decode_flops`] of the configuration.
    pub bytes: f64,
    pub flops: f64,
    /// bytes / median time, in 1e9 bytes per second.
    pub gbps: f64,
    /// flops / median time, in 1e12 per second.
    pub tflops: f64,
}

impl Measurement {
    /// Builds the rates from the lengths and the sorted-or-not run times.
    pub fn from_times(seqlens: &[i32], s_q: usize, h_q: usize, times_ms: &[f64]) -> Measurement {
        let ms = median(times_ms);
        let bytes = decode_bytes(seqlens, s_q, h_q);
        let flops = decode_flops(seqlens, s_q, h_q);
        Measurement {
            ms,
            min_ms: times_ms.iter().copied().fold(f64::INFINITY, f64::min),
            max_ms: times_ms.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            reps: times_ms.len(),
            b: seqlens.len(),
            total_seqlen: seqlens.iter().map(|&l| l.max(0) as u64).sum(),
            bytes,
            flops,
            gbps: bytes / (ms * 1e-3) / 1e9,
            tflops: flops / (ms * 1e-3) / 1e12,
        }
    }
}

/// The median (the upper one for an even count, as the example always took).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Geometric mean (None for an empty list).
pub fn geomean(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    Some((xs.iter().map(|s| s.ln()).sum::<f64>() / xs.len() as f64).exp())
}

/// A bf16 / fp16 tensor of approximately Normal(0, std) values clamped to [-clamp, clamp]:
/// generated on the device on CUDA; on the CPU with SplitMix64 and an Irwin-Hall sum of
/// four uniforms, in parallel.
pub fn random_tensor(dev: &Device, shape: &[usize], dtype: DType, seed: u64, std: f32, clamp: f32) -> Result<Tensor> {
    if !dtype.is_half() {
        return Err(MlaError::arg(ErrorCode::DtypeMismatch, "dtype", "bf16 or fp16", dtype));
    }
    let mut t = Tensor::zeros(dev, shape, dtype)?;
    match dev {
        Device::Cuda(_) => crate::gpu::util::fill_random(&mut t, seed, std, clamp)?,
        Device::Cpu => {
            const CHUNK: usize = 1 << 16;
            let scale = std * 3f32.sqrt() / 65536.0;
            t.host_mut().unwrap().as_u16_mut().par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
                let mut s = seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                for x in chunk.iter_mut() {
                    let r = splitmix(&mut s);
                    let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
                    // sum/65536 - 2 has variance 1/3: times sqrt(3) is ~N(0, 1).
                    let v = (sum as f32 - 131070.0) * scale;
                    *x = f32_to_half_bits(if clamp > 0.0 { v.clamp(-clamp, clamp) } else { v }, dtype);
                }
            });
        }
    }
    Ok(t)
}

/// Block table mapping each sequence to its own consecutive blocks; entries past a
/// sequence's blocks hold a padding value that is never read. Returns (table, max blocks
/// per sequence, total blocks).
pub fn own_blocks_table(seqlens: &[i32]) -> (Vec<i32>, usize, usize) {
    let nb: Vec<usize> = seqlens.iter().map(|&l| (l.max(0) as usize).div_ceil(BLOCK_SIZE)).collect();
    let max_nb = nb.iter().copied().max().unwrap_or(0).max(1);
    let total: usize = nb.iter().sum();
    let mut table = vec![BLOCK_TABLE_PAD; seqlens.len() * max_nb];
    let mut next = 0i32;
    for (i, &n) in nb.iter().enumerate() {
        for j in 0..n {
            table[i * max_nb + j] = next;
            next += 1;
        }
    }
    (table, max_nb, total)
}

/// Measures one configuration on `dev`: random inputs from `seed` (lengths by
/// [`seqlens_for`]), one plan, warm-up (3 runs on CUDA, 1 on the CPU), then `reps` timed
/// runs of `decode_into` (causal), each timed with CUDA events on CUDA and `Instant` on the
/// CPU. Returns the median and the contract's rates.
pub fn run_config(dev: &Device, cfg: &BenchConfig, dtype: DType, reps: usize, seed: u64) -> Result<Measurement> {
    Ok(run_config_plans(dev, cfg, dtype, reps, seed, &[PlanOptions::default()])?.remove(0))
}

/// [`run_config`] with one plan per entry of `plans` (e.g. batch-invariant and default) on
/// the same inputs: every plan is warmed up, then the timed runs alternate between the
/// plans (so that a drift of the clock falls on all alike). One measurement per plan.
pub fn run_config_plans(dev: &Device, cfg: &BenchConfig, dtype: DType, reps: usize, seed: u64, plans: &[PlanOptions]) -> Result<Vec<Measurement>> {
    cfg.validate()?;
    if reps == 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "reps", "at least 1", reps));
    }
    let lens = seqlens_for(cfg, seed);
    let b = lens.len();
    let (table, max_nb, total_blocks) = own_blocks_table(&lens);
    let data_seed = seed ^ fnv1a(&cfg.label());
    let kv = random_tensor(dev, &[total_blocks.max(1), BLOCK_SIZE, 1, HEAD_DIM], dtype, data_seed ^ 1000, 0.1, 1.0)?;
    let q = random_tensor(dev, &[b, cfg.s_q, cfg.h_q, HEAD_DIM], dtype, data_seed ^ 2000, 0.1, 1.0)?;
    let bt = Tensor::from_i32(dev, &table, &[b, max_nb])?;
    let sl = Tensor::from_i32(dev, &lens, &[b])?;
    let ps = plans.iter().map(|o| plan_with(&sl, cfg.s_q * cfg.h_q, 1, o)).collect::<Result<Vec<_>>>()?;
    let mut out = Tensor::zeros(dev, &[b, cfg.s_q, cfg.h_q, HEAD_DIM_V], dtype)?;
    let mut lse = Tensor::zeros(dev, &[b, cfg.h_q, cfg.s_q], DType::F32)?;
    let opts = DecodeOptions { causal: true, ..Default::default() };
    let mut times = vec![Vec::with_capacity(reps); ps.len()];
    match dev {
        Device::Cuda(g) => {
            for p in &ps {
                for _ in 0..3 {
                    decode_into(&q, &kv, &bt, &sl, p, &opts, &mut out, &mut lse)?;
                }
            }
            dev.synchronize()?;
            let timer = crate::gpu::util::Timer::new(g, g.stream())?;
            for _ in 0..reps {
                for (p, t) in ps.iter().zip(times.iter_mut()) {
                    timer.start()?;
                    decode_into(&q, &kv, &bt, &sl, p, &opts, &mut out, &mut lse)?;
                    t.push(timer.stop()? as f64);
                }
            }
            dev.synchronize()?;
        }
        Device::Cpu => {
            for p in &ps {
                decode_into(&q, &kv, &bt, &sl, p, &opts, &mut out, &mut lse)?;
            }
            for _ in 0..reps {
                for (p, t) in ps.iter().zip(times.iter_mut()) {
                    let t0 = Instant::now();
                    decode_into(&q, &kv, &bt, &sl, p, &opts, &mut out, &mut lse)?;
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    }
    Ok(times.iter().map(|t| Measurement::from_times(&lens, cfg.s_q, cfg.h_q, t)).collect())
}

// ---------------------------------------------------------------------------------------
// The host benchmark (`mla-decode bench --host`): how close a decode step driven from the
// host (TypeScript) gets to the kernel. The host loops live in the CLI (they measure the
// TypeScript API); the core supplies the configurations and the kernels' own time.

/// One shape of the host benchmark: `b` sequences of `length` tokens, `h_q` heads, `s_q`
/// query tokens, `layers` decodes per step (one plan per step, reused by every layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    pub b: usize,
    pub h_q: usize,
    pub s_q: usize,
    pub length: usize,
    pub layers: usize,
}

/// The host benchmark's shapes: on CUDA the table of issue 9 (b = 1, h_q 16, 1024 tokens;
/// b = 128, h_q 16 and 128, 4096 tokens) with 1 and 8 layers per step; on the CPU backend
/// small shapes of the same kinds (and `quick`: the smallest only, for tests).
pub fn host_configs(dev: &Device, quick: bool) -> Vec<HostConfig> {
    let shapes: &[(usize, usize, usize)] = match (dev.is_cuda(), quick) {
        (true, false) => &[(1, 16, 1024), (128, 16, 4096), (128, 128, 4096)],
        (true, true) => &[(1, 16, 1024), (128, 16, 4096)],
        (false, false) => &[(1, 16, 256), (8, 16, 512), (8, 128, 256)],
        (false, true) => &[(2, 16, 128)],
    };
    let layers: &[usize] = if dev.is_cuda() { &[1, 8] } else { &[1, 2] };
    let mut v = Vec::new();
    for &(b, h_q, length) in shapes {
        for &l in layers {
            v.push(HostConfig { b, h_q, s_q: 1, length, layers: l });
        }
    }
    v
}

/// The kernels' own time of one layer, in microseconds: the median over `reps` of (one plan
/// + `layers` decodes into fixed outputs) / `layers`, on random inputs of `cfg`'s shape
/// (each sequence in its own blocks, causal, bf16). On CUDA timed with events around work
/// that was queued entirely behind a long fill kernel, so host launch gaps are not counted;
/// on the CPU the wall time of the same calls (there the host is the device).
pub fn host_kernel_us(dev: &Device, cfg: &HostConfig, reps: usize) -> Result<f64> {
    if cfg.b == 0 || cfg.h_q == 0 || cfg.s_q == 0 || cfg.layers == 0 || reps == 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "host bench config", "b, h_q, s_q, layers and reps >= 1", format!("{cfg:?}, reps {reps}")));
    }
    let lens = vec![cfg.length as i32; cfg.b];
    let (table, max_nb, total_blocks) = own_blocks_table(&lens);
    let seed = DEFAULT_SEED ^ (cfg.b as u64) << 20 ^ (cfg.h_q as u64) << 8 ^ cfg.length as u64;
    let kv = random_tensor(dev, &[total_blocks.max(1), BLOCK_SIZE, 1, HEAD_DIM], DType::BF16, seed, 0.1, 1.0)?;
    let qs = (0..cfg.layers)
        .map(|l| random_tensor(dev, &[cfg.b, cfg.s_q, cfg.h_q, HEAD_DIM], DType::BF16, seed ^ (l as u64 + 1) << 40, 0.1, 1.0))
        .collect::<Result<Vec<_>>>()?;
    let bt = Tensor::from_i32(dev, &table, &[cfg.b, max_nb])?;
    let sl = Tensor::from_i32(dev, &lens, &[cfg.b])?;
    let mut p = plan(&sl, cfg.s_q * cfg.h_q, 1)?;
    let mut out = Tensor::zeros(dev, &[cfg.b, cfg.s_q, cfg.h_q, HEAD_DIM_V], DType::BF16)?;
    let mut lse = Tensor::zeros(dev, &[cfg.b, cfg.h_q, cfg.s_q], DType::F32)?;
    let opts = DecodeOptions { causal: true, ..Default::default() };
    let mut step = |p: &mut Plan| -> Result<()> {
        p.replan(&sl)?;
        for q in &qs {
            decode_into(q, &kv, &bt, &sl, p, &opts, &mut out, &mut lse)?;
        }
        Ok(())
    };
    let mut times = Vec::with_capacity(reps);
    match dev {
        Device::Cuda(g) => {
            step(&mut p)?;
            dev.synchronize()?;
            // A fill of 1 GiB (~0.3 ms) keeps the device busy while the step is queued.
            let mut blocker = Tensor::empty(dev, &[1 << 29], DType::BF16)?;
            let timer = crate::gpu::util::Timer::new(g, g.stream())?;
            for i in 0..reps + 2 {
                crate::gpu::util::fill_random(&mut blocker, i as u64, 1.0, 0.0)?;
                timer.start()?;
                step(&mut p)?;
                let ms = timer.stop()? as f64;
                if i >= 2 {
                    times.push(ms * 1e3);
                }
            }
            dev.synchronize()?;
        }
        Device::Cpu => {
            step(&mut p)?;
            for _ in 0..reps {
                let t0 = Instant::now();
                step(&mut p)?;
                times.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    Ok(median(&times) / cfg.layers as f64)
}

/// The copy ceiling of `dev` in GB/s (bytes read + bytes written), as the contract
/// measures it: on CUDA the median of 10 device-to-device copies of 1 GiB; on the CPU the
/// median of 5 copies of a 256 MiB host buffer (split over the backend's threads, as the
/// decode is).
pub fn copy_ceiling_gbps(dev: &Device) -> Result<f64> {
    match dev {
        Device::Cuda(g) => crate::gpu::util::copy_ceiling_gbps(g, CUDA_COPY_BYTES, 10),
        Device::Cpu => Ok(cpu_copy_ceiling_gbps(CPU_COPY_BYTES, 5)),
    }
}

/// The host copy ceiling: median of `reps` copies of `bytes` bytes (after one untimed
/// copy that also faults the pages in), counting bytes read + written.
pub fn cpu_copy_ceiling_gbps(bytes: usize, reps: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let src: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let mut dst = vec![0u64; words];
    let chunk = words.div_ceil(rayon::current_num_threads().max(1)).max(1);
    let copy = |dst: &mut [u64]| {
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
    };
    copy(&mut dst);
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        copy(&mut dst);
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * (words * 8) as f64 / median(&times) / 1e9
}

/// FlashMLA's times (ms) from an anchors CSV, keyed by [`BenchConfig::label`]. Reads both
/// formats of `bench/anchors/`: the grid file (`peer,b,s_q,mean_sk,h_q,varlen,ms,...`,
/// tag "grid") and the beyond file (`tag,peer,b,s_q,mean_sk,h_q,ms,...`, varlen 0,
/// mean_sk 0 for the imbalanced batch). Only `peer == flashmla` rows (when there is a peer
/// column); `#` lines and blank lines are skipped.
pub fn load_anchors(csv_text: &str) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    let mut header: Vec<String> = Vec::new();
    for line in csv_text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if header.is_empty() {
            header = f.iter().map(|s| s.to_string()).collect();
            continue;
        }
        let col = |k: &str| header.iter().position(|h| h == k);
        let get = |k: &str, default: &'static str| col(k).and_then(|i| f.get(i).copied()).unwrap_or(default);
        if col("peer").is_some() && get("peer", "") != "flashmla" {
            continue;
        }
        let Ok(ms) = get("ms", "").parse::<f64>() else { continue };
        let key = format!("{}/{}/{}/{}/{}", get("tag", "grid"), get("s_q", ""), get("mean_sk", ""), get("h_q", ""), get("varlen", "0"));
        m.insert(key, ms);
    }
    m
}

/// The anchor time of `cfg`, when it is one of FlashMLA's shapes and the anchors have it.
pub fn anchor_ms(anchors: &HashMap<String, f64>, cfg: &BenchConfig) -> Option<f64> {
    if !cfg.is_flashmla_shape() {
        return None;
    }
    anchors.get(&cfg.label()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRID: &str = "# comment\n# more\npeer,b,s_q,mean_sk,h_q,varlen,ms,tflops,gbps\n\
        flashmla,128,1,4096,16,0,0.2532,72,2403\ntriton,128,1,4096,16,0,0.5284,35,1151\n\
        flashmla,128,2,16384,128,1,2.7602,425,906\r\n";
    const BEYOND: &str = "# beyond\ntag,peer,b,s_q,mean_sk,h_q,ms,tflops,gbps\n\
        short,flashmla,128,1,1024,16,0.0790,58,1968\nimbalanced,flashmla,4,4,0,16,0.1003,74,617\n\
        mtp,flashmla,128,8,4096,128,2.6480,441,336\n";

    #[test]
    fn anchors_parse_both_formats() {
        let a = load_anchors(GRID);
        assert_eq!(a.len(), 2, "{a:?}");
        assert_eq!(a["grid/1/4096/16/0"], 0.2532);
        assert_eq!(a["grid/2/16384/128/1"], 2.7602);
        let b = load_anchors(BEYOND);
        assert_eq!(b.len(), 3, "{b:?}");
        assert_eq!(b["short/1/1024/16/0"], 0.079);
        assert_eq!(b["imbalanced/4/0/16/0"], 0.1003);
        assert_eq!(b["mtp/8/4096/128/0"], 2.648);
        assert!(load_anchors("").is_empty());
        assert!(load_anchors("# only a comment\n").is_empty());
    }

    #[test]
    fn anchors_match_flashmla_shapes_only() {
        let mut a = load_anchors(GRID);
        a.extend(load_anchors(BEYOND));
        let g = BenchConfig::new("grid", 128, 1, 4096, 16, false);
        assert_eq!(anchor_ms(&a, &g), Some(0.2532));
        // The same label at another batch size is not FlashMLA's shape.
        assert_eq!(anchor_ms(&a, &BenchConfig { b: 8, ..g.clone() }), None);
        let imb = beyond_configs().into_iter().find(|c| c.tag == "imbalanced" && c.s_q == 4).unwrap();
        assert_eq!(imb.label(), "imbalanced/4/0/16/0");
        assert_eq!(anchor_ms(&a, &imb), Some(0.1003));
        // Every configuration of the real anchor files has a key our configurations produce.
        for c in grid_configs(&GRID_MEANS).iter().chain(beyond_configs().iter()) {
            assert!(c.is_flashmla_shape());
        }
    }

    /// An anchor file of the repository (bench/anchors/); a missing one fails the test.
    fn anchor_file(name: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/anchors/").to_string() + name;
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (the anchors live in the repository's bench/anchors/)"))
    }

    #[test]
    fn real_anchor_files_cover_the_suite() {
        // The H200 file (one file, grid and beyond) and the older H100 pair: each has every
        // configuration of the flashmla suite, and nothing else.
        let h200 = load_anchors(&anchor_file("flashmla-h200.csv"));
        let mut h100 = load_anchors(&anchor_file("flashmla-h100.csv"));
        h100.extend(load_anchors(&anchor_file("flashmla-h100-beyond.csv")));
        for a in [&h200, &h100] {
            for c in suite_configs("flashmla", false).unwrap() {
                assert!(anchor_ms(a, &c).is_some(), "no anchor for {}", c.label());
            }
            assert_eq!(a.len(), 48 + 8);
        }
        assert_eq!(h200["grid/1/4096/16/0"], 0.1788);
    }

    #[test]
    fn formulas_match_the_anchors_rates() {
        // grid/1/4096/16/0: FlashMLA's 0.2532 ms is 2403 GB/s and 72 TFLOPS in its file.
        let lens = vec![4096; 128];
        let bytes = decode_bytes(&lens, 1, 16);
        assert_eq!(bytes, ((128 * 4096 * 576 + 128 * 16 * 576 + 128 * 16 * 512) * 2) as f64);
        assert_eq!(bytes, 608_436_224.0);
        let flops = decode_flops(&lens, 1, 16);
        assert_eq!(flops, 18_253_611_008.0);
        let m = Measurement::from_times(&lens, 1, 16, &[0.3, 0.2532, 0.25]);
        assert_eq!(m.ms, 0.2532);
        assert_eq!((m.min_ms, m.max_ms, m.reps, m.b, m.total_seqlen), (0.25, 0.3, 3, 128, 524_288));
        assert_eq!(m.gbps.round(), 2403.0);
        assert_eq!(m.tflops.round(), 72.0);
        // mtp/8/4096/128/0: 2.6480 ms -> 441 TFLOPS, 336 GB/s.
        let lens = vec![4096; 128];
        let m = Measurement::from_times(&lens, 8, 128, &[2.648]);
        assert_eq!(m.tflops.round(), 441.0);
        assert_eq!(m.gbps.round(), 336.0);
    }

    #[test]
    fn suites_and_labels() {
        let full = suite_configs("flashmla", false).unwrap();
        assert_eq!(full.len(), 48 + 8);
        assert_eq!(full[0].label(), "grid/1/4096/16/0");
        assert_eq!(full[1].label(), "grid/1/4096/16/1");
        assert_eq!(suite_configs("flashmla", true).unwrap().len(), 16 + 8);
        assert_eq!(cpu_configs(false).len(), 16 + 2 + 4);
        assert!(cpu_configs(false).iter().all(|c| c.b <= 8));
        assert!(suite_configs("nope", false).is_err());
        for c in tiny_configs().iter().chain(cpu_configs(false).iter()).chain(full.iter()) {
            c.validate().unwrap();
        }
        assert!(BenchConfig { lens: Some(vec![1]), ..BenchConfig::new("x", 2, 1, 0, 16, false) }.validate().is_err());
    }

    #[test]
    fn seqlens_are_deterministic_and_in_range() {
        let grid = grid_configs(&GRID_MEANS);
        // The draws of the old gpu_bench example: one stream over the varlen grid configs.
        let mut rng = Rng::new(DEFAULT_SEED);
        for c in grid.iter().filter(|c| c.varlen) {
            let want: Vec<i32> = (0..c.b).map(|_| ((c.mean as f64 + rng.normal() * c.mean as f64 / 2.0).round() as i64).max(c.s_q as i64) as i32).collect();
            assert_eq!(seqlens_for(c, DEFAULT_SEED), want, "{}", c.label());
        }
        for c in grid.iter().chain(cpu_configs(false).iter()).chain(tiny_configs().iter()) {
            let l = seqlens_for(c, 7);
            assert_eq!(l, seqlens_for(c, 7));
            assert_eq!(l.len(), c.b);
            if c.varlen {
                assert!(l.iter().all(|&x| x >= c.s_q as i32));
                assert!(l.iter().any(|&x| x != c.mean as i32));
            } else if c.lens.is_none() {
                assert!(l.iter().all(|&x| x == c.mean as i32));
            }
        }
    }

    #[test]
    fn table_maps_each_sequence_to_its_own_blocks() {
        let (t, max_nb, total) = own_blocks_table(&[64, 65, 0, 1]);
        assert_eq!((max_nb, total), (2, 4));
        assert_eq!(&t[..2], &[0, BLOCK_TABLE_PAD]);
        assert_eq!(&t[2..4], &[1, 2]);
        assert_eq!(&t[4..6], &[BLOCK_TABLE_PAD, BLOCK_TABLE_PAD]);
        assert_eq!(&t[6..8], &[3, BLOCK_TABLE_PAD]);
    }

    #[test]
    fn cpu_random_inputs_are_not_zeros() {
        let t = random_tensor(&Device::Cpu, &[3, 1000], DType::BF16, 1, 0.1, 1.0).unwrap();
        let v = t.to_f32().unwrap();
        let nonzero = v.iter().filter(|&&x| x != 0.0).count();
        assert!(nonzero > 2900, "{nonzero}");
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01 && (var.sqrt() - 0.1).abs() < 0.01, "mean {mean} std {}", var.sqrt());
        assert!(v.iter().all(|x| x.abs() <= 1.0));
    }

    #[test]
    fn run_config_on_the_cpu() {
        for c in tiny_configs() {
            let m = run_config(&Device::Cpu, &c, DType::BF16, 3, DEFAULT_SEED).unwrap();
            assert_eq!(m.reps, 3);
            assert!(m.ms > 0.0 && m.gbps > 0.0 && m.tflops > 0.0, "{m:?}");
            assert!(m.min_ms <= m.ms && m.ms <= m.max_ms);
            let lens = seqlens_for(&c, DEFAULT_SEED);
            assert_eq!(m.bytes, decode_bytes(&lens, c.s_q, c.h_q));
        }
        assert!(run_config(&Device::Cpu, &tiny_configs()[0], DType::BF16, 0, 1).is_err());
        assert!(run_config(&Device::Cpu, &tiny_configs()[0], DType::F32, 1, 1).is_err());
    }

    #[test]
    fn invariant_and_default_plans_on_the_same_inputs() {
        let c = &tiny_configs()[1];
        let ms = run_config_plans(&Device::Cpu, c, DType::BF16, 2, DEFAULT_SEED, &[PlanOptions::invariant(), PlanOptions::default()]).unwrap();
        assert_eq!(ms.len(), 2);
        for m in &ms {
            assert_eq!(m.reps, 2);
            assert!(m.ms > 0.0 && m.bytes == ms[0].bytes, "{m:?}");
        }
    }

    #[test]
    fn host_kernel_time_on_the_cpu() {
        let cfgs = host_configs(&Device::Cpu, true);
        assert!(!cfgs.is_empty() && cfgs.iter().all(|c| c.s_q == 1 && c.layers >= 1));
        assert_eq!(host_configs(&Device::Cpu, false).len(), 6);
        let us = host_kernel_us(&Device::Cpu, &cfgs[0], 2).unwrap();
        assert!(us.is_finite() && us > 0.0, "{us}");
        assert!(host_kernel_us(&Device::Cpu, &HostConfig { layers: 0, ..cfgs[0].clone() }, 2).is_err());
    }

    #[test]
    fn cpu_copy_ceiling_is_positive() {
        let g = cpu_copy_ceiling_gbps(8 << 20, 2);
        assert!(g.is_finite() && g > 0.0, "{g}");
    }
}
