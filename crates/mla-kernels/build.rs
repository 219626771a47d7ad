//! Compiles `<repo root>/kernels/<folder>/<stage>/*.cu` for the targets of [`FOLDERS`] (cubins for
//! real architectures, PTX for a virtual one) and generates `OUT_DIR/registry.rs` (the
//! `MODULES` table, `UNAVAILABLE_REASON`, `NVCC_VERSION`, `COMPILER`).
//!
//! One job per (source, virtual architecture): NVRTC makes the PTX once (`-arch=compute_XX`),
//! then ptxas makes each cubin of that virtual architecture; a PTX target embeds that PTX
//! text as it is (the driver JIT-compiles it at load time). With nvcc, one nvcc run per target.
//!
//! Prebuilt cubins: `prebuilt/` (made by `scripts/prebuild-kernels.sh`, part of `npm run
//! package`, shipped in the packaged crate) holds the cubins of a release build, the
//! sources they came from and `MANIFEST.txt`. A packaged crate has no repository around
//! it: it embeds those cubins, with no compiler needed, unless `MLA_KERNELS_REBUILD=1` (or
//! MLA_NVCC, MLA_NVCC_FLAGS, MLA_PTXAS_FLAGS is set), which compiles the snapshot in
//! `prebuilt/kernels`. In the repository a compiler, when found, always builds kernels/;
//! prebuilt cubins serve there only without one, and only while they match the sources.
//!
//! The compiler is looked for, in order: `$MLA_NVCC` (a toolkit's nvcc); the CUDA folder
//! `$MLA_CUDA_DIR`, else `<repo root>/.cuda` (made by `scripts/install-cuda.sh`), which holds
//! either `bin/nvcc` or NVRTC + ptxas (`lib/libnvrtc.so.12`, `bin/ptxas`: the CUDA 12.x
//! wheels carry no nvcc, so the kernels go CUDA C++ -> PTX with NVRTC, then PTX -> cubin with
//! ptxas, the device half of what nvcc does); `$CUDA_HOME/bin/nvcc`; `nvcc` on `PATH`.
//! Without a compiler the build succeeds with an empty registry (CPU-only). With one, a
//! kernel that fails to compile fails the build, unless `MLA_ALLOW_KERNEL_FAILURE=1` (then:
//! CPU-only, and `UNAVAILABLE_REASON` says why).
//!
//! ptxas's reports (registers, shared memory, spills per kernel) go to `OUT_DIR/ptxas.log`
//! and `<target>/<profile>/mla-kernels-ptxas.log`; `MLA_VERBOSE_BUILD=1` also prints them.
//! Only real warnings are cargo warnings: a spilling kernel, ptxas and compiler warnings.
//! The build fails when a `_ws` / `_tma` / `_m16` / `_m32` kernel spills or ptxas serialises wgmma (C7510,
//! C7512, C7519, C7520), except the known cases of `KNOWN_WGMMA_WARNINGS`;
//! `MLA_ALLOW_KERNEL_WARNINGS=1` makes those warnings.
//!
//! Other knobs: `MLA_NVCC_FLAGS` appends flags (space-separated) to every nvcc command line
//! (with NVRTC: to its options); `MLA_PTXAS_FLAGS` appends flags to ptxas (NVRTC route).
//! Each module is cached in OUT_DIR under a hash of its inputs (source, every header under
//! kernels/, the compiler and its version, flags), so a rerun only recompiles what changed.

use std::collections::BTreeMap;
use std::env;
use std::ffi::{c_char, c_int, c_void, CString};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

#[path = "build/entries.rs"]
mod entries;

/// The entry points read from the sources (set once in main), for the check of what was built.
static ENTRY_TABLE: std::sync::OnceLock<entries::Entries> = std::sync::OnceLock::new();

/// Fails the build when the compiled modules' entry points and the sources' disagree.
fn check_entries(built: &[Built]) {
    let Some(table) = ENTRY_TABLE.get() else { return };
    let have: Vec<(String, String, Vec<String>)> = built
        .iter()
        .map(|b| {
            let ptx = b.arch.starts_with("compute_").then(|| fs::read_to_string(&b.image).unwrap_or_default());
            (b.name.clone(), b.arch.to_string(), entries::compiled(&b.report, ptx.as_deref()))
        })
        .collect();
    let errors = entries::check(table, &have);
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        std::process::exit(1);
    }
}

/// One thing a source is built into.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Target {
    /// Value of `Module::arch`: the real architecture of a cubin (`sm_86`), or the virtual
    /// architecture of embedded PTX (`compute_80`).
    arch: &'static str,
    /// The virtual architecture the PTX is generated for (`__CUDA_ARCH__` of the source).
    virtual_arch: &'static str,
}

impl Target {
    const fn cubin(arch: &'static str, virtual_arch: &'static str) -> Target {
        Target { arch, virtual_arch }
    }
    const fn ptx(virtual_arch: &'static str) -> Target {
        Target { arch: virtual_arch, virtual_arch }
    }
    fn is_ptx(&self) -> bool {
        self.arch.starts_with("compute_")
    }
}

const SM_80: Target = Target::cubin("sm_80", "compute_80"); // A100, A30
const SM_86: Target = Target::cubin("sm_86", "compute_86"); // RTX 30xx, A40, A6000, A10
const SM_89: Target = Target::cubin("sm_89", "compute_89"); // RTX 40xx, L4, L40S, RTX 6000 Ada
const SM_90A: Target = Target::cubin("sm_90a", "compute_90a"); // H100, H200 (wgmma, TMA, setmaxnreg)
const SM_120: Target = Target::cubin("sm_120", "compute_120"); // RTX 50xx, RTX PRO 6000 Blackwell
/// For every GPU of compute capability >= 8.0 without a cubin of its own (B200 and other
/// newer parts), and for the forced portable path on Hopper.
const PTX_80: Target = Target::ptx("compute_80");

/// A folder under `kernels/` and what each of its `*.cu` files is built for. Each
/// (file, target) is one `Module`. A folder with `.cu` files and no row is skipped with a
/// warning.
struct Folder {
    dir: &'static str,
    targets: &'static [Target],
}

const FOLDERS: &[Folder] = &[
    // Plan, combine, cache append, test helpers: every path needs them.
    Folder { dir: "common", targets: &[SM_80, SM_86, SM_89, SM_90A, SM_120, PTX_80] },
    // The cp.async + mma.sync decode. Not for sm_90a: Hopper runs the sm90/ kernels, and
    // the forced portable path there runs this folder's compute_80 PTX.
    Folder { dir: "portable", targets: &[SM_80, SM_86, SM_89, SM_120, PTX_80] },
    Folder { dir: "sm90", targets: &[SM_90A] },
];

/// Where a module's image lies, relative to OUT_DIR (and to prebuilt/):
/// `<folder>/<stem>.<arch>.cubin`, or `.ptx` for a PTX target.
fn image_rel(name: &str, arch: &str) -> String {
    let ext = if arch.starts_with("compute_") { "ptx" } else { "cubin" };
    format!("{name}.{arch}.{ext}")
}
/// ptxas's report of a module, next to its image.
fn report_rel(name: &str, arch: &str) -> String {
    format!("{name}.{arch}.ptxas.txt")
}
/// The report stored for a PTX target (no ptxas runs for it here).
fn ptx_note(name: &str, arch: &str) -> String {
    format!("{arch} PTX of {name}: compiled by the driver when the module is loaded; ptxas's report of the same PTX is the sm_80 module's\n")
}

/// nvcc flags for every kernel (then `-cubin -Xptxas -v`, or `-ptx`). No fast math:
/// precision matters (see the accuracy contract).
const COMMON_FLAGS: &[&str] = &["-O3", "-std=c++17", "-lineinfo"];
/// The same with NVRTC, then ptxas (NVRTC has no -O: it always optimises).
const NVRTC_FLAGS: &[&str] = &["-std=c++17", "--generate-line-info"];
const PTXAS_FLAGS: &[&str] = &["-O3", "-v", "--generate-line-info"];

/// Extensions of files that any kernel may include (all of them under kernels/ are
/// dependencies of every module).
const HEADER_EXTS: &[&str] = &["cuh", "h", "hpp", "inc", "inl"];

/// Environment variables that change what gets built.
const TRACKED_ENV: &[&str] = &[
    "MLA_KERNELS_REBUILD",
    "MLA_VERBOSE_BUILD",
    "MLA_ALLOW_KERNEL_WARNINGS",
    "MLA_NVCC",
    "MLA_CUDA_DIR",
    "MLA_PTXAS_FLAGS",
    "CUDA_HOME",
    "MLA_NVCC_FLAGS",
    "MLA_KERNELS_VERBOSE",
    "MLA_ALLOW_KERNEL_FAILURE",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
    "NVCC_CCBIN",
];

/// The prebuilt cubins inside this crate (filled by scripts/prebuild-kernels.sh, shipped
/// in the packaged crate, git-ignored): `MANIFEST.txt`, `<folder>/<stem>.<arch>.cubin` (or
/// `.ptx`) and `.ptxas.txt` as in OUT_DIR, and `kernels/`, the sources they were built from.
const PREBUILT_DIR: &str = "prebuilt";
const MANIFEST: &str = "MANIFEST.txt";

/// Any of these set: compile the kernels even where prebuilt cubins match the sources
/// (asking for a compiler or its flags means wanting it used).
const REBUILD_ENV: &[&str] = &["MLA_KERNELS_REBUILD", "MLA_NVCC", "MLA_NVCC_FLAGS", "MLA_PTXAS_FLAGS"];

/// ptxas's notes that wgmma.mma_async instructions were serialised (each wgmma then waits
/// for the previous one: the kernel loses its tensor-core overlap). A build fails on them.
const WGMMA_SERIALISATION: &[&str] = &["C7510", "C7512", "C7519", "C7520"];

/// Existing kernels known to trip [`WGMMA_SERIALISATION`], allowed as warnings until the
/// kernel engineer replaces them: (entry function, the ptxas codes allowed for it). Remove
/// a row once its kernel trips none of them (the build says so).
const KNOWN_WGMMA_WARNINGS: &[(&str, &[&str])] = &[];

/// Entry functions whose name contains one of these must not spill (the decode kernels:
/// wgmma, TMA and the portable m16 / m32, where a spill means local-memory traffic in the
/// main loop), on every target.
const NO_SPILL_MARKERS: &[&str] = &["_ws", "_tma", "_m16", "_m32"];

/// One source for one virtual architecture, and the targets made from that PTX.
struct Job {
    name: String, // "portable/decode/mla_decode"
    src: PathBuf,
    /// NVRTC's PTX (NVRTC route): `<stem>.<virtual arch>.ptx`, which is also the image of
    /// a PTX target.
    ptx: PathBuf,
    outputs: Vec<Output>,
    stamp: PathBuf,
    /// nvcc's arguments without the target ones, or NVRTC's options (NVRTC route).
    args: Vec<String>,
    hash: String,
}

struct Output {
    target: Target,
    image: PathBuf,
    report: PathBuf,
    /// ptxas's arguments (NVRTC route, cubins).
    ptxas_args: Vec<String>,
}

struct Built {
    name: String,
    arch: &'static str,
    /// The cubin, or the PTX text of a PTX target.
    image: PathBuf,
    report: String,
    /// Compiler diagnostics other than ptxas's info lines (warnings).
    diagnostics: Vec<String>,
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.join("../..").canonicalize().unwrap_or_else(|_| manifest.join("../.."));
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let prebuilt_dir = manifest.join(PREBUILT_DIR);
    // Inside the repository the sources are <root>/kernels; a packaged crate (crates.io,
    // `cargo package`) has no repository around it and carries a snapshot of them in
    // prebuilt/kernels, next to the cubins built from them.
    let in_repo = root.join("kernels").is_dir() && root.join("crates/mla-kernels").canonicalize().ok() == manifest.canonicalize().ok();
    let kernels_dir = if in_repo { root.join("kernels") } else { prebuilt_dir.join("kernels") };

    println!("cargo:rerun-if-changed=build.rs");
    for v in TRACKED_ENV {
        println!("cargo:rerun-if-env-changed={v}");
    }
    // Directories are scanned recursively by cargo (new or removed files count); every file
    // is also named, as the contract asks. prebuilt/ is not watched in the repository:
    // `npm run package` fills it from this build's own output, which must not make the
    // next build rerun (the registry it would write is the same).
    if kernels_dir.is_dir() {
        println!("cargo:rerun-if-changed={}", kernels_dir.display());
        for f in walk(&kernels_dir) {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }

    // The entry points, from the sources: the typed constants are generated whether or not
    // a compiler is found (a CPU-only build compiles the same launcher code).
    let cu: Vec<PathBuf> = FOLDERS.iter().flat_map(|f| list_cu(&kernels_dir.join(f.dir))).collect();
    if cu.is_empty() {
        eprintln!("error: no kernel sources under {} (the repository's kernels/, or a packaged crate's prebuilt/kernels)", kernels_dir.display());
        std::process::exit(1);
    }
    let entry_table = entries::scan_dir(&kernels_dir, &cu).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1);
    });
    entries::write(&out_dir, &entry_table);
    ENTRY_TABLE.set(entry_table).ok();

    let sources = sources_hash(&kernels_dir);
    let rebuild_why = REBUILD_ENV.iter().find(|v| env::var_os(v).is_some_and(|x| !x.is_empty() && x != "0"));
    // In the repository a compiler, when there is one, always builds (prebuilt/ is only a
    // packaging output there); elsewhere prebuilt cubins are used unless a rebuild is asked.
    let compile_here = rebuild_why.is_some() || (in_repo && find_compiler(Some(&root)).is_ok());
    if !compile_here {
        match load_prebuilt(&prebuilt_dir, &sources) {
            Ok(p) => return use_prebuilt(&out_dir, &p, &sources),
            // Only worth a word when there were prebuilt cubins to use.
            Err(why) if prebuilt_dir.join(MANIFEST).is_file() => {
                println!("cargo:warning=prebuilt cubins in {} not used ({why})", prebuilt_dir.display());
            }
            Err(_) => {}
        }
    }
    compile_kernels(in_repo.then_some(root.as_path()), &manifest, &kernels_dir, &out_dir, &sources);
}

/// Compiles every kernel (or takes it from the per-module cache in OUT_DIR).
/// `repo`: the repository root, when this crate sits in it (its .cuda/ is then looked at).
fn compile_kernels(repo: Option<&Path>, manifest: &Path, kernels_dir: &Path, out_dir: &Path, sources: &str) {
    let (manifest, kernels_dir) = (manifest.to_path_buf(), kernels_dir.to_path_buf());
    let out_dir = out_dir.to_path_buf();
    let nvrtc_dir = manifest.join("nvrtc");
    println!("cargo:rerun-if-changed={}", nvrtc_dir.display());
    let nvcc = match find_compiler(repo) {
        Ok(n) => n,
        Err(looked) if env_flag("MLA_KERNELS_REBUILD") => {
            let reason = format!("MLA_KERNELS_REBUILD=1 but no CUDA compiler was found (looked in {looked})");
            fail_or_degrade(env_flag("MLA_ALLOW_KERNEL_FAILURE"), &out_dir, &reason, "", &[]);
            return;
        }
        Err(looked) => {
            let reason = format!("no CUDA compiler found (looked in {looked}): building without GPU kernels; run scripts/install-cuda.sh");
            println!("cargo:warning={reason}");
            // Only existing paths may be watched (a missing one reruns this script, and
            // rebuilds every dependent crate, on every build), so nothing is watched for a
            // later install: scripts/install-cuda.sh touches this build.rs instead.
            println!("cargo:available=0");
            write_registry(&out_dir, &[], &reason, "", "");
            write_manifest(&out_dir, &[], sources, "", "");
            return;
        }
    };
    println!("cargo:rerun-if-changed={}", nvcc.path.display());
    let nvrtc = match &nvcc.nvrtc {
        None => None,
        Some(lib) => {
            println!("cargo:rerun-if-changed={}", lib.display());
            match Nvrtc::load(lib) {
                Ok(n) => Some(n),
                Err(e) => {
                    let allow = env_flag("MLA_ALLOW_KERNEL_FAILURE");
                    fail_or_degrade(allow, &out_dir, &format!("NVRTC at {} does not load: {e}", lib.display()), "", &[]);
                    return;
                }
            }
        }
    };
    let allow_failure = env_flag("MLA_ALLOW_KERNEL_FAILURE");

    let (version, mut version_text) = match nvcc_version(&nvcc.path) {
        Ok(v) => v,
        Err(e) => {
            let reason = format!("{} at {} ({}) does not run: {e}", if nvrtc.is_some() { "ptxas" } else { "nvcc" }, nvcc.path.display(), nvcc.how);
            fail_or_degrade(allow_failure, &out_dir, &reason, "", &[]);
            return;
        }
    };
    println!("cargo:nvcc_version={version}");
    let compiler = match &nvrtc {
        Some(n) => {
            version_text.push_str(&format!("\nnvrtc {}.{}", n.version.0, n.version.1));
            format!("NVRTC {}.{} + ptxas {version} ({})", n.version.0, n.version.1, nvcc.how)
        }
        None => format!("nvcc {version} ({})", nvcc.how),
    };
    let nvrtc_headers_hash = {
        let mut h = Fnv::new();
        for f in walk(&nvrtc_dir) {
            h.str(&f.to_string_lossy());
            h.bytes(&fs::read(&f).unwrap_or_default());
        }
        h.finish()
    };
    let ptxas_extra: Vec<String> = env::var("MLA_PTXAS_FLAGS").unwrap_or_default().split_whitespace().map(String::from).collect();

    // Collect the sources, one job per .cu file.
    let headers_hash = {
        let mut h = Fnv::new();
        for f in walk(&kernels_dir) {
            if f.extension().and_then(|e| e.to_str()).is_some_and(|e| HEADER_EXTS.contains(&e)) {
                h.str(&f.to_string_lossy());
                h.bytes(&fs::read(&f).unwrap_or_default());
            }
        }
        h.finish()
    };
    let extra_flags: Vec<String> = env::var("MLA_NVCC_FLAGS").unwrap_or_default().split_whitespace().map(String::from).collect();
    let mut jobs = Vec::new();
    let mut sizes = Vec::new();
    for folder in FOLDERS {
        let dir = kernels_dir.join(folder.dir);
        let srcs: Vec<PathBuf> = list_cu(&dir);
        // The virtual architectures of this folder, in table order.
        let mut virtuals: Vec<&'static str> = Vec::new();
        for t in folder.targets {
            if !virtuals.contains(&t.virtual_arch) {
                virtuals.push(t.virtual_arch);
            }
        }
        for src in srcs {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            let name = entries::module_name(&kernels_dir, &src);
            let out = out_dir.join(&name).parent().unwrap().to_path_buf();
            fs::create_dir_all(&out).unwrap();
            for &va in &virtuals {
                let mut args: Vec<String> = Vec::new();
                if nvrtc.is_some() {
                    args.push(format!("--gpu-architecture={va}"));
                    args.extend(NVRTC_FLAGS.iter().map(|s| s.to_string()));
                    // Stand-ins for the host headers nvcc includes and NVRTC lacks.
                    args.push(format!("--pre-include={}", nvrtc_dir.join("mla_nvrtc_prelude.h").display()));
                } else {
                    args.extend(COMMON_FLAGS.iter().map(|s| s.to_string()));
                }
                // The source's own folder, its architecture folder's headers, then the
                // shared ones (sm90/decode/*.cu include "mla_common.cuh" and "tma.cuh" by
                // bare name).
                args.push(format!("-I{}", src.parent().unwrap().display()));
                args.push(format!("-I{}", dir.display()));
                args.push(format!("-I{}", kernels_dir.join("common").display()));
                args.push(format!("-I{}", kernels_dir.display()));
                if nvrtc.is_some() {
                    args.push(format!("-I{}", nvrtc_dir.display()));
                    args.push(format!("-I{}", nvcc.include.display()));
                }
                args.extend(extra_flags.iter().cloned());
                let outputs: Vec<Output> = folder
                    .targets
                    .iter()
                    .filter(|t| t.virtual_arch == va)
                    .map(|&t| {
                        let mut ptxas_args = Vec::new();
                        if !t.is_ptx() {
                            ptxas_args.push(format!("-arch={}", t.arch));
                            ptxas_args.extend(PTXAS_FLAGS.iter().map(|s| s.to_string()));
                            ptxas_args.extend(ptxas_extra.iter().cloned());
                        }
                        Output { target: t, image: out_dir.join(image_rel(&name, t.arch)), report: out_dir.join(report_rel(&name, t.arch)), ptxas_args }
                    })
                    .collect();
                let mut h = Fnv::new();
                for o in &outputs {
                    h.str(o.target.arch);
                    for a in &o.ptxas_args {
                        h.str(a);
                    }
                }
                h.str(&nvrtc_headers_hash);
                h.str(&nvcc.path.to_string_lossy());
                h.str(&version_text);
                for a in &args {
                    h.str(a);
                }
                for v in ["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN"] {
                    h.str(&env::var(v).unwrap_or_default());
                }
                h.str(&headers_hash);
                h.str(&src.to_string_lossy());
                h.bytes(&fs::read(&src).unwrap_or_default());
                sizes.push(fs::metadata(&src).map(|m| m.len()).unwrap_or(0));
                jobs.push(Job {
                    ptx: out.join(format!("{stem}.{va}.ptx")),
                    stamp: out.join(format!("{stem}.{va}.stamp")),
                    name: name.clone(),
                    src: src.clone(),
                    outputs,
                    args,
                    hash: h.finish(),
                });
            }
        }
    }
    // Folders with sources but no FOLDERS row are not built: say so.
    if let Ok(rd) = fs::read_dir(&kernels_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && !FOLDERS.iter().any(|f| f.dir == name) && !list_cu(&e.path()).is_empty() {
                println!("cargo:warning=kernels/{name}/ has .cu files but no row in crates/mla-kernels/build.rs FOLDERS: not built");
            }
        }
    }

    // Compile in parallel, largest source first (it is likely the slowest).
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let workers = env::var("NUM_JOBS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
        .clamp(1, jobs.len().max(1));
    let queue = Mutex::new(order.into_iter());
    let results: Vec<Mutex<Option<Result<Vec<Built>, String>>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let next = queue.lock().unwrap().next();
                let Some(i) = next else { break };
                let r = match &nvrtc {
                    Some(n) => compile_nvrtc(n, &nvcc.path, &jobs[i]),
                    None => compile(&nvcc.path, &jobs[i]),
                };
                *results[i].lock().unwrap() = Some(r);
            });
        }
    });

    let mut built = Vec::new();
    let mut failures = Vec::new();
    for (job, r) in jobs.iter().zip(results) {
        match r.into_inner().unwrap().expect("every job ran") {
            Ok(b) => built.extend(b),
            Err(out) => failures.push((job.name.clone(), out)),
        }
    }

    if !failures.is_empty() {
        let names: Vec<&str> = failures.iter().map(|(n, _)| n.as_str()).collect();
        let reason = format!("kernel(s) {} failed to compile with {compiler} ({})", names.join(", "), nvcc.path.display());
        fail_or_degrade(allow_failure, &out_dir, &reason, &version, &failures);
        return;
    }

    report(&out_dir, &built, &compiler, true);
    check_entries(&built);
    println!("cargo:available={}", if built.is_empty() { 0 } else { 1 });
    let reason = if built.is_empty() { format!("no kernel sources (*.cu) found under {}", kernels_dir.display()) } else { String::new() };
    write_registry(&out_dir, &built, &reason, &version, &compiler);
    write_manifest(&out_dir, &built, sources, &version, &compiler);
}

/// A kernel failed (or nvcc does not run): fail the build with nvcc's output, or, with
/// MLA_ALLOW_KERNEL_FAILURE=1, build without GPU kernels.
fn fail_or_degrade(allow: bool, out_dir: &Path, reason: &str, version: &str, failures: &[(String, String)]) {
    if allow {
        let reason = format!("{reason}; building without GPU kernels (MLA_ALLOW_KERNEL_FAILURE=1)");
        println!("cargo:warning={reason}");
        for (name, out) in failures {
            for line in out.lines().filter(|l| l.contains("error")).take(20) {
                println!("cargo:warning={name}: {line}");
            }
        }
        println!("cargo:available=0");
        write_registry(out_dir, &[], &reason, version, "");
        write_manifest(out_dir, &[], "", version, "");
        return;
    }
    for (name, out) in failures {
        eprintln!("==== compiler output for {name} ====\n{out}");
    }
    eprintln!("error: {reason}.\nA broken kernel does not silently make a CPU-only build; set MLA_ALLOW_KERNEL_FAILURE=1 to build without GPU kernels anyway.");
    std::process::exit(1);
}

/// The compiler: a toolkit's nvcc, or NVRTC + ptxas (then `path` is ptxas).
struct Nvcc {
    path: PathBuf,
    how: &'static str,
    /// libnvrtc for the NVRTC route.
    nvrtc: Option<PathBuf>,
    /// The CUDA headers (NVRTC route).
    include: PathBuf,
}

impl Nvcc {
    fn nvcc(path: PathBuf, how: &'static str) -> Nvcc {
        Nvcc { path, how, nvrtc: None, include: PathBuf::new() }
    }
}

/// $MLA_NVCC; the CUDA folder ($MLA_CUDA_DIR, else <root>/.cuda) with bin/nvcc or with
/// NVRTC + ptxas; $CUDA_HOME/bin/nvcc; nvcc on PATH. An explicit MLA_NVCC or MLA_CUDA_DIR
/// that does not hold a compiler means "not found" (it is not skipped).
fn find_compiler(repo: Option<&Path>) -> Result<Nvcc, String> {
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
struct Nvrtc {
    _lib: libloading::Library,
    version: (i32, i32),
    create: unsafe extern "C" fn(*mut *mut c_void, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> c_int,
    compile: unsafe extern "C" fn(*mut c_void, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    log: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    ptx_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    ptx: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut *mut c_void) -> c_int,
}

impl Nvrtc {
    fn load(path: &Path) -> Result<Nvrtc, String> {
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
    fn to_ptx(&self, src: &Path, opts: &[String]) -> Result<(Vec<u8>, String), String> {
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

fn is_executable(p: &Path) -> bool {
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
fn nvcc_version(nvcc: &Path) -> Result<(String, String), String> {
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

/// nvcc route: one nvcc run per target (`-cubin` with ptxas's report, or `-ptx`).
fn compile(nvcc: &Path, job: &Job) -> Result<Vec<Built>, String> {
    if let Some(b) = cached(job) {
        return Ok(b);
    }
    let _ = fs::remove_file(&job.stamp);
    // The PTX of the job's virtual architecture first: the entries' MLA_ENTRY_SMEM constants
    // are read from it (finish_output), as on the NVRTC route.
    let va = job.outputs[0].target.virtual_arch;
    let mut args: Vec<String> = vec!["-ptx".into(), format!("-arch={va}")];
    args.extend(job.args.iter().cloned());
    let out = Command::new(nvcc).args(&args).arg(&job.src).arg("-o").arg(&job.ptx).output().map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        return Err(format!("$ {} {} {} -o {}\n{}", nvcc.display(), args.join(" "), job.src.display(), job.ptx.display(), text));
    }
    let mut built = Vec::new();
    for o in &job.outputs {
        let t = o.target;
        let tmp = o.image.with_extension("tmp");
        let mut args: Vec<String> = if t.is_ptx() {
            vec!["-ptx".into(), format!("-arch={}", t.virtual_arch)]
        } else {
            ["-gencode", &format!("arch={},code={}", t.virtual_arch, t.arch), "-cubin", "-Xptxas", "-v"].map(String::from).to_vec()
        };
        args.extend(job.args.iter().cloned());
        let out = Command::new(nvcc).args(&args).arg(&job.src).arg("-o").arg(&tmp).output().map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(format!("$ {} {} {} -o {}\n{}", nvcc.display(), args.join(" "), job.src.display(), tmp.display(), text));
        }
        fs::rename(&tmp, &o.image).map_err(|e| format!("moving {}: {e}", tmp.display()))?;
        let (mut report, diagnostics) = split_output(&text);
        if t.is_ptx() {
            report = ptx_note(&job.name, t.arch);
        }
        built.push(finish_output(job, o, report, diagnostics));
    }
    fs::write(&job.stamp, &job.hash).unwrap();
    Ok(built)
}

/// NVRTC route: the source to PTX in-process (once for the job's virtual architecture),
/// then ptxas to each cubin (with its report); a PTX target is that PTX.
fn compile_nvrtc(nvrtc: &Nvrtc, ptxas: &Path, job: &Job) -> Result<Vec<Built>, String> {
    if let Some(b) = cached(job) {
        return Ok(b);
    }
    let _ = fs::remove_file(&job.stamp);
    let (ptx, log) = nvrtc.to_ptx(&job.src, &job.args)?;
    fs::write(&job.ptx, &ptx).map_err(|e| format!("writing {}: {e}", job.ptx.display()))?;
    let mut built = Vec::new();
    for o in &job.outputs {
        if o.target.is_ptx() {
            debug_assert_eq!(o.image, job.ptx);
            // NVRTC's warnings are shown with a cubin of the same PTX when there is one.
            let diagnostics = if job.outputs.iter().all(|x| x.target.is_ptx()) { split_output(&log).1 } else { vec![] };
            built.push(finish_output(job, o, ptx_note(&job.name, o.target.arch), diagnostics));
            continue;
        }
        let tmp = o.image.with_extension("cubin.tmp");
        let out = Command::new(ptxas)
            .args(&o.ptxas_args)
            .arg(&job.ptx)
            .arg("-o")
            .arg(&tmp)
            .output()
            .map_err(|e| format!("could not run {}: {e}", ptxas.display()))?;
        let text = log.clone() + &String::from_utf8_lossy(&out.stdout) + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(format!("$ {} {} {} -o {}\n{}", ptxas.display(), o.ptxas_args.join(" "), job.ptx.display(), tmp.display(), text));
        }
        fs::rename(&tmp, &o.image).map_err(|e| format!("moving {}: {e}", tmp.display()))?;
        let (report, diagnostics) = split_output(&text);
        built.push(finish_output(job, o, report, diagnostics));
    }
    fs::write(&job.stamp, &job.hash).unwrap();
    Ok(built)
}

/// Writes an output's report and diagnostics next to it.
fn finish_output(job: &Job, o: &Output, mut report: String, diagnostics: Vec<String>) -> Built {
    // The entries' dynamic shared memory (MLA_ENTRY_SMEM constants), read from the PTX of
    // the job's virtual architecture, travel with the report.
    report.push_str(&entries::smem_report(&fs::read_to_string(&job.ptx).unwrap_or_default()));
    fs::write(&o.report, &report).unwrap();
    fs::write(o.report.with_extension("diag"), diagnostics.join("\n")).unwrap();
    Built { name: job.name.clone(), arch: o.target.arch, image: o.image.clone(), report, diagnostics }
}

/// A job compiled earlier from the same inputs.
fn cached(job: &Job) -> Option<Vec<Built>> {
    let stamp = fs::read_to_string(&job.stamp).ok()?;
    if stamp.trim() != job.hash {
        return None;
    }
    job.outputs
        .iter()
        .map(|o| {
            if !o.image.is_file() {
                return None;
            }
            let report = fs::read_to_string(&o.report).ok()?;
            // Warnings of a cached module are shown again on every run of this script.
            let diagnostics = fs::read_to_string(o.report.with_extension("diag"))
                .map(|d| d.lines().filter(|l| !l.is_empty()).map(String::from).collect())
                .unwrap_or_default();
            Some(Built { name: job.name.clone(), arch: o.target.arch, image: o.image.clone(), report, diagnostics })
        })
        .collect()
}

/// Splits nvcc's output into ptxas's resource report (without the run-dependent
/// "Compile time" lines) and the other diagnostics (compiler warnings).
fn split_output(text: &str) -> (String, Vec<String>) {
    let mut report = String::new();
    let mut diags = Vec::new();
    let mut in_ptxas = false;
    for line in text.lines() {
        if line.starts_with("ptxas info") || line.starts_with("ptxas warning") || line.starts_with("ptxas ") {
            in_ptxas = true;
            if line.contains("Compile time") {
                continue;
            }
            report.push_str(line);
            report.push('\n');
        } else if in_ptxas && line.starts_with("    ") {
            report.push_str(line);
            report.push('\n');
        } else if !line.trim().is_empty() {
            in_ptxas = false;
            diags.push(line.to_string());
        }
    }
    // ptxas warnings (e.g. ignored setmaxnreg) are worth seeing without the verbose switch;
    // the wgmma serialisation notes are "ptxas info" lines, handled by `report`.
    diags.extend(report.lines().filter(|l| l.starts_with("ptxas warning")).map(String::from));
    (report, diags)
}

#[derive(Default)]
struct FnStats {
    entry: bool,
    regs: Option<u64>,
    smem: u64,
    stack: u64,
    spill_st: u64,
    spill_ld: u64,
}

impl FnStats {
    fn spills(&self) -> bool {
        self.spill_st > 0 || self.spill_ld > 0
    }
    fn line(&self, name: &str) -> String {
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
fn entry_stats(report: &str) -> Vec<(String, FnStats)> {
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
fn wgmma_serialisation(report: &str) -> Vec<(String, String, String)> {
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
fn report(out_dir: &Path, built: &[Built], compiler: &str, enforce: bool) {
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
fn number_before(s: &str, unit: &str) -> u64 {
    let Some(i) = s.find(unit) else { return 0 };
    s[..i].split(|c: char| c == ',' || c.is_whitespace()).rfind(|w| !w.is_empty()).and_then(|w| w.parse().ok()).unwrap_or(0)
}

fn write_registry(out_dir: &Path, built: &[Built], reason: &str, version: &str, compiler: &str) {
    let mut s = String::from("// Generated by crates/mla-kernels/build.rs.\n");
    s.push_str("pub static MODULES: &[Module] = &[\n");
    for b in built {
        writeln!(
            s,
            "    Module {{ name: {:?}, arch: {:?}, image: include_bytes!({:?}), resource_report: {:?} }},",
            b.name,
            b.arch,
            b.image.to_string_lossy(),
            b.report
        )
        .unwrap();
    }
    s.push_str("];\n");
    writeln!(s, "pub static UNAVAILABLE_REASON: &str = {reason:?};").unwrap();
    writeln!(s, "pub static NVCC_VERSION: &str = {version:?};").unwrap();
    writeln!(s, "pub static COMPILER: &str = {compiler:?};").unwrap();
    let path = out_dir.join("registry.rs");
    if fs::read_to_string(&path).ok().as_deref() != Some(s.as_str()) {
        fs::write(&path, s).unwrap();
    }
}

/// Hash of every file under the kernel sources, by path relative to them (the same in
/// the repository's kernels/ and in the packaged snapshot).
fn sources_hash(dir: &Path) -> String {
    let mut h = Fnv::new();
    for f in walk(dir) {
        h.str(&f.strip_prefix(dir).unwrap_or(&f).to_string_lossy());
        h.bytes(&fs::read(&f).unwrap_or_default());
    }
    h.finish()
}

/// What OUT_DIR/MANIFEST.txt (and prebuilt/MANIFEST.txt) says.
struct Prebuilt {
    dir: PathBuf,
    compiler: String,
    version: String,
    modules: Vec<(String, &'static str)>,
}

/// The prebuilt cubins, when they exist, were built from exactly these sources and are all
/// there; else why not.
fn load_prebuilt(dir: &Path, sources: &str) -> Result<Prebuilt, String> {
    let text = fs::read_to_string(dir.join(MANIFEST)).map_err(|_| format!("no {}", dir.join(MANIFEST).display()))?;
    let mut p = Prebuilt { dir: dir.to_path_buf(), compiler: String::new(), version: String::new(), modules: vec![] };
    let mut their_sources = "";
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        match k {
            "sources" => their_sources = v,
            "compiler" => p.compiler = v.to_string(),
            "version" => p.version = v.to_string(),
            "module" => {
                let (name, arch) = v.split_once(' ').ok_or_else(|| format!("bad manifest line '{line}'"))?;
                let folder =
                    FOLDERS.iter().find(|f| name.split('/').next() == Some(f.dir)).ok_or_else(|| format!("module {name} is in no folder of FOLDERS"))?;
                let t = folder.targets.iter().find(|t| t.arch == arch).ok_or_else(|| format!("{name}: {arch} is not a target of kernels/{}", folder.dir))?;
                p.modules.push((name.to_string(), t.arch));
            }
            _ => {}
        }
    }
    if their_sources != sources {
        return Err("they were built from other kernel sources".into());
    }
    if p.modules.is_empty() {
        return Err("the manifest lists no module".into());
    }
    for (name, arch) in &p.modules {
        for f in [image_rel(name, arch), report_rel(name, arch)] {
            if !dir.join(&f).is_file() {
                return Err(format!("{f} is missing"));
            }
        }
    }
    // Every target of the table, or the packaged crate would lack one.
    for folder in FOLDERS {
        let names: std::collections::BTreeSet<&str> = p.modules.iter().map(|(n, _)| n.as_str()).filter(|n| n.split('/').next() == Some(folder.dir)).collect();
        for n in names {
            for t in folder.targets {
                if !p.modules.iter().any(|(m, a)| m == n && *a == t.arch) {
                    return Err(format!("{n} has no {} build", t.arch));
                }
            }
        }
    }
    Ok(p)
}

/// Embeds the prebuilt cubins: copied into OUT_DIR where compiled ones would be, so that
/// the registry is the same file either way (no rebuild of dependents when switching).
fn use_prebuilt(out_dir: &Path, p: &Prebuilt, sources: &str) {
    let mut built = Vec::new();
    for (name, arch) in &p.modules {
        let image = out_dir.join(image_rel(name, arch));
        fs::create_dir_all(image.parent().unwrap()).unwrap();
        let bytes = fs::read(p.dir.join(image_rel(name, arch))).unwrap();
        if fs::read(&image).ok().as_deref() != Some(&bytes[..]) {
            fs::write(&image, &bytes).unwrap();
        }
        let report = fs::read_to_string(p.dir.join(report_rel(name, arch))).unwrap();
        built.push(Built { name: name.clone(), arch, image, report, diagnostics: vec![] });
    }
    println!("cargo:available=1");
    println!("cargo:nvcc_version={}", p.version);
    report(out_dir, &built, &format!("{} [prebuilt in {}]", p.compiler, p.dir.display()), false);
    check_entries(&built);
    write_registry(out_dir, &built, "", &p.version, &p.compiler);
    write_manifest(out_dir, &built, sources, &p.version, &p.compiler);
}

/// OUT_DIR/MANIFEST.txt: what scripts/prebuild-kernels.sh copies into prebuilt/ with the
/// cubins and reports.
fn write_manifest(out_dir: &Path, built: &[Built], sources: &str, version: &str, compiler: &str) {
    let mut s = String::from("# mla-kernels cubins: written by build.rs; scripts/prebuild-kernels.sh copies them to crates/mla-kernels/prebuilt/\n");
    writeln!(s, "sources {sources}").unwrap();
    writeln!(s, "compiler {compiler}").unwrap();
    writeln!(s, "version {version}").unwrap();
    for b in built {
        writeln!(s, "module {} {}", b.name, b.arch).unwrap();
    }
    let path = out_dir.join(MANIFEST);
    if fs::read_to_string(&path).ok().as_deref() != Some(s.as_str()) {
        fs::write(&path, s).unwrap();
    }
}

fn env_flag(name: &str) -> bool {
    matches!(env::var(name).as_deref(), Ok("1") | Ok("true") | Ok("yes") | Ok("on"))
}

/// `*.cu` files under `dir` (its stage folders: `sm90/decode/*.cu`), sorted.
fn list_cu(dir: &Path) -> Vec<PathBuf> {
    walk(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).collect()
}

/// Every file under `dir`, sorted (hidden entries skipped).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// FNV-1a, 64 bit: a stable hash for the per-module cache stamps.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Length separator, so that ("ab","c") and ("a","bc") differ.
        for x in (b.len() as u64).to_le_bytes() {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn finish(&self) -> String {
        format!("{:016x}", self.0)
    }
}
