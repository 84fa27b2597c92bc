//! The crate's folders stand on floors (see `src/lib.rs`): the vocabulary, the
//! config, the shared state and telemetry, the capabilities, the wiring. This
//! test reads `src/` and fails when a module imports one on a higher floor,
//! when a capability imports another capability (or the shared state the
//! telemetry, or the other way), or when modules import each other in a cycle
//! (counting `crate::`, `super::` and `self::` paths and uses of child
//! modules, outside `#[cfg(test)]` parts).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Floors by top-level module, lowest first; `crate` is lib.rs and main.rs.
const FLOORS: [&[&str]; 5] = [
    &["vocab"],
    &["config"],
    &["state", "telemetry"],
    &[
        "edge",
        "jobs",
        "cache",
        "client_caps",
        "spend",
        "retry",
        "admission",
        "upstream",
    ],
    &["stack", "admin", "reload", "server", "crate"],
];

/// The floor of the wiring, whose modules may import each other.
const WIRING: usize = FLOORS.len() - 1;

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

fn floor(module: &str) -> usize {
    let top = top(module);
    FLOORS
        .iter()
        .position(|f| f.contains(&top))
        .unwrap_or_else(|| panic!("module {module} stands on no floor: add it to FLOORS"))
}

/// Every module of `src/` (file path -> `a::b`).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = match parts.join("::").as_str() {
                "lib" | "main" => "crate".to_string(),
                n => n.to_string(),
            };
            out.insert(name, path);
        }
    }
    out
}

/// The code of a file without comments and without its `#[cfg(test)]` part.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]") {
        Some(cut) => &text[..cut],
        None => &text[..],
    };
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths in `text` that start with `prefix` (`crate::`, `super::`, ...), with
/// their module segments; `use x::{a::B, c}` groups are expanded.
fn paths(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(i) = text[from..].find(prefix) {
        let start = from + i;
        from = start + prefix.len();
        let ident_before = start > 0 && {
            let c = bytes[start - 1] as char;
            c.is_alphanumeric() || c == '_' || c == ':'
        };
        if ident_before {
            continue;
        }
        let rest = &text[from..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '{'))
            .unwrap_or(rest.len());
        let path = &rest[..end];
        if let Some((head, _)) = path.split_once('{') {
            // A group: the shared head plus each item's leading segments.
            let close = rest.find('}').unwrap_or(rest.len());
            let items = &rest[head.len() + 1..close];
            for item in items.split(',') {
                let item = item.trim();
                if item.is_empty() {
                    continue;
                }
                let full = format!("{head}{item}");
                out.push(full.split("::").map(str::to_string).collect());
            }
        } else {
            out.push(path.split("::").map(str::to_string).collect());
        }
    }
    out
}

/// The longest module named by `segments`, if any.
fn resolve(modules: &BTreeMap<String, PathBuf>, segments: &[String]) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|m| modules.contains_key(m))
}

/// Module -> the modules it imports.
fn imports(modules: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (module, path) in modules {
        let text = code(path);
        let here: Vec<String> = if module == "crate" {
            vec![]
        } else {
            module.split("::").map(str::to_string).collect()
        };
        let parent = &here[..here.len().saturating_sub(1)];
        let mut found = BTreeSet::new();
        let mut candidates: Vec<Vec<String>> = paths(&text, "crate::");
        for p in paths(&text, "super::") {
            // `super::super::x` climbs once more per `super`.
            let climbs = p.iter().take_while(|s| *s == "super").count();
            let base = &parent[..parent.len().saturating_sub(climbs)];
            candidates.push(base.iter().cloned().chain(p[climbs..].to_vec()).collect());
        }
        for p in paths(&text, "self::") {
            candidates.push(here.iter().cloned().chain(p).collect());
        }
        // `use child::X` and `child::f()` for the module's own children.
        for p in paths(&text, "use ") {
            candidates.push(here.iter().cloned().chain(p).collect());
        }
        for target in candidates.iter().filter_map(|c| resolve(modules, c)) {
            if target != *module && target != "crate" {
                found.insert(target);
            }
        }
        graph.insert(module.clone(), found);
    }
    graph
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_imports_from_a_higher_floor() {
    let modules = modules(&src());
    let mut wrong = Vec::new();
    for (module, targets) in imports(&modules) {
        for t in targets {
            if floor(&t) > floor(&module) {
                wrong.push(format!("{module} -> {t}"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports from a higher floor: {wrong:?}");
}

/// A capability keeps what it needs beside it: what two capabilities share is
/// a word of the vocabulary, and what one needs of another (the edge's parser
/// for jobs, the upstreams' health for admission) the stack hands it. So no
/// folder imports another folder of its own floor, but on the wiring's.
fn across_capabilities(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut wrong = Vec::new();
    for (module, targets) in graph {
        if floor(module) == WIRING {
            continue;
        }
        for t in targets {
            if top(t) != top(module) && floor(t) == floor(module) {
                wrong.push(format!("{module} -> {t}"));
            }
        }
    }
    wrong
}

#[test]
fn no_capability_imports_another() {
    let wrong = across_capabilities(&imports(&modules(&src())));
    assert!(wrong.is_empty(), "imports across capabilities: {wrong:?}");
}

#[test]
fn the_check_sees_a_capability_importing_another() {
    let graph = |from: &str, to: &str| {
        BTreeMap::from([(from.to_string(), BTreeSet::from([to.to_string()]))])
    };
    assert_eq!(
        across_capabilities(&graph("jobs", "edge::parse")),
        ["jobs -> edge::parse"]
    );
    assert_eq!(
        across_capabilities(&graph("telemetry::metrics", "state")),
        ["telemetry::metrics -> state"]
    );
    assert!(across_capabilities(&graph("edge::log", "edge")).is_empty());
    assert!(across_capabilities(&graph("cache", "telemetry::metrics")).is_empty());
    assert!(across_capabilities(&graph("server", "stack")).is_empty());
}

#[test]
fn modules_import_each_other_in_no_cycle() {
    let graph = imports(&modules(&src()));
    // Depth-first search with colours; a grey target closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour: BTreeMap<&str, Colour> =
        graph.keys().map(|k| (k.as_str(), Colour::White)).collect();
    let mut cycles = Vec::new();
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<&'a str, Colour>,
        path: &mut Vec<&'a str>,
        cycles: &mut Vec<String>,
    ) {
        colour.insert(node, Colour::Grey);
        path.push(node);
        for next in &graph[node] {
            match colour[next.as_str()] {
                Colour::White => visit(next, graph, colour, path, cycles),
                Colour::Grey => {
                    let from = path.iter().position(|m| *m == next).unwrap_or(0);
                    cycles.push(format!("{} -> {next}", path[from..].join(" -> ")));
                }
                Colour::Black => {}
            }
        }
        path.pop();
        colour.insert(node, Colour::Black);
    }
    for node in graph.keys() {
        if colour[node.as_str()] == Colour::White {
            visit(node, &graph, &mut colour, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn the_check_sees_a_cycle_when_there_is_one() {
    // The scanner itself, on a made-up pair that imports each other.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(dir.path().join("a.rs"), "use crate::b::Thing;\n").unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    std::fs::write(
        dir.path().join("b/mod.rs"),
        "mod inner;\nuse inner::X;\npub struct Thing;\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("b/inner.rs"), "use super::super::a::Y;\n").unwrap();
    let graph = imports(&modules(dir.path()));
    assert!(graph["a"].contains("b"));
    assert!(graph["b"].contains("b::inner"), "{graph:?}");
    assert!(graph["b::inner"].contains("a"), "{graph:?}");
}
