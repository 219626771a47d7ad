//! The serving path's tests, written once for any device: `tests/serve.rs` runs them on
//! the CPU backend, `tests/gpu_decode.rs` on CUDA (skipped visibly without a GPU).
//!
//! Every test draws fresh random inputs (the seed is printed), poisons outputs before a
//! step (0xFF bytes: NaN) and checks results against the float64 reference.

use mla_core::decode::{enqueue_into, DecodeOptions};
use mla_core::{plan, DType, Device, ErrorCode, KvCache, KvCacheConfig, SeqId, StepId, Tensor, HEAD_DIM_V};

use super::{assert_accuracy, Inputs, Rng, Tensors};
use mla_core::DecodeOptions as Opts;

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

/// `poll_step` of tracked steps (`decode::enqueue`, what an awaited decode runs): false
/// while running, then true or the step's own error, once; an untracked step is waited for.
pub fn poll_step_reports_its_own_error(dev: &Device) {
    let mut rng = Rng::new("poll_step_reports_its_own_error");
    let (inp, _) = inputs(&mut rng, vec![64, 700, 3]);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
    let bt = bad_table(dev, &inp, inp.num_blocks() as i32 + 2);
    let poll = |id: StepId| -> mla_core::Result<()> {
        let t0 = std::time::Instant::now();
        loop {
            if dev.poll_step(id)? {
                return Ok(());
            }
            assert!(t0.elapsed().as_secs() < 30, "step {id} never completed");
            std::hint::spin_loop();
        }
    };
    let bad = mla_core::decode::enqueue(&t.q, &t.kv, &bt, &t.seqlens, Some(&p), &opts("bad")).unwrap();
    let good = mla_core::decode::enqueue(&t.q, &t.kv, &t.block_table, &t.seqlens, Some(&p), &opts("good")).unwrap();
    poll(good.step).expect("the good step's own result");
    assert!(dev.poll_step(good.step).unwrap(), "done stays done");
    let e = poll(bad.step).unwrap_err();
    assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange, "{e}");
    assert!(e.message.starts_with(&format!("step {} (bad): ", bad.step)), "{e}");
    assert!(dev.poll_step(bad.step).unwrap(), "reported once");
    dev.synchronize().expect("nothing left to report");
    check_outputs(&inp, &good.out, &good.lse, "good step");
    // An untracked step: polled by waiting for it.
    let (mut o, mut l) = poisoned_outputs(dev, &inp);
    let s = enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("untracked"), &mut o, &mut l).unwrap();
    assert!(dev.poll_step(s).unwrap());
    check_outputs(&inp, &o, &l, "untracked step");
    assert_eq!(dev.poll_step(0).unwrap_err().code, ErrorCode::InvalidArgument);
    assert_eq!(dev.poll_step(s + 1_000_000).unwrap_err().code, ErrorCode::InvalidArgument);
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
        assert_eq!(
            (after.host_tensor_bytes, after.gpu.map(|g| g.live_buffers)),
            (before.host_tensor_bytes, before.gpu.map(|g| g.live_buffers)),
            "replan allocates nothing"
        );
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

fn random_bits(rng: &mut Rng, n: usize, dtype: DType) -> Vec<u16> {
    (0..n).map(|_| super::encode(rng.normal() / 10.0, dtype)).collect()
}

fn pool_bits(c: &KvCache) -> Vec<u16> {
    c.tensor().to_bytes().unwrap().chunks_exact(2).map(|x| u16::from_le_bytes([x[0], x[1]])).collect()
}

/// Token `tok` of `seq`, read from the pool.
fn token(c: &KvCache, pool: &[u16], seq: SeqId, tok: usize) -> Vec<u16> {
    let blk = c.block_ids(seq).unwrap()[tok / 64] as usize;
    pool[(blk * 64 + tok % 64) * 576..][..576].to_vec()
}

/// `append_batch` (host rows, f32 rows, rows from a device tensor) equals one `append` per
/// sequence: same lengths, blocks, free list, and the same pool bytes; with forks
/// (copy-on-write of shared last blocks), empty sequences and block boundaries.
pub fn append_batch_equals_per_sequence_appends(dev: &Device) {
    let mut rng = Rng::new("append_batch_equals_per_sequence_appends");
    for dtype in [DType::BF16, DType::F16] {
        let cfg = KvCacheConfig { num_blocks: 96, dtype };
        let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new(dev, cfg).unwrap()).collect();
        // The same history in every cache: sequences of random lengths, some forked.
        let mut seqs: Vec<SeqId> = Vec::new();
        for k in 0..8 {
            let len = [0, 1, 63, 64, 65, 100, 127, 200][k];
            let rows = random_bits(&mut rng, len * 576, dtype);
            let ids: Vec<SeqId> = caches
                .iter_mut()
                .map(|c| {
                    let s = c.create_sequence();
                    c.append(s, &rows).unwrap();
                    s
                })
                .collect();
            assert!(ids.windows(2).all(|w| w[0] == w[1]));
            seqs.push(ids[0]);
            if k % 3 == 1 {
                let f: Vec<SeqId> = caches.iter_mut().map(|c| c.fork(ids[0]).unwrap()).collect();
                seqs.push(f[0]);
            }
        }
        for round in 0..6 {
            let n = 1 + rng.below(3);
            let mut pick: Vec<SeqId> = seqs.iter().copied().filter(|_| rng.below(4) != 0).collect();
            rng.shuffle(&mut pick);
            let rows = random_bits(&mut rng, pick.len() * n * 576, dtype);
            let id = caches[0].append_batch(&pick, &rows).unwrap();
            assert!(id > 0);
            for (i, &s) in pick.iter().enumerate() {
                caches[1].append(s, &rows[i * n * 576..(i + 1) * n * 576]).unwrap();
            }
            let t = Tensor::from_half_bits(dev, &rows, &[pick.len().max(1), n, 576][..if pick.is_empty() { 1 } else { 3 }], dtype);
            match t {
                Ok(t) if !pick.is_empty() => {
                    caches[2].append_batch_from(&pick, &t).unwrap();
                }
                _ => {
                    caches[2].append_batch(&pick, &rows).unwrap();
                }
            }
            let what = format!("{dtype} round {round}, {} sequences x {n} rows", pick.len());
            let pools: Vec<Vec<u16>> = caches.iter().map(pool_bits).collect();
            for c in 1..3 {
                assert_eq!(caches[c].free_blocks(), caches[0].free_blocks(), "{what}: free blocks of cache {c}");
                for &s in &seqs {
                    assert_eq!(caches[c].seq_len(s).unwrap(), caches[0].seq_len(s).unwrap(), "{what}: length of {s}");
                    assert_eq!(caches[c].block_ids(s).unwrap(), caches[0].block_ids(s).unwrap(), "{what}: blocks of {s}");
                }
                assert!(pools[c] == pools[0], "{what}: pool bytes of cache {c} differ from append_batch's");
            }
            // And the rows are where they must be (not just equally wrong).
            for (i, &s) in pick.iter().enumerate() {
                let len = caches[0].seq_len(s).unwrap();
                for r in 0..n {
                    assert_eq!(token(&caches[0], &pools[0], s, len - n + r), rows[(i * n + r) * 576..][..576].to_vec(), "{what}: token {} of {s}", len - n + r);
                }
            }
        }
        // f32 rows: rounded like append_f32.
        let vals: Vec<f32> = (0..2 * 576).map(|_| rng.normal() as f32).collect();
        let (a, b) = (seqs[0], seqs[1]);
        caches[0].append_batch_f32(&[a, b], &vals).unwrap();
        caches[1].append_f32(a, &vals[..576]).unwrap();
        caches[1].append_f32(b, &vals[576..]).unwrap();
        assert!(pool_bits(&caches[0]) == pool_bits(&caches[1]), "{dtype}: f32 rows");
    }
    dev.synchronize().unwrap();
}

/// A batch that does not fit changes nothing; bad batches are typed errors.
pub fn append_batch_is_all_or_nothing(dev: &Device) {
    let mut rng = Rng::new("append_batch_is_all_or_nothing");
    let mut c = KvCache::new(dev, KvCacheConfig { num_blocks: 5, dtype: DType::BF16 }).unwrap();
    let s: Vec<SeqId> = (0..3).map(|_| c.create_sequence()).collect();
    c.append(s[0], &random_bits(&mut rng, 64 * 576, DType::BF16)).unwrap(); // full block
    c.append(s[1], &random_bits(&mut rng, 10 * 576, DType::BF16)).unwrap();
    let f = c.fork(s[1]).unwrap(); // shares a partial block: appending copies it
    let before = (pool_bits(&c), c.free_blocks(), c.block_ids(s[1]).unwrap(), c.seq_len(f).unwrap());
    // 70 rows each: s[0] needs 2 blocks, s[1] 1 and a copy of the shared block, f 1 (the
    // shared block is its own by then), s[2] 2: 7 > 3 free.
    let rows = random_bits(&mut rng, 4 * 70 * 576, DType::BF16);
    let e = c.append_batch(&[s[0], s[1], f, s[2]], &rows).unwrap_err();
    assert_eq!(e.code, ErrorCode::CacheExhausted, "{e}");
    let after = (pool_bits(&c), c.free_blocks(), c.block_ids(s[1]).unwrap(), c.seq_len(f).unwrap());
    assert!(before == after, "a failed batch changed the cache");
    let one = random_bits(&mut rng, 576, DType::BF16);
    assert_eq!(c.append_batch(&[s[0], s[0]], &[one.clone(), one.clone()].concat()).unwrap_err().code, ErrorCode::InvalidArgument);
    assert_eq!(c.append_batch(&[s[0], SeqId(999)], &[one.clone(), one.clone()].concat()).unwrap_err().code, ErrorCode::UnknownSequence);
    assert_eq!(c.append_batch(&[s[0], s[1]], &one).unwrap_err().code, ErrorCode::ShapeMismatch);
    assert_eq!(c.append_batch(&[s[0]], &one[..575]).unwrap_err().code, ErrorCode::ShapeMismatch);
    assert_eq!(c.append_batch(&[], &one).unwrap_err().code, ErrorCode::ShapeMismatch);
    c.append_batch(&[], &[]).unwrap();
    let wrong = Tensor::from_f32(dev, &vec![0.5; 2 * 576], &[2, 576], DType::F16).unwrap();
    assert_eq!(c.append_batch_from(&[s[0], s[1]], &wrong).unwrap_err().code, ErrorCode::DtypeMismatch);
    let flat = Tensor::from_f32(dev, &vec![0.5; 2 * 576], &[2 * 576], DType::BF16).unwrap();
    assert_eq!(c.append_batch_from(&[s[0], s[1]], &flat).unwrap_err().code, ErrorCode::ShapeMismatch);
    let other = Tensor::from_f32(&Device::Cpu, &vec![0.5; 2 * 576], &[2, 576], DType::BF16).unwrap();
    if dev.is_cuda() {
        assert_eq!(c.append_batch_from(&[s[0], s[1]], &other).unwrap_err().code, ErrorCode::DeviceMismatch);
    }
    assert!(before.0 == pool_bits(&c), "failed calls wrote to the pool");
    // The same batch with room: every sequence grows by 70.
    let mut c2 = KvCache::new(dev, KvCacheConfig { num_blocks: 16, dtype: DType::BF16 }).unwrap();
    let t: Vec<SeqId> = (0..4).map(|_| c2.create_sequence()).collect();
    c2.append_batch(&t, &rows).unwrap();
    assert!(t.iter().all(|&x| c2.seq_len(x).unwrap() == 70));
    dev.synchronize().unwrap();
}

/// `batch_into` writes what `batch` returns, in place.
pub fn batch_into_equals_batch(dev: &Device) {
    let mut rng = Rng::new("batch_into_equals_batch");
    let mut c = KvCache::new(dev, KvCacheConfig { num_blocks: 32, dtype: DType::BF16 }).unwrap();
    let s: Vec<SeqId> = (0..5).map(|_| c.create_sequence()).collect();
    let mut bt = Tensor::zeros(dev, &[5, 8], DType::I32).unwrap();
    let mut sl = Tensor::zeros(dev, &[5], DType::I32).unwrap();
    for _ in 0..4 {
        for &x in &s {
            let n = rng.below(90);
            c.append(x, &random_bits(&mut rng, n * 576, DType::BF16)).unwrap();
        }
        let (want_bt, want_sl) = c.batch(&s, Some(8)).unwrap();
        let ptr = bt.device_ptr();
        c.batch_into(&s, &mut bt, &mut sl).unwrap();
        assert_eq!(bt.to_i32().unwrap(), want_bt.to_i32().unwrap());
        assert_eq!(sl.to_i32().unwrap(), want_sl.to_i32().unwrap());
        assert_eq!(bt.device_ptr(), ptr);
    }
    let mut narrow = Tensor::zeros(dev, &[5, 1], DType::I32).unwrap();
    assert_eq!(c.batch_into(&s, &mut narrow, &mut sl).unwrap_err().code, ErrorCode::ShapeMismatch);
    let mut f = Tensor::zeros(dev, &[5], DType::F32).unwrap();
    assert_eq!(c.batch_into(&s, &mut bt, &mut f).unwrap_err().code, ErrorCode::DtypeMismatch);
}

fn bits_of(t: &Tensor) -> Vec<u8> {
    t.to_bytes().unwrap()
}

/// A step of 3 layers (each with a cache pool of its own) captured once and replayed while
/// the sequences grow (one or two tokens per replay, block boundaries, an empty sequence):
/// every layer's outputs equal an eager decode of the same inputs bit for bit, and the
/// reference within the contract's bounds.
pub fn graph_replay_with_new_lengths_equals_eager_decode(dev: &Device) {
    let mut rng = Rng::new("graph_replay_with_new_lengths_equals_eager_decode");
    let (b, h_q, s_q, layers) = (4, 16, 2, 3);
    let dtype = DType::BF16;
    let mut caches: Vec<KvCache> = (0..layers).map(|_| KvCache::new(dev, KvCacheConfig { num_blocks: 64, dtype }).unwrap()).collect();
    let seqs: Vec<SeqId> = (0..b).map(|_| caches.iter_mut().map(|c| c.create_sequence()).last().unwrap()).collect();
    let start = [0usize, 1, 62, 130];
    for (i, &s) in seqs.iter().enumerate() {
        for c in caches.iter_mut() {
            c.append(s, &random_bits(&mut rng, start[i] * 576, dtype)).unwrap();
        }
    }
    let spec = mla_core::gpu::graph::StepSpec {
        batch: b,
        max_blocks_per_seq: 8,
        s_q,
        h_q,
        layers,
        dtype,
        causal: true,
        softmax_scale: None,
        label: Some("tokens".into()),
    };
    let kv: Vec<&Tensor> = caches.iter().map(|c| c.tensor()).collect();
    let mut step = dev.capture_step(&spec, &kv).unwrap();
    assert_eq!(step.is_graph(), dev.is_cuda());
    drop(kv);
    for round in 0..6 {
        let n = 1 + rng.below(2);
        for c in caches.iter_mut() {
            let rows = random_bits(&mut rng, b * n * 576, dtype);
            c.append_batch(&seqs, &rows).unwrap();
        }
        {
            let (bt, sl) = step.lengths_mut();
            caches[0].batch_into(&seqs, bt, sl).unwrap();
        }
        let qs: Vec<Vec<u16>> = (0..layers).map(|_| random_bits(&mut rng, b * s_q * h_q * 576, dtype)).collect();
        for (l, q) in qs.iter().enumerate() {
            step.q_mut(l).write_bytes(0, mla_core::tensor::as_bytes(q)).unwrap();
        }
        let kv: Vec<&Tensor> = caches.iter().map(|c| c.tensor()).collect();
        let id = step.replay(&kv).unwrap();
        dev.wait_step(id).unwrap();
        // Eager: the same inputs through plan + decode.
        let (bt, sl) = caches[0].batch(&seqs, Some(8)).unwrap();
        let p = plan(&sl, s_q * h_q, 1).unwrap();
        for l in 0..layers {
            let q = Tensor::from_half_bits(dev, &qs[l], &[b, s_q, h_q, 576], dtype).unwrap();
            let r = mla_core::decode(&q, kv[l], &bt, &sl, &p, &opts("eager")).unwrap();
            assert!(bits_of(step.out(l)) == bits_of(&r.out), "round {round} layer {l}: out differs from an eager decode");
            assert!(bits_of(step.lse(l)) == bits_of(&r.lse), "round {round} layer {l}: lse differs from an eager decode");
        }
        if round == 5 {
            let inp = Inputs::from_device(
                &Tensor::from_half_bits(dev, &qs[2], &[b, s_q, h_q, 576], dtype).unwrap(),
                kv[2],
                &bt.to_i32().unwrap(),
                8,
                &sl.to_i32().unwrap(),
                dtype,
                rng.seed,
            );
            check_outputs(&inp, step.out(2), step.lse(2), "graph replay vs the reference");
        }
    }
    dev.synchronize().unwrap();
}

/// A replay with a bad block index or length in the step's own tensors is reported by the
/// next sync, naming the replay; the next replay with good contents is exact.
pub fn graph_replay_reports_bad_steps(dev: &Device) {
    let mut rng = Rng::new("graph_replay_reports_bad_steps");
    let (b, h_q, s_q) = (2, 16, 1);
    let mut cache = KvCache::new(dev, KvCacheConfig { num_blocks: 8, dtype: DType::BF16 }).unwrap();
    let seqs = [cache.create_sequence(), cache.create_sequence()];
    cache.append(seqs[0], &random_bits(&mut rng, 100 * 576, DType::BF16)).unwrap();
    cache.append(seqs[1], &random_bits(&mut rng, 150 * 576, DType::BF16)).unwrap();
    let spec = mla_core::gpu::graph::StepSpec {
        batch: b,
        max_blocks_per_seq: 4,
        s_q,
        h_q,
        layers: 1,
        dtype: DType::BF16,
        causal: false,
        softmax_scale: None,
        label: None,
    };
    let mut step = dev.capture_step(&spec, &[cache.tensor()]).unwrap();
    step.q_mut(0).write_bytes(0, mla_core::tensor::as_bytes(&random_bits(&mut rng, b * h_q * 576, DType::BF16))).unwrap();
    let good = |step: &mut mla_core::gpu::graph::CapturedStep, cache: &KvCache| {
        let (bt, sl) = step.lengths_mut();
        cache.batch_into(&seqs, bt, sl).unwrap();
    };
    let check = |step: &mut mla_core::gpu::graph::CapturedStep, cache: &KvCache, what: &str| {
        let (bt, sl) = cache.batch(&seqs, Some(4)).unwrap();
        let p = plan(&sl, h_q, 1).unwrap();
        let r = mla_core::decode(step.q(0), cache.tensor(), &bt, &sl, &p, &Opts::default()).unwrap();
        assert!(bits_of(step.out(0)) == bits_of(&r.out), "{what}");
    };
    for (bad_table, bad_len, code) in [(true, false, ErrorCode::BlockIndexOutOfRange), (false, true, ErrorCode::SeqlenOutOfRange)] {
        good(&mut step, &cache);
        let (bt, sl) = step.lengths_mut();
        if bad_table {
            let mut t = bt.to_i32().unwrap();
            t[4 + 1] = 8; // block 1 of sequence 1 (150 tokens): outside the 8-block pool
            bt.write_bytes(0, mla_core::tensor::as_bytes(&t)).unwrap();
        }
        if bad_len {
            sl.write_bytes(0, mla_core::tensor::as_bytes(&[100i32, 4 * 64 + 1])).unwrap();
        }
        let id = step.replay(&[cache.tensor()]).unwrap();
        let e = dev.synchronize().unwrap_err();
        assert_eq!(e.code, code, "{e}");
        assert!(e.message.starts_with(&format!("step {id} (graph step): ")), "{e}");
        good(&mut step, &cache);
        let id2 = step.replay(&[cache.tensor()]).unwrap();
        dev.wait_step(id2).expect("the replay after a bad one");
        check(&mut step, &cache, "the replay after a bad one equals an eager decode");
    }
    // Replays check the pools they are given.
    let other = Tensor::zeros(dev, &[8, 64, 1, 576], DType::BF16).unwrap();
    assert_eq!(step.replay(&[&other]).unwrap_err().code, ErrorCode::InvalidArgument);
    assert_eq!(step.replay(&[]).unwrap_err().code, ErrorCode::InvalidArgument);
    // And the spec is checked.
    let mut s2 = spec.clone();
    s2.layers = 2;
    assert_eq!(dev.capture_step(&s2, &[cache.tensor()]).unwrap_err().code, ErrorCode::InvalidArgument);
    s2.layers = 1;
    s2.dtype = DType::F16;
    assert_eq!(dev.capture_step(&s2, &[cache.tensor()]).unwrap_err().code, ErrorCode::DtypeMismatch);
    dev.synchronize().unwrap();
}

/// Resident set size of this process, bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm").ok().and_then(|s| s.split_whitespace().nth(1).and_then(|x| x.parse::<u64>().ok())).map_or(0, |p| p * 4096)
}

/// A serving loop of `steps` steps over `b` running sequences: each step appends one token
/// to every sequence in one call, writes the block table and lengths in place, re-plans in
/// place and decodes `layers` layers into fixed outputs (even steps) or replays a captured
/// step (odd steps); sequences that reach `limit` tokens are freed and replaced by a fork of
/// another sequence (prefix sharing, copy-on-write) or a new one with a prompt. Every 250
/// steps the outputs are checked bit for bit against eager decodes. After a warm-up, live
/// memory (host tensor bytes, device buffers and bytes) must be exactly flat, the process's
/// resident memory within 16 MiB, the device's pool no larger, and no step left pending.
pub fn soak(dev: &Device, steps: usize) {
    let mut rng = Rng::new("soak");
    let (b, h_q, s_q, layers, limit) = (4usize, 16usize, 1usize, 2usize, 150usize);
    let dtype = DType::BF16;
    let width = limit.div_ceil(64);
    let mut cache = KvCache::new(dev, KvCacheConfig { num_blocks: 2 * b * (width + 1), dtype }).unwrap();
    let mut slots: Vec<SeqId> = (0..b)
        .map(|_| {
            let s = cache.create_sequence();
            let n = 1 + rng.below(limit / 2);
            cache.append(s, &random_bits(&mut rng, n * 576, dtype)).unwrap();
            s
        })
        .collect();
    let mut bt = Tensor::zeros(dev, &[b, width], DType::I32).unwrap();
    let mut sl = Tensor::zeros(dev, &[b], DType::I32).unwrap();
    cache.batch_into(&slots, &mut bt, &mut sl).unwrap();
    let mut p = plan(&sl, s_q * h_q, 1).unwrap();
    let qs: Vec<Tensor> =
        (0..layers).map(|_| Tensor::from_half_bits(dev, &random_bits(&mut rng, b * s_q * h_q * 576, dtype), &[b, s_q, h_q, 576], dtype).unwrap()).collect();
    let mut outs: Vec<(Tensor, Tensor)> = (0..layers)
        .map(|_| (Tensor::zeros(dev, &[b, s_q, h_q, HEAD_DIM_V], dtype).unwrap(), Tensor::zeros(dev, &[b, h_q, s_q], DType::F32).unwrap()))
        .collect();
    let spec = mla_core::gpu::graph::StepSpec {
        batch: b,
        max_blocks_per_seq: width,
        s_q,
        h_q,
        layers,
        dtype,
        causal: true,
        softmax_scale: None,
        label: Some("soak replay".into()),
    };
    let mut step = dev.capture_step(&spec, &vec![cache.tensor(); layers]).unwrap();
    for (l, q) in qs.iter().enumerate() {
        step.q_mut(l).copy_from(q).unwrap();
    }
    let token = random_bits(&mut rng, b * 576, dtype);
    let token_dev = Tensor::from_half_bits(dev, &token, &[b, 1, 576], dtype).unwrap();
    let warm = steps / 10;
    let mut base = None;
    let (mut forks, mut frees, mut checks) = (0, 0, 0);
    for i in 0..steps {
        // Retire sequences at the limit: free, then a fork of another slot or a new prompt.
        for k in 0..b {
            if cache.seq_len(slots[k]).unwrap() + 1 > limit {
                cache.free(slots[k]).unwrap();
                frees += 1;
                let other = slots[(k + 1 + rng.below(b - 1)) % b];
                slots[k] = if rng.below(2) == 0 && cache.seq_len(other).unwrap() < limit - 10 {
                    forks += 1;
                    cache.fork(other).unwrap()
                } else {
                    let s = cache.create_sequence();
                    let n = 1 + rng.below(40);
                    cache.append(s, &random_bits(&mut rng, n * 576, dtype)).unwrap();
                    s
                };
            }
        }
        if i % 3 == 0 {
            cache.append_batch_from(&slots, &token_dev).unwrap();
        } else {
            cache.append_batch(&slots, &token).unwrap();
        }
        if i % 2 == 0 {
            cache.batch_into(&slots, &mut bt, &mut sl).unwrap();
            p.replan(&sl).unwrap();
            for (l, (o, ls)) in outs.iter_mut().enumerate() {
                enqueue_into(&qs[l], cache.tensor(), &bt, &sl, &p, &opts("soak"), o, ls).unwrap();
            }
        } else {
            let (sbt, ssl) = step.lengths_mut();
            cache.batch_into(&slots, sbt, ssl).unwrap();
            step.replay(&vec![cache.tensor(); layers]).unwrap();
        }
        dev.synchronize().unwrap_or_else(|e| panic!("step {i}: {e}"));
        if i % 250 == 249 || i % 250 == 248 {
            // The last step's outputs against an eager decode of the same state.
            let (ebt, esl) = cache.batch(&slots, Some(width)).unwrap();
            let ep = plan(&esl, s_q * h_q, 1).unwrap();
            for l in 0..layers {
                let r = mla_core::decode(&qs[l], cache.tensor(), &ebt, &esl, &ep, &opts("eager")).unwrap();
                let got = if i % 2 == 0 { bits_of(&outs[l].0) } else { bits_of(step.out(l)) };
                assert!(got == bits_of(&r.out), "step {i} layer {l}: outputs differ from an eager decode");
            }
            checks += 1;
        }
        if i == warm {
            dev.synchronize().unwrap();
            base = Some((dev.memory_stats(), rss_bytes()));
        }
    }
    dev.synchronize().unwrap();
    let (m0, rss0) = base.unwrap();
    let (m1, rss1) = (dev.memory_stats(), rss_bytes());
    println!("soak: {steps} steps, {forks} forks, {frees} frees, {checks} checks; memory {m0:?} -> {m1:?}; rss {rss0} -> {rss1}");
    assert!(forks > 10 && frees > 10 && checks > 0, "the soak exercised forks ({forks}) and frees ({frees})");
    assert_eq!(m1.host_tensor_bytes, m0.host_tensor_bytes, "host tensor bytes");
    assert_eq!(m1.pending_steps, 0, "steps left pending");
    if let (Some(g0), Some(g1)) = (m0.gpu, m1.gpu) {
        assert!(g1.pooled || std::env::var("MLA_ALLOC").as_deref() == Ok("sync"), "device allocations are not pooled");
        assert_eq!((g1.live_buffers, g1.live_bytes), (g0.live_buffers, g0.live_bytes), "device buffers");
        assert!(g1.pool_reserved <= g0.pool_reserved.max(g0.pool_used) + (8 << 20), "pool reserved {} -> {}", g0.pool_reserved, g1.pool_reserved);
        assert!(g1.device_free + (64 << 20) >= g0.device_free, "device free memory {} -> {}", g0.device_free, g1.device_free);
    }
    assert!(rss1 <= rss0 + (16 << 20), "resident memory grew from {rss0} to {rss1}");
    for s in slots {
        cache.free(s).unwrap();
    }
    assert_eq!(cache.free_blocks(), cache.num_blocks(), "every block back on the free list");
}

/// Inputs dropped right after a step is enqueued (and their memory handed out again and
/// overwritten at once) do not change the step's result: memory is freed in stream order.
pub fn inputs_dropped_after_enqueue_stay_valid(dev: &Device) {
    let mut rng = Rng::new("inputs_dropped_after_enqueue_stay_valid");
    let (inp, _) = inputs(&mut rng, vec![300, 65, 1000]);
    let (mut out, mut lse) = poisoned_outputs(dev, &inp);
    {
        let t = inp.tensors(dev);
        let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
        enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts("dropped"), &mut out, &mut lse).unwrap();
        // t and p are dropped here, before the step has run on a GPU.
    }
    // New allocations of the same sizes, filled with garbage, may get the freed memory.
    let junk: Vec<Tensor> = (0..4)
        .map(|_| {
            let mut t = Tensor::zeros(dev, &[inp.num_blocks(), 64, 1, 576], inp.dtype).unwrap();
            t.fill_bytes(0x7F).unwrap();
            t
        })
        .collect();
    dev.synchronize().unwrap();
    drop(junk);
    check_outputs(&inp, &out, &lse, "a step whose inputs were dropped after enqueueing");
}

/// Outputs dropped while their decode may still run: the next allocations of the same
/// sizes (handed the same memory by the reuse list or the pool) hold what is written into
/// them, not what the earlier decode writes (stream order); and the decode's own results,
/// when kept, are exact.
pub fn outputs_dropped_while_pending_are_reused_in_stream_order(dev: &Device) {
    let mut rng = Rng::new("outputs_dropped_while_pending_are_reused_in_stream_order");
    let (inp, _) = inputs(&mut rng, vec![4000, 3000, 2000, 4096]);
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.s_q * inp.h_q, 1).unwrap();
    for round in 0..4 {
        let r = mla_core::decode::enqueue(&t.q, &t.kv, &t.block_table, &t.seqlens, Some(&p), &opts("dropped")).unwrap();
        let (out_shape, lse_shape) = (r.out.shape().to_vec(), r.lse.shape().to_vec());
        drop(r);
        let a: Vec<f32> = (0..out_shape.iter().product::<usize>()).map(|i| (i % 97) as f32 * 0.25).collect();
        let b: Vec<f32> = (0..lse_shape.iter().product::<usize>()).map(|i| -((i % 13) as f32)).collect();
        let out = Tensor::from_f32(dev, &a, &out_shape, DType::BF16).unwrap();
        let lse = Tensor::from_f32(dev, &b, &lse_shape, DType::F32).unwrap();
        let kept = mla_core::decode::enqueue(&t.q, &t.kv, &t.block_table, &t.seqlens, Some(&p), &opts("kept")).unwrap();
        assert_eq!(out.to_f32().unwrap(), a, "round {round}: a new tensor in reused memory holds its own data");
        assert_eq!(lse.to_f32().unwrap(), b, "round {round}: lse");
        dev.wait_step(kept.step).unwrap();
        check_outputs(&inp, &kept.out, &kept.lse, "a decode into reused memory");
    }
    dev.synchronize().unwrap();
}
