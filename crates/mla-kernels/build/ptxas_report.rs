//! ptxas's reports: resources per entry function (registers, shared memory, spills), wgmma serialisation, and the checks the build enforces on them.

use super::*;

#[derive(Default)]
pub struct FnStats {
    pub entry: bool,
    pub regs: Option<u64>,
    pub smem: u64,
    pub stack: u64,
    pub spill_st: u64,
    pub spill_ld: u64,
}

impl FnStats {
    pub fn spills(&self) -> bool {
        self.spill_st > 0 || self.spill_ld > 0
    }
    pub fn line(&self, name: &str) -> String {
        let mut s = format!(
            "{name}: {} registers, {} B smem, {} B stack, spill stores {} B, spill loads {} B",
            self.regs.map(|r| r.to_string()).unwrap_or_else(|| "?".into()),
            self.smem,
            self.stack,
            self.spill_st,
            self.spill_ld
        );
        if self.spills() {
            s.push_str("  <-- SPILLS");
        }
        s
    }
}

/// The entry functions of a ptxas report with their resources, in report order.
pub fn entry_stats(report: &str) -> Vec<(String, FnStats)> {
    let mut fns: BTreeMap<String, FnStats> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut cur: Option<String> = None;
    for line in report.lines() {
        let body = line.split_once(':').map(|(_, r)| r.trim()).unwrap_or(line.trim());
        if let Some(rest) = body.strip_prefix("Compiling entry function '") {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            if !fns.contains_key(&name) {
                order.push(name.clone());
            }
            fns.entry(name.clone()).or_default().entry = true;
            cur = Some(name);
        } else if let Some(rest) = body.strip_prefix("Function properties for ") {
            let name = rest.trim().to_string();
            if !fns.contains_key(&name) {
                order.push(name.clone());
            }
            fns.entry(name.clone()).or_default();
            cur = Some(name);
        } else if line.contains("bytes stack frame") {
            if let Some(f) = cur.as_ref().and_then(|c| fns.get_mut(c)) {
                f.stack = number_before(line, "bytes stack frame");
                f.spill_st = number_before(line, "bytes spill stores");
                f.spill_ld = number_before(line, "bytes spill loads");
            }
        } else if body.starts_with("Used ") {
            if let Some(f) = cur.as_ref().and_then(|c| fns.get_mut(c)) {
                f.regs = Some(number_before(body, "registers"));
                f.smem = number_before(body, "bytes smem");
            }
        }
    }
    order
        .into_iter()
        .filter_map(|name| {
            let f = fns.remove(&name)?;
            f.entry.then_some((name, f))
        })
        .collect()
}

/// ptxas's wgmma serialisation notes in a report: (entry function, code, the note).
pub fn wgmma_serialisation(report: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for line in report.lines() {
        let Some(code) = WGMMA_SERIALISATION.iter().find(|c| line.contains(&format!("({c})"))) else { continue };
        // "... in the function 'mla_decode_bf16_wg64'" / "... in function 'x'": the last quoted name.
        let name = line.rsplit('\'').nth(1).unwrap_or("?").to_string();
        let note = line.split_once(&format!("({code})")).map(|(_, r)| r.trim()).unwrap_or(line).to_string();
        out.push((name, code.to_string(), note));
    }
    out
}

/// Writes ptxas's reports to the build log and, for kernels compiled here (`enforce`),
/// prints the real warnings (spills, ptxas and compiler warnings) as cargo warnings and
/// fails the build on a spilling wgmma/TMA kernel or a wgmma serialisation note
/// (MLA_ALLOW_KERNEL_WARNINGS=1: warnings). Prebuilt cubins were checked when they were
/// built: they only get the log.
pub fn report(out_dir: &Path, built: &[Built], compiler: &str, enforce: bool) {
    let verbose = env_flag("MLA_VERBOSE_BUILD") || env_flag("MLA_KERNELS_VERBOSE");
    let allow = env_flag("MLA_ALLOW_KERNEL_WARNINGS");
    let mut log = format!("mla-kernels: ptxas reports ({compiler})\n");
    let mut errors = Vec::new();
    let mut known_seen = Vec::new();
    for b in built {
        writeln!(log, "\n==== {} ({})", b.name, b.arch).unwrap();
        for (name, f) in entry_stats(&b.report) {
            let line = f.line(&name);
            writeln!(log, "{line}").unwrap();
            if verbose {
                println!("cargo:warning={} ({}): {line}", b.name, b.arch);
            }
            if f.spills() {
                if NO_SPILL_MARKERS.iter().any(|m| name.contains(m)) {
                    errors.push(format!(
                        "{}: kernel {name} spills (spill stores {} B, spill loads {} B); a wgmma/TMA kernel must not spill",
                        b.name, f.spill_st, f.spill_ld
                    ));
                } else if !verbose && enforce {
                    println!("cargo:warning={} ({}): {line}", b.name, b.arch);
                }
            }
        }
        let mut allowed = Vec::new();
        for (name, code, note) in wgmma_serialisation(&b.report) {
            if KNOWN_WGMMA_WARNINGS.iter().any(|(k, codes)| *k == name && codes.contains(&code.as_str())) {
                known_seen.push(name.clone());
                allowed.push(format!("{name} {code}"));
            } else {
                errors.push(format!("{}: kernel {name}: ptxas {code}: {note}", b.name));
            }
        }
        if !allowed.is_empty() && enforce {
            println!(
                "cargo:warning={}: ptxas serialises wgmma in {} (known, allowed by KNOWN_WGMMA_WARNINGS in crates/mla-kernels/build.rs; see the log)",
                b.name,
                allowed.join(", ")
            );
        }
        for d in &b.diagnostics {
            println!("cargo:warning={}: {d}", b.name);
        }
        log.push_str(&b.report);
        if verbose {
            for line in b.report.lines() {
                println!("cargo:warning={}: {line}", b.name);
            }
        }
    }
    if enforce {
        for (name, codes) in KNOWN_WGMMA_WARNINGS {
            if !built.is_empty() && !known_seen.iter().any(|n| n == name) {
                println!(
                    "cargo:warning=KNOWN_WGMMA_WARNINGS in crates/mla-kernels/build.rs allows {} for {name}, which no longer trips them: remove the row",
                    codes.join("/")
                );
            }
        }
    }
    let log_path = out_dir.join("ptxas.log");
    fs::write(&log_path, &log).unwrap();
    // A stable place too: <target>/<profile>/mla-kernels-ptxas.log (OUT_DIR is
    // <target>/<profile>/build/mla-kernels-<hash>/out).
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let _ = fs::write(profile_dir.join("mla-kernels-ptxas.log"), &log);
    }
    if verbose {
        println!("cargo:warning=ptxas reports written to {}", log_path.display());
    }
    if enforce && !errors.is_empty() {
        if allow {
            for e in &errors {
                println!("cargo:warning={e} (allowed: MLA_ALLOW_KERNEL_WARNINGS=1)");
            }
        } else {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!(
                "The reports are in {}. Set MLA_ALLOW_KERNEL_WARNINGS=1 to build anyway (a known case that must stay for now: a row in KNOWN_WGMMA_WARNINGS).",
                log_path.display()
            );
            std::process::exit(1);
        }
    }
}

/// The integer just before `unit` in `s` ("... 44 registers" -> 44); 0 when absent.
pub fn number_before(s: &str, unit: &str) -> u64 {
    let Some(i) = s.find(unit) else { return 0 };
    s[..i].split(|c: char| c == ',' || c.is_whitespace()).rfind(|w| !w.is_empty()).and_then(|w| w.parse().ok()).unwrap_or(0)
}
