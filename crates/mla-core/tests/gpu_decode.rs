//! GPU decode on a CUDA device against the float64 reference and the CPU backend.
//!
//! Without a usable GPU every test prints "SKIPPED (no GPU: ...)" and returns; with
//! MLA_TEST_DEVICE=cuda (the GPU suite sets it) a missing GPU fails instead.

mod common;

use std::sync::Arc;

use common::{Case, Inputs, Rng};
use mla_core::decode::decode_into;
use mla_core::gpu::graph::capture;
use mla_core::gpu::util::fill_random;
use mla_core::plan::{host_plan, replan_on};
use mla_core::{decode, plan, DType, DecodeOptions, Device, ErrorCode, Tensor, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};

use common::gpu;

/// Runs `case` on `dev` with outputs poisoned (0xFF bytes: NaN) before the run.
fn run_on(dev: &Device, inp: &Inputs, causal: bool) -> (Vec<f32>, Vec<f32>) {
    let t = inp.tensors(dev);
    let p = plan(&t.seqlens, inp.case.s_q * inp.case.h_q, 1).unwrap();
    let c = &inp.case;
    let mut out = Tensor::zeros(dev, &[c.b(), c.s_q, c.h_q, HEAD_DIM_V], c.dtype).unwrap();
    let mut lse = Tensor::zeros(dev, &[c.b(), c.h_q, c.s_q], DType::F32).unwrap();
    out.fill_bytes(0xFF).unwrap();
    lse.fill_bytes(0xFF).unwrap();
    let opts = DecodeOptions { causal, ..Default::default() };
    decode_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts, &mut out, &mut lse).unwrap();
    dev.synchronize().unwrap();
    (out.to_f32().unwrap(), lse.to_f32().unwrap())
}

fn check_case(dev: &Device, case: Case, rng: &mut Rng) {
    for causal in [true, false] {
        for unit_normal in [false, true] {
            let inp = Inputs::random(case.clone(), unit_normal, rng);
            let (out, lse) = run_on(dev, &inp, causal);
            let (ref_out, ref_lse) = inp.reference(causal, None);
            let what = format!("{case:?} causal={causal} unit_normal={unit_normal} seed={:#x}", inp.seed);
            common::assert_accuracy(&out, &lse, &ref_out, &ref_lse, case.dtype, &what);
            // The CPU backend on the same inputs agrees within rounding of the output type.
            let (cpu_out, cpu_lse) = run_on(&Device::Cpu, &inp, causal);
            common::assert_close_to_cpu(&out, &lse, &cpu_out, &cpu_lse, case.dtype, &what);
        }
    }
}

#[test]
fn edge_cases_match_reference_and_cpu() {
    let Some(dev) = gpu("edge_cases_match_reference_and_cpu") else { return };
    let mut rng = Rng::fresh();
    for dtype in [DType::BF16, DType::F16] {
        for &h_q in &[1, 3, 16, 63, 64, 128] {
            for &s_q in &[1, 2, 4] {
                let lens = vec![0, 1, 20, 63, 64, 65, 140, 4096];
                check_case(&dev, Case::new(dtype, h_q, s_q, lens).shared_blocks(true), &mut rng);
            }
        }
    }
}

/// Logits that defeat a lazily moved softmax reference (the warp-specialised kernel keeps
/// its row max until a block passes it by 2^8): every query row gets a shared component
/// (q[.., 0] = 1) and key j's column 0 drives its logit. Patterns per sequence: maxima
/// rising all along (the reference moves many times), rare large spikes over a noisy
/// floor, one early spike then a long fall, and rising maxima with spikes on top.
/// Each on every kernel the device picks by rows (16, 64, 128 rows), with splits.
#[test]
fn adversarial_logits_rising_maxima_and_spikes() {
    let Some(dev) = gpu("adversarial_logits_rising_maxima_and_spikes") else { return };
    let mut rng = Rng::fresh();
    for dtype in [DType::BF16, DType::F16] {
        // fp16's range caps column 0 at 65504; 2000 x the default scale (1/24) is ~83 nats.
        let big = if dtype == DType::F16 { 2000.0 } else { 4800.0 };
        for &(h_q, s_q) in &[(16, 1), (64, 1), (32, 4)] {
            let lens = vec![4096, 3000, 1500, 777, 2048];
            let mut inp = Inputs::random(Case::new(dtype, h_q, s_q, lens.clone()), false, &mut rng);
            for i in 0..inp.b {
                for r in 0..s_q * h_q {
                    inp.q[(i * s_q * h_q + r) * HEAD_DIM] = common::encode(1.0, dtype);
                }
                let len = lens[i] as usize;
                for j in 0..len {
                    let x = j as f64 / len as f64;
                    let spike = rng.below(100) == 0;
                    let t = match i % 4 {
                        0 => big * x,
                        1 => {
                            if spike {
                                big * (0.5 + 0.5 * rng.uniform())
                            } else {
                                50.0 * rng.normal()
                            }
                        }
                        2 => {
                            if j == 3 {
                                big
                            } else {
                                big * (0.5 - x)
                            }
                        }
                        _ => big * 0.6 * x + if spike { big * 0.4 } else { 0.0 },
                    };
                    let blk = inp.block_table[i * inp.max_blocks + j / BLOCK_SIZE] as usize;
                    inp.kv[(blk * BLOCK_SIZE + j % BLOCK_SIZE) * HEAD_DIM] = common::encode(t, dtype);
                }
            }
            for causal in [false, true] {
                let (out, lse) = run_on(&dev, &inp, causal);
                let (ref_out, ref_lse) = inp.reference(causal, None);
                let what = format!("adversarial {dtype} h_q={h_q} s_q={s_q} causal={causal} seed={:#x}", inp.seed);
                common::assert_accuracy(&out, &lse, &ref_out, &ref_lse, dtype, &what);
            }
        }
    }
}

#[test]
fn seqlen_zero_only_and_single_token() {
    let Some(dev) = gpu("seqlen_zero_only_and_single_token") else { return };
    let mut rng = Rng::fresh();
    for lens in [vec![0, 0, 0], vec![1], vec![0, 1, 0, 2]] {
        check_case(&dev, Case::new(DType::BF16, 16, 2, lens), &mut rng);
    }
}

/// FlashMLA's grid at full size on the GPU, in bf16 and fp16; the float64 reference checks
/// a sample of sequences of every configuration (the longest and a random one), and the
/// whole output must be finite. Fixed-length configurations draw q and the cache from
/// N(0,1)/10 clamped to [-1, 1], variable-length ones from plain N(0,1).
#[test]
fn flashmla_grid_accuracy() {
    let Some(dev) = gpu("flashmla_grid_accuracy") else { return };
    let mut rng = Rng::fresh();
    let quick = std::env::var("MLA_GRID_QUICK").is_ok();
    let means: &[usize] = if quick { &[4096] } else { &[4096, 8192, 16384] };
    // MLA_GRID_DTYPES=bf16 or fp16 runs one of them (to fit a device lease).
    let only = std::env::var("MLA_GRID_DTYPES").ok().and_then(|d| DType::parse(&d));
    for dtype in [DType::BF16, DType::F16].into_iter().filter(|d| only.is_none_or(|o| o == *d)) {
        for &mean in means {
            for &h_q in &[16, 32, 64, 128] {
                for &s_q in &[1, 2] {
                    for varlen in [false, true] {
                        let lens: Vec<i32> = (0..128)
                            .map(|_| if varlen { ((mean as f64 + rng.normal() * mean as f64 / 2.0).round() as i32).max(s_q as i32) } else { mean as i32 })
                            .collect();
                        let what = format!("{dtype} mean={mean} h_q={h_q} s_q={s_q} varlen={varlen}");
                        grid_case(&dev, &mut rng, dtype, varlen, h_q, s_q, &lens, &what);
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn grid_case(dev: &Device, rng: &mut Rng, dtype: DType, unit_normal: bool, h_q: usize, s_q: usize, lens: &[i32], what: &str) {
    let (std, clamp) = if unit_normal { (1.0, 0.0) } else { (0.1, 1.0) };
    let b = lens.len();
    let nb: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(BLOCK_SIZE)).collect();
    let max_nb = *nb.iter().max().unwrap();
    let total: usize = nb.iter().sum();
    // Each sequence owns its blocks, in a shuffled order; tails are garbage.
    let mut ids: Vec<i32> = (0..total as i32).collect();
    rng.shuffle(&mut ids);
    let mut table = vec![2147480000; b * max_nb];
    let mut k = 0;
    for i in 0..b {
        for j in 0..nb[i] {
            table[i * max_nb + j] = ids[k];
            k += 1;
        }
    }
    let seed = rng.next_u64();
    let mut kv = Tensor::zeros(dev, &[total, BLOCK_SIZE, 1, HEAD_DIM], dtype).unwrap();
    fill_random(&mut kv, seed, std, clamp).unwrap();
    let mut q = Tensor::zeros(dev, &[b, s_q, h_q, HEAD_DIM], dtype).unwrap();
    fill_random(&mut q, seed ^ 1, std, clamp).unwrap();
    let bt = Tensor::from_i32(dev, &table, &[b, max_nb]).unwrap();
    let sl = Tensor::from_i32(dev, lens, &[b]).unwrap();
    let p = plan(&sl, s_q * h_q, 1).unwrap();
    let opts = DecodeOptions { causal: true, ..Default::default() };
    let r = decode(&q, &kv, &bt, &sl, &p, &opts).unwrap();
    dev.synchronize().unwrap();
    let out = r.out.to_f32().unwrap();
    let lse = r.lse.to_f32().unwrap();
    assert!(out.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    assert!(lse.iter().all(|x| x.is_finite()), "{what}: non-finite lse");
    // Reference for the longest sequence and one random sequence.
    let longest = (0..b).max_by_key(|&i| lens[i]).unwrap();
    let sample = [longest, (rng.next_u64() % b as u64) as usize];
    let inp = Inputs::from_device(&q, &kv, &table, max_nb, lens, dtype, seed);
    for &i in &sample {
        let (ref_out, ref_lse) = inp.reference(true, Some(i));
        let rows = s_q * h_q;
        let o = &out[i * rows * HEAD_DIM_V..(i + 1) * rows * HEAD_DIM_V];
        let l = &lse[i * rows..(i + 1) * rows];
        common::assert_accuracy(o, l, &ref_out, &ref_lse, dtype, &format!("{what} seq {i} (len {})", lens[i]));
    }
}

#[test]
fn plan_kernel_equals_host_plan() {
    let Some(dev) = gpu("plan_kernel_equals_host_plan") else { return };
    let mut rng = Rng::fresh();
    for (b, rows) in [(1, 16), (4, 64), (128, 16), (128, 256), (1000, 32), (3, 1)] {
        let lens: Vec<i32> = (0..b).map(|_| if rng.next_u64() % 7 == 0 { 0 } else { (rng.next_u64() % 20000) as i32 }).collect();
        let sl = Tensor::from_i32(&dev, &lens, &[b]).unwrap();
        let p = plan(&sl, rows, 1).unwrap();
        dev.synchronize().unwrap();
        let (meta, splits) = host_plan(&lens, p.num_parts);
        assert_eq!(p.metadata().to_i32().unwrap(), meta, "metadata, b={b} rows={rows}");
        assert_eq!(p.num_splits().to_i32().unwrap(), splits, "num_splits, b={b} rows={rows}");
    }
}

/// plan + decode + combine captured once in a CUDA graph, replayed after new lengths
/// (and new block tables) are written into the same device tensors.
#[test]
fn cuda_graph_capture_and_replay() {
    let Some(dev) = gpu("cuda_graph_capture_and_replay") else { return };
    let Device::Cuda(g) = &dev else { unreachable!() };
    let mut rng = Rng::fresh();
    let (h_q, s_q) = (16, 2);
    let max_len = 3000;
    let lens0 = vec![100, 2000, 0, 3000, 65];
    let case = Case::new(DType::BF16, h_q, s_q, lens0.clone()).max_len(max_len);
    let inp = Inputs::random(case.clone(), false, &mut rng);
    let t = inp.tensors(&dev);
    let mut seqlens = t.seqlens;
    let mut p = plan(&seqlens, s_q * h_q, 1).unwrap();
    let mut out = Tensor::zeros(&dev, &[lens0.len(), s_q, h_q, HEAD_DIM_V], DType::BF16).unwrap();
    let mut lse = Tensor::zeros(&dev, &[lens0.len(), h_q, s_q], DType::F32).unwrap();
    let stream: Arc<_> = g.new_stream().unwrap();
    let opts = DecodeOptions { causal: true, stream: Some(stream.clone()), ..Default::default() };
    // Warm-up outside capture loads the kernels.
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
    for lens in [lens0.clone(), vec![3000, 1, 64, 0, 2999], vec![0, 0, 0, 0, 1], vec![1500, 1500, 1500, 1500, 1500]] {
        seqlens.write_bytes(0, mla_core::tensor::as_bytes(&lens)).unwrap();
        out.fill_bytes(0xFF).unwrap();
        lse.fill_bytes(0xFF).unwrap();
        dev.synchronize().unwrap();
        graph.launch().unwrap();
        dev.synchronize().unwrap();
        let inp2 = inp.with_lens(&lens);
        let (ref_out, ref_lse) = inp2.reference(true, None);
        common::assert_accuracy(&out.to_f32().unwrap(), &lse.to_f32().unwrap(), &ref_out, &ref_lse, DType::BF16, &format!("graph replay lens={lens:?}"));
    }
}

#[test]
fn bad_device_block_index_is_a_typed_error() {
    let Some(dev) = gpu("bad_device_block_index_is_a_typed_error") else { return };
    let mut rng = Rng::fresh();
    let inp = Inputs::random(Case::new(DType::BF16, 16, 1, vec![100, 200]), false, &mut rng);
    let t = inp.tensors(&dev);
    let max_nb = t.block_table.shape()[1];
    for bad in [inp.num_blocks() as i32, -1, i32::MAX] {
        let mut table = inp.block_table.clone();
        table[max_nb + 1] = bad; // block 1 of sequence 1 is read (200 tokens = 4 blocks)
        let bt = Tensor::from_i32(&dev, &table, &[2, max_nb]).unwrap();
        let p = plan(&t.seqlens, 16, 1).unwrap();
        let r = decode(&t.q, &t.kv, &bt, &t.seqlens, &p, &DecodeOptions::default());
        assert!(r.is_ok(), "device-resident indices are checked on the device");
        let e = dev.synchronize().unwrap_err();
        assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange, "{e}");
        // The flag is cleared: a good step afterwards succeeds.
        decode(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &DecodeOptions::default()).unwrap();
        dev.synchronize().unwrap();
    }
    // A garbage entry past the used blocks is never read: no error.
    let mut table = inp.block_table.clone();
    table[max_nb - 1] = -5;
    let bt = Tensor::from_i32(&dev, &table, &[2, max_nb]).unwrap();
    let p = plan(&t.seqlens, 16, 1).unwrap();
    decode(&t.q, &t.kv, &bt, &t.seqlens, &p, &DecodeOptions::default()).unwrap();
    dev.synchronize().unwrap();
}

/// A plan made for other lengths (the lengths changed, no replan) is reported, not used.
#[test]
fn stale_plan_is_a_typed_error() {
    let Some(dev) = gpu("stale_plan_is_a_typed_error") else { return };
    let mut rng = Rng::fresh();
    let inp = Inputs::random(Case::new(DType::BF16, 16, 1, vec![3000, 200]), false, &mut rng);
    let t = inp.tensors(&dev);
    let mut sl = t.seqlens;
    let p = plan(&sl, 16, 1).unwrap();
    dev.synchronize().unwrap();
    sl.write_bytes(0, mla_core::tensor::as_bytes(&[0i32, 150])).unwrap();
    decode(&t.q, &t.kv, &t.block_table, &sl, &p, &DecodeOptions::default()).unwrap();
    let e = dev.synchronize().unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.contains("plan"), "{e}");
    // After a replan the same step is fine.
    let p = plan(&sl, 16, 1).unwrap();
    decode(&t.q, &t.kv, &t.block_table, &sl, &p, &DecodeOptions::default()).unwrap();
    dev.synchronize().unwrap();
}

/// Every handle to one GPU is the same device (one stream, one error flag).
#[test]
fn one_device_per_ordinal() {
    let Some(a) = gpu("one_device_per_ordinal") else { return };
    let b = Device::cuda(0).unwrap();
    match (&a, &b) {
        (Device::Cuda(x), Device::Cuda(y)) => assert!(Arc::ptr_eq(x, y)),
        _ => unreachable!(),
    }
}

/// The device runs the path its compute capability and MLA_FORCE_PORTABLE give, gpuStatus()
/// says the same, and a conflicting explicit request is refused while it is open.
#[test]
fn kernel_path_follows_the_device_and_the_request() {
    use mla_core::gpu::path::{select_for_build, Request};
    use mla_core::{DeviceOptions, KernelPath};
    let Some(dev) = gpu("kernel_path_follows_the_device_and_the_request") else { return };
    let info = dev.info();
    let req = Request::from_env_value(std::env::var("MLA_FORCE_PORTABLE").ok().as_deref()).unwrap();
    let want = select_for_build(info.compute_capability, req, mla_core::gpu::driver_version()).unwrap();
    assert_eq!(info.kernel_path, Some(want.path), "{info:?}");
    let Device::Cuda(g) = &dev else { unreachable!() };
    assert_eq!(g.kernel_target(), want.target);
    if info.compute_capability == (9, 0) {
        let forced = req != Request::Auto;
        assert_eq!(want.path, if forced { KernelPath::PortablePtx } else { KernelPath::Hopper });
        // The H200 lets a block have 227 KiB: the PTX's 32-row tiles run there.
        if forced {
            assert_eq!(g.portable_max_tile(), 32);
        }
    }
    let s = mla_core::device::gpu_status();
    assert!(s.available, "{s:?}");
    assert_eq!(s.devices[0].kernel_path, info.kernel_path, "{s:?}");
    assert!(s.kernel_targets.contains(&want.target), "{s:?}");
    let other = if want.path == KernelPath::Hopper { KernelPath::PortablePtx } else { KernelPath::Hopper };
    if select_for_build(info.compute_capability, Request::Exact(other), None).is_ok() {
        let e = Device::cuda_with(0, DeviceOptions { kernel_path: Some(other), ..Default::default() }).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        assert!(e.message.contains(want.path.as_str()) && e.message.contains(other.as_str()), "{e}");
    }
    // The same request again shares the open device.
    let again = Device::cuda_with(0, DeviceOptions { kernel_path: Some(want.path), ..Default::default() }).unwrap();
    assert!(again.same(&dev));
}

/// Steps run from several threads at once: each error reaches the step that caused it.
#[test]
fn concurrent_steps_get_their_own_errors() {
    let Some(dev) = gpu("concurrent_steps_get_their_own_errors") else { return };
    let mut rng = Rng::fresh();
    let inp = Inputs::random(Case::new(DType::BF16, 16, 1, vec![700, 300]), false, &mut rng);
    let t = inp.tensors(&dev);
    let max_nb = t.block_table.shape()[1];
    let mut table = inp.block_table.clone();
    table[1] = inp.num_blocks() as i32; // block 1 of sequence 0 is read
    let bad_bt = Tensor::from_i32(&dev, &table, &[2, max_nb]).unwrap();
    std::thread::scope(|s| {
        for bad in [false, true, false, true] {
            let (dev, t, bad_bt) = (&dev, &t, &bad_bt);
            s.spawn(move || {
                for _ in 0..20 {
                    let bt = if bad { bad_bt } else { &t.block_table };
                    let p = plan(&t.seqlens, 16, 1).unwrap();
                    let r = dev.run_step(|| decode(&t.q, &t.kv, bt, &t.seqlens, &p, &DecodeOptions::default()));
                    match (bad, r) {
                        (false, Ok(_)) => {}
                        (true, Err(e)) => assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange, "{e}"),
                        (bad, r) => panic!("bad={bad}: {:?}", r.map(|_| ())),
                    }
                }
            });
        }
    });
}

#[test]
fn bad_device_seqlen_is_a_typed_error() {
    let Some(dev) = gpu("bad_device_seqlen_is_a_typed_error") else { return };
    let mut rng = Rng::fresh();
    let inp = Inputs::random(Case::new(DType::BF16, 16, 1, vec![100, 200]), false, &mut rng);
    let t = inp.tensors(&dev);
    let max_len = (t.block_table.shape()[1] * BLOCK_SIZE) as i32;
    for bad in [-1, max_len + 1] {
        let sl = Tensor::from_i32(&dev, &[100, bad], &[2]).unwrap();
        let p = plan(&sl, 16, 1).unwrap();
        decode(&t.q, &t.kv, &t.block_table, &sl, &p, &DecodeOptions::default()).unwrap();
        let e = dev.synchronize().unwrap_err();
        assert_eq!(e.code, ErrorCode::SeqlenOutOfRange, "{e}");
    }
}

#[test]
fn host_checks_still_run_for_device_tensors() {
    let Some(dev) = gpu("host_checks_still_run_for_device_tensors") else { return };
    let q = Tensor::zeros(&dev, &[2, 1, 16, 512], DType::BF16).unwrap();
    let kv = Tensor::zeros(&dev, &[4, 64, 1, 576], DType::BF16).unwrap();
    let bt = Tensor::from_i32(&dev, &[0, 1, 2, 3], &[2, 2]).unwrap();
    let sl = Tensor::from_i32(&dev, &[10, 10], &[2]).unwrap();
    let p = plan(&sl, 16, 1).unwrap();
    let e = decode(&q, &kv, &bt, &sl, &p, &DecodeOptions::default()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    let cpu_sl = Tensor::from_i32(&Device::Cpu, &[10, 10], &[2]).unwrap();
    let q = Tensor::zeros(&dev, &[2, 1, 16, 576], DType::BF16).unwrap();
    let e = decode(&q, &kv, &bt, &cpu_sl, &p, &DecodeOptions::default()).unwrap_err();
    assert_eq!(e.code, ErrorCode::DeviceMismatch);
}

/// The reduced set compute-sanitizer runs (memcheck, racecheck): splits, causal rows
/// with no keys, every row tile, both dtypes, and a bad index; two and eight 64-row tiles
/// (one and four cluster pairs of the ws kernel per part). Run with --ignored.
#[test]
#[ignore = "run by scripts/gpu-suite.sh under compute-sanitizer"]
fn sanitizer_small_cases() {
    let Some(dev) = gpu("sanitizer_small_cases") else { return };
    let mut rng = Rng::fresh();
    for (dtype, h_q, s_q, lens) in [
        (DType::BF16, 16, 1, vec![0, 1, 65, 700]),
        (DType::F16, 3, 4, vec![2, 140, 0]),
        (DType::BF16, 64, 2, vec![300, 64]),
        (DType::BF16, 128, 1, vec![130]),
        (DType::BF16, 128, 4, vec![200, 70]),
    ] {
        let inp = Inputs::random(Case::new(dtype, h_q, s_q, lens), false, &mut rng);
        let (out, lse) = run_on(&dev, &inp, true);
        let (ref_out, ref_lse) = inp.reference(true, None);
        common::assert_accuracy(&out, &lse, &ref_out, &ref_lse, dtype, "sanitizer case");
    }
    let inp = Inputs::random(Case::new(DType::BF16, 16, 1, vec![100, 200]), false, &mut rng);
    let t = inp.tensors(&dev);
    let mut table = inp.block_table.clone();
    table[t.block_table.shape()[1] + 2] = 1 << 30;
    let bt = Tensor::from_i32(&dev, &table, &[2, t.block_table.shape()[1]]).unwrap();
    let p = plan(&t.seqlens, 16, 1).unwrap();
    decode(&t.q, &t.kv, &bt, &t.seqlens, &p, &DecodeOptions::default()).unwrap();
    assert_eq!(dev.synchronize().unwrap_err().code, ErrorCode::BlockIndexOutOfRange);
}

// ---------------------------------------------------------------------------------------
// The serving path (common/serve.rs; the same bodies run on the CPU in tests/serve.rs)

#[test]
fn serve_bad_step_is_reported_by_the_next_sync() {
    let Some(dev) = gpu("serve_bad_step_is_reported_by_the_next_sync") else { return };
    common::serve::bad_step_is_reported_by_the_next_sync(&dev);
}

#[test]
fn serve_wait_step_reports_its_own_error() {
    let Some(dev) = gpu("serve_wait_step_reports_its_own_error") else { return };
    common::serve::wait_step_reports_its_own_error(&dev);
}

#[test]
fn serve_outputs_dropped_while_pending_are_reused_in_stream_order() {
    let Some(dev) = gpu("serve_outputs_dropped_while_pending_are_reused_in_stream_order") else { return };
    common::serve::outputs_dropped_while_pending_are_reused_in_stream_order(&dev);
}

#[test]
fn serve_poll_step_reports_its_own_error() {
    let Some(dev) = gpu("serve_poll_step_reports_its_own_error") else { return };
    common::serve::poll_step_reports_its_own_error(&dev);
}

#[test]
fn serve_reading_a_tensor_reports_the_failed_step() {
    let Some(dev) = gpu("serve_reading_a_tensor_reports_the_failed_step") else { return };
    common::serve::reading_a_tensor_reports_the_failed_step(&dev);
}

#[test]
fn serve_bad_length_is_reported_by_the_next_sync() {
    let Some(dev) = gpu("serve_bad_length_is_reported_by_the_next_sync") else { return };
    common::serve::bad_length_is_reported_by_the_next_sync(&dev);
}

#[test]
fn serve_shape_errors_fail_the_call() {
    let Some(dev) = gpu("serve_shape_errors_fail_the_call") else { return };
    common::serve::shape_errors_fail_the_call(&dev);
}

/// 1500 steps > the 1024 step slots of the log: slots are reused after a wait, and a bad
/// step's flag is cleared before its slot serves another step.
#[test]
fn serve_many_steps_bad_ones_never_touch_good_ones() {
    let Some(dev) = gpu("serve_many_steps_bad_ones_never_touch_good_ones") else { return };
    common::serve::many_steps_bad_ones_never_touch_good_ones(&dev, 1500);
}

/// A stale plan in an enqueued step is reported by the next sync, naming the step.
#[test]
fn serve_stale_plan_names_the_step() {
    let Some(dev) = gpu("serve_stale_plan_names_the_step") else { return };
    let mut rng = Rng::fresh();
    let inp = Inputs::random(Case::new(DType::BF16, 16, 1, vec![3000, 200]), false, &mut rng);
    let t = inp.tensors(&dev);
    let p = plan(&t.seqlens, 16, 1).unwrap();
    let sl = Tensor::from_i32(&dev, &[0, 150], &[2]).unwrap();
    let (mut o, mut l) = common::serve::poisoned_outputs(&dev, &inp);
    let id = mla_core::decode::enqueue_into(&t.q, &t.kv, &t.block_table, &sl, &p, &common::serve::opts("stale"), &mut o, &mut l).unwrap();
    let e = dev.synchronize().unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.starts_with(&format!("step {id} (stale): plan")), "{e}");
}

#[test]
fn serve_replan_in_place_equals_a_fresh_plan() {
    let Some(dev) = gpu("serve_replan_in_place_equals_a_fresh_plan") else { return };
    common::serve::replan_in_place_equals_a_fresh_plan(&dev);
}

#[test]
fn serve_append_batch_equals_per_sequence_appends() {
    let Some(dev) = gpu("serve_append_batch_equals_per_sequence_appends") else { return };
    common::serve::append_batch_equals_per_sequence_appends(&dev);
}

#[test]
fn serve_append_batch_is_all_or_nothing() {
    let Some(dev) = gpu("serve_append_batch_is_all_or_nothing") else { return };
    common::serve::append_batch_is_all_or_nothing(&dev);
}

#[test]
fn serve_batch_into_equals_batch() {
    let Some(dev) = gpu("serve_batch_into_equals_batch") else { return };
    common::serve::batch_into_equals_batch(&dev);
}

/// A 3-layer step captured in a CUDA graph and replayed with new lengths equals eager
/// decodes bit for bit.
#[test]
fn serve_graph_replay_with_new_lengths_equals_eager_decode() {
    let Some(dev) = gpu("serve_graph_replay_with_new_lengths_equals_eager_decode") else { return };
    common::serve::graph_replay_with_new_lengths_equals_eager_decode(&dev);
}

#[test]
fn serve_graph_replay_reports_bad_steps() {
    let Some(dev) = gpu("serve_graph_replay_reports_bad_steps") else { return };
    common::serve::graph_replay_reports_bad_steps(&dev);
}

/// 10k serving steps with forks and frees stay flat in host and device memory.
#[test]
fn serve_soak_10k_steps_with_forks_and_frees() {
    let Some(dev) = gpu("serve_soak_10k_steps_with_forks_and_frees") else { return };
    common::serve::soak(&dev, 10_000);
}

/// Stream-ordered frees: inputs dropped right after enqueueing stay valid for the step.
#[test]
fn serve_inputs_dropped_after_enqueue_stay_valid() {
    let Some(dev) = gpu("serve_inputs_dropped_after_enqueue_stay_valid") else { return };
    common::serve::inputs_dropped_after_enqueue_stay_valid(&dev);
}

/// One plan shared by decodes on two streams of the caller's: each decode waits for the
/// plan's earlier work on the other stream (and for the device stream's uploads), so every
/// result is exact; errors of steps on other streams are still reported by id.
#[test]
fn serve_shared_plan_across_streams() {
    let Some(dev) = gpu("serve_shared_plan_across_streams") else { return };
    let Device::Cuda(g) = &dev else { unreachable!() };
    let mut rng = Rng::fresh();
    let inp = Inputs::random(Case::new(DType::BF16, 64, 2, vec![3000, 700, 1, 129]), false, &mut rng);
    let t = inp.tensors(&dev);
    let p = plan(&t.seqlens, 128, 1).unwrap();
    let streams = [g.new_stream().unwrap(), g.new_stream().unwrap()];
    let mut outs: Vec<(Tensor, Tensor)> = (0..6).map(|_| common::serve::poisoned_outputs(&dev, &inp)).collect();
    let mut ids = Vec::new();
    for (k, (o, l)) in outs.iter_mut().enumerate() {
        let opts = DecodeOptions { causal: true, stream: Some(streams[k % 2].clone()), label: Some(format!("stream {}", k % 2).into()), ..Default::default() };
        ids.push(mla_core::decode::enqueue_into(&t.q, &t.kv, &t.block_table, &t.seqlens, &p, &opts, o, l).unwrap());
    }
    let bt = common::serve::bad_table(&dev, &inp, inp.num_blocks() as i32);
    let (mut bo, mut bl) = common::serve::poisoned_outputs(&dev, &inp);
    let opts = DecodeOptions { causal: true, stream: Some(streams[1].clone()), label: Some("bad on stream 1".into()), ..Default::default() };
    let bad = mla_core::decode::enqueue_into(&t.q, &t.kv, &bt, &t.seqlens, &p, &opts, &mut bo, &mut bl).unwrap();
    for id in &ids {
        dev.wait_step(*id).unwrap();
    }
    let e = dev.synchronize().unwrap_err();
    assert_eq!(e.code, ErrorCode::BlockIndexOutOfRange, "{e}");
    assert!(e.message.starts_with(&format!("step {bad} (bad on stream 1): ")), "{e}");
    for (o, l) in &outs {
        common::serve::check_outputs(&inp, o, l, "a decode on a caller's stream with a shared plan");
    }
}
