//! The registry of CUDA modules compiled by build.rs from the repository's `kernels/` folder.
//!
//! Each `kernels/<folder>/<name>.cu` is built for every target of its folder (build.rs's
//! `FOLDERS`): cubins for real architectures (`sm_80`, `sm_86`, `sm_89`, `sm_90a`, `sm_120`)
//! and PTX for a virtual one (`compute_80`, JIT-compiled by the driver on GPUs without a
//! cubin of their own), all embedded here. When no CUDA compiler was found at build time
//! the registry is empty and [`UNAVAILABLE_REASON`] says why.
//!
//! Generated statics (see `build.rs`):
//! - `MODULES: &[Module]`: every compiled (module, target), by folder, then name, then target;
//! - `UNAVAILABLE_REASON: &str`: empty when kernels were built, else why not (nvcc not
//!   found, or a kernel failed with `MLA_ALLOW_KERNEL_FAILURE=1`);
//! - `NVCC_VERSION: &str`: the version of the CUDA compiler that built them (nvcc's, or
//!   ptxas's on the NVRTC route, e.g. `12.9.86`), empty when none was found;
//! - `COMPILER: &str`: which compiler that was, e.g. `NVRTC 12.9 + ptxas 12.9.86 (repo .cuda)`.

include!(concat!(env!("OUT_DIR"), "/registry.rs"));

/// One compiled module for one target.
#[derive(Debug)]
pub struct Module {
    /// `<folder>/<name>`, e.g. `portable/mla_decode`: the same for every target.
    pub name: &'static str,
    /// The target: a real architecture (`sm_86`, `sm_90a`) for a cubin, a virtual one
    /// (`compute_80`) for PTX.
    pub arch: &'static str,
    /// The cubin, or the PTX text (load either with cuModuleLoadData; PTX is JIT-compiled).
    pub image: &'static [u8],
    /// ptxas's resource report (registers, shared memory, spills) for a cubin; a note for PTX.
    pub resource_report: &'static str,
}

impl Module {
    /// Whether the image is PTX text rather than a cubin.
    pub fn is_ptx(&self) -> bool {
        self.arch.starts_with("compute_")
    }
    /// The folder under `kernels/` (`common`, `portable`, `sm90`).
    pub fn folder(&self) -> &'static str {
        self.name.split('/').next().unwrap_or("")
    }
}

/// The module called `name` (`<folder>/<file stem>`) built for `arch`, if it was.
pub fn module(name: &str, arch: &str) -> Option<&'static Module> {
    MODULES.iter().find(|m| m.name == name && m.arch == arch)
}

/// Every target some module was built for, in table order (e.g. `sm_80`, `sm_86`, `sm_89`,
/// `sm_90a`, `sm_120`, `compute_80`): cubins first, then PTX.
pub fn targets() -> Vec<&'static str> {
    let mut t: Vec<&'static str> = Vec::new();
    for m in MODULES {
        if !t.contains(&m.arch) {
            t.push(m.arch);
        }
    }
    // sm_80 < sm_86 < ... < sm_120 by number, PTX after the cubins.
    t.sort_by_key(|a| (a.starts_with("compute_"), a.trim_start_matches(|c: char| !c.is_ascii_digit()).trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().unwrap_or(0)));
    t
}

/// Whether any GPU kernel was compiled into this build.
pub fn available() -> bool {
    !MODULES.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every build with kernels must carry (build.rs's FOLDERS).
    const COMMON: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90a", "sm_120", "compute_80"];
    const PORTABLE: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_120", "compute_80"];

    #[test]
    fn registry_is_consistent() {
        if !available() {
            assert!(!UNAVAILABLE_REASON.is_empty(), "an empty registry must say why");
            return;
        }
        assert!(UNAVAILABLE_REASON.is_empty());
        assert!(!NVCC_VERSION.is_empty());
        assert!(!COMPILER.is_empty());
        for m in MODULES {
            assert!(!m.image.is_empty(), "{} ({}): empty image", m.name, m.arch);
            assert!(m.name.contains('/'), "{}: name is <folder>/<stem>", m.name);
            if m.is_ptx() {
                assert!(!m.image.contains(&0), "{} ({}): PTX text with a NUL byte", m.name, m.arch);
            } else {
                assert!(m.arch.starts_with("sm_"), "{}: arch {}", m.name, m.arch);
                assert_eq!(&m.image[..4], b"\x7fELF", "{} ({}): not an ELF cubin", m.name, m.arch);
                assert!(m.resource_report.contains("ptxas"), "{} ({}): no ptxas report", m.name, m.arch);
            }
            assert!(std::ptr::eq(module(m.name, m.arch).unwrap(), m), "{} ({}): duplicate", m.name, m.arch);
        }
    }

    #[test]
    fn every_module_has_every_target_of_its_folder() {
        if !available() {
            return;
        }
        let mut names: Vec<&str> = MODULES.iter().map(|m| m.name).collect();
        names.dedup();
        for folder in ["common", "portable", "sm90"] {
            assert!(names.iter().any(|n| n.starts_with(&format!("{folder}/"))), "no module of kernels/{folder}");
        }
        for name in names {
            let want: &[&str] = match name.split('/').next().unwrap() {
                "common" => COMMON,
                "portable" => PORTABLE,
                "sm90" => &["sm_90a"],
                f => panic!("{name}: unexpected folder {f}"),
            };
            let have: Vec<&str> = MODULES.iter().filter(|m| m.name == name).map(|m| m.arch).collect();
            for t in want {
                assert!(have.contains(t), "{name}: no {t} build (has {have:?})");
            }
            assert_eq!(have.len(), want.len(), "{name}: targets {have:?}, expected {want:?}");
        }
        assert_eq!(targets(), ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_120", "compute_80"]);
    }

    #[test]
    fn ptx_is_compute_80_text() {
        if !available() {
            return;
        }
        for name in ["common/mla_plan", "common/mla_combine", "common/mla_cache_append", "common/mla_util", "portable/mla_decode"] {
            let m = module(name, "compute_80").unwrap_or_else(|| panic!("{name}: no compute_80 PTX"));
            assert!(m.is_ptx());
            let text = std::str::from_utf8(m.image).unwrap_or_else(|e| panic!("{name}: PTX is not UTF-8 text: {e}"));
            let directive = |d: &str| text.lines().map(str::trim).find(|l| l.starts_with(d)).map(|l| l[d.len()..].trim().to_string());
            assert_eq!(directive(".target").as_deref(), Some("sm_80"), "{name}: .target");
            let version = directive(".version").unwrap_or_else(|| panic!("{name}: no .version"));
            assert!(version.split('.').all(|p| p.parse::<u32>().is_ok()), "{name}: .version {version}");
            assert!(text.contains(".address_size 64"), "{name}: not 64-bit PTX");
        }
        // The decode PTX carries both tiles (the host picks m32 only where it fits).
        let d = std::str::from_utf8(module("portable/mla_decode", "compute_80").unwrap().image).unwrap();
        for e in ["mla_decode_bf16_m16", "mla_decode_fp16_m16", "mla_decode_bf16_m32", "mla_decode_fp16_m32"] {
            assert!(d.contains(&format!(".entry {e}(")), "compute_80 PTX: no .entry {e}");
        }
        assert!(!d.contains("wgmma") && !d.contains("cp.async.bulk"), "the portable PTX uses Hopper instructions");
    }

    #[test]
    fn modules_define_their_entry_points() {
        if !available() {
            return;
        }
        // The launcher (crates/mla-core/src/gpu/ops.rs) looks these up by name.
        let m16 = &["mla_decode_bf16_m16", "mla_decode_fp16_m16"][..];
        let m16_m32 = &["mla_decode_bf16_m16", "mla_decode_fp16_m16", "mla_decode_bf16_m32", "mla_decode_fp16_m32"][..];
        let mut checks: Vec<(&str, &str, &[&str])> = vec![
            ("sm90/mla_decode_tma", "sm_90a", &["mla_decode_bf16_tma16", "mla_decode_bf16_tma32", "mla_decode_fp16_tma16", "mla_decode_fp16_tma32"]),
            ("sm90/mla_decode_ws", "sm_90a", &["mla_decode_bf16_ws64", "mla_decode_fp16_ws64"]),
            ("sm90/mla_decode_ws2", "sm_90a", &["mla_decode_bf16_ws64s", "mla_decode_fp16_ws64s"]),
            // Shared memory picks the tiles: 32-row tiles (149 KiB) only on sm_80 (163 KiB a
            // block); the 99 KiB parts get 16-row tiles only.
            ("portable/mla_decode", "sm_80", m16_m32),
            ("portable/mla_decode", "sm_86", m16),
            ("portable/mla_decode", "sm_89", m16),
            ("portable/mla_decode", "sm_120", m16),
        ];
        for arch in ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_120"] {
            checks.push(("common/mla_plan", arch, &["mla_plan_kernel"]));
            checks.push(("common/mla_combine", arch, &["mla_combine_bf16", "mla_combine_fp16"]));
            checks.push(("common/mla_cache_append", arch, &["mla_cache_append"]));
            checks.push(("common/mla_util", arch, &["mla_fill_random_bf16", "mla_fill_random_fp16"]));
        }
        for (name, arch, entries) in checks {
            let Some(m) = module(name, arch) else { panic!("{name} was not built for {arch}") };
            for e in entries {
                let needle = format!("Compiling entry function '{e}' for '{arch}'");
                assert!(m.resource_report.contains(&needle), "{name} ({arch}): no entry {e}");
            }
        }
        for arch in ["sm_86", "sm_89", "sm_120"] {
            let r = module("portable/mla_decode", arch).unwrap().resource_report;
            assert!(!r.contains("_m32'"), "portable/mla_decode ({arch}): a 32-row entry over the 99 KiB budget");
        }
    }
}
