//! The benchmark (`mla_core::bench`) for the `mla-decode bench` command: the suites'
//! configurations, one configuration measured per async task (so that JS can show
//! progress between them), the copy ceiling, and the anchors parser.

use std::collections::HashMap;

use mla_core::bench;
use mla_core::ErrorCode;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::device::{parse_dtype, Device};
use crate::error::{core, err, Result};
use crate::task::CoreTask;

/// One benchmark shape (`mla_core::bench::BenchConfig`).
#[napi(object)]
pub struct BenchConfig {
    /// "grid", "short", "imbalanced", "mtp" (FlashMLA's names), or another tag.
    pub tag: String,
    pub b: u32,
    pub s_q: u32,
    /// Mean length (0 when `lens` is given).
    pub mean: u32,
    pub h_q: u32,
    /// Lengths drawn from Normal(mean, mean/2), clamped to >= s_q.
    pub varlen: bool,
    /// Exact lengths (b of them).
    pub lens: Option<Vec<i32>>,
    /// "tag/s_q/mean/h_q/varlen" (output only: recomputed from the fields on input).
    pub label: String,
    /// Whether this is one of FlashMLA's own shapes, i.e. one the anchor times apply to
    /// (output only).
    pub flashmla_shape: bool,
}

impl BenchConfig {
    fn from_core(c: &bench::BenchConfig) -> BenchConfig {
        BenchConfig {
            tag: c.tag.clone(),
            b: c.b as u32,
            s_q: c.s_q as u32,
            mean: c.mean as u32,
            h_q: c.h_q as u32,
            varlen: c.varlen,
            lens: c.lens.clone(),
            label: c.label(),
            flashmla_shape: c.is_flashmla_shape(),
        }
    }

    fn to_core(&self) -> bench::BenchConfig {
        bench::BenchConfig {
            tag: self.tag.clone(),
            b: self.b as usize,
            s_q: self.s_q as usize,
            mean: self.mean as usize,
            h_q: self.h_q as usize,
            varlen: self.varlen,
            lens: self.lens.clone(),
        }
    }
}

/// The result of one configuration (`mla_core::bench::Measurement`).
#[napi(object)]
pub struct BenchMeasurement {
    /// Median time of one decode step, milliseconds.
    pub ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Timed runs.
    pub reps: u32,
    pub b: u32,
    /// Sum of the lengths measured.
    pub total_seqlen: f64,
    /// The contract's byte and FLOP counts of one step.
    pub bytes: f64,
    pub flops: f64,
    pub gbps: f64,
    pub tflops: f64,
    /// With `batch_invariant`: the default plan's median on the same inputs, milliseconds.
    pub default_ms: Option<f64>,
}

/// The configurations of a suite: "flashmla" (FlashMLA's grid and beyond shapes; `quick`:
/// mean 4096 only), "cpu" (a reduced grid, b = 8) or "tiny" (tests).
#[napi]
pub fn bench_configs(suite: String, quick: Option<bool>) -> Result<Vec<BenchConfig>> {
    let v = core(|| bench::suite_configs(&suite, quick.unwrap_or(false)))?;
    Ok(v.iter().map(BenchConfig::from_core).collect())
}

/// The default suite of a device: "flashmla" on CUDA, "cpu" on the CPU backend.
#[napi]
pub fn bench_default_suite(device: &Device) -> Result<String> {
    Ok(bench::default_suite(device.get()?).to_string())
}

/// FlashMLA's times (ms) from an anchors CSV (either format), keyed by config label.
#[napi]
pub fn bench_load_anchors(csv_text: String) -> Result<HashMap<String, f64>> {
    core(|| Ok(bench::load_anchors(&csv_text)))
}

/// The benchmarks' dtype: bf16 by default, else 'bf16' or 'fp16' (ERR_DTYPE_MISMATCH).
fn half_dtype(dtype: Option<&str>) -> Result<mla_core::DType> {
    let dtype = parse_dtype(dtype.unwrap_or("bf16"))?;
    if !dtype.is_half() {
        return Err(err(ErrorCode::DtypeMismatch, format!("dtype: expected 'bf16' or 'fp16', got '{}'", dtype.name())));
    }
    Ok(dtype)
}

fn seed_of(seed: Option<f64>) -> Result<u64> {
    match seed {
        None => Ok(bench::DEFAULT_SEED),
        Some(s) if s.is_finite() && s >= 0.0 && s.fract() == 0.0 && s <= 9007199254740991.0 => Ok(s as u64),
        Some(s) => Err(err(ErrorCode::InvalidArgument, format!("seed: expected a non-negative integer, got {s}"))),
    }
}

/// Measures one configuration on the libuv thread pool (`mla_core::bench::run_config`):
/// `reps` timed runs (default 30 on CUDA, 5 on the CPU) after warm-up, bf16 by default.
/// `batch_invariant`: a batch-invariant plan, and the default plan on the same inputs
/// (`run_config_plans`, runs alternating) for `default_ms`.
#[napi(ts_return_type = "Promise<BenchMeasurement>")]
pub fn bench_run(
    device: &Device,
    config: BenchConfig,
    reps: Option<u32>,
    dtype: Option<String>,
    seed: Option<f64>,
    batch_invariant: Option<bool>,
) -> Result<AsyncTask<BenchRunTask>> {
    let dev = device.get()?.clone();
    let dtype = half_dtype(dtype.as_deref())?;
    let cfg = config.to_core();
    core(|| cfg.validate())?;
    let reps = reps.unwrap_or(if dev.is_cuda() { 30 } else { 5 }) as usize;
    if reps == 0 {
        return Err(err(ErrorCode::InvalidArgument, "reps: expected at least 1, got 0"));
    }
    let seed = seed_of(seed)?;
    let batch_invariant = batch_invariant.unwrap_or(false);
    Ok(CoreTask::new(
        move || {
            // The plan measured, then (batch-invariant runs) the default plan.
            let plans = if batch_invariant {
                vec![mla_core::PlanOptions::invariant(), mla_core::PlanOptions::default()]
            } else {
                vec![mla_core::PlanOptions::default()]
            };
            core(|| bench::run_config_plans(&dev, &cfg, dtype, reps, seed, &plans))
        },
        |ms: Vec<bench::Measurement>| BenchMeasurement {
            default_ms: ms.get(1).map(|d| d.ms),
            ms: ms[0].ms,
            min_ms: ms[0].min_ms,
            max_ms: ms[0].max_ms,
            reps: ms[0].reps as u32,
            b: ms[0].b as u32,
            total_seqlen: ms[0].total_seqlen as f64,
            bytes: ms[0].bytes,
            flops: ms[0].flops,
            gbps: ms[0].gbps,
            tflops: ms[0].tflops,
        },
    ))
}

/// `benchRun`'s work: the measurements of the plan measured, then (batch-invariant runs)
/// the default plan.
pub type BenchRunTask = CoreTask<Vec<bench::Measurement>, BenchMeasurement>;

/// The copy ceiling of a device in GB/s (bytes read + written) on the libuv thread pool:
/// 1 GiB device-to-device on CUDA, a 256 MiB host copy on the CPU backend.
#[napi(ts_return_type = "Promise<number>")]
pub fn bench_copy_ceiling(device: &Device) -> Result<AsyncTask<CopyCeilingTask>> {
    let dev = device.get()?.clone();
    Ok(CoreTask::new(move || core(|| bench::copy_ceiling_gbps(&dev)), |g| g))
}

pub type CopyCeilingTask = CoreTask<f64, f64>;

/// One shape of the host benchmark (`mla_core::bench::HostConfig`).
#[napi(object)]
pub struct HostConfig {
    pub b: u32,
    pub h_q: u32,
    pub s_q: u32,
    /// Tokens per sequence.
    pub length: u32,
    /// Decodes per step (one plan per step).
    pub layers: u32,
}

impl HostConfig {
    fn to_core(&self) -> bench::HostConfig {
        bench::HostConfig { b: self.b as usize, h_q: self.h_q as usize, s_q: self.s_q as usize, length: self.length as usize, layers: self.layers as usize }
    }
}

/// The host benchmark's shapes for a device (`mla_core::bench::host_configs`).
#[napi]
pub fn bench_host_configs(device: &Device, quick: Option<bool>) -> Result<Vec<HostConfig>> {
    let d = device.get()?;
    Ok(bench::host_configs(d, quick.unwrap_or(false))
        .into_iter()
        .map(|c| HostConfig { b: c.b as u32, h_q: c.h_q as u32, s_q: c.s_q as u32, length: c.length as u32, layers: c.layers as u32 })
        .collect())
}

/// The kernels' own time of one layer in microseconds (`mla_core::bench::host_kernel_us`),
/// on the libuv thread pool.
#[napi(ts_return_type = "Promise<number>")]
pub fn bench_host_kernel_us(device: &Device, config: HostConfig, reps: Option<u32>) -> Result<AsyncTask<HostKernelTask>> {
    let (dev, cfg, reps) = (device.get()?.clone(), config.to_core(), reps.unwrap_or(20) as usize);
    Ok(CoreTask::new(move || core(|| bench::host_kernel_us(&dev, &cfg, reps)), |us| us))
}

pub type HostKernelTask = CoreTask<f64, f64>;

/// The host breakdown's phase log (`mla_core::trace`): `on` starts recording (clearing the
/// log), `false` stops it.
#[napi]
pub fn bench_trace(on: bool) {
    mla_core::trace::enable(on);
}

/// A mark from the JS side, on the same clock as the native ones.
#[napi]
pub fn bench_trace_mark(label: String) {
    mla_core::trace::mark_owned(label);
}

/// The marks recorded since the last take, in order.
#[napi(object)]
pub struct TraceLog {
    pub labels: Vec<String>,
    /// CLOCK_MONOTONIC, nanoseconds (the clock of process.hrtime).
    pub ns: Vec<f64>,
}

#[napi]
pub fn bench_trace_take() -> TraceLog {
    let v = mla_core::trace::take();
    TraceLog { labels: v.iter().map(|(l, _)| l.to_string()).collect(), ns: v.iter().map(|(_, t)| *t as f64).collect() }
}

/// Facts about the device's host path that a breakdown reports with its numbers: whether
/// the step flags are mapped host memory (else device memory, copied).
#[napi]
pub fn bench_host_path_info(device: &Device) -> Result<String> {
    Ok(match device.get()? {
        mla_core::Device::Cuda(g) => format!("step flags {}", if g.step_flags_mapped() { "mapped" } else { "device (copied)" }),
        mla_core::Device::Cpu => "cpu backend".to_string(),
    })
}

/// A stand-in for the wait of an awaited decode on the libuv pool: `compute` spins until
/// `spin_us` after the call (as a CUDA event wait spins), then the promise resolves with
/// that deadline (CLOCK_MONOTONIC ns). The JS side's resume time minus the deadline is the
/// pool path's completion latency (uv_async_send, the JS thread's wake, the resolution).
pub struct CompletionStub {
    deadline: u64,
}

impl Task for CompletionStub {
    type Output = f64;
    type JsValue = f64;
    fn compute(&mut self) -> napi::Result<f64> {
        while mla_core::trace::now_ns() < self.deadline {
            std::hint::spin_loop();
        }
        Ok(self.deadline as f64)
    }
    fn resolve(&mut self, _env: Env, v: f64) -> napi::Result<f64> {
        Ok(v)
    }
}

#[napi(ts_return_type = "Promise<number>")]
pub fn bench_completion_stub(spin_us: f64) -> AsyncTask<CompletionStub> {
    AsyncTask::new(CompletionStub { deadline: mla_core::trace::now_ns() + (spin_us.max(0.0) * 1e3) as u64 })
}

/// CLOCK_MONOTONIC ns (the clock of the trace marks and of process.hrtime).
#[napi]
pub fn bench_now_ns() -> f64 {
    mla_core::trace::now_ns() as f64
}

// The contract's formulas (`mla_core::bench::metrics`): one home, for the CLI and the TS
// benchmark too. Lengths come as a plain array of numbers (each a length in tokens).

fn lens_i32(seqlens: &[f64]) -> Vec<i32> {
    seqlens.iter().map(|&l| l as i32).collect()
}

/// Bytes one decode step moves, the contract's GB/s numerator:
/// (sum(seqlens) * 576 + b*s_q*h_q*576 + b*s_q*h_q*512) * 2 (`bench::decode_bytes`).
#[napi]
pub fn bench_decode_bytes(seqlens: Vec<f64>, s_q: u32, h_q: u32) -> f64 {
    bench::decode_bytes(&lens_i32(&seqlens), s_q as usize, h_q as usize)
}

/// Floating-point operations of one decode step, the contract's TFLOPS numerator:
/// 2 * s_q * sum(seqlens) * h_q * (576 + 512) (`bench::decode_flops`).
#[napi]
pub fn bench_decode_flops(seqlens: Vec<f64>, s_q: u32, h_q: u32) -> f64 {
    bench::decode_flops(&lens_i32(&seqlens), s_q as usize, h_q as usize)
}

/// `bytes` moved in `ms` milliseconds, in GB/s (1e9 bytes per second; `bench::gbps`).
#[napi]
pub fn bench_gbps(bytes: f64, ms: f64) -> f64 {
    bench::gbps(bytes, ms)
}

/// `flops` done in `ms` milliseconds, in TFLOPS (1e12 per second; `bench::tflops`).
#[napi]
pub fn bench_tflops(flops: f64, ms: f64) -> f64 {
    bench::tflops(flops, ms)
}

/// The floor of a step in milliseconds (the CLI's `floor_ms` column): its bytes at the copy
/// ceiling `copyGbps`, or its FLOPs at the matmul ceiling `matmulTflops` when given and
/// finite, the larger (`bench::floor_ms`).
#[napi]
pub fn bench_floor_ms(bytes: f64, flops: f64, copy_gbps: f64, matmul_tflops: Option<f64>) -> f64 {
    bench::floor_ms(bytes, flops, copy_gbps, matmul_tflops)
}

// Several GPUs at once (issue 12): `mla_core::bench::multi`.

/// The CUDA ordinals of a `--devices` value, "all" or "0,1" (`bench::resolve_devices`):
/// ERR_GPU_UNAVAILABLE for "all" without a usable CUDA device, ERR_INVALID_ARGUMENT for a
/// malformed list.
#[napi]
pub fn bench_resolve_devices(spec: String) -> Result<Vec<u32>> {
    Ok(core(|| bench::resolve_devices(&spec))?.into_iter().map(|o| o as u32).collect())
}

/// One device's run in `benchRunMulti` (`mla_core::bench::DeviceRun`).
#[napi(object)]
pub struct BenchDeviceRun {
    pub ordinal: u32,
    pub name: String,
    /// Median ms of its steps and the rates at the median.
    pub ms: f64,
    pub gbps: f64,
    pub tflops: f64,
    /// From the barrier to its last step done, milliseconds.
    pub wall_ms: f64,
}

/// The result of `benchRunMulti` (`mla_core::bench::MultiMeasurement`).
#[napi(object)]
pub struct BenchMultiMeasurement {
    /// The first device alone, then every device at once.
    pub alone: BenchDeviceRun,
    pub devices: Vec<BenchDeviceRun>,
    pub reps: u32,
    /// From the barrier to the last device done, milliseconds.
    pub wall_ms: f64,
    pub bytes: f64,
    pub flops: f64,
    /// bytes / wall span, flops / wall span: the aggregate.
    pub gbps: f64,
    pub tflops: f64,
    /// The first device alone: its steps' bytes over its own wall span.
    pub alone_gbps: f64,
    /// gbps / alone_gbps.
    pub scaling: f64,
}

fn device_run(d: &bench::DeviceRun) -> BenchDeviceRun {
    BenchDeviceRun { ordinal: d.ordinal as u32, name: d.name.clone(), ms: d.m.ms, gbps: d.m.gbps, tflops: d.m.tflops, wall_ms: d.wall_ms }
}

/// Measures one configuration on the CUDA devices `ordinals` at once, on the libuv thread
/// pool (`mla_core::bench::run_config_multi`: one thread per device; the first device alone
/// first). `reps` timed steps per device (default 30).
#[napi(ts_return_type = "Promise<BenchMultiMeasurement>")]
pub fn bench_run_multi(
    ordinals: Vec<u32>,
    config: BenchConfig,
    reps: Option<u32>,
    dtype: Option<String>,
    seed: Option<f64>,
) -> Result<AsyncTask<BenchMultiTask>> {
    let dtype = half_dtype(dtype.as_deref())?;
    let cfg = config.to_core();
    core(|| cfg.validate())?;
    let reps = reps.unwrap_or(30) as usize;
    let seed = seed_of(seed)?;
    let ordinals: Vec<usize> = ordinals.into_iter().map(|o| o as usize).collect();
    Ok(CoreTask::new(
        move || {
            core(|| {
                let devs = bench::open_devices(&ordinals)?;
                bench::run_config_multi(&devs, &cfg, dtype, reps, seed)
            })
        },
        |m: bench::MultiMeasurement| BenchMultiMeasurement {
            alone: device_run(&m.alone),
            devices: m.devices.iter().map(device_run).collect(),
            reps: m.reps as u32,
            wall_ms: m.wall_ms,
            bytes: m.bytes,
            flops: m.flops,
            gbps: m.gbps,
            tflops: m.tflops,
            alone_gbps: m.alone_gbps,
            scaling: m.scaling,
        },
    ))
}

pub type BenchMultiTask = CoreTask<bench::MultiMeasurement, BenchMultiMeasurement>;
