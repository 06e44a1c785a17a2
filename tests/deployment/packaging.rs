//! What the Debian package ships, checked on the host without booting anything: the
//! units pass `systemd-analyze verify` and score ≤ 2.0 in `systemd-analyze security`,
//! the packaged config is valid and agrees with the unit's timeouts and limits, and the
//! man page is the one the CLI generates.

use std::process::Command;
use std::time::Duration;

use crate::support::{self, Need, repo_path};

crate::support::tests![
    man_page_is_generated_from_the_cli,
    units_pass_systemd_analyze_verify needs &[Need::Tool("systemd-analyze")],
    service_hardening_exposure_is_at_most_2 needs &[Need::Tool("systemd-analyze")],
    packaged_config_is_valid_and_fits_the_unit,
    every_package_asset_exists,
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
    let bin = support::echod_bin().display().to_string();
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
    man.render_options_section(&mut page).unwrap();
    // No date (it would make the page stale every day); clap_mangen then leaves the
    // .TH field out instead of quoting it empty, which shifts source and manual.
    let mut page = String::from_utf8(page)
        .expect("man page is UTF-8")
        .replacen(".TH echod 1  ", ".TH echod 1 \"\" ", 1);
    page.push_str(".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        page.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            sub.get_name().replace('-', "\\-"),
            about.replace('-', "\\-")
        ));
    }
    page.push_str(EXTRA_SECTIONS);
    page.push_str(concat!(".SH VERSION\nv", env!("CARGO_PKG_VERSION"), "\n"));
    page
}

const EXTRA_SECTIONS: &str = r#".SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, let open connections finish within \fIshutdown.drain_timeout\fR, then close the rest. A second signal exits at once.
.TP
\fBSIGHUP\fR
Re\-read the configuration and apply it live (limits, timeouts, rate limits, log level, listeners). Open connections are untouched. A bad configuration is refused and the old one keeps serving.
.SH FILES
.TP
\fI/etc/echod/echod.toml\fR
The configuration of the packaged service (TCP and UDP echo on port 7, metrics on 127.0.0.1:9107).
.TP
\fI/usr/lib/systemd/system/echod.service\fR, \fI/usr/lib/systemd/system/echod.socket\fR
The service (enabled on install) and the optional socket activation unit.
.SH EXIT STATUS
0 after a clean stop; 78 (EX_CONFIG) for an invalid configuration; 1 for other start\-up failures.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBsystemd.socket\fR(5)
"#;

fn man_page_is_generated_from_the_cli() {
    let fresh = render_man_page();
    let path = repo_path("packaging/echod.1");
    if std::env::var("ECHOD_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "packaging/echod.1 is stale: regenerate it with `ECHOD_BLESS=1 cargo test --test deployment man_page`"
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
    let out = Command::new(support::echod_bin())
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
