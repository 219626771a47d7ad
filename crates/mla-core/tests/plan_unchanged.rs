//! The default plan (no `batch_invariant`) is the scheduler it always was: its metadata
//! equals a frozen copy of the greedy walk, and CPU decodes with it give the output bits
//! they gave before invariant plans existed (hashes recorded on the code of 42d7050).

mod common;

use common::*;
use mla_core::cpu::{decode_with_isa, CpuDecodeArgs, Isa};
use mla_core::plan::{host_plan, META_INTS};
use mla_core::validate::DecodeShape;
use mla_core::{plan, DType, Device, Tensor};

/// The greedy walk of `host_plan` as of 42d7050, frozen: the definition of the default
/// plan. (Fixed split cost 5 = SPLIT_FIXED_COST.)
fn frozen_walk(seqlens: &[i32], num_parts: usize) -> (Vec<i32>, Vec<i32>) {
    let b = seqlens.len();
    let fixed = 5i64;
    let nb: Vec<i64> = seqlens.iter().map(|&l| (l.max(0) as i64 + 63) / 64).collect();
    let total: i64 = nb.iter().map(|&n| if n > 0 { n + fixed } else { 0 }).sum();
    let payload = ((total + num_parts as i64 - 1) / num_parts as i64).max(1) + fixed;
    let mut meta = vec![0i32; num_parts * META_INTS];
    let mut num_splits = vec![0i32; b + 1];
    let (mut seq, mut blk, mut splits_in_seq) = (0usize, 0i64, 0i32);
    for p in 0..num_parts {
        let m = &mut meta[p * META_INTS..(p + 1) * META_INTS];
        m[0] = seq as i32;
        m[1] = blk as i32;
        m[4] = splits_in_seq;
        let mut remain = payload;
        while seq < b {
            let left = nb[seq] - blk;
            if left > 0 {
                if remain <= fixed {
                    break;
                }
                let take = left.min(remain - fixed);
                remain -= take + fixed;
                blk += take;
                splits_in_seq += 1;
                if blk < nb[seq] {
                    break;
                }
            }
            num_splits[seq + 1] = num_splits[seq] + splits_in_seq;
            seq += 1;
            blk = 0;
            splits_in_seq = 0;
        }
        m[2] = seq as i32;
        m[3] = blk as i32;
    }
    (meta, num_splits)
}

#[test]
fn default_plan_is_the_frozen_walk() {
    if std::env::var("MLA_SPLIT_FIXED_COST").is_ok() {
        println!("SKIPPED default_plan_is_the_frozen_walk (MLA_SPLIT_FIXED_COST is set)");
        return;
    }
    let mut rng = Rng::new("default_plan_is_the_frozen_walk");
    for _ in 0..300 {
        let b = 1 + rng.below(200);
        let max = [1, 64, 200, 5000, 70000][rng.below(5)];
        let lens: Vec<i32> = (0..b).map(|_| if rng.below(6) == 0 { 0 } else { rng.below(max + 1) as i32 }).collect();
        let parts = 1 + rng.below(140);
        assert_eq!(host_plan(&lens, parts), frozen_walk(&lens, parts), "lens={lens:?} parts={parts}");
    }
    // The public entry on the CPU backend (parts = its thread count).
    let lens = vec![4096, 0, 8192, 64, 65, 1, 16384, 5000];
    let p = plan(&Tensor::from_i32(&Device::Cpu, &lens, &[8]).unwrap(), 16, 1).unwrap();
    let (meta, splits) = frozen_walk(&lens, p.num_parts);
    assert_eq!(p.metadata().to_i32().unwrap(), meta);
    assert_eq!(p.num_splits().to_i32().unwrap(), splits);
}

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, c| (h ^ c as u64).wrapping_mul(0x100_0000_01b3))
}

/// (hash of out bits, hash of lse bits) of a CPU decode of fixed inputs with the default
/// plan of `parts` parts.
fn hashes(dtype: DType, h_q: usize, s_q: usize, lens: &[i32], causal: bool, parts: usize, isa: Isa, seed: u64) -> (u64, u64) {
    let inp = Inputs::generate(Case::new(dtype, h_q, s_q, lens.to_vec()), Dist::Small, &mut Rng::from_seed(seed));
    let (meta, splits) = frozen_walk(&inp.seqlens, parts);
    let args = CpuDecodeArgs {
        shape: DecodeShape { b: inp.b, s_q, h_q, h_kv: 1, num_blocks: inp.num_blocks, max_blocks_per_seq: inp.max_blocks, dtype },
        q: &inp.q,
        kv: &inp.kv,
        block_table: &inp.block_table,
        seqlens: &inp.seqlens,
        metadata: &meta,
        num_splits: &splits,
        num_parts: parts,
        chunks: None,
        causal,
        scale: 1.0 / 24.0,
    };
    let mut out = vec![0xFFFFu16; inp.b * s_q * h_q * DV];
    let mut lse = vec![f32::NAN; inp.b * s_q * h_q];
    decode_with_isa(&args, &mut out, &mut lse, isa);
    (fnv1a(out.iter().flat_map(|x| x.to_le_bytes())), fnv1a(lse.iter().flat_map(|x| x.to_bits().to_le_bytes())))
}

/// Output bits of default-plan decodes, as recorded before batch-invariant plans: a change
/// here means the default path changed (update the hashes only for a deliberate change
/// of the CPU kernels).
#[test]
fn default_plan_decodes_are_bit_for_bit_unchanged() {
    // (dtype, h_q, s_q, lengths, causal, parts, input seed, [(portable out, lse), (AVX2 out, lse)])
    type Case<'a> = (DType, usize, usize, &'a [i32], bool, usize, u64, [(u64, u64); 2]);
    let cases: &[Case] = &[
        (
            DType::BF16,
            16,
            1,
            &[0, 1, 63, 64, 65, 300, 4096, 7000],
            false,
            3,
            11,
            [(0x84807b43e65d1224, 0xf755c9a7b8d32071), (0x084db51d97a05804, 0x22abecb49dbb78f5)],
        ),
        (
            DType::BF16,
            16,
            1,
            &[0, 1, 63, 64, 65, 300, 4096, 7000],
            false,
            16,
            11,
            [(0xe6327ab6a5cb199f, 0x1e4cf42c603992fb), (0xa0fec1066a9ac74b, 0x28468d39fc634e1e)],
        ),
        (DType::F16, 128, 2, &[2, 130, 2500, 5000], true, 5, 12, [(0x114b7e03eae7480e, 0xb6c404e3252722cb), (0xd723058ab4035d53, 0x8616f1f578130a99)]),
        (DType::BF16, 64, 1, &[3000, 0, 1], true, 1, 13, [(0xbad6b1236a2dbcfd, 0x40a9964c3f8cfdfd), (0x3cc341c11293f406, 0x71d8c386e3902689)]),
    ];
    for &(dtype, h_q, s_q, lens, causal, parts, seed, want) in cases {
        for (isa, want) in [Isa::Portable, Isa::Avx2Fma].into_iter().zip(want) {
            if !isa.supported() {
                println!("SKIPPED {isa:?} (not supported by this CPU)");
                continue;
            }
            let got = hashes(dtype, h_q, s_q, lens, causal, parts, isa, seed);
            assert_eq!(got, want, "{dtype:?} h_q={h_q} s_q={s_q} lens={lens:?} parts={parts} {isa:?}: (out, lse) hashes");
        }
    }
}
