//! The layer table of `docs/ARCHITECTURE.md` holds: every module of every crate is placed in a
//! layer, uses only modules of lower layers (read from its `crate::` and `super::` paths, inline
//! ones included), and no file of a crate takes part in an import cycle.
//!
//! The table is the fenced block after the heading `## Layers`; each line is
//! `DIR: TOP > … > BOTTOM`, a layer being its module names separated by spaces. What is
//! compiled only for tests (`#[cfg(test)]` modules) is not read: tests may reach across layers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tiervec_test_support::paths::workspace_root;

/// `(source dir, layers top first)` for each crate in the table.
fn layer_table() -> Vec<(String, Vec<BTreeSet<String>>)> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/ARCHITECTURE.md"))
        .expect("docs/ARCHITECTURE.md is readable");
    let section = doc
        .split("\n## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Layers` section");
    let block = section
        .split("```")
        .nth(1)
        .expect("the Layers section holds a fenced block");
    block
        .lines()
        .skip(1) // the fence's info string
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (dir, layers) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("layer line without `DIR:`: {line}"));
            let layers = layers
                .split('>')
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect();
            (dir.trim().to_owned(), layers)
        })
        .collect()
}

/// A source file and its module path inside the crate (`["push", "plan"]` for `push/plan.rs`).
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    text: String,
}

fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

/// The crate's library files (not `main.rs`, `lib.rs` or `bin/`), with test-only code cut.
fn sources(src: &Path) -> Vec<SourceFile> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("a readable source dir") {
            let path = entry.expect("a dir entry").path();
            let rel = path.strip_prefix(src).expect("below src").to_owned();
            if path.is_dir() {
                if rel != Path::new("bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let module = module_path(&rel);
            // Root files and test-only module files (`tests.rs`) are not placed in layers.
            if module.is_empty()
                || module == ["main"]
                || module == ["lib"]
                || module.last().is_some_and(|m| m == "tests")
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a readable source file");
            out.push(SourceFile {
                path: rel,
                module,
                text: strip_tests(&text),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The text with comments and `#[cfg(test)]` items removed (a test module is the item that
/// follows the attribute: up to its matching brace, or its `;`).
fn strip_tests(text: &str) -> String {
    let without_comments: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = without_comments.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        rest = &rest[i + "#[cfg(test)]".len()..];
        let semicolon = rest.find(';');
        let brace = rest.find('{');
        match (semicolon, brace) {
            (Some(s), Some(b)) if s < b => rest = &rest[s + 1..],
            (_, Some(b)) => {
                let mut depth = 0usize;
                let mut end = rest.len();
                for (j, c) in rest[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + j + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &rest[end..];
            }
            (Some(s), None) => rest = &rest[s + 1..],
            (None, None) => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// Every path a file names that starts at `crate::`, `super::` or one of its child modules, as
/// absolute module paths (`crate::{a::X, b}` yields both).
fn named_paths(file: &SourceFile) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let children: Vec<String> = child_modules(&file.text)
        .map(|c| format!("{c}::"))
        .collect();
    for statement in file.text.split(';') {
        // Re-exporting its own children (`pub use child::X`) is a module's surface, not a use;
        // re-exporting another module's item (`pub use crate::other::X`) is a use of it.
        let starts: Vec<&str> = if is_re_export(statement) {
            vec!["crate::"]
        } else {
            ["crate::", "super::"]
                .into_iter()
                .chain(children.iter().map(String::as_str))
                .collect()
        };
        for start in starts {
            let mut from = 0;
            while let Some(i) = statement[from..].find(start) {
                let at = from + i;
                from = at + start.len();
                let before = statement[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let mut base = if start == "crate::" {
                    Vec::new()
                } else if start != "super::" {
                    // A child: the path goes on from this file's module, child name included.
                    from = at;
                    file.module.clone()
                } else {
                    // `super` of `a/b.rs` is `a`; of `a/b/mod.rs` (module `a::b`) also `a`.
                    let mut m = file.module.clone();
                    m.pop();
                    m
                };
                let mut rest = &statement[from..];
                if from == at {
                    from += start.len();
                }
                while let Some(r) = rest.strip_prefix("super::") {
                    base.pop();
                    rest = r;
                }
                for tail in expand(rest) {
                    let mut p = base.clone();
                    p.extend(tail);
                    out.push(p);
                }
            }
        }
    }
    out
}

/// A statement's item, past the end of what came before it (closing braces) and attributes.
fn item_text(statement: &str) -> &str {
    let mut item = statement.trim_start_matches(|c: char| c.is_whitespace() || c == '}');
    while item.starts_with("#[") {
        item = item
            .split_once('\n')
            .map_or("", |(_, rest)| rest)
            .trim_start();
    }
    item
}

/// Whether a statement re-exports (`pub use`, `pub(crate) use`).
fn is_re_export(statement: &str) -> bool {
    let item = item_text(statement);
    item.starts_with("pub use ") || item.starts_with("pub(crate) use ")
}

/// The names of the modules a file declares (`mod name;`).
fn child_modules(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(';').filter_map(|statement| {
        let item = item_text(statement);
        let item = item
            .strip_prefix("pub(crate) ")
            .or_else(|| item.strip_prefix("pub "))
            .unwrap_or(item);
        let name = item.strip_prefix("mod ")?.trim();
        name.chars()
            .all(|c| c.is_alphanumeric() || c == '_')
            .then(|| name.to_owned())
    })
}

/// The leading path segments of `rest` (after a `crate::`), with one level of `{…}` groups
/// expanded.
fn expand(rest: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> (String, usize) {
        let n = s
            .char_indices()
            .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
            .map_or(s.len(), |(i, _)| i);
        (s[..n].to_owned(), n)
    };
    let mut segs = Vec::new();
    let mut s = rest.trim_start();
    loop {
        if let Some(group) = s.strip_prefix('{') {
            let mut depth = 1usize;
            let mut end = group.len();
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = j;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let inner = &group[..end];
            let mut items = Vec::new();
            let mut depth = 0usize;
            let mut item_start = 0;
            for (j, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(&inner[item_start..j]);
                        item_start = j + 1;
                    }
                    _ => {}
                }
            }
            items.push(&inner[item_start..]);
            return items
                .into_iter()
                .filter(|i| !i.trim().is_empty())
                .flat_map(|i| {
                    expand(i.trim()).into_iter().map(|t| {
                        let mut p = segs.clone();
                        p.extend(t);
                        p
                    })
                })
                .collect();
        }
        let (name, n) = ident(s);
        if name.is_empty() {
            break;
        }
        segs.push(name);
        s = &s[n..];
        match s.strip_prefix("::") {
            Some(r) => s = r,
            None => break,
        }
    }
    vec![segs]
}

/// The file a module path lands in: the deepest module that has a file; through a `mod.rs`,
/// a name it re-exports from a child (`pub use child::Name`) lands in that child.
fn resolve(
    path: &[String],
    files: &HashMap<Vec<String>, usize>,
    sources: &[SourceFile],
) -> Option<usize> {
    let mut found = None;
    let mut depth = 0;
    for d in (1..=path.len()).rev() {
        if let Some(&f) = files.get(&path[..d]) {
            found = Some(f);
            depth = d;
            break;
        }
    }
    let f = found?;
    if let (Some(name), true) = (path.get(depth), sources[f].path.ends_with("mod.rs")) {
        for statement in sources[f].text.split(';') {
            let item = item_text(statement);
            let Some(used) = item
                .strip_prefix("pub use ")
                .or_else(|| item.strip_prefix("pub(crate) use "))
            else {
                continue;
            };
            for tail in expand(used) {
                if tail.last() == Some(name) && tail.len() >= 2 {
                    let mut child = path[..depth].to_vec();
                    child.push(tail[0].clone());
                    if let Some(&c) = files.get(&child) {
                        return Some(c);
                    }
                }
            }
        }
    }
    Some(f)
}

#[test]
fn every_module_uses_only_lower_layers_and_no_file_is_in_an_import_cycle() {
    let mut problems = Vec::new();
    let table = layer_table();
    assert!(!table.is_empty(), "the layer table lists no crate");
    for (dir, layers) in &table {
        let src = workspace_root().join(dir);
        let sources = sources(&src);
        assert!(!sources.is_empty(), "{dir} holds no module");
        let layer_of: HashMap<&str, usize> = layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.iter().map(move |m| (m.as_str(), i)))
            .collect();
        let files: HashMap<Vec<String>, usize> = sources
            .iter()
            .enumerate()
            .map(|(i, f)| (f.module.clone(), i))
            .collect();
        let mut edges: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        for (i, file) in sources.iter().enumerate() {
            let top = &file.module[0];
            let Some(&own) = layer_of.get(top.as_str()) else {
                problems.push(format!("{dir}: module `{top}` is not in the layer table"));
                continue;
            };
            for path in named_paths(file) {
                let Some(first) = path.first() else { continue };
                if first != top {
                    match layer_of.get(first.as_str()) {
                        Some(&other) if other > own => {}
                        Some(_) => problems.push(format!(
                            "{dir}/{}: `{top}` uses `{}`, which is not in a lower layer",
                            file.path.display(),
                            path.join("::")
                        )),
                        None => {}
                    }
                }
                if let Some(target) = resolve(&path, &files, &sources).filter(|&t| t != i) {
                    edges.entry(i).or_default().insert(target);
                }
            }
        }
        if let Some(cycle) = find_cycle(sources.len(), &edges) {
            let names: Vec<String> = cycle
                .iter()
                .map(|&f| sources[f].path.display().to_string())
                .collect();
            problems.push(format!("{dir}: import cycle {}", names.join(" -> ")));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A cycle in the file graph, if there is one (depth-first search, colours).
fn find_cycle(n: usize, edges: &BTreeMap<usize, BTreeSet<usize>>) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    fn visit(
        v: usize,
        edges: &BTreeMap<usize, BTreeSet<usize>>,
        colour: &mut [Colour],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        colour[v] = Colour::Grey;
        stack.push(v);
        for &w in edges.get(&v).into_iter().flatten() {
            match colour[w] {
                Colour::Grey => {
                    let from = stack.iter().position(|&s| s == w).expect("on the stack");
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(w);
                    return Some(cycle);
                }
                Colour::White => {
                    if let Some(c) = visit(w, edges, colour, stack) {
                        return Some(c);
                    }
                }
                Colour::Black => {}
            }
        }
        stack.pop();
        colour[v] = Colour::Black;
        None
    }
    let mut colour = vec![Colour::White; n];
    for v in 0..n {
        if colour[v] == Colour::White
            && let Some(c) = visit(v, edges, &mut colour, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_reader_sees_inline_grouped_and_super_paths() {
    let file = SourceFile {
        path: PathBuf::from("push/plan.rs"),
        module: vec!["push".into(), "plan".into()],
        text: strip_tests(
            "mod budget;\nuse crate::{collection::Collection, hot};\nuse budget::Bytes;\n\
             fn f() { crate::service::run(); super::state::X; }\n\
             pub use crate::server::Y;\npub use budget::Rate;\n#[cfg(test)]\nmod tests { use crate::transport::Z; }\n",
        ),
    };
    let paths: BTreeSet<String> = named_paths(&file)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let expected: BTreeSet<String> = [
        "collection::Collection",
        "hot",
        "service::run",
        "push::state::X",
        "push::plan::budget::Bytes",
        "server::Y",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(paths, expected);
}
