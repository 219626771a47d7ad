//! The contract's benchmark on a CUDA device: FlashMLA's grid plus the beyond-grid shapes,
//! with the copy ceiling measured in the same run.
//!
//! cargo run --release -p mla-core --example gpu_bench -- [--quick] [--csv out.csv]
//!     [--anchors flashmla-h100.csv] [--reps 30]
//!
//! Inputs are random (never zeros), generated on the device; block tables map each
//! sequence to its own blocks; the cache is far larger than L2 for every grid shape.

use std::collections::HashMap;
use std::io::Write;

use mla_core::decode::decode_into;
use mla_core::gpu::util::{copy_ceiling_gbps, fill_random, Timer};
use mla_core::{plan, DType, DecodeOptions, Device, Tensor, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};

struct Config {
    tag: &'static str,
    b: usize,
    s_q: usize,
    mean: usize,
    h_q: usize,
    varlen: bool,
    lens: Option<Vec<i32>>,
}

/// xorshift64* and Box-Muller: enough for drawing lengths.
struct Rng(u64);
impl Rng {
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

fn seqlens_for(c: &Config, rng: &mut Rng) -> Vec<i32> {
    if let Some(l) = &c.lens {
        return l.clone();
    }
    (0..c.b)
        .map(|_| {
            if c.varlen {
                let x = c.mean as f64 + rng.normal() * c.mean as f64 / 2.0;
                (x.round() as i64).max(c.s_q as i64) as i32
            } else {
                c.mean as i32
            }
        })
        .collect()
}

fn configs(quick: bool) -> Vec<Config> {
    let mut v = Vec::new();
    let means: &[usize] = if quick { &[4096] } else { &[4096, 8192, 16384] };
    for &mean in means {
        for &h_q in &[16, 32, 64, 128] {
            for &s_q in &[1, 2] {
                for &varlen in &[false, true] {
                    v.push(Config { tag: "grid", b: 128, s_q, mean, h_q, varlen, lens: None });
                }
            }
        }
    }
    for &h_q in &[16, 128] {
        v.push(Config { tag: "short", b: 128, s_q: 1, mean: 1024, h_q, varlen: false, lens: None });
    }
    for &s_q in &[4, 1] {
        v.push(Config { tag: "imbalanced", b: 4, s_q, mean: 0, h_q: 16, varlen: false, lens: Some(vec![4641, 45118, 1730, 1696]) });
    }
    for &h_q in &[16, 128] {
        for &s_q in &[4, 8] {
            v.push(Config { tag: "mtp", b: 128, s_q, mean: 4096, h_q, varlen: false, lens: None });
        }
    }
    v
}

fn load_anchors(path: &str) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return m };
    let mut header: Vec<String> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if header.is_empty() {
            header = f.iter().map(|s| s.to_string()).collect();
            continue;
        }
        let get = |k: &str| header.iter().position(|h| h == k).map(|i| f[i]).unwrap_or("");
        if get("peer") != "flashmla" {
            continue;
        }
        let key = if header.iter().any(|h| h == "tag") {
            format!("{}/{}/{}/{}", get("tag"), get("s_q"), get("mean_sk"), get("h_q"))
        } else {
            format!("grid/{}/{}/{}/{}", get("s_q"), get("mean_sk"), get("h_q"), get("varlen"))
        };
        m.insert(key, get("ms").parse().unwrap_or(f64::NAN));
    }
    m
}

fn anchor_key(c: &Config) -> String {
    if c.tag == "grid" {
        format!("grid/{}/{}/{}/{}", c.s_q, c.mean, c.h_q, c.varlen as u8)
    } else {
        format!("{}/{}/{}/{}", c.tag, c.s_q, c.mean, c.h_q)
    }
}

fn main() -> mla_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |k: &str| args.iter().any(|a| a == k);
    let opt = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let quick = flag("--quick");
    // --filter tag/s_q/mean/h_q/varlen (any prefix, e.g. grid/1/4096/128): run only those.
    let filter = opt("--filter").unwrap_or_default();
    let matmul_tflops: f64 = opt("--matmul-tflops").and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    let reps: usize = opt("--reps").and_then(|s| s.parse().ok()).unwrap_or(30);
    let mut anchors = HashMap::new();
    for p in opt("--anchors").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        anchors.extend(load_anchors(p));
    }
    let dev = Device::cuda(0)?;
    let g = match &dev {
        Device::Cuda(g) => g.clone(),
        _ => unreachable!(),
    };
    let info = dev.info();
    let ceiling = copy_ceiling_gbps(&g, 1 << 30, 10)?;
    println!("device: {} ({} SMs); copy ceiling {:.0} GB/s (1 GiB device-to-device, read + write)", info.name, info.multiprocessors, ceiling);
    let mut csv = String::from("tag,b,s_q,mean_sk,h_q,varlen,ms,gbps,tflops,pct_copy_ceiling,floor_ms,anchor_ms,speedup\n");
    println!(
        "{:<10} {:>4} {:>3} {:>6} {:>4} {:>3} {:>9} {:>7} {:>7} {:>6} {:>9} {:>9} {:>7}",
        "tag", "b", "s_q", "mean", "h_q", "var", "ms", "GB/s", "TFLOPS", "%copy", "floor ms", "anchor", "speedup"
    );
    let mut rng = Rng(0x5EED);
    let timer = Timer::new(&g, g.stream())?;
    let mut speedups = Vec::new();
    for (ci, c) in configs(quick).iter().enumerate() {
        let lens = seqlens_for(c, &mut rng);
        if !format!("{}/{}/{}/{}/{}", c.tag, c.s_q, c.mean, c.h_q, c.varlen as u8).starts_with(&filter) {
            continue;
        }
        let b = lens.len();
        let nb: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(BLOCK_SIZE)).collect();
        let max_nb = *nb.iter().max().unwrap();
        let total_blocks: usize = nb.iter().sum();
        let mut table = vec![i32::MAX - 7; b * max_nb];
        let mut next = 0i32;
        for i in 0..b {
            for j in 0..nb[i] {
                table[i * max_nb + j] = next;
                next += 1;
            }
        }
        let mut kv = Tensor::zeros(&dev, &[total_blocks, BLOCK_SIZE, 1, HEAD_DIM], DType::BF16)?;
        fill_random(&mut kv, 1000 + ci as u64, 0.1, 1.0)?;
        let mut q = Tensor::zeros(&dev, &[b, c.s_q, c.h_q, HEAD_DIM], DType::BF16)?;
        fill_random(&mut q, 2000 + ci as u64, 0.1, 1.0)?;
        let bt = Tensor::from_i32(&dev, &table, &[b, max_nb])?;
        let sl = Tensor::from_i32(&dev, &lens, &[b])?;
        let p = plan(&sl, c.s_q * c.h_q, 1)?;
        let mut out = Tensor::zeros(&dev, &[b, c.s_q, c.h_q, HEAD_DIM_V], DType::BF16)?;
        let mut lse = Tensor::zeros(&dev, &[b, c.h_q, c.s_q], DType::F32)?;
        let opts = DecodeOptions { causal: true, ..Default::default() };
        for _ in 0..3 {
            decode_into(&q, &kv, &bt, &sl, &p, &opts, &mut out, &mut lse)?;
        }
        dev.synchronize()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            timer.start()?;
            decode_into(&q, &kv, &bt, &sl, &p, &opts, &mut out, &mut lse)?;
            times.push(timer.stop()? as f64);
        }
        dev.synchronize()?;
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let ms = times[times.len() / 2];
        let total: f64 = lens.iter().map(|&l| l as f64).sum();
        let rows = (b * c.s_q * c.h_q) as f64;
        let bytes = (total * HEAD_DIM as f64 + rows * HEAD_DIM as f64 + rows * HEAD_DIM_V as f64) * 2.0;
        let gbps = bytes / (ms * 1e-3) / 1e9;
        let tflops = 2.0 * c.s_q as f64 * total * c.h_q as f64 * (HEAD_DIM + HEAD_DIM_V) as f64 / (ms * 1e-3) / 1e12;
        // The floor: bytes at the copy ceiling or FLOPs at the matmul ceiling, the larger.
        let flops = tflops * 1e12 * ms * 1e-3;
        let floor_ms = (bytes / (ceiling * 1e9)).max(flops / (matmul_tflops * 1e12)) * 1e3;
        let anchor = anchors.get(&anchor_key(c)).copied();
        let speed = anchor.map(|a| a / ms);
        if let Some(s) = speed {
            if c.tag == "grid" {
                speedups.push(s);
            }
        }
        println!(
            "{:<10} {:>4} {:>3} {:>6} {:>4} {:>3} {:>9.4} {:>7.0} {:>7.1} {:>5.1}% {:>9.4} {:>9} {:>7}",
            c.tag,
            b,
            c.s_q,
            c.mean,
            c.h_q,
            c.varlen as u8,
            ms,
            gbps,
            tflops,
            100.0 * gbps / ceiling,
            floor_ms,
            anchor.map(|a| format!("{a:.4}")).unwrap_or("-".into()),
            speed.map(|s| format!("{s:.3}x")).unwrap_or("-".into())
        );
        csv.push_str(&format!(
            "{},{},{},{},{},{},{:.5},{:.1},{:.2},{:.2},{:.5},{},{}\n",
            c.tag,
            b,
            c.s_q,
            c.mean,
            c.h_q,
            c.varlen as u8,
            ms,
            gbps,
            tflops,
            100.0 * gbps / ceiling,
            floor_ms,
            anchor.map(|a| format!("{a}")).unwrap_or_default(),
            speed.map(|s| format!("{s:.4}")).unwrap_or_default()
        ));
    }
    if !speedups.is_empty() {
        let gm = (speedups.iter().map(|s| s.ln()).sum::<f64>() / speedups.len() as f64).exp();
        println!("grid: geometric mean speed-up vs FlashMLA anchors {gm:.3}x over {} configurations; copy ceiling {ceiling:.0} GB/s", speedups.len());
    }
    if let Some(path) = opt("--csv") {
        std::fs::File::create(&path).and_then(|mut f| f.write_all(csv.as_bytes())).expect("writing the CSV");
    }
    Ok(())
}
