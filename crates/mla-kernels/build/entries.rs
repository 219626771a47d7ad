//! The entry points of each kernel module, read from the sources: the one list the
//! launcher's typed constants (`mla_kernels::entries`) are generated from, checked
//! against what the compiler reports it built.
//!
//! An entry is written either as `extern "C" __global__ void [__launch_bounds__(..)] name(`
//! or, for a family of instantiations, as a line that starts with a macro whose name ends
//! in `_KERNEL` and whose first argument is the entry: `MLA_DECODE_WS_KERNEL(mla_decode_bf16_ws64, ...)`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

/// Module name (`sm90/decode/mla_decode_ws`) -> its entries, in source order.
pub type Entries = BTreeMap<String, Vec<String>>;

/// The entries written in one source file.
pub fn scan(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("//") || t.starts_with('#') || t.starts_with('*') {
            continue;
        }
        let name = if let Some(i) = line.find("extern \"C\" __global__ void") {
            let mut rest = line[i + "extern \"C\" __global__ void".len()..].trim_start();
            if let Some(r) = rest.strip_prefix("__launch_bounds__(") {
                // Skip the balanced parentheses of the bounds.
                let mut depth = 1;
                let end = r.char_indices().find(|&(_, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    depth == 0
                });
                let Some((j, _)) = end else { continue };
                rest = r[j + 1..].trim_start();
            }
            ident(rest)
        } else if line.starts_with(|c: char| c.is_ascii_uppercase()) {
            // `FAMILY_KERNEL(name, ...)` at the start of a line (not a #define's body).
            let m = ident(line);
            match line[m.len()..].strip_prefix('(') {
                Some(args) if m.ends_with("_KERNEL") => ident(args.trim_start()),
                _ => continue,
            }
        } else {
            continue;
        };
        // A macro's parameter (`NAME`) is not an entry; its instantiations are.
        if name.is_empty() || name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            continue;
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The entries of every module under `kernels_dir` (`<folder>/<stage>/<stem>.cu`).
pub fn scan_dir(kernels_dir: &Path, sources: &[std::path::PathBuf]) -> Result<Entries, String> {
    let mut all = Entries::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for src in sources {
        let name = module_name(kernels_dir, src);
        let text = fs::read_to_string(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let entries = scan(&text);
        if entries.is_empty() {
            return Err(format!("{}: no entry point found (write `extern \"C\" __global__ void name(` or a `*_KERNEL(name, ...)` line)", src.display()));
        }
        for e in &entries {
            if let Some(other) = owner.insert(e.clone(), name.clone()) {
                return Err(format!("entry {e} is defined by both {other} and {name}: entry names are one namespace"));
            }
        }
        all.insert(name, entries);
    }
    Ok(all)
}

/// `<folder>/<stage>/<stem>`: the path of a source under kernels/ without `.cu`.
pub fn module_name(kernels_dir: &Path, src: &Path) -> String {
    src.strip_prefix(kernels_dir).unwrap_or(src).with_extension("").to_string_lossy().replace('\\', "/")
}

/// The entries a compiled image holds: from ptxas's report of a cubin, or the `.entry`
/// directives of PTX text.
pub fn compiled(report: &str, ptx: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(text) = ptx {
        for l in text.lines() {
            if let Some(r) = l.trim_start().strip_prefix(".visible .entry ").or_else(|| l.trim_start().strip_prefix(".entry ")) {
                out.push(r.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap_or("").to_string());
            }
        }
    } else {
        for l in report.lines() {
            if let Some(i) = l.find("Compiling entry function '") {
                let r = &l[i + "Compiling entry function '".len()..];
                out.push(r.split('\'').next().unwrap_or("").to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The report lines of the entries' dynamic shared memory, from the module's PTX:
/// `.global .align 4 .u32 <entry>_smem_bytes = <n>;` (MLA_ENTRY_SMEM in mla_params.cuh)
/// becomes `mla-kernels: entry '<entry>' dynamic smem <n> bytes` (what
/// `Module::dynamic_smem` reads).
pub fn smem_report(ptx: &str) -> String {
    let mut out = String::new();
    for l in ptx.lines() {
        let Some((decl, value)) = l.split_once('=') else { continue };
        let Some(name) = decl.split_whitespace().last().and_then(|n| n.strip_suffix("_smem_bytes")) else { continue };
        if !decl.contains(".u32") {
            continue;
        }
        if let Ok(n) = value.trim().trim_end_matches(';').trim().parse::<u32>() {
            writeln!(out, "mla-kernels: entry '{name}' dynamic smem {n} bytes").unwrap();
        }
    }
    out
}

/// What the compiler built against what the sources say: an entry the scan missed, or an
/// entry no target of its module has, is an error (the generated constants would lie).
pub fn check(entries: &Entries, built: &[(String, String, Vec<String>)]) -> Vec<String> {
    let mut errors = Vec::new();
    for (module, arch, have) in built {
        let want = entries.get(module).map(Vec::as_slice).unwrap_or(&[]);
        for e in have {
            if !want.contains(e) {
                errors.push(format!("{module} ({arch}): entry {e} was compiled but build/entries.rs's scan of the source did not find it"));
            }
        }
    }
    for (module, want) in entries {
        for e in want {
            if !built.iter().any(|(m, _, have)| m == module && have.contains(e)) {
                errors.push(format!("{module}: the source names entry {e}, but no target of the module has it"));
            }
        }
    }
    errors
}

/// OUT_DIR/entries.rs: one `Entry` constant per entry point (`MLA_DECODE_BF16_WS64`), the
/// `ENTRIES` table and `MODULE_NAMES`.
pub fn write(out_dir: &Path, entries: &Entries) {
    let mut s = String::from("// Generated by crates/mla-kernels/build.rs (build/entries.rs) from the kernel sources.\n");
    for (module, names) in entries {
        for n in names {
            writeln!(s, "/// `{n}` of module `{module}` (`kernels/{module}.cu`).").unwrap();
            writeln!(s, "pub const {}: Entry = Entry {{ module: {module:?}, name: {n:?} }};", n.to_ascii_uppercase()).unwrap();
        }
    }
    s.push_str("/// Every entry point of every module, by module.\npub static ENTRIES: &[Entry] = &[\n");
    for names in entries.values() {
        for n in names {
            writeln!(s, "    {},", n.to_ascii_uppercase()).unwrap();
        }
    }
    s.push_str("];\n/// Every module, as `<folder>/<stage>/<stem>`.\npub static MODULE_NAMES: &[&str] = &[\n");
    for module in entries.keys() {
        writeln!(s, "    {module:?},").unwrap();
    }
    s.push_str("];\n");
    let path = out_dir.join("entries.rs");
    if fs::read_to_string(&path).ok().as_deref() != Some(s.as_str()) {
        fs::write(&path, s).unwrap();
    }
}
