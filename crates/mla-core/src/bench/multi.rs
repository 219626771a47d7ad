//! Several GPUs of one host at once (issue 12): the same configuration on every listed CUDA
//! device concurrently, one thread per device, and the total throughput against the first
//! device measured alone in the same run.
//!
//! Each thread has its own [`Device`] (context, stream, step log), inputs, plan and
//! outputs; it prepares and warms up, then waits at a barrier. The first device then runs
//! its timed loop alone; after a second barrier every device runs it at once. A timed loop
//! enqueues `reps` decodes back to back with a CUDA event between them (no host wait inside
//! the loop): each interval is one step's device time, and the wall span runs from the
//! barrier to the last device's last event. The rates use [`metrics`](crate::bench::metrics)
//! (one home for the formulas): per device bytes / median; in total the bytes of every
//! device's `reps` steps over the wall span, and the same for the device alone, whose ratio
//! is the scaling (about the device count when the GPUs do not slow each other down).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::Instant;

use crate::bench::metrics::{gbps, tflops, Measurement};
use crate::bench::suites::BenchConfig;
use crate::bench::timing::{prepare, Prepared};
use crate::decode::{decode_into, DecodeOptions};
use crate::device::{gpu_status, Device};
use crate::dtype::DType;
use crate::error::{ErrorCode, MlaError, Result};
use crate::gpu::util::Stamps;
use crate::plan::{plan, Plan};

/// One device's timed loop in [`run_config_multi`].
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRun {
    /// The CUDA ordinal.
    pub ordinal: usize,
    /// The device's name.
    pub name: String,
    /// Median and rates of its steps (per step, [`Measurement::from_times`]).
    pub m: Measurement,
    /// From the barrier to its last step done, milliseconds.
    pub wall_ms: f64,
}

/// The result of [`run_config_multi`].
#[derive(Clone, Debug, PartialEq)]
pub struct MultiMeasurement {
    /// The first device alone (the others idle), the same loop and inputs.
    pub alone: DeviceRun,
    /// Every device, all at once, in the order given.
    pub devices: Vec<DeviceRun>,
    /// Timed steps per device.
    pub reps: usize,
    /// From the barrier to the last device done, milliseconds.
    pub wall_ms: f64,
    /// Bytes and FLOPs of every device's `reps` steps together.
    pub bytes: f64,
    pub flops: f64,
    /// `bytes` / `wall_ms` (GB/s) and `flops` / `wall_ms` (TFLOPS): the aggregate.
    pub gbps: f64,
    pub tflops: f64,
    /// The first device alone: its `reps` steps' bytes over its own wall span (GB/s).
    pub alone_gbps: f64,
    /// `gbps / alone_gbps`: the total throughput in units of one GPU's.
    pub scaling: f64,
}

/// The CUDA ordinals of a `--devices` value: `"all"` (every visible device that can be
/// opened) or a comma-separated list of distinct ordinals (`"0,1"`). Without any usable
/// CUDA device `"all"` is `ERR_GPU_UNAVAILABLE` with the reason (never the CPU backend); a
/// malformed list is `ERR_INVALID_ARGUMENT`. Listed ordinals are checked when opened.
pub fn resolve_devices(spec: &str) -> Result<Vec<usize>> {
    let spec = spec.trim();
    if spec == "all" {
        let st = gpu_status();
        let v: Vec<usize> = st.devices.iter().filter(|d| d.kernel_path.is_some()).map(|d| d.ordinal).collect();
        if v.is_empty() || !st.available {
            let why = st.reason.unwrap_or_else(|| format!("{} visible, none usable", st.device_count));
            return Err(MlaError::new(ErrorCode::GpuUnavailable, format!("devices 'all': no usable CUDA device ({why})")));
        }
        return Ok(v);
    }
    let bad = || MlaError::arg(ErrorCode::InvalidArgument, "devices", "'all' or distinct CUDA ordinals like '0,1'", format!("'{spec}'"));
    let mut v = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) || part.len() > 4 {
            return Err(bad());
        }
        let n: usize = part.parse().map_err(|_| bad())?;
        if v.contains(&n) {
            return Err(bad());
        }
        v.push(n);
    }
    Ok(v)
}

/// Opens CUDA device `ordinals[i]` for each i (typed errors, never the CPU backend).
pub fn open_devices(ordinals: &[usize]) -> Result<Vec<Device>> {
    ordinals.iter().map(|&o| Device::cuda(o)).collect()
}

/// One device's prepared work: inputs, plan, outputs, and the events of its loop.
struct Work {
    p: Prepared,
    plan: Plan,
    stamps: Stamps,
}

fn prepare_work(dev: &Device, cfg: &BenchConfig, dtype: DType, reps: usize, seed: u64) -> Result<Work> {
    let Device::Cuda(g) = dev else { return Err(MlaError::new(ErrorCode::InvalidArgument, "run_config_multi: CUDA devices only")) };
    let mut p = prepare(dev, cfg, dtype, seed)?;
    let plan = plan(&p.sl, cfg.s_q * cfg.h_q, 1)?;
    let opts = DecodeOptions { causal: true, ..Default::default() };
    for _ in 0..3 {
        decode_into(&p.q, &p.kv, &p.bt, &p.sl, &plan, &opts, &mut p.out, &mut p.lse)?;
    }
    dev.synchronize()?;
    let stamps = Stamps::new(g, g.stream(), reps)?;
    Ok(Work { p, plan, stamps })
}

/// The timed loop: `reps` decodes back to back, an event between each two. Returns the
/// step times, and when the loop started and its last step was done (host clock).
fn timed(dev: &Device, w: &mut Work, reps: usize) -> Result<(Vec<f64>, Instant, Instant)> {
    let opts = DecodeOptions { causal: true, ..Default::default() };
    let t0 = Instant::now();
    w.stamps.record(0)?;
    for i in 0..reps {
        let p = &mut w.p;
        decode_into(&p.q, &p.kv, &p.bt, &p.sl, &w.plan, &opts, &mut p.out, &mut p.lse)?;
        w.stamps.record(i + 1)?;
    }
    let times = w.stamps.intervals_ms()?;
    let t1 = Instant::now();
    // Device-side errors of the steps (a bad index cannot happen here, but a fault would).
    dev.synchronize()?;
    Ok((times, t0, t1))
}

fn guarded<T>(ordinal: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(MlaError::new(ErrorCode::Cuda, format!("cuda:{ordinal}: the benchmark thread panicked"))))
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

/// Runs `cfg` on every device of `devs` at once (see the module's description): random
/// inputs from `seed` (the same on every device), one plan per device, warm-up, then
/// `reps` timed steps of the first device alone and `reps` timed steps of every device
/// concurrently. `devs` must be distinct CUDA devices (one is fine: the scaling is then
/// about 1). A failure on any device is returned as its typed error, naming the device.
pub fn run_config_multi(devs: &[Device], cfg: &BenchConfig, dtype: DType, reps: usize, seed: u64) -> Result<MultiMeasurement> {
    if devs.is_empty() {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "devices", "at least one CUDA device", "none"));
    }
    if reps == 0 {
        return Err(MlaError::arg(ErrorCode::InvalidArgument, "reps", "at least 1", reps));
    }
    for (i, d) in devs.iter().enumerate() {
        if !d.is_cuda() {
            return Err(MlaError::arg(ErrorCode::InvalidArgument, &format!("devices[{i}]"), "a CUDA device", d.kind()));
        }
        if devs[..i].iter().any(|e| e.same(d)) {
            return Err(MlaError::arg(
                ErrorCode::InvalidArgument,
                &format!("devices[{i}]"),
                "a device not listed before",
                format!("cuda:{} twice", d.info().ordinal),
            ));
        }
    }
    cfg.validate()?;
    let n = devs.len();
    let barrier = Barrier::new(n);
    let failed = AtomicBool::new(false);
    // Per thread: the first device's run alone, and its run with the others (with the
    // loop's start and end), or None when another device failed.
    type Out = (Option<DeviceRun>, Option<(DeviceRun, Instant, Instant)>);
    let results: Vec<Result<Out>> = std::thread::scope(|s| {
        let handles: Vec<_> = devs
            .iter()
            .enumerate()
            .map(|(i, dev)| {
                let (barrier, failed) = (&barrier, &failed);
                s.spawn(move || -> Result<Out> {
                    let info = dev.info();
                    let ordinal = info.ordinal;
                    let run = |times: &[f64], t0: Instant, t1: Instant, lens: &[i32]| DeviceRun {
                        ordinal,
                        name: info.name.clone(),
                        m: Measurement::from_times(lens, cfg.s_q, cfg.h_q, times),
                        wall_ms: ms_between(t0, t1),
                    };
                    // Every thread reaches both barriers, failed or not (no deadlock).
                    let mut work = guarded(ordinal, || prepare_work(dev, cfg, dtype, reps, seed));
                    if work.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    barrier.wait();
                    let mut alone = None;
                    if i == 0 && !failed.load(Ordering::SeqCst) {
                        if let Ok(w) = work.as_mut() {
                            match guarded(ordinal, || timed(dev, w, reps)) {
                                Ok((t, t0, t1)) => alone = Some(run(&t, t0, t1, &w.p.lens)),
                                Err(e) => {
                                    failed.store(true, Ordering::SeqCst);
                                    work = Err(e);
                                }
                            }
                        }
                    }
                    barrier.wait();
                    let named = |e: MlaError| MlaError { message: format!("cuda:{ordinal}: {}", e.message), ..e };
                    let mut w = work.map_err(named)?;
                    if failed.load(Ordering::SeqCst) {
                        return Ok((None, None));
                    }
                    let (t, t0, t1) = guarded(ordinal, || timed(dev, &mut w, reps)).map_err(named)?;
                    Ok((alone, Some((run(&t, t0, t1, &w.p.lens), t0, t1))))
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(devs)
            .map(|(h, d)| h.join().unwrap_or_else(|_| Err(MlaError::new(ErrorCode::Cuda, format!("cuda:{}: the benchmark thread panicked", d.info().ordinal)))))
            .collect()
    });
    // The first error, in device order; else every run is there.
    let mut alone = None;
    let mut runs = Vec::with_capacity(n);
    for r in results {
        let (a, t) = r?;
        alone = alone.or(a);
        runs.extend(t);
    }
    let alone = alone.ok_or_else(|| MlaError::new(ErrorCode::Cuda, "run_config_multi: the first device's run is missing"))?;
    if runs.len() != n {
        return Err(MlaError::new(ErrorCode::Cuda, "run_config_multi: a device's run is missing"));
    }
    let start = runs.iter().map(|r| r.1).min().expect("one device at least");
    let end = runs.iter().map(|r| r.2).max().expect("one device at least");
    let wall_ms = ms_between(start, end);
    let devices: Vec<DeviceRun> = runs.into_iter().map(|r| r.0).collect();
    let bytes: f64 = devices.iter().map(|d| d.m.bytes * reps as f64).sum();
    let flops: f64 = devices.iter().map(|d| d.m.flops * reps as f64).sum();
    let (total_gbps, alone_gbps) = (gbps(bytes, wall_ms), gbps(alone.m.bytes * reps as f64, alone.wall_ms));
    Ok(MultiMeasurement {
        devices,
        reps,
        wall_ms,
        bytes,
        flops,
        gbps: total_gbps,
        tflops: tflops(flops, wall_ms),
        alone_gbps,
        scaling: total_gbps / alone_gbps,
        alone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::suites::tiny_configs;

    #[test]
    fn device_lists_parse() {
        assert_eq!(resolve_devices("0").unwrap(), vec![0]);
        assert_eq!(resolve_devices("1,0, 3").unwrap(), vec![1, 0, 3]);
        for bad in ["", "0,", ",1", "0,0", "-1", "a", "1.5", "cuda:0", "0;1", "99999"] {
            assert_eq!(resolve_devices(bad).unwrap_err().code, ErrorCode::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn all_without_a_gpu_is_a_typed_error() {
        if gpu_status().available {
            return;
        }
        let e = resolve_devices("all").unwrap_err();
        assert_eq!(e.code, ErrorCode::GpuUnavailable);
        assert!(e.message.contains("no usable CUDA device"), "{e}");
    }

    #[test]
    fn cpu_devices_and_empty_lists_are_refused() {
        let c = &tiny_configs()[0];
        assert_eq!(run_config_multi(&[], c, DType::BF16, 1, 1).unwrap_err().code, ErrorCode::InvalidArgument);
        let e = run_config_multi(&[Device::Cpu], c, DType::BF16, 1, 1).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("devices[0]"), "{e}");
    }
}
