//! Prebuilt cubins (prebuilt/, shipped in the packaged crate): whether they match the sources, and embedding them.

use super::*;

/// Hash of every file under the kernel sources, by path relative to them (the same in
/// the repository's kernels/ and in the packaged snapshot).
pub fn sources_hash(dir: &Path) -> String {
    let mut h = Fnv::new();
    for f in walk(dir) {
        h.str(&f.strip_prefix(dir).unwrap_or(&f).to_string_lossy());
        h.bytes(&fs::read(&f).unwrap_or_default());
    }
    h.finish()
}

/// What OUT_DIR/MANIFEST.txt (and prebuilt/MANIFEST.txt) says.
pub struct Prebuilt {
    pub dir: PathBuf,
    pub compiler: String,
    pub version: String,
    pub modules: Vec<(String, &'static str)>,
}

/// The prebuilt cubins, when they exist, were built from exactly these sources and are all
/// there; else why not.
pub fn load_prebuilt(dir: &Path, sources: &str) -> Result<Prebuilt, String> {
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
pub fn use_prebuilt(out_dir: &Path, p: &Prebuilt, sources: &str, entries: &entries::Entries) {
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
    check_entries(entries, &built);
    write_registry(out_dir, &built, "", &p.version, &p.compiler);
    write_manifest(out_dir, &built, sources, &p.version, &p.compiler);
}
