//! Loads the embedded modules of one target (a cubin per module, or the compute_80 PTX,
//! which the driver JIT-compiles) into a context and looks functions up by name.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::error::{ErrorCode, MlaError, Result};

pub struct Kernels {
    /// The target loaded (`sm_90a`, `sm_86`, `compute_80`).
    target: &'static str,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    functions: std::sync::Mutex<HashMap<String, CudaFunction>>,
}

impl Kernels {
    /// Loads every module of `folders` (`common`, `portable`, `sm90`) built for `target`.
    pub fn load(ctx: &Arc<CudaContext>, target: &'static str, folders: &[&str]) -> Result<Kernels> {
        let mut modules = Vec::new();
        for m in mla_kernels::MODULES.iter().filter(|m| m.arch == target && folders.contains(&m.folder())) {
            let image = if m.is_ptx() {
                // cudarc passes it on NUL-terminated; the registry test checks it is text.
                Ptx::from_src(std::str::from_utf8(m.image).expect("the embedded PTX is text"))
            } else {
                Ptx::from_binary(m.image.to_vec())
            };
            let module = ctx.load_module(image).map_err(|e| {
                let what = if m.is_ptx() { "JIT-compiling the PTX of kernel module" } else { "loading kernel module" };
                MlaError::new(ErrorCode::Cuda, format!("{what} {} ({}): {e:?}", m.name, m.arch))
            })?;
            modules.push((m.name, module));
        }
        Ok(Kernels { target, modules, functions: Default::default() })
    }

    /// The target these modules were built for.
    pub fn target(&self) -> &'static str {
        self.target
    }

    /// Whether module `module` has a function `name` (e.g. a tile that only some targets have).
    pub fn has_function(&self, module: &str, name: &str) -> bool {
        self.modules.iter().any(|(n, m)| *n == module && m.load_function(name).is_ok())
    }

    /// The function `name` of module `module` (`<folder>/<file stem>`), with its dynamic
    /// shared memory limit raised to `smem_bytes` when that is above the 48 KiB default.
    pub fn function(&self, module: &str, name: &str, smem_bytes: u32) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap();
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let Some(m) = self.modules.iter().find(|(n, _)| *n == module) else {
            return Err(MlaError::new(
                ErrorCode::KernelsUnavailable,
                format!(
                    "kernel {module}:{name}: module {module} is not loaded on this device (its kernels are the {} builds{})",
                    self.target,
                    if module.starts_with("portable/") { "; MLA_FORCE_PORTABLE=1 opens a Hopper device on the portable kernels" } else { "" }
                ),
            ));
        };
        let f = m.1.load_function(name).map_err(|_| {
            MlaError::new(ErrorCode::KernelsUnavailable, format!("kernel {module}:{name} is not in the {} build of {module}", self.target))
        })?;
        if smem_bytes > 48 * 1024 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )?;
        }
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }
}
