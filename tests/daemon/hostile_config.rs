//! Configuration that would cost the host: values that take seconds and gigabytes to
//! compile, environment keys that make the loader allocate terabytes, numbers that one
//! parser takes and the next refuses. Each is refused by `echod check-config` with exit
//! 78 (EX_CONFIG) within a second, naming where it came from and the key.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::echod_bin;

crate::support::tests![
    a_log_level_that_compiles_an_exponential_regex_is_refused_at_once,
    an_indexed_environment_key_is_refused_naming_the_variable,
    an_integer_too_large_for_the_loader_names_the_file_and_the_key,
];

/// What `check-config` must do with a hostile input.
const LIMIT: Duration = Duration::from_secs(1);

/// Runs `echod check-config` (with `file` as its config, if given, and `env` added) and
/// returns its exit code, stderr and run time. Killed after 20 s so a regression cannot
/// hang the suite.
fn check_config(file: Option<&str>, env: &[(&str, &str)]) -> (Option<i32>, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(echod_bin());
    cmd.arg("check-config")
        .env_remove("RUST_LOG")
        .env_remove("ECHOD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(text) = file {
        let path = dir.path().join("echod.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(&path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("run echod check-config");
    let Some(status) = crate::support::poll(Duration::from_secs(20), || child.try_wait().unwrap())
    else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("check-config still running after 20 s");
    };
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let stderr = stderr.replace(dir.path().to_str().unwrap(), "DIR");
    (status.code(), stderr, elapsed)
}

/// Asserts exit 78 within `LIMIT` with every one of `needles` in the message.
fn assert_refused(what: &str, result: (Option<i32>, String, Duration), needles: &[&str]) {
    let (code, stderr, elapsed) = result;
    eprintln!("{what}: exit {code:?} after {elapsed:?}: {}", stderr.trim());
    assert_eq!(code, Some(78), "{what}: {stderr}");
    assert!(elapsed < LIMIT, "{what}: took {elapsed:?}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: message lacks {needle:?}: {stderr}"
        );
    }
}

/// A field filter whose value tracing-subscriber compiles as a regular expression; each
/// `[ab]` doubles the time and memory (114 bytes took 26 s and 832 MB; this one, 105
/// bytes, takes seconds and hundreds of megabytes).
fn regex_bomb() -> String {
    format!("[{{x=[ab]*a{}}}]=info", "[ab]".repeat(22))
}

fn a_log_level_that_compiles_an_exponential_regex_is_refused_at_once() {
    let bomb = regex_bomb();
    assert_eq!(bomb.len(), 105);
    assert_refused(
        "log.level field-value filter in the file",
        check_config(Some(&format!("[log]\nlevel = '{bomb}'\n")), &[]),
        &["DIR/echod.toml", "log.level"],
    );
    assert_refused(
        "log.level field-value filter from the environment",
        check_config(None, &[("ECHOD_LOG__LEVEL", &bomb)]),
        &["ECHOD_LOG__LEVEL", "log.level"],
    );
    // The environment is named even when a file is given too.
    assert_refused(
        "log.level from the environment beside a file",
        check_config(Some("[tcp]\nbacklog = 5\n"), &[("ECHOD_LOG__LEVEL", &bomb)]),
        &["ECHOD_LOG__LEVEL", "log.level"],
    );
    let long = "echod=debug,".repeat(200);
    assert_refused(
        "a 2400-byte log.level",
        check_config(Some(&format!("[log]\nlevel = '{long}info'\n")), &[]),
        &["DIR/echod.toml", "log.level", "1024"],
    );
    // Span and target filters stay usable.
    for fine in ["info,echod=debug", "warn,[conn]=debug", "[{peer}]=trace"] {
        let (code, stderr, _) = check_config(Some(&format!("[log]\nlevel = '{fine}'\n")), &[]);
        assert_eq!(code, Some(0), "{fine}: {stderr}");
    }
}

fn an_indexed_environment_key_is_refused_naming_the_variable() {
    for name in [
        "ECHOD_TCP__LISTEN[99999999999]",
        "ECHOD_TCP__LISTEN[0]",
        "ECHOD_TCP__LISTEN[-1]",
        "ECHOD_TCP__LISTEN.0",
    ] {
        assert_refused(
            name,
            check_config(None, &[(name, "127.0.0.1:7")]),
            &[name, "key `tcp.listen`"],
        );
    }
}

fn an_integer_too_large_for_the_loader_names_the_file_and_the_key() {
    for (text, key) in [
        (
            "[tcp]\nmax_connections = 18446744073709551615\n",
            "tcp.max_connections",
        ),
        (
            "[udp.rate_limit]\nmax_sources = 9223372036854775808\n",
            "udp.rate_limit.max_sources",
        ),
        (
            "[tcp]\nbuffer_size = 0xffffffffffffffff\n",
            "tcp.buffer_size",
        ),
    ] {
        assert_refused(
            text.trim(),
            check_config(Some(text), &[]),
            &["DIR/echod.toml", key],
        );
    }
}
