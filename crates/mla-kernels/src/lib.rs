//! The registry of CUDA modules compiled by build.rs from the repository's `kernels/` folder.
//!
//! Each `kernels/<folder>/<stage>/<name>.cu` is built for every target of its folder (build.rs's
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
//! - `COMPILER: &str`: which compiler that was, e.g. `NVRTC 12.9 + ptxas 12.9.86 (repo .cuda)`;
//! - [`entries`]: one typed [`Entry`] per entry point of every module, read from the
//!   sources (so they exist in a build without kernels too), checked by the build against
//!   what the compiler built.

include!(concat!(env!("OUT_DIR"), "/registry.rs"));

/// The entry points of the kernel modules, generated from the sources: `MLA_DECODE_BF16_WS64`
/// is [`Entry`] `{ module: "sm90/decode/mla_decode_ws", name: "mla_decode_bf16_ws64" }`;
/// `ENTRIES` lists them all, `MODULE_NAMES` every module.
pub mod entries {
    use super::Entry;
    include!(concat!(env!("OUT_DIR"), "/entries.rs"));
}

/// One entry point (`extern "C" __global__` function) of a kernel module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The module, `<folder>/<stage>/<stem>` (as [`Module::name`]).
    pub module: &'static str,
    /// The function's name in the module.
    pub name: &'static str,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.module, self.name)
    }
}

/// One compiled module for one target.
#[derive(Debug)]
pub struct Module {
    /// `<folder>/<stage>/<stem>`, e.g. `portable/decode/mla_decode`: the same for every target.
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
    /// The dynamic shared memory entry `entry` of this module is launched with: the kernel's
    /// own `MLA_ENTRY_SMEM` constant (its layout's size), which the build read from the PTX
    /// into the report. None for an entry without one (launched with no dynamic shared
    /// memory) or not in this module.
    pub fn dynamic_smem(&self, entry: &str) -> Option<u32> {
        let needle = format!("mla-kernels: entry '{entry}' dynamic smem ");
        let line = self.resource_report.lines().find_map(|l| l.strip_prefix(needle.as_str()))?;
        line.strip_suffix(" bytes")?.parse().ok()
    }
    /// The folder under `kernels/` (`common`, `portable`, `sm90`).
    pub fn folder(&self) -> &'static str {
        self.name.split('/').next().unwrap_or("")
    }
}

/// The module called `name` (`<folder>/<stage>/<stem>`) built for `arch`, if it was.
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
    t.sort_by_key(|a| {
        (
            a.starts_with("compute_"),
            a.trim_start_matches(|c: char| !c.is_ascii_digit()).trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().unwrap_or(0),
        )
    });
    t
}

/// Whether any GPU kernel was compiled into this build.
pub fn available() -> bool {
    !MODULES.is_empty()
}

#[cfg(test)]
mod tests {
    use super::entries::*;
    use super::*;

    /// What every build with kernels must carry (build.rs's FOLDERS).
    const COMMON: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90a", "sm_120", "compute_80"];
    const PORTABLE: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_120", "compute_80"];

    #[test]
    fn entries_are_generated_from_the_sources() {
        // Whether or not kernels were compiled: one constant per entry, names unique, each
        // in a module of MODULE_NAMES; the layout is <folder>/<stage>/<stem>.
        assert!(ENTRIES.len() >= 16, "{ENTRIES:?}");
        for e in ENTRIES {
            assert!(MODULE_NAMES.contains(&e.module), "{e}");
            assert_eq!(e.module.split('/').count(), 3, "{e}: not <folder>/<stage>/<stem>");
            assert_eq!(ENTRIES.iter().filter(|x| x.name == e.name).count(), 1, "{e}: duplicate name");
        }
        assert_eq!(MLA_DECODE_BF16_WS64, Entry { module: "sm90/decode/mla_decode_ws", name: "mla_decode_bf16_ws64" });
        assert_eq!(MLA_PLAN_KERNEL.module, "common/plan/mla_plan");
        // Every compiled module is a module of the sources, and the reverse.
        if available() {
            for m in MODULES {
                assert!(MODULE_NAMES.contains(&m.name), "{}: not in MODULE_NAMES", m.name);
            }
            for n in MODULE_NAMES {
                assert!(MODULES.iter().any(|m| m.name == *n), "{n}: not compiled");
            }
        }
    }

    #[test]
    fn decode_entries_carry_their_shared_memory() {
        if !available() {
            return;
        }
        // The sizes of the kernels' layouts (what the host computed before it read them; the
        // kernels static_assert their own budgets).
        let want = [
            (MLA_DECODE_BF16_TMA16, "sm_90a", 207_136),
            (MLA_DECODE_FP16_TMA32, "sm_90a", 227_808),
            (MLA_DECODE_BF16_WS64, "sm_90a", 231_392),
            (MLA_DECODE_FP16_WS64, "sm_90a", 231_392),
            (MLA_DECODE_BF16_M16, "sm_86", 95_424),
            (MLA_DECODE_FP16_M16, "compute_80", 95_424),
            (MLA_DECODE_BF16_M32, "sm_80", 152_960),
            (MLA_DECODE_FP16_M32, "compute_80", 152_960),
        ];
        for (e, arch, bytes) in want {
            assert_eq!(module(e.module, arch).unwrap().dynamic_smem(e.name), Some(bytes), "{e} ({arch})");
        }
        // Every decode entry of every target has one; the others none.
        for m in MODULES {
            for e in ENTRIES.iter().filter(|e| e.module == m.name) {
                let built = m.resource_report.contains(&format!("entry function '{}'", e.name))
                    || (m.is_ptx() && std::str::from_utf8(m.image).unwrap().contains(&format!(".entry {}(", e.name)));
                let decode = e.name.starts_with("mla_decode_");
                assert_eq!(m.dynamic_smem(e.name).is_some(), decode && built, "{e} ({})", m.arch);
            }
        }
    }

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
        for name in [MLA_PLAN_KERNEL.module, MLA_COMBINE_BF16.module, MLA_CACHE_APPEND.module, MLA_FILL_RANDOM_BF16.module, MLA_DECODE_BF16_M16.module] {
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
        let d = std::str::from_utf8(module(MLA_DECODE_BF16_M16.module, "compute_80").unwrap().image).unwrap();
        for e in [MLA_DECODE_BF16_M16, MLA_DECODE_FP16_M16, MLA_DECODE_BF16_M32, MLA_DECODE_FP16_M32] {
            assert!(d.contains(&format!(".entry {}(", e.name)), "compute_80 PTX: no .entry {e}");
        }
        assert!(!d.contains("wgmma") && !d.contains("cp.async.bulk"), "the portable PTX uses Hopper instructions");
    }

    #[test]
    fn modules_define_their_entry_points() {
        if !available() {
            return;
        }
        // The launcher (crates/mla-core/src/gpu/ops.rs) looks these up.
        let m16 = &[MLA_DECODE_BF16_M16, MLA_DECODE_FP16_M16][..];
        let m16_m32 = &[MLA_DECODE_BF16_M16, MLA_DECODE_FP16_M16, MLA_DECODE_BF16_M32, MLA_DECODE_FP16_M32][..];
        let mut checks: Vec<(&str, &[Entry])> = vec![
            ("sm_90a", &[MLA_DECODE_BF16_TMA16, MLA_DECODE_BF16_TMA32, MLA_DECODE_FP16_TMA16, MLA_DECODE_FP16_TMA32]),
            ("sm_90a", &[MLA_DECODE_BF16_WS64, MLA_DECODE_FP16_WS64]),
            // Shared memory picks the tiles: 32-row tiles (149 KiB) only on sm_80 (163 KiB a
            // block); the 99 KiB parts get 16-row tiles only.
            ("sm_80", m16_m32),
            ("sm_86", m16),
            ("sm_89", m16),
            ("sm_120", m16),
        ];
        for arch in ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_120"] {
            checks.push((arch, &[MLA_PLAN_KERNEL]));
            checks.push((arch, &[MLA_COMBINE_BF16, MLA_COMBINE_FP16]));
            checks.push((arch, &[MLA_CACHE_APPEND]));
            checks.push((arch, &[MLA_FILL_RANDOM_BF16, MLA_FILL_RANDOM_FP16]));
        }
        for (arch, entries) in checks {
            for e in entries {
                let Some(m) = module(e.module, arch) else { panic!("{} was not built for {arch}", e.module) };
                let needle = format!("Compiling entry function '{}' for '{arch}'", e.name);
                assert!(m.resource_report.contains(&needle), "{} ({arch}): no entry {e}", e.module);
            }
        }
        for arch in ["sm_86", "sm_89", "sm_120"] {
            let r = module(MLA_DECODE_BF16_M16.module, arch).unwrap().resource_report;
            assert!(!r.contains("_m32'"), "{} ({arch}): a 32-row entry over the 99 KiB budget", MLA_DECODE_BF16_M16.module);
        }
    }
}
