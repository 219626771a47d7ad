//! Batch-invariant decoding on the CPU backend: a sequence's out and lse bits do not depend
//! on its batchmates, its position, its blocks' placement or the part (thread) count.
//! The same bodies run on CUDA in `gpu_invariant.rs` (common/invariant.rs).

mod common;

use common::invariant::{batch, decode_seq, differing, sequence_is_batch_invariant, Seq};
use common::{Dist, Rng, DV};
use mla_core::cpu::{decode_with_isa, CpuDecodeArgs, Isa};
use mla_core::decode::{decode_auto, DecodeOptions};
use mla_core::plan::{host_plan_invariant, plan_with, InvariantChunks, PlanOptions};
use mla_core::validate::DecodeShape;
use mla_core::{plan, DType, Device, ErrorCode, Tensor};

#[test]
fn standard_chunks_are_batch_invariant() {
    // Targets of 2 to 3 chunks of the standard rule (64 blocks), mates up to 8000 tokens.
    sequence_is_batch_invariant(&Device::Cpu, "cpu standard chunks", None, (4200, 12000), 8000);
}

#[test]
fn small_chunks_are_batch_invariant() {
    // 2-block chunks, at most 5: every target of 5 to 15 blocks is 3 to 5 chunks, most
    // of them several to a part.
    let c = InvariantChunks { chunk_blocks: 2, max_chunks: 5 };
    sequence_is_batch_invariant(&Device::Cpu, "cpu small chunks", Some(c), (300, 960), 1200);
}

/// `mla_core::cpu` directly with invariant plans of 1 to 9 parts and both inner-loop
/// builds: within a build, the whole batch's bits do not depend on the part count.
#[test]
fn part_count_does_not_change_the_bits() {
    let mut rng = Rng::new("part_count_does_not_change_the_bits");
    let c = InvariantChunks { chunk_blocks: 3, max_chunks: 4 };
    let (s_q, h_q, dtype) = (2, 16, DType::F16);
    let seqs: Vec<Seq> = (0..12).map(|_| Seq::random(rng.below(1500), s_q, h_q, dtype, Dist::Small, &mut rng)).collect();
    let inp = batch(&seqs.iter().collect::<Vec<_>>(), s_q, h_q, dtype, &mut rng);
    for isa in [Isa::Portable, Isa::Avx2Fma] {
        if !isa.supported() {
            println!("SKIPPED {isa:?} (not supported by this CPU)");
            continue;
        }
        let mut first: Option<(Vec<u16>, Vec<f32>)> = None;
        for parts in 1..=9 {
            let (meta, splits) = host_plan_invariant(&inp.seqlens, parts, c);
            let args = CpuDecodeArgs {
                shape: DecodeShape { b: inp.b, s_q, h_q, h_kv: 1, num_blocks: inp.num_blocks, max_blocks_per_seq: inp.max_blocks, dtype },
                q: &inp.q,
                kv: &inp.kv,
                block_table: &inp.block_table,
                seqlens: &inp.seqlens,
                metadata: &meta,
                num_splits: &splits,
                num_parts: parts,
                chunks: Some(c),
                causal: true,
                scale: 1.0 / 24.0,
            };
            let mut out = vec![0xFFFFu16; inp.b * s_q * h_q * DV];
            let mut lse = vec![f32::NAN; inp.b * s_q * h_q];
            decode_with_isa(&args, &mut out, &mut lse, isa);
            assert!(lse.iter().all(|x| !x.is_nan()), "{isa:?} parts {parts}: lse left poisoned");
            match &first {
                None => first = Some((out, lse)),
                Some((o, l)) => {
                    assert_eq!(differing(&out, o), 0, "{isa:?}: out of {parts} parts differs from 1 part (lens {:?})", inp.seqlens);
                    let (a, b): (Vec<u32>, Vec<u32>) = (lse.iter().map(|x| x.to_bits()).collect(), l.iter().map(|x| x.to_bits()).collect());
                    assert_eq!(differing(&a, &b), 0, "{isa:?}: lse of {parts} parts differs from 1 part");
                }
            }
        }
    }
}

/// The option through the API: a decode without a plan plans batch-invariantly when asked
/// (same bits as an explicit invariant plan), replans keep the option, and asking for it
/// with a default plan is refused.
#[test]
fn the_option_through_the_api() {
    let mut rng = Rng::new("the_option_through_the_api");
    let (s_q, h_q, dtype) = (1, 16, DType::BF16);
    let seqs: Vec<Seq> = [5000, 0, 3000, 64, 9000].iter().map(|&l| Seq::random(l, s_q, h_q, dtype, Dist::Normal, &mut rng)).collect();
    let inp = batch(&seqs.iter().collect::<Vec<_>>(), s_q, h_q, dtype, &mut rng);
    let dev = Device::Cpu;
    let t = inp.tensors(&dev);
    let explicit = decode_seq(&dev, &inp, 4, false, None, true);

    let opts = DecodeOptions { batch_invariant: true, ..Default::default() };
    let r = decode_auto(&t.q, &t.kv, &t.block_table, &t.seqlens, None, &opts).unwrap();
    dev.wait_step(r.step).unwrap();
    let bits: Vec<u16> = r.out.to_bytes().unwrap().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    assert_eq!(differing(&bits[4 * h_q * DV..], &explicit.0), 0, "decode without a plan, batch_invariant: true");

    let dflt = plan(&t.seqlens, h_q, 1).unwrap();
    assert!(!dflt.batch_invariant());
    let e = decode_auto(&t.q, &t.kv, &t.block_table, &t.seqlens, Some(&dflt), &opts).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.contains("batch-invariant"), "{e}");

    let c = InvariantChunks { chunk_blocks: 7, max_chunks: 3 };
    let mut p = plan_with(&t.seqlens, h_q, 1, &PlanOptions { batch_invariant: true, chunks: Some(c) }).unwrap();
    assert_eq!(p.chunks(), Some(c));
    assert!(format!("{p:?}").contains("batch-invariant"));
    let grown = Tensor::from_i32(&dev, &[5001, 1, 3064, 0, 9100], &[5]).unwrap();
    p.replan(&grown).unwrap();
    assert_eq!(p.chunks(), Some(c), "replan keeps the chunk rule");
    let (meta, splits) = host_plan_invariant(&[5001, 1, 3064, 0, 9100], p.num_parts, c);
    assert_eq!(p.metadata().to_i32().unwrap(), meta);
    assert_eq!(p.num_splits().to_i32().unwrap(), splits);

    let bad = InvariantChunks { chunk_blocks: 0, max_chunks: 3 };
    let e = plan_with(&t.seqlens, h_q, 1, &PlanOptions { batch_invariant: true, chunks: Some(bad) }).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
}
