//! The contract's bad-input rules on the CPU backend: each violation is a typed error that
//! names the argument (with expected and actual values), and `decode_into` leaves its
//! outputs untouched.

mod common;

use common::*;
use mla_core::decode::decode_into;
use mla_core::{decode, plan, DType, DecodeOptions, Device, ErrorCode, MlaError, Plan, Tensor};

const B: usize = 2;
const S_Q: usize = 2;
const H_Q: usize = 4;
const NUM_BLOCKS: usize = 4;
const MAX_BLOCKS: usize = 2;

/// A valid call: b = 2, s_q = 2, h_q = 4 (s_q != h_q, so a transposed lse is caught),
/// 4 blocks, lengths [100, 70].
struct Call {
    q: Tensor,
    kv: Tensor,
    bt: Tensor,
    sl: Tensor,
    plan: Plan,
    opts: DecodeOptions,
}

fn dev() -> Device {
    Device::Cpu
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 211) as f32 / 211.0 - 0.5) * 0.2).collect()
}

fn q_of(shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    match dtype {
        DType::I32 => Tensor::from_i32(&dev(), &vec![1; n], shape).unwrap(),
        _ => Tensor::from_f32(&dev(), &values(n), shape, dtype).unwrap(),
    }
}

fn lens(l: &[i32]) -> Tensor {
    Tensor::from_i32(&dev(), l, &[l.len()]).unwrap()
}

fn valid() -> Call {
    let sl = lens(&[100, 70]);
    Call {
        q: q_of(&[B, S_Q, H_Q, D], DType::BF16),
        kv: q_of(&[NUM_BLOCKS, BS, 1, D], DType::BF16),
        bt: Tensor::from_i32(&dev(), &[2, 0, 3, 1], &[B, MAX_BLOCKS]).unwrap(),
        plan: plan(&sl, S_Q * H_Q, 1).unwrap(),
        sl,
        opts: DecodeOptions::default(),
    }
}

fn assert_err(e: MlaError, code: ErrorCode, names: &str) {
    assert_eq!(e.code, code, "wrong code for {names}: {e}");
    assert!(e.message.contains(names), "message does not name `{names}`: {e}");
    assert!(e.message.contains("expected") && e.message.contains("got"), "message lacks expected / actual: {e}");
}

fn poisoned(shape: &[usize], dtype: DType) -> Tensor {
    let mut t = Tensor::zeros(&dev(), shape, dtype).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

fn untouched(t: &Tensor) -> bool {
    t.to_bytes().unwrap().iter().all(|&x| x == 0xFF)
}

/// `decode` and `decode_into` (into poisoned outputs of the right shape) both reject the
/// call with `code`, naming `names`, and the outputs keep their poison.
fn rejected(c: &Call, code: ErrorCode, names: &str) {
    let e = decode(&c.q, &c.kv, &c.bt, &c.sl, &c.plan, &c.opts).err().unwrap_or_else(|| panic!("decode accepted bad `{names}`"));
    assert_err(e, code, names);
    let mut out = poisoned(&[B, S_Q, H_Q, DV], DType::BF16);
    let mut lse = poisoned(&[B, H_Q, S_Q], DType::F32);
    let e = decode_into(&c.q, &c.kv, &c.bt, &c.sl, &c.plan, &c.opts, &mut out, &mut lse).err().unwrap_or_else(|| panic!("decode_into accepted bad `{names}`"));
    assert_err(e, code, names);
    assert!(untouched(&out) && untouched(&lse), "outputs were written despite bad `{names}`");
}

#[test]
fn the_valid_call_is_accepted() {
    let c = valid();
    decode(&c.q, &c.kv, &c.bt, &c.sl, &c.plan, &c.opts).unwrap();
    let mut out = poisoned(&[B, S_Q, H_Q, DV], DType::BF16);
    let mut lse = poisoned(&[B, H_Q, S_Q], DType::F32);
    decode_into(&c.q, &c.kv, &c.bt, &c.sl, &c.plan, &c.opts, &mut out, &mut lse).unwrap();
    assert!(!untouched(&lse));
}

#[test]
fn q_wrong_rank() {
    let c = Call { q: q_of(&[B, S_Q * H_Q, D], DType::BF16), ..valid() };
    rejected(&c, ErrorCode::ShapeMismatch, "q");
}

#[test]
fn q_dtype_int32() {
    let c = Call { q: q_of(&[B, S_Q, H_Q, D], DType::I32), ..valid() };
    rejected(&c, ErrorCode::DtypeMismatch, "q");
}

#[test]
fn q_dtype_fp32() {
    let c = Call { q: q_of(&[B, S_Q, H_Q, D], DType::F32), ..valid() };
    rejected(&c, ErrorCode::DtypeMismatch, "q");
}

#[test]
fn q_head_dim_not_576() {
    let c = Call { q: q_of(&[B, S_Q, H_Q, 512], DType::BF16), ..valid() };
    rejected(&c, ErrorCode::InvalidArgument, "q head dim");
}

#[test]
fn q_zero_tokens_or_heads() {
    rejected(&Call { q: q_of(&[B, 0, H_Q, D], DType::BF16), ..valid() }, ErrorCode::ShapeMismatch, "q");
    rejected(&Call { q: q_of(&[B, S_Q, 0, D], DType::BF16), ..valid() }, ErrorCode::ShapeMismatch, "q");
}

#[test]
fn kv_wrong_rank() {
    let c = Call { kv: q_of(&[NUM_BLOCKS, BS, D], DType::BF16), ..valid() };
    rejected(&c, ErrorCode::ShapeMismatch, "kv_cache");
}

#[test]
fn kv_dtype_differs_from_q() {
    let c = Call { kv: q_of(&[NUM_BLOCKS, BS, 1, D], DType::F16), ..valid() };
    rejected(&c, ErrorCode::DtypeMismatch, "kv_cache");
    let c = Call { kv: q_of(&[NUM_BLOCKS, BS, 1, D], DType::F32), ..valid() };
    rejected(&c, ErrorCode::DtypeMismatch, "kv_cache");
}

#[test]
fn kv_block_size_not_64() {
    let c = Call { kv: q_of(&[2 * NUM_BLOCKS, 32, 1, D], DType::BF16), ..valid() };
    rejected(&c, ErrorCode::InvalidArgument, "block_size");
}

#[test]
fn kv_head_dim_not_576() {
    let c = Call { kv: q_of(&[NUM_BLOCKS, BS, 1, 512], DType::BF16), ..valid() };
    rejected(&c, ErrorCode::InvalidArgument, "kv_cache head dim");
}

#[test]
fn kv_more_than_one_head() {
    let c = Call { kv: q_of(&[NUM_BLOCKS, BS, 2, D], DType::BF16), ..valid() };
    rejected(&c, ErrorCode::InvalidArgument, "h_kv");
}

#[test]
fn block_table_wrong_dtype() {
    let c = Call { bt: Tensor::from_f32(&dev(), &[2.0, 0.0, 3.0, 1.0], &[B, MAX_BLOCKS], DType::F32).unwrap(), ..valid() };
    rejected(&c, ErrorCode::DtypeMismatch, "block_table");
}

#[test]
fn block_table_wrong_shape() {
    let c = Call { bt: Tensor::from_i32(&dev(), &[2, 0, 3, 1, 0, 0], &[B + 1, MAX_BLOCKS]).unwrap(), ..valid() };
    rejected(&c, ErrorCode::ShapeMismatch, "block_table");
    let c = Call { bt: Tensor::from_i32(&dev(), &[2, 0, 3, 1], &[B * MAX_BLOCKS]).unwrap(), ..valid() };
    rejected(&c, ErrorCode::ShapeMismatch, "block_table");
}

#[test]
fn seqlens_wrong_shape() {
    let c = Call { sl: lens(&[100, 70, 5]), ..valid() };
    rejected(&c, ErrorCode::ShapeMismatch, "cache_seqlens");
    let c = Call { sl: Tensor::from_i32(&dev(), &[100, 70], &[B, 1]).unwrap(), ..valid() };
    rejected(&c, ErrorCode::ShapeMismatch, "cache_seqlens");
}

#[test]
fn seqlens_wrong_dtype() {
    let c = Call { sl: Tensor::from_f32(&dev(), &[100.0, 70.0], &[B], DType::F32).unwrap(), ..valid() };
    rejected(&c, ErrorCode::DtypeMismatch, "cache_seqlens");
}

#[test]
fn seqlen_negative() {
    let c = Call { sl: lens(&[100, -1]), ..valid() };
    rejected(&c, ErrorCode::SeqlenOutOfRange, "cache_seqlens[1]");
}

#[test]
fn seqlen_longer_than_the_block_table() {
    // max_blocks_per_seq * 64 = 128 is the longest allowed length.
    let c = Call { sl: lens(&[129, 70]), ..valid() };
    rejected(&c, ErrorCode::SeqlenOutOfRange, "cache_seqlens[0]");
    let c = Call { sl: lens(&[128, 128]), ..valid() };
    let r = decode(&c.q, &c.kv, &c.bt, &c.sl, &c.plan, &c.opts).unwrap();
    assert!(r.lse.to_f32().unwrap().iter().all(|x| x.is_finite()));
}

#[test]
fn block_index_out_of_range_in_the_used_part() {
    // Sequence 1 (70 tokens) reads its blocks 0 and 1.
    let c = Call { bt: Tensor::from_i32(&dev(), &[2, 0, 3, NUM_BLOCKS as i32], &[B, MAX_BLOCKS]).unwrap(), ..valid() };
    rejected(&c, ErrorCode::BlockIndexOutOfRange, "block_table[1][1]");
    let c = Call { bt: Tensor::from_i32(&dev(), &[-1, 0, 3, 1], &[B, MAX_BLOCKS]).unwrap(), ..valid() };
    rejected(&c, ErrorCode::BlockIndexOutOfRange, "block_table[0][0]");
    let c = Call { bt: Tensor::from_i32(&dev(), &[2, 0, 3, i32::MIN], &[B, MAX_BLOCKS]).unwrap(), ..valid() };
    rejected(&c, ErrorCode::BlockIndexOutOfRange, "block_table[1][1]");
}

#[test]
fn garbage_past_the_used_blocks_is_accepted() {
    let mut rng = Rng::new("garbage");
    let mut inp = make_inputs(&mut rng, S_Q, H_Q, &[60, 0, 64, 1], DType::BF16, Dist::Small, false);
    for i in 0..inp.b {
        for j in nblocks(inp.seqlens[i])..inp.max_blocks {
            inp.block_table[i * inp.max_blocks + j] = [GARBAGE, -1, i32::MIN, inp.num_blocks as i32][j % 4];
        }
    }
    let (q, kv, bt, sl) = tensors(&inp, &dev());
    let p = plan(&sl, S_Q * H_Q, 1).unwrap();
    let r = decode(&q, &kv, &bt, &sl, &p, &DecodeOptions::default()).unwrap();
    let out: Vec<u16> = r.out.to_bytes().unwrap().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    check(&format!("garbage seed={}", rng.seed), &inp, &out, &r.lse.to_f32().unwrap(), &reference(&inp, false, 1.0 / 24.0));
}

#[test]
fn plan_for_another_batch_or_rows() {
    let c = Call { plan: plan(&lens(&[100, 70, 1]), S_Q * H_Q, 1).unwrap(), ..valid() };
    rejected(&c, ErrorCode::InvalidArgument, "plan");
    let c = Call { plan: plan(&lens(&[100, 70]), H_Q, 1).unwrap(), ..valid() };
    rejected(&c, ErrorCode::InvalidArgument, "plan");
}

#[test]
fn plan_rejects_bad_lengths_and_arguments() {
    let e = plan(&lens(&[5, -3]), 8, 1).err().unwrap();
    assert_err(e, ErrorCode::SeqlenOutOfRange, "cache_seqlens[1]");
    let e = plan(&Tensor::from_f32(&dev(), &[1.0], &[1], DType::F32).unwrap(), 8, 1).err().unwrap();
    assert_err(e, ErrorCode::DtypeMismatch, "cache_seqlens");
    let e = plan(&Tensor::from_i32(&dev(), &[1, 2], &[1, 2]).unwrap(), 8, 1).err().unwrap();
    assert_err(e, ErrorCode::ShapeMismatch, "cache_seqlens");
    let e = plan(&lens(&[5]), 8, 2).err().unwrap();
    assert_err(e, ErrorCode::InvalidArgument, "h_kv");
    let e = plan(&lens(&[5]), 0, 1).err().unwrap();
    assert_err(e, ErrorCode::InvalidArgument, "rows");
}

#[test]
fn softmax_scale_not_finite_or_not_positive() {
    for s in [f32::NAN, 0.0, -0.0, -1.0, f32::INFINITY, f32::NEG_INFINITY] {
        let c = Call { opts: DecodeOptions { softmax_scale: Some(s), ..Default::default() }, ..valid() };
        rejected(&c, ErrorCode::InvalidArgument, "softmax_scale");
    }
}

/// decode_into with a wrong output: rejected, and neither output is written.
fn rejected_outputs(out: &mut Tensor, lse: &mut Tensor, code: ErrorCode, names: &str) {
    let c = valid();
    out.fill_bytes(0xFF).unwrap();
    lse.fill_bytes(0xFF).unwrap();
    let e = decode_into(&c.q, &c.kv, &c.bt, &c.sl, &c.plan, &c.opts, out, lse).err().unwrap_or_else(|| panic!("accepted bad `{names}`"));
    assert_err(e, code, names);
    assert!(untouched(out) && untouched(lse), "outputs were written despite bad `{names}`");
}

#[test]
fn decode_into_out_wrong_shape_or_dtype() {
    let mut lse = poisoned(&[B, H_Q, S_Q], DType::F32);
    rejected_outputs(&mut poisoned(&[B, S_Q, H_Q, D], DType::BF16), &mut lse, ErrorCode::ShapeMismatch, "out");
    rejected_outputs(&mut poisoned(&[B, H_Q, S_Q, DV], DType::BF16), &mut lse, ErrorCode::ShapeMismatch, "out");
    rejected_outputs(&mut poisoned(&[B * S_Q * H_Q * DV], DType::BF16), &mut lse, ErrorCode::ShapeMismatch, "out");
    rejected_outputs(&mut poisoned(&[B, S_Q, H_Q, DV], DType::F16), &mut lse, ErrorCode::DtypeMismatch, "out");
    rejected_outputs(&mut poisoned(&[B, S_Q, H_Q, DV], DType::F32), &mut lse, ErrorCode::DtypeMismatch, "out");
}

#[test]
fn decode_into_lse_wrong_shape_or_dtype() {
    let mut out = poisoned(&[B, S_Q, H_Q, DV], DType::BF16);
    // [b, s_q, h_q] is the transposed layout: rejected.
    rejected_outputs(&mut out, &mut poisoned(&[B, S_Q, H_Q], DType::F32), ErrorCode::ShapeMismatch, "lse");
    rejected_outputs(&mut out, &mut poisoned(&[B, H_Q * S_Q], DType::F32), ErrorCode::ShapeMismatch, "lse");
    rejected_outputs(&mut out, &mut poisoned(&[B, H_Q, S_Q], DType::BF16), ErrorCode::DtypeMismatch, "lse");
}

#[test]
fn a_shape_whose_size_overflows_is_rejected() {
    for shape in [vec![1usize << 31, 1 << 31, 4], vec![usize::MAX, 2]] {
        let e = Tensor::zeros(&Device::Cpu, &shape, DType::BF16).unwrap_err();
        assert_eq!(e.code, ErrorCode::ShapeMismatch, "{e}");
        assert!(e.message.contains("shape"), "{e}");
    }
}
