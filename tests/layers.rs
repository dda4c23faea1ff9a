//! The crate is a stack: a module of `src/` may import only modules of a
//! lower layer (or its own). This test reads every `crate::` path in `src/`
//! and fails on an import that goes up the stack or sideways between roles.

use std::collections::BTreeSet;
use std::path::Path;

/// Layer of each top-level module; roles share a layer and may not import
/// each other.
const LAYERS: &[(&str, u8)] = &[
    ("wire", 0),
    ("runtime", 1),
    ("transport", 2),
    ("relay", 3),
    ("route", 4),
    ("config", 5),
    ("proxy", 6),
    ("agent", 6),
    ("client", 6),
    ("tools", 7),
];

fn layer(m: &str) -> Option<u8> {
    LAYERS.iter().find(|(n, _)| *n == m).map(|(_, l)| *l)
}

fn top(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let m = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (m != "lib" && m != "main").then_some(m)
}

/// Every `crate::x` module named in `src` (grouped `crate::{a, b}` too),
/// unit tests excluded.
fn imports(src: &str) -> BTreeSet<String> {
    let src = src.split("#[cfg(test)]").next().unwrap_or(src);
    let mut out = BTreeSet::new();
    for (i, _) in src.match_indices("crate::") {
        let rest = &src[i + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.insert(name);
            }
        } else {
            out.insert(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
        }
    }
    out
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

#[test]
fn no_module_imports_a_higher_layer_or_another_role() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut bad = Vec::new();
    for f in &files {
        let Some(m) = top(f.strip_prefix(&root).unwrap()) else { continue };
        let Some(lm) = layer(&m) else {
            bad.push(format!("{}: top-level module {m} has no layer in tests/layers.rs", f.display()));
            continue;
        };
        for dep in imports(&std::fs::read_to_string(f).unwrap()) {
            let Some(ld) = layer(&dep) else { continue };
            if dep != m && ld >= lm {
                bad.push(format!("{}: {m} (layer {lm}) imports {dep} (layer {ld})", f.display()));
            }
        }
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_an_upward_import() {
    let found = imports("use crate::{relay::Item, wire::error::Error};\nfn f() { crate::tools::demo::run(); }");
    assert!(found.contains("tools") && found.contains("relay") && found.contains("wire"), "{found:?}");
}
