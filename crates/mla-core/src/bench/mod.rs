//! The contract's benchmark ("Measuring" in the spec), usable from Rust and the binding.
//!
//! - configurations: FlashMLA's grid ([`grid_configs`]), the beyond-grid shapes
//!   ([`beyond_configs`]), a reduced grid for the CPU backend ([`cpu_configs`]) and a tiny
//!   set for tests ([`tiny_configs`]); [`suite_configs`] picks one by name;
//! - [`run_config`]: random inputs (never zeros; generated on the device on CUDA), block
//!   tables mapping each sequence to its own blocks, one plan, warm-up, then the median of
//!   `reps` timed `decode_into` runs (CUDA events on CUDA, `Instant` on the CPU);
//! - [`copy_ceiling_gbps`]: the copy ceiling of the same device, measured in the same run;
//! - [`load_anchors`]: FlashMLA's times from the anchor CSVs (`bench/anchors/`);
//! - [`run_config_multi`]: one configuration on several CUDA devices at once, per device
//!   and in total, with the scaling against the first device alone.
//!
//! GB/s = (sum(seqlens) * d + b*s_q*h_q*d + b*s_q*h_q*dv) * 2 bytes / time, and
//! TFLOPS = 2 * s_q * sum(seqlens) * h_q * (d + dv) / time ([`decode_bytes`], [`decode_flops`],
//! [`gbps`], [`tflops`], [`floor_ms`]: one home, [`metrics`], exported by the binding).
//!
//! By concern: [`suites`] (configurations and lengths), `rng`, [`inputs`], [`metrics`]
//! (formulas, the floor, [`Measurement`]), [`stats`], [`timing`] (runs and copy ceilings),
//! [`anchors`] (the CSV parser), [`multi`] (one configuration on several GPUs at once:
//! [`run_config_multi`]). Everything is re-exported here.

pub mod anchors;
pub mod inputs;
pub mod metrics;
pub mod multi;
pub(crate) mod rng;
pub mod stats;
pub mod suites;
pub mod timing;

pub use anchors::*;
pub use inputs::*;
pub use metrics::*;
pub use multi::*;
pub use stats::*;
pub use suites::*;
pub use timing::*;

#[cfg(test)]
mod tests {
    use super::rng::Rng;
    use super::*;
    use crate::consts::BLOCK_TABLE_PAD;
    use crate::device::Device;
    use crate::dtype::DType;
    use crate::plan::PlanOptions;

    const GRID: &str = "# comment\n# more\npeer,b,s_q,mean_sk,h_q,varlen,ms,tflops,gbps\n\
        flashmla,128,1,4096,16,0,0.2532,72,2403\ntriton,128,1,4096,16,0,0.5284,35,1151\n\
        flashmla,128,2,16384,128,1,2.7602,425,906\r\n";
    const BEYOND: &str = "# beyond\ntag,peer,b,s_q,mean_sk,h_q,ms,tflops,gbps\n\
        short,flashmla,128,1,1024,16,0.0790,58,1968\nimbalanced,flashmla,4,4,0,16,0.1003,74,617\n\
        mtp,flashmla,128,8,4096,128,2.6480,441,336\n";

    #[test]
    fn anchors_parse_both_formats() {
        let a = load_anchors(GRID);
        assert_eq!(a.len(), 2, "{a:?}");
        assert_eq!(a["grid/1/4096/16/0"], 0.2532);
        assert_eq!(a["grid/2/16384/128/1"], 2.7602);
        let b = load_anchors(BEYOND);
        assert_eq!(b.len(), 3, "{b:?}");
        assert_eq!(b["short/1/1024/16/0"], 0.079);
        assert_eq!(b["imbalanced/4/0/16/0"], 0.1003);
        assert_eq!(b["mtp/8/4096/128/0"], 2.648);
        assert!(load_anchors("").is_empty());
        assert!(load_anchors("# only a comment\n").is_empty());
    }

    #[test]
    fn anchors_match_flashmla_shapes_only() {
        let mut a = load_anchors(GRID);
        a.extend(load_anchors(BEYOND));
        let g = BenchConfig::new("grid", 128, 1, 4096, 16, false);
        assert_eq!(anchor_ms(&a, &g), Some(0.2532));
        // The same label at another batch size is not FlashMLA's shape.
        assert_eq!(anchor_ms(&a, &BenchConfig { b: 8, ..g.clone() }), None);
        let imb = beyond_configs().into_iter().find(|c| c.tag == "imbalanced" && c.s_q == 4).unwrap();
        assert_eq!(imb.label(), "imbalanced/4/0/16/0");
        assert_eq!(anchor_ms(&a, &imb), Some(0.1003));
        // Every configuration of the real anchor files has a key our configurations produce.
        for c in grid_configs(&GRID_MEANS).iter().chain(beyond_configs().iter()) {
            assert!(c.is_flashmla_shape());
        }
    }

    /// An anchor file of the repository (bench/anchors/); a missing one fails the test.
    fn anchor_file(name: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/anchors/").to_string() + name;
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (the anchors live in the repository's bench/anchors/)"))
    }

    #[test]
    fn real_anchor_files_cover_the_suite() {
        // The H200 file (one file, grid and beyond) and the older H100 pair: each has every
        // configuration of the flashmla suite, and nothing else.
        let h200 = load_anchors(&anchor_file("flashmla-h200.csv"));
        let mut h100 = load_anchors(&anchor_file("flashmla-h100.csv"));
        h100.extend(load_anchors(&anchor_file("flashmla-h100-beyond.csv")));
        for a in [&h200, &h100] {
            for c in suite_configs("flashmla", false).unwrap() {
                assert!(anchor_ms(a, &c).is_some(), "no anchor for {}", c.label());
            }
            assert_eq!(a.len(), 48 + 8);
        }
        assert_eq!(h200["grid/1/4096/16/0"], 0.1788);
    }

    #[test]
    fn formulas_match_the_anchors_rates() {
        // grid/1/4096/16/0: FlashMLA's 0.2532 ms is 2403 GB/s and 72 TFLOPS in its file.
        let lens = vec![4096; 128];
        let bytes = decode_bytes(&lens, 1, 16);
        assert_eq!(bytes, ((128 * 4096 * 576 + 128 * 16 * 576 + 128 * 16 * 512) * 2) as f64);
        assert_eq!(bytes, 608_436_224.0);
        let flops = decode_flops(&lens, 1, 16);
        assert_eq!(flops, 18_253_611_008.0);
        let m = Measurement::from_times(&lens, 1, 16, &[0.3, 0.2532, 0.25]);
        assert_eq!(m.ms, 0.2532);
        assert_eq!((m.min_ms, m.max_ms, m.reps, m.b, m.total_seqlen), (0.25, 0.3, 3, 128, 524_288));
        assert_eq!(m.gbps.round(), 2403.0);
        assert_eq!(m.tflops.round(), 72.0);
        // mtp/8/4096/128/0: 2.6480 ms -> 441 TFLOPS, 336 GB/s.
        let lens = vec![4096; 128];
        let m = Measurement::from_times(&lens, 8, 128, &[2.648]);
        assert_eq!(m.tflops.round(), 441.0);
        assert_eq!(m.gbps.round(), 336.0);
    }

    #[test]
    fn suites_and_labels() {
        let full = suite_configs("flashmla", false).unwrap();
        assert_eq!(full.len(), 48 + 8);
        assert_eq!(full[0].label(), "grid/1/4096/16/0");
        assert_eq!(full[1].label(), "grid/1/4096/16/1");
        assert_eq!(suite_configs("flashmla", true).unwrap().len(), 16 + 8);
        assert_eq!(cpu_configs(false).len(), 16 + 2 + 4);
        assert!(cpu_configs(false).iter().all(|c| c.b <= 8));
        assert!(suite_configs("nope", false).is_err());
        for c in tiny_configs().iter().chain(cpu_configs(false).iter()).chain(full.iter()) {
            c.validate().unwrap();
        }
        assert!(BenchConfig { lens: Some(vec![1]), ..BenchConfig::new("x", 2, 1, 0, 16, false) }.validate().is_err());
    }

    #[test]
    fn seqlens_are_deterministic_and_in_range() {
        let grid = grid_configs(&GRID_MEANS);
        // The draws of the old gpu_bench example: one stream over the varlen grid configs.
        let mut rng = Rng::new(DEFAULT_SEED);
        for c in grid.iter().filter(|c| c.varlen) {
            let want: Vec<i32> = (0..c.b).map(|_| ((c.mean as f64 + rng.normal() * c.mean as f64 / 2.0).round() as i64).max(c.s_q as i64) as i32).collect();
            assert_eq!(seqlens_for(c, DEFAULT_SEED), want, "{}", c.label());
        }
        for c in grid.iter().chain(cpu_configs(false).iter()).chain(tiny_configs().iter()) {
            let l = seqlens_for(c, 7);
            assert_eq!(l, seqlens_for(c, 7));
            assert_eq!(l.len(), c.b);
            if c.varlen {
                assert!(l.iter().all(|&x| x >= c.s_q as i32));
                assert!(l.iter().any(|&x| x != c.mean as i32));
            } else if c.lens.is_none() {
                assert!(l.iter().all(|&x| x == c.mean as i32));
            }
        }
    }

    #[test]
    fn table_maps_each_sequence_to_its_own_blocks() {
        let (t, max_nb, total) = own_blocks_table(&[64, 65, 0, 1]);
        assert_eq!((max_nb, total), (2, 4));
        assert_eq!(&t[..2], &[0, BLOCK_TABLE_PAD]);
        assert_eq!(&t[2..4], &[1, 2]);
        assert_eq!(&t[4..6], &[BLOCK_TABLE_PAD, BLOCK_TABLE_PAD]);
        assert_eq!(&t[6..8], &[3, BLOCK_TABLE_PAD]);
    }

    #[test]
    fn cpu_random_inputs_are_not_zeros() {
        let t = random_tensor(&Device::Cpu, &[3, 1000], DType::BF16, 1, 0.1, 1.0).unwrap();
        let v = t.to_f32().unwrap();
        let nonzero = v.iter().filter(|&&x| x != 0.0).count();
        assert!(nonzero > 2900, "{nonzero}");
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01 && (var.sqrt() - 0.1).abs() < 0.01, "mean {mean} std {}", var.sqrt());
        assert!(v.iter().all(|x| x.abs() <= 1.0));
    }

    #[test]
    fn run_config_on_the_cpu() {
        for c in tiny_configs() {
            let m = run_config(&Device::Cpu, &c, DType::BF16, 3, DEFAULT_SEED).unwrap();
            assert_eq!(m.reps, 3);
            assert!(m.ms > 0.0 && m.gbps > 0.0 && m.tflops > 0.0, "{m:?}");
            assert!(m.min_ms <= m.ms && m.ms <= m.max_ms);
            let lens = seqlens_for(&c, DEFAULT_SEED);
            assert_eq!(m.bytes, decode_bytes(&lens, c.s_q, c.h_q));
        }
        assert!(run_config(&Device::Cpu, &tiny_configs()[0], DType::BF16, 0, 1).is_err());
        assert!(run_config(&Device::Cpu, &tiny_configs()[0], DType::F32, 1, 1).is_err());
    }

    #[test]
    fn invariant_and_default_plans_on_the_same_inputs() {
        let c = &tiny_configs()[1];
        let ms = run_config_plans(&Device::Cpu, c, DType::BF16, 2, DEFAULT_SEED, &[PlanOptions::invariant(), PlanOptions::default()]).unwrap();
        assert_eq!(ms.len(), 2);
        for m in &ms {
            assert_eq!(m.reps, 2);
            assert!(m.ms > 0.0 && m.bytes == ms[0].bytes, "{m:?}");
        }
    }

    #[test]
    fn host_kernel_time_on_the_cpu() {
        let cfgs = host_configs(&Device::Cpu, true);
        assert!(!cfgs.is_empty() && cfgs.iter().all(|c| c.s_q == 1 && c.layers >= 1));
        assert_eq!(host_configs(&Device::Cpu, false).len(), 6);
        let us = host_kernel_us(&Device::Cpu, &cfgs[0], 2).unwrap();
        assert!(us.is_finite() && us > 0.0, "{us}");
        assert!(host_kernel_us(&Device::Cpu, &HostConfig { layers: 0, ..cfgs[0].clone() }, 2).is_err());
    }

    #[test]
    fn cpu_copy_ceiling_is_positive() {
        let g = cpu_copy_ceiling_gbps(8 << 20, 2);
        assert!(g.is_finite() && g > 0.0, "{g}");
    }
}
