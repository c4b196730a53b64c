//! The check that dependencies in this crate point one way: it reads every `tracer/src/**/*.rs` file, finds each
//! path into another top module (`crate::…`, nested `use crate::{…}` blocks, and `super::` that climbs out of
//! its top module), and fails naming the file and the import whenever a module reaches one in its own layer or
//! above (see [`LAYERS`] and the crate's documentation).

use std::{
    fs,
    path::{Path, PathBuf},
};

/// The crate's top modules, low to high: a module may use any module of a lower layer, none of its own layer
/// or above. The binary (`main.rs`) is above them all.
const LAYERS: &[&[&str]] = &[
    // Thin wrappers of the OS, and what the kernel side shares with userspace.
    &["os", "system", "tables", "sampling", "decode", "ring"],
    // The uprobes' own bookkeeping; what is known of a process (maps, container, symbols).
    &["uprobe_events", "procs"],
    // A process's Python runtime; the ledger (pure).
    &["python", "aggregate"],
    // The data every stage shares; loading and attaching the eBPF programs.
    &["model", "probes"],
    // Report builders, pure functions of the model; the command alloctrace starts.
    &["report", "spawn"],
    // One writer per format.
    &["output"],
    // One trace: the event loop, target policy and accounting.
    &["trace"],
    // The long-running host process.
    &["agent"],
    // Command-line arguments, converted into the library's own config; the logger.
    &["cli", "logging"],
];

/// An import that breaks the layering: where it is, and what it reaches.
#[derive(Debug, PartialEq, Eq)]
struct Violation {
    file: PathBuf,
    line: usize,
    /// The top module of the file.
    from: String,
    /// The top module it uses.
    to: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: `{}` uses `crate::{}`, which is not in a lower layer",
            self.file.display(),
            self.line,
            self.from,
            self.to
        )
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// `src`'s source with comments blanked out (newlines kept, so that lines still count): a doc link to a module
/// above is no dependency. String literals are kept: `serialize_with = "crate::…"` names a real one.
fn strip_comments(src: &str) -> String {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < chars.len() {
        match (chars[i], chars.get(i + 1).copied()) {
            ('/', Some('/')) => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ('/', Some('*')) => {
                // Block comments nest in Rust.
                let mut depth = 0;
                while i < chars.len() {
                    match (chars[i], chars.get(i + 1).copied()) {
                        ('/', Some('*')) => {
                            depth += 1;
                            i += 2;
                        }
                        ('*', Some('/')) => {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        (c, _) => {
                            if c == '\n' {
                                out.push('\n');
                            }
                            i += 1;
                        }
                    }
                }
            }
            ('"', _) => {
                // A string, escapes and all: a `//` inside it starts no comment.
                out.push('"');
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        out.push(chars[i]);
                        i += 1;
                    }
                    out.push(chars[i]);
                    i += 1;
                }
                out.push('"');
                i += 1;
            }
            ('\'', next) if next == Some('\\') || chars.get(i + 2) == Some(&'\'') => {
                // A character literal ('"', '\'', '\u{22}'), not a lifetime: copied whole. An escaped one ends
                // at the first quote past its backslash and the character after it.
                let from = if next == Some('\\') { i + 3 } else { i + 2 };
                let end = (from..chars.len())
                    .find(|&j| chars[j] == '\'')
                    .unwrap_or(chars.len() - 1);
                out.extend(&chars[i..=end]);
                i = end + 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other,
}

/// The tokens of comment-free source, each with its line.
fn tokens(src: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push((Token::Ident(chars[start..i].iter().collect()), line));
            continue;
        }
        let token = match (c, chars.get(i + 1)) {
            (':', Some(':')) => {
                i += 1;
                Token::PathSep
            }
            ('{', _) => Token::Open,
            ('}', _) => Token::Close,
            (',', _) => Token::Comma,
            ('\n', _) => {
                line += 1;
                i += 1;
                continue;
            }
            (c, _) if c.is_whitespace() => {
                i += 1;
                continue;
            }
            _ => Token::Other,
        };
        tokens.push((token, line));
        i += 1;
    }
    tokens
}

/// The first segment of each path that starts at `tokens[at]`: `name` alone, or each item of a `{…}` group.
fn first_segments(tokens: &[(Token, usize)], at: usize) -> Vec<String> {
    match tokens.get(at) {
        Some((Token::Ident(name), _)) => vec![name.clone()],
        Some((Token::Open, _)) => {
            let mut names = Vec::new();
            let mut depth = 0;
            let mut item_start = true;
            for (token, _) in &tokens[at + 1..] {
                match token {
                    Token::Open => depth += 1,
                    Token::Close if depth == 0 => break,
                    Token::Close => depth -= 1,
                    Token::Comma if depth == 0 => {
                        item_start = true;
                        continue;
                    }
                    Token::Ident(name) if depth == 0 && item_start => names.push(name.clone()),
                    _ => {}
                }
                item_start = false;
            }
            names
        }
        _ => Vec::new(),
    }
}

/// The module path of a file under `src`: `report/leaks.rs` is `report::leaks`, `report/mod.rs` is `report`,
/// `lib.rs` the crate root.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("a file under src");
    let mut path: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(path.last().map(String::as_str), Some("mod" | "lib")) {
        path.pop();
    }
    path
}

/// Every top module `file` (at `module` in the crate) uses other than its own, with the line of the use.
fn uses(file_src: &str, module: &[String]) -> Vec<(String, usize)> {
    let tokens = tokens(&strip_comments(file_src));
    let mut found = Vec::new();
    // Inline modules (`mod tests { … }`) open inside the file: `super::` there climbs out of them first.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    for (at, (token, line)) in tokens.iter().enumerate() {
        let starts_path = at == 0 || tokens[at - 1].0 != Token::PathSep;
        match token {
            Token::Open => {
                depth += 1;
                if let (Some((Token::Ident(keyword), _)), Some((Token::Ident(name), _))) = (
                    at.checked_sub(2).map(|i| &tokens[i]),
                    at.checked_sub(1).map(|i| &tokens[i]),
                ) && keyword == "mod"
                {
                    inline.push((name.clone(), depth));
                }
            }
            Token::Close => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth -= 1;
            }
            Token::Ident(name)
                if name == "crate"
                    && starts_path
                    && tokens.get(at + 1).map(|t| &t.0) == Some(&Token::PathSep) =>
            {
                found.extend(
                    first_segments(&tokens, at + 2)
                        .into_iter()
                        .map(|m| (m, *line)),
                );
            }
            Token::Ident(name) if name == "super" && starts_path => {
                let mut here: Vec<String> = module.to_vec();
                here.extend(inline.iter().map(|(name, _)| name.clone()));
                let mut next = at;
                while matches!(&tokens.get(next), Some((Token::Ident(s), _)) if s == "super")
                    && tokens.get(next + 1).map(|t| &t.0) == Some(&Token::PathSep)
                {
                    here.pop();
                    next += 2;
                }
                match here.first() {
                    Some(top) => found.push((top.clone(), *line)),
                    None => found.extend(
                        first_segments(&tokens, next)
                            .into_iter()
                            .map(|m| (m, *line)),
                    ),
                }
            }
            _ => {}
        }
    }
    let own = module.first().cloned().unwrap_or_default();
    found.retain(|(m, _)| *m != own && m != "self" && m != "super");
    found
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
    {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Every import under `src` that goes sideways or upward, and every top module that is in no layer.
fn check(src: &Path) -> (Vec<Violation>, Vec<String>) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut unplaced = Vec::new();
    for file in files {
        // The binary: `crate::` there is the binary's own crate, above every layer. And this check, which uses
        // nothing of the crate.
        if file == src.join("main.rs") || file == src.join("layers.rs") {
            continue;
        }
        let module = module_path(src, &file);
        let Some(from) = module.first() else {
            continue;
        };
        let Some(rank) = layer_of(from) else {
            if !unplaced.contains(from) {
                unplaced.push(from.clone());
            }
            continue;
        };
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for (to, line) in uses(&text, &module) {
            if layer_of(&to).is_none_or(|r| r >= rank) {
                violations.push(Violation {
                    file: file.strip_prefix(src).unwrap_or(&file).to_path_buf(),
                    line,
                    from: from.clone(),
                    to,
                });
            }
        }
    }
    (violations, unplaced)
}

#[test]
fn nothing_imports_upward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (violations, unplaced) = check(&src);
    assert!(
        unplaced.is_empty(),
        "top modules in no layer of layers.rs's LAYERS (place each): {unplaced:?}"
    );
    assert!(
        violations.is_empty(),
        "imports that are not downward (see LAYERS in layers.rs):\n{}",
        violations
            .iter()
            .map(Violation::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Files other than `cli.rs` (and the binary) that name the `clap` crate, with the line of the first mention:
/// the library below `cli` takes its own config, never clap's types.
fn clap_below_cli(src: &Path) -> Vec<(PathBuf, usize)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        if [
            src.join("cli.rs"),
            src.join("main.rs"),
            src.join("layers.rs"),
        ]
        .contains(&file)
        {
            continue;
        }
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let tokens = tokens(&strip_comments(&text));
        if let Some((_, line)) = tokens.iter().enumerate().find_map(|(at, (token, line))| {
            let named = *token == Token::Ident("clap".to_owned())
                && tokens.get(at + 1).map(|t| &t.0) == Some(&Token::PathSep);
            named.then_some((at, *line))
        }) {
            found.push((file.strip_prefix(src).unwrap_or(&file).to_path_buf(), line));
        }
    }
    found
}

#[test]
fn clap_stays_in_cli() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    assert_eq!(
        clap_below_cli(&src),
        [],
        "files below cli that use clap (convert in cli.rs instead)"
    );
}

#[test]
fn every_layered_module_exists() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in LAYERS.iter().flat_map(|layer| layer.iter()) {
        assert!(
            src.join(format!("{module}.rs")).is_file() || src.join(module).join("mod.rs").is_file(),
            "LAYERS names `{module}`, which has no file under src"
        );
    }
}

#[test]
fn nested_groups_super_and_strings_are_read_and_comments_are_not() {
    let src = r#"
//! See [`crate::agent`]: a doc link is no dependency.
use crate::{
    aggregate::{Ledger, Site},
    cli::TargetArgs, system,
};
#[serde(serialize_with = "crate::procs::hex")]
struct A;
/* crate::trace in a block comment */
fn f() { let _ = '"'; let _ = "// not a comment"; crate::os::stop(); }
pub(crate) fn g() {}
mod tests {
    use super::*;
    use super::super::super::output::Format;
}
"#;
    let module = vec!["report".to_owned(), "leaks".to_owned()];
    assert_eq!(
        uses(src, &module),
        vec![
            ("aggregate".to_owned(), 3),
            ("cli".to_owned(), 3),
            ("system".to_owned(), 3),
            ("procs".to_owned(), 7),
            ("os".to_owned(), 10),
            ("output".to_owned(), 14),
        ]
    );
    // From `report/mod.rs`, `super::` is the crate root: what follows is another top module.
    let root = "use super::{trace::Trace, model};\nmod tests { use super::*; }";
    assert_eq!(
        uses(root, &["report".to_owned()]),
        vec![("trace".to_owned(), 1), ("model".to_owned(), 1)]
    );
}
