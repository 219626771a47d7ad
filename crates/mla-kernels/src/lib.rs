//! The registry of CUDA modules compiled by build.rs from the repository's `kernels/` folder.
//!
//! Each `kernels/<arch>/<name>.cu` becomes one cubin, embedded here. When nvcc was not
//! found at build time the registry is empty and [`UNAVAILABLE_REASON`] says why.
//!
//! Generated statics (see `build.rs`):
//! - `MODULES: &[Module]`: every compiled module, sorted by name within each arch folder;
//! - `UNAVAILABLE_REASON: &str`: empty when kernels were built, else why not (nvcc not
//!   found, or a kernel failed with `MLA_ALLOW_KERNEL_FAILURE=1`);
//! - `NVCC_VERSION: &str`: the version of the CUDA compiler that built them (nvcc's, or
//!   ptxas's on the NVRTC route, e.g. `12.9.86`), empty when none was found;
//! - `COMPILER: &str`: which compiler that was, e.g. `NVRTC 12.9 + ptxas 12.9.86 (repo .cuda)`.

include!(concat!(env!("OUT_DIR"), "/registry.rs"));

/// One compiled module.
#[derive(Debug)]
pub struct Module {
    /// `<arch>/<name>`, e.g. `sm90/mla_decode`.
    pub name: &'static str,
    /// Target architecture, e.g. `sm_90a`.
    pub arch: &'static str,
    /// The cubin bytes (load with cuModuleLoadData).
    pub cubin: &'static [u8],
    /// ptxas's resource report (registers, shared memory, spills) for this module.
    pub resource_report: &'static str,
}

/// The module called `name` (`<arch>/<file stem>`), if it was built.
pub fn module(name: &str) -> Option<&'static Module> {
    MODULES.iter().find(|m| m.name == name)
}

/// Whether any GPU kernel was compiled into this build.
pub fn available() -> bool {
    !MODULES.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_consistent() {
        if !available() {
            assert!(
                !UNAVAILABLE_REASON.is_empty(),
                "an empty registry must say why"
            );
            return;
        }
        assert!(UNAVAILABLE_REASON.is_empty());
        assert!(!NVCC_VERSION.is_empty());
        assert!(!COMPILER.is_empty());
        for m in MODULES {
            assert!(!m.cubin.is_empty(), "{}: empty cubin", m.name);
            assert_eq!(&m.cubin[..4], b"\x7fELF", "{}: not an ELF cubin", m.name);
            assert!(m.name.contains('/'), "{}: name is <arch>/<stem>", m.name);
            assert!(m.arch.starts_with("sm_"), "{}: arch {}", m.name, m.arch);
            assert!(
                m.resource_report.contains("ptxas"),
                "{}: no ptxas report",
                m.name
            );
            assert!(
                std::ptr::eq(module(m.name).unwrap(), m),
                "{}: duplicate name",
                m.name
            );
        }
    }

    #[test]
    fn sm90_modules_define_their_entry_points() {
        if !available() {
            return;
        }
        // The launcher (crates/mla-core/src/gpu/ops.rs) looks these up by name.
        for (module_name, entries) in [
            ("sm90/mla_plan", &["mla_plan_kernel"][..]),
            (
                "sm90/mla_decode",
                &["mla_decode_bf16_m16", "mla_decode_bf16_m32", "mla_decode_fp16_m16", "mla_decode_fp16_m32"][..],
            ),
            (
                "sm90/mla_decode_wgmma",
                &["mla_decode_bf16_wg64", "mla_decode_fp16_wg64"][..],
            ),
            ("sm90/mla_combine", &["mla_combine_bf16", "mla_combine_fp16"][..]),
            ("sm90/mla_util", &["mla_fill_random_bf16", "mla_fill_random_fp16"][..]),
        ] {
            let Some(m) = module(module_name) else {
                panic!("{module_name} was not built")
            };
            for e in entries {
                let needle = format!("Compiling entry function '{e}'");
                assert!(
                    m.resource_report.contains(&needle),
                    "{module_name}: no entry {e}"
                );
            }
        }
    }
}
