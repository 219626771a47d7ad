//! The benchmark's configurations: FlashMLA's grid, the beyond-grid shapes, the CPU
//! backend's reduced grid, the tests' tiny set, and the lengths of each.

use crate::bench::rng::{fnv1a, Rng};
use crate::device::Device;
use crate::error::{ErrorCode, MlaError, Result};

/// Seed of the benchmark's random lengths and inputs: with it, the varlen lengths of
/// FlashMLA's grid are the ones the `gpu_bench` example always drew.
pub const DEFAULT_SEED: u64 = 0x5EED;
/// Mean lengths of FlashMLA's grid.
pub const GRID_MEANS: [usize; 3] = [4096, 8192, 16384];
/// Batch size of FlashMLA's grid.
pub const GRID_BATCH: usize = 128;
/// The lengths of the "imbalanced" beyond-grid shape (a small batch, one long sequence).
pub const IMBALANCED_LENS: [i32; 4] = [4641, 45118, 1730, 1696];
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
        let bad = |what: &str, expected: &str, got: String| {
            Err(MlaError::arg(ErrorCode::InvalidArgument, &format!("bench config {}: {what}", self.label()), expected, got))
        };
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
