//! The documentation as a user reads it, held to the code: the metrics reference is
//! generated from the registry, every code block marked runnable is run by a test
//! (this module knows which), every relative link resolves, and the README stays a
//! first screen plus short sections.
//!
//! A block is marked runnable by its info string: ```` ```sh runnable:smoke ````
//! (GitHub shows the first word as the language and ignores the rest). Tests take a
//! block by name with [`runnable`] and check behaviour through it, never a sentence.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::support::repo_path;

crate::support::tests![
    metrics_reference_is_generated_from_the_registry,
    every_runnable_block_is_run_by_a_test,
    every_relative_link_in_the_docs_resolves,
    readme_is_a_first_screen_and_short_sections,
];

/// Every runnable block, by name, and the test that runs it.
const RUN_BY: &[(&str, &str)] = &[
    (
        "smoke",
        "tcp_echo::documented_smoke_commands_print_hello_and_return_at_once",
    ),
    (
        "service-smoke",
        "tcp_echo::documented_smoke_commands_print_hello_and_return_at_once",
    ),
    (
        "dual-stack",
        "tcp_echo::ipv6_wildcard_listens_for_ipv6_only_and_both_families_need_both_addresses",
    ),
    ("haproxy", "proxy_protocol (Haproxy::start)"),
];

/// The files a user reads: README.md and every Markdown file under docs/.
pub fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![repo_path("README.md")];
    let mut guides: Vec<PathBuf> = std::fs::read_dir(repo_path("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    guides.sort();
    files.extend(guides);
    files
}

/// A fenced code block marked `runnable:NAME`.
#[derive(Debug)]
pub struct Block {
    pub file: PathBuf,
    pub name: String,
    pub text: String,
}

/// Every block marked runnable in `text`.
fn blocks_in(file: &std::path::Path, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(info)) => {
                let name = info
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("runnable:"))
                    .unwrap_or_default();
                open = Some((name.to_string(), String::new()));
            }
            (Some((name, body)), Some(_)) => {
                if !name.is_empty() {
                    blocks.push(Block {
                        file: file.to_path_buf(),
                        name: std::mem::take(name),
                        text: std::mem::take(body),
                    });
                }
                open = None;
            }
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

/// Every runnable block of the README and the guides.
pub fn runnable_blocks() -> Vec<Block> {
    doc_files()
        .into_iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(&file).expect("a doc file");
            blocks_in(&file, &text)
        })
        .collect()
}

/// The one runnable block called `name`.
pub fn runnable(name: &str) -> String {
    let mut found: Vec<Block> = runnable_blocks()
        .into_iter()
        .filter(|b| b.name == name)
        .collect();
    assert_eq!(found.len(), 1, "runnable:{name} blocks: {found:?}");
    found.remove(0).text
}

fn every_runnable_block_is_run_by_a_test() {
    let blocks = runnable_blocks();
    let mut seen = BTreeMap::new();
    for block in &blocks {
        assert!(
            seen.insert(block.name.clone(), block.file.clone())
                .is_none(),
            "two blocks are called runnable:{}",
            block.name
        );
        assert!(
            RUN_BY.iter().any(|(name, _)| *name == block.name),
            "{}: runnable:{} is run by no test (add it to docs::RUN_BY with the test that runs it)",
            block.file.display(),
            block.name
        );
        assert!(
            !block.text.trim().is_empty(),
            "runnable:{} is empty",
            block.name
        );
    }
    for (name, test) in RUN_BY {
        assert!(
            seen.contains_key(*name),
            "{test} runs runnable:{name}, which no doc has any more"
        );
    }
    // Unit check of the extraction: a plain block is not runnable, the body is exact.
    let sample = blocks_in(
        std::path::Path::new("x.md"),
        "```sh\nnot me\n```\ntext\n```sh runnable:a\necho 1\necho 2\n```\n",
    );
    assert_eq!(sample.len(), 1, "{sample:?}");
    assert_eq!(
        (sample[0].name.as_str(), sample[0].text.as_str()),
        ("a", "echo 1\necho 2\n")
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

fn every_relative_link_in_the_docs_resolves() {
    let mut checked = 0;
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let Some(target) = rest.split(')').next() else {
                continue;
            };
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            assert!(
                resolved.exists(),
                "{}: link to {target}: no such file",
                file.display()
            );
            if !fragment.is_empty() {
                let linked = std::fs::read_to_string(&resolved).unwrap_or_default();
                assert!(
                    anchors(&linked).contains(fragment),
                    "{}: link to {target}: no such heading",
                    file.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} links checked");
}

/// The README of issue #22: at most 300 lines; the first screen says what echod is and
/// how to install, run and test it, where the config lives, and lists the contents.
fn readme_is_a_first_screen_and_short_sections() {
    let readme = std::fs::read_to_string(repo_path("README.md")).expect("README.md");
    let lines = readme.lines().count();
    assert!(lines <= 300, "README.md has {lines} lines (at most 300)");
    let first_screen: String = readme.lines().take(60).collect::<Vec<_>>().join("\n");
    for needle in [
        "cargo run --release",
        "cargo test",
        "dpkg -i",
        "docker run",
        "/etc/echod/echod.toml",
        "## Contents",
    ] {
        assert!(
            first_screen.contains(needle),
            "README's first 60 lines lack `{needle}`"
        );
    }
    // Every section after the contents (but the layout table) ends in a link to a guide.
    let after_contents = readme
        .split("\n## ")
        .skip_while(|s| !s.starts_with("Contents"))
        .skip(1);
    let mut sections = 0;
    for section in after_contents.filter(|s| !s.starts_with("Layout")) {
        sections += 1;
        let title = section.lines().next().unwrap_or_default();
        let last = section.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.contains("](docs/") || last.contains("](deploy/") || last.contains("](packaging/"),
            "README section `{title}` does not end in a link to a guide: {last:?}"
        );
    }
    assert!(sections >= 5, "only {sections} sections after the contents");
}

/// docs/metrics.md's table as the registry renders it: every `echod_*` family with its
/// type, label names, the fixed values of its `reason`/`kind`/`cap`/`result` label and
/// its help.
fn metrics_table() -> String {
    let metrics = echod::daemon::metrics::Metrics::new();
    // Children of one listener of each kind, so every labelled series exists.
    let _tcp = metrics.tcp_listener("127.0.0.1:7007");
    let _udp = metrics.udp_listener("127.0.0.1:7007");
    // The TLS families have series only while TLS serves: a listener and a certificate.
    let _tls = metrics.tls_listener("127.0.0.1:7443");
    metrics.set_tls_certificate_expiry(Some(0));
    let text = String::from_utf8(metrics.encode()).expect("the exposition is UTF-8");
    let mut help = BTreeMap::new();
    let mut kind = BTreeMap::new();
    let mut labels: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help.insert(name.to_string(), text.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').expect("# TYPE name type");
            kind.insert(name.to_string(), t.to_string());
            labels.entry(name.to_string()).or_default();
        } else if let Some((series, _)) = line.rsplit_once(' ') {
            let (name, set) = series.split_once('{').unwrap_or((series, "}"));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| kind.contains_key(*f)))
                .unwrap_or(name);
            let entry = labels.entry(family.to_string()).or_default();
            for pair in set
                .trim_end_matches('}')
                .split("\",")
                .filter(|p| !p.is_empty())
            {
                let (key, value) = pair.split_once("=\"").expect("label=\"value\"");
                if key != "le" {
                    entry
                        .entry(key.to_string())
                        .or_default()
                        .insert(value.trim_end_matches('"').to_string());
                }
            }
        }
    }
    let mut out = String::from(
        "| metric | type | labels | label values | meaning |\n|---|---|---|---|---|\n",
    );
    for (name, t) in kind.iter().filter(|(n, _)| n.starts_with("echod_")) {
        let names = &labels[name];
        let values: Vec<String> = names
            .iter()
            .filter(|(label, _)| ["reason", "kind", "cap", "result"].contains(&label.as_str()))
            .flat_map(|(_, values)| values.iter().map(|v| format!("`{v}`")))
            .collect();
        out.push_str(&format!(
            "| `{name}` | {t} | {} | {} | {} |\n",
            names.keys().cloned().collect::<Vec<_>>().join(", "),
            values.join(", "),
            help[name].replace('|', "\\|")
        ));
    }
    out
}

fn metrics_reference_is_generated_from_the_registry() {
    let path = repo_path("docs/metrics.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let begin = committed
        .find("<!-- BEGIN GENERATED")
        .expect("docs/metrics.md has a generated region");
    let start = begin + committed[begin..].find('\n').unwrap() + 1;
    let end = start
        + committed[start..]
            .find("<!-- END GENERATED -->")
            .expect("the generated region ends");
    let fresh = metrics_table();
    if std::env::var("ECHOD_BLESS").is_ok_and(|v| v == "1") {
        let blessed = format!("{}{fresh}{}", &committed[..start], &committed[end..]);
        std::fs::write(&path, blessed).unwrap();
    } else {
        assert!(
            committed[start..end] == fresh,
            "docs/metrics.md is stale: regenerate it with \
             `ECHOD_BLESS=1 cargo test --test daemon -- is_generated`"
        );
    }
    assert!(fresh.lines().count() >= 28, "{fresh}");
    // Every family a guide names is in the reference, the TLS ones included (they have
    // series only while a TLS listener or its certificate is in use).
    let mut lacking = BTreeSet::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (at, _) in text.match_indices("`echod_") {
            let name: String = text[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `echod_tcp_*` and the like name a group, not a family.
            if name.ends_with('_') {
                continue;
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            if !fresh.contains(&format!("| `{name}` |"))
                && !fresh.contains(&format!("| `{family}` |"))
            {
                lacking.insert(format!("{}: {name}", file.display()));
            }
        }
    }
    assert!(
        lacking.is_empty(),
        "families the docs name and the metrics reference lacks: {lacking:#?}"
    );
}
