//! The serving path's tests, written once for any device: `tests/serve.rs` runs them on
//! the CPU backend, `tests/gpu_decode.rs` on CUDA (skipped visibly without a GPU).
//!
//! Every test draws fresh random inputs (the seed is printed), poisons outputs before a
//! step (0xFF bytes: NaN) and checks results against the float64 reference.

use mla_core::decode::{enqueue_into, DecodeOptions};
use mla_core::{plan, DType, Device, ErrorCode, StepId, Tensor, HEAD_DIM_V};

use super::{assert_accuracy, Inputs, Rng, Tensors};

/// Poisoned outputs for a step of `inp`'s shape.
pub fn poisoned_outputs(dev: &Device, inp: &Inputs) -> (Tensor, Tensor) {
    let mut out = Tensor::zeros(dev, &[inp.b, inp.s_q, inp.h_q, HEAD_DIM_V], inp.dtype).unwrap();
    let mut lse = Tensor::zeros(dev, &[inp.b, inp.h_q, inp.s_q], DType::F32).unwrap();
    out.fill_bytes(0xFF).unwrap();
    lse.fill_bytes(0xFF).unwrap();
    (out, lse)
}

pub fn opts(label: &str) -> DecodeOptions {
    DecodeOptions { causal: true, label: Some(label.to_string().into()), ..Default::default() }
}

/// A block table like `inp`'s where block 1 of sequence 1 (read: it is long) is `bad`.
pub fn bad_table(dev: &Device, inp: &Inputs, bad: i32) -> Tensor {
    assert!(inp.seqlens[1] > 64, "sequence 1 must use two blocks");
    let mut table = inp.block_table.clone();
    table[inp.max_blocks + 1] = bad;
    Tensor::from_i32(dev, &table, &[inp.b, inp.max_blocks]).unwrap()
}

pub fn check_outputs(inp: &Inputs, out: &Tensor, lse: &Tensor, what: &str) {
    let (ro, rl) = inp.reference(true, None);
    assert_accuracy(&out.to_f32().unwrap(), &lse.to_f32().unwrap(), &ro, &rl, inp.dtype, what);
}

fn inputs(rng: &mut Rng, lens: Vec<i32>) -> (Inputs, Tensors) {
    let inp = Inputs::random(super::Case::new(DType::BF16, 16, 2, lens), rng.next_u64() % 2 == 0, rng);
    (inp.clone(), inp.tensors(&Device::Cpu))
}

/// Enqueued steps good, bad (a block index outside the pool), good: the next synchronize
/// reports the bad one, by id and label, once; the good ones before and after it are exact.
pub fn bad_step_is_reported_by_the_next_sync(dev: &Device) {
    let mut rng = Rng::new("bad_step_is_reported_by_the_next_sync");
    let (inp, _) = inputs(&mut rng, vec![100, 200, 1, 65]);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
    for bad in [inp.num_blocks() as i32, -1, i32::MAX] {
        let bt = bad_table(dev, &inp, bad);
        let (mut oa, mut la) = poisoned_outputs(dev, &inp);
        let (mut ob, mut lb) = poisoned_outputs(dev, &inp);
        let (mut oc, mut lc) = poisoned_outputs(dev, &inp);
        let sa = enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("layer 0"), &mut oa, &mut la).unwrap();
        let sb = enqueue_into(&t.q, &t.kv, &bt, &t.seqlens, &p, &opts("layer 1"), &mut ob, &mut lb).unwrap();
        let sc = enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("layer 2"), &mut oc, &mut lc).unwrap();
        assert!(sa < sb && sb < sc, "step ids increase: {sa} {sb} {sc}");
        let e = dev.synchronize().unwrap_err();
        assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange, "{e}");
        assert!(e.message.starts_with(&format!("step {sb} (layer 1): block_table")), "{e}");
        dev.synchronize().expect("a failure is reported once");
        check_outputs(&inp, &oa, &la, "the step before the bad one");
        check_outputs(&inp, &oc, &lc, "the step after the bad one");
    }
}

/// `wait_step` reports a step's own error and leaves other failures for `synchronize`.
pub fn wait_step_reports_its_own_error(dev: &Device) {
    let mut rng = Rng::new("wait_step_reports_its_own_error");
    let (inp, _) = inputs(&mut rng, vec![70, 300, 5]);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
    let bt = bad_table(dev, &inp, inp.num_blocks() as i32 + 7);
    let (mut ob, mut lb) = poisoned_outputs(dev, &inp);
    let (mut oc, mut lc) = poisoned_outputs(dev, &inp);
    let sb = enqueue_into(&t.q, &t.kv, &bt, &t.seqlens, &p, &opts("bad"), &mut ob, &mut lb).unwrap();
    let sc = enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("good"), &mut oc, &mut lc).unwrap();
    dev.wait_step(sc).expect("the good step's own result");
    dev.wait_step(sc).expect("waiting twice is fine");
    let e = dev.wait_step(sb).unwrap_err();
    assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange, "{e}");
    assert!(e.message.starts_with(&format!("step {sb} (bad): ")), "{e}");
    dev.synchronize().expect("reported by wait_step already");
    dev.wait_step(sb).expect("reported once");
    check_outputs(&inp, &oc, &lc, "good step");
    assert_eq!(dev.wait_step(0).unwrap_err().code, ErrorCode::InvalidArgument);
    assert_eq!(dev.wait_step(sc + 1_000_000).unwrap_err().code, ErrorCode::InvalidArgument);
}

/// Reading a tensor to the host is a synchronising call: it reports the failed step.
pub fn reading_a_tensor_reports_the_failed_step(dev: &Device) {
    let mut rng = Rng::new("reading_a_tensor_reports_the_failed_step");
    let (inp, _) = inputs(&mut rng, vec![1, 129]);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
    let bt = bad_table(dev, &inp, -3);
    let (mut ob, mut lb) = poisoned_outputs(dev, &inp);
    let (mut oc, mut lc) = poisoned_outputs(dev, &inp);
    let sb = enqueue_into(&t.q, &t.kv, &bt, &t.seqlens, &p, &opts("read"), &mut ob, &mut lb).unwrap();
    enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("ok"), &mut oc, &mut lc).unwrap();
    let e = oc.to_f32().unwrap_err();
    assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange, "{e}");
    assert!(e.message.starts_with(&format!("step {sb} (read): ")), "{e}");
    check_outputs(&inp, &oc, &lc, "the good step, read after the report");
}

/// A length out of range in an enqueued step is reported by the next sync, naming it.
pub fn bad_length_is_reported_by_the_next_sync(dev: &Device) {
    let mut rng = Rng::new("bad_length_is_reported_by_the_next_sync");
    let (inp, _) = inputs(&mut rng, vec![100, 200]);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
    let too_long = (inp.max_blocks * 64 + 1) as i32;
    for bad in [-1, too_long] {
        let sl = Tensor::from_i32(dev, &[100, bad], &[2]).unwrap();
        let (mut ob, mut lb) = poisoned_outputs(dev, &inp);
        let (mut oc, mut lc) = poisoned_outputs(dev, &inp);
        let sb = enqueue_into(&t.q, &t.kv, &t.block_table, &sl, &p, &opts("lengths"), &mut ob, &mut lb).unwrap();
        enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("after"), &mut oc, &mut lc).unwrap();
        let e = dev.synchronize().unwrap_err();
        assert_eq!(e.code, ErrorCode::SeqlenOutOfRange, "{e}");
        assert!(e.message.starts_with(&format!("step {sb} (lengths): ")), "{e}");
        check_outputs(&inp, &oc, &lc, "the step after the bad lengths");
    }
}

/// Shape errors are not deferred: they fail the call and queue nothing.
pub fn shape_errors_fail_the_call(dev: &Device) {
    let mut rng = Rng::new("shape_errors_fail_the_call");
    let (inp, _) = inputs(&mut rng, vec![10, 80]);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
    let mut wrong = Tensor::zeros(dev, &[inp.b, inp.s_q, inp.h_q, 511], inp.dtype).unwrap();
    let (_, mut lse) = poisoned_outputs(dev, &inp);
    let e = enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("x"), &mut wrong, &mut lse).unwrap_err();
    assert_eq!(e.code, ErrorCode::ShapeMismatch, "{e}");
    let p16 = plan(&t.seqlens, 16, 1).unwrap();
    let (mut out, mut lse) = poisoned_outputs(dev, &inp);
    let e = enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p16, &opts("x"), &mut out, &mut lse).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    dev.synchronize().unwrap();
}

/// Many steps with no wait in between, some bad at random, more than the device's step
/// slots: the first bad one is reported by the next sync and the others are named with it,
/// and every good step is exact.
pub fn many_steps_bad_ones_never_touch_good_ones(dev: &Device, steps: usize) {
    let mut rng = Rng::new("many_steps_bad_ones_never_touch_good_ones");
    let (inp, _) = inputs(&mut rng, vec![65, 130, 0]);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
    let bt = bad_table(dev, &inp, inp.num_blocks() as i32);
    let (mut ob, mut lb) = poisoned_outputs(dev, &inp);
    let mut goods: Vec<(Tensor, Tensor)> = (0..8).map(|_| poisoned_outputs(dev, &inp)).collect();
    let mut bad_ids: Vec<StepId> = Vec::new();
    for k in 0..steps {
        if k > 0 && rng.below(7) == 0 {
            bad_ids.push(enqueue_into(&t.q, &t.kv, &bt, &t.seqlens, &p, &opts("bad"), &mut ob, &mut lb).unwrap());
        } else {
            let (o, l) = &mut goods[k % 8];
            enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("good"), o, l).unwrap();
        }
    }
    assert!(!bad_ids.is_empty());
    let e = dev.synchronize().unwrap_err();
    assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange, "{e}");
    assert!(e.message.starts_with(&format!("step {} (bad): ", bad_ids[0])), "{e}");
    let named: Vec<StepId> = match e.message.split_once("[later failed steps, reported with this one: ") {
        Some((_, rest)) => rest.trim_end_matches(']').split(", ").map(|x| x.parse().unwrap()).collect(),
        None => Vec::new(),
    };
    assert_eq!(named, bad_ids[1..], "the other failed steps");
    dev.synchronize().unwrap();
    let (ro, rl) = inp.reference(true, None);
    for (o, l) in &goods {
        assert_accuracy(&o.to_f32().unwrap(), &l.to_f32().unwrap(), &ro, &rl, inp.dtype, "a good step among bad ones");
    }
}

/// `Plan::replan` in place equals a fresh plan for the new lengths (metadata, num_splits,
/// and the decode through it), and allocates nothing.
pub fn replan_in_place_equals_a_fresh_plan(dev: &Device) {
    let mut rng = Rng::new("replan_in_place_equals_a_fresh_plan");
    let b = 6;
    let max_len = 3000;
    let lens0: Vec<i32> = (0..b).map(|_| rng.below(max_len) as i32).collect();
    let inp = Inputs::random(super::Case::new(DType::BF16, 16, 1, lens0.clone()).max_len(max_len), false, &mut rng);
    let t = inp.tensors(dev);
    let mut sl = t.seqlens;
    let mut p = plan(&sl, 16, 1).unwrap();
    let (mut out, mut lse) = poisoned_outputs(dev, &inp);
    let mut sets: Vec<Vec<i32>> = vec![vec![0; b], vec![max_len as i32; b], lens0.iter().map(|&l| l + 1).collect()];
    for _ in 0..4 {
        sets.push((0..b).map(|_| if rng.below(5) == 0 { 0 } else { rng.below(max_len + 1) as i32 }).collect());
    }
    dev.synchronize().unwrap();
    let before = dev.memory_stats();
    for lens in sets {
        sl.write_bytes(0, mla_core::tensor::as_bytes(&lens)).unwrap();
        let id = p.replan(&sl).unwrap();
        assert!(id > 0);
        out.fill_bytes(0xFF).unwrap();
        lse.fill_bytes(0xFF).unwrap();
        enqueue_into(&t.q, &t.kv, &t.block_table, &sl, &p, &opts("replanned"), &mut out, &mut lse).unwrap();
        dev.synchronize().unwrap();
        let after = dev.memory_stats();
        assert_eq!((after.host_tensor_bytes, after.gpu.map(|g| g.live_buffers)), (before.host_tensor_bytes, before.gpu.map(|g| g.live_buffers)), "replan allocates nothing");
        let fresh = plan(&sl, 16, 1).unwrap();
        assert_eq!(p.metadata().to_i32().unwrap(), fresh.metadata().to_i32().unwrap(), "metadata for {lens:?}");
        assert_eq!(p.num_splits().to_i32().unwrap(), fresh.num_splits().to_i32().unwrap(), "num_splits for {lens:?}");
        let (ro, rl) = inp.with_lens(&lens).reference(true, None);
        assert_accuracy(&out.to_f32().unwrap(), &lse.to_f32().unwrap(), &ro, &rl, inp.dtype, &format!("decode after replan to {lens:?}"));
    }
    // A replan for another batch size is refused.
    let other = Tensor::from_i32(dev, &[1, 2], &[2]).unwrap();
    assert_eq!(p.replan(&other).unwrap_err().code, ErrorCode::ShapeMismatch);
}
