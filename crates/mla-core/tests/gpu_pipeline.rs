//! The decode kernels' data paths under the shapes that stress them: many short sequences
//! per part (the TMA producer walks across segment boundaries and reloads Q), sequences cut
//! into many splits (segments that start and end mid-sequence), and every kernel forced
//! onto every row count. Inputs are fresh random draws with poisoned (NaN / Inf) rows past
//! every sequence end; outputs are poisoned before each run.
//!
//! Without a usable GPU every test prints "SKIPPED <test> (no GPU: ...)" and returns; with
//! MLA_TEST_DEVICE=cuda (the GPU suite sets it) a missing GPU fails instead.

mod common;

use common::{Case, Inputs, Rng};
use mla_core::decode::decode_into;
use mla_core::{plan, DType, DecodeOptions, Device, Tensor, HEAD_DIM_V};

use common::gpu;

fn check(dev: &Device, case: Case, rng: &mut Rng) {
    let inp = Inputs::random(case.clone(), rng.below(2) == 1, rng);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, case.s_q * case.h_q, 1).unwrap();
    let mut out = Tensor::zeros(dev, &[case.b(), case.s_q, case.h_q, HEAD_DIM_V], case.dtype).unwrap();
    let mut lse = Tensor::zeros(dev, &[case.b(), case.h_q, case.s_q], DType::F32).unwrap();
    out.fill_bytes(0xFF).unwrap();
    lse.fill_bytes(0xFF).unwrap();
    let opts = DecodeOptions { causal: true, ..Default::default() };
    decode_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts, &mut out, &mut lse).unwrap();
    dev.synchronize().unwrap();
    let (ref_out, ref_lse) = inp.reference(true, None);
    let what = format!("{:?} h_q={} s_q={} b={} seed={:#x}", case.dtype, case.h_q, case.s_q, case.b(), inp.seed);
    common::assert_accuracy(&out.to_f32().unwrap(), &lse.to_f32().unwrap(), &ref_out, &ref_lse, case.dtype, &what);
}

/// 160 sequences of 0..250 tokens on 132 parts: most parts hold several segments, so
/// loads run across segment boundaries and Q is reloaded under the previous segment.
#[test]
fn many_short_sequences_per_part() {
    let Some(dev) = gpu("many_short_sequences_per_part") else { return };
    let mut rng = Rng::fresh();
    for dtype in [DType::BF16, DType::F16] {
        for (h_q, s_q) in [(16, 1), (16, 2), (32, 1), (8, 4), (64, 1)] {
            let lens: Vec<i32> = (0..160).map(|_| rng.below(251) as i32).collect();
            check(&dev, Case::new(dtype, h_q, s_q, lens).shared_blocks(rng.below(2) == 1), &mut rng);
        }
    }
}

/// A few long sequences among short ones: the long ones are cut into many splits whose
/// segments start and end inside a sequence, next to whole short sequences.
#[test]
fn long_sequences_in_many_splits() {
    let Some(dev) = gpu("long_sequences_in_many_splits") else { return };
    let mut rng = Rng::fresh();
    for (h_q, s_q) in [(16, 1), (32, 1), (16, 2), (128, 1)] {
        let lens = vec![20000 + rng.below(64) as i32, 3, 9001, 64, 130, 0, 4097];
        check(&dev, Case::new(DType::BF16, h_q, s_q, lens), &mut rng);
    }
}
