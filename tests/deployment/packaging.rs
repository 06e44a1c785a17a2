//! What the Debian package ships, checked on the host without booting anything: the
//! units pass `systemd-analyze verify` and score ≤ 2.0 in `systemd-analyze security`,
//! the packaged config is valid and agrees with the unit's timeouts and limits, and the
//! man page and docs/configuration.md's key tables are the ones generated from the CLI
//! and config/echod.toml, and the man page's ENVIRONMENT, SIGNALS and EXIT STATUS and
//! docs/systemd.md's tables the ones generated from docs/operating.toml.

use std::process::Command;
use std::time::Duration;

use crate::support::{Need, repo_path};

crate::support::tests![
    man_page_is_generated_from_the_cli,
    configuration_reference_is_generated_from_config_echod_toml,
    systemd_guide_signals_table_is_generated_from_docs_operating_toml,
    units_pass_systemd_analyze_verify needs &[Need::Tool("systemd-analyze")],
    service_hardening_exposure_is_at_most_2 needs &[Need::Tool("systemd-analyze")],
    packaged_config_is_valid_and_fits_the_unit,
    every_package_asset_exists,
    documented_hardening_figure_is_the_measured_one needs &[Need::Tool("systemd-analyze")],
    reload_validates_the_config_before_signalling,
    man_page_documents_every_key_the_environment_and_renders_cleanly needs &[Need::Tool("groff"), Need::Tool("man")],
];

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The value of `key=` in a unit file (the last one wins, as in systemd).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .unwrap_or_else(|| panic!("{key}= not set"))
        .to_string()
}

/// The units in a temp dir, with ExecStart pointing at the binary under test
/// (verify fails when the binary does not exist on this machine).
fn units_for_host() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin = crate::support::echod_bin().display().to_string();
    for name in ["echod.service", "echod.socket"] {
        let text = read(&format!("packaging/systemd/{name}")).replace("/usr/bin/echod", &bin);
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// The man page as the CLI describes it; the version without the git revision, so it
/// changes only when the CLI or the version does. Subcommands are described inline
/// (clap_mangen would point at separate pages that are not shipped).
fn render_man_page() -> String {
    use clap::CommandFactory;
    let cmd = echod::cli::Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .about("a production-grade TCP and UDP echo daemon (RFC 862)");
    let man = clap_mangen::Man::new(cmd.clone())
        .source(concat!("echod ", env!("CARGO_PKG_VERSION")))
        .manual("echod manual");
    let mut page = Vec::new();
    man.render_title(&mut page).unwrap();
    man.render_name_section(&mut page).unwrap();
    man.render_synopsis_section(&mut page).unwrap();
    man.render_description_section(&mut page).unwrap();
    page.extend_from_slice(DESCRIPTION.as_bytes());
    man.render_options_section(&mut page).unwrap();
    // No date (it would make the page stale every day); clap_mangen then leaves the
    // .TH field out instead of quoting it empty, which shifts source and manual.
    let mut page = String::from_utf8(page)
        .expect("man page is UTF-8")
        .replacen(".TH echod 1  ", ".TH echod 1 \"\" ", 1);
    page.push_str(".SH COMMANDS\n");
    // A hidden command (`upgrade-check`, which the running daemon calls on a new binary)
    // is left out of `--help` but named in the guides: listed last, marked internal.
    let (internal, public): (Vec<_>, Vec<_>) = cmd.get_subcommands().partition(|s| s.is_hide_set());
    for sub in public.into_iter().chain(internal) {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let about = if sub.is_hide_set() {
            format!("Internal, not for operators. {about}")
        } else {
            about
        };
        page.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            sub.get_name().replace('-', "\\-"),
            about.replace('-', "\\-")
        ));
    }
    page.push_str(&configuration_section());
    page.push_str(&operating_sections(&read("docs/operating.toml")));
    page.push_str(EXTRA_SECTIONS);
    page.push_str(concat!(".SH VERSION\nv", env!("CARGO_PKG_VERSION"), "\n"));
    page
}

const EXTRA_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/echod/echod.toml\fR
The configuration of the packaged service (TCP and UDP echo on port 7, metrics on 127.0.0.1:9107).
.TP
\fI/usr/share/doc/echod/examples/echod.toml\fR
Every key with its default and a one\-line comment, as listed under \fBCONFIGURATION\fR.
.TP
\fI/usr/lib/systemd/system/echod.service\fR, \fI/usr/lib/systemd/system/echod.socket\fR
The service (enabled on install) and the optional socket activation unit.
.TP
\fI/run/echod/reload\-verdict\fR (\fI$RUNTIME_DIRECTORY/reload\-verdict\fR)
The outcome of the last reload or upgrade, one line: a generation number, then \fBok\fR or \fBfailed\fR and the reason. echod writes it; \fBechod reload\fR waits for the next generation. Written only when \fBRUNTIME_DIRECTORY\fR is set.
.SH EXAMPLES
Check the packaged service from the same host, over TCP and UDP (\fB\-N\fR makes \fBnc\fR close its side at the end of input, so it returns as soon as the echo is back instead of waiting for the idle timeout):
.PP
.RS 4
.nf
echo hello | nc \-N 127.0.0.1 7
echo hello | nc \-u \-w1 127.0.0.1 7
echod probe \-\-tcp 127.0.0.1:7 \-\-udp 127.0.0.1:7
.fi
.RE
.PP
Validate an edited configuration, see what an environment variable changes, then apply it:
.PP
.RS 4
.nf
echod check\-config \-\-config /etc/echod/echod.toml
ECHOD_TCP__MAX_CONNECTIONS=20000 echod check\-config \-\-config /etc/echod/echod.toml
systemctl reload echod
.fi
.RE
.SH SEE ALSO
\fBnc\fR(1), \fBsystemctl\fR(1), \fBsystemd.service\fR(5), \fBsystemd.socket\fR(5), \fBjournalctl\fR(1)
"#;

/// What echod does, after the one-line summary clap gives.
const DESCRIPTION: &str = r#".PP
\fBechod\fR answers TCP and UDP echo (RFC 862): every byte a client sends comes back unchanged. Connection limits (global and per source address), idle timeouts and a per\-source UDP rate limit hold under floods; UDP datagrams from ports of services that answer anything (echo, chargen, DNS, NTP ...) are never answered, so echod cannot be used as a reflector. A stop drains open connections, a reload (\fBSIGHUP\fR) applies a new configuration without dropping any, and an HTTP endpoint serves Prometheus metrics (\fB/metrics\fR), liveness (\fB/healthz\fR) and readiness (\fB/readyz\fR).
.PP
The same binary carries the tools to check and load an echo server: \fBprobe\fR, \fBclient\fR and \fBbench\fR (see \fBechod\fR \fIcommand\fR \fB\-\-help\fR).
"#;

/// Escapes text for roff: backslashes, hyphens (so they stay ASCII hyphens), a control
/// character at the start of a line, and non-ASCII characters as `\[uXXXX]`.
fn roff(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        roff_char(c, &mut out);
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// One character escaped for roff (see [`roff`]), wherever in a line it stands.
fn roff_char(c: char, out: &mut String) {
    match c {
        '\\' => out.push_str("\\e"),
        '-' => out.push_str("\\-"),
        c if c.is_ascii() => out.push(c),
        c => out.push_str(&format!("\\[u{:04X}]", c as u32)),
    }
}

/// CONFIGURATION, generated from config/echod.toml (which a test keeps equal to the
/// built-in defaults): every key with its default and the comment above it.
fn configuration_section() -> String {
    let mut out = String::from(
        r#".SH CONFIGURATION
The configuration is a TOML file (\fB\-\-config\fR \fIFILE\fR or \fBECHOD_CONFIG\fR). Layers, later wins: the built\-in defaults below, the file, \fBECHOD_\fR\fISECTION\fR\fB__\fR\fIKEY\fR environment variables, \fB\-\-log\-level\fR and \fB\-\-log\-format\fR. Unknown keys, wrong types and values out of range are errors (exit status 78; on a reload the old configuration keeps serving). Durations are written like "30s", "5m", "1h 30m". \fBechod check\-config\fR validates a file and prints the effective configuration.
.PP
An IPv6 listen address serves IPv6 only: for IPv4 and IPv6 list both, as the packaged configuration does (\fB["0.0.0.0:7", "[::]:7"]\fR).
"#,
    );
    out.push_str(&configuration_entries(&read("config/echod.toml")));
    out
}

/// One entry of docs/operating.toml: a name (an environment variable, a signal, an exit
/// status) and its paragraphs, in the Markdown subset both renderings share.
struct Operating {
    name: String,
    paragraphs: Vec<String>,
}

/// The entries of one table of docs/operating.toml (`environment`, `signal`, `exit`).
fn operating_entries(source: &str, table: &str) -> Vec<Operating> {
    let parsed: toml::Table = source
        .parse()
        .unwrap_or_else(|e| panic!("docs/operating.toml: {e}"));
    let text = |entry: &toml::Value, key: &str| -> String {
        entry[key]
            .as_str()
            .unwrap_or_else(|| panic!("docs/operating.toml: [[{table}]] {key} is not a string"))
            .to_string()
    };
    parsed[table]
        .as_array()
        .unwrap_or_else(|| panic!("docs/operating.toml has no [[{table}]]"))
        .iter()
        .map(|entry| {
            let more = entry.get("more").and_then(toml::Value::as_array);
            let mut paragraphs = vec![text(entry, "text")];
            paragraphs.extend(more.into_iter().flatten().map(|p| {
                p.as_str()
                    .unwrap_or_else(|| panic!("docs/operating.toml: [[{table}]] more"))
                    .to_string()
            }));
            Operating {
                name: text(entry, "name"),
                paragraphs,
            }
        })
        .collect()
}

/// docs/operating.toml's markup in roff: `code` bold, *word* italic, the rest escaped.
fn markup_roff(text: &str) -> String {
    let mut out = String::new();
    let (mut code, mut italic) = (false, false);
    for c in text.chars() {
        match c {
            '`' => {
                code = !code;
                out.push_str(if code { "\\fB" } else { "\\fR" });
            }
            '*' if !code => {
                italic = !italic;
                out.push_str(if italic { "\\fI" } else { "\\fR" });
            }
            c => roff_char(c, &mut out),
        }
    }
    assert!(!code && !italic, "unbalanced markup in {text:?}");
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// The man page's ENVIRONMENT, SIGNALS and EXIT STATUS, from docs/operating.toml.
fn operating_sections(source: &str) -> String {
    let mut out = String::new();
    for (heading, table) in [
        ("ENVIRONMENT", "environment"),
        ("SIGNALS", "signal"),
        ("EXIT STATUS", "exit"),
    ] {
        out.push_str(&format!(".SH {heading}\n"));
        for entry in operating_entries(source, table) {
            out.push_str(&format!(".TP\n{}\n", markup_roff(&entry.name)));
            for (i, paragraph) in entry.paragraphs.iter().enumerate() {
                if i > 0 {
                    out.push_str(".IP\n");
                }
                out.push_str(&markup_roff(paragraph));
                out.push('\n');
            }
        }
    }
    out
}

/// docs/systemd.md's tables of signals, exit statuses and environment variables, from
/// docs/operating.toml.
fn operating_tables(source: &str) -> String {
    let mut out = String::new();
    for (heading, table, column) in [
        ("Signals", "signal", "signal"),
        ("Exit status", "exit", "exit status"),
        ("Environment", "environment", "variable"),
    ] {
        out.push_str(&format!(
            "\n### {heading}\n\n| {column} | meaning |\n|---|---|\n"
        ));
        for entry in operating_entries(source, table) {
            let meaning = entry
                .paragraphs
                .iter()
                .map(|p| cell(p))
                .collect::<Vec<_>>()
                .join("<br><br>");
            out.push_str(&format!("| {} | {meaning} |\n", cell(&entry.name)));
        }
    }
    out.push('\n');
    out
}

/// Writes `fresh` into the generated region of `rel` under ECHOD_BLESS=1, else fails
/// when the committed region differs from it.
fn check_generated_region(rel: &str, fresh: &str) {
    let path = repo_path(rel);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let (start, end) =
        generated_region(&committed).unwrap_or_else(|| panic!("{rel} has a generated region"));
    if std::env::var("ECHOD_BLESS").is_ok_and(|v| v == "1") {
        let blessed = format!("{}{fresh}{}", &committed[..start], &committed[end..]);
        std::fs::write(&path, blessed).unwrap();
    } else {
        assert!(
            committed[start..end] == *fresh,
            "{rel} is stale: regenerate it with \
             `ECHOD_BLESS=1 cargo test --test deployment is_generated`"
        );
    }
}

/// docs/systemd.md's signal, exit status and environment tables are docs/operating.toml,
/// as the man page's ENVIRONMENT, SIGNALS and EXIT STATUS are: one source, two renderings.
fn systemd_guide_signals_table_is_generated_from_docs_operating_toml() {
    let source = read("docs/operating.toml");
    let fresh = operating_tables(&source);
    check_generated_region("docs/systemd.md", &fresh);
    // The renderings of the shared markup, on a sample.
    let sample = "[[signal]]\nname = \"`SIGX`\"\ntext = \"a `b-c` *d* e\"\nmore = [\"f|g\"]\n\
                  [[exit]]\nname = \"`0`\"\ntext = \".h\"\n[[environment]]\nname = \"`V`\"\ntext = \"i\"\n";
    assert_eq!(
        operating_sections(sample),
        ".SH ENVIRONMENT\n.TP\n\\fBV\\fR\ni\n.SH SIGNALS\n.TP\n\\fBSIGX\\fR\na \\fBb\\-c\\fR \\fId\\fR e\n\
         .IP\nf|g\n.SH EXIT STATUS\n.TP\n\\fB0\\fR\n\\&.h\n"
    );
    assert!(
        operating_tables(sample).contains("| `SIGX` | a `b-c` *d* e<br><br>f\\|g |\n"),
        "{}",
        operating_tables(sample)
    );
    // Every variable, signal and status the man page test asks for is in the source.
    for needle in ["`ECHOD_HANDOVER`", "`SIGHUP`", "`78`", "upgrade in place"] {
        assert!(
            source.contains(needle),
            "docs/operating.toml lacks {needle}"
        );
    }
}

/// A commented-out `# key = value` line: a key that is unset by default.
fn optional_key(comment: &str) -> Option<(&str, &str)> {
    let (key, value) = comment.split_once(" = ")?;
    let is_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    is_key.then_some((key, value))
}

/// One entry of a documented TOML file (config/echod.toml): a section, or a key with
/// its default (`None`: unset by default, with an example) and the comment above it.
#[derive(Debug, PartialEq)]
enum Documented {
    Section(String),
    Key {
        key: String,
        default: Option<String>,
        example: Option<String>,
        comment: String,
    },
}

/// The sections and keys of a documented TOML file, each key with its default (or,
/// commented out, as unset by default) and the comment lines above it: the one source
/// of the man page's CONFIGURATION and of docs/configuration.md's key tables.
fn documented_keys(documented: &str) -> Vec<Documented> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut comment: Vec<String> = Vec::new();
    // Consecutive commented-out keys share the comment above the first.
    let mut shared: Vec<String> = Vec::new();
    let mut in_header = true;
    for line in documented.lines() {
        let line = line.trim();
        let optional = line
            .strip_prefix('#')
            .map(str::trim)
            .and_then(optional_key)
            .filter(|_| !in_header);
        if optional.is_none() {
            shared.clear();
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            in_header = false;
            comment.clear();
            out.push(Documented::Section(name.to_string()));
        } else if let Some((key, example)) = optional {
            if comment.is_empty() {
                comment = shared.clone();
            }
            assert!(!comment.is_empty(), "{section}.{key} has no comment");
            shared = comment.clone();
            out.push(Documented::Key {
                key: format!("{section}.{key}"),
                default: None,
                example: Some(example.to_string()),
                comment: comment.join(" "),
            });
            comment.clear();
        } else if let Some(text) = line.strip_prefix('#') {
            comment.push(text.trim().to_string());
        } else if let Some((key, value)) = line.split_once(" = ") {
            assert!(!in_header, "key {key} outside a section");
            assert!(!comment.is_empty(), "{section}.{key} has no comment");
            out.push(Documented::Key {
                key: format!("{section}.{key}"),
                default: Some(value.to_string()),
                example: None,
                comment: comment.join(" "),
            });
            comment.clear();
        } else if line.is_empty() {
            comment.clear();
        }
    }
    out
}

/// The `.SS`/`.TP` entries of the man page's CONFIGURATION for a documented TOML file.
fn configuration_entries(documented: &str) -> String {
    let mut out = String::new();
    for item in documented_keys(documented) {
        match item {
            Documented::Section(name) => out.push_str(&format!(".SS \"[{}]\"\n", roff(&name))),
            Documented::Key {
                key,
                default: Some(value),
                comment,
                ..
            } => out.push_str(&format!(
                ".TP\n\\fB{}\\fR = {}\n{}\n",
                roff(&key),
                roff(&value),
                roff(&comment)
            )),
            Documented::Key {
                key,
                example,
                comment,
                ..
            } => out.push_str(&format!(
                ".TP\n\\fB{}\\fR (unset by default; e.g. {})\n{}\n",
                roff(&key),
                roff(example.as_deref().unwrap_or_default()),
                roff(&comment)
            )),
        }
    }
    out
}

/// Escapes text for a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// docs/configuration.md's key tables for a documented TOML file: one table per section.
fn configuration_tables(documented: &str) -> String {
    let mut out = String::new();
    for item in documented_keys(documented) {
        match item {
            Documented::Section(name) => out.push_str(&format!(
                "\n### `[{name}]`\n\n| key | default | meaning |\n|---|---|---|\n"
            )),
            Documented::Key {
                key,
                default,
                example,
                comment,
            } => {
                let default = match (default, example) {
                    (Some(value), _) => format!("`{}`", cell(&value)),
                    (None, example) => {
                        format!(
                            "unset (e.g. `{}`)",
                            cell(example.as_deref().unwrap_or_default())
                        )
                    }
                };
                out.push_str(&format!("| `{key}` | {default} | {} |\n", cell(&comment)));
            }
        }
    }
    out
}

/// The generated region of a documentation file: between `<!-- BEGIN GENERATED` (a
/// line naming the command that regenerates it) and `<!-- END GENERATED -->`.
fn generated_region(text: &str) -> Option<(usize, usize)> {
    let begin = text.find("<!-- BEGIN GENERATED")?;
    let start = begin + text[begin..].find('\n')? + 1;
    let end = start + text[start..].find("<!-- END GENERATED -->")?;
    Some((start, end))
}

/// docs/configuration.md's key tables are config/echod.toml's keys, defaults and
/// comments, as the man page's CONFIGURATION is: one source, two renderings.
fn configuration_reference_is_generated_from_config_echod_toml() {
    let fresh = configuration_tables(&read("config/echod.toml"));
    check_generated_region("docs/configuration.md", &fresh);
    assert!(
        fresh.contains("| `metrics.web_config_file` | unset"),
        "{fresh}"
    );
}

fn man_page_is_generated_from_the_cli() {
    let fresh = render_man_page();
    let path = repo_path("packaging/echod.1");
    if std::env::var("ECHOD_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "packaging/echod.1 is stale: regenerate it with `ECHOD_BLESS=1 cargo test --test deployment is_generated`"
    );
    for needle in [
        "check\\-config",
        "\\-\\-config",
        "SIGHUP",
        "/etc/echod/echod.toml",
    ] {
        assert!(fresh.contains(needle), "man page lacks {needle}");
    }
}

fn units_pass_systemd_analyze_verify() {
    let dir = units_for_host();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("echod.service"))
        .arg(dir.path().join("echod.socket"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    // An unknown key is only a warning with exit 0: a clean unit prints nothing.
    assert!(stderr.trim().is_empty(), "verify warned:\n{stderr}");
}

fn service_hardening_exposure_is_at_most_2() {
    let dir = units_for_host();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", "--threshold=20"])
        .arg(dir.path().join("echod.service"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall score:\n{stdout}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    eprintln!("{line}");
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{stdout}");
    assert!(out.status.success(), "above --threshold:\n{stdout}");
}

fn packaged_config_is_valid_and_fits_the_unit() {
    let out = Command::new(crate::support::echod_bin())
        .arg("--config")
        .arg(repo_path("packaging/echod.toml"))
        .arg("check-config")
        .env_remove("ECHOD_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Table = String::from_utf8_lossy(&out.stdout)
        .parse()
        .expect("check-config prints TOML");
    let list = |section: &str| -> Vec<String> {
        effective[section]["listen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(list("tcp"), ["0.0.0.0:7", "[::]:7"]);
    assert_eq!(list("udp"), ["0.0.0.0:7", "[::]:7"]);
    assert_eq!(list("metrics"), ["127.0.0.1:9107"]);

    let unit = read("packaging/systemd/echod.service");
    let drain: Duration =
        humantime::parse_duration(effective["shutdown"]["drain_timeout"].as_str().unwrap())
            .unwrap();
    let stop = humantime::parse_duration(&unit_value(&unit, "TimeoutStopSec")).unwrap();
    assert!(
        stop > drain,
        "TimeoutStopSec {stop:?} must exceed the drain {drain:?}"
    );
    let max = effective["tcp"]["max_connections"].as_integer().unwrap();
    let nofile: i64 = unit_value(&unit, "LimitNOFILE").parse().unwrap();
    assert!(
        nofile > max + 100,
        "LimitNOFILE {nofile} too close to {max}"
    );
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert!(unit_value(&unit, "ExecStart").contains("/etc/echod/echod.toml"));
    let socket = read("packaging/systemd/echod.socket");
    assert_eq!(unit_value(&socket, "ListenStream"), "7");
    assert_eq!(unit_value(&socket, "ListenDatagram"), "7");
}

fn every_package_asset_exists() {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    for asset in deb["assets"].as_array().unwrap() {
        let source = asset[0].as_str().unwrap();
        if source.starts_with("target/") {
            continue;
        }
        assert!(repo_path(source).is_file(), "asset {source} missing");
    }
    let scripts = repo_path(deb["maintainer-scripts"].as_str().unwrap());
    for script in ["postinst", "prerm", "postrm"] {
        let out = Command::new("sh")
            .arg("-n")
            .arg(scripts.join(script))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The overall exposure `systemd-analyze security --offline=yes` gives the service unit.
fn measured_exposure() -> String {
    let dir = units_for_host();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.path().join("echod.service"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for")?
                .1
                .split_once(':')
        })
        .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| panic!("no overall exposure:\n{stdout}"))
}

fn documented_hardening_figure_is_the_measured_one() {
    let measured = measured_exposure();
    let guide = read("docs/systemd.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let claim = "rates the unit file alone ";
    let stated = guide
        .split_once(claim)
        .unwrap_or_else(|| panic!("docs/systemd.md no longer says `{claim}…`"))
        .1
        .split([',', ' ', ';', ')'])
        .next()
        .unwrap()
        .trim_end_matches('.');
    assert_eq!(
        stated, measured,
        "docs/systemd.md states exposure {stated}, systemd-analyze security --offline=yes measures {measured}"
    );
}

/// Every `key=` value of a unit file, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .collect()
}

/// `systemctl reload echod` must fail on a broken config (systemd 252 has no
/// Type=notify-reload, so the unit validates in ExecReload before it signals), and a
/// good config must reload without the effective configuration flooding the journal.
fn reload_validates_the_config_before_signalling() {
    let unit = read("packaging/systemd/echod.service");
    let reload = unit_values(&unit, "ExecReload");
    let config = unit_value(&unit, "ExecStart")
        .split_whitespace()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .expect("ExecStart names its --config")
        .to_string();
    let (signal, checks) = reload.split_last().expect("ExecReload");
    assert_eq!(
        signal, "/usr/bin/echod reload --pid $MAINPID",
        "the last step signals echod and waits for its verdict"
    );
    assert_eq!(
        unit_value(&unit, "RuntimeDirectory"),
        "echod",
        "`echod reload` reads the verdict from the runtime directory"
    );
    assert!(
        checks
            .iter()
            .any(|c| c.contains("/usr/bin/echod check-config") && c.contains(&config)),
        "ExecReload does not run `echod check-config` on {config} before the signal: {reload:?}"
    );
    // No `-` prefix: a failed check must fail the reload (and skip the signal).
    assert!(checks.iter().all(|c| !c.starts_with('-')), "{reload:?}");

    // The check commands as systemd runs them (their quoting is the shell's here), with
    // the binary under test and a bad, then a good file in place of the packaged one.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[tcp]\nmax_connections = \"many\"\n").unwrap();
    let run_checks = |file: &std::path::Path| {
        checks
            .iter()
            .map(|c| {
                let c = c
                    .replace(
                        "/usr/bin/echod",
                        &crate::support::echod_bin().display().to_string(),
                    )
                    .replace(&config, &file.display().to_string());
                Command::new("sh")
                    .args(["-c", &c])
                    .env_remove("ECHOD_CONFIG")
                    .output()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let failed = run_checks(&bad);
    assert!(
        failed.iter().any(|o| o.status.code() == Some(78)),
        "a broken config passes ExecReload's checks"
    );
    let message = failed
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect::<String>();
    assert!(message.contains("max_connections"), "{message}");
    for out in run_checks(&crate::support::repo_path("packaging/echod.toml")) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout.is_empty(),
            "ExecReload would log the whole effective config on every reload:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// The text of one `.SH` section of a man page (up to the next one).
fn man_section<'a>(page: &'a str, name: &str) -> &'a str {
    let heading = format!(".SH {name}\n");
    let start = page
        .find(&heading)
        .unwrap_or_else(|| panic!("the man page has no {name} section"))
        + heading.len();
    let rest = &page[start..];
    &rest[..rest.find("\n.SH ").map_or(rest.len(), |i| i + 1)]
}

/// What the packaged config promises ("every key: man echod") and what an operator
/// looks for: every configuration key with its default, the environment, signals, exit
/// codes, files and examples, and no path that exists only in the source repository.
fn man_page_documents_every_key_the_environment_and_renders_cleanly() {
    let page = read("packaging/echod.1");
    let config = man_section(&page, "CONFIGURATION");
    let defaults: toml::Table = read("config/echod.toml").parse().unwrap();
    let mut keys = 0;
    for (section, table) in &defaults {
        let mut pending: Vec<(String, &toml::Value)> = table
            .as_table()
            .unwrap()
            .iter()
            .map(|(k, v)| (format!("{section}.{k}"), v))
            .collect();
        while let Some((key, value)) = pending.pop() {
            if let Some(sub) = value.as_table() {
                pending.extend(sub.iter().map(|(k, v)| (format!("{key}.{k}"), v)));
                continue;
            }
            let entry = format!("\\fB{}\\fR = ", key.replace('-', "\\-"));
            let at = config
                .find(&entry)
                .unwrap_or_else(|| panic!("CONFIGURATION lacks {key}"));
            let line = config[at + entry.len()..].lines().next().unwrap();
            let default = line.replace("\\-", "-");
            let parsed: toml::Table = format!("v = {default}")
                .parse()
                .unwrap_or_else(|e| panic!("{key}: default {default:?}: {e}"));
            assert_eq!(&parsed["v"], value, "{key}: default");
            keys += 1;
        }
    }
    // Keys documented commented out (unset by default) are listed too…
    let mut section = String::new();
    for line in read("config/echod.toml").lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, _)) = line
            .strip_prefix('#')
            .map(str::trim)
            .and_then(optional_key)
            .filter(|_| !section.is_empty())
        {
            let entry = format!("\\fB{section}.{key}\\fR (unset by default");
            assert!(
                config.contains(&entry),
                "CONFIGURATION lacks {section}.{key}"
            );
            keys += 1;
        }
    }
    assert!(keys >= 18, "only {keys} keys");
    // …the way the generator renders them.
    let sample = configuration_entries(
        "# Header: x = 1\n[tcp]\n# Caps, off by default.\n# max_x = \"1h\"\n# max_y = 2\n# Plain.\ny = 1\n",
    );
    assert_eq!(
        sample,
        ".SS \"[tcp]\"\n.TP\n\\fBtcp.max_x\\fR (unset by default; e.g. \"1h\")\nCaps, off by default.\n\
         .TP\n\\fBtcp.max_y\\fR (unset by default; e.g. 2)\nCaps, off by default.\n\
         .TP\n\\fBtcp.y\\fR = 1\nPlain.\n"
    );
    let environment = man_section(&page, "ENVIRONMENT");
    for var in [
        "ECHOD_CONFIG",
        "\\fBECHOD_\\fR\\fISECTION\\fR\\fB__\\fR\\fIKEY\\fR",
        "ECHOD_TCP__MAX_CONNECTIONS=500",
        "RUST_LOG",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "WATCHDOG_USEC",
        "FDSTORE",
        "ECHOD_HANDOVER",
    ] {
        assert!(environment.contains(var), "ENVIRONMENT lacks {var}");
    }
    let signals = man_section(&page, "SIGNALS");
    for needle in [
        "SIGTERM",
        "SIGINT",
        "SIGHUP",
        "drain_timeout",
        "status 1",
        "upgrade in place",
    ] {
        assert!(signals.contains(needle), "SIGNALS lacks {needle}");
    }
    let exit = man_section(&page, "EXIT STATUS");
    for code in ["\\fB0\\fR", "\\fB1\\fR", "\\fB2\\fR", "\\fB78\\fR"] {
        assert!(exit.contains(code), "EXIT STATUS lacks {code}");
    }
    assert!(man_section(&page, "FILES").contains("/usr/share/doc/echod/examples/echod.toml"));
    assert!(man_section(&page, "FILES").contains("reload\\-verdict"));
    assert!(man_section(&page, "COMMANDS").contains("upgrade\\-check"));
    assert!(environment.contains("RUNTIME_DIRECTORY"));
    assert!(man_section(&page, "EXAMPLES").contains("nc \\-N 127.0.0.1 7"));
    assert!(man_section(&page, "SEE ALSO").contains("systemctl"));
    // Paths that exist only in the source tree mean nothing to someone reading the
    // installed page.
    for dir in [
        "config/",
        "packaging/",
        "deploy/",
        "src/",
        "tests/",
        "docs/",
        "benches/",
    ] {
        for (at, _) in page.match_indices(dir) {
            assert!(
                page[..at].ends_with('/'),
                "the man page points into the repository: …{}…",
                &page[at.saturating_sub(30)..(at + 30).min(page.len())]
            );
        }
    }

    // Rendered as man(1) does, without a single groff warning.
    let path = crate::support::repo_path("packaging/echod.1");
    let groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&path)
        .output()
        .unwrap();
    let warnings = String::from_utf8_lossy(&groff.stderr);
    assert!(
        groff.status.success() && warnings.is_empty(),
        "groff:\n{warnings}"
    );
    let man = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&path)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap();
    let warnings = String::from_utf8_lossy(&man.stderr);
    assert!(
        man.status.success() && warnings.is_empty(),
        "man -l:\n{warnings}"
    );
    let text = String::from_utf8_lossy(&man.stdout);
    for heading in ["CONFIGURATION", "ENVIRONMENT", "EXIT STATUS", "EXAMPLES"] {
        assert!(text.contains(heading), "rendered page lacks {heading}");
    }
    assert!(text.contains("tcp.max_connections = 10000"), "{text}");
    assert!(
        !text.contains('\\'),
        "an escape leaked into the rendered page"
    );
}
