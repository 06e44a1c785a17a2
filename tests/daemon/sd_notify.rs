//! What systemd hears from echod over the notify protocol, checked against a fake
//! `NOTIFY_SOCKET`: READY only once serving, STATUS refreshed, RELOADING/READY around
//! a reload, STOPPING on stop, and watchdog pings at half `WATCHDOG_USEC`.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::support::{self, Daemon, Listening, Notification, NotifySocket, Options, http_get};

crate::support::tests![
    lifecycle_messages_arrive_in_protocol_order,
    watchdog_pings_at_half_the_interval,
    watchdog_pings_stop_while_the_serving_runtime_is_blocked,
];

const WAIT: Duration = Duration::from_secs(15);

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(result, 0);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The lifecycle messages in order, watchdog pings left out, as short names.
fn kinds(seen: &[Notification]) -> Vec<&'static str> {
    seen.iter()
        .filter(|n| !n.is_watchdog())
        .map(|n| {
            if n.get("READY") == Some("1") {
                "READY"
            } else if n.get("RELOADING") == Some("1") {
                "RELOADING"
            } else if n.get("STOPPING") == Some("1") {
                "STOPPING"
            } else if n.get("STATUS").is_some() {
                "STATUS"
            } else {
                panic!("unexpected notification {:?}", n.text)
            }
        })
        .collect()
}

fn lifecycle_messages_arrive_in_protocol_order() {
    let notify = NotifySocket::bind();
    // Not waiting for /readyz: READY=1 alone must mean "serving".
    let mut daemon = Daemon::start_with(Options {
        env: vec![("NOTIFY_SOCKET", notify.path.display().to_string())],
        no_wait: true,
        ..Options::default()
    });
    let mut seen = Vec::new();

    // READY=1 comes with a STATUS naming every listener, and only once they serve.
    let ready = notify.until(&mut seen, WAIT, |n| n.get("READY").is_some());
    let status = ready.get("STATUS").expect("READY carries a STATUS");
    let listening = Listening::parse(status).expect("STATUS names the listeners");
    (daemon.tcp, daemon.udp, daemon.http) = (listening.tcp[0], listening.udp[0], listening.http[0]);
    TcpStream::connect(daemon.tcp).expect("TCP serves once READY=1 was sent");
    let (code, _) = http_get(daemon.http, "/readyz").expect("HTTP serves once READY=1 was sent");
    assert_eq!(code, 200);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    udp.send_to(b"ready?", daemon.udp).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        udp.recv(&mut buf)
            .expect("UDP serves once READY=1 was sent"),
        6
    );
    assert_eq!(
        seen.len(),
        1,
        "READY=1 must be the first message: {seen:#?}"
    );
    // The STATUS names what the log's ready line names.
    daemon.wait_listening();
    assert_eq!(daemon.listening, listening, "{status}");
    assert!(status.contains("0 connections"), "{status}");

    // STATUS is refreshed: a held connection shows up in a later one (every 5 s).
    let mut held = TcpStream::connect(daemon.tcp).unwrap();
    held.set_read_timeout(Some(WAIT)).unwrap();
    held.write_all(b"hold").unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).unwrap();
    notify.until(&mut seen, WAIT, |n| {
        n.get("STATUS")
            .is_some_and(|s| s.ends_with("; 1 connection"))
    });

    // SIGHUP: RELOADING=1 with a current CLOCK_MONOTONIC stamp, then READY=1.
    let before = monotonic_usec();
    daemon.signal(libc::SIGHUP);
    let reloading = notify.until(&mut seen, WAIT, |n| n.get("RELOADING").is_some());
    let after = monotonic_usec();
    let stamp: u64 = reloading
        .get("MONOTONIC_USEC")
        .expect("RELOADING=1 carries MONOTONIC_USEC")
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        (before..=after).contains(&stamp),
        "MONOTONIC_USEC={stamp} not within [{before}, {after}]"
    );
    let reloaded = notify.until(&mut seen, WAIT, |n| n.get("READY").is_some());
    assert!(
        !reloaded.get("STATUS").unwrap_or("").contains("FAILED"),
        "{reloaded:?}"
    );

    // SIGTERM: STOPPING=1 with the number of connections being drained.
    drop(held);
    daemon.signal(libc::SIGTERM);
    let stopping = notify.until(&mut seen, WAIT, |n| n.get("STOPPING").is_some());
    assert!(
        stopping
            .get("STATUS")
            .unwrap_or("")
            .starts_with("draining ")
    );
    assert!(daemon.wait_exit(WAIT).success());
    while let Some(n) = notify.recv(Duration::from_millis(200)) {
        seen.push(n);
    }

    let kinds = kinds(&seen);
    let stopping_at = kinds.iter().position(|k| *k == "STOPPING").unwrap();
    assert_eq!(
        stopping_at,
        kinds.len() - 1,
        "STOPPING=1 must be last: {kinds:?}"
    );
    let lifecycle: Vec<_> = kinds.iter().filter(|k| **k != "STATUS").collect();
    assert_eq!(
        lifecycle,
        [&"READY", &"RELOADING", &"READY", &"STOPPING"],
        "{kinds:?}"
    );
    assert!(
        !seen.iter().any(Notification::is_watchdog),
        "no watchdog pings without WATCHDOG_USEC"
    );
}

/// echod reporting to `notify` with a 1 s watchdog, plus the variables in `extra`.
fn with_one_second_watchdog(notify: &NotifySocket, extra: &[(&'static str, &str)]) -> Daemon {
    let mut env = vec![
        ("NOTIFY_SOCKET", notify.path.display().to_string()),
        ("WATCHDOG_USEC", "1000000".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    Daemon::start_with(Options {
        env,
        ..Options::default()
    })
}

fn watchdog_pings_at_half_the_interval() {
    let notify = NotifySocket::bind();
    let daemon = with_one_second_watchdog(&notify, &[]);
    // No pings for a watchdog meant for another process (WATCHDOG_PID), nor for a
    // disabled one (WATCHDOG_USEC=0).
    let unfed: Vec<_> = [("1000000", Some("1")), ("0", None)]
        .into_iter()
        .map(|(usec, pid)| {
            let notify = NotifySocket::bind();
            let mut env = vec![
                ("NOTIFY_SOCKET", notify.path.display().to_string()),
                ("WATCHDOG_USEC", usec.to_string()),
            ];
            env.extend(pid.map(|p| ("WATCHDOG_PID", p.to_string())));
            let daemon = Daemon::start_with(Options {
                env,
                ..Options::default()
            });
            (notify, daemon)
        })
        .collect();

    let mut pings = Vec::new();
    let mut seen = Vec::new();
    while pings.len() < 9 {
        let n = notify.until(&mut seen, Duration::from_secs(5), Notification::is_watchdog);
        pings.push(n.at);
    }
    let mut gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        (Duration::from_millis(400)..=Duration::from_millis(650)).contains(&median),
        "median gap between pings {median:?}, expected about 500 ms (gaps {gaps:?})"
    );
    assert!(
        gaps.iter().all(|g| *g < Duration::from_millis(1000)),
        "a gap reached the whole watchdog interval: {gaps:?}"
    );
    drop(daemon);

    for (notify, daemon) in &unfed {
        let mut seen = Vec::new();
        while let Some(n) = notify.recv(Duration::from_millis(1500)) {
            seen.push(n);
            if seen.len() > 20 {
                break;
            }
        }
        assert!(seen.iter().any(|n| n.get("READY").is_some()), "{seen:?}");
        assert!(
            !seen.iter().any(Notification::is_watchdog),
            "pinged a watchdog that is not ours or disabled: {seen:?}"
        );
        assert!(support::tcp_roundtrip(daemon.tcp, b"alive", 1) == b"alive");
        assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
    }
}

/// The scheduler state of a process (`R`, `S`, `D`, `T` stopped …), from /proc.
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    stat[stat.rfind(')').expect("comm") + 2..]
        .chars()
        .next()
        .expect("state")
}

/// The pings come from the runtime that serves traffic: with every worker of it blocked
/// (a test hook; the process keeps running, unlike under SIGSTOP) they stop, and they
/// resume when the runtime does. A ping thread of its own would keep pinging.
fn watchdog_pings_stop_while_the_serving_runtime_is_blocked() {
    let notify = NotifySocket::bind();
    let daemon = with_one_second_watchdog(
        &notify,
        &[
            ("ECHOD_TEST_BLOCK_RUNTIME_AFTER", "1500ms"),
            ("ECHOD_TEST_BLOCK_RUNTIME_FOR", "3s"),
        ],
    );
    let started = Instant::now();
    let (mut pings, mut states) = (Vec::new(), Vec::new());
    // Until pings resumed after the block (1.5 s + 3 s), 10 s at most.
    while started.elapsed() < Duration::from_secs(10) {
        if let Some(n) = notify.recv(Duration::from_millis(100))
            && n.is_watchdog()
        {
            pings.push(n.at);
        }
        states.push((Instant::now(), process_state(daemon.pid())));
        // Resumed: two pings since a gap of more than 2 s.
        let after_gap = pings
            .windows(2)
            .position(|w| w[1] - w[0] > Duration::from_secs(2))
            .map_or(0, |i| pings.len() - i - 1);
        if after_gap >= 2 {
            break;
        }
    }
    let (gap_start, gap_end) = pings
        .windows(2)
        .map(|w| (w[0], w[1]))
        .max_by_key(|(a, b)| *b - *a)
        .expect("at least two pings");
    let gap = gap_end - gap_start;
    assert!(
        gap >= Duration::from_millis(2500),
        "pings went on while the runtime was blocked for 3 s: longest gap {gap:?}"
    );
    assert!(
        pings.iter().filter(|p| **p >= gap_end).count() >= 2
            && pings.iter().filter(|p| **p <= gap_start).count() >= 2,
        "pings before and after the block: {pings:?}"
    );
    let during: Vec<char> = states
        .iter()
        .filter(|(at, _)| *at > gap_start && *at < gap_end)
        .map(|(_, state)| *state)
        .collect();
    assert!(
        during.len() >= 10,
        "sampled the process {} times",
        during.len()
    );
    assert!(
        during.iter().all(|s| *s != 'T' && *s != 't' && *s != 'Z'),
        "the process must run, not be stopped: {during:?}"
    );
    assert!(daemon.log().contains("test hook"), "{}", daemon.log());
}
