//! The contract's formulas, in one place for Rust and (through the binding) TypeScript:
//! the bytes and FLOPs of a decode step, the rates, the floor; and a configuration's
//! [`Measurement`].
//!
//! GB/s = (sum(seqlens) * d + b*s_q*h_q*d + b*s_q*h_q*dv) * 2 bytes / time, and
//! TFLOPS = 2 * s_q * sum(seqlens) * h_q * (d + dv) / time.

use crate::bench::stats::median;
use crate::consts::{HEAD_DIM, HEAD_DIM_V};

/// Bytes one decode step moves (the contract's GB/s numerator):
/// (sum(seqlens) * 576 + b*s_q*h_q*576 + b*s_q*h_q*512) * 2.
pub fn decode_bytes(seqlens: &[i32], s_q: usize, h_q: usize) -> f64 {
    let total: f64 = seqlens.iter().map(|&l| l as f64).sum();
    let rows = (seqlens.len() * s_q * h_q) as f64;
    (total * HEAD_DIM as f64 + rows * HEAD_DIM as f64 + rows * HEAD_DIM_V as f64) * 2.0
}

/// Floating-point operations of one decode step (the contract's TFLOPS numerator):
/// 2 * s_q * sum(seqlens) * h_q * (576 + 512).
pub fn decode_flops(seqlens: &[i32], s_q: usize, h_q: usize) -> f64 {
    let total: f64 = seqlens.iter().map(|&l| l as f64).sum();
    2.0 * s_q as f64 * total * h_q as f64 * (HEAD_DIM + HEAD_DIM_V) as f64
}

/// `bytes` moved in `ms` milliseconds, in 1e9 bytes per second.
pub fn gbps(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

/// `flops` done in `ms` milliseconds, in 1e12 per second.
pub fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
}

/// The floor of a step, milliseconds: its bytes at the copy ceiling (`copy_gbps`) or its
/// FLOPs at a matmul ceiling (`matmul_tflops`, when given and finite), the larger.
pub fn floor_ms(bytes: f64, flops: f64, copy_gbps: f64, matmul_tflops: Option<f64>) -> f64 {
    let by_flops = match matmul_tflops {
        Some(t) if t.is_finite() => flops / (t * 1e12),
        _ => 0.0,
    };
    (bytes / (copy_gbps * 1e9)).max(by_flops) * 1e3
}

/// The result of [`run_config`].
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Median time of one decode step, milliseconds.
    pub ms: f64,
    /// Fastest and slowest timed run, milliseconds.
    pub min_ms: f64,
    pub max_ms: f64,
    /// Timed runs.
    pub reps: usize,
    /// Batch size and sum of the lengths actually measured.
    pub b: usize,
    pub total_seqlen: u64,
    /// [`decode_bytes`] and [`decode_flops`] of the configuration.
    pub bytes: f64,
    pub flops: f64,
    /// bytes / median time, in 1e9 bytes per second.
    pub gbps: f64,
    /// flops / median time, in 1e12 per second.
    pub tflops: f64,
}

impl Measurement {
    /// Builds the rates from the lengths and the sorted-or-not run times.
    pub fn from_times(seqlens: &[i32], s_q: usize, h_q: usize, times_ms: &[f64]) -> Measurement {
        let ms = median(times_ms);
        let bytes = decode_bytes(seqlens, s_q, h_q);
        let flops = decode_flops(seqlens, s_q, h_q);
        Measurement {
            ms,
            min_ms: times_ms.iter().copied().fold(f64::INFINITY, f64::min),
            max_ms: times_ms.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            reps: times_ms.len(),
            b: seqlens.len(),
            total_seqlen: seqlens.iter().map(|&l| l.max(0) as u64).sum(),
            bytes,
            flops,
            gbps: gbps(bytes, ms),
            tflops: tflops(flops, ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_floor() {
        assert_eq!(gbps(2e9, 1000.0), 2.0);
        assert_eq!(tflops(3e12, 1000.0), 3.0);
        // 1 GB at 1000 GB/s: 1 ms; 2 TFLOP at 1000 TFLOPS: 2 ms, the larger.
        assert_eq!(floor_ms(1e9, 2e12, 1000.0, None), 1.0);
        assert_eq!(floor_ms(1e9, 2e12, 1000.0, Some(1000.0)), 2.0);
        assert_eq!(floor_ms(1e9, 2e12, 1000.0, Some(f64::INFINITY)), 1.0);
    }
}
