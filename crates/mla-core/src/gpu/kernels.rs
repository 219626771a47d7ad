//! Loads the embedded modules of one target (a cubin per module, or the compute_80 PTX,
//! which the driver JIT-compiles) into a context and looks entry points up by their typed
//! [`Entry`] (`mla_kernels::entries`), with the dynamic shared memory the kernel declares.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use mla_kernels::{Entry, Module};

use crate::error::{ErrorCode, MlaError, Result};

pub struct Kernels {
    /// The target loaded (`sm_90a`, `sm_86`, `compute_80`).
    target: &'static str,
    modules: Vec<(&'static Module, Arc<CudaModule>)>,
    functions: std::sync::Mutex<HashMap<&'static str, (CudaFunction, u32)>>,
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
            modules.push((m, module));
        }
        Ok(Kernels { target, modules, functions: Default::default() })
    }

    /// The target these modules were built for.
    pub fn target(&self) -> &'static str {
        self.target
    }

    /// Whether the loaded modules have entry `e` (e.g. a tile that only some targets have).
    pub fn has(&self, e: Entry) -> bool {
        self.modules.iter().any(|(n, m)| n.name == e.module && m.load_function(e.name).is_ok())
    }

    /// The dynamic shared memory entry `e` is launched with, as the kernel declares it
    /// (`MLA_ENTRY_SMEM`, read by the build); 0 for an entry without any, None when its
    /// module is not loaded.
    pub fn smem(&self, e: Entry) -> Option<u32> {
        let (m, _) = self.modules.iter().find(|(n, _)| n.name == e.module)?;
        Some(m.dynamic_smem(e.name).unwrap_or(0))
    }

    /// Entry `e` and the dynamic shared memory it is launched with (its function's limit
    /// raised to that when above the 48 KiB default).
    pub fn function(&self, e: Entry) -> Result<(CudaFunction, u32)> {
        let (module, name) = (e.module, e.name);
        let mut cache = self.functions.lock().unwrap();
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let Some(m) = self.modules.iter().find(|(n, _)| n.name == module) else {
            return Err(MlaError::new(
                ErrorCode::KernelsUnavailable,
                format!(
                    "kernel {module}:{name}: module {module} is not loaded on this device (its kernels are the {} builds{})",
                    self.target,
                    if module.starts_with("portable/") { "; MLA_FORCE_PORTABLE=1 opens a Hopper device on the portable kernels" } else { "" }
                ),
            ));
        };
        let smem_bytes = m.0.dynamic_smem(name).unwrap_or(0);
        let f =
            m.1.load_function(name)
                .map_err(|_| MlaError::new(ErrorCode::KernelsUnavailable, format!("kernel {module}:{name} is not in the {} build of {module}", self.target)))?;
        if smem_bytes > 48 * 1024 {
            f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes as i32)?;
        }
        cache.insert(name, (f.clone(), smem_bytes));
        Ok((f, smem_bytes))
    }

    /// The per-phase clock sums of a timing build (`kernels/sm90/phase_clock.cuh`, built with
    /// `MLA_NVCC_FLAGS=-DMLA_PHASE_TIMING=1`): `module`'s `mla_phase_clock` (3 roles x 16
    /// slots, the last of each a count), zeroed once read. None for a module without it:
    /// every production build.
    pub fn take_phase_clock(&self, module: &str, stream: &Arc<CudaStream>) -> Result<Option<Vec<u64>>> {
        let Some((_, m)) = self.modules.iter().find(|(n, _)| n.name == module) else { return Ok(None) };
        let Ok(global) = m.get_global("mla_phase_clock", stream) else { return Ok(None) };
        let (ptr, _guard) = global.device_ptr(stream);
        let mut sums = vec![0u64; global.len() / 8];
        unsafe {
            result::memcpy_dtoh_async(&mut sums, ptr, stream.cu_stream())?;
            result::memset_d8_async(ptr, 0, global.len(), stream.cu_stream())?;
        }
        stream.synchronize()?;
        Ok(Some(sums))
    }
}
