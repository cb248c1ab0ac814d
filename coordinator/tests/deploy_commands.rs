//! Every `tessera` command line written in `deploy/` parses with the current command line, so a
//! renamed or removed flag breaks this test instead of a production rollout.
//!
//! What is read, per file type (the conventions are repeated in `deploy/README.md`):
//! - `Dockerfile`, `Containerfile`: `ENTRYPOINT`, `CMD`, `RUN` and `HEALTHCHECK … CMD`, exec form
//!   (a JSON array) or shell form; backslash continuations are joined.
//! - `*.yaml`, `*.yml`: the values of `command:`, `args:`, `entrypoint:` and `test:` keys, as a
//!   flow list `["worker", "--listen", …]` (may span lines), a block list (`- worker` lines) or a
//!   plain string. Block scalars (`|`, `>`) are not read.
//! - `*.service`: every `Exec…=` line, with backslash continuations and systemd's `%i`.
//! - `*.md`: lines of fenced code blocks tagged `sh`, `bash`, `shell`, `console` or untagged
//!   (a leading `$ ` prompt is dropped), and `ini`/`systemd` blocks as unit files; `*.sh`: every
//!   line.
//!
//! A list (exec form, YAML) is a tessera command when it holds a word `tessera` (or a path
//! ending in `/tessera`) followed by arguments, or when its first item is a tessera subcommand
//! (arguments to the image's `ENTRYPOINT ["tessera"]`). In shell text, `tessera` counts where a
//! command starts (line start, after `&&`, `|`, `;`, `$(`, after `--`, after `VAR=value`,
//! `exec`, `sudo`, `env`, `nohup`), and in `docker run`/`podman run` lines the arguments after an
//! image named `tessera:TAG` or `…/tessera:TAG` are one.
//!
//! Placeholders `${VAR}`, `${VAR:-default}`, `$(VAR)` and `$VAR` become a plausible value picked
//! by the variable's name ([`placeholder_value`]); `${VAR:-default}` takes its default.
//!
//! And so that it cannot pass on nothing: every file that mentions a server role (`tessera
//! coordinator`, `tessera worker`, or a list item `"coordinator"`/`"worker"`/`- worker`) outside
//! comments must yield at least one command line.

use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use tessera_coordinator::cli::{Cli, Command};

/// One command line found in a file: where, and the arguments after `tessera`.
#[derive(Debug, Clone, PartialEq)]
struct Found {
    line: usize,
    args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Dockerfile,
    Yaml,
    Systemd,
    Markdown,
    Shell,
    Other,
}

fn kind_of(path: &Path) -> Kind {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if name == "Dockerfile"
        || name == "Containerfile"
        || ext == "Dockerfile"
        || ext == "Containerfile"
    {
        return Kind::Dockerfile;
    }
    match ext {
        "yaml" | "yml" => Kind::Yaml,
        "service" => Kind::Systemd,
        "md" => Kind::Markdown,
        "sh" => Kind::Shell,
        _ => Kind::Other,
    }
}

fn deploy_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

// ---- placeholders ----

/// A value for `$VAR` that fits where such a variable is used in the recipes, chosen by its
/// name: secrets, ports, IP addresses, GPU indices, URLs, the image; anything else becomes
/// `placeholder-VAR` (which fails where a flag needs a number or an address, so name the
/// variable after what it holds).
fn placeholder_value(name: &str) -> String {
    let n = name.to_ascii_uppercase();
    let v = if n.contains("TOKEN") || n.contains("PASSWORD") || n.contains("SECRET") {
        "s3cret"
    } else if n.contains("REDIS") {
        "redis://redis:6379"
    } else if n.contains("COORDINATOR") {
        "http://coordinator:7070"
    } else if n.contains("LISTEN") {
        "0.0.0.0:7070"
    } else if n.contains("PORT") {
        "7070"
    } else if n == "IP" || n.ends_with("_IP") || n.contains("HOST") || n.contains("ADDR") {
        "10.0.0.7"
    } else if n.contains("GPU") || n.contains("INDEX") || n.contains("DEVICE") {
        "0"
    } else if n.contains("IMAGE") {
        "tessera:test"
    } else if n.contains("MODEL") || n.contains("DIR") || n.contains("PATH") {
        "/models/sdxl"
    } else {
        return format!("placeholder-{name}");
    };
    v.to_string()
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands `${VAR}`, `${VAR:-default}`, `$(VAR)` (Kubernetes) and `$VAR`; a `$(` that is not
/// followed by a plain name and `)` is a command substitution and stays.
fn expand(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < c.len() {
        if c[i] == '$' && i + 1 < c.len() {
            let (open, close) = match c[i + 1] {
                '{' => (true, '}'),
                '(' => (true, ')'),
                _ => (false, ' '),
            };
            if open {
                if let Some(len) = c[i + 2..].iter().position(|&x| x == close) {
                    let inner: String = c[i + 2..i + 2 + len].iter().collect();
                    let (name, default) = match inner.split_once(":-") {
                        Some((n, d)) => (n.to_string(), Some(d.to_string())),
                        None => (inner.clone(), None),
                    };
                    let plain = name.chars().next().is_some_and(is_ident_start)
                        && name.chars().all(is_ident)
                        && (close == '}' || default.is_none());
                    if plain {
                        out.push_str(&default.unwrap_or_else(|| placeholder_value(&name)));
                        i += 3 + len;
                        continue;
                    }
                }
            } else if is_ident_start(c[i + 1]) {
                let len = c[i + 1..].iter().take_while(|&&x| is_ident(x)).count();
                let name: String = c[i + 1..i + 1 + len].iter().collect();
                out.push_str(&placeholder_value(&name));
                i += 1 + len;
                continue;
            }
        }
        out.push(c[i]);
        i += 1;
    }
    out
}

/// systemd specifiers: `%i`/`%I` (the instance: a GPU index here), `%%`.
fn expand_specifiers(s: &str) -> String {
    s.replace("%%", "\u{0}")
        .replace("%i", "0")
        .replace("%I", "0")
        .replace('\u{0}', "%")
}

// ---- shell words ----

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Op(String),
}

/// Splits shell text into words and operators, with single and double quotes, backslashes and
/// `#` comments; enough for the command lines of recipes, not a shell.
fn lex(text: &str) -> Vec<Tok> {
    let c: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut i = 0;
    fn flush(toks: &mut Vec<Tok>, cur: &mut String, in_word: &mut bool) {
        if *in_word {
            toks.push(Tok::Word(std::mem::take(cur)));
            *in_word = false;
        }
    }
    while i < c.len() {
        match c[i] {
            '\'' => {
                in_word = true;
                i += 1;
                while i < c.len() && c[i] != '\'' {
                    cur.push(c[i]);
                    i += 1;
                }
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' && i + 1 < c.len() && matches!(c[i + 1], '"' | '\\' | '$') {
                        i += 1;
                    }
                    cur.push(c[i]);
                    i += 1;
                }
            }
            '\\' => {
                in_word = true;
                if i + 1 < c.len() {
                    i += 1;
                    cur.push(c[i]);
                }
            }
            '#' if !in_word => break,
            '$' if c.get(i + 1) == Some(&'(') => {
                flush(&mut toks, &mut cur, &mut in_word);
                toks.push(Tok::Op("$(".into()));
                i += 1;
            }
            '|' | '&' | ';' | '(' | ')' | '<' | '>' | '`' => {
                flush(&mut toks, &mut cur, &mut in_word);
                let mut op = c[i].to_string();
                if i + 1 < c.len() && c[i + 1] == c[i] && matches!(c[i], '|' | '&' | '>') {
                    i += 1;
                    op.push(c[i]);
                }
                toks.push(Tok::Op(op));
            }
            w if w.is_whitespace() => flush(&mut toks, &mut cur, &mut in_word),
            other => {
                in_word = true;
                cur.push(other);
            }
        }
        i += 1;
    }
    flush(&mut toks, &mut cur, &mut in_word);
    toks
}

fn is_tessera_word(w: &str) -> bool {
    w == "tessera" || w.ends_with("/tessera")
}

/// `tessera:TAG` or `registry/path/tessera:TAG`.
fn is_tessera_image(w: &str) -> bool {
    let last = w.rsplit('/').next().unwrap_or(w);
    last.split_once(':')
        .is_some_and(|(name, tag)| name == "tessera" && !tag.is_empty())
}

fn subcommands() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect()
}

/// The tessera arguments of one simple command's words, if it runs tessera.
fn command_in_words(words: &[String]) -> Option<Vec<String>> {
    let mut start = 0;
    while start < words.len() {
        let w = &words[start];
        let assignment = w
            .split_once('=')
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(is_ident));
        if assignment || matches!(w.as_str(), "exec" | "sudo" | "env" | "nohup" | "time") {
            start += 1;
        } else {
            break;
        }
    }
    let words = &words[start..];
    let first = words.first()?;
    if is_tessera_word(first) {
        return Some(words[1..].to_vec());
    }
    if let Some(p) = words.iter().position(|w| w == "--") {
        if words.get(p + 1).is_some_and(|w| is_tessera_word(w)) {
            return Some(words[p + 2..].to_vec());
        }
    }
    if matches!(first.as_str(), "docker" | "podman") && words.iter().any(|w| w == "run") {
        if let Some(p) = words.iter().position(|w| is_tessera_image(w)) {
            return Some(words[p + 1..].to_vec());
        }
    }
    None
}

/// Every tessera command in a piece of shell text.
fn commands_in_shell(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut words = Vec::new();
    let mut after_redirect = false;
    let mut toks = lex(text);
    toks.push(Tok::Op(";".into()));
    for t in toks {
        match t {
            Tok::Word(w) => {
                if after_redirect {
                    after_redirect = false;
                } else {
                    words.push(w);
                }
            }
            Tok::Op(op) => {
                if matches!(op.as_str(), "<" | ">" | ">>") {
                    after_redirect = true;
                    continue;
                }
                if let Some(args) = command_in_words(&words) {
                    out.push(args);
                }
                words.clear();
            }
        }
    }
    out
}

/// A list of words run without a shell (exec form, YAML lists): see the module comment.
fn commands_in_list(items: &[String], subcommands: &[String]) -> Vec<Vec<String>> {
    if let Some(p) = items.iter().position(|w| is_tessera_word(w)) {
        let args = items[p + 1..].to_vec();
        // `ENTRYPOINT ["tessera"]` or `command: ["tessera"]` alone: the arguments come apart.
        return if args.is_empty() { vec![] } else { vec![args] };
    }
    if items.first().is_some_and(|f| subcommands.contains(f)) {
        return vec![items.to_vec()];
    }
    // `["sh", "-c", "exec tessera worker …"]`
    items
        .iter()
        .filter(|i| i.contains(char::is_whitespace))
        .flat_map(|i| commands_in_shell(i))
        .collect()
}

/// Logical lines: a line ending in a backslash continues on the next. Returns (first line
/// number, text).
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut acc: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let (n, mut s) = acc.take().unwrap_or((i + 1, String::new()));
        let trimmed = line.trim_end();
        if let Some(head) = trimmed.strip_suffix('\\') {
            s.push_str(head);
            s.push(' ');
            acc = Some((n, s));
        } else {
            s.push_str(trimmed);
            out.push((n, s));
        }
    }
    out.extend(acc);
    out
}

// ---- per format ----

fn from_shell_text(text: &str, prompt: bool) -> Vec<Found> {
    let mut out = Vec::new();
    for (line, s) in logical_lines(text) {
        let s = s.trim_start();
        let s = if prompt {
            s.strip_prefix("$ ").unwrap_or(s)
        } else {
            s
        };
        for args in commands_in_shell(&expand(s)) {
            out.push(Found { line, args });
        }
    }
    out
}

fn from_dockerfile(text: &str, subs: &[String]) -> Vec<Found> {
    let mut out = Vec::new();
    for (line, s) in logical_lines(text) {
        let s = s.trim();
        let Some((instr, rest)) = s.split_once(char::is_whitespace) else {
            continue;
        };
        let rest = match instr.to_ascii_uppercase().as_str() {
            "CMD" | "ENTRYPOINT" | "RUN" => rest.trim(),
            "HEALTHCHECK" => match rest.find("CMD ") {
                Some(p) => rest[p + 4..].trim(),
                None => continue,
            },
            _ => continue,
        };
        // Like Docker, a `[…]` that is not a JSON array of strings is shell form.
        let found = match serde_json::from_str::<Vec<String>>(rest) {
            Ok(items) => {
                let items: Vec<String> = items.iter().map(|i| expand(i)).collect();
                commands_in_list(&items, subs)
            }
            Err(_) => commands_in_shell(&expand(rest)),
        };
        out.extend(found.into_iter().map(|args| Found { line, args }));
    }
    out
}

fn unquote_yaml(item: &str) -> String {
    let t = item.trim();
    if let Some(inner) = t.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        serde_json::from_str(t).unwrap_or_else(|_| inner.to_string())
    } else if let Some(inner) = t.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
        inner.replace("''", "'")
    } else {
        t.to_string()
    }
}

/// The items of a YAML flow list starting at `text[0] == '['`, and how many bytes it used
/// (None when it does not close).
fn flow_items(text: &str) -> Option<(Vec<String>, usize)> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, ch) in text.char_indices().skip(1) {
        match quote {
            Some(q) => {
                cur.push(ch);
                let escaped = q == '"' && prev == '\\';
                if ch == q && !escaped {
                    quote = None;
                }
            }
            None => match ch {
                '"' | '\'' => {
                    quote = Some(ch);
                    cur.push(ch);
                }
                ',' | ']' => {
                    if !cur.trim().is_empty() {
                        items.push(unquote_yaml(&cur));
                    }
                    cur.clear();
                    if ch == ']' {
                        return Some((items, i + 1));
                    }
                }
                '\n' => cur.push(' '),
                _ => cur.push(ch),
            },
        }
        prev = if prev == '\\' && ch == '\\' { ' ' } else { ch };
    }
    None
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Err names a line whose flow list never closes.
fn from_yaml(text: &str, subs: &[String]) -> Result<Vec<Found>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, raw) in lines.iter().enumerate() {
        let t = raw.trim_start();
        let t = t.strip_prefix("- ").unwrap_or(t);
        let Some((key, value)) = t.split_once(':') else {
            continue;
        };
        if !matches!(key.trim(), "command" | "args" | "entrypoint" | "test") {
            continue;
        }
        let value = value.trim();
        let items: Vec<String> = if value.starts_with('[') {
            // A flow list may run over several lines.
            let rest = std::iter::once(value)
                .chain(lines[i + 1..].iter().copied())
                .collect::<Vec<_>>()
                .join("\n");
            match flow_items(&rest) {
                Some((items, _)) => items,
                None => return Err(format!("{}: a flow list that never closes", i + 1)),
            }
        } else if value.is_empty() || value.starts_with('#') {
            let key_indent = indent(raw);
            let mut items = Vec::new();
            for next in &lines[i + 1..] {
                let nt = next.trim_start();
                if nt.is_empty() || nt.starts_with('#') {
                    continue;
                }
                match nt.strip_prefix("- ") {
                    Some(item) if indent(next) >= key_indent => items.push(unquote_yaml(item)),
                    _ => break,
                }
            }
            items
        } else if value.starts_with('|') || value.starts_with('>') {
            continue;
        } else {
            lex(&unquote_yaml(value))
                .into_iter()
                .filter_map(|t| match t {
                    Tok::Word(w) => Some(w),
                    Tok::Op(_) => None,
                })
                .collect()
        };
        let items: Vec<String> = items.iter().map(|s| expand(s)).collect();
        // A compose healthcheck `test: ["CMD", …]` runs the rest as a list.
        let items = match items.first().map(String::as_str) {
            Some("CMD") => items[1..].to_vec(),
            Some("CMD-SHELL") => {
                let found = items[1..].iter().flat_map(|s| commands_in_shell(s));
                out.extend(found.map(|args| Found { line: i + 1, args }));
                continue;
            }
            _ => items,
        };
        out.extend(
            commands_in_list(&items, subs)
                .into_iter()
                .map(|args| Found { line: i + 1, args }),
        );
    }
    Ok(out)
}

fn from_systemd(text: &str) -> Vec<Found> {
    let mut out = Vec::new();
    for (line, s) in logical_lines(text) {
        let s = s.trim();
        let Some((key, value)) = s.split_once('=') else {
            continue;
        };
        if !key.trim().starts_with("Exec") {
            continue;
        }
        let value = value.trim().trim_start_matches(['-', '@', ':', '+', '!']);
        for args in commands_in_shell(&expand(&expand_specifiers(value))) {
            out.push(Found { line, args });
        }
    }
    out
}

fn from_markdown(text: &str) -> Vec<Found> {
    let mut out = Vec::new();
    // (first line, the block's kind: shell, systemd or neither, lines)
    let mut block: Option<(usize, Kind, Vec<&str>)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        let fence = t.starts_with("```") || t.starts_with("~~~");
        match (&mut block, fence) {
            (None, true) => {
                let lang = t[3..].split_whitespace().next().unwrap_or("");
                let kind = match lang {
                    "" | "sh" | "bash" | "shell" | "console" => Kind::Shell,
                    "ini" | "systemd" => Kind::Systemd,
                    _ => Kind::Other,
                };
                block = Some((i + 2, kind, Vec::new()));
            }
            (Some((first, kind, lines)), true) => {
                let text = lines.join("\n");
                let found = match kind {
                    Kind::Shell => from_shell_text(&text, true),
                    Kind::Systemd => from_systemd(&text),
                    _ => Vec::new(),
                };
                let first = *first;
                out.extend(found.into_iter().map(|f| Found {
                    line: f.line + first - 1,
                    args: f.args,
                }));
                block = None;
            }
            (Some((_, _, lines)), false) => lines.push(line),
            (None, false) => {}
        }
    }
    out
}

fn extract(kind: Kind, text: &str, subs: &[String]) -> Result<Vec<Found>, String> {
    Ok(match kind {
        Kind::Dockerfile => from_dockerfile(text, subs),
        Kind::Yaml => from_yaml(text, subs)?,
        Kind::Systemd => from_systemd(text),
        Kind::Markdown => from_markdown(text),
        Kind::Shell => from_shell_text(text, false),
        Kind::Other => Vec::new(),
    })
}

/// Whether a file, outside `#` comment lines, names a server role as something to run.
fn mentions_role(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let role = |w: &str| w == "coordinator" || w == "worker";
            words
                .windows(2)
                .any(|p| is_tessera_word(p[0]) && role(p[1]))
                || l.contains("\"coordinator\"")
                || l.contains("\"worker\"")
                || l == "- coordinator"
                || l == "- worker"
        })
}

/// clap's verdict on one command line: None when it parses (or asks for help or the version).
fn parse_error(args: &[String]) -> Option<String> {
    let argv = std::iter::once("tessera".to_string()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(_) => None,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Problems with one file's command lines, as `file:line: …` messages.
fn check_file(name: &str, kind: Kind, text: &str, subs: &[String]) -> (usize, Vec<String>) {
    let found = match extract(kind, text, subs) {
        Ok(found) => found,
        Err(e) => return (0, vec![format!("{name}:{e}")]),
    };
    let mut problems = Vec::new();
    for f in &found {
        println!("  {name}:{}: tessera {}", f.line, f.args.join(" "));
        if let Some(err) = parse_error(&f.args) {
            let shown = f.args.join(" ");
            let err = err.trim_end().replace('\n', "\n    ");
            problems.push(format!("{name}:{}: tessera {shown}\n    {err}", f.line));
        }
    }
    if found.is_empty() && mentions_role(text) {
        problems.push(format!(
            "{name}: names a tessera role but no command line was found in it; write it in a \
             form this test reads (see deploy/README.md, \"Checked command lines\")"
        ));
    }
    (found.len(), problems)
}

#[test]
fn every_tessera_command_in_deploy_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let deploy = root.join("deploy");
    let subs = subcommands();
    let mut total = 0;
    let mut role_files = 0;
    let mut problems = Vec::new();
    for path in deploy_files(&deploy) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // not text
        };
        let name = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let (n, p) = check_file(&name, kind_of(&path), &text, &subs);
        println!("{name}: {n} tessera command line(s)");
        total += n;
        role_files += usize::from(mentions_role(&text));
        problems.extend(p);
    }
    if total < role_files {
        problems.push(format!(
            "found {total} command lines in deploy/, fewer than the {role_files} files that name \
             a tessera role"
        ));
    }
    assert!(
        role_files > 0 && total > 0,
        "no tessera command lines in {}",
        deploy.display()
    );
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n\n"));
}

// ---- the extractor itself: it must find what it claims to, and report what is broken ----

fn found_args(kind: Kind, text: &str) -> Vec<String> {
    extract(kind, text, &subcommands())
        .unwrap()
        .into_iter()
        .map(|f| format!("{}: {}", f.line, f.args.join(" ")))
        .collect()
}

#[test]
fn reads_each_format() {
    let docker = "FROM x\nENTRYPOINT [\"/usr/local/bin/tessera\"]\nCMD [\"worker\", \\\n  \"--model\", \"/m\"]\nHEALTHCHECK --interval=5s CMD [\"tessera\", \"list\"]\n";
    assert_eq!(
        found_args(Kind::Dockerfile, docker),
        ["3: worker --model /m", "5: list"]
    );

    let yaml = "spec:\n  command: [\"tessera\"]\n  args: [\"worker\", \"--device\",\n    'cuda:0', \"--advertise=http://$(POD_IP):7071\"]\n  x:\n    command:\n      - coordinator\n      - \"--listen\"\n    test: [\"CMD\", \"tessera\", \"list\"]\n    command: [\"redis-server\", \"--appendonly\", \"yes\"]\n    command: worker --model ${MODEL_DIR:-/models/a}\n";
    assert_eq!(
        found_args(Kind::Yaml, yaml),
        [
            "3: worker --device cuda:0 --advertise=http://10.0.0.7:7071",
            "6: coordinator --listen",
            "9: list",
            "11: worker --model /models/a",
        ]
    );

    let unit = "[Service]\nExecStartPre=/bin/true\nExecStart=/usr/local/bin/tessera worker \\\n    --device cuda:%i \\\n    --token ${TESSERA_TOKEN}\n";
    assert_eq!(
        found_args(Kind::Systemd, unit),
        ["3: worker --device cuda:0 --token s3cret"]
    );

    let md = "text `tessera worker` here\n\n```sh\ncargo build --release --bin tessera\n$ id=$(tessera submit --prompt \"a b\" --size 64x64) && tessera watch \"$id\"\ndocker build -t tessera:1 .\ndocker run --rm -e A=b tessera:1 list --json\nkubectl exec deploy/c -- tessera list # tessera nope\n```\n```yaml\nargs: [\"worker\"]\n```\n```ini\nExecStart=/bin/tessera list\n```\n";
    assert_eq!(
        found_args(Kind::Markdown, md),
        [
            "5: submit --prompt a b --size 64x64",
            "5: watch placeholder-id",
            "7: list --json",
            "8: list",
            "14: list",
        ]
    );
}

#[test]
fn reports_a_broken_flag_and_a_file_it_cannot_read() {
    let subs = subcommands();
    let broken = "ExecStart=/usr/bin/tessera coordinator --listen 0.0.0.0:7070 --no-such-flag\n";
    let (n, problems) = check_file("x.service", Kind::Systemd, broken, &subs);
    assert_eq!(n, 1);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("x.service:1: tessera coordinator"));
    assert!(problems[0].contains("--no-such-flag"), "{}", problems[0]);

    let bad_addr = "args: [\"worker\", \"--model\", \"/m\", \"--listen\", \"$(POD_NAME):7071\"]\n";
    let (_, problems) = check_file("w.yaml", Kind::Yaml, bad_addr, &subs);
    assert_eq!(problems.len(), 1, "{problems:?}");

    let unreadable = "args: |\n  tessera worker --model /m\n";
    let (n, problems) = check_file("u.yaml", Kind::Yaml, unreadable, &subs);
    assert_eq!(n, 0);
    assert_eq!(problems.len(), 1, "{problems:?}");

    let unclosed = "x: 1\nargs: [\"worker\", \"--model\"\n";
    let (_, problems) = check_file("c.yaml", Kind::Yaml, unclosed, &subs);
    assert_eq!(problems, ["c.yaml:2: a flow list that never closes"]);
}

// ---- what must outlive a restart: the coordinator's images and Redis' data ----
//
// Every recipe that runs a coordinator must give it an `--output-dir` on storage that outlives
// the process (the default, the temporary directory, is a systemd `PrivateTmp`, a Kubernetes
// `emptyDir` or the container's own layer), and every recipe that runs Redis must run it with
// AOF on a volume. The YAML here is read by indentation, enough for these recipes.

/// The `--output-dir` of each coordinator command line in a file (`None` when the flag is left
/// out), with its line.
fn coordinator_output_dirs(kind: Kind, text: &str) -> Vec<(usize, Option<PathBuf>)> {
    let found = extract(kind, text, &subcommands()).unwrap_or_default();
    found
        .into_iter()
        .filter_map(|f| {
            let argv = std::iter::once("tessera".to_string()).chain(f.args);
            match Cli::try_parse_from(argv).ok()?.command {
                Command::Coordinator(a) => Some((f.line, a.output_dir)),
                _ => None,
            }
        })
        .collect()
}

/// The output directory of a coordinator line, or why there is none to keep.
fn required_dir(line: usize, dir: Option<PathBuf>) -> Result<PathBuf, String> {
    dir.ok_or_else(|| {
        format!(
            "{line}: the coordinator has no --output-dir, so its finished images go to a \
             temporary directory that a restart empties"
        )
    })
}

fn significant(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// The lines below line `at` that are indented deeper than it: its block.
fn block_below<'a>(lines: &[&'a str], at: usize) -> Vec<&'a str> {
    let base = indent(lines[at]);
    lines[at + 1..]
        .iter()
        .copied()
        .filter(|l| significant(l))
        .take_while(|l| indent(l) > base)
        .collect()
}

/// The value of `key` on a YAML line (`key: value` or `- key: value`), or inside a flow map on
/// it (`{claimName: x}`), unquoted and without a trailing comment.
fn yaml_value(line: &str, key: &str) -> Option<String> {
    let t = line.trim_start().trim_start_matches("- ");
    let t = t.split(" #").next().unwrap_or(t);
    if let Some(v) = t.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
        return Some(unquote_yaml(v.trim()));
    }
    let inner = t.split_once('{')?.1.split_once('}')?.0;
    inner.split(',').find_map(|pair| {
        let (k, v) = pair.split_once(':')?;
        (k.trim() == key).then(|| unquote_yaml(v.trim()))
    })
}

/// The items of the list under the first `key:` line of `block`, each as its lines.
fn list_under<'a>(block: &[&'a str], key: &str) -> Vec<Vec<&'a str>> {
    let Some(at) = block
        .iter()
        .position(|l| yaml_value(l, key).is_some_and(|v| v.is_empty()))
    else {
        return Vec::new();
    };
    let mut items: Vec<Vec<&str>> = Vec::new();
    let mut item_indent = None;
    for line in block_below(block, at) {
        let starts_item = line.trim_start().starts_with("- ");
        match item_indent {
            None if starts_item => item_indent = Some(indent(line)),
            Some(i) if indent(line) < i => break,
            _ => {}
        }
        if starts_item && Some(indent(line)) == item_indent {
            items.push(vec![line]);
        } else if let Some(last) = items.last_mut() {
            last.push(line);
        }
    }
    items
}

fn item_value(item: &[&str], key: &str) -> Option<String> {
    item.iter().find_map(|l| yaml_value(l, key))
}

/// Whether `dir` is `mount` or lies under it.
fn covers(mount: &str, dir: &Path) -> bool {
    !mount.is_empty() && dir.starts_with(mount)
}

/// `SOURCE:TARGET[:MODE]` of a compose or `docker run -v` volume: (source, target, read-only).
/// Whether a Redis command line turns AOF on: `--appendonly yes` as list items
/// (`"--appendonly", "yes"`) or as words of a shell script (`sh -c "exec redis-server
/// --appendonly yes …"`, as the recipes that add ACL users from the environment run it).
fn turns_on_aof(text: &str) -> bool {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .map(|w| w.trim_matches(|c| c == '"' || c == '\''))
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .any(|p| p[0] == "--appendonly" && p[1] == "yes")
}

fn split_volume(spec: &str) -> Option<(String, String, bool)> {
    let mut parts = spec.splitn(3, ':');
    let (source, target) = (parts.next()?, parts.next()?);
    let ro = parts
        .next()
        .is_some_and(|m| m.split(',').any(|o| o == "ro"));
    Some((source.to_string(), target.to_string(), ro))
}

/// A volume source that outlives the container: a named volume (declared, where the format
/// declares them) or a host directory.
fn persistent_source(source: &str, declared: Option<&[String]>) -> Result<(), String> {
    let host = source.starts_with('/') || source.starts_with('.') || source.starts_with('$');
    match declared {
        _ if host => Ok(()),
        Some(names) if !names.iter().any(|n| n == source) => Err(format!(
            "volume {source} is not declared under the top-level volumes:"
        )),
        _ => Ok(()),
    }
}

/// Compose: the services (name and block), and the named volumes declared at the top level.
fn compose_services<'a>(lines: &[&'a str]) -> (Vec<(String, Vec<&'a str>)>, Vec<String>) {
    let top = |key: &str| {
        lines
            .iter()
            .position(|l| indent(l) == 0 && l.trim_end() == key)
    };
    let children = |at: Option<usize>| -> Vec<(usize, String)> {
        let Some(at) = at else { return Vec::new() };
        let depth = block_below(lines, at)
            .first()
            .map(|l| indent(l))
            .unwrap_or(0);
        (at + 1..lines.len())
            .filter(|&i| significant(lines[i]))
            .take_while(|&i| indent(lines[i]) > 0)
            .filter(|&i| indent(lines[i]) == depth)
            .map(|i| {
                (
                    i,
                    lines[i].trim().split(':').next().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let services = children(top("services:"))
        .into_iter()
        .map(|(i, name)| (name, block_below(lines, i)))
        .collect();
    let volumes = children(top("volumes:"))
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    (services, volumes)
}

fn compose_mounts(block: &[&str]) -> Vec<(String, String, bool)> {
    list_under(block, "volumes")
        .iter()
        .filter_map(|item| {
            split_volume(&unquote_yaml(item[0].trim_start().trim_start_matches("- ")))
        })
        .collect()
}

fn compose_keeps_data(text: &str) -> Result<(), String> {
    let lines: Vec<&str> = text.lines().collect();
    let (services, declared) = compose_services(&lines);
    for (line, dir) in coordinator_output_dirs(Kind::Yaml, text) {
        let dir = required_dir(line, dir)?;
        let (name, block) = services
            .iter()
            .find(|(_, b)| b.contains(&lines[line - 1]))
            .ok_or(format!("{line}: a coordinator outside services:"))?;
        let mounts = compose_mounts(block);
        let (source, _, ro) = mounts
            .iter()
            .find(|(_, target, _)| covers(target, &dir))
            .ok_or(format!(
                "{line}: service {name} mounts no volume over --output-dir {}",
                dir.display()
            ))?;
        if *ro {
            return Err(format!(
                "{line}: the volume over {} is read-only",
                dir.display()
            ));
        }
        persistent_source(source, Some(&declared)).map_err(|e| format!("{line}: {e}"))?;
    }
    for (name, block) in &services {
        if !runs_redis_server(block) {
            continue;
        }
        if !turns_on_aof(&block.join("\n")) {
            return Err(format!(
                "service {name} runs Redis without --appendonly yes"
            ));
        }
        let mounts = compose_mounts(block);
        let (source, _, _) = mounts
            .iter()
            .find(|(_, target, _)| target == "/data")
            .ok_or(format!("service {name} keeps Redis' /data on no volume"))?;
        persistent_source(source, Some(&declared))?;
    }
    Ok(())
}

/// Whether a compose service or a Kubernetes document runs a Redis server (the Redis image
/// also serves one-shot `redis-cli` jobs, such as the cluster recipe's creation step).
fn runs_redis_server<S: AsRef<str>>(lines: &[S]) -> bool {
    let lines = || lines.iter().map(AsRef::as_ref);
    lines().any(|l| yaml_value(l, "image").is_some_and(|i| i.starts_with("redis")))
        && lines().any(|l| l.contains("redis-server"))
}

/// Kubernetes manifests: the documents of every YAML file in a directory, as lines.
fn k8s_documents(files: &[(String, String)]) -> Vec<(String, Vec<String>)> {
    files
        .iter()
        .flat_map(|(name, text)| {
            text.split("\n---")
                .map(|doc| (name.clone(), doc.lines().map(str::to_string).collect()))
        })
        .collect()
}

fn k8s_keeps_data(files: &[(String, String)]) -> Result<(), String> {
    let docs = k8s_documents(files);
    let kind_of_doc = |doc: &[&str]| {
        doc.iter()
            .find_map(|l| (indent(l) == 0).then(|| yaml_value(l, "kind")).flatten())
    };
    let claims: Vec<String> = docs
        .iter()
        .filter_map(|(_, doc)| {
            let doc: Vec<&str> = doc.iter().map(String::as_str).collect();
            (kind_of_doc(&doc).as_deref() == Some("PersistentVolumeClaim"))
                .then(|| item_value(&doc, "name"))
                .flatten()
        })
        .collect();
    let mut redis = 0;
    for (file, doc) in &docs {
        let doc: Vec<&str> = doc.iter().map(String::as_str).collect();
        let text = doc.join("\n");
        let mounts: Vec<(String, String)> = list_under(&doc, "volumeMounts")
            .iter()
            .filter_map(|m| Some((item_value(m, "name")?, item_value(m, "mountPath")?)))
            .collect();
        let volumes = list_under(&doc, "volumes");
        for (line, dir) in coordinator_output_dirs(Kind::Yaml, &text) {
            let at = format!("{file} (document line {line})");
            let dir = required_dir(line, dir).map_err(|e| format!("{file}: {e}"))?;
            let (name, _) = mounts
                .iter()
                .find(|(_, path)| covers(path, &dir))
                .ok_or(format!(
                    "{at}: no volume is mounted over --output-dir {}",
                    dir.display()
                ))?;
            let volume = volumes
                .iter()
                .find(|v| item_value(v, "name").as_ref() == Some(name))
                .ok_or(format!("{at}: volume {name} is mounted but not defined"))?;
            let persistent = match item_value(volume, "claimName") {
                Some(claim) if claims.contains(&claim) => true,
                Some(claim) => return Err(format!("{at}: claim {claim} is defined nowhere")),
                None => item_value(volume, "hostPath").is_some(),
            };
            if !persistent {
                return Err(format!(
                    "{at}: --output-dir {} is on volume {name}, which is not a persistent \
                     volume claim (an emptyDir dies with the pod)",
                    dir.display()
                ));
            }
        }
        if !runs_redis_server(&doc) {
            continue;
        }
        redis += 1;
        if !turns_on_aof(&text) {
            return Err(format!("{file}: Redis runs without --appendonly yes"));
        }
        let (data, _) = mounts
            .iter()
            .find(|(_, path)| path == "/data")
            .ok_or(format!("{file}: Redis' /data is mounted from no volume"))?;
        let templates = list_under(&doc, "volumeClaimTemplates");
        if !templates
            .iter()
            .any(|t| item_value(t, "name").as_ref() == Some(data))
        {
            return Err(format!(
                "{file}: Redis' /data (volume {data}) has no volume claim template"
            ));
        }
    }
    if redis == 0 {
        return Err("no Redis StatefulSet found".into());
    }
    Ok(())
}

/// systemd: `--output-dir` under the unit's `StateDirectory=` (kept across restarts and
/// reboots, and writable despite `ProtectSystem=strict`).
fn systemd_keeps_data(text: &str) -> Result<(), String> {
    let states: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("StateDirectory="))
        .flat_map(|v| v.split_whitespace().map(|d| format!("/var/lib/{d}")))
        .collect();
    for (line, dir) in coordinator_output_dirs(Kind::Systemd, text) {
        let dir = required_dir(line, dir)?;
        if !states.iter().any(|s| covers(s, &dir)) {
            return Err(format!(
                "{line}: --output-dir {} is not under the unit's StateDirectory ({states:?})",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// `-v SOURCE:TARGET` / `--volume` options of a `docker run` line, before the image.
fn docker_volumes(words: &[String]) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let spec = match w.as_str() {
            "-v" | "--volume" => words.get(i + 1).cloned(),
            _ => w.strip_prefix("--volume=").map(str::to_string),
        };
        out.extend(spec.as_deref().and_then(split_volume));
    }
    out
}

fn shell_words(line: &str) -> Vec<String> {
    lex(&expand(line))
        .into_iter()
        .filter_map(|t| match t {
            Tok::Word(w) => Some(w),
            Tok::Op(_) => None,
        })
        .collect()
}

/// Markdown: a coordinator in a `docker run` line has a volume over its `--output-dir`, a
/// Redis container runs with AOF on a volume, and a worker container tells the image's health
/// check its port (`TESSERA_HEALTH_PORT`).
fn docker_run_keeps_data(text: &str) -> Result<(), String> {
    let lines: Vec<&str> = text.lines().collect();
    for (line, dir) in coordinator_output_dirs(Kind::Markdown, text) {
        let dir = required_dir(line, dir)?;
        let words = shell_words(lines[line - 1]);
        if !words.iter().any(|w| w == "run") {
            continue;
        }
        let image = words
            .iter()
            .position(|w| is_tessera_image(w))
            .unwrap_or(words.len());
        let volumes = docker_volumes(&words[..image]);
        let (source, _, _) = volumes
            .iter()
            .find(|(_, target, _)| covers(target, &dir))
            .ok_or(format!(
                "{line}: no -v volume over --output-dir {}",
                dir.display()
            ))?;
        persistent_source(source, None).map_err(|e| format!("{line}: {e}"))?;
    }
    for (i, raw) in lines.iter().enumerate() {
        let words = shell_words(raw);
        if !(words.first().is_some_and(|w| w == "docker") && words.iter().any(|w| w == "run")) {
            continue;
        }
        let line = i + 1;
        if let Some(image) = words.iter().position(|w| w.starts_with("redis:")) {
            let args = &words[image..];
            if !turns_on_aof(&args.join(" ")) {
                return Err(format!("{line}: Redis runs without --appendonly yes"));
            }
            if !docker_volumes(&words[..image])
                .iter()
                .any(|(_, t, _)| t == "/data")
            {
                return Err(format!("{line}: Redis' /data is on no volume"));
            }
        }
        let Some(image) = words.iter().position(|w| is_tessera_image(w)) else {
            continue;
        };
        let argv = std::iter::once("tessera").chain(words[image + 1..].iter().map(String::as_str));
        if let Ok(Cli {
            command: Command::Worker(w),
        }) = Cli::try_parse_from(argv)
        {
            let port = format!("TESSERA_HEALTH_PORT={}", w.listen.port());
            if !words[..image].contains(&port) {
                return Err(format!(
                    "{line}: a worker listening on {} needs -e {port} for the image's health check",
                    w.listen
                ));
            }
        }
    }
    Ok(())
}

/// Dockerfile: a default coordinator command keeps its images on a declared `VOLUME`.
fn dockerfile_keeps_data(text: &str) -> Result<(), String> {
    let volumes: Vec<String> = logical_lines(text)
        .iter()
        .filter_map(|(_, l)| l.trim().strip_prefix("VOLUME"))
        .flat_map(|v| {
            v.split(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | ',' | '"'))
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    for (line, dir) in coordinator_output_dirs(Kind::Dockerfile, text) {
        let dir = required_dir(line, dir)?;
        if !volumes.iter().any(|v| covers(v, &dir)) {
            return Err(format!(
                "{line}: --output-dir {} is not on a VOLUME, so it stays in the container's layer",
                dir.display()
            ));
        }
    }
    Ok(())
}

#[test]
fn every_recipe_keeps_finished_images_and_redis_data_on_persistent_storage() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = Vec::new();
    let mut k8s = Vec::new();
    let mut checked = Vec::new();
    for path in deploy_files(&root.join("deploy")) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let name = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let kind = kind_of(&path);
        let result = match kind {
            Kind::Yaml if text.lines().any(|l| l.trim_end() == "services:") => {
                compose_keeps_data(&text)
            }
            Kind::Yaml => {
                k8s.push((name.clone(), text.clone()));
                Ok(())
            }
            Kind::Systemd => systemd_keeps_data(&text),
            Kind::Markdown => docker_run_keeps_data(&text),
            Kind::Dockerfile => dockerfile_keeps_data(&text),
            _ => Ok(()),
        };
        if !coordinator_output_dirs(kind, &text).is_empty() {
            checked.push(name.clone());
        }
        problems.extend(result.err().map(|e| format!("{name}:{e}")));
    }
    if !k8s.is_empty() {
        problems.extend(k8s_keeps_data(&k8s).err());
    }
    println!("coordinators checked in: {checked:?}");
    // compose, Kubernetes, systemd, the docker run lines and the image itself.
    assert!(checked.len() >= 5, "only {checked:?} run a coordinator");
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

#[test]
fn the_persistence_check_catches_recipes_that_lose_images() {
    let compose = "services:\n  redis:\n    image: redis:7.4\n    command: [\"redis-server\", \"--appendonly\", \"yes\"]\n    volumes:\n      - redis-data:/data\n  coordinator:\n    command: [\"coordinator\", \"--output-dir\", \"/out\"]\n    volumes:\n      - out:/out\nvolumes:\n  redis-data:\n  out:\n";
    assert_eq!(compose_keeps_data(compose), Ok(()));
    let undeclared = compose.replace("  out:\n", "");
    assert!(compose_keeps_data(&undeclared)
        .unwrap_err()
        .contains("not declared"));
    let unmounted = compose.replace("      - out:/out\n", "      - out:/elsewhere\n");
    assert!(compose_keeps_data(&unmounted)
        .unwrap_err()
        .contains("mounts no volume"));
    let no_flag = compose.replace(", \"--output-dir\", \"/out\"", "");
    assert!(compose_keeps_data(&no_flag)
        .unwrap_err()
        .contains("no --output-dir"));
    let no_aof = compose.replace("\"--appendonly\", \"yes\"", "\"--save\", \"\"");
    assert!(compose_keeps_data(&no_aof)
        .unwrap_err()
        .contains("appendonly"));
    // Redis started from a shell script (to add ACL users from the environment).
    let script = "[\"sh\", \"-c\", \"exec redis-server --appendonly yes --user default off\"]";
    let shell = compose.replace("[\"redis-server\", \"--appendonly\", \"yes\"]", script);
    assert_eq!(compose_keeps_data(&shell), Ok(()));
    let shell_no_aof = shell.replace("--appendonly yes", "--appendonly no");
    assert!(compose_keeps_data(&shell_no_aof)
        .unwrap_err()
        .contains("appendonly"));

    let pod = "kind: Deployment\nspec:\n  template:\n    spec:\n      containers:\n        - name: c\n          args: [\"coordinator\", \"--output-dir\", \"/out\"]\n          volumeMounts:\n            - name: out\n              mountPath: /out\n      volumes:\n        - name: out\n          persistentVolumeClaim: {claimName: keep}\n";
    let redis = "kind: StatefulSet\nspec:\n  template:\n    spec:\n      containers:\n        - name: redis\n          image: redis:7.4\n          args: [\"redis-server\", \"--appendonly\", \"yes\"]\n          volumeMounts:\n            - name: data\n              mountPath: /data\n  volumeClaimTemplates:\n    - metadata:\n        name: data\n";
    let claim = "kind: PersistentVolumeClaim\nmetadata:\n  name: keep\n";
    let files = |pod: &str| {
        vec![
            ("c.yaml".to_string(), format!("{claim}---\n{pod}")),
            ("r.yaml".to_string(), redis.to_string()),
        ]
    };
    assert_eq!(k8s_keeps_data(&files(pod)), Ok(()));
    let empty = pod.replace("persistentVolumeClaim: {claimName: keep}", "emptyDir: {}");
    assert!(k8s_keeps_data(&files(&empty))
        .unwrap_err()
        .contains("emptyDir"));
    let unknown = pod.replace("claimName: keep", "claimName: lost");
    assert!(k8s_keeps_data(&files(&unknown))
        .unwrap_err()
        .contains("defined nowhere"));

    let unit = "[Service]\nStateDirectory=tessera\nExecStart=/bin/tessera coordinator --output-dir /var/lib/tessera/out\n";
    assert_eq!(systemd_keeps_data(unit), Ok(()));
    let tmp = unit.replace("/var/lib/tessera/out", "/tmp/out");
    assert!(systemd_keeps_data(&tmp)
        .unwrap_err()
        .contains("StateDirectory"));

    let md = "```sh\ndocker run -v keep:/out tessera:1 coordinator --output-dir /out\ndocker run -e TESSERA_HEALTH_PORT=7071 tessera:1 worker --listen 0.0.0.0:7071 --model /m\n```\n";
    assert_eq!(docker_run_keeps_data(md), Ok(()));
    let lost = md.replace("-v keep:/out ", "");
    assert!(docker_run_keeps_data(&lost)
        .unwrap_err()
        .contains("no -v volume"));
    let unhealthy = md.replace("-e TESSERA_HEALTH_PORT=7071 ", "");
    assert!(docker_run_keeps_data(&unhealthy)
        .unwrap_err()
        .contains("TESSERA_HEALTH_PORT=7071"));

    let docker = "FROM x\nVOLUME [\"/out\"]\nENTRYPOINT [\"tessera\"]\nCMD [\"coordinator\", \"--output-dir\", \"/out\"]\n";
    assert_eq!(dockerfile_keeps_data(docker), Ok(()));
    let layer = docker.replace("VOLUME [\"/out\"]\n", "");
    assert!(dockerfile_keeps_data(&layer)
        .unwrap_err()
        .contains("VOLUME"));
}
