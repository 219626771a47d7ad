//! The contract's benchmark on a CUDA device: FlashMLA's grid plus the beyond-grid shapes,
//! with the copy ceiling measured in the same run. A thin wrapper over `mla_core::bench`
//! (which the npm command `mla-decode bench` also uses).
//!
//! cargo run --release -p mla-core --example gpu_bench -- [--quick] [--csv out.csv]
//!     [--anchors flashmla-h100.csv,flashmla-h100-beyond.csv] [--reps 30]
//!     [--matmul-tflops T] [--filter prefix,prefix...] [--device cuda:N|cpu] [--idle-ms X]
//!     [--batch-invariant] [--devices all|0,1,...]
//!
//! --batch-invariant: every configuration is measured with a batch-invariant plan and,
//! on the same inputs with the timed runs alternating, with the default plan; the CSV gains
//! default_ms and vs_default (invariant time / default time), and the geometric mean of
//! vs_default over the grid is printed (the target: at most 1.10).
//!
//! --devices all|LIST: every selected configuration on all those CUDA devices at once (one
//! thread, Device, input set and plan each; `mla_core::bench::run_config_multi`), after the
//! first device alone: a row per device (its median ms, GB/s, TFLOPS), the first device
//! alone, and a total row (the bytes of every device's steps over the wall span from the
//! barrier to the last device done, and the scaling: total / the first device alone, both
//! over their wall spans). The CSV then has tag,b,s_q,mean_sk,h_q,varlen,device,ms,gbps,
//! tflops,scaling with device = the ordinal, `alone:N` or `total`. One GPU works too
//! (scaling about 1); without a CUDA device it is ERR_GPU_UNAVAILABLE. Not with --device
//! or --batch-invariant.
//!
//! --idle-ms X (a diagnostic of issue 9's one-layer steps): after each configuration, its
//! decode after X ms of an idle device, behind a short fill kernel (the host's launch
//! hidden) and bare (from an event on the idle stream), next to the back-to-back median.
//! A timing build (`MLA_NVCC_FLAGS=-DMLA_PHASE_TIMING=1`) also prints the ws kernel's
//! per-phase clocks of each configuration (`phases ...` lines; `kernels/sm90/phase_clock.cuh`).
//!
//! Inputs are random (never zeros), generated on the device; block tables map each
//! sequence to its own blocks; the cache is far larger than L2 for every grid shape.
//! `--device cpu` runs the same FlashMLA suite on the CPU backend (slow: hours).
//! `MLA_FORCE_PORTABLE=1` runs the portable kernels (on Hopper: the compute_80 PTX).

use std::collections::HashMap;
use std::io::Write;

use mla_core::bench::{
    anchor_ms, copy_ceiling_gbps, geomean, load_anchors, open_devices, resolve_devices, run_config_multi, run_config_plans, suite_configs, BenchConfig,
    DEFAULT_SEED,
};
use mla_core::{DType, Device, ErrorCode, MlaError, PlanOptions};

fn main() -> mla_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |k: &str| args.iter().any(|a| a == k);
    let opt = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let quick = flag("--quick");
    let invariant = flag("--batch-invariant");
    let plans = if invariant { vec![PlanOptions::invariant(), PlanOptions::default()] } else { vec![PlanOptions::default()] };
    // --filter tag/s_q/mean/h_q/varlen (prefixes, comma-separated, e.g. grid/1/4096/128,short):
    // run only those.
    let filter = opt("--filter").unwrap_or_default();
    let filters: Vec<&str> = filter.split(',').collect();
    let matmul_tflops: f64 = opt("--matmul-tflops").and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    let reps: usize = opt("--reps").and_then(|s| s.parse().ok()).unwrap_or(30);
    let idle_ms: Option<f64> = opt("--idle-ms").and_then(|s| s.parse().ok());
    let mut anchors = HashMap::new();
    for p in opt("--anchors").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        anchors.extend(load_anchors(&std::fs::read_to_string(p).unwrap_or_default()));
    }
    if let Some(spec) = opt("--devices") {
        if opt("--device").is_some() || invariant {
            return Err(MlaError::new(ErrorCode::InvalidArgument, "--devices: not with --device or --batch-invariant"));
        }
        let configs: Vec<BenchConfig> = suite_configs("flashmla", quick)?.into_iter().filter(|c| filters.iter().any(|f| c.label().starts_with(f))).collect();
        return multi_main(&spec, &configs, reps, opt("--csv"));
    }
    let dev = match opt("--device").as_deref() {
        None | Some("cuda") => Device::cuda(0)?,
        Some("cpu") => Device::cpu(),
        Some(s) => Device::cuda(s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).expect("--device cuda:N or cpu"))?,
    };
    let info = dev.info();
    let ceiling = copy_ceiling_gbps(&dev)?;
    let what = if dev.is_cuda() { "1 GiB device-to-device" } else { "256 MiB host memcpy" };
    let path = info.kernel_path.map(|p| format!(", kernel path {p}")).unwrap_or_default();
    println!("device: {} ({} SMs{path}); copy ceiling {:.0} GB/s ({what}, read + write)", info.name, info.multiprocessors, ceiling);
    if invariant {
        let c = mla_core::InvariantChunks::standard();
        println!("batch-invariant plans: chunks of {} blocks, at most {} per sequence; ms is the invariant plan, default ms the default plan (same inputs, runs alternating)", c.chunk_blocks, c.max_chunks);
    }
    let mut csv = String::from("tag,b,s_q,mean_sk,h_q,varlen,ms,gbps,tflops,pct_copy_ceiling,floor_ms,anchor_ms,speedup");
    csv.push_str(if invariant { ",default_ms,vs_default\n" } else { "\n" });
    println!(
        "{:<10} {:>4} {:>3} {:>6} {:>4} {:>3} {:>9} {:>7} {:>7} {:>6} {:>9} {:>9} {:>7}{}",
        "tag",
        "b",
        "s_q",
        "mean",
        "h_q",
        "var",
        "ms",
        "GB/s",
        "TFLOPS",
        "%copy",
        "floor ms",
        "anchor",
        "speedup",
        if invariant { format!(" {:>10} {:>10}", "default ms", "vs default") } else { String::new() }
    );
    let mut speedups = Vec::new();
    let mut beyond_speedups = Vec::new();
    let (mut vs_grid, mut vs_beyond) = (Vec::new(), Vec::new());
    for c in suite_configs("flashmla", quick)? {
        if !filters.iter().any(|f| c.label().starts_with(f)) {
            continue;
        }
        phase_clock(&dev, None)?; // a timing build's sums start from this configuration
        let ms = run_config_plans(&dev, &c, DType::BF16, reps, DEFAULT_SEED, &plans)?;
        phase_clock(&dev, Some(&c.label()))?;
        if let Some(idle_ms) = idle_ms {
            let (fill, bare) = mla_core::bench::run_config_after_idle(&dev, &c, reps, idle_ms)?;
            println!("after {idle_ms} ms idle {}: behind a fill {fill:.4} ms, bare {bare:.4} ms (back to back {:.4})", c.label(), ms[0].ms);
        }
        let m = &ms[0];
        let vs = ms.get(1).map(|d| (d.ms, m.ms / d.ms));
        if let Some((_, r)) = vs {
            if c.tag == "grid" {
                vs_grid.push(r);
            } else {
                vs_beyond.push(r);
            }
        }
        // The floor: bytes at the copy ceiling or FLOPs at the matmul ceiling, the larger.
        let floor_ms = (m.bytes / (ceiling * 1e9)).max(m.flops / (matmul_tflops * 1e12)) * 1e3;
        let anchor = anchor_ms(&anchors, &c);
        let speed = anchor.map(|a| a / m.ms);
        if let Some(s) = speed {
            if c.tag == "grid" {
                speedups.push(s);
            } else {
                beyond_speedups.push(s);
            }
        }
        println!(
            "{:<10} {:>4} {:>3} {:>6} {:>4} {:>3} {:>9.4} {:>7.0} {:>7.1} {:>5.1}% {:>9.4} {:>9} {:>7}{}",
            c.tag,
            m.b,
            c.s_q,
            c.mean,
            c.h_q,
            c.varlen as u8,
            m.ms,
            m.gbps,
            m.tflops,
            100.0 * m.gbps / ceiling,
            floor_ms,
            anchor.map(|a| format!("{a:.4}")).unwrap_or("-".into()),
            speed.map(|s| format!("{s:.3}x")).unwrap_or("-".into()),
            vs.map(|(d, r)| format!(" {d:>10.4} {r:>9.3}x")).unwrap_or_default()
        );
        csv.push_str(&format!(
            "{},{},{},{},{},{},{:.5},{:.1},{:.2},{:.2},{:.5},{},{}{}\n",
            c.tag,
            m.b,
            c.s_q,
            c.mean,
            c.h_q,
            c.varlen as u8,
            m.ms,
            m.gbps,
            m.tflops,
            100.0 * m.gbps / ceiling,
            floor_ms,
            anchor.map(|a| format!("{a}")).unwrap_or_default(),
            speed.map(|s| format!("{s:.4}")).unwrap_or_default(),
            vs.map(|(d, r)| format!(",{d:.5},{r:.4}")).unwrap_or_default()
        ));
    }
    if let Some(gm) = geomean(&speedups) {
        println!("grid: geometric mean speed-up vs FlashMLA anchors {gm:.3}x over {} configurations; copy ceiling {ceiling:.0} GB/s", speedups.len());
    }
    if let Some(gm) = geomean(&beyond_speedups) {
        println!("beyond: geometric mean speed-up vs FlashMLA anchors {gm:.3}x over {} configurations", beyond_speedups.len());
    }
    if let Some(gm) = geomean(&vs_grid) {
        let worst = vs_grid.iter().cloned().fold(0.0, f64::max);
        println!(
            "grid: batch-invariant / default plan time, geometric mean {gm:.3}x over {} configurations (target <= 1.10), worst {worst:.3}x",
            vs_grid.len()
        );
    }
    if let Some(gm) = geomean(&vs_beyond) {
        println!("beyond: batch-invariant / default plan time, geometric mean {gm:.3}x over {} configurations", vs_beyond.len());
    }
    if let Some(path) = opt("--csv") {
        std::fs::File::create(&path).and_then(|mut f| f.write_all(csv.as_bytes())).expect("writing the CSV");
    }
    Ok(())
}

/// A timing build's per-phase sums of the ws kernel (`kernels/sm90/phase_clock.cuh`) over
/// the launches of one configuration, printed per role as mean clocks per block (a phase
/// that counts, like blocks or segments, prints its total per thread); nothing in a
/// production build. `label` None: only zero them.
fn phase_clock(dev: &Device, label: Option<&str>) -> mla_core::Result<()> {
    let Device::Cuda(g) = dev else { return Ok(()) };
    let Some(v) = g.kernels().take_phase_clock(mla_kernels::entries::MLA_DECODE_BF16_WS64.module, g.stream())? else { return Ok(()) };
    let Some(label) = label else { return Ok(()) };
    // Role: its name, the slot of its block count, its slots that are counts, not clocks.
    for (role, (name, blocks, counts)) in [("producer", 3, &[3][..]), ("wg0", 11, &[11, 14][..]), ("wg1", 11, &[11, 14][..])].iter().enumerate() {
        let row = &v[role * 16..role * 16 + 16];
        let (threads, n) = (row[15].max(1) as f64, row[*blocks].max(1) as f64);
        let cells: Vec<String> =
            (0..15).map(|i| if counts.contains(&i) { format!("{:.1}", row[i] as f64 / threads) } else { format!("{:.0}", row[i] as f64 / n) }).collect();
        println!("phases {label} {name} (threads {}): {}", row[15], cells.join(" "));
    }
    Ok(())
}

/// `--devices`: each configuration on every listed GPU at once; a table and the CSV.
fn multi_main(spec: &str, configs: &[BenchConfig], reps: usize, csv_path: Option<String>) -> mla_core::Result<()> {
    let devs = open_devices(&resolve_devices(spec)?)?;
    for d in &devs {
        let i = d.info();
        let path = i.kernel_path.map(|p| format!(", kernel path {p}")).unwrap_or_default();
        println!("device cuda:{}: {} ({} SMs{path})", i.ordinal, i.name, i.multiprocessors);
    }
    println!(
        "{} GPU(s) at once, median of {reps} steps each; total = bytes of every device's steps / wall span (barrier to last device done); scaling = total / cuda:{} alone (its steps' bytes / its wall span)",
        devs.len(),
        devs[0].info().ordinal
    );
    let mut csv = String::from("tag,b,s_q,mean_sk,h_q,varlen,device,ms,gbps,tflops,scaling\n");
    println!("{:<22} {:>8} {:>9} {:>7} {:>7} {:>8}", "label", "device", "ms", "GB/s", "TFLOPS", "scaling");
    for c in configs {
        let r = run_config_multi(&devs, c, DType::BF16, reps, DEFAULT_SEED)?;
        let key = format!("{},{},{},{},{},{}", c.tag, r.alone.m.b, c.s_q, c.mean, c.h_q, c.varlen as u8);
        let mut row = |device: String, ms: f64, gbps: f64, tflops: f64, scaling: Option<f64>| {
            println!(
                "{:<22} {:>8} {:>9.4} {:>7.0} {:>7.1} {:>8}",
                c.label(),
                device,
                ms,
                gbps,
                tflops,
                scaling.map(|s| format!("{s:.3}x")).unwrap_or_default()
            );
            csv.push_str(&format!("{key},{device},{ms:.5},{gbps:.1},{tflops:.2},{}\n", scaling.map(|s| format!("{s:.4}")).unwrap_or_default()));
        };
        let a = &r.alone;
        row(format!("alone:{}", a.ordinal), a.m.ms, a.m.gbps, a.m.tflops, None);
        for d in &r.devices {
            row(d.ordinal.to_string(), d.m.ms, d.m.gbps, d.m.tflops, None);
        }
        row("total".into(), r.wall_ms / r.reps as f64, r.gbps, r.tflops, Some(r.scaling));
        println!(
            "{}: {} GPU(s) at once {:.0} GB/s in total = {:.3}x cuda:{} alone ({:.0} GB/s over its wall span)",
            c.label(),
            r.devices.len(),
            r.gbps,
            r.scaling,
            a.ordinal,
            r.alone_gbps
        );
    }
    if let Some(path) = csv_path {
        std::fs::File::create(&path).and_then(|mut f| f.write_all(csv.as_bytes())).expect("writing the CSV");
    }
    Ok(())
}
