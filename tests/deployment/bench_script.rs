//! `benches/compare.sh` in a tiny mode: it must finish with a table naming every
//! server (the C epoll floor, and with `BASE_BIN` the earlier build too) under both load
//! generators (`echod bench` and echoload, built from `../shared`), with ratios against
//! the floor, and a run against a server that
//! corrupts echoes must make it fail. `benches/syscalls.sh` counts system calls per
//! round trip, which do not move with the machine's load, so a test can hold echod to
//! the naive loop's count.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};

crate::support::tests![
    the_tiny_comparison_prints_a_table_of_both_servers needs &[
        crate::support::Need::Tool("socat"),
        crate::support::Need::Tool("cc"),
        crate::support::Need::Host("../shared/bench beside the repository", shared_bench_exists),
    ],
    a_corrupting_server_fails_the_script_and_names_the_run needs &[
        crate::support::Need::Tool("socat"),
        crate::support::Need::Tool("cc"),
        crate::support::Need::Host("../shared/bench beside the repository", shared_bench_exists),
    ],
    the_tls_section_compares_echod_with_socat_and_ncat_over_tls needs &[
        crate::support::Need::Tool("socat"),
        crate::support::Need::Tool("ncat"),
        crate::support::Need::Tool("openssl"),
    ],
    echod_makes_no_more_system_calls_per_round_trip_than_the_naive_loop needs &[crate::support::Need::Tool("perf")],
    the_buffer_size_sweep_prints_a_figure_for_every_size_and_the_floor needs &[
        crate::support::Need::Tool("cc"),
        crate::support::Need::Host("../shared/bench beside the repository", shared_bench_exists),
    ],
];

/// The script uses eleven consecutive ports from BASE_PORT, TCP and UDP, and five more
/// with TLS=1.
fn free_base_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 24_000 + (std::process::id() % 400) as u16 * 20;
    loop {
        let base = start + NEXT.fetch_add(20, Ordering::Relaxed) % 8_000;
        let free = (base..base + 16).all(|p| {
            TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
        });
        if free {
            return base;
        }
    }
}

/// The example builds next to the echod under test; `cargo test` builds them, a
/// filtered `cargo test --test bench_script` may not, so build them then.
fn examples_dir() -> PathBuf {
    let bin = crate::support::echod_bin();
    let dir = bin.parent().expect("target dir").join("examples");
    let wanted = [
        "naive_echo",
        "hold_connections",
        "corrupt_echo",
        "uring_echo",
    ];
    if wanted.iter().all(|e| dir.join(e).exists()) {
        return dir;
    }
    let profile = if dir.components().any(|c| c.as_os_str() == "release") {
        vec!["--release"]
    } else {
        vec![]
    };
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet"])
        .args(profile);
    for e in wanted {
        cargo.args(["--example", e]);
    }
    assert!(
        cargo.status().expect("run cargo").success(),
        "examples build"
    );
    dir
}

/// The load generator and the floor, read-only beside the repository.
fn shared_bench() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bench")
}

fn shared_bench_exists() -> bool {
    shared_bench().join("echoload/Cargo.toml").exists()
        && shared_bench().join("epoll-c/epoll_echo.c").exists()
}

/// Builds echoload into target/echoload the way compare.sh does (the first build takes
/// minutes, outside the script's time limit; the script's own build is then a no-op).
fn build_echoload() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--locked",
            "--quiet",
            "--manifest-path",
        ])
        .arg(shared_bench().join("echoload/Cargo.toml"))
        .args(["--target-dir", "target/echoload"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "echoload build");
}

/// Runs the script (at most 150 s) with `env` on top of the tiny settings.
/// The script's output, once it is known to have succeeded (else both streams, failing).
fn succeeded(run: &Output) -> String {
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "exit {:?}\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

fn compare(env: &[(&str, &str)], out: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/compare.sh");
    let base = free_base_port().to_string();
    Command::new("timeout")
        .args(["--kill-after=10", "150", "bash"])
        .arg(script)
        .env("ECHOD_BIN", crate::support::echod_bin())
        .env("EXAMPLES_DIR", examples_dir())
        .env("OUT", out)
        .env("BASE_PORT", base)
        .env("REPEATS", "1")
        .env("DURATION", "1s")
        .env("WARMUP", "0")
        .env("IDLE", "200")
        .env("CURVE", "100")
        .envs(env.iter().copied())
        .output()
        .expect("run benches/compare.sh")
}

fn the_tiny_comparison_prints_a_table_of_both_servers() {
    build_echoload();
    let out = tempfile::tempdir().unwrap();
    // BASE_BIN (an earlier build beside the current one) is given the same binary here.
    let echod = crate::support::echod_bin();
    let base_bin = echod.to_str().expect("UTF-8 path");
    // URING=1 adds the io_uring example, where the kernel lets processes use io_uring.
    let uring = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .is_ok_and(|v| v.trim() == "0");
    let run = compare(
        &[
            ("SCENARIOS", "rt64-c1 udp64-c1 idle"),
            ("BASE_BIN", base_bin),
            ("URING", if uring { "1" } else { "0" }),
        ],
        out.path(),
    );
    let stdout = succeeded(&run);
    let mut rows = vec![
        "| 200 (headline) |",
        "Kernel memory per idle TCP socket",
        "echoload's reading at 200 idle connections",
    ];
    let servers = ["echod", "echod-base", "floor", "naive", "socat"];
    let each: Vec<String> = ["rt64-c1", "udp64-c1"]
        .iter()
        .flat_map(|s| servers.iter().map(move |v| (s, v)))
        .flat_map(|(s, v)| ["bench", "echoload"].map(|g| format!("| {s} | {v} | {g} |")))
        .collect();
    rows.extend(each.iter().map(String::as_str));
    for row in rows {
        assert!(stdout.contains(row), "no row {row:?} in\n{stdout}");
    }
    // The ratios against the floor, under both generators: a number, and the floor is 1.
    for row in [
        "| rt64-c1 | CPU µs/msg | echoload |",
        "| rt64-c1 | CPU µs/msg | bench |",
        "| udp64-c1 | CPU µs/msg | echoload |",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in\n{stdout}"));
        let floor_ratio = line.split('|').nth(5).unwrap_or("").trim();
        assert!(
            floor_ratio.ends_with('×') && floor_ratio.trim_end_matches('×').parse::<f64>().is_ok(),
            "no ratio against the floor in {line:?}"
        );
    }
    for generator in ["bench", "echoload"] {
        let floor_row = format!("| rt64-c1 | floor | {generator} |");
        let line = stdout.lines().find(|l| l.starts_with(&floor_row)).unwrap();
        assert!(
            line.contains("| 1.00× |"),
            "the floor against itself: {line:?}"
        );
    }
    if uring {
        assert!(
            stdout.contains("| rt64-c1 | uring | bench |")
                && stdout.contains("| rt64-c1 | uring | echoload |")
                && !stdout.contains("| udp64-c1 | uring |"),
            "URING=1: a uring row for TCP only in\n{stdout}"
        );
    } else {
        eprintln!("io_uring is disabled here: compare.sh ran without URING=1");
    }
    assert!(stdout.contains("CPU µs/msg") && stdout.contains("CPU s/GB"));
    let table = std::fs::read_to_string(out.path().join("table.md")).expect("table.md");
    assert!(table.contains("| rt64-c1 | echod | echoload |"), "{table}");
}

fn a_corrupting_server_fails_the_script_and_names_the_run() {
    build_echoload();
    let out = tempfile::tempdir().unwrap();
    let run = compare(
        &[("SCENARIOS", "rt64-c1"), ("COMPARE_SELFTEST_CORRUPT", "1")],
        out.path(),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("FAILED: run rt64-c1/naive #1") && stderr.contains("mismatch"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("| scenario |"),
        "a table after a failure:\n{stdout}"
    );
}

/// TLS=1 (and no plain scenario): echod's TLS listener, socat's and ncat's TLS echoes
/// and echod's plain port, in bulk and connect mode, each run verifying the certificate
/// and every byte; a table with every row, figures and the TLS/plain ratios.
fn the_tls_section_compares_echod_with_socat_and_ncat_over_tls() {
    let out = tempfile::tempdir().unwrap();
    let run = compare(&[("SCENARIOS", "none"), ("TLS", "1")], out.path());
    succeeded(&run);
    let table = std::fs::read_to_string(out.path().join("table.md")).expect("table.md");
    for (scenario, servers) in [
        (
            "tls-bulk-c4",
            &["echod-tls", "socat-tls", "echod-plain"][..],
        ),
        (
            "tls-connect-c4",
            &["echod-tls", "socat-tls", "ncat-tls", "echod-plain"][..],
        ),
    ] {
        for &server in servers {
            let row = format!("| {scenario} | {server} | ");
            let line = table
                .lines()
                .find(|l| l.starts_with(&row))
                .unwrap_or_else(|| panic!("no row {row:?} in\n{table}"));
            // msg/s and CPU per message (and in bulk MB/s; 64 B per connection rounds
            // to 0.0 MB/s) are measured, not blank or zero.
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let mut columns = vec![(3, "msg/s"), (7, "CPU µs/msg")];
            if scenario == "tls-bulk-c4" {
                columns.push((4, "MB/s"));
            }
            for (i, what) in columns {
                let v: f64 = cells[i]
                    .parse()
                    .unwrap_or_else(|_| panic!("{what} of {row}: {line}"));
                assert!(v > 0.0, "{what} of {row} is {v}: {line}");
            }
        }
    }
    for ratio in [
        "bulk MB/s ",
        "bulk CPU s/GB ",
        "connections/s ",
        "CPU per connection ",
    ] {
        let after = table
            .split(ratio)
            .nth(1)
            .unwrap_or_else(|| panic!("no {ratio:?} ratio in\n{table}"));
        assert!(
            after
                .split('×')
                .next()
                .is_some_and(|v| v.parse::<f64>().is_ok_and(|v| v > 0.0)),
            "{ratio:?} is not a ratio: {table}"
        );
    }
    // Every run verified echoes over TLS: the JSON of an echod-tls run says so.
    let runs = std::fs::read_to_string(out.path().join("raw.jsonl")).unwrap();
    let tls_runs = runs
        .lines()
        .filter(|l| l.contains("\"target\":\"tls://"))
        .count();
    assert_eq!(
        tls_runs, 5,
        "two TLS servers in bulk, three in connect:\n{runs}"
    );
}

/// Runs `benches/syscalls.sh` for one server: its figures by name.
fn syscalls(server: &str, args: &[&str]) -> std::collections::HashMap<String, f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/syscalls.sh");
    let run = Command::new("timeout")
        .args(["--kill-after=10", "120", "bash"])
        .arg(script)
        .args([server, "3000"])
        .args(args)
        .env("ECHOD_BIN", crate::support::echod_bin())
        .env("EXAMPLES_DIR", examples_dir())
        .env("PORT", free_base_port().to_string())
        .output()
        .expect("run benches/syscalls.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "syscalls.sh {server}: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(words.first(), Some(&server), "{stdout}");
    words[1..]
        .chunks(2)
        .map(|pair| (pair[0].to_string(), pair[1].parse().expect("a number")))
        .collect()
}

/// One 64 B round trip at a time: the naive loop makes three system calls per round trip
/// (`epoll_wait`, `read`, `write`); echod made four before its read stopped asking
/// again until EAGAIN. The count does not depend on the machine's load.
fn echod_makes_no_more_system_calls_per_round_trip_than_the_naive_loop() {
    let args = ["-s", "64", "-C", "1"];
    let naive = syscalls("naive", &args);
    let echod = syscalls("echod", &args);
    eprintln!("system calls per round trip: echod {echod:?}, naive {naive:?}");
    assert!(naive["syscalls/msg"] >= 2.0, "naive: {naive:?}");
    assert!(
        echod["syscalls/msg"] <= naive["syscalls/msg"] + 0.2,
        "echod {echod:?} against naive {naive:?}"
    );
}

/// `benches/buffer_sizes.sh` (what the `tcp.buffer_size` default rests on) in a tiny mode:
/// a row per load, each with a figure for the floor and for every size asked for.
fn the_buffer_size_sweep_prints_a_figure_for_every_size_and_the_floor() {
    build_echoload();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/buffer_sizes.sh");
    let run = Command::new("timeout")
        .args(["--kill-after=10", "120", "bash"])
        .arg(script)
        .env("ECHOD_BIN", crate::support::echod_bin())
        .env("PORT", free_base_port().to_string())
        .env("REPEATS", "1")
        .env("SECS", "1")
        .env("SIZES", "16384 32768")
        .output()
        .expect("run benches/buffer_sizes.sh");
    let out = succeeded(&run);
    assert!(
        out.contains("| echoload | floor | 16384 | 32768 |"),
        "{out}"
    );
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| `bulk")).collect();
    assert_eq!(rows.len(), 4, "{out}");
    for row in rows {
        let figures: Vec<f64> = row
            .split('|')
            .skip(2)
            .filter_map(|cell| cell.trim().parse().ok())
            .collect();
        assert_eq!(figures.len(), 3, "{row}");
        assert!(figures.iter().all(|f| *f > 0.0), "{row}");
    }
}
