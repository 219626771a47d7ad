//! Timing: a configuration's decode steps ([`run_config`]), the host benchmark's kernel
//! time ([`host_kernel_us`]) and the copy ceilings.

use std::time::Instant;

use rayon::prelude::*;

use crate::bench::inputs::{own_blocks_table, random_tensor};
use crate::bench::metrics::Measurement;
use crate::bench::rng::fnv1a;
use crate::bench::stats::median;
use crate::bench::suites::{seqlens_for, BenchConfig, DEFAULT_SEED};
use crate::consts::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};
use crate::decode::{decode_into, DecodeOptions};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{ErrorCode, MlaError, Result};
use crate::plan::{plan, plan_with, Plan, PlanOptions};
use crate::tensor::Tensor;

/// Bytes of the host buffer the CPU copy ceiling copies.
pub const CPU_COPY_BYTES: usize = 256 << 20;
/// Bytes the CUDA copy ceiling copies (the contract's 1 GiB).
pub const CUDA_COPY_BYTES: usize = 1 << 30;

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
    if reps == 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "reps", "at least 1", reps));
    }
    let Prepared { lens, kv, q, bt, sl, mut out, mut lse } = prepare(dev, cfg, dtype, seed)?;
    let ps = plans.iter().map(|o| plan_with(&sl, cfg.s_q * cfg.h_q, 1, o)).collect::<Result<Vec<_>>>()?;
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

/// A diagnostic for issue 9's one-layer steps (`gpu_bench --idle-ms`): `cfg`'s decode on a
/// CUDA device left idle for `idle_ms` before each run, medians over `reps` in ms:
/// `(behind_fill, bare)`. `behind_fill` queues the decode behind a ~25 us fill kernel, so
/// the host's launch is hidden and what remains is the device's own start after idling;
/// `bare` times it from an event recorded on the idle stream, host launch included.
pub fn run_config_after_idle(dev: &Device, cfg: &BenchConfig, reps: usize, idle_ms: f64) -> Result<(f64, f64)> {
    let Device::Cuda(g) = dev else { return Err(MlaError::new(ErrorCode::InvalidArgument, "the idle diagnostic needs a CUDA device")) };
    let Prepared { kv, q, bt, sl, mut out, mut lse, .. } = prepare(dev, cfg, DType::BF16, DEFAULT_SEED)?;
    let p = plan(&sl, cfg.s_q * cfg.h_q, 1)?;
    let opts = DecodeOptions { causal: true, ..Default::default() };
    for _ in 0..3 {
        decode_into(&q, &kv, &bt, &sl, &p, &opts, &mut out, &mut lse)?;
    }
    dev.synchronize()?;
    let mut pad = Tensor::empty(dev, &[32 << 20], DType::BF16)?; // 64 MiB
    let timer = crate::gpu::util::Timer::new(g, g.stream())?;
    let idle = std::time::Duration::from_secs_f64(idle_ms.max(0.0) / 1e3);
    let (mut fill, mut bare) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for i in 0..reps.max(1) {
        std::thread::sleep(idle);
        crate::gpu::util::fill_random(&mut pad, i as u64, 1.0, 0.0)?;
        timer.start()?;
        decode_into(&q, &kv, &bt, &sl, &p, &opts, &mut out, &mut lse)?;
        fill.push(timer.stop()? as f64);
        std::thread::sleep(idle);
        timer.start()?;
        decode_into(&q, &kv, &bt, &sl, &p, &opts, &mut out, &mut lse)?;
        bare.push(timer.stop()? as f64);
    }
    Ok((median(&fill), median(&bare)))
}

/// The inputs and outputs of one configuration on one device (what [`run_config_plans`]
/// and [`run_config_multi`](crate::bench::run_config_multi) time).
pub(crate) struct Prepared {
    /// The lengths measured ([`seqlens_for`]).
    pub lens: Vec<i32>,
    pub kv: Tensor,
    pub q: Tensor,
    pub bt: Tensor,
    pub sl: Tensor,
    pub out: Tensor,
    pub lse: Tensor,
}

/// Random inputs of `cfg` on `dev` from `seed` (never zeros: generated on the device on
/// CUDA), a block table mapping each sequence to its own blocks, and the outputs. The same
/// `seed` gives the same inputs on every device.
pub(crate) fn prepare(dev: &Device, cfg: &BenchConfig, dtype: DType, seed: u64) -> Result<Prepared> {
    cfg.validate()?;
    let lens = seqlens_for(cfg, seed);
    let b = lens.len();
    let (table, max_nb, total_blocks) = own_blocks_table(&lens);
    let data_seed = seed ^ fnv1a(&cfg.label());
    let kv = random_tensor(dev, &[total_blocks.max(1), BLOCK_SIZE, 1, HEAD_DIM], dtype, data_seed ^ 1000, 0.1, 1.0)?;
    let q = random_tensor(dev, &[b, cfg.s_q, cfg.h_q, HEAD_DIM], dtype, data_seed ^ 2000, 0.1, 1.0)?;
    let bt = Tensor::from_i32(dev, &table, &[b, max_nb])?;
    let sl = Tensor::from_i32(dev, &lens, &[b])?;
    let out = Tensor::zeros(dev, &[b, cfg.s_q, cfg.h_q, HEAD_DIM_V], dtype)?;
    let lse = Tensor::zeros(dev, &[b, cfg.h_q, cfg.s_q], DType::F32)?;
    Ok(Prepared { lens, kv, q, bt, sl, out, lse })
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
/// (each sequence in its own blocks, causal, bf16). On the CPU the wall time of the same
/// calls (there the host is the device).
///
/// On CUDA the steps run back to back, as a serving loop runs them: ~50 ms of untimed steps
/// (the clocks settle where sustained load puts them: a compute-bound step draws enough
/// power to lower the SM clock 5-10%), then `reps` steps with an event between each, all
/// queued behind fill kernels so the stream never waits on the host and no launch gap is
/// counted. Should the device still catch up with the host (the event before the last
/// step complete when the last is queued), the stream ran dry and the intervals would
/// hold host time: then each step is timed alone behind a fill instead (as before
/// 2026-12-02; lower by the clock difference on compute-bound shapes).
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
            // A fill of 1 GiB (~0.3 ms) keeps the device busy while steps are queued.
            let mut blocker = Tensor::empty(dev, &[1 << 29], DType::BF16)?;
            let timer = crate::gpu::util::Timer::new(g, g.stream())?;
            let mut alone = Vec::with_capacity(reps);
            for i in 0..reps + 2 {
                crate::gpu::util::fill_random(&mut blocker, i as u64, 1.0, 0.0)?;
                timer.start()?;
                step(&mut p)?;
                let ms = timer.stop()? as f64;
                if i >= 2 {
                    alone.push(ms * 1e3);
                }
            }
            let warm = (50e3 / median(&alone).max(1.0)).ceil().clamp(2.0, 5000.0) as usize;
            for i in 0..4 {
                crate::gpu::util::fill_random(&mut blocker, i as u64, 1.0, 0.0)?;
            }
            for _ in 0..warm {
                step(&mut p)?;
            }
            let stamps = crate::gpu::util::Stamps::new(g, g.stream(), reps)?;
            stamps.record(0)?;
            let mut ran_dry = false;
            for i in 0..reps {
                if i + 1 == reps {
                    ran_dry = stamps.is_complete(i)?;
                }
                step(&mut p)?;
                stamps.record(i + 1)?;
            }
            let back_to_back: Vec<f64> = stamps.intervals_ms()?.into_iter().map(|ms| ms * 1e3).collect();
            times = if ran_dry { alone } else { back_to_back };
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
