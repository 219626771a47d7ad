//! Several GPUs of one host from one process (issue 12): one `Device` per GPU, each with its
//! own context, stream, error flag and step lock, decoding at the same time. These tests
//! run on every GPU present; with fewer than two they print `SKIPPED <test> (needs two
//! GPUs: ...)` and return (MLA_TEST_GPUS=2 makes that a failure, for a machine that has them).

mod common;

use std::sync::Barrier;

use common::{Case, Inputs, Rng};
use mla_core::decode::decode_into;
use mla_core::{decode, plan, DType, DecodeOptions, Device, ErrorCode, Tensor, HEAD_DIM_V};

/// Every CUDA device, or None (printing why) when fewer than two are usable.
fn gpus(test: &str) -> Option<Vec<Device>> {
    let mut devs = Vec::new();
    let mut why = String::new();
    for i in 0..16 {
        match Device::cuda(i) {
            Ok(d) => devs.push(d),
            Err(e) => {
                why = e.to_string();
                break;
            }
        }
    }
    if devs.len() >= 2 {
        return Some(devs);
    }
    let msg = format!("needs two GPUs: {} usable ({why})", devs.len());
    if std::env::var("MLA_TEST_GPUS").ok().and_then(|v| v.parse::<usize>().ok()).is_some_and(|n| n >= 2) {
        panic!("MLA_TEST_GPUS asks for two GPUs, but this machine {msg}");
    }
    println!("SKIPPED {test} ({msg})");
    None
}

/// One step of `inp` on `dev`, outputs poisoned first; the output bits and lse.
fn run(dev: &Device, inp: &Inputs, reps: usize) -> (Vec<u8>, Vec<f32>) {
    let t = inp.tensors(dev);
    let c = &inp.case;
    let p = plan(&t.seqlens, c.s_q * c.h_q, 1).unwrap();
    let mut out = Tensor::zeros(dev, &[c.b(), c.s_q, c.h_q, HEAD_DIM_V], c.dtype).unwrap();
    let mut lse = Tensor::zeros(dev, &[c.b(), c.h_q, c.s_q], DType::F32).unwrap();
    let opts = DecodeOptions { causal: c.s_q > 1, ..Default::default() };
    for _ in 0..reps {
        out.fill_bytes(0xFF).unwrap();
        lse.fill_bytes(0xFF).unwrap();
        decode_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts, &mut out, &mut lse).unwrap();
    }
    dev.synchronize().unwrap();
    (out.to_bytes().unwrap(), lse.to_f32().unwrap())
}

#[test]
fn concurrent_decodes_equal_each_gpus_own_result() {
    let Some(devs) = gpus("concurrent_decodes_equal_each_gpus_own_result") else { return };
    let mut rng = Rng::fresh();
    // A different batch per GPU (as data-parallel attention has), long enough to overlap.
    let inputs: Vec<Inputs> = (0..devs.len())
        .map(|i| {
            let lens: Vec<i32> = (0..4 + i).map(|_| 1 + rng.below(9000) as i32).collect();
            Inputs::random(Case::new(DType::BF16, if i % 2 == 0 { 16 } else { 128 }, 1 + i % 2, lens), false, &mut rng)
        })
        .collect();
    // Each alone, one after the other: the reference bits, checked against float64.
    let alone: Vec<(Vec<u8>, Vec<f32>)> = devs.iter().zip(&inputs).map(|(d, inp)| run(d, inp, 1)).collect();
    for (i, (inp, (bits, lse))) in inputs.iter().zip(&alone).enumerate() {
        let out: Vec<f32> = bits.chunks(2).map(|b| common::half_to_f64(u16::from_le_bytes([b[0], b[1]]), inp.dtype) as f32).collect();
        let (ref_out, ref_lse) = inp.reference(inp.case.s_q > 1, None);
        common::assert_accuracy(&out, lse, &ref_out, &ref_lse, inp.dtype, &format!("gpu {i} alone, {:?}", inp.case));
    }
    // All at once, from one thread per GPU, several rounds: the same bits on every GPU.
    let start = Barrier::new(devs.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = devs
            .iter()
            .zip(&inputs)
            .map(|(d, inp)| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    run(d, inp, 20)
                })
            })
            .collect();
        for (i, (h, want)) in handles.into_iter().zip(&alone).enumerate() {
            let got = h.join().expect("a decode thread panicked");
            assert!(got.0 == want.0, "gpu {i}: out differs from its own single-GPU result");
            assert!(got.1.iter().zip(&want.1).all(|(a, b)| a.to_bits() == b.to_bits()), "gpu {i}: lse differs");
        }
    });
}

#[test]
fn a_bad_block_index_is_reported_on_its_gpu_only() {
    let Some(devs) = gpus("a_bad_block_index_is_reported_on_its_gpu_only") else { return };
    let mut rng = Rng::fresh();
    let inp = Inputs::random(Case::new(DType::BF16, 16, 1, vec![300, 2000]), false, &mut rng);
    let start = Barrier::new(devs.len());
    std::thread::scope(|s| {
        for (i, d) in devs.iter().enumerate() {
            let (inp, start) = (&inp, &start);
            s.spawn(move || {
                let t = inp.tensors(d);
                let mut table = inp.block_table.clone();
                if i == 0 {
                    table[inp.max_blocks + 3] = inp.num_blocks() as i32; // a block sequence 1 reads
                }
                let bt = Tensor::from_i32(d, &table, &[inp.b, inp.max_blocks]).unwrap();
                let p = plan(&t.seqlens, 16, 1).unwrap();
                start.wait();
                for _ in 0..10 {
                    decode(&t.q, &t.kv, &bt, &t.seqlens, &p, &DecodeOptions::default()).unwrap();
                }
                let r = d.synchronize();
                if i == 0 {
                    assert_eq!(r.unwrap_err().code, ErrorCode::BlockIndexOutOfRange, "gpu 0 reports its bad index");
                    // Its flag is cleared: a good step afterwards succeeds.
                    decode(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &DecodeOptions::default()).unwrap();
                    d.synchronize().unwrap();
                } else {
                    r.unwrap_or_else(|e| panic!("gpu {i} got another GPU's error: {e}"));
                }
            });
        }
    });
}

#[test]
fn tensors_of_one_gpu_on_another_are_a_device_mismatch() {
    let Some(devs) = gpus("tensors_of_one_gpu_on_another_are_a_device_mismatch") else { return };
    let mut rng = Rng::fresh();
    let inp = Inputs::random(Case::new(DType::BF16, 16, 1, vec![100, 200]), false, &mut rng);
    let (a, b) = (inp.tensors(&devs[0]), inp.tensors(&devs[1]));
    let p = plan(&a.seqlens, 16, 1).unwrap();
    let o = DecodeOptions::default();
    for (name, r) in [
        ("q", decode(&b.q, &a.kv, &a.block_table, &a.seqlens, &p, &o)),
        ("kv_cache", decode(&a.q, &b.kv, &a.block_table, &a.seqlens, &p, &o)),
        ("block_table", decode(&a.q, &a.kv, &b.block_table, &a.seqlens, &p, &o)),
        ("cache_seqlens", decode(&a.q, &a.kv, &a.block_table, &b.seqlens, &p, &o)),
    ] {
        let e = r.err().unwrap_or_else(|| panic!("{name} on gpu 1: accepted"));
        assert_eq!(e.code, ErrorCode::DeviceMismatch, "{name}: {e}");
    }
    // A plan of gpu 1 for gpu 0's tensors.
    let p1 = plan(&b.seqlens, 16, 1).unwrap();
    assert_eq!(decode(&a.q, &a.kv, &a.block_table, &a.seqlens, &p1, &o).err().unwrap().code, ErrorCode::DeviceMismatch);
    // Nothing was launched: both devices are clean.
    for d in &devs {
        d.synchronize().unwrap();
    }
}
