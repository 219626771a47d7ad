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
//!
//! The parts, under build/: `entries` (the entry points the sources declare, the generated
//! typed constants), `toolchain` (finding nvcc or NVRTC + ptxas), `compile` (the jobs and
//! the per-module cache), `ptxas_report` (resources, spills, wgmma serialisation: what the
//! build enforces), `prebuilt` (the shipped cubins), `outputs` (registry.rs, MANIFEST.txt,
//! the entry check), `util`. This file: the targets per folder, the knobs, `main`.

use std::collections::BTreeMap;
use std::env;
use std::ffi::{c_char, c_int, c_void, CString};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

#[path = "build/compile.rs"]
mod compile;
#[path = "build/entries.rs"]
mod entries;
#[path = "build/outputs.rs"]
mod outputs;
#[path = "build/prebuilt.rs"]
mod prebuilt;
#[path = "build/ptxas_report.rs"]
mod ptxas_report;
#[path = "build/toolchain.rs"]
mod toolchain;
#[path = "build/util.rs"]
mod util;
use compile::*;
use outputs::*;
use prebuilt::*;
use ptxas_report::*;
use toolchain::*;
use util::*;

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

    let sources = sources_hash(&kernels_dir);
    let rebuild_why = REBUILD_ENV.iter().find(|v| env::var_os(v).is_some_and(|x| !x.is_empty() && x != "0"));
    // In the repository a compiler, when there is one, always builds (prebuilt/ is only a
    // packaging output there); elsewhere prebuilt cubins are used unless a rebuild is asked.
    let compile_here = rebuild_why.is_some() || (in_repo && find_compiler(Some(&root)).is_ok());
    if !compile_here {
        match load_prebuilt(&prebuilt_dir, &sources) {
            Ok(p) => return use_prebuilt(&out_dir, &p, &sources, &entry_table),
            // Only worth a word when there were prebuilt cubins to use.
            Err(why) if prebuilt_dir.join(MANIFEST).is_file() => {
                println!("cargo:warning=prebuilt cubins in {} not used ({why})", prebuilt_dir.display());
            }
            Err(_) => {}
        }
    }
    compile_kernels(in_repo.then_some(root.as_path()), &manifest, &kernels_dir, &out_dir, &sources, &entry_table);
}
