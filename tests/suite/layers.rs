//! The crate's modules form the layers `src/lib.rs` documents: every `crate::` path in a
//! module's files names a module of a lower layer. So no module imports a module that
//! (directly or through others) imports it back, and the table in the docs cannot drift
//! from the code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layer table of lib.rs's docs: module -> layer.
fn documented_layers(lib: &str) -> BTreeMap<String, usize> {
    let mut layers = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | ") else {
            continue;
        };
        let mut cells = row.split(" | ");
        let Some(Ok(layer)) = cells.next().map(str::parse::<usize>) else {
            continue;
        };
        let modules = cells.next().unwrap_or("");
        for m in modules.split(", ") {
            let name = m.trim().trim_start_matches("[`").trim_end_matches("`]");
            assert!(
                layers.insert(name.to_string(), layer).is_none(),
                "{name} is in two layers"
            );
        }
    }
    layers
}

/// The modules lib.rs declares (`pub mod x;`).
fn declared_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

/// Code without comments: line comments and doc comments dropped (a doc link to a higher
/// layer is a reader's pointer, not a dependency).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // `//` inside a string literal ("http://") is kept: only a quote-free prefix
            // starts a comment.
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level module names a piece of code reaches through `crate::`, with each
/// path's line: `crate::a::b`, `crate::{a, b::c}` (groups nested or not).
fn crate_paths(code: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(i) = code[from..].find("crate::") {
        let at = from + i;
        from = at + 7;
        // `some_crate::` is another crate's path, not ours.
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let line = code[..at].lines().count().max(1);
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at commas outside nested braces.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push((ident(&item), line));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push((ident(&item), line));
        } else {
            out.push((ident(rest), line));
        }
    }
    out.retain(|(m, _)| !m.is_empty());
    out
}

fn ident(s: &str) -> String {
    s.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every `.rs` file under `dir`.
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

#[test]
fn modules_use_only_lower_layers() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let layers = documented_layers(&lib);
    let declared = declared_modules(&lib);
    assert!(
        layers.len() >= 20,
        "the layer table was not found: {layers:?}"
    );
    let undocumented: Vec<_> = declared
        .iter()
        .filter(|m| !layers.contains_key(*m))
        .collect();
    assert!(
        undocumented.is_empty(),
        "modules in no layer: {undocumented:?}"
    );
    let stale: Vec<_> = layers.keys().filter(|m| !declared.contains(*m)).collect();
    assert!(
        stale.is_empty(),
        "layers name modules that do not exist: {stale:?}"
    );

    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(src()).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some(&own) = layers.get(&top) else {
            continue; // lib.rs, main.rs: the crate root uses everything
        };
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        for (m, line) in crate_paths(&code) {
            match layers.get(&m) {
                Some(&l) if m != top && l >= own => wrong.push(format!(
                    "{}:{line}: {top} (layer {own}) uses crate::{m} (layer {l})",
                    rel.display()
                )),
                _ => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "modules reach up or sideways:\n{}",
        wrong.join("\n")
    );
}

/// The checker itself: it finds paths in every form they are written, and would catch a
/// reach upwards.
#[test]
fn the_checker_reads_every_path_form() {
    let code = code_of(
        "use crate::model::Qwen2Vl;\nuse crate::{data, train::{self, logps}};\n\
         let x = crate::rl::trainer::train(); // crate::cli\nlet u = \"http://crate::eval\";\n\
         other_crate::bench::run();",
    );
    let found: Vec<String> = crate_paths(&code).into_iter().map(|(m, _)| m).collect();
    assert_eq!(found, ["model", "data", "train", "rl", "eval"]);
}
