//! The daemon run in-process through `echod::daemon::serve`, on sockets the test binds
//! itself on port 0: no free-port race, no process to spawn, so reload, limits and counts
//! are checked in milliseconds. Signals, exit codes and sd_notify stay black-box tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use echod::config::Config;
use echod::daemon::{Control, ServeError, Sockets, Summary, serve};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{http_get, metric_value, udp_client, wait_until};

/// How long a UDP client waits for a reply.
const REPLY: Duration = Duration::from_millis(300);

crate::support::tests![
    echoes_and_counts_every_byte_exactly,
    reload_lowers_the_connection_limit_for_new_connections_only,
    a_reload_that_cannot_bind_or_load_keeps_the_old_listeners,
    reload_moves_a_listener_and_stop_drains_open_connections,
    clients_waiting_in_the_backlog_at_a_stop_get_eof_and_count_as_shutdown,
    a_reload_applies_the_idle_and_drain_timeouts,
    a_reload_applies_udp_rate_limit_deny_ports_and_datagram_size,
];

/// A daemon serving on its own runtime threads, with the addresses it got.
struct InProcess {
    tcp: SocketAddr,
    udp: SocketAddr,
    http: SocketAddr,
    config: Config,
    control: mpsc::Sender<Control>,
    task: JoinHandle<Result<Summary, ServeError>>,
}

impl InProcess {
    /// Binds TCP, UDP and HTTP on 127.0.0.1:0, points `config` at them and serves.
    async fn start(mut config: Config) -> Self {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let http = TcpListener::bind("127.0.0.1:0").expect("bind http");
        let (t, u, h) = (
            tcp.local_addr().unwrap(),
            udp.local_addr().unwrap(),
            http.local_addr().unwrap(),
        );
        config.tcp.listen = vec![t];
        config.udp.listen = vec![u];
        config.metrics.listen = vec![h];
        let (control, requests) = mpsc::channel(4);
        let sockets = Sockets::new().tcp(tcp).udp(udp).http(http);
        let task = tokio::spawn(serve(config.clone(), sockets, requests));
        let daemon = Self {
            tcp: t,
            udp: u,
            http: h,
            config,
            control,
            task,
        };
        daemon
            .wait_until(|m| metric_value(m, "echod_ready", &[]) == 1.0)
            .await;
        daemon
    }

    async fn metrics(&self) -> String {
        let http = self.http;
        tokio::task::spawn_blocking(move || http_get(http, "/metrics"))
            .await
            .expect("scrape task")
            .expect("scrape")
            .1
    }

    /// Polls the exposition until `ok` holds (counters are updated asynchronously).
    async fn wait_until(&self, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics().await;
            if ok(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "condition never held; metrics:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn reload(&self, config: Result<Config, String>) {
        self.control
            .send(Control::Reload(Box::new(config)))
            .await
            .expect("server is running");
    }

    async fn stop(self) -> Summary {
        self.control
            .send(Control::Stop("test"))
            .await
            .expect("server is running");
        self.task.await.expect("serve task").expect("serve result")
    }
}

/// A daemon on a runtime of its own with `workers` worker threads, so the test thread
/// can use blocking sockets directly.
fn on_own_runtime(workers: usize, config: Config) -> (tokio::runtime::Runtime, InProcess) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    let daemon = runtime.block_on(InProcess::start(config));
    (runtime, daemon)
}

/// One blocking TCP echo of `payload`; returns what came back.
fn tcp_echo(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(payload).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    back
}

fn echoes_and_counts_every_byte_exactly() {
    crate::support::block_on(async {
        let d = InProcess::start(Config::default()).await;
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (tcp, p) = (d.tcp, payload.clone());
        let back = tokio::task::spawn_blocking(move || tcp_echo(tcp, &p))
            .await
            .unwrap();
        assert_eq!(back, payload);
        let udp = d.udp;
        let reply = tokio::task::spawn_blocking(move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send_to(b"datagram", udp).unwrap();
            let mut buf = [0u8; 64];
            let n = s.recv(&mut buf).unwrap();
            buf[..n].to_vec()
        })
        .await
        .unwrap();
        assert_eq!(reply, b"datagram");
        let label = d.tcp.to_string();
        let m = d
            .wait_until(|m| {
                metric_value(
                    m,
                    "echod_tcp_connections_closed_total",
                    &[("listener", &label)],
                ) == 1.0
            })
            .await;
        let l = [("listener", label.as_str())];
        assert_eq!(
            metric_value(&m, "echod_tcp_received_bytes_total", &l),
            100_000.0
        );
        assert_eq!(
            metric_value(&m, "echod_tcp_sent_bytes_total", &l),
            100_000.0
        );
        let u = d.udp.to_string();
        assert_eq!(
            metric_value(&m, "echod_udp_sent_bytes_total", &[("listener", &u)]),
            8.0
        );
        assert_eq!(d.stop().await, Summary { drained: 0, cut: 0 });
    })
}

fn reload_lowers_the_connection_limit_for_new_connections_only() {
    crate::support::block_on(async {
        let d = InProcess::start(Config::default()).await;
        let tcp = d.tcp;
        // Two idle connections, admitted under the old limit.
        let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(tcp).unwrap()).collect();
        let label = d.tcp.to_string();
        d.wait_until(|m| {
            metric_value(m, "echod_tcp_connections_active", &[("listener", &label)]) == 2.0
        })
        .await;
        let mut lowered = d.config.clone();
        lowered.tcp.max_connections = 2;
        d.reload(Ok(lowered)).await;
        d.wait_until(|m| metric_value(m, "echod_tcp_max_connections", &[]) == 2.0)
            .await;
        // A third is refused (EOF at once) and counted; the two stay open and echo.
        let refused = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(tcp).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 1];
            s.read(&mut buf).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(refused, 0, "over the limit: EOF");
        let m = d
            .wait_until(|m| {
                metric_value(
                    m,
                    "echod_tcp_connections_rejected_total",
                    &[("listener", &label), ("reason", "global_limit")],
                ) == 1.0
            })
            .await;
        assert_eq!(metric_value(&m, "echod_config_reloads_total", &[]), 1.0);
        for mut s in held {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(b"still here").unwrap();
            let mut buf = [0u8; 10];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"still here");
        }
        assert_eq!(d.stop().await.cut, 0);
    })
}

fn a_reload_that_cannot_bind_or_load_keeps_the_old_listeners() {
    crate::support::block_on(async {
        let d = InProcess::start(Config::default()).await;
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut moved = d.config.clone();
        moved.tcp.listen = vec![taken.local_addr().unwrap()];
        d.reload(Ok(moved)).await;
        d.reload(Err("invalid config file x: broken".into())).await;
        d.wait_until(|m| metric_value(m, "echod_config_reload_failures_total", &[]) == 2.0)
            .await;
        // A fresh scrape: one scrape reads the families one after another (this gauge
        // first), so the one that saw the second failure may have read the gauge before
        // the first failure was handled.
        let m = d.metrics().await;
        assert_eq!(
            metric_value(&m, "echod_config_last_reload_successful", &[]),
            0.0
        );
        let tcp = d.tcp;
        let back = tokio::task::spawn_blocking(move || tcp_echo(tcp, b"old listener"))
            .await
            .unwrap();
        assert_eq!(back, b"old listener");
        d.stop().await;
    })
}

fn reload_moves_a_listener_and_stop_drains_open_connections() {
    crate::support::block_on(async {
        let d = InProcess::start(Config::default()).await;
        let old = d.tcp;
        let mut held = TcpStream::connect(old).unwrap();
        let label = old.to_string();
        d.wait_until(|m| {
            metric_value(m, "echod_tcp_connections_active", &[("listener", &label)]) == 1.0
        })
        .await;
        let next = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut moved = d.config.clone();
        moved.tcp.listen = vec![next];
        d.reload(Ok(moved)).await;
        d.wait_until(|m| metric_value(m, "echod_config_reloads_total", &[]) == 1.0)
            .await;
        let back = tokio::task::spawn_blocking(move || tcp_echo(next, b"new"))
            .await
            .unwrap();
        assert_eq!(back, b"new");
        assert!(
            TcpStream::connect(old).is_err(),
            "the removed listener is closed"
        );
        // The connection accepted by the removed listener still echoes, then drains.
        held.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        held.write_all(b"kept").unwrap();
        let mut buf = [0u8; 4];
        held.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"kept");
        // Closed once the drain has begun (readiness fails), so it is drained, not cut.
        let http = d.http;
        let closer = std::thread::spawn(move || {
            wait_until(
                Duration::from_secs(5),
                || "the drain never began",
                || http_get(http, "/readyz").is_ok_and(|(status, _)| status == 503),
            );
            drop(held);
        });
        assert_eq!(d.stop().await, Summary { drained: 1, cut: 0 });
        closer.join().unwrap();
    })
}

/// Connections the kernel completed before the stop but echod had not accepted yet are
/// closed cleanly (EOF, not a reset) and counted as `shutdown`. The daemon runs on one
/// worker, which the test holds while clients queue in the backlog and the stop is sent.
fn clients_waiting_in_the_backlog_at_a_stop_get_eof_and_count_as_shutdown() {
    let (runtime, d) = on_own_runtime(1, Config::default());
    let mut held = TcpStream::connect(d.tcp).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    held.write_all(b"x").unwrap();
    held.read_exact(&mut [0u8; 1])
        .expect("admitted before the stop");

    let (entered, worker_held) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    runtime.spawn(async move {
        entered.send(()).unwrap();
        let _ = released.recv_timeout(Duration::from_secs(10));
    });
    worker_held
        .recv_timeout(Duration::from_secs(5))
        .expect("the worker runs the blocking task");
    let waiting: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(d.tcp).expect("the kernel completes the handshake"))
        .collect();
    d.control
        .blocking_send(Control::Stop("test"))
        .expect("server is running");
    release.send(()).unwrap();

    for (i, mut client) in waiting.into_iter().enumerate() {
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let read = client.read(&mut buf);
        assert!(
            matches!(read, Ok(0)),
            "client {i} waiting at the stop: {read:?}, expected EOF"
        );
    }
    // The held connection keeps the drain (and so the endpoint) going.
    let label = d.tcp.to_string();
    let (_, m) = http_get(d.http, "/metrics").expect("scrape while draining");
    let listener = [("listener", label.as_str())];
    assert_eq!(
        metric_value(
            &m,
            "echod_tcp_connections_rejected_total",
            &[listener[0], ("reason", "shutdown")]
        ),
        5.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "echod_tcp_connections_accepted_total", &listener),
        1.0
    );
    drop(held);
    let summary = runtime
        .block_on(d.task)
        .expect("serve task")
        .expect("serve result");
    assert_eq!(summary, Summary { drained: 1, cut: 0 });
}

impl InProcess {
    /// Reloads `config` from a thread outside the runtime and waits until it is applied.
    fn reload_blocking(&self, runtime: &tokio::runtime::Runtime, config: Config) {
        let before = self.scrape_blocking();
        let reloads = metric_value(&before, "echod_config_reloads_total", &[]);
        runtime.block_on(self.reload(Ok(config)));
        wait_until(
            Duration::from_secs(5),
            || "reload never applied",
            || metric_value(&self.scrape_blocking(), "echod_config_reloads_total", &[]) > reloads,
        );
    }

    fn scrape_blocking(&self) -> String {
        http_get(self.http, "/metrics").expect("scrape").1
    }
}

/// Reads until EOF or an error; how long it took.
fn time_to_eof(s: &mut TcpStream) -> (std::io::Result<usize>, Duration) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let read = s.read(&mut [0u8; 16]);
    (read, started.elapsed())
}

fn a_reload_applies_the_idle_and_drain_timeouts() {
    // Defaults: idle 5 min, drain 30 s. The first reload shortens the idle timeout.
    let (runtime, d) = on_own_runtime(2, Config::default());
    let mut shorter = d.config.clone();
    shorter.tcp.idle_timeout = Duration::from_millis(500);
    d.reload_blocking(&runtime, shorter.clone());

    let mut idle = TcpStream::connect(d.tcp).unwrap();
    let (read, after) = time_to_eof(&mut idle);
    assert!(matches!(read, Ok(0)), "idle connection: {read:?}");
    assert!(
        (Duration::from_millis(400)..Duration::from_secs(3)).contains(&after),
        "closed {after:?} after connecting with idle_timeout = 500ms"
    );
    let label = d.tcp.to_string();
    let m = d.scrape_blocking();
    assert_eq!(
        metric_value(&m, "echod_tcp_idle_timeouts_total", &[("listener", &label)]),
        1.0
    );

    // The second gives idle connections 10 s again, and the drain 200 ms: a connection
    // open at the stop is cut after 200 ms, with EOF, while the server still runs
    // (in-process, nothing else would close it).
    shorter.tcp.idle_timeout = Duration::from_secs(10);
    shorter.shutdown.drain_timeout = Duration::from_millis(200);
    d.reload_blocking(&runtime, shorter);
    let mut open = TcpStream::connect(d.tcp).unwrap();
    open.write_all(b"x").unwrap();
    open.read_exact(&mut [0u8; 1]).unwrap();
    d.control
        .blocking_send(Control::Stop("test"))
        .expect("server is running");
    let (read, after) = time_to_eof(&mut open);
    assert!(matches!(read, Ok(0)), "cut connection: {read:?}");
    assert!(
        (Duration::from_millis(150)..Duration::from_secs(3)).contains(&after),
        "cut {after:?} after the stop with drain_timeout = 200ms"
    );
    let summary = runtime.block_on(d.task).expect("task").expect("serve");
    assert_eq!(summary, Summary { drained: 0, cut: 1 });
}

/// Sends each datagram and counts the replies that come back unchanged.
fn udp_replies(client: &UdpSocket, to: SocketAddr, datagrams: &[&[u8]]) -> usize {
    let mut buf = [0u8; 2048];
    datagrams
        .iter()
        .filter(|datagram| {
            client.send_to(datagram, to).unwrap();
            client.recv(&mut buf).is_ok_and(|n| &buf[..n] == **datagram)
        })
        .count()
}

fn a_reload_applies_udp_rate_limit_deny_ports_and_datagram_size() {
    let (runtime, d) = on_own_runtime(2, Config::default());
    let big = [7u8; 101];
    let small = [8u8; 100];
    let (sized, denied) = (
        udp_client("127.0.0.1:0", REPLY),
        udp_client("127.0.0.1:0", REPLY),
    );
    let burst: [&[u8]; 6] = [b"1", b"2", b"3", b"4", b"5", b"6"];
    // Defaults: all of it is answered.
    assert_eq!(udp_replies(&sized, d.udp, &[&big, &small]), 2);
    assert_eq!(udp_replies(&denied, d.udp, &[b"hello"]), 1);
    assert_eq!(
        udp_replies(&udp_client("127.0.0.3:0", REPLY), d.udp, &burst),
        6
    );

    let mut stricter = d.config.clone();
    stricter.udp.max_datagram_size = 100;
    stricter.udp.deny_source_ports = vec![denied.local_addr().unwrap().port()];
    stricter.udp.rate_limit.packets_per_second = 1;
    stricter.udp.rate_limit.burst = 3;
    d.reload_blocking(&runtime, stricter);

    assert_eq!(udp_replies(&sized, d.udp, &[&big, &small]), 1, "oversize");
    assert_eq!(udp_replies(&denied, d.udp, &[b"hello"]), 0, "denied port");
    // A fresh source gets the new burst of 3 (a refill at 1/s may add one).
    let replies = udp_replies(&udp_client("127.0.0.4:0", REPLY), d.udp, &burst);
    assert!((3..=4).contains(&replies), "rate limit: {replies} of 6");
    let label = d.udp.to_string();
    let dropped = |reason| {
        metric_value(
            &d.scrape_blocking(),
            "echod_udp_dropped_datagrams_total",
            &[("listener", &label), ("reason", reason)],
        )
    };
    assert_eq!(dropped("oversize"), 1.0);
    assert_eq!(dropped("denied_port"), 1.0);
    assert_eq!(dropped("rate_limited"), 6.0 - replies as f64);
    runtime.block_on(d.stop());
}
