//! Which kernels a CUDA device runs: the Hopper kernels (sm_90a), the portable ones from a
//! cubin of the device's own architecture, or the portable ones from the compute_80 PTX,
//! which the driver JIT-compiles. [`select`] is the whole decision, as a pure function of
//! the compute capability, the embedded modules and the driver version.

use std::fmt;

use crate::error::{ErrorCode, MlaError, Result};

/// The oldest compute capability the kernels run on (cp.async, ldmatrix, mma.sync bf16).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);
/// The PTX target embedded for GPUs without a cubin of their own.
pub const PTX_TARGET: &str = "compute_80";

/// The kernels a CUDA device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// sm_90a cubins: TMA and wgmma decode kernels (H100, H200).
    Hopper,
    /// The portable cp.async + mma.sync kernels, from a cubin built for the device's own
    /// architecture (sm_80, sm_86, sm_89, sm_120).
    Portable,
    /// The portable kernels from the compute_80 PTX, JIT-compiled by the driver when the
    /// device is opened (GPUs without a cubin of their own, and Hopper when forced).
    PortablePtx,
}

impl KernelPath {
    /// `'hopper'`, `'portable'`, `'portable-ptx'` (the names of gpuStatus() and the open option).
    pub fn as_str(self) -> &'static str {
        match self {
            KernelPath::Hopper => "hopper",
            KernelPath::Portable => "portable",
            KernelPath::PortablePtx => "portable-ptx",
        }
    }
    pub fn parse(s: &str) -> Option<KernelPath> {
        match s {
            "hopper" => Some(KernelPath::Hopper),
            "portable" => Some(KernelPath::Portable),
            "portable-ptx" => Some(KernelPath::PortablePtx),
            _ => None,
        }
    }
    /// The kernel folders (`kernels/<folder>`) a device on this path loads.
    pub fn folders(self) -> &'static [&'static str] {
        match self {
            KernelPath::Hopper => &["common", "sm90"],
            KernelPath::Portable | KernelPath::PortablePtx => &["common", "portable"],
        }
    }
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Request {
    /// By compute capability: Hopper on 9.0, else a cubin of the device's architecture,
    /// else the compute_80 PTX.
    #[default]
    Auto,
    /// Anything but the Hopper kernels (a cubin of the device's architecture, else the PTX).
    Portable,
    /// Exactly this path, or an error.
    Exact(KernelPath),
}

impl Request {
    /// `MLA_FORCE_PORTABLE`: unset, empty or `0`: [`Request::Auto`]; `1`: [`Request::Portable`];
    /// `ptx`: exactly the PTX; anything else is an error (a typo must not silently run Hopper).
    pub fn from_env_value(v: Option<&str>) -> Result<Request> {
        match v.map(str::trim) {
            None | Some("") | Some("0") => Ok(Request::Auto),
            Some("1") | Some("true") => Ok(Request::Portable),
            Some("ptx") | Some("portable-ptx") => Ok(Request::Exact(KernelPath::PortablePtx)),
            Some(o) => Err(MlaError::arg(ErrorCode::InvalidArgument, "MLA_FORCE_PORTABLE", "0, 1 or ptx", format!("'{o}'"))),
        }
    }
}

/// A device's path and the target of the modules it loads (`sm_90a`, `sm_86`, `compute_80`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathChoice {
    pub path: KernelPath,
    pub target: &'static str,
}

/// The cubin target of compute capability `cc`: `sm_86`; on 9.0 the Hopper kernels' `sm_90a`.
fn cubin_target(cc: (i32, i32), path: KernelPath) -> String {
    match path {
        KernelPath::Hopper => "sm_90a".to_string(),
        _ => format!("sm_{}{}", cc.0, cc.1),
    }
}

/// The target of `path` on `cc` when `built` ((module name, target) pairs, e.g.
/// `mla_kernels::MODULES`) has it for every module of the path's folders.
fn complete(built: &[(&'static str, &'static str)], path: KernelPath, cc: (i32, i32)) -> Option<&'static str> {
    let want = match path {
        KernelPath::PortablePtx => PTX_TARGET.to_string(),
        _ => cubin_target(cc, path),
    };
    let mut target = None;
    for folder in path.folders() {
        let names: Vec<&str> = built.iter().map(|b| b.0).filter(|n| n.split('/').next() == Some(folder)).collect();
        if names.is_empty() {
            return None;
        }
        for n in names {
            target = Some(built.iter().find(|b| b.0 == n && b.1 == want)?.1);
        }
    }
    target
}

/// The path of a device of compute capability `cc`, asked for as `req`, given the embedded
/// modules `built`, the driver's CUDA version and the CUDA version the PTX was made by
/// (the driver must be at least that new to JIT-compile it).
///
/// Typed errors, never a silent switch: below 8.0 `ERR_GPU_UNAVAILABLE` naming the
/// minimum; a requested path the device or the build cannot run, or no kernels for this
/// device, `ERR_KERNELS_UNAVAILABLE`; the PTX path on an older driver `ERR_DRIVER_TOO_OLD`.
pub fn select(cc: (i32, i32), built: &[(&'static str, &'static str)], req: Request, driver: Option<(i32, i32)>, ptx_made_by: (i32, i32)) -> Result<PathChoice> {
    if cc < MIN_COMPUTE_CAPABILITY {
        let (maj, min) = MIN_COMPUTE_CAPABILITY;
        return Err(MlaError::arg(
            ErrorCode::GpuUnavailable,
            "device compute capability",
            format!("{maj}.{min} or newer (Ampere or later: the kernels use cp.async, ldmatrix and bf16 mma.sync)"),
            format!("{}.{}", cc.0, cc.1),
        ));
    }
    let built_list = || {
        let mut t: Vec<&str> = built.iter().map(|b| b.1).collect();
        t.sort();
        t.dedup();
        if t.is_empty() {
            "none".to_string()
        } else {
            t.join(", ")
        }
    };
    let candidates: &[KernelPath] = match req {
        Request::Auto if cc == (9, 0) => &[KernelPath::Hopper, KernelPath::Portable, KernelPath::PortablePtx],
        Request::Auto | Request::Portable => &[KernelPath::Portable, KernelPath::PortablePtx],
        Request::Exact(KernelPath::Hopper) => &[KernelPath::Hopper],
        Request::Exact(KernelPath::Portable) => &[KernelPath::Portable],
        Request::Exact(KernelPath::PortablePtx) => &[KernelPath::PortablePtx],
    };
    for &path in candidates {
        if path == KernelPath::Hopper && cc != (9, 0) {
            continue;
        }
        let Some(target) = complete(built, path, cc) else { continue };
        if path == KernelPath::PortablePtx {
            if let Some(d) = driver.filter(|d| *d < ptx_made_by) {
                return Err(MlaError::arg(
                    ErrorCode::DriverTooOld,
                    "CUDA driver",
                    format!(
                        "a driver for CUDA {}.{} or newer to JIT-compile the {PTX_TARGET} PTX (made by CUDA {}.{}) for compute capability {}.{}",
                        ptx_made_by.0, ptx_made_by.1, ptx_made_by.0, ptx_made_by.1, cc.0, cc.1
                    ),
                    format!("a driver for CUDA {}.{}; update the NVIDIA driver", d.0, d.1),
                ));
            }
        }
        return Ok(PathChoice { path, target });
    }
    let what = match req {
        Request::Exact(KernelPath::Hopper) if cc != (9, 0) => {
            return Err(MlaError::arg(
                ErrorCode::KernelsUnavailable,
                "kernel path 'hopper'",
                "a compute capability 9.0 device (the sm_90a kernels)",
                format!("{}.{}", cc.0, cc.1),
            ));
        }
        Request::Exact(p) => format!("kernel path '{p}' ({} kernels)", if p == KernelPath::PortablePtx { PTX_TARGET.to_string() } else { cubin_target(cc, p) }),
        _ => "kernels".to_string(),
    };
    Err(MlaError::new(
        ErrorCode::KernelsUnavailable,
        format!(
            "this build has no {what} for compute capability {}.{} (built: {}){}",
            cc.0,
            cc.1,
            built_list(),
            if req == Request::Exact(KernelPath::Portable) { "; 'portable-ptx' runs the portable kernels from their compute_80 PTX" } else { "" }
        ),
    ))
}

/// (major, minor) of a CUDA compiler version such as `12.9.86`.
pub fn cuda_version_of(v: &str) -> Option<(i32, i32)> {
    let mut it = v.split('.');
    Some((it.next()?.trim().parse().ok()?, it.next()?.trim().parse().ok()?))
}

/// [`select`] over this build's modules (`mla_kernels::MODULES`) and compiler.
pub fn select_for_build(cc: (i32, i32), req: Request, driver: Option<(i32, i32)>) -> Result<PathChoice> {
    let built: Vec<(&'static str, &'static str)> = mla_kernels::MODULES.iter().map(|m| (m.name, m.arch)).collect();
    // Without a version (no kernels), nothing is selectable anyway.
    let made_by = cuda_version_of(mla_kernels::NVCC_VERSION).unwrap_or((99, 0));
    select(cc, &built, req, driver, made_by)
}

#[cfg(test)]
mod tests {
    use super::*;
    use KernelPath::*;

    /// The modules of a full build (build.rs's FOLDERS), independent of this machine's build.
    fn full_build() -> Vec<(&'static str, &'static str)> {
        let common = ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_120", "compute_80"];
        let portable = ["sm_80", "sm_86", "sm_89", "sm_120", "compute_80"];
        let mut v = Vec::new();
        for n in mla_kernels::entries::MODULE_NAMES {
            match n.split('/').next().unwrap() {
                "common" => v.extend(common.iter().map(|t| (*n, *t))),
                "portable" => v.extend(portable.iter().map(|t| (*n, *t))),
                _ => v.push((*n, "sm_90a")),
            }
        }
        v
    }

    const NEW_DRIVER: Option<(i32, i32)> = Some((13, 0));
    const MADE_BY: (i32, i32) = (12, 9);

    fn pick(cc: (i32, i32), req: Request) -> Result<PathChoice> {
        select(cc, &full_build(), req, NEW_DRIVER, MADE_BY)
    }

    #[test]
    fn by_compute_capability() {
        for (cc, path, target) in [
            ((8, 0), Portable, "sm_80"),
            ((8, 6), Portable, "sm_86"),
            ((8, 9), Portable, "sm_89"),
            ((9, 0), Hopper, "sm_90a"),
            ((10, 0), PortablePtx, "compute_80"),
            ((12, 0), Portable, "sm_120"),
            // No cubin of their own: the PTX (exact cubins only, as the loader does).
            ((8, 7), PortablePtx, "compute_80"),
            ((12, 1), PortablePtx, "compute_80"),
        ] {
            assert_eq!(pick(cc, Request::Auto).unwrap(), PathChoice { path, target }, "cc {cc:?}");
        }
    }

    #[test]
    fn below_8_0_is_rejected_naming_the_minimum() {
        for cc in [(7, 5), (7, 0), (6, 1)] {
            let e = pick(cc, Request::Auto).unwrap_err();
            assert_eq!(e.code, ErrorCode::GpuUnavailable);
            assert!(e.message.contains("8.0 or newer") && e.message.contains(&format!("got {}.{}", cc.0, cc.1)), "{}", e.message);
        }
    }

    #[test]
    fn forced_portable_on_hopper_runs_the_ptx() {
        // No sm_90 cubin of the portable kernels: the forced path JITs the compute_80 PTX.
        assert_eq!(pick((9, 0), Request::Portable).unwrap(), PathChoice { path: PortablePtx, target: "compute_80" });
        assert_eq!(pick((9, 0), Request::Exact(PortablePtx)).unwrap().path, PortablePtx);
        let e = pick((9, 0), Request::Exact(Portable)).unwrap_err();
        assert_eq!(e.code, ErrorCode::KernelsUnavailable);
        assert!(e.message.contains("sm_90") && e.message.contains("'portable-ptx'"), "{}", e.message);
        // Elsewhere forcing portable changes nothing, and the PTX can be asked for.
        assert_eq!(pick((8, 6), Request::Portable).unwrap().target, "sm_86");
        assert_eq!(pick((8, 6), Request::Exact(PortablePtx)).unwrap().target, "compute_80");
        let e = pick((8, 6), Request::Exact(Hopper)).unwrap_err();
        assert_eq!(e.code, ErrorCode::KernelsUnavailable);
        assert!(e.message.contains("9.0") && e.message.contains("8.6"), "{}", e.message);
    }

    #[test]
    fn the_ptx_needs_a_driver_as_new_as_its_compiler() {
        let e = select((10, 0), &full_build(), Request::Auto, Some((12, 8)), MADE_BY).unwrap_err();
        assert_eq!(e.code, ErrorCode::DriverTooOld);
        assert!(e.message.contains("CUDA 12.9 or newer") && e.message.contains("CUDA 12.8"), "{}", e.message);
        // Cubins load on any CUDA 12 driver (minor version compatibility).
        assert_eq!(select((8, 6), &full_build(), Request::Auto, Some((12, 0)), MADE_BY).unwrap().path, Portable);
        assert_eq!(select((10, 0), &full_build(), Request::Auto, Some((12, 9)), MADE_BY).unwrap().path, PortablePtx);
    }

    #[test]
    fn a_partial_build_is_a_typed_error() {
        assert_eq!(select((8, 6), &[], Request::Auto, NEW_DRIVER, MADE_BY).unwrap_err().code, ErrorCode::KernelsUnavailable);
        // A build without the sm_86 decode cubin takes the PTX, never half a path.
        let partial: Vec<_> = full_build().into_iter().filter(|b| *b != (mla_kernels::entries::MLA_DECODE_BF16_M16.module, "sm_86")).collect();
        assert_eq!(select((8, 6), &partial, Request::Auto, NEW_DRIVER, MADE_BY).unwrap().path, PortablePtx);
        let hopper_only: Vec<_> = full_build().into_iter().filter(|b| b.1 == "sm_90a").collect();
        let e = select((8, 9), &hopper_only, Request::Auto, NEW_DRIVER, MADE_BY).unwrap_err();
        assert!(e.code == ErrorCode::KernelsUnavailable && e.message.contains("8.9") && e.message.contains("sm_90a"), "{}", e.message);
    }

    #[test]
    fn env_values() {
        assert_eq!(Request::from_env_value(None).unwrap(), Request::Auto);
        assert_eq!(Request::from_env_value(Some("0")).unwrap(), Request::Auto);
        assert_eq!(Request::from_env_value(Some("1")).unwrap(), Request::Portable);
        assert_eq!(Request::from_env_value(Some("ptx")).unwrap(), Request::Exact(PortablePtx));
        assert_eq!(Request::from_env_value(Some("yes please")).unwrap_err().code, ErrorCode::InvalidArgument);
        for p in [Hopper, Portable, PortablePtx] {
            assert_eq!(KernelPath::parse(p.as_str()), Some(p));
        }
        assert_eq!(cuda_version_of("12.9.86"), Some((12, 9)));
    }

    #[test]
    fn this_build_has_every_path() {
        if !mla_kernels::available() {
            return;
        }
        for (cc, path) in [((8, 0), Portable), ((8, 6), Portable), ((8, 9), Portable), ((9, 0), Hopper), ((10, 0), PortablePtx), ((12, 0), Portable)] {
            assert_eq!(select_for_build(cc, Request::Auto, None).unwrap().path, path, "cc {cc:?}");
        }
        assert_eq!(select_for_build((9, 0), Request::Portable, None).unwrap().path, PortablePtx);
    }
}
