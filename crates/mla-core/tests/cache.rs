//! The paged latent KV cache, through its public API on the CPU backend.

use mla_core::cache::BLOCK_TABLE_PAD;
use mla_core::{decode, plan, DType, DecodeOptions, Device, ErrorCode, KvCache, KvCacheConfig, SeqId, Tensor, BLOCK_SIZE, HEAD_DIM};

const D: usize = HEAD_DIM;

fn cache(num_blocks: usize, dtype: DType) -> KvCache {
    KvCache::new(&Device::Cpu, KvCacheConfig { num_blocks, dtype }).unwrap()
}

/// `n` rows of distinct, non-zero bit patterns (tagged by `tag`), so a row written to the
/// wrong place or not at all shows.
fn rows(n: usize, tag: u16) -> Vec<u16> {
    (0..n * D).map(|i| ((i as u32).wrapping_mul(2654435761) >> 16) as u16 ^ tag.wrapping_mul(0x9E37) | 1).collect()
}

/// The sequence's tokens as stored in the pool, gathered through its block ids.
fn read_seq(c: &KvCache, s: SeqId) -> Vec<u16> {
    let bytes = c.tensor().to_bytes().unwrap();
    let pool: Vec<u16> = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    let ids = c.block_ids(s).unwrap();
    let len = c.seq_len(s).unwrap();
    assert_eq!(ids.len(), len.div_ceil(BLOCK_SIZE), "blocks held vs length {len}");
    let mut out = Vec::with_capacity(len * D);
    for t in 0..len {
        let b = ids[t / BLOCK_SIZE] as usize;
        let start = (b * BLOCK_SIZE + t % BLOCK_SIZE) * D;
        out.extend_from_slice(&pool[start..start + D]);
    }
    out
}

fn code<T: std::fmt::Debug>(r: mla_core::Result<T>) -> ErrorCode {
    r.expect_err("expected an error").code
}

struct Rng(u64);
impl Rng {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

#[test]
fn new_makes_a_zeroed_pool_and_checks_its_config() {
    let c = cache(3, DType::F16);
    assert_eq!(c.tensor().shape(), &[3, BLOCK_SIZE, 1, D]);
    assert_eq!(c.tensor().dtype(), DType::F16);
    assert_eq!((c.dtype(), c.num_blocks(), c.free_blocks()), (DType::F16, 3, 3));
    assert!(!c.device().is_cuda());
    assert!(c.tensor().to_bytes().unwrap().iter().all(|&b| b == 0));
    assert!(c.sequences().is_empty());

    for dt in [DType::F32, DType::I32] {
        let e = KvCache::new(&Device::Cpu, KvCacheConfig { num_blocks: 1, dtype: dt }).unwrap_err();
        assert_eq!(e.code, ErrorCode::DtypeMismatch);
        assert!(e.message.contains("dtype") && e.message.contains(dt.name()), "{e}");
    }
    let e = KvCache::new(&Device::Cpu, KvCacheConfig { num_blocks: 0, dtype: DType::BF16 }).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("num_blocks"), "{e}");
}

#[test]
fn appends_across_block_edges_land_at_the_block_ids() {
    for dtype in [DType::BF16, DType::F16] {
        let mut c = cache(16, dtype);
        let s = c.create_sequence();
        assert_eq!((c.seq_len(s).unwrap(), c.block_ids(s).unwrap()), (0, vec![]));
        let mut want = Vec::new();
        // 1 | 63 (fills block 0 exactly) | 64 (a whole block) | 65 (a block and one) | 140
        for (k, n) in [1usize, 63, 64, 65, 140].into_iter().enumerate() {
            let r = rows(n, k as u16 + 1);
            c.append(s, &r).unwrap();
            want.extend_from_slice(&r);
            let len = want.len() / D;
            assert_eq!(c.seq_len(s).unwrap(), len);
            assert_eq!(c.block_ids(s).unwrap().len(), len.div_ceil(BLOCK_SIZE));
            assert_eq!(c.free_blocks(), 16 - len.div_ceil(BLOCK_SIZE));
            assert!(read_seq(&c, s) == want, "{dtype}: contents after appending {n} rows");
        }
        assert_eq!(c.seq_len(s).unwrap(), 333);
        let ids = c.block_ids(s).unwrap();
        let mut uniq = ids.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), ids.len(), "distinct blocks");
        assert!(ids.iter().all(|&b| (0..16).contains(&b)));
        // An empty append is a no-op.
        c.append(s, &[]).unwrap();
        assert_eq!(c.seq_len(s).unwrap(), 333);
    }
}

#[test]
fn interleaved_sequences_do_not_overwrite_each_other() {
    let mut c = cache(8, DType::BF16);
    let (a, b) = (c.create_sequence(), c.create_sequence());
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    for (k, n) in [30usize, 50, 64, 7].into_iter().enumerate() {
        let (ra, rb) = (rows(n, 2 * k as u16 + 10), rows(n + 3, 2 * k as u16 + 11));
        c.append(a, &ra).unwrap();
        c.append(b, &rb).unwrap();
        wa.extend(ra);
        wb.extend(rb);
    }
    assert!(read_seq(&c, a) == wa);
    assert!(read_seq(&c, b) == wb);
    assert_eq!(c.sequences(), vec![a, b]);
}

#[test]
fn append_rejects_partial_rows_and_leaves_the_sequence_unchanged() {
    let mut c = cache(2, DType::BF16);
    let s = c.create_sequence();
    c.append(s, &rows(3, 1)).unwrap();
    for bad in [1usize, D - 1, D + 1, 2 * D + 5] {
        let e = c.append(s, &vec![7u16; bad]).unwrap_err();
        assert_eq!(e.code, ErrorCode::ShapeMismatch);
        assert!(e.message.contains("rows") && e.message.contains(&bad.to_string()), "{e}");
        assert_eq!(code(c.append_f32(s, &vec![0.5; bad])), ErrorCode::ShapeMismatch);
    }
    assert_eq!(c.seq_len(s).unwrap(), 3);
    assert!(read_seq(&c, s) == rows(3, 1));
}

#[test]
fn exhaustion_errors_and_changes_nothing() {
    let mut c = cache(3, DType::BF16);
    let a = c.create_sequence();
    let ra = rows(100, 1); // 2 blocks
    c.append(a, &ra).unwrap();
    let pool_before = c.tensor().to_bytes().unwrap();
    let ids_before = c.block_ids(a).unwrap();

    // a: 100 + 100 rows need 4 blocks, it has 2 and 1 is free.
    let e = c.append(a, &rows(100, 2)).unwrap_err();
    assert_eq!(e.code, ErrorCode::CacheExhausted);
    assert!(e.message.contains('2') && e.message.contains('1'), "names needed and free: {e}");
    // b: 129 rows need 3 blocks.
    let b = c.create_sequence();
    assert_eq!(code(c.append(b, &rows(129, 3))), ErrorCode::CacheExhausted);
    assert_eq!(code(c.append_f32(b, &vec![0.25; 129 * D])), ErrorCode::CacheExhausted);

    assert_eq!(c.free_blocks(), 1);
    assert_eq!((c.seq_len(a).unwrap(), c.block_ids(a).unwrap()), (100, ids_before));
    assert_eq!((c.seq_len(b).unwrap(), c.block_ids(b).unwrap()), (0, vec![]));
    assert!(c.tensor().to_bytes().unwrap() == pool_before, "a failed append writes nothing");

    // What fits still works: 28 rows fill a's last block, 64 more take the free one.
    let (r1, r2) = (rows(28, 4), rows(64, 5));
    c.append(a, &r1).unwrap();
    assert_eq!(c.free_blocks(), 1);
    c.append(a, &r2).unwrap();
    assert_eq!(c.free_blocks(), 0);
    assert_eq!(code(c.append(a, &rows(1, 6))), ErrorCode::CacheExhausted);
    assert_eq!(code(c.append(b, &rows(1, 6))), ErrorCode::CacheExhausted);
    assert_eq!(c.seq_len(a).unwrap(), 192);
    assert!(read_seq(&c, a) == [ra, r1, r2].concat());
}

#[test]
fn copy_on_write_that_cannot_get_a_block_changes_nothing() {
    let mut c = cache(2, DType::F16);
    let a = c.create_sequence();
    let ra = rows(70, 1); // block 0 full, block 1 holds 6 rows
    c.append(a, &ra).unwrap();
    let f = c.fork(a).unwrap();
    assert_eq!(c.free_blocks(), 0);
    let pool_before = c.tensor().to_bytes().unwrap();
    // Even one row needs a block: the shared, partial last block must be copied first.
    assert_eq!(code(c.append(f, &rows(1, 2))), ErrorCode::CacheExhausted);
    assert_eq!(code(c.append(a, &rows(1, 2))), ErrorCode::CacheExhausted);
    assert!(c.tensor().to_bytes().unwrap() == pool_before);
    assert_eq!(c.block_ids(f).unwrap(), c.block_ids(a).unwrap());
    assert_eq!((c.seq_len(a).unwrap(), c.seq_len(f).unwrap()), (70, 70));
    // Once the fork is gone the original owns its last block again and appends in place.
    c.free(f).unwrap();
    assert_eq!(c.free_blocks(), 0);
    let r = rows(58, 3);
    c.append(a, &r).unwrap();
    assert!(read_seq(&c, a) == [ra, r].concat());
}

#[test]
fn free_returns_blocks_and_they_are_reused() {
    let mut c = cache(4, DType::BF16);
    let a = c.create_sequence();
    c.append(a, &rows(130, 1)).unwrap(); // 3 blocks
    assert_eq!(c.free_blocks(), 1);
    let a_ids = c.block_ids(a).unwrap();
    c.free(a).unwrap();
    assert_eq!(c.free_blocks(), 4);
    assert!(c.sequences().is_empty());

    // The whole pool is usable again, including a's old blocks.
    let b = c.create_sequence();
    let rb = rows(256, 2);
    c.append(b, &rb).unwrap();
    assert_eq!(c.free_blocks(), 0);
    let b_ids = c.block_ids(b).unwrap();
    assert!(a_ids.iter().all(|id| b_ids.contains(id)));
    assert!(read_seq(&c, b) == rb);
    // Freeing an empty sequence is fine and releases nothing.
    let e = c.create_sequence();
    c.free(e).unwrap();
    assert_eq!(c.free_blocks(), 0);
}

#[test]
fn fork_shares_blocks_and_copies_a_partial_last_block_on_write() {
    let mut c = cache(8, DType::BF16);
    let a = c.create_sequence();
    let ra = rows(100, 1); // block 0 full, block 1 holds 36 rows
    c.append(a, &ra).unwrap();
    let free = c.free_blocks();

    let f = c.fork(a).unwrap();
    assert_ne!(f, a);
    assert_eq!(c.block_ids(f).unwrap(), c.block_ids(a).unwrap(), "same physical blocks");
    assert_eq!(c.seq_len(f).unwrap(), 100);
    assert_eq!(c.free_blocks(), free, "a fork takes no block");
    assert_eq!(c.sequences(), vec![a, f]);

    let rf = rows(40, 2); // crosses into a third block
    c.append(f, &rf).unwrap();
    let (ia, i_f) = (c.block_ids(a).unwrap(), c.block_ids(f).unwrap());
    assert_eq!(ia[0], i_f[0], "the full block stays shared");
    assert_ne!(ia[1], i_f[1], "the partial block was copied");
    assert_eq!(i_f.len(), 3);
    assert_eq!(c.free_blocks(), free - 2, "one copy + one new block");
    assert!(read_seq(&c, a) == ra, "the original is untouched");
    assert!(read_seq(&c, f) == [ra.clone(), rf.clone()].concat(), "the fork sees prefix + new rows");

    // The original now owns its partial block alone: it appends in place.
    let ra2 = rows(5, 3);
    c.append(a, &ra2).unwrap();
    assert_eq!(c.block_ids(a).unwrap(), ia);
    assert_eq!(c.free_blocks(), free - 2);
    assert!(read_seq(&c, a) == [ra.clone(), ra2].concat());
    assert!(read_seq(&c, f) == [ra.clone(), rf.clone()].concat());

    // Freeing the original keeps everything the fork reads.
    c.free(a).unwrap();
    assert_eq!(c.free_blocks(), free - 2 + 1, "only a's private block is released");
    assert!(read_seq(&c, f) == [ra, rf].concat());
    c.free(f).unwrap();
    assert_eq!(c.free_blocks(), 8);
}

#[test]
fn fork_at_a_block_boundary_shares_all_full_blocks() {
    let mut c = cache(8, DType::F16);
    let a = c.create_sequence();
    let ra = rows(128, 1);
    c.append(a, &ra).unwrap();
    let f = c.fork(a).unwrap();
    let shared = c.block_ids(a).unwrap();
    let free = c.free_blocks();

    let (rf, ra2) = (rows(10, 2), rows(70, 3));
    c.append(f, &rf).unwrap();
    c.append(a, &ra2).unwrap();
    assert_eq!(c.free_blocks(), free - 3, "no copy: 1 new block for f, 2 for a");
    assert_eq!(&c.block_ids(f).unwrap()[..2], &shared[..]);
    assert_eq!(&c.block_ids(a).unwrap()[..2], &shared[..]);
    assert_ne!(c.block_ids(f).unwrap()[2], c.block_ids(a).unwrap()[2]);
    assert!(read_seq(&c, a) == [ra.clone(), ra2].concat());
    assert!(read_seq(&c, f) == [ra.clone(), rf.clone()].concat());

    // A fork of a fork, then dropping the two older ones: the shared blocks survive.
    let g = c.fork(f).unwrap();
    c.free(a).unwrap();
    c.free(f).unwrap();
    assert_eq!(&c.block_ids(g).unwrap()[..2], &shared[..]);
    assert!(read_seq(&c, g) == [ra, rf].concat());
    assert_eq!(c.free_blocks(), 8 - 3);
    c.free(g).unwrap();
    assert_eq!(c.free_blocks(), 8);
}

#[test]
fn two_forks_of_a_partial_block_each_get_their_own_copy() {
    let mut c = cache(8, DType::BF16);
    let a = c.create_sequence();
    let ra = rows(10, 1);
    c.append(a, &ra).unwrap();
    let (f, g) = (c.fork(a).unwrap(), c.fork(a).unwrap());
    let (rf, rg, ra2) = (rows(3, 2), rows(4, 3), rows(5, 4));
    c.append(f, &rf).unwrap();
    c.append(g, &rg).unwrap();
    c.append(a, &ra2).unwrap(); // last sharer: in place
    assert_eq!(c.free_blocks(), 8 - 3);
    assert!(read_seq(&c, a) == [ra.clone(), ra2].concat());
    assert!(read_seq(&c, f) == [ra.clone(), rf].concat());
    assert!(read_seq(&c, g) == [ra, rg].concat());
}

#[test]
fn unknown_sequences_are_errors() {
    let mut c = cache(2, DType::BF16);
    let a = c.create_sequence();
    c.append(a, &rows(1, 1)).unwrap();
    c.free(a).unwrap();
    let live = c.create_sequence();
    assert_ne!(live, a, "ids are not reused");
    for s in [a, SeqId(999)] {
        let e = c.seq_len(s).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownSequence);
        assert!(e.message.contains(&s.0.to_string()), "{e}");
        assert_eq!(code(c.block_ids(s)), ErrorCode::UnknownSequence);
        assert_eq!(code(c.append(s, &rows(1, 1))), ErrorCode::UnknownSequence);
        assert_eq!(code(c.append_f32(s, &[0.0; D])), ErrorCode::UnknownSequence);
        assert_eq!(code(c.fork(s)), ErrorCode::UnknownSequence);
        assert_eq!(code(c.free(s)), ErrorCode::UnknownSequence);
        assert_eq!(code(c.batch(&[live, s], None)), ErrorCode::UnknownSequence);
    }
    assert_eq!(c.free_blocks(), 2);
    assert_eq!(c.sequences(), vec![live]);
}

#[test]
fn batch_builds_block_table_and_seqlens() {
    let mut c = cache(16, DType::BF16);
    let (a, b, e) = (c.create_sequence(), c.create_sequence(), c.create_sequence());
    c.append(a, &rows(65, 1)).unwrap(); // 2 blocks
    c.append(b, &rows(200, 2)).unwrap(); // 4 blocks
    let f = c.fork(a).unwrap();

    let (bt, sl) = c.batch(&[a, b, e, f], None).unwrap();
    assert_eq!((bt.shape(), bt.dtype()), (&[4usize, 4][..], DType::I32));
    assert_eq!((sl.shape(), sl.dtype()), (&[4usize][..], DType::I32));
    assert!(!bt.device().is_cuda() && !sl.device().is_cuda());
    assert_eq!(sl.to_i32().unwrap(), vec![65, 200, 0, 65]);
    let t = bt.to_i32().unwrap();
    let p = BLOCK_TABLE_PAD;
    let (ia, ib) = (c.block_ids(a).unwrap(), c.block_ids(b).unwrap());
    assert_eq!(&t[0..4], &[ia[0], ia[1], p, p]);
    assert_eq!(&t[4..8], &ib[..]);
    assert_eq!(&t[8..12], &[p, p, p, p]);
    assert_eq!(&t[12..16], &[ia[0], ia[1], p, p]);
    assert!(p as usize >= c.num_blocks());

    // A wider table, and the same sequence twice.
    let (bt, sl) = c.batch(&[b, b], Some(6)).unwrap();
    assert_eq!(bt.shape(), &[2, 6]);
    assert_eq!(sl.to_i32().unwrap(), vec![200, 200]);
    let t = bt.to_i32().unwrap();
    assert_eq!(&t[0..4], &ib[..]);
    assert_eq!(&t[4..6], &[p, p]);
    assert_eq!(&t[6..12], &t[0..6]);

    // Too narrow.
    let err = c.batch(&[a, b], Some(3)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert!(err.message.contains("max_blocks_per_seq") && err.message.contains('4') && err.message.contains('3'), "{err}");
    assert_eq!(c.batch(&[a, b], Some(4)).unwrap().0.shape(), &[2, 4]);
    // Only empty sequences, or none: still at least one column.
    assert_eq!(c.batch(&[e], None).unwrap().0.shape(), &[1, 1]);
    assert_eq!(c.batch(&[e], None).unwrap().0.to_i32().unwrap(), vec![p]);
    assert_eq!(code(c.batch(&[e], Some(0))), ErrorCode::InvalidArgument);
    let (bt, sl) = c.batch(&[], None).unwrap();
    assert_eq!((bt.shape(), sl.shape()), (&[0usize, 1][..], &[0usize][..]));
}

#[test]
fn append_f32_rounds_to_bf16() {
    let mut c = cache(1, DType::BF16);
    let s = c.create_sequence();
    let mut v = vec![0.0f32; D];
    // value -> bf16 bits (round to nearest even)
    let cases: [(f32, u16); 8] = [
        (1.0, 0x3F80),
        (-2.0, 0xC000),
        (0.1, 0x3DCD),               // 0x3DCCCCCD rounds up
        (1.0 / 3.0, 0x3EAB),         // 0x3EAAAAAB rounds up
        (1.0 + 1.0 / 256.0, 0x3F80), // 1 + 2^-8: a tie, to even (down)
        (1.0 + 3.0 / 256.0, 0x3F82), // 1 + 3 * 2^-8: a tie, to even (up)
        (1e30, 0x714A),              // 0x7149F2CA rounds up
        (-0.0, 0x8000),
    ];
    for (i, &(x, _)) in cases.iter().enumerate() {
        v[i] = x;
    }
    v[D - 1] = 3.0;
    c.append_f32(s, &v).unwrap();
    let got = read_seq(&c, s);
    for (i, &(x, bits)) in cases.iter().enumerate() {
        assert_eq!(got[i], bits, "bf16({x}) = {:#06x}, got {:#06x}", bits, got[i]);
    }
    assert_eq!(got[D - 1], 0x4040);
    assert!(got[cases.len()..D - 1].iter().all(|&b| b == 0));
    let f = c.tensor().to_f32().unwrap();
    assert_eq!(&f[..4], &[1.0, -2.0, f32::from_bits(0x3DCD_0000), f32::from_bits(0x3EAB_0000)]);
}

#[test]
fn append_f32_rounds_to_fp16() {
    let mut c = cache(1, DType::F16);
    let s = c.create_sequence();
    let mut v = vec![0.0f32; 2 * D];
    let cases: [(f32, u16); 8] = [
        (1.0, 0x3C00),
        (-2.0, 0xC000),
        (0.1, 0x2E66),
        (1.0 / 3.0, 0x3555),
        (65504.0, 0x7BFF),
        (1e6, 0x7C00),                   // overflows to +inf
        (1.0 / 65536.0 / 256.0, 0x0001), // 2^-24: the smallest subnormal
        (1.0 + 1.0 / 2048.0, 0x3C00),    // 1 + 2^-11: a tie, to even (down)
    ];
    for (i, &(x, _)) in cases.iter().enumerate() {
        v[D + i] = x; // second row
    }
    c.append_f32(s, &v).unwrap();
    assert_eq!(c.seq_len(s).unwrap(), 2);
    let got = read_seq(&c, s);
    assert!(got[..D].iter().all(|&b| b == 0));
    for (i, &(x, bits)) in cases.iter().enumerate() {
        assert_eq!(got[D + i], bits, "fp16({x}) = {:#06x}, got {:#06x}", bits, got[D + i]);
    }
    let f = c.tensor().to_f32().unwrap();
    assert_eq!(&f[D..D + 2], &[1.0, -2.0]);
    assert_eq!(f[D + 5], f32::INFINITY);
}

#[test]
fn append_and_append_f32_agree() {
    let mut c = cache(4, DType::BF16);
    let (a, b) = (c.create_sequence(), c.create_sequence());
    let v = Rng(7).vec(70 * D);
    c.append_f32(a, &v).unwrap();
    let bits = read_seq(&c, a);
    c.append(b, &bits).unwrap();
    assert!(read_seq(&c, b) == bits);
    let back: Vec<f32> = {
        let pool = c.tensor().to_f32().unwrap();
        let ids = c.block_ids(a).unwrap();
        (0..70)
            .flat_map(|t| {
                let s = (ids[t / BLOCK_SIZE] as usize * BLOCK_SIZE + t % BLOCK_SIZE) * D;
                pool[s..s + D].to_vec()
            })
            .collect()
    };
    let max_err = v.iter().zip(&back).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(max_err <= 1.0 / 256.0, "bf16 rounding error {max_err}");
}

/// Builds a cache, batches forked and unforked sequences, and decodes them on the CPU.
#[test]
fn end_to_end_decode_on_cpu() {
    let dev = Device::Cpu;
    let mut c = KvCache::new(&dev, KvCacheConfig { num_blocks: 16, dtype: DType::BF16 }).unwrap();
    let mut rng = Rng(0x5eed);
    let mut seqs = Vec::new();
    for len in [1usize, 65, 200] {
        let s = c.create_sequence();
        c.append_f32(s, &rng.vec(len * D)).unwrap();
        seqs.push(s);
    }
    let f = c.fork(seqs[1]).unwrap();
    c.append_f32(f, &rng.vec(3 * D)).unwrap(); // copy-on-write of the shared partial block
    seqs.push(f);

    let (block_table, seqlens) = c.batch(&seqs, None).unwrap();
    assert_eq!(seqlens.to_i32().unwrap(), vec![1, 65, 200, 68]);
    let (b, s_q, h_q) = (seqs.len(), 1, 16);
    let q = Tensor::from_f32(&dev, &rng.vec(b * s_q * h_q * D), &[b, s_q, h_q, D], DType::BF16).unwrap();
    let p = plan(&seqlens, s_q * h_q, 1).unwrap();
    let r = decode(&q, c.tensor(), &block_table, &seqlens, &p, &DecodeOptions::default()).unwrap();
    dev.synchronize().unwrap();
    let out = r.out.to_f32().unwrap();
    let lse = r.lse.to_f32().unwrap();
    assert_eq!(out.len(), b * s_q * h_q * 512);
    assert!(out.iter().all(|x| x.is_finite()), "out has NaN/Inf");
    assert!(lse.iter().all(|x| x.is_finite()), "lse has NaN/Inf");
    // Against a float64 reference over each sequence's rows as the cache holds them: this
    // checks that block_table / cache_seqlens point decode at the right rows (the fork's
    // copied-on-write block included).
    let qf = q.to_f32().unwrap();
    let scale = 1.0 / (D as f64).sqrt();
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for (i, &s) in seqs.iter().enumerate() {
        let kv: Vec<f64> = read_seq(&c, s).iter().map(|&b| f32::from_bits((b as u32) << 16) as f64).collect();
        let len = kv.len() / D;
        for h in 0..h_q {
            let qrow = &qf[(i * h_q + h) * D..(i * h_q + h + 1) * D];
            let logits: Vec<f64> = (0..len).map(|t| scale * qrow.iter().zip(&kv[t * D..(t + 1) * D]).map(|(&a, &b)| a as f64 * b).sum::<f64>()).collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            let want_lse = m + sum.ln();
            let got_lse = lse[i * h_q + h] as f64;
            assert!((got_lse - want_lse).abs() <= 1e-5 * want_lse.abs().max(1.0), "lse[{i}][{h}] = {got_lse}, want {want_lse}");
            for v in 0..512 {
                let want: f64 = (0..len).map(|t| (logits[t] - m).exp() / sum * kv[t * D + v]).sum();
                let got = out[(i * h_q + h) * 512 + v] as f64;
                err += (got - want).powi(2);
                norm += want * want;
            }
        }
    }
    let rel = (err / norm).sqrt();
    assert!(rel <= 5e-3, "||out - ref|| / ||ref|| = {rel}");
}
