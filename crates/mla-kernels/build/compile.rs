//! Compiling the kernels: one job per (source, virtual architecture), nvcc or NVRTC + ptxas, the per-module cache in OUT_DIR.

use super::*;

/// Compiles every kernel (or takes it from the per-module cache in OUT_DIR).
/// `repo`: the repository root, when this crate sits in it (its .cuda/ is then looked at).
/// `entries`: the entry points read from the sources, which the compiled modules must match.
pub fn compile_kernels(repo: Option<&Path>, manifest: &Path, kernels_dir: &Path, out_dir: &Path, sources: &str, entries: &entries::Entries) {
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
    check_entries(entries, &built);
    println!("cargo:available={}", if built.is_empty() { 0 } else { 1 });
    let reason = if built.is_empty() { format!("no kernel sources (*.cu) found under {}", kernels_dir.display()) } else { String::new() };
    write_registry(&out_dir, &built, &reason, &version, &compiler);
    write_manifest(&out_dir, &built, sources, &version, &compiler);
}

/// A kernel failed (or nvcc does not run): fail the build with nvcc's output, or, with
/// MLA_ALLOW_KERNEL_FAILURE=1, build without GPU kernels.
pub fn fail_or_degrade(allow: bool, out_dir: &Path, reason: &str, version: &str, failures: &[(String, String)]) {
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

/// nvcc route: one nvcc run per target (`-cubin` with ptxas's report, or `-ptx`).
pub fn compile(nvcc: &Path, job: &Job) -> Result<Vec<Built>, String> {
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
pub fn compile_nvrtc(nvrtc: &Nvrtc, ptxas: &Path, job: &Job) -> Result<Vec<Built>, String> {
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
pub fn finish_output(job: &Job, o: &Output, mut report: String, diagnostics: Vec<String>) -> Built {
    // The entries' dynamic shared memory (MLA_ENTRY_SMEM constants), read from the PTX of
    // the job's virtual architecture, travel with the report.
    report.push_str(&entries::smem_report(&fs::read_to_string(&job.ptx).unwrap_or_default()));
    fs::write(&o.report, &report).unwrap();
    fs::write(o.report.with_extension("diag"), diagnostics.join("\n")).unwrap();
    Built { name: job.name.clone(), arch: o.target.arch, image: o.image.clone(), report, diagnostics }
}

/// A job compiled earlier from the same inputs.
pub fn cached(job: &Job) -> Option<Vec<Built>> {
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
pub fn split_output(text: &str) -> (String, Vec<String>) {
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
