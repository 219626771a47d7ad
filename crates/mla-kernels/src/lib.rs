//! The registry of CUDA modules compiled by build.rs from the repository's `kernels/` folder.
//!
//! Each `kernels/<arch>/<name>.cu` becomes one cubin, embedded here. When nvcc was not
//! found at build time the registry is empty and [`UNAVAILABLE_REASON`] says why.

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
