//! Loads the embedded cubins into a context and looks functions up by name.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::error::{ErrorCode, MlaError, Result};

pub struct Kernels {
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    functions: std::sync::Mutex<HashMap<String, CudaFunction>>,
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let mut modules = Vec::new();
        for m in mla_kernels::MODULES {
            let module = ctx.load_module(Ptx::from_binary(m.cubin.to_vec())).map_err(|e| {
                MlaError::new(ErrorCode::Cuda, format!("loading kernel module {}: {e:?}", m.name))
            })?;
            modules.push((m.name, module));
        }
        Ok(Kernels { modules, functions: Default::default() })
    }

    /// The function `name` of module `module` (`<arch>/<file stem>`), with its dynamic
    /// shared memory limit raised to `smem_bytes` when that is above the 48 KiB default.
    pub fn function(&self, module: &str, name: &str, smem_bytes: u32) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap();
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let missing = || MlaError::new(ErrorCode::KernelsUnavailable, format!("kernel {module}:{name} is not in this build"));
        let m = self.modules.iter().find(|(n, _)| *n == module).ok_or_else(missing)?;
        let f = m.1.load_function(name).map_err(|_| missing())?;
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
