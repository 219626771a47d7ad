//! FlashMLA's times from the anchor CSVs (`bench/anchors/`).

use std::collections::HashMap;

use crate::bench::suites::BenchConfig;

/// FlashMLA's times (ms) from an anchors CSV, keyed by [`BenchConfig::label`]. Reads both
/// formats of `bench/anchors/`: the grid file (`peer,b,s_q,mean_sk,h_q,varlen,ms,...`,
/// tag "grid") and the beyond file (`tag,peer,b,s_q,mean_sk,h_q,ms,...`, varlen 0,
/// mean_sk 0 for the imbalanced batch). Only `peer == flashmla` rows (when there is a peer
/// column); `#` lines and blank lines are skipped.
pub fn load_anchors(csv_text: &str) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    let mut header: Vec<String> = Vec::new();
    for line in csv_text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if header.is_empty() {
            header = f.iter().map(|s| s.to_string()).collect();
            continue;
        }
        let col = |k: &str| header.iter().position(|h| h == k);
        let get = |k: &str, default: &'static str| col(k).and_then(|i| f.get(i).copied()).unwrap_or(default);
        if col("peer").is_some() && get("peer", "") != "flashmla" {
            continue;
        }
        let Ok(ms) = get("ms", "").parse::<f64>() else { continue };
        let key = format!("{}/{}/{}/{}/{}", get("tag", "grid"), get("s_q", ""), get("mean_sk", ""), get("h_q", ""), get("varlen", "0"));
        m.insert(key, ms);
    }
    m
}

/// The anchor time of `cfg`, when it is one of FlashMLA's shapes and the anchors have it.
pub fn anchor_ms(anchors: &HashMap<String, f64>, cfg: &BenchConfig) -> Option<f64> {
    if !cfg.is_flashmla_shape() {
        return None;
    }
    anchors.get(&cfg.label()).copied()
}
