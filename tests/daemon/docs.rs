//! The documentation as a user reads it, held to the code: the metrics reference is
//! generated from the registry, every fenced block of the README and the guides is either
//! run by a test (this module knows which) or says why not, every relative link resolves,
//! and the README stays a first screen plus short sections.
//!
//! A block is marked by its info string: ```` ```sh runnable:smoke ```` (a test takes it by
//! name with [`runnable`] and checks behaviour through it, never a sentence) or
//! ```` ```sh norun:cluster ```` (a reason of [`NORUN`]). GitHub shows the first word as the
//! language and ignores the rest. `console` transcripts are run command by command and
//! their output compared with what the block shows ([`run_transcript`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::support::repo_path;

crate::support::tests![
    metrics_reference_is_generated_from_the_registry,
    every_block_is_runnable_or_says_why_not,
    documented_tool_transcripts_print_what_the_docs_show,
    documented_config_blocks_pass_check_config,
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
    (
        "tls-try",
        "tls_echo::the_two_commands_of_docs_tls_md_work_as_written",
    ),
    (
        "client",
        "docs::documented_tool_transcripts_print_what_the_docs_show",
    ),
    (
        "probe",
        "docs::documented_tool_transcripts_print_what_the_docs_show",
    ),
    (
        "bench",
        "docs::documented_tool_transcripts_print_what_the_docs_show",
    ),
    (
        "bench-mismatch",
        "docs::documented_tool_transcripts_print_what_the_docs_show",
    ),
    (
        "bad-config",
        "docs::documented_tool_transcripts_print_what_the_docs_show",
    ),
    (
        "proxy-protocol",
        "docs::documented_config_blocks_pass_check_config",
    ),
    (
        "container",
        "deployment container::documented_container_commands_run_as_written",
    ),
];

#[path = "../support/doc_blocks.rs"]
mod doc_blocks;

pub use doc_blocks::{all_blocks, blocks_in, doc_files, runnable, transcript};

/// Why a block is not run, the only reasons a `norun:` block may give.
const NORUN: &[(&str, &str)] = &[
    (
        "host-install",
        "installs the package or changes units on the host (sudo dpkg, systemctl enable): \
         tests/deployment/systemd.rs does it inside a booted systemd container instead",
    ),
    (
        "installed-service",
        "talks to the installed service (systemctl, journalctl, /etc/echod): exists only \
         once the package is installed; tests/deployment/systemd.rs checks the unit",
    ),
    (
        "cluster",
        "targets a real Kubernetes cluster and image registry; tests/deployment/kubernetes.rs \
         validates the manifests offline",
    ),
    (
        "pulls-images",
        "pulls Prometheus and Grafana images from a registry, which CI cannot reach; \
         tests/deployment/compose.rs checks the compose wiring",
    ),
    (
        "terminal",
        "an interactive session at a terminal (the client's prompt)",
    ),
    (
        "template",
        "a file to fill in (hashes, host names, files of the reader's); the keys it shows \
         are checked by the tests of that feature",
    ),
    ("diagram", "not commands: a picture"),
    (
        "build-and-test",
        "cargo run/cargo test of the whole repository: what CI itself runs (.ci/run)",
    ),
];

/// Every fenced block of the README and the guides is run by a test (`runnable:NAME`,
/// listed in [`RUN_BY`]) or says why not (`norun:REASON`, a reason of [`NORUN`]): no
/// block is silently untested.
fn every_block_is_runnable_or_says_why_not() {
    let blocks = all_blocks();
    let mut seen = BTreeMap::new();
    let mut unmarked = Vec::new();
    for block in &blocks {
        let at = format!("{}:{}", block.file.display(), block.line);
        match (&block.runnable, &block.norun) {
            (Some(name), None) => {
                assert!(
                    seen.insert(name.clone(), at.clone()).is_none(),
                    "two blocks are called runnable:{name}"
                );
                assert!(
                    RUN_BY.iter().any(|(n, _)| n == name),
                    "{at}: runnable:{name} is run by no test (add it to docs::RUN_BY with the \
                     test that runs it)"
                );
                assert!(
                    !block.text.trim().is_empty(),
                    "{at}: runnable:{name} is empty"
                );
            }
            (None, Some(reason)) => assert!(
                NORUN.iter().any(|(r, _)| r == reason),
                "{at}: norun:{reason} is not one of docs::NORUN's reasons"
            ),
            (Some(_), Some(_)) => panic!("{at}: both runnable: and norun:"),
            (None, None) => unmarked.push(at),
        }
    }
    assert!(
        unmarked.is_empty(),
        "blocks neither runnable:NAME nor norun:REASON: {unmarked:#?}"
    );
    for (name, test) in RUN_BY {
        assert!(
            seen.contains_key(*name),
            "{test} runs runnable:{name}, which no doc has any more"
        );
    }
    assert!(seen.len() >= 10, "only {} runnable blocks", seen.len());
    // Unit check of the extraction: the marks and the body are exact.
    let sample = blocks_in(
        std::path::Path::new("x.md"),
        "```sh norun:terminal\nnot me\n```\ntext\n```sh runnable:a\necho 1\necho 2\n```\n",
    );
    assert_eq!(sample.len(), 2, "{sample:?}");
    assert_eq!(
        (sample[0].norun.as_deref(), sample[0].runnable.as_deref()),
        (Some("terminal"), None)
    );
    assert_eq!(
        (
            sample[1].runnable.as_deref(),
            sample[1].text.as_str(),
            sample[1].line
        ),
        (Some("a"), "echo 1\necho 2\n", 5)
    );
}

/// A line of output with what changes from run to run made uniform: a number with a
/// time unit (`345 µs`, `1.12 ms`, `5.00 s`) becomes `#U`, any other number with a
/// fraction or of three digits or more `#`; small integers (`0 mismatches`, `exit 1`,
/// `50 connections`, `line 2`) stay as they are, and so do the digits of a word (`p99`).
fn shape(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let after_word = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if !chars[i].is_ascii_digit() || after_word {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
            i += 1;
        }
        let token: String = chars[start..i].iter().collect();
        let rest: String = chars[i..].iter().collect();
        let unit = [" µs", " ms", " s"].into_iter().find(|u| {
            rest.strip_prefix(u)
                .is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric()))
        });
        if let Some(unit) = unit {
            out.push_str("#U");
            i += unit.chars().count();
        } else if token.contains('.') || token.len() >= 3 {
            out.push('#');
        } else {
            out.push_str(&token);
        }
    }
    out
}

/// Runs the `console` block `name` command by command in `dir` (a shell, the echod under
/// test first on PATH, stderr merged into stdout, `$?` carried over) with each documented address swapped
/// for the test's, and checks each command's output against the lines the block shows,
/// line by line in [`shape`] (a line ending in `…` is a prefix).
fn run_transcript(name: &str, dir: &std::path::Path, swaps: &[(&str, String)]) {
    let bin_dir = crate::support::echod_bin()
        .parent()
        .expect("the binary's directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let steps = transcript(&runnable(name));
    assert!(!steps.is_empty(), "runnable:{name} has no `$ ` command");
    let mut status = 0;
    for (command, expected) in steps {
        let mut run = command.clone();
        for (documented, actual) in swaps {
            run = run.replace(documented, actual);
        }
        let out = std::process::Command::new("sh")
            // `$?` is the previous command's status, as in one session.
            .args(["-c", &format!("exec 2>&1; (exit {status}); {run}")])
            .current_dir(dir)
            .env("PATH", &path)
            .env_remove("ECHOD_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("sh");
        status = out.status.code().unwrap_or(128);
        let mut actual = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut shown = expected.join("\n");
        for (i, (documented, swapped)) in swaps.iter().enumerate() {
            actual = actual.replace(swapped, &format!("@{i}@"));
            shown = shown.replace(documented, &format!("@{i}@"));
        }
        let actual: Vec<&str> = actual.lines().collect();
        let shown: Vec<&str> = shown.lines().collect();
        let same = actual.len() == shown.len()
            && actual
                .iter()
                .zip(&shown)
                .all(|(a, s)| match s.strip_suffix('…') {
                    Some(prefix) => shape(a).starts_with(&shape(prefix)),
                    None => shape(a) == shape(s),
                });
        assert!(
            same,
            "runnable:{name}: `{run}` printed\n{}\nwhere the docs show\n{}",
            actual.join("\n"),
            shown.join("\n")
        );
    }
}

/// An echo server that flips one bit in every thousandth byte (stream offsets 999,
/// 1999 …), for the bench example that shows a failure. Serves until dropped.
struct BitFlipper {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl BitFlipper {
    fn start() -> BitFlipper {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut offset = 0u64;
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        for byte in &mut buf[..n] {
                            if offset % 1000 == 999 {
                                *byte ^= 1;
                            }
                            offset += 1;
                        }
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        BitFlipper {
            addr,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for BitFlipper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // One more connection wakes the accept loop, which then sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// The tools guide's transcripts, run as written against a real echod (and, for the
/// failing bench, a server that corrupts echoes): the client's byte-exact pipe and its
/// refused connection, the probe of the daemon's own configuration and of a closed
/// port, the bench's reports (text and JSON) and its exit status 1 on corrupted echoes.
fn documented_tool_transcripts_print_what_the_docs_show() {
    let daemon = crate::support::Daemon::start("");
    let refused = crate::support::refusing();
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(
        dir.path().join("backup.tar"),
        crate::support::random_bytes(1 << 20, 22),
    )
    .expect("write backup.tar");
    let on_daemon = vec![
        ("127.0.0.1:7007", daemon.tcp.to_string()),
        ("127.0.0.1:9107", daemon.http.to_string()),
        ("127.0.0.1:7099", refused.addr.to_string()),
        (
            "config/echod.toml",
            daemon.served_config().display().to_string(),
        ),
    ];
    run_transcript("client", dir.path(), &on_daemon);
    run_transcript("probe", dir.path(), &on_daemon);
    run_transcript("bench", dir.path(), &on_daemon);
    let plot = std::fs::read_to_string(dir.path().join("latency.svg")).unwrap_or_default();
    assert!(
        plot.contains("<svg"),
        "bench --plot wrote no SVG: {plot:.200}"
    );
    let flipper = BitFlipper::start();
    run_transcript(
        "bench-mismatch",
        dir.path(),
        &[("127.0.0.1:7011", flipper.addr.to_string())],
    );
    // The configuration guide's example of a bad file: one message, file, line, key.
    std::fs::write(dir.path().join("bad.toml"), "[tcp]\nbaklog = 5\n").expect("bad.toml");
    run_transcript("bad-config", dir.path(), &[]);
    // The samples' shapes, as the comparison sees them.
    assert_eq!(
        shape("p50 345 µs  p99 1.12 ms, 5.00 s: 0 mismatches (4814016 bytes) p99.9 line 2"),
        "p50 #U  p99 #U, #U: 0 mismatches (# bytes) p99.9 line 2"
    );
}

/// The configuration blocks the guides show are valid as written: `echod check-config`
/// accepts each (exit 0) and its effective configuration carries every key the block
/// sets, with the block's value.
fn documented_config_blocks_pass_check_config() {
    for name in ["dual-stack", "proxy-protocol"] {
        let block = runnable(name);
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("echod.toml");
        std::fs::write(&file, &block).expect("write the block");
        let out = std::process::Command::new(crate::support::echod_bin())
            .args(["check-config", "--config"])
            .arg(&file)
            .env_remove("ECHOD_CONFIG")
            .output()
            .expect("run echod check-config");
        let output = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "runnable:{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let effective: toml::Table = output.parse().unwrap_or_else(|e| {
            panic!("runnable:{name}: check-config printed no TOML ({e}): {output}")
        });
        let documented: toml::Table = block.parse().expect("the block is TOML");
        let mut pending: Vec<(String, &toml::Value, &toml::Value)> = documented
            .iter()
            .map(|(k, v)| (k.clone(), v, &effective[k.as_str()]))
            .collect();
        while let Some((key, want, got)) = pending.pop() {
            match want.as_table() {
                Some(table) => pending.extend(table.iter().map(|(k, v)| {
                    let got = got
                        .get(k)
                        .unwrap_or_else(|| panic!("runnable:{name}: {key}.{k} is not in effect"));
                    (format!("{key}.{k}"), v, got)
                })),
                None => assert_eq!(got, want, "runnable:{name}: {key}"),
            }
        }
    }
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
