//! Batch-invariant decoding on a CUDA device (issue 11): the plan kernel computes exactly
//! `host_plan_invariant` (also re-planned and inside a captured graph), and a sequence's
//! out and lse bits do not depend on its batchmates, its position or its blocks' placement,
//! for whichever decode kernel runs (MLA_DECODE_KERNEL=mma|tma|ws in the GPU suite's
//! `invariant` stage). The bodies shared with the CPU backend are in common/invariant.rs.
//!
//! Without a usable GPU every test prints "SKIPPED (no GPU: ...)" and returns; with
//! MLA_TEST_DEVICE=cuda (the GPU suite sets it) a missing GPU fails instead.

mod common;

use std::sync::Arc;

use common::invariant::{batch, decode_seq, differing, sequence_is_batch_invariant, Seq};
use common::{Case, Dist, Inputs, Rng, DV};
use mla_core::decode::decode_into;
use mla_core::gpu::graph::capture;
use mla_core::plan::{host_plan_invariant, plan_with, replan_on, InvariantChunks, PlanOptions};
use mla_core::{DType, DecodeOptions, Device, ErrorCode, Tensor};

fn gpu(test: &str) -> Option<Device> {
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

fn small_rule() -> InvariantChunks {
    InvariantChunks { chunk_blocks: 2, max_chunks: 5 }
}

#[test]
fn plan_kernel_equals_host_plan_invariant() {
    let Some(dev) = gpu("plan_kernel_equals_host_plan_invariant") else { return };
    let mut rng = Rng::new("plan_kernel_equals_host_plan_invariant");
    for (b, rows) in [(1, 16), (4, 64), (128, 16), (128, 256), (1000, 32), (3, 1), (12000, 16)] {
        for rule in [InvariantChunks::standard(), small_rule(), InvariantChunks { chunk_blocks: 1 + rng.below(64), max_chunks: 1 + rng.below(16) }] {
            let max = [64, 5000, 40000, 300_000][rng.below(4)];
            let lens: Vec<i32> = (0..b).map(|_| if rng.below(7) == 0 { 0 } else { rng.below(max + 1) as i32 }).collect();
            let sl = Tensor::from_i32(&dev, &lens, &[b]).unwrap();
            let popts = PlanOptions { batch_invariant: true, chunks: Some(rule) };
            let mut p = plan_with(&sl, rows, 1, &popts).unwrap();
            dev.synchronize().unwrap();
            assert!(p.batch_invariant());
            let (meta, splits) = host_plan_invariant(&lens, p.num_parts, rule);
            assert_eq!(p.metadata().to_i32().unwrap(), meta, "metadata, b={b} rows={rows} {rule:?}");
            assert_eq!(p.num_splits().to_i32().unwrap(), splits, "num_splits, b={b} rows={rows} {rule:?}");
            // Re-planned on the device for other lengths: the same rule.
            let lens2: Vec<i32> = lens.iter().map(|&l| if rng.below(3) == 0 { rng.below(max + 1) as i32 } else { l + 1 }).collect();
            p.replan(&Tensor::from_i32(&dev, &lens2, &[b]).unwrap()).unwrap();
            dev.synchronize().unwrap();
            let (meta, splits) = host_plan_invariant(&lens2, p.num_parts, rule);
            assert_eq!(p.metadata().to_i32().unwrap(), meta, "replanned metadata, b={b} rows={rows} {rule:?}");
            assert_eq!(p.num_splits().to_i32().unwrap(), splits, "replanned num_splits, b={b} rows={rows} {rule:?}");
        }
    }
}

#[test]
fn standard_chunks_are_batch_invariant() {
    let Some(dev) = gpu("standard_chunks_are_batch_invariant") else { return };
    // Targets of 1 to 8 chunks (64 blocks each up to 32768 tokens), mates up to 24000.
    sequence_is_batch_invariant(&dev, "cuda standard chunks", None, (2100, 30000), 24000);
}

#[test]
fn small_chunks_are_batch_invariant() {
    let Some(dev) = gpu("small_chunks_are_batch_invariant") else { return };
    // Several chunks to a part: every segment boundary inside a part is a chunk boundary.
    sequence_is_batch_invariant(&dev, "cuda small chunks", Some(small_rule()), (300, 960), 1200);
}

/// Invariant results meet the contract (float64 reference) and agree with the CPU
/// backend's invariant results within rounding (not bit for bit: another backend).
#[test]
fn invariant_results_are_accurate() {
    let Some(dev) = gpu("invariant_results_are_accurate") else { return };
    let mut rng = Rng::new("invariant_results_are_accurate");
    for dtype in [DType::BF16, DType::F16] {
        for (h_q, s_q) in [(16, 1), (32, 1), (64, 2), (128, 2), (3, 4)] {
            // 20000 tokens: 8 chunks of 39 blocks (the cap); fewer rows of reference work for
            // the wide shapes.
            let long = if h_q * s_q <= 32 { 20000 } else { 9000 };
            let lens = vec![0, 1, 63, 64, 65, 2049, 5000, long];
            let inp = Inputs::random(Case::new(dtype, h_q, s_q, lens).shared_blocks(true), rng.below(2) == 1, &mut rng);
            for causal in [true, false] {
                let run = |d: &Device| {
                    let t = inp.tensors(d);
                    let p = plan_with(&t.seqlens, s_q * h_q, 1, &PlanOptions::invariant()).unwrap();
                    let mut out = Tensor::zeros(d, &[inp.b, s_q, h_q, DV], dtype).unwrap();
                    let mut lse = Tensor::zeros(d, &[inp.b, h_q, s_q], DType::F32).unwrap();
                    out.fill_bytes(0xFF).unwrap();
                    lse.fill_bytes(0xFF).unwrap();
                    let opts = DecodeOptions { causal, batch_invariant: true, ..Default::default() };
                    decode_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts, &mut out, &mut lse).unwrap();
                    d.synchronize().unwrap();
                    (out.to_f32().unwrap(), lse.to_f32().unwrap())
                };
                let (out, lse) = run(&dev);
                let (ref_out, ref_lse) = inp.reference(causal, None);
                let what = format!("{dtype:?} h_q={h_q} s_q={s_q} causal={causal} seed={:#x}", inp.seed);
                common::assert_accuracy(&out, &lse, &ref_out, &ref_lse, dtype, &what);
                let (cpu_out, cpu_lse) = run(&Device::Cpu);
                common::assert_close_to_cpu(&out, &lse, &cpu_out, &cpu_lse, dtype, &what);
            }
        }
    }
}

/// replan + decode with an invariant plan captured in a CUDA graph and replayed with new
/// lengths: every replay gives the bits of an eager invariant decode of those lengths.
#[test]
fn graph_replays_of_an_invariant_plan() {
    let Some(dev) = gpu("graph_replays_of_an_invariant_plan") else { return };
    let Device::Cuda(g) = &dev else { unreachable!() };
    let mut rng = Rng::new("graph_replays_of_an_invariant_plan");
    let (h_q, s_q) = (16, 2);
    let lens0 = vec![100, 9000, 0, 3000, 65];
    let case = Case::new(DType::BF16, h_q, s_q, lens0.clone()).max_len(9000);
    let inp = Inputs::random(case, false, &mut rng);
    let t = inp.tensors(&dev);
    let mut seqlens = t.seqlens;
    let mut p = plan_with(&seqlens, s_q * h_q, 1, &PlanOptions::invariant()).unwrap();
    let mut out = Tensor::zeros(&dev, &[lens0.len(), s_q, h_q, DV], DType::BF16).unwrap();
    let mut lse = Tensor::zeros(&dev, &[lens0.len(), h_q, s_q], DType::F32).unwrap();
    let stream: Arc<_> = g.new_stream().unwrap();
    let opts = DecodeOptions { causal: true, stream: Some(stream.clone()), batch_invariant: true, ..Default::default() };
    replan_on(&seqlens, &mut p, Some(stream.clone())).unwrap();
    decode_into(&t.q, &t.kv, &t.block_table, &seqlens, &p, &opts, &mut out, &mut lse).unwrap();
    dev.synchronize().unwrap();
    let graph = {
        let (sl, pp, o, l) = (&seqlens, &mut p, &mut out, &mut lse);
        // SAFETY: every tensor and the plan the graph touches live until the end of the test.
        unsafe {
            capture(&stream, || {
                replan_on(sl, pp, Some(stream.clone()))?;
                decode_into(&t.q, &t.kv, &t.block_table, sl, pp, &opts, o, l)
            })
        }
        .unwrap()
    };
    for lens in [lens0.clone(), vec![9000, 1, 64, 0, 2999], vec![0, 0, 0, 0, 1], vec![4500, 4500, 8999, 2048, 2049]] {
        seqlens.write_bytes(0, mla_core::tensor::as_bytes(&lens)).unwrap();
        out.fill_bytes(0xFF).unwrap();
        lse.fill_bytes(0xFF).unwrap();
        dev.synchronize().unwrap();
        graph.launch().unwrap();
        dev.synchronize().unwrap();
        let inp2 = inp.with_lens(&lens);
        for (i, _) in lens.iter().enumerate() {
            let eager = decode_seq(&dev, &inp2, i, true, None, true);
            let bytes = out.to_bytes().unwrap();
            let rows = s_q * h_q;
            let got: Vec<u16> = bytes[i * rows * DV * 2..(i + 1) * rows * DV * 2].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            let lb = lse.to_bytes().unwrap();
            let got_lse: Vec<u32> = lb[i * rows * 4..(i + 1) * rows * 4].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            assert_eq!(differing(&got, &eager.0), 0, "replay lens={lens:?}: out of seq {i} differs from an eager invariant decode");
            assert_eq!(differing(&got_lse, &eager.1), 0, "replay lens={lens:?}: lse of seq {i} differs from an eager invariant decode");
        }
    }
}

/// A plan made for other lengths is still reported (combine's check), and a default plan
/// is refused where batch_invariant is asked for.
#[test]
fn invariant_plan_errors() {
    let Some(dev) = gpu("invariant_plan_errors") else { return };
    let mut rng = Rng::new("invariant_plan_errors");
    let seqs: Vec<Seq> = [3000, 70].iter().map(|&l| Seq::random(l, 1, 16, DType::BF16, Dist::Small, &mut rng)).collect();
    let inp = batch(&seqs.iter().collect::<Vec<_>>(), 1, 16, DType::BF16, &mut rng);
    let t = inp.tensors(&dev);
    let stale = plan_with(&Tensor::from_i32(&dev, &[1000, 70], &[2]).unwrap(), 16, 1, &PlanOptions::invariant()).unwrap();
    let opts = DecodeOptions { batch_invariant: true, ..Default::default() };
    mla_core::decode(&t.q, &t.kv, &t.block_table, &t.seqlens, &stale, &opts).unwrap();
    let e = dev.synchronize().unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    let dflt = mla_core::plan(&t.seqlens, 16, 1).unwrap();
    let e = mla_core::decode(&t.q, &t.kv, &t.block_table, &t.seqlens, &dflt, &opts).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
}

/// What compute-sanitizer runs (memcheck, racecheck, synccheck) for invariant plans: many
/// chunks to a part (segment boundaries inside parts for the TMA producer), single-chunk
/// and capped sequences, both dtypes, every row tile. Run with --ignored.
#[test]
#[ignore = "run by scripts/gpu-suite.sh (stage invariant) under compute-sanitizer"]
fn sanitizer_invariant() {
    let Some(dev) = gpu("sanitizer_invariant") else { return };
    let mut rng = Rng::new("sanitizer_invariant");
    for (dtype, h_q, s_q, lens) in [
        (DType::BF16, 16, 1, vec![0, 1, 65, 700, 1300]),
        (DType::F16, 16, 2, vec![2, 900, 0]),
        (DType::BF16, 64, 2, vec![300, 64]),
        (DType::BF16, 128, 1, vec![1000]),
    ] {
        let seqs: Vec<Seq> = lens.iter().map(|&l| Seq::random(l, s_q, h_q, dtype, Dist::Small, &mut rng)).collect();
        let inp = batch(&seqs.iter().collect::<Vec<_>>(), s_q, h_q, dtype, &mut rng);
        for i in 0..inp.b {
            let got = decode_seq(&dev, &inp, i, true, Some(small_rule()), true);
            assert!(got.1.iter().all(|&x| !f32::from_bits(x).is_nan()), "lse of seq {i} left poisoned");
        }
    }
}
