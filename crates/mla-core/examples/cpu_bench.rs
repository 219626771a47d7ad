//! CPU backend benchmark.
//!
//! cargo run -p mla-core --release --example cpu_bench -- [--b 8] [--seqlen 4096] [--h-q 16]
//!     [--s-q 1] [--dtype bf16|fp16] [--causal] [--warmup 2] [--iters 10] [--isa auto|portable|avx2]
//!
//! Prints the median time of `decode` on `Device::Cpu` (or of the chosen inner-loop build),
//! with GB/s and GFLOP/s by the contract's formulas:
//! bytes = (sum(seqlens) * 576 + b*s_q*h_q*576 + b*s_q*h_q*512) * 2,
//! flops = 2 * s_q * sum(seqlens) * h_q * (576 + 512).

use std::time::Instant;

use mla_core::cpu::{decode_with_isa, CpuDecodeArgs, Isa};
use mla_core::validate::check_decode;
use mla_core::{decode, plan, DType, DecodeOptions, Device, Tensor, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};

/// SplitMix64 with Box-Muller normals: enough randomness for benchmark inputs.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

fn main() {
    let mut b = 8usize;
    let mut seqlen = 4096usize;
    let mut h_q = 16usize;
    let mut s_q = 1usize;
    let mut dtype = DType::BF16;
    let mut causal = false;
    let mut warmup = 2usize;
    let mut iters = 10usize;
    let mut isa: Option<Isa> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = || args.get(i + 1).unwrap_or_else(|| panic!("{} needs a value", args[i])).clone();
        match args[i].as_str() {
            "--b" => b = val().parse().unwrap(),
            "--seqlen" => seqlen = val().parse().unwrap(),
            "--h-q" => h_q = val().parse().unwrap(),
            "--s-q" => s_q = val().parse().unwrap(),
            "--dtype" => dtype = DType::parse(&val()).expect("dtype bf16 or fp16"),
            "--warmup" => warmup = val().parse().unwrap(),
            "--iters" => iters = val().parse().unwrap(),
            "--isa" => {
                isa = match val().as_str() {
                    "auto" => None,
                    "portable" => Some(Isa::Portable),
                    "avx2" => Some(Isa::Avx2Fma),
                    x => panic!("unknown isa {x}"),
                }
            }
            "--causal" => {
                causal = true;
                i += 1;
                continue;
            }
            x => panic!("unknown argument {x}"),
        }
        i += 2;
    }
    assert!(dtype.is_half(), "dtype must be bf16 or fp16");

    let dev = Device::Cpu;
    let mut rng = Rng(0x5EED_0000_0000_0001 ^ std::process::id() as u64);
    let blocks_per_seq = seqlen.div_ceil(BLOCK_SIZE).max(1);
    let num_blocks = b * blocks_per_seq;
    // Never zeros: N(0,1)/10 clamped to [-1, 1], as the accuracy tests draw them.
    let mut gen = |n: usize| (0..n).map(|_| (rng.normal() / 10.0).clamp(-1.0, 1.0)).collect::<Vec<f32>>();
    let q = Tensor::from_f32(&dev, &gen(b * s_q * h_q * HEAD_DIM), &[b, s_q, h_q, HEAD_DIM], dtype).unwrap();
    let kv = Tensor::from_f32(&dev, &gen(num_blocks * BLOCK_SIZE * HEAD_DIM), &[num_blocks, BLOCK_SIZE, 1, HEAD_DIM], dtype).unwrap();
    // Each sequence has its own blocks, in shuffled order.
    let mut table: Vec<i32> = (0..num_blocks as i32).collect();
    for k in (1..table.len()).rev() {
        let j = (rng.next_u64() % (k as u64 + 1)) as usize;
        table.swap(k, j);
    }
    let block_table = Tensor::from_i32(&dev, &table, &[b, blocks_per_seq]).unwrap();
    let lens = vec![seqlen as i32; b];
    let seqlens = Tensor::from_i32(&dev, &lens, &[b]).unwrap();
    let p = plan(&seqlens, s_q * h_q, 1).unwrap();
    let opts = DecodeOptions { causal, ..Default::default() };

    let shape = check_decode(&q, &kv, &block_table, &seqlens, &p).unwrap();
    let mut out_bits = vec![0u16; b * s_q * h_q * HEAD_DIM_V];
    let mut lse = vec![0f32; b * h_q * s_q];
    let mut step = || match isa {
        None => {
            let r = decode(&q, &kv, &block_table, &seqlens, &p, &opts).unwrap();
            std::hint::black_box(&r.out);
        }
        Some(isa) => {
            let args = CpuDecodeArgs {
                shape,
                q: q.host().unwrap().as_u16(),
                kv: kv.host().unwrap().as_u16(),
                block_table: block_table.host().unwrap().as_i32(),
                seqlens: seqlens.host().unwrap().as_i32(),
                metadata: p.metadata().host().unwrap().as_i32(),
                num_splits: p.num_splits().host().unwrap().as_i32(),
                num_parts: p.num_parts,
                chunks: p.chunks(),
                causal,
                scale: opts.scale(),
            };
            decode_with_isa(&args, &mut out_bits, &mut lse, isa);
            std::hint::black_box(&out_bits);
        }
    };
    for _ in 0..warmup {
        step();
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        step();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let sum_len = (seqlen * b) as f64;
    let rows = (b * s_q * h_q) as f64;
    let bytes = (sum_len * HEAD_DIM as f64 + rows * HEAD_DIM as f64 + rows * HEAD_DIM_V as f64) * 2.0;
    let flops = 2.0 * s_q as f64 * sum_len * h_q as f64 * (HEAD_DIM + HEAD_DIM_V) as f64;
    println!(
        "cpu_bench b={b} seqlen={seqlen} h_q={h_q} s_q={s_q} dtype={dtype} causal={causal} threads={} parts={} isa={}",
        rayon::current_num_threads(),
        p.num_parts,
        match isa {
            None => format!("auto({:?})", Isa::detect()),
            Some(i) => format!("{i:?}"),
        }
    );
    println!(
        "median {:.3} ms (min {:.3}, max {:.3}, {} iters)  {:.2} GB/s  {:.2} GFLOP/s",
        median * 1e3,
        times[0] * 1e3,
        times[times.len() - 1] * 1e3,
        times.len(),
        bytes / median / 1e9,
        flops / median / 1e9
    );
}
