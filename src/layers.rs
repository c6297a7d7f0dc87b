//! The rule the source tree is laid out by, checked: imports point one way only.
//!
//! Every module belongs to a layer (see the crate's front page). A module may use modules of
//! its own layer and of the layers before it, and the modules of one layer must not use each
//! other in a cycle. The check reads the sources (test code and comments left out) and fails
//! naming each import that breaks the rule, so a change that ties two stages together, or
//! makes the engine reach into a stage, is caught by `cargo test` rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of a module unit, or `None` for the crate root and `main`.
fn layer(unit: &str) -> Option<u8> {
    let top = unit.split("::").next().unwrap_or(unit);
    Some(match top {
        "config" | "digest" | "storage" | "tables" | "error" | "faults" | "metrics"
        | "progress" | "sources" => 0,
        "sql" => 1,
        "engine" | "output" | "cluster" => 2,
        "stages" => 3,
        "pipeline" => 4,
        "cli" => 5,
        _ => return None,
    })
}

/// Folders whose sub-modules are units of their own (`stages::identity`, `output::lease`).
const FOLDERS: &[&str] = &["sql", "output", "stages", "cli", "pipeline"];

/// The unit a module path belongs to: the first two parts inside a folder, else the first.
fn unit_of(parts: &[String], src: &Path) -> String {
    let first = parts.first().cloned().unwrap_or_default();
    if FOLDERS.contains(&first.as_str()) && parts.len() > 1 {
        let sub = &parts[1];
        let dir = src.join(&first);
        if dir.join(format!("{sub}.rs")).exists() || dir.join(sub).is_dir() {
            return format!("{first}::{sub}");
        }
    }
    first
}

/// The module path of a source file (`src/stages/identity/graph.rs` → stages, identity, graph).
fn module_parts(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code of a source file without its tests and comments.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            // The attribute is followed by the item it guards: a test module ends the code
            // (tests sit at the end of a file); any other item is skipped to its end.
            if lines
                .peek()
                .is_some_and(|l| l.trim_start().starts_with("mod tests"))
            {
                break;
            }
            continue;
        }
        let without_comment = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        code.push_str(without_comment);
        code.push('\n');
    }
    code
}

/// Every `crate::a::b` path in `code`, as its parts.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut parts = Vec::new();
        let mut tail = rest;
        loop {
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if end == 0 {
                break;
            }
            parts.push(tail[..end].to_string());
            if let Some(next) = tail[end..].strip_prefix("::") {
                tail = next;
            } else {
                break;
            }
        }
        if !parts.is_empty() {
            found.push(parts);
        }
    }
    found
}

/// Which units each unit uses, from the sources under `src`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path: PathBuf = entry.expect("src is readable").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let parts = module_parts(src, &file);
        let from = unit_of(&parts, src);
        if layer(&from).is_none() {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source is readable");
        let entry = uses.entry(from.clone()).or_default();
        for path in crate_paths(&code_of(&text)) {
            let to = unit_of(&path, src);
            if to != from && layer(&to).is_some() {
                entry.insert(to);
            }
        }
    }
    uses
}

/// What breaks the rule: imports into a later layer, and cycles.
fn violations(uses: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut found = Vec::new();
    for (from, tos) in uses {
        for to in tos {
            if layer(to) > layer(from) {
                found.push(format!("`{from}` uses `{to}`, which is in a later layer"));
            }
        }
    }
    // A cycle is a path back to where it started; depth-first from each unit, reported once
    // per set of units.
    let mut reported = BTreeSet::new();
    for start in uses.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut visited = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in uses.get(&at).into_iter().flatten() {
                if next == start {
                    let members: BTreeSet<String> = path.iter().cloned().collect();
                    if reported.insert(members) {
                        found.push(format!("cycle: {} → {start}", path.join(" → ")));
                    }
                } else if visited.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
    }

    #[test]
    fn imports_point_one_way_and_form_no_cycle() {
        let uses = imports(&src());
        assert!(
            uses.len() > 20,
            "the check found too few modules: {:?}",
            uses.keys()
        );
        let broken = violations(&uses);
        assert!(
            broken.is_empty(),
            "modules break the layering:\n{}",
            broken.join("\n")
        );
    }

    #[test]
    fn the_check_finds_a_cycle_and_a_backward_import() {
        let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut add = |a: &str, b: &str| {
            uses.entry(a.into()).or_default().insert(b.into());
        };
        add("stages::identity", "stages::journeys");
        add("stages::journeys", "stages::identity");
        add("engine", "stages::ingest");
        add("stages::ingest", "engine");
        let found = violations(&uses);
        assert!(
            found
                .iter()
                .any(|v| v.starts_with("cycle") && v.contains("journeys")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|v| v == "`engine` uses `stages::ingest`, which is in a later layer"),
            "{found:?}"
        );
        assert_eq!(found.len(), 3, "{found:?}");
    }

    #[test]
    fn paths_are_read_from_code_only() {
        let text = "use crate::tables::event; // crate::cli\nfn f() { crate::stages::ingest::x(); }\n#[cfg(test)]\nmod tests { use crate::cli; }\n";
        let paths = crate_paths(&code_of(text));
        assert_eq!(
            paths,
            vec![
                vec!["tables".to_string(), "event".to_string()],
                vec!["stages".into(), "ingest".into(), "x".into()]
            ]
        );
    }
}
