//! The plan kernel's walks and its invariant cap search (`mla_plan.cu`, which is
//! `__host__ __device__` code), compiled for the host with the system C++ compiler and
//! run against `host_plan` / `host_plan_invariant` on random lengths: the device half of
//! "the plan kernel computes exactly the host plan", checked without a GPU (the GPU test
//! `plan_kernel_equals_host_plan*` checks the kernel itself). The driver composes the
//! kernel's pieces the way the kernel does (256 candidates per round).
//!
//! Without a C++ compiler (`$CXX`, else `c++`) the test prints SKIPPED and returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::Rng;
use mla_core::plan::{host_plan, host_plan_invariant, split_fixed_cost, InvariantChunks, META_INTS};

const DRIVER: &str = r#"
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(a, b)
#define MLA_PLAN_HOST_CHECK
#include <cstdio>
#include <vector>
#include "mla_plan.cu"

// Per case on stdin: chunk_blocks (0: default plan) max_chunks b parts fixed, then b
// lengths. Prints metadata then num_splits on one line.
int main() {
    int cb, kmax, b, parts, fixed;
    while (scanf("%d %d %d %d %d", &cb, &kmax, &b, &parts, &fixed) == 5) {
        std::vector<int> len(b), meta(parts * MLA_META_INTS, -7), splits(b + 1, -7);
        for (int i = 0; i < b; ++i) scanf("%d", &len[i]);
        const int max_seqlen = 2147483647;
        const auto nb_at = [&](int s) -> long long { return blocks_of(len[s], max_seqlen, 64); };
        long long total = 0, max_cost = 0;
        for (int i = 0; i < b; ++i) {
            const long long nb = nb_at(i);
            if (nb == 0) continue;
            if (cb == 0) {
                total += nb + fixed;
            } else {
                const long long n = mla_chunks_of((int)nb, cb, kmax);
                total += nb + n * fixed;
                const long long c = (nb + n - 1) / n + fixed;
                if (c > max_cost) max_cost = c;
            }
        }
        if (cb == 0) {
            const int end = mla_plan_walk(nb_at, b, parts, total, fixed, meta.data(), splits.data());
            for (int i = end + 1; i <= b; ++i) splits[i] = 0;
        } else {
            long long lo, hi;
            mla_cap_range(total, max_cost, parts, lo, hi);
            while (lo < hi) {
                int fails = 0;
                for (int t = 0; t < 256; ++t)
                    fails += !mla_invariant_walk(nb_at, b, parts, mla_cap_candidate(lo, hi, t, 256), fixed, cb, kmax, nullptr);
                mla_cap_narrow(lo, hi, fails, 256);
            }
            mla_invariant_walk(nb_at, b, parts, lo, fixed, cb, kmax, meta.data());
            splits[0] = 0;
            for (int i = 0; i < b; ++i) splits[i + 1] = splits[i] + mla_chunks_of((int)nb_at(i), cb, kmax);
        }
        for (int v : meta) printf("%d ", v);
        for (int v : splits) printf("%d ", v);
        printf("\n");
    }
    return 0;
}
"#;

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// Builds the driver in a scratch folder: mla_plan.cu and mla_params.cuh copied there,
/// every other header mla_params.cuh includes replaced by a stub holding mla::TmaMap.
fn build_driver(cxx: &str) -> PathBuf {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let dir = std::env::temp_dir().join(format!("mla-plan-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["mla_plan.cu", "mla_params.cuh"] {
        let src = find(&kernels, name).unwrap_or_else(|| panic!("{name} not found under {}", kernels.display()));
        std::fs::copy(&src, dir.join(name)).unwrap();
    }
    let params = std::fs::read_to_string(dir.join("mla_params.cuh")).unwrap();
    for line in params.lines() {
        if let Some(inc) = line.trim().strip_prefix("#include \"").and_then(|r| r.strip_suffix('"')) {
            let stub = "#pragma once\n#include <stdint.h>\nnamespace mla { struct alignas(64) TmaMap { uint64_t opaque[16]; }; }\n";
            let path = dir.join(inc);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, stub).unwrap();
        }
    }
    std::fs::write(dir.join("driver.cpp"), DRIVER).unwrap();
    let exe = dir.join("driver");
    let out = Command::new(cxx).args(["-std=c++17", "-O1", "-Wall", "-o"]).arg(&exe).arg(dir.join("driver.cpp")).output().unwrap();
    assert!(out.status.success(), "{cxx} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

#[test]
fn plan_kernel_code_equals_host_plans() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        println!("SKIPPED plan_kernel_code_equals_host_plans (no C++ compiler: {cxx})");
        return;
    }
    let exe = build_driver(&cxx);
    let mut rng = Rng::new("plan_kernel_code_equals_host_plans");
    let fixed = split_fixed_cost();
    let mut input = String::new();
    let mut cases = Vec::new();
    for k in 0..600 {
        let b = [1, 2, 7, 40, 128, 300][rng.below(6)];
        let max = [1, 64, 3000, 20000, 300_000][rng.below(5)];
        let lens: Vec<i32> = (0..b).map(|_| if rng.below(6) == 0 { 0 } else { rng.below(max + 1) as i32 }).collect();
        let parts = [1, 2, 3, 16, 33, 66, 132][rng.below(7)];
        let chunks = match k % 3 {
            0 => None,
            1 => Some(InvariantChunks::standard()),
            _ => Some(InvariantChunks { chunk_blocks: 1 + rng.below(40), max_chunks: 1 + rng.below(20) }),
        };
        let (cb, km) = chunks.map_or((0, 0), |c| (c.chunk_blocks, c.max_chunks));
        input.push_str(&format!("{cb} {km} {b} {parts} {fixed}\n"));
        input.push_str(&lens.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(" "));
        input.push('\n');
        cases.push((lens, parts, chunks));
    }
    // Through a file: a pipe both ways would block once both buffers fill.
    let cases_file = exe.with_file_name("cases.txt");
    std::fs::write(&cases_file, &input).unwrap();
    let out = Command::new(&exe).stdin(std::fs::File::open(&cases_file).unwrap()).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), cases.len(), "one line per case");
    for ((lens, parts, chunks), line) in cases.iter().zip(lines) {
        let got: Vec<i32> = line.split_whitespace().map(|v| v.parse().unwrap()).collect();
        let (meta, splits) = match chunks {
            None => host_plan(lens, *parts),
            Some(c) => host_plan_invariant(lens, *parts, *c),
        };
        let n = parts * META_INTS;
        assert_eq!(&got[..n], &meta[..], "metadata: {chunks:?} parts {parts} lens {lens:?}");
        assert_eq!(&got[n..], &splits[..], "num_splits: {chunks:?} parts {parts} lens {lens:?}");
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}
