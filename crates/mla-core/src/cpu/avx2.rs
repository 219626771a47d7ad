//! AVX2 + FMA register-tiled products for x86-64, used when the CPU has both features.

// Register tiles are indexed by row and key / column on purpose.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::kernel::{run_segment, Arith, Scratch, SegmentInput};
use crate::consts::{BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V};

const D: usize = HEAD_DIM;
const DV: usize = HEAD_DIM_V;
const BS: usize = BLOCK_SIZE;
/// Query rows per register tile (both products).
const MR: usize = 4;
/// Keys per register tile of q·k^T.
const NR: usize = 2;

/// Proof that the CPU runs AVX2 and FMA: only [`Avx2::new`] makes one, after checking.
#[derive(Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn new() -> Option<Avx2> {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some(Avx2(()))
        } else {
            None
        }
    }
}

impl Arith for Avx2 {
    #[inline(always)]
    fn qk(&self, q: &[f32], k: &[f32], s: &mut [f32], rows: usize, n: usize) {
        assert!(n <= BS && q.len() >= rows * D && k.len() >= n * D && s.len() >= rows * BS);
        // SAFETY: the token proves AVX2 + FMA; the assert bounds every access below.
        unsafe { qk(q.as_ptr(), k.as_ptr(), s, rows, n) }
    }
    #[inline(always)]
    fn pv(&self, p: &[f32], v: &[f32], acc: &mut [f32], corr: &[f32], rows: usize, n: usize) {
        assert!(n <= BS && p.len() >= rows * BS && v.len() >= n.saturating_sub(1) * D + DV && acc.len() >= rows * DV && corr.len() >= rows);
        // SAFETY: as above.
        unsafe { pv(p.as_ptr(), v.as_ptr(), acc.as_mut_ptr(), corr, rows, n) }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// s[r0 + i, t0 + j] = q[r0 + i] · k[t0 + j] for i < R, j < N.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn qk_tile<const R: usize, const N: usize>(q: *const f32, k: *const f32, s: &mut [f32], r0: usize, t0: usize) {
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let qp = q.add(r0 * D);
    let kp = k.add(t0 * D);
    let mut c = 0;
    while c < D {
        let mut kv = [_mm256_setzero_ps(); N];
        for j in 0..N {
            kv[j] = _mm256_loadu_ps(kp.add(j * D + c));
        }
        for i in 0..R {
            let qv = _mm256_loadu_ps(qp.add(i * D + c));
            for j in 0..N {
                acc[i][j] = _mm256_fmadd_ps(qv, kv[j], acc[i][j]);
            }
        }
        c += 8;
    }
    for i in 0..R {
        for j in 0..N {
            s[(r0 + i) * BS + t0 + j] = hsum(acc[i][j]);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn qk_rows<const R: usize>(q: *const f32, k: *const f32, s: &mut [f32], r0: usize, n: usize) {
    let mut t = 0;
    while t + NR <= n {
        qk_tile::<R, NR>(q, k, s, r0, t);
        t += NR;
    }
    while t < n {
        qk_tile::<R, 1>(q, k, s, r0, t);
        t += 1;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn qk(q: *const f32, k: *const f32, s: &mut [f32], rows: usize, n: usize) {
    let mut r = 0;
    while r + MR <= rows {
        qk_rows::<MR>(q, k, s, r, n);
        r += MR;
    }
    match rows - r {
        1 => qk_rows::<1>(q, k, s, r, n),
        2 => qk_rows::<2>(q, k, s, r, n),
        3 => qk_rows::<3>(q, k, s, r, n),
        _ => {}
    }
}

/// acc[r0 + i, c0 .. c0 + 16] = acc * corr + sum_t p[r0 + i, t] v[t, c0 .. c0 + 16].
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pv_tile<const R: usize>(p: *const f32, v: *const f32, acc: *mut f32, corr: &[f32], r0: usize, c0: usize, n: usize) {
    let mut a = [[_mm256_setzero_ps(); 2]; R];
    for i in 0..R {
        let c = _mm256_set1_ps(corr[r0 + i]);
        let src = acc.add((r0 + i) * DV + c0);
        a[i][0] = _mm256_mul_ps(_mm256_loadu_ps(src), c);
        a[i][1] = _mm256_mul_ps(_mm256_loadu_ps(src.add(8)), c);
    }
    let pp = p.add(r0 * BS);
    for t in 0..n {
        let v0 = _mm256_loadu_ps(v.add(t * D + c0));
        let v1 = _mm256_loadu_ps(v.add(t * D + c0 + 8));
        for i in 0..R {
            let pi = _mm256_broadcast_ss(&*pp.add(i * BS + t));
            a[i][0] = _mm256_fmadd_ps(pi, v0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(pi, v1, a[i][1]);
        }
    }
    for i in 0..R {
        let dst = acc.add((r0 + i) * DV + c0);
        _mm256_storeu_ps(dst, a[i][0]);
        _mm256_storeu_ps(dst.add(8), a[i][1]);
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn pv(p: *const f32, v: *const f32, acc: *mut f32, corr: &[f32], rows: usize, n: usize) {
    // Column chunks outside, row tiles inside: the n x 16 slice of V stays in L1.
    let mut c0 = 0;
    while c0 < DV {
        let mut r = 0;
        while r + MR <= rows {
            pv_tile::<MR>(p, v, acc, corr, r, c0, n);
            r += MR;
        }
        match rows - r {
            1 => pv_tile::<1>(p, v, acc, corr, r, c0, n),
            2 => pv_tile::<2>(p, v, acc, corr, r, c0, n),
            3 => pv_tile::<3>(p, v, acc, corr, r, c0, n),
            _ => {}
        }
        c0 += 16;
    }
}

/// The AVX2 + FMA build: the whole segment compiled with those features, the products
/// written with intrinsics.
pub(crate) fn run_segment_avx2(token: Avx2, inp: &SegmentInput, sc: &mut Scratch) {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn inner(token: Avx2, inp: &SegmentInput, sc: &mut Scratch) {
        run_segment(&token, inp, sc)
    }
    // SAFETY: an `Avx2` token exists only when the CPU reports AVX2 and FMA.
    unsafe { inner(token, inp, sc) }
}
