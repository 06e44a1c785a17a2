//! The server in-process: its sockets on port 0, its control channel and a recording
//! [`Host`](super::Host), so the order of what the service manager is told, the
//! descriptor store's traffic and an upgrade's rollback are checked without a process.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use std::sync::Arc;

use super::{Control, Process, Sockets, Summary, Upgrade, one_line, serve, serve_hosted};
use crate::config::{Config, ConfigSource};
use crate::daemon::host::Host;
use crate::daemon::host::recording::{Event, Recording};
use crate::daemon::upgrade::handover::Handover;

async fn echoes(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(back, data);
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// A new binary that answers the pre-exec check as echod does (it reads this
/// handover's version), for tests whose exec then fails.
fn willing_binary(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("echod");
    std::fs::write(
        &path,
        "#!/bin/sh\ncat >/dev/null\necho 'echod-handover 3'\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// An upgrade whose exec fails (detached, there is no process to replace) hands
/// everything over and takes it all back: the open connection goes on echoing, the
/// listeners accept again, and the reload counts as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_exec_takes_everything_back() {
    let (sockets, config) = on_port_zero();
    let (echo, metrics) = (config.tcp.listen[0], config.metrics.listen[0]);
    let (control, requests) = mpsc::channel(4);
    let server = tokio::spawn(serve(config, sockets, requests));
    let mut held = TcpStream::connect(echo).await.unwrap();
    echoes(&mut held, b"before").await;
    let dir = tempfile::tempdir().unwrap();
    control
        .send(Control::Upgrade(Upgrade::new(
            willing_binary(dir.path()),
            vec!["echod".into()],
            Vec::new(),
            ConfigSource::default(),
        )))
        .await
        .unwrap();
    // Sent right away, this lands while the connection is handed over or after it
    // was taken back: either way it is echoed.
    echoes(&mut held, b"during and after").await;
    let mut fresh = TcpStream::connect(echo).await.unwrap();
    echoes(&mut fresh, b"a new connection").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(metrics).await;
        if body.contains("echod_config_reload_failures_total 1") {
            assert!(
                body.contains("echod_config_last_reload_successful 0"),
                "{body}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((held, fresh));
    control.send(Control::Stop("test")).await.unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .expect("stopped in time")
        .unwrap()
        .unwrap();
    assert_eq!(summary.cut, 0);
}

#[test]
fn multi_line_errors_become_first_and_last_line() {
    let toml_error = "invalid config file /etc/echod.toml: TOML parse error at line 3, column 9\n  |\n3 | backlog = \"x\"\n  |         ^^^\ninvalid type: string \"x\", expected u32\n";
    assert_eq!(
        one_line(toml_error),
        "invalid config file /etc/echod.toml: TOML parse error at line 3, column 9: invalid type: string \"x\", expected u32"
    );
    assert_eq!(one_line("just one line"), "just one line");
    assert_eq!(one_line("\n  same \n same\n"), "same");
    assert_eq!(one_line(""), "");
    assert!(!one_line("a\nb\nc").contains('\n'));
}

/// A server on port 0 (TCP and HTTP) run with a recording host; returns the echo and
/// metrics addresses, the control channel and the running task.
struct Hosted {
    echo: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    control: mpsc::Sender<Control>,
    server: tokio::task::JoinHandle<Result<Summary, super::ServeError>>,
}

/// A TCP echo and an HTTP listener on port 0, and a config that names them (no UDP).
fn on_port_zero() -> (Sockets, Config) {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = Config::default();
    config.tcp.listen = vec![tcp.local_addr().unwrap()];
    config.udp.listen = Vec::new();
    config.metrics.listen = vec![http.local_addr().unwrap()];
    (Sockets::new().tcp(tcp).http(http), config)
}

fn hosted(host: &Arc<Recording>, configure: impl FnOnce(&mut Config)) -> Hosted {
    let (sockets, mut config) = on_port_zero();
    let (echo, metrics) = (config.tcp.listen[0], config.metrics.listen[0]);
    configure(&mut config);
    let (control, requests) = mpsc::channel(4);
    let process = Process {
        host: Arc::clone(host) as Arc<dyn Host>,
        log: None,
    };
    let server = tokio::spawn(serve_hosted(
        config,
        sockets,
        Handover::default(),
        requests,
        process,
    ));
    Hosted {
        echo,
        metrics,
        control,
        server,
    }
}

/// A hosted server that is ready, and one connection it has echoed on.
async fn ready_with_a_connection(host: &Arc<Recording>) -> (Hosted, TcpStream) {
    let run = hosted(host, |_| {});
    recorded(host, 1, |e| matches!(e, Event::Ready(_))).await;
    let mut held = TcpStream::connect(run.echo).await.unwrap();
    echoes(&mut held, b"before").await;
    (run, held)
}

/// Waits until `host` has recorded an event that `wanted` accepts, `count` of them (for
/// at most a minute, of paused time where the clock is paused).
async fn recorded(host: &Recording, count: usize, wanted: impl Fn(&Event) -> bool) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = host.events();
        if events.iter().filter(|e| wanted(e)).count() >= count {
            return events;
        }
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn lifecycle(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Ready(_) => Some("ready"),
            Event::Reloading => Some("reloading"),
            Event::Stopping(_) => Some("stopping"),
            Event::Exec { .. } => Some("exec"),
            _ => None,
        })
        .collect()
}

/// The service manager hears READY once everything is bound, RELOADING then READY
/// around a reload (a failed one too, with the failure in the status), and STOPPING
/// when the drain begins: the order Type=notify-reload relies on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_hears_ready_reloading_ready_and_stopping_in_order() {
    let host = Arc::new(Recording::default());
    let run = hosted(&host, |_| {});
    recorded(&host, 1, |e| matches!(e, Event::Ready(_))).await;
    let mut reloaded = Config::default();
    reloaded.tcp.listen = vec![run.echo];
    reloaded.udp.listen = Vec::new();
    reloaded.metrics.listen = vec![run.metrics];
    run.control
        .send(Control::Reload(Box::new(Ok(reloaded))))
        .await
        .unwrap();
    recorded(&host, 2, |e| matches!(e, Event::Ready(_))).await;
    run.control
        .send(Control::Reload(Box::new(Err("bad file".into()))))
        .await
        .unwrap();
    let events = recorded(&host, 3, |e| matches!(e, Event::Ready(_))).await;
    let Some(Event::Ready(status)) = events.iter().rev().find(|e| matches!(e, Event::Ready(_)))
    else {
        unreachable!("three READY were recorded");
    };
    assert!(status.contains("last reload FAILED: bad file"), "{status}");
    run.control.send(Control::Stop("test")).await.unwrap();
    let summary = run.server.await.unwrap().unwrap();
    assert_eq!(summary, Summary { drained: 0, cut: 0 });
    assert_eq!(
        lifecycle(&host.events()),
        [
            "ready",
            "reloading",
            "ready",
            "reloading",
            "ready",
            "stopping"
        ]
    );
    // Detached from a descriptor store, nothing was kept.
    assert!(
        !host
            .events()
            .iter()
            .any(|e| matches!(e, Event::Keep(..) | Event::Release(..)))
    );
}

/// An upgrade goes through the host's exec with every listener and the open
/// connection; when the exec fails the server takes all of it back: RELOADING, the
/// exec, then READY with the failure in the status, and the connection echoes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_that_fails_is_rolled_back_and_reported() {
    let host = Arc::new(Recording::default());
    let (run, mut held) = ready_with_a_connection(&host).await;
    let dir = tempfile::tempdir().unwrap();
    let binary = willing_binary(dir.path());
    run.control
        .send(Control::Upgrade(Upgrade::new(
            binary.clone(),
            vec!["echod".into()],
            Vec::new(),
            ConfigSource::default(),
        )))
        .await
        .unwrap();
    let events = recorded(&host, 2, |e| matches!(e, Event::Ready(_))).await;
    assert_eq!(lifecycle(&events), ["ready", "reloading", "exec", "ready"]);
    assert!(events.contains(&Event::Exec {
        binary: binary.clone(),
        listeners: 2,
        connections: 1
    }));
    let Some(Event::Ready(status)) = events.iter().rev().find(|e| matches!(e, Event::Ready(_)))
    else {
        unreachable!("two READY were recorded");
    };
    assert!(
        status.contains(&format!(
            "last reload FAILED: upgrade to {} failed",
            binary.display()
        )),
        "{status}"
    );
    echoes(&mut held, b"after the rollback").await;
    let mut fresh = TcpStream::connect(run.echo).await.unwrap();
    echoes(&mut fresh, b"a new connection").await;
    drop((held, fresh));
    run.control.send(Control::Stop("test")).await.unwrap();
    assert_eq!(run.server.await.unwrap().unwrap().cut, 0);
}

/// The watchdog is pinged from the serving runtime at the interval the host asks for.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_watchdog_is_pinged_at_the_hosts_interval() {
    let host = Arc::new(Recording::with_store(Some(Duration::from_secs(10))));
    let run = hosted(&host, |_| {});
    recorded(&host, 1, |e| matches!(e, Event::Ready(_))).await;
    let start = tokio::time::Instant::now();
    recorded(&host, 4, |e| matches!(e, Event::Alive)).await;
    // The first ping goes out at once, then one every 10 s of (paused) time.
    assert!(
        start.elapsed() >= Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    run.control.send(Control::Stop("test")).await.unwrap();
    run.server.await.unwrap().unwrap();
}

/// An idle connection is closed at `tcp.idle_timeout` (up to one alarm tick late), on
/// a paused clock: five minutes of idleness take no time at all.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_idle_connection_is_closed_at_its_deadline() {
    let host = Arc::new(Recording::default());
    let run = hosted(&host, |c| c.tcp.idle_timeout = Duration::from_secs(300));
    recorded(&host, 1, |e| matches!(e, Event::Ready(_))).await;
    let mut client = TcpStream::connect(run.echo).await.unwrap();
    echoes(&mut client, b"once").await;
    let quiet = tokio::time::Instant::now();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    let idle = quiet.elapsed();
    assert!(rest.is_empty());
    // The sweep ticks every tenth of the shortest timeout (capped at 1 s).
    assert!(
        idle >= Duration::from_secs(300) && idle <= Duration::from_secs(302),
        "{idle:?}"
    );
    run.control.send(Control::Stop("test")).await.unwrap();
    run.server.await.unwrap().unwrap();
}

/// A binary that cannot take over (an older echod has no `upgrade-check`) is refused
/// before anything stops: no exec, a failed reload, and the service goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_cannot_take_over_is_refused_before_anything_stops() {
    let host = Arc::new(Recording::default());
    let (run, mut held) = ready_with_a_connection(&host).await;
    let dir = tempfile::tempdir().unwrap();
    let older = dir.path().join("echod");
    std::fs::write(
        &older,
        "#!/bin/sh\necho \"error: unrecognized subcommand '$1'\" >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&older, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    run.control
        .send(Control::Upgrade(Upgrade::new(
            older,
            vec!["echod".into()],
            Vec::new(),
            ConfigSource::default(),
        )))
        .await
        .unwrap();
    let events = recorded(&host, 1, |e| matches!(e, Event::Reloaded(Some(_)))).await;
    assert_eq!(lifecycle(&events), ["ready", "reloading", "ready"]);
    let Some(Event::Reloaded(Some(why))) = events.iter().find(|e| matches!(e, Event::Reloaded(_)))
    else {
        unreachable!("a failed verdict was recorded");
    };
    assert!(why.contains("cannot take over in place"), "{why}");
    echoes(&mut held, b"after").await;
    drop(held);
    run.control.send(Control::Stop("test")).await.unwrap();
    run.server.await.unwrap().unwrap();
}
