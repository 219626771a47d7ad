//! The CPU backend against a float64 reference, through the public API (and through
//! `mla_core::cpu` directly to vary the plan and the inner-loop build).

mod common;

use common::*;
use mla_core::cpu::{decode_with_isa, CpuDecodeArgs, Isa};
use mla_core::plan::host_plan;
use mla_core::validate::DecodeShape;
use mla_core::{decode, plan, DType, DecodeOptions, Device, Tensor};

const SCALE: f32 = 1.0 / 24.0;

fn bits_of(t: &Tensor) -> Vec<u16> {
    t.to_bytes().unwrap().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// `decode` on Device::Cpu through the public API: (out bits, lse).
fn run_api(inp: &Inputs, causal: bool) -> (Vec<u16>, Vec<f32>) {
    let dev = Device::Cpu;
    let (q, kv, bt, sl) = tensors(inp, &dev);
    let p = plan(&sl, inp.s_q * inp.h_q, 1).unwrap();
    let opts = DecodeOptions { causal, ..Default::default() };
    let r = decode(&q, &kv, &bt, &sl, &p, &opts).unwrap();
    dev.synchronize().unwrap();
    assert_eq!(r.out.shape(), [inp.b, inp.s_q, inp.h_q, DV]);
    assert_eq!(r.out.dtype(), inp.dtype);
    assert_eq!(r.lse.shape(), [inp.b, inp.h_q, inp.s_q]);
    assert_eq!(r.lse.dtype(), DType::F32);
    (bits_of(&r.out), r.lse.to_f32().unwrap())
}

/// The CPU backend with an explicit plan of `parts` parts and a chosen inner-loop build,
/// outputs pre-filled with NaN.
fn run_direct(inp: &Inputs, causal: bool, parts: usize, isa: Isa) -> (Vec<u16>, Vec<f32>) {
    let (meta, splits) = host_plan(&inp.seqlens, parts);
    run_with_plan(inp, causal, &meta, &splits, parts, isa)
}

fn run_with_plan(inp: &Inputs, causal: bool, meta: &[i32], splits: &[i32], parts: usize, isa: Isa) -> (Vec<u16>, Vec<f32>) {
    let shape = DecodeShape { b: inp.b, s_q: inp.s_q, h_q: inp.h_q, h_kv: 1, num_blocks: inp.num_blocks, max_blocks_per_seq: inp.max_blocks, dtype: inp.dtype };
    let args = CpuDecodeArgs {
        shape,
        q: &inp.q,
        kv: &inp.kv,
        block_table: &inp.block_table,
        seqlens: &inp.seqlens,
        metadata: meta,
        num_splits: splits,
        num_parts: parts,
        chunks: None,
        causal,
        scale: SCALE,
    };
    let mut out = vec![0xFFFFu16; inp.b * inp.s_q * inp.h_q * DV];
    let mut lse = vec![f32::NAN; inp.b * inp.h_q * inp.s_q];
    decode_with_isa(&args, &mut out, &mut lse, isa);
    (out, lse)
}

fn shuffled(rng: &mut Rng, v: &[i32]) -> Vec<i32> {
    let mut v = v.to_vec();
    rng.shuffle(&mut v);
    v
}

/// Every h_q of the grid, s_q in {1, 2, 4}, causal or not, lengths around block edges with
/// an empty sequence mixed in; both distributions; shared blocks on every other case.
fn grid(dtype: DType, heads: &[usize], dist_of: impl Fn(usize) -> Dist) {
    let mut rng = Rng::new(&format!("grid {dtype}"));
    let mut case = 0;
    let mut worst: f64 = 0.0;
    for &h_q in heads {
        for s_q in [1, 2, 4] {
            for causal in [false, true] {
                let lens: &[i32] = if h_q * s_q >= 256 { &[1, 65, 140, 0] } else { &[1, 63, 64, 65, 140, 0] };
                let lens = shuffled(&mut rng, lens);
                let inp = make_inputs(&mut rng, s_q, h_q, &lens, dtype, dist_of(case), case % 2 == 1);
                let r = reference(&inp, causal, SCALE);
                let (out, lse) = run_api(&inp, causal);
                let what = format!("{dtype} h_q={h_q} s_q={s_q} causal={causal} lens={lens:?} seed={}", rng.seed);
                worst = worst.max(check(&what, &inp, &out, &lse, &r));
                case += 1;
            }
        }
    }
    println!("worst rel L2 {worst:.3e} over {case} cases");
}

#[test]
fn grid_bf16() {
    grid(DType::BF16, &[1, 3, 16, 64, 128], |c| if c % 3 == 2 { Dist::Normal } else { Dist::Small });
}

#[test]
fn grid_fp16() {
    grid(DType::F16, &[1, 3, 16, 64, 128], |c| if c % 3 == 2 { Dist::Normal } else { Dist::Small });
}

#[test]
fn plain_normal_inputs() {
    let mut rng = Rng::new("normal");
    for dtype in [DType::BF16, DType::F16] {
        for (s_q, causal) in [(1, false), (2, true), (4, true)] {
            let lens = shuffled(&mut rng, &[300, 65, 0, 1000, 7]);
            let inp = make_inputs(&mut rng, s_q, 16, &lens, dtype, Dist::Normal, false);
            let (out, lse) = run_api(&inp, causal);
            check(&format!("normal {dtype} s_q={s_q} causal={causal} seed={}", rng.seed), &inp, &out, &lse, &reference(&inp, causal, SCALE));
        }
    }
}

#[test]
fn long_sequence_4096() {
    let mut rng = Rng::new("long");
    for (dtype, s_q, causal) in [(DType::BF16, 1, false), (DType::F16, 2, true)] {
        let inp = make_inputs(&mut rng, s_q, 16, &[4096, 0, 130, 64], dtype, Dist::Small, true);
        let (out, lse) = run_api(&inp, causal);
        check(&format!("4096 {dtype} s_q={s_q} seed={}", rng.seed), &inp, &out, &lse, &reference(&inp, causal, SCALE));
    }
}

#[test]
fn shared_and_permuted_blocks() {
    let mut rng = Rng::new("shared");
    let lens = [200, 200, 130, 64, 64, 300];
    let inp = make_inputs(&mut rng, 2, 16, &lens, DType::BF16, Dist::Small, true);
    let m = inp.max_blocks;
    // Prefix sharing really happens: sequence 1 starts with sequence 0's three full blocks.
    assert_eq!(inp.block_table[m..m + 3], inp.block_table[..3]);
    assert_eq!(inp.block_table[3 * m], inp.block_table[2 * m]);
    for causal in [false, true] {
        let (out, lse) = run_api(&inp, causal);
        check(&format!("shared causal={causal} seed={}", rng.seed), &inp, &out, &lse, &reference(&inp, causal, SCALE));
    }
}

#[test]
fn nan_tails_and_garbage_entries_are_never_read() {
    let mut rng = Rng::new("poison");
    let lens = [1, 63, 65, 127, 129, 0];
    let mut inp = make_inputs(&mut rng, 1, 16, &lens, DType::BF16, Dist::Small, false);
    // Every row past each sequence's end is NaN, every entry past the used blocks garbage.
    for i in 0..inp.b {
        let l = inp.seqlens[i] as usize;
        let used = nblocks(inp.seqlens[i]);
        if used > 0 {
            let blk = inp.block_table[i * inp.max_blocks + used - 1] as usize;
            for row in l - (used - 1) * BS..BS {
                inp.kv[(blk * BS + row) * D..(blk * BS + row + 1) * D].fill(nan_bits(DType::BF16));
            }
        }
        for j in used..inp.max_blocks {
            inp.block_table[i * inp.max_blocks + j] = GARBAGE;
        }
    }
    let (out, lse) = run_api(&inp, false);
    check(&format!("poison seed={}", rng.seed), &inp, &out, &lse, &reference(&inp, false, SCALE));
}

#[test]
fn empty_batch_rows() {
    let mut rng = Rng::new("empty");
    let inp = make_inputs(&mut rng, 2, 3, &[0, 0, 0], DType::F16, Dist::Small, false);
    for causal in [false, true] {
        let (out, lse) = run_api(&inp, causal);
        assert!(out.iter().all(|&x| x == 0), "out of empty sequences must be 0");
        assert!(lse.iter().all(|&x| x == f32::INFINITY), "lse of empty sequences must be +inf");
    }
}

/// Plans of 1, 2, 7 and 132 parts (with split sequences), both inner-loop builds: every
/// result matches the reference and the others within rounding.
#[test]
fn plans_and_builds_agree() {
    let mut rng = Rng::new("plans");
    for (dtype, s_q, h_q, causal) in [(DType::BF16, 4, 16, true), (DType::F16, 1, 3, false), (DType::BF16, 2, 64, true)] {
        let lens = shuffled(&mut rng, &[1000, 65, 0, 300, 64, 1, 129]);
        let inp = make_inputs(&mut rng, s_q, h_q, &lens, dtype, Dist::Small, true);
        let r = reference(&inp, causal, SCALE);
        let mut results = Vec::new();
        for parts in [1, 2, 7, 132] {
            for isa in [Isa::Portable, Isa::Avx2Fma] {
                let (out, lse) = run_direct(&inp, causal, parts, isa);
                let what = format!("{dtype} s_q={s_q} h_q={h_q} parts={parts} {isa:?} seed={}", rng.seed);
                check(&what, &inp, &out, &lse, &r);
                results.push((what, decode_bits(&out, dtype), lse));
            }
        }
        let (_, o0, l0) = &results[0];
        for (what, o, l) in &results[1..] {
            let d = rel_l2(o, o0);
            assert!(d <= 2e-3, "{what}: differs from parts=1 by rel L2 {d:.2e}");
            for (a, b) in l.iter().zip(l0) {
                assert!(a == b || (a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}: lse {a} vs {b}");
            }
        }
    }
}

/// Split sequences where some segments (and some whole rows) see no key: s_q = 70 > L
/// for the short sequences, causal, many parts.
#[test]
fn keyless_rows_across_splits() {
    let mut rng = Rng::new("keyless");
    let inp = make_inputs(&mut rng, 70, 1, &[65, 130, 3, 200], DType::BF16, Dist::Normal, false);
    let r = reference(&inp, true, SCALE);
    assert!(r.lse.iter().any(|x| x.is_infinite()), "the case must have keyless rows");
    for parts in [1, 2, 7, 132] {
        let (meta, splits) = host_plan(&inp.seqlens, parts);
        if parts == 132 {
            assert!(splits[1] - splits[0] > 1 && splits[2] - splits[1] > 1, "sequences 0 and 1 must be split: {splits:?}");
        }
        let (out, lse) = run_with_plan(&inp, true, &meta, &splits, parts, Isa::detect());
        check(&format!("keyless parts={parts} seed={}", rng.seed), &inp, &out, &lse, &r);
    }
}

/// A plan computed for other lengths (not re-planned) is not trusted blindly.
#[test]
fn stale_plan_still_gives_the_right_answer() {
    let mut rng = Rng::new("stale");
    let inp = make_inputs(&mut rng, 1, 16, &[700, 65, 300], DType::BF16, Dist::Small, false);
    let r = reference(&inp, false, SCALE);
    for other in [[64, 65, 64], [0, 0, 0], [700, 65, 301], [640, 65, 300]] {
        let (meta, splits) = host_plan(&other, 7);
        let (out, lse) = run_with_plan(&inp, false, &meta, &splits, 7, Isa::detect());
        check(&format!("stale plan {other:?} seed={}", rng.seed), &inp, &out, &lse, &r);
    }
}

/// `decode_into` writes every element of caller-owned outputs pre-filled with 0xFF.
#[test]
fn decode_into_writes_every_element() {
    let mut rng = Rng::new("into");
    let dev = Device::Cpu;
    for (dtype, s_q, h_q, causal) in [(DType::BF16, 2, 16, true), (DType::F16, 4, 3, true), (DType::BF16, 1, 128, false)] {
        let lens = shuffled(&mut rng, &[0, 1, 64, 65, 500, 2]);
        let inp = make_inputs(&mut rng, s_q, h_q, &lens, dtype, Dist::Small, false);
        let (q, kv, bt, sl) = tensors(&inp, &dev);
        let p = plan(&sl, s_q * h_q, 1).unwrap();
        let mut out = Tensor::zeros(&dev, &[inp.b, s_q, h_q, DV], dtype).unwrap();
        let mut lse = Tensor::zeros(&dev, &[inp.b, h_q, s_q], DType::F32).unwrap();
        out.fill_bytes(0xFF).unwrap();
        lse.fill_bytes(0xFF).unwrap();
        let opts = DecodeOptions { causal, ..Default::default() };
        // Twice with the same outputs: the second call overwrites the first one's values.
        for _ in 0..2 {
            mla_core::decode::decode_into(&q, &kv, &bt, &sl, &p, &opts, &mut out, &mut lse).unwrap();
            let ob = bits_of(&out);
            let lb = lse.to_f32().unwrap();
            assert!(!ob.contains(&0xFFFF), "an out element was not written");
            assert!(!lb.iter().any(|x| x.is_nan()), "an lse element was not written");
            check(&format!("into {dtype} s_q={s_q} h_q={h_q} seed={}", rng.seed), &inp, &ob, &lb, &reference(&inp, causal, SCALE));
            out.fill_bytes(0x00).unwrap();
            lse.fill_bytes(0x00).unwrap();
        }
    }
}

/// A custom softmax_scale is honoured.
#[test]
fn softmax_scale_is_used() {
    let mut rng = Rng::new("scale");
    let inp = make_inputs(&mut rng, 1, 16, &[150, 3], DType::BF16, Dist::Normal, false);
    let dev = Device::Cpu;
    let (q, kv, bt, sl) = tensors(&inp, &dev);
    let p = plan(&sl, 16, 1).unwrap();
    for scale in [0.5f32, 0.01] {
        let opts = DecodeOptions { softmax_scale: Some(scale), ..Default::default() };
        let res = decode(&q, &kv, &bt, &sl, &p, &opts).unwrap();
        check(&format!("scale {scale} seed={}", rng.seed), &inp, &bits_of(&res.out), &res.lse.to_f32().unwrap(), &reference(&inp, false, scale));
    }
}

/// The checks above can fail: a wrong answer is caught.
#[test]
fn the_checks_catch_wrong_results() {
    let mut rng = Rng::new("harness");
    let inp = make_inputs(&mut rng, 4, 16, &[65, 140, 3], DType::BF16, Dist::Normal, false);
    let causal_ref = reference(&inp, true, SCALE);
    let (out, lse) = run_api(&inp, true);
    check("baseline", &inp, &out, &lse, &causal_ref);
    let fails = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
    // Not causal vs a causal reference.
    let (o2, l2) = run_api(&inp, false);
    assert!(fails(&|| {
        check("non-causal", &inp, &o2, &l2, &causal_ref);
    }));
    // One output row wrong.
    let mut bad = out.clone();
    for x in &mut bad[DV * 5..DV * 6] {
        *x ^= 0x4000;
    }
    assert!(fails(&|| {
        check("bad row", &inp, &bad, &lse, &causal_ref);
    }));
    // An lse off by 1e-4.
    let mut bad_lse = lse.clone();
    bad_lse[7] += 1e-4 * bad_lse[7].abs().max(1.0);
    assert!(fails(&|| {
        check("bad lse", &inp, &out, &bad_lse, &causal_ref);
    }));
    // A keyless row (causal, L = 3 < s_q) given a finite lse.
    let li = 2 * 16 * 4; // sequence 2, head 0, token 0
    assert_eq!(causal_ref.lse[li], f64::INFINITY);
    let mut bad_inf = lse.clone();
    bad_inf[li] = 0.0;
    assert!(fails(&|| {
        check("finite keyless lse", &inp, &out, &bad_inf, &causal_ref);
    }));
}
