//! TCP echo as a client sees it: every byte back, unchanged and in order.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::support::{Daemon, IPV6_LOOPBACK, poll, random_bytes, tcp_roundtrip};

use crate::support::Need;

crate::support::tests![
    payloads_of_every_size_come_back_byte_exact,
    two_hundred_concurrent_clients_are_all_served,
    half_close_delivers_the_tail,
    ipv6_listener_echoes needs &[IPV6_LOOPBACK],
    ipv6_wildcard_listens_for_ipv6_only_and_both_families_need_both_addresses needs &[crate::support::IPV6_LOOPBACK],
    every_documented_tcp_nc_example_ends_at_end_of_input,
    documented_smoke_commands_print_hello_and_return_at_once needs &[Need::Tool("nc")],
    man_page_examples_run_against_a_real_echod needs &[Need::Tool("nc")],
];

fn payloads_of_every_size_come_back_byte_exact() {
    let daemon = Daemon::start("");
    for (i, size) in [0usize, 1, 1024, 1 << 20, 16 << 20].into_iter().enumerate() {
        let data = random_bytes(size, i as u64 + 1);
        let echoed = tcp_roundtrip(daemon.tcp, &data, 100 + i as u64);
        assert_eq!(echoed.len(), data.len(), "size {size}: length differs");
        assert!(echoed == data, "size {size}: bytes differ");
    }
    let echoed = 1 + 1024 + (1 << 20) + (16 << 20);
    daemon.wait_metric("echod_tcp_sent_bytes_total", &[], echoed as f64);
}

fn two_hundred_concurrent_clients_are_all_served() {
    let daemon = Daemon::start("");
    let addr = daemon.tcp;
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = random_bytes(8 * 1024 + i as usize, i);
                let echoed = tcp_roundtrip(addr, &data, i);
                assert!(echoed == data, "client {i} got a different stream");
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    daemon.wait_metric("echod_tcp_connections_accepted_total", &[], 200.0);
    daemon.wait_metric("echod_tcp_connections_closed_total", &[], 200.0);
}

fn half_close_delivers_the_tail() {
    let daemon = Daemon::start("");
    let mut s = TcpStream::connect(daemon.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Write everything without reading, then half-close: the daemon must still echo
    // the whole stream before closing.
    let data = random_bytes(200 * 1024, 7);
    let mut w = s.try_clone().unwrap();
    let d = data.clone();
    let t = std::thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    t.join().unwrap();
    assert!(
        got == data,
        "tail lost: got {} of {} bytes",
        got.len(),
        data.len()
    );
}

fn ipv6_listener_echoes() {
    let daemon = Daemon::start(
        r#"
        [tcp]
        listen = ["127.0.0.1:0", "[::1]:0"]
        "#,
    );
    let addr = daemon.listening.tcp[1];
    assert!(addr.is_ipv6(), "{:?}", daemon.listening);
    let data = random_bytes(100_000, 3);
    assert!(tcp_roundtrip(addr, &data, 9) == data);
    assert!(daemon.log().contains(&format!("addr={addr}")));
}

/// The loopback address of the same family for a wildcard one (`0.0.0.0`, `[::]`).
fn on_loopback(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let ip: std::net::IpAddr = if addr.is_ipv4() {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        std::net::Ipv6Addr::LOCALHOST.into()
    };
    std::net::SocketAddr::new(ip, addr.port())
}

/// An IPv6 address listens for IPv6 only, and both families need both addresses: the
/// second daemon runs docs/configuration.md's `runnable:dual-stack` block as written.
fn ipv6_wildcard_listens_for_ipv6_only_and_both_families_need_both_addresses() {
    let documented = crate::docs::runnable("dual-stack");
    let udp_echoes = |addr: std::net::SocketAddr| {
        let bind = if addr.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let s = std::net::UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send_to(b"family", addr).unwrap();
        let mut buf = [0u8; 16];
        // Unanswered, or refused (ICMP port unreachable) when nothing listens.
        s.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"family")
    };
    let tcp_echoes = |addr: std::net::SocketAddr| {
        TcpStream::connect(addr).is_ok() && tcp_roundtrip(addr, b"family", 1) == b"family"
    };

    // The IPv4 side of each port an IPv6-only listener got: nothing of echod's there.
    // Checked on 127.0.0.254, where no test listens: the kernel may give the same port
    // number on 127.0.0.1 to another test's daemon meanwhile, since [::] does not hold it.
    let only_v6 = Daemon::start("[tcp]\nlisten = [\"[::]:0\"]\n[udp]\nlisten = [\"[::]:0\"]\n");
    let (tcp, udp) = (only_v6.tcp, only_v6.udp);
    assert!(
        tcp_echoes(on_loopback(tcp)) && udp_echoes(on_loopback(udp)),
        "[::] serves IPv6 ({tcp}, {udp})"
    );
    let v4 =
        |addr: std::net::SocketAddr| std::net::SocketAddr::from(([127, 0, 0, 254], addr.port()));
    assert!(
        TcpStream::connect(v4(tcp)).is_err(),
        "{tcp} alone accepted an IPv4 connection"
    );
    assert!(!udp_echoes(v4(udp)), "{udp} alone answered IPv4 UDP");
    drop(only_v6);

    let both = documented.replace(":7\"", ":0\"");
    assert_eq!(
        both.matches(":0\"").count(),
        4,
        "runnable:dual-stack lists 0.0.0.0:7 and [::]:7 for TCP and UDP:\n{documented}"
    );
    let daemon = Daemon::start(&both);
    let listening = &daemon.listening;
    assert_eq!(
        (listening.tcp.len(), listening.udp.len()),
        (2, 2),
        "{listening:?}"
    );
    for (tcp, udp) in listening.tcp.iter().zip(&listening.udp) {
        let (tcp, udp) = (on_loopback(*tcp), on_loopback(*udp));
        assert_eq!(tcp.is_ipv4(), udp.is_ipv4(), "{listening:?}");
        assert!(
            tcp_echoes(tcp) && udp_echoes(udp),
            "{tcp} and {udp} with both listed"
        );
    }
    assert!(
        listening.tcp.iter().any(|a| a.is_ipv4()) && listening.tcp.iter().any(|a| a.is_ipv6()),
        "{listening:?}"
    );
}

/// Runs `script` with `sh -c` in its own process group; its stdout, or `None` when it
/// has not finished within `limit` (the whole group is then killed).
fn run_bounded(script: &str, limit: Duration) -> Option<String> {
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new("sh")
        .args(["-c", script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("sh");
    if poll(limit, || child.try_wait().unwrap()).is_none() {
        // SAFETY: kill(2) on the process group this test just created.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        return None;
    }
    let out = child.wait_with_output().unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every documented `… | nc …` command in `text`, up to its end (closing backtick,
/// quote or `#` comment); roff escapes (`\-`) undone for the man page.
fn nc_commands(text: &str) -> Vec<String> {
    let text = text.replace("\\-", "-").replace("\\e", "\\");
    let mut found = Vec::new();
    for line in text.lines() {
        let mut rest = line;
        while let Some(at) = rest.find("| nc ") {
            let start = rest[..at].rfind("echo ").unwrap_or(at);
            let tail = &rest[start..];
            let end = tail.find(['`', '\'', '#']).unwrap_or(tail.len());
            found.push(tail[..end].trim().to_string());
            rest = &tail[end..];
        }
    }
    found
}

/// Files whose nc examples users copy: the README, the man page and everything
/// shipped under packaging/ and deploy/, and docs/.
fn documented_files() -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![crate::support::repo_path("README.md")];
    let mut dirs = vec![
        root.join("packaging"),
        root.join("deploy"),
        root.join("docs"),
    ];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// netcat-openbsd (Debian's `nc`) does not half-close the connection at the end of its
/// input unless given `-N` (or `-q SECONDS`), so `echo hello | nc HOST 7` would wait for
/// echod's idle timeout (5 minutes) before returning.
fn every_documented_tcp_nc_example_ends_at_end_of_input() {
    let mut checked = 0;
    for file in documented_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for cmd in nc_commands(&text) {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let udp = words.contains(&"-u");
            let closes = words.contains(&"-N") || words.contains(&"-q");
            assert!(
                udp || closes,
                "{}: `{cmd}` hangs until the idle timeout with Debian's nc: add -N",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} nc examples found");
}

/// The smoke tests of the README (`runnable:smoke`) and of the service guide
/// (`runnable:service-smoke`), run as written against a real echod (its address swapped
/// for the test daemon's): each prints `hello` and returns at once.
fn documented_smoke_commands_print_hello_and_return_at_once() {
    let daemon = Daemon::start("");
    for block in ["smoke", "service-smoke"] {
        let commands = nc_commands(&crate::docs::runnable(block));
        assert!(commands.len() >= 2, "runnable:{block}: {commands:?}");
        run_nc_examples(&commands, &daemon);
    }
    let deploying = std::fs::read_to_string(crate::support::repo_path("docs/deploying.md"))
        .expect("docs/deploying.md");

    // Kubernetes: the in-cluster check runs the image's own `echod probe` against the
    // Service (`echod:7`), here against the test daemon.
    let probe = deploying
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("probe --tcp echod:7"))
        .expect("docs/deploying.md's kubectl run … probe example");
    let command = format!("probe --tcp echod:7{probe}");
    let args = on_test_daemon(command.split('#').next().unwrap(), "echod:7", &daemon);
    let out = std::process::Command::new(crate::support::echod_bin())
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok tcp") && stdout.contains(", udp "),
        "echod {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The words of a documented command with `documented` (an echo address) swapped for
/// the test daemon's: its UDP address after `--udp`, its TCP address anywhere else.
fn on_test_daemon(command: &str, documented: &str, daemon: &Daemon) -> Vec<String> {
    let mut previous = "";
    command
        .split_whitespace()
        .map(|word| {
            let addr = if previous == "--udp" {
                daemon.udp
            } else {
                daemon.tcp
            };
            previous = word;
            if word == documented {
                addr.to_string()
            } else {
                word.to_string()
            }
        })
        .collect()
}

/// Runs documented `echo hello | nc … HOST PORT` commands against the test daemon (its
/// UDP port for `nc -u`): each prints `hello` and returns at once; at least one TCP and
/// one UDP.
fn run_nc_examples(commands: &[String], daemon: &Daemon) {
    let (mut tcp, mut udp) = (0, 0);
    for documented in commands {
        let (host, rest) = documented
            .rsplit_once(' ')
            .and_then(|(head, _port)| head.rsplit_once(' '))
            .map(|(head, host)| (host, head))
            .expect("nc … HOST PORT");
        assert!(
            ["127.0.0.1", "localhost"].contains(&host),
            "`{documented}` does not target this host"
        );
        let port = if rest.contains(" -u") {
            daemon.udp.port()
        } else {
            daemon.tcp.port()
        };
        let script = format!("{rest} 127.0.0.1 {port}");
        let started = std::time::Instant::now();
        let out = run_bounded(&script, Duration::from_secs(10));
        let took = started.elapsed();
        let out = out.unwrap_or_else(|| {
            panic!("`{documented}` did not return within 10 s (it waits for the idle timeout)")
        });
        assert_eq!(out, "hello\n", "`{documented}`");
        // TCP returns as soon as the echo is back; UDP after nc's -w1 wait.
        assert!(
            took < Duration::from_secs(3),
            "`{documented}` took {took:?}"
        );
        if rest.contains(" -u") {
            udp += 1;
        } else {
            tcp += 1;
        }
    }
    assert!(tcp >= 1 && udp >= 1, "{commands:?}");
}

/// The man page's EXAMPLES, run as written against a real echod: the nc smoke tests
/// and `echod` commands (127.0.0.1:7 is the test daemon, /etc/echod/echod.toml the
/// file the package installs there). `systemctl reload` is run by tests/systemd.rs.
fn man_page_examples_run_against_a_real_echod() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("packaging/echod.1")).unwrap();
    let examples = page
        .split_once(".SH EXAMPLES\n")
        .expect("EXAMPLES section")
        .1;
    let examples = &examples[..examples.find("\n.SH ").unwrap_or(examples.len())];
    let daemon = Daemon::start("");
    run_nc_examples(&nc_commands(examples), &daemon);
    let lines: Vec<String> = examples
        .split(".nf\n")
        .skip(1)
        .flat_map(|block| block.split(".fi\n").next().unwrap().lines())
        .map(|l| l.replace("\\-", "-"))
        .collect();
    let mut ran = 0;
    for line in &lines {
        let line = on_test_daemon(line, "127.0.0.1:7", &daemon)
            .join(" ")
            .replace(
                "/etc/echod/echod.toml",
                &root.join("packaging/echod.toml").display().to_string(),
            );
        let mut words = line.split_whitespace().peekable();
        let mut cmd = std::process::Command::new(crate::support::echod_bin());
        cmd.env_remove("ECHOD_CONFIG");
        while let Some((key, value)) = words.peek().and_then(|w| w.split_once('=')) {
            cmd.env(key, value);
            words.next();
        }
        if words.next() != Some("echod") {
            continue;
        }
        let out = cmd.args(words).output().unwrap();
        assert!(
            out.status.success(),
            "`{line}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if line.starts_with("ECHOD_TCP__MAX_CONNECTIONS=20000") {
            assert!(String::from_utf8_lossy(&out.stdout).contains("max_connections = 20000"));
        }
        ran += 1;
    }
    assert!(ran >= 3, "echod examples run: {ran} of {lines:?}");
}
