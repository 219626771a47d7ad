//! mla-core's modules import each other without a cycle.
//!
//! Every file under `src/` is one module (`src/gpu/ops.rs` is `crate::gpu::ops`, `src/lib.rs`
//! is `crate`). A module depends on another when its code (tests included, comments and
//! string literals not) names a path into it: `crate::a::b::Item`, `super::x`, `self::x`, or
//! a child module by name (`buffer::DeviceBuffer` in `gpu/mod.rs`), in `use` trees and in
//! expressions alike; a path resolves to the longest module prefix it names. Declaring a
//! child (`mod x;`) is containment, not a dependency. The crate root's `pub use` re-exports
//! are dependencies of the root, so a module that takes an item through the root
//! (`crate::Tensor`, `crate::BLOCK_SIZE`) closes a cycle through `lib.rs`: modules name the
//! module that defines an item, the root only re-exports.
//!
//! The test fails on any cycle and prints it, with the lines that make each of its edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Tokens of Rust source with their line numbers; comments, strings and char literals
/// dropped, lifetimes kept out.
fn tokenize(src: &str) -> Vec<(Tok, usize)> {
    let s: Vec<char> = src.chars().collect();
    let (mut i, mut line, mut out) = (0usize, 1usize, Vec::new());
    let at = |k: usize| s.get(k).copied().unwrap_or('\0');
    while i < s.len() {
        let c = s[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                if i >= s.len() {
                    break;
                }
                if s[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if s[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == '"' || ((c == 'b' || c == 'c') && at(i + 1) == '"') {
            i += if c == '"' { 1 } else { 2 };
            while i < s.len() && s[i] != '"' {
                if s[i] == '\\' {
                    i += 1;
                }
                if at(i) == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 1;
        } else if (c == 'r' && (at(i + 1) == '#' || at(i + 1) == '"')) || (c == 'b' && at(i + 1) == 'r' && (at(i + 2) == '#' || at(i + 2) == '"')) {
            // Raw string r#"..."# (or a raw identifier r#name).
            let mut j = i + if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                // r#ident
                let start = j;
                while at(j).is_alphanumeric() || at(j) == '_' {
                    j += 1;
                }
                out.push((Tok::Ident(s[start..j].iter().collect()), line));
                i = j;
                continue;
            }
            j += 1;
            loop {
                if j >= s.len() {
                    break;
                }
                if s[j] == '"' && (0..hashes).all(|h| at(j + 1 + h) == '#') {
                    j += 1 + hashes;
                    break;
                }
                if s[j] == '\n' {
                    line += 1;
                }
                j += 1;
            }
            i = j;
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{..}') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            out.push((Tok::Ident(s[start..i].iter().collect()), line));
        } else if c.is_ascii_digit() {
            while at(i).is_alphanumeric() || at(i) == '_' || (at(i) == '.' && at(i + 1).is_ascii_digit()) {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push((Tok::PathSep, line));
            i += 2;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// One module's file: its path segments (`["crate", "gpu", "ops"]`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut segs: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = segs.pop().unwrap();
    let stem = last.trim_end_matches(".rs").to_string();
    let mut m = vec!["crate".to_string()];
    m.extend(segs);
    if !(stem == "mod" || (m.len() == 1 && stem == "lib")) {
        m.push(stem);
    }
    m
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// An edge's evidence: the file, the line and the path as written.
type Why = (String, usize, String);

/// The dependencies of each module: target -> the places that make the edge.
type Graph = BTreeMap<String, BTreeMap<String, Vec<Why>>>;

fn join(m: &[String]) -> String {
    m.join("::")
}

/// The module graph of the crate whose sources are under `src`.
fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let modules: BTreeSet<String> = files.iter().map(|f| join(&module_of(src, f))).collect();
    let mut graph = Graph::new();
    for file in &files {
        let me = module_of(src, file);
        let me_s = join(&me);
        let shown = file.strip_prefix(src.parent().unwrap()).unwrap().display().to_string();
        let toks = tokenize(&std::fs::read_to_string(file).unwrap());
        // Children declared as files (`mod x;`): their names start relative paths.
        let children: BTreeSet<String> = toks
            .windows(3)
            .filter_map(|w| match (&w[0].0, &w[1].0, &w[2].0) {
                (Tok::Ident(k), Tok::Ident(n), Tok::Punct(';')) if k == "mod" => Some(n.clone()),
                _ => None,
            })
            .collect();
        let edges = graph.entry(me_s.clone()).or_default();
        // Inline modules (`mod tests { .. }`): (name, brace depth at which it closes).
        let mut inline: Vec<(String, usize)> = Vec::new();
        let mut depth = 0usize;
        let add = |scope: &[String], path: &[String], line: usize, edges: &mut BTreeMap<String, Vec<Why>>| {
            let in_file_scope = scope.len() == me.len();
            let mut base: Vec<String> = match path[0].as_str() {
                "crate" => vec!["crate".to_string()],
                "self" => scope.to_vec(),
                "super" => scope.to_vec(),
                first if in_file_scope && children.contains(first) => me.clone(),
                _ => return,
            };
            let mut rest = &path[..];
            if rest[0] == "crate" || rest[0] == "self" {
                rest = &rest[1..];
            }
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            if base.is_empty() {
                return;
            }
            // Inline modules are not files: the longest prefix that is one is the target.
            let mut full = base;
            full.extend(rest.iter().cloned());
            let target = (1..=full.len()).rev().map(|n| join(&full[..n])).find(|m| modules.contains(m));
            if let Some(t) = target {
                if t != me_s {
                    edges.entry(t).or_default().push((shown.clone(), line, path.join("::")));
                }
            }
        };
        let mut i = 0;
        while i < toks.len() {
            let scope: Vec<String> = me.iter().cloned().chain(inline.iter().map(|(n, _)| n.clone())).collect();
            match &toks[i].0 {
                Tok::Punct('{') => {
                    depth += 1;
                    i += 1;
                }
                Tok::Punct('}') => {
                    if inline.last().is_some_and(|&(_, d)| d == depth) {
                        inline.pop();
                    }
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                Tok::Ident(k) if k == "mod" => {
                    if let (Some((Tok::Ident(n), _)), Some((Tok::Punct('{'), _))) = (toks.get(i + 1), toks.get(i + 2)) {
                        inline.push((n.clone(), depth + 1));
                    }
                    i += 2;
                }
                Tok::Ident(k) if k == "use" => {
                    // A use tree: expand its groups into full paths.
                    let (paths, end) = use_tree(&toks, i + 1, Vec::new());
                    for (p, line) in paths {
                        if !p.is_empty() {
                            add(&scope, &p, line, edges);
                        }
                    }
                    i = end;
                }
                Tok::Ident(first) => {
                    let after_sep = i > 0 && toks[i - 1].0 == Tok::PathSep;
                    let mut path = vec![first.clone()];
                    let line = toks[i].1;
                    let mut j = i + 1;
                    while toks.get(j).is_some_and(|t| t.0 == Tok::PathSep) {
                        match toks.get(j + 1) {
                            Some((Tok::Ident(n), _)) => {
                                path.push(n.clone());
                                j += 2;
                            }
                            _ => break,
                        }
                    }
                    if !after_sep && path.len() > 1 {
                        add(&scope, &path, line, edges);
                    }
                    i = j.max(i + 1);
                }
                _ => i += 1,
            }
        }
    }
    graph
}

/// Parses the use tree starting at `i` (after `use` or a `{`); returns its paths and the
/// index after it (after the `;` for a whole `use` item).
fn use_tree(toks: &[(Tok, usize)], mut i: usize, prefix: Vec<String>) -> (Vec<(Vec<String>, usize)>, usize) {
    let mut out = Vec::new();
    let mut path = prefix.clone();
    let mut line = toks.get(i).map_or(0, |t| t.1);
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Ident(n) if n == "as" => {
                i += 2;
            }
            Tok::Ident(n) => {
                if path.len() == prefix.len() {
                    line = toks[i].1;
                }
                path.push(n.clone());
                i += 1;
            }
            Tok::PathSep => i += 1,
            Tok::Punct('*') => i += 1,
            Tok::Punct('{') => {
                // A group: each member continues the path so far.
                i += 1;
                loop {
                    let (sub, end) = use_tree(toks, i, path.clone());
                    out.extend(sub);
                    i = end;
                    match toks.get(i).map(|t| &t.0) {
                        Some(Tok::Punct(',')) => {
                            i += 1;
                            if toks.get(i).is_some_and(|t| t.0 == Tok::Punct('}')) {
                                i += 1;
                                break;
                            }
                        }
                        Some(Tok::Punct('}')) => {
                            i += 1;
                            break;
                        }
                        _ => break,
                    }
                }
                path = prefix.clone();
            }
            Tok::Punct(',') | Tok::Punct('}') => {
                if path.len() > prefix.len() {
                    out.push((path, line));
                }
                return (out, i);
            }
            Tok::Punct(';') => {
                if path.len() > prefix.len() {
                    out.push((path, line));
                }
                return (out, i + 1);
            }
            _ => i += 1,
        }
    }
    (out, i)
}

/// The cycles of the graph: one per strongly connected component of more than one module
/// (Tarjan), each shown as a closed walk through its component.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let nodes: Vec<&String> = graph.keys().collect();
    let idx: BTreeMap<&String, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let succ: Vec<Vec<usize>> = nodes.iter().map(|n| graph[*n].keys().filter_map(|t| idx.get(t).copied()).collect()).collect();
    struct T<'a> {
        succ: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        sccs: Vec<Vec<usize>>,
    }
    fn visit(t: &mut T, v: usize) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for k in 0..t.succ[v].len() {
            let w = t.succ[v][k];
            match t.index[w] {
                None => {
                    visit(t, w);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(iw) if t.on[w] => t.low[v] = t.low[v].min(iw),
                _ => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut scc = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            t.sccs.push(scc);
        }
    }
    let n = nodes.len();
    let mut t = T { succ: &succ, index: vec![None; n], low: vec![0; n], on: vec![false; n], stack: Vec::new(), next: 0, sccs: Vec::new() };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(&mut t, v);
        }
    }
    let mut out = Vec::new();
    for scc in t.sccs.iter().filter(|s| s.len() > 1) {
        // The shortest cycle through each module of the component (breadth-first within
        // it), each cycle once.
        let inside: BTreeSet<usize> = scc.iter().copied().collect();
        let mut seen: BTreeSet<Vec<usize>> = BTreeSet::new();
        let mut starts: Vec<usize> = scc.clone();
        starts.sort();
        for start in starts {
            let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut end = None;
            'bfs: while let Some(v) = queue.pop_front() {
                for &w in &succ[v] {
                    if !inside.contains(&w) {
                        continue;
                    }
                    if w == start {
                        end = Some(v);
                        break 'bfs;
                    }
                    if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(w) {
                        e.insert(v);
                        queue.push_back(w);
                    }
                }
            }
            let mut walk = vec![start];
            let mut v = end.unwrap();
            while v != start {
                walk.push(v);
                v = prev[&v];
            }
            walk[1..].reverse();
            // Rotated to its smallest module, to see each cycle once.
            let k = (0..walk.len()).min_by_key(|&k| walk[k]).unwrap();
            walk.rotate_left(k);
            if seen.insert(walk.clone()) {
                let mut c: Vec<String> = walk.iter().map(|&i| nodes[i].clone()).collect();
                c.push(c[0].clone());
                out.push(c);
            }
        }
    }
    out
}

fn show(graph: &Graph, cycle: &[String]) -> String {
    let mut s = format!("cycle: {}\n", cycle.join(" -> "));
    for w in cycle.windows(2) {
        s += &format!("  {} -> {}:\n", w[0], w[1]);
        for (file, line, path) in graph[&w[0]][&w[1]].iter().take(4) {
            s += &format!("    {file}:{line}: {path}\n");
        }
    }
    s
}

#[test]
fn no_import_cycle_among_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    // The parser sees the graph at all: every module, and edges known to exist.
    assert!(graph.len() >= 20, "only {} modules found under {}", graph.len(), src.display());
    assert!(graph["crate::cache"].contains_key("crate::error"), "the parser missed cache.rs's `use crate::error::..`");
    assert!(graph["crate"].contains_key("crate::tensor"), "the parser missed lib.rs's `pub use tensor::Tensor`");
    if std::env::var_os("MLA_MODULE_GRAPH").is_some() {
        for (m, edges) in &graph {
            println!("{m} -> {}", edges.keys().cloned().collect::<Vec<_>>().join(", "));
        }
    }
    let found = cycles(&graph);
    let text: String = found.iter().map(|c| show(&graph, c)).collect();
    let edges: usize = graph.values().map(|e| e.len()).sum();
    println!("module graph: {} modules, {} edges, {} cycles", graph.len(), edges, found.len());
    assert!(found.is_empty(), "{} import cycle(s) among mla-core's modules:\n{text}", found.len());
}

/// The step's vocabulary (`crate::step::*`) sits below both backends and the front
/// modules that dispatch to them: it imports none of them.
#[test]
fn the_step_vocabulary_imports_no_backend() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let above = ["crate::cpu", "crate::gpu::ops", "crate::gpu::graph", "crate::decode", "crate::plan", "crate::validate", "crate::bench", "crate::cache"];
    let mut bad = String::new();
    for (m, edges) in graph.iter().filter(|(m, _)| m.as_str() == "crate::step" || m.starts_with("crate::step::")) {
        for (t, why) in edges {
            if above.iter().any(|a| t == a || t.starts_with(&format!("{a}::"))) {
                bad += &format!("{m} -> {t}: {}:{}: {}\n", why[0].0, why[0].1, why[0].2);
            }
        }
    }
    assert!(graph.contains_key("crate::step::sched"), "no step modules found");
    assert!(bad.is_empty(), "the step's vocabulary imports a backend or a front module:\n{bad}");
}

/// The checker itself: it finds a planted cycle, through `super`, a child module name, a use
/// group and the root's re-exports, and nothing in comments or strings.
#[test]
fn the_checker_finds_planted_cycles() {
    let dir = std::env::temp_dir().join(format!("mla-module-graph-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("cpu")).unwrap();
    let write = |p: &str, s: &str| std::fs::write(src.join(p), s).unwrap();
    write("lib.rs", "pub mod a;\npub mod b;\npub mod cpu;\npub use a::A;\npub const K: usize = 1;\n");
    write("a.rs", "use crate::{b::B, K};\n// crate::cpu::x in a comment\nfn f() -> &'static str { \"crate::cpu::y\" }\n");
    write("b.rs", "pub struct B;\nfn g() { let _ = crate::cpu::kernel::run(); }\n");
    write("cpu/mod.rs", "mod avx2;\npub mod kernel;\nfn h() { avx2::go(); }\n");
    write("cpu/avx2.rs", "use super::kernel::Arith;\npub fn go() {}\n");
    write("cpu/kernel.rs", "pub fn run() { super::avx2::go(); }\n#[cfg(test)]\nmod tests { use super::run; }\n");
    let graph = module_graph(&src);
    let found: Vec<String> = cycles(&graph).iter().map(|c| show(&graph, c)).collect();
    std::fs::remove_dir_all(&dir).ok();
    assert!(graph["crate::cpu"].contains_key("crate::cpu::avx2"), "{graph:?}");
    assert!(!graph["crate::a"].contains_key("crate::cpu"), "a comment or a string counted: {graph:?}");
    assert!(!graph["crate::cpu::kernel"].contains_key("crate::cpu"), "`use super::..` in an inline test module resolved one level too far");
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().all(|c| c.starts_with("cycle: ")), "{found:?}");
    assert!(found.iter().any(|c| c.contains("crate::cpu::avx2 -> crate::cpu::kernel") || c.contains("crate::cpu::kernel -> crate::cpu::avx2")), "{found:?}");
    assert!(found.iter().any(|c| c.contains("crate -> crate::a -> crate") || c.contains("crate::a -> crate -> crate::a")), "{found:?}");
}
