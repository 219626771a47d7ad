//! The CUDA compiler: finding nvcc, or NVRTC + ptxas (NVRTC loaded at build time), and their versions.

use super::*;

/// The compiler: a toolkit's nvcc, or NVRTC + ptxas (then `path` is ptxas).
pub struct Nvcc {
    pub path: PathBuf,
    pub how: &'static str,
    /// libnvrtc for the NVRTC route.
    pub nvrtc: Option<PathBuf>,
    /// The CUDA headers (NVRTC route).
    pub include: PathBuf,
}

impl Nvcc {
    pub fn nvcc(path: PathBuf, how: &'static str) -> Nvcc {
        Nvcc { path, how, nvrtc: None, include: PathBuf::new() }
    }
}

/// $MLA_NVCC; the CUDA folder ($MLA_CUDA_DIR, else <root>/.cuda) with bin/nvcc or with
/// NVRTC + ptxas; $CUDA_HOME/bin/nvcc; nvcc on PATH. An explicit MLA_NVCC or MLA_CUDA_DIR
/// that does not hold a compiler means "not found" (it is not skipped).
pub fn find_compiler(repo: Option<&Path>) -> Result<Nvcc, String> {
    if let Some(p) = env::var_os("MLA_NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) { Ok(Nvcc::nvcc(p, "MLA_NVCC")) } else { Err(format!("MLA_NVCC={} (no such executable)", p.display())) };
    }
    let mut looked = vec!["MLA_NVCC (unset)".to_string()];
    let explicit = env::var_os("MLA_CUDA_DIR").filter(|p| !p.is_empty());
    let cuda_dir = match &explicit {
        Some(d) => Some((PathBuf::from(d), "MLA_CUDA_DIR")),
        None => repo.map(|r| (r.join(".cuda"), "repo .cuda")),
    };
    if let Some((dir, how)) = cuda_dir {
        if is_executable(&dir.join("bin/nvcc")) {
            return Ok(Nvcc::nvcc(dir.join("bin/nvcc"), how));
        }
        let (ptxas, lib) = (dir.join("bin/ptxas"), dir.join("lib/libnvrtc.so.12"));
        if is_executable(&ptxas) && lib.is_file() {
            return Ok(Nvcc { path: ptxas, how, nvrtc: Some(lib), include: dir.join("include") });
        }
        if explicit.is_some() {
            return Err(format!("MLA_CUDA_DIR={} (neither bin/nvcc nor bin/ptxas + lib/libnvrtc.so.12)", dir.display()));
        }
        looked.push(format!("{} (bin/nvcc, or bin/ptxas + lib/libnvrtc.so.12)", dir.display()));
    } else {
        looked.push("MLA_CUDA_DIR (unset)".to_string());
    }
    match env::var_os("CUDA_HOME").filter(|p| !p.is_empty()) {
        Some(h) => {
            let p = PathBuf::from(h).join("bin/nvcc");
            if is_executable(&p) {
                return Ok(Nvcc::nvcc(p, "CUDA_HOME"));
            }
            looked.push(p.display().to_string());
        }
        None => looked.push("$CUDA_HOME/bin/nvcc (CUDA_HOME unset)".to_string()),
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_executable(&p) {
                return Ok(Nvcc::nvcc(p, "PATH"));
            }
        }
    }
    looked.push("PATH".to_string());
    Err(looked.join(", "))
}

/// NVRTC's C API, loaded at build time from the toolkit folder (no link-time dependency:
/// a build without CUDA must not need libnvrtc).
pub struct Nvrtc {
    pub _lib: libloading::Library,
    pub version: (i32, i32),
    pub create: unsafe extern "C" fn(*mut *mut c_void, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> c_int,
    pub compile: unsafe extern "C" fn(*mut c_void, c_int, *const *const c_char) -> c_int,
    pub log_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    pub log: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    pub ptx_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    pub ptx: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    pub destroy: unsafe extern "C" fn(*mut *mut c_void) -> c_int,
}

impl Nvrtc {
    pub fn load(path: &Path) -> Result<Nvrtc, String> {
        // SAFETY: libnvrtc's initialisers have no preconditions; the symbols below have the
        // signatures of nvrtc.h (CUDA 12).
        unsafe {
            let lib = libloading::Library::new(path).map_err(|e| e.to_string())?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name).map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?
                };
            }
            let version_fn: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int = sym!(b"nvrtcVersion\0");
            let mut version = (0, 0);
            version_fn(&mut version.0, &mut version.1);
            Ok(Nvrtc {
                version,
                create: sym!(b"nvrtcCreateProgram\0"),
                compile: sym!(b"nvrtcCompileProgram\0"),
                log_size: sym!(b"nvrtcGetProgramLogSize\0"),
                log: sym!(b"nvrtcGetProgramLog\0"),
                ptx_size: sym!(b"nvrtcGetPTXSize\0"),
                ptx: sym!(b"nvrtcGetPTX\0"),
                destroy: sym!(b"nvrtcDestroyProgram\0"),
                _lib: lib,
            })
        }
    }

    /// CUDA C++ -> PTX text, and NVRTC's log (warnings).
    pub fn to_ptx(&self, src: &Path, opts: &[String]) -> Result<(Vec<u8>, String), String> {
        let code =
            CString::new(fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?).map_err(|_| format!("{}: NUL byte in the source", src.display()))?;
        let name = CString::new(src.to_string_lossy().into_owned()).unwrap();
        let copts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
        let ptrs: Vec<*const c_char> = copts.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: every pointer handed to NVRTC outlives the program, which is destroyed
        // before returning; buffers are sized by NVRTC's own size queries.
        unsafe {
            let mut prog: *mut c_void = std::ptr::null_mut();
            let rc = (self.create)(&mut prog, code.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null());
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram failed ({rc})"));
            }
            let rc = (self.compile)(prog, ptrs.len() as c_int, ptrs.as_ptr());
            let mut n = 0usize;
            (self.log_size)(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            (self.log)(prog, log.as_mut_ptr().cast());
            let log = String::from_utf8_lossy(log.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
            let result = if rc == 0 {
                (self.ptx_size)(prog, &mut n);
                let mut ptx = vec![0u8; n.max(1)];
                (self.ptx)(prog, ptx.as_mut_ptr().cast());
                ptx.truncate(ptx.iter().position(|&b| b == 0).unwrap_or(ptx.len()));
                Ok((ptx, log))
            } else {
                Err(format!("$ nvrtc {} {}\n{log}", opts.join(" "), src.display()))
            };
            (self.destroy)(&mut prog);
            result
        }
    }
}

pub fn is_executable(p: &Path) -> bool {
    match fs::metadata(p) {
        #[cfg(unix)]
        Ok(m) => {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        }
        #[cfg(not(unix))]
        Ok(m) => m.is_file(),
        Err(_) => false,
    }
}

/// ("12.9.86", whole `nvcc --version` or `ptxas --version` text).
pub fn nvcc_version(nvcc: &Path) -> Result<(String, String), String> {
    let out = Command::new(nvcc).arg("--version").output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("`nvcc --version` exited with {}: {}", out.status, text.trim()));
    }
    let v = text
        .lines()
        .find_map(|l| l.split(", V").nth(1).filter(|_| l.contains("release")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| text.lines().last().unwrap_or("").trim().to_string());
    Ok((v, text))
}
