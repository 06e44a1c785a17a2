//! The process around the server: the one owner of what belongs to a whole process —
//! the global logger, the async runtime, signal handlers, the open-files limit, the
//! sockets systemd passed (`LISTEN_FDS`), and the image itself: an upgrade in place
//! execs a new binary, and a new image takes over what the previous one handed over
//! (`ECHOD_HANDOVER`). It turns signals into [`Control`] messages, so the server itself
//! never touches process state and runs the same inside a test.

use std::ffi::OsString;
use std::io;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::host::SystemHost;
use super::kind::SocketOrigin;
use super::listeners::Sockets;
use super::server::{Control, Process, ServeError, serve_hosted};
use super::upgrade::handover::{Handover, HandoverError};
use super::upgrade::{self, Executable, SignalsMeanwhile, Upgrade};
use super::{logging, systemd};
use crate::cli::ConfigArgs;
use crate::config::{Config, ConfigSource, describe_source};

/// Exit code of the immediate exit on a second stop signal.
const SECOND_SIGNAL_EXIT_CODE: i32 = 1;

/// Descriptors echod needs besides one per connection (listeners, HTTP, runtime).
const RESERVED_FDS: u64 = 128;

/// Why the process could not serve.
#[derive(Debug, thiserror::Error)]
enum ProcessError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot use the sockets passed by systemd (LISTEN_FDS): {0}")]
    Inherited(io::Error),
    #[error("cannot take over from the previous binary: {0}")]
    Handover(#[from] HandoverError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Runs the daemon as this process until a stop signal has been handled and
/// connections are drained; `config` was loaded from `source`, which a reload reads again.
pub fn run(source: ConfigSource, config: Config) -> ExitCode {
    // First, while no other thread exists: what an earlier image of this process handed
    // over before it exec'd this one.
    let handed = Handover::take_from_env();
    let log = logging::init(&config.log);
    let image = Image::current();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("echod-worker")
        // Stop and reload signals reach the main thread only: the server runs there
        // and an upgrade execs from there, and it must see every stop (see
        // `upgrade::block_stop_signals_in_this_thread`).
        .on_thread_start(upgrade::block_stop_signals_in_this_thread)
        .build()
        .map_err(ProcessError::Runtime)
        .and_then(|runtime| {
            let served = runtime.block_on(async {
                // Signals first: a stop that arrives while binding must not be lost.
                let signals = Signals::install().map_err(ProcessError::Signals)?;
                // Signals an upgrade kept pending across its exec reach the handlers now
                // (this thread receives them; the runtime's threads may still block them).
                upgrade::unblock_stop_signals();
                let (sockets, handover) = match handed.transpose()? {
                    Some(mut handover) => {
                        info!(
                            listeners = handover.listeners.len(),
                            connections = handover.connections.len(),
                            pending_bytes = handover.pending_bytes(),
                            "taking over from the previous binary of this process"
                        );
                        let listeners = std::mem::take(&mut handover.listeners);
                        (Sockets::new().handed_over(listeners), handover)
                    }
                    None => {
                        let inherited =
                            systemd::inherited_sockets().map_err(ProcessError::Inherited)?;
                        let mut sockets = Sockets::activated(inherited.activated);
                        for (addr, socket) in inherited.stored {
                            sockets = sockets.provided(socket, Some(addr), SocketOrigin::Stored);
                        }
                        (sockets, Handover::default())
                    }
                };
                check_open_files_limit(config.tcp.max_connections);
                let (control, requests) = mpsc::channel(4);
                let host = Arc::new(SystemHost::new(SignalsMeanwhile {
                    stop: Arc::clone(&signals.stopping),
                    reload: Arc::clone(&signals.reload_meanwhile),
                }));
                tokio::spawn(forward_signals(signals, source, image, control));
                let process = Process {
                    host,
                    log: Some(log),
                };
                Ok(serve_hosted(config, sockets, handover, requests, process).await?)
            });
            // Drained: nothing left to wait for. A blocking task still running (a new
            // binary's check that hangs until its timeout) must not hold the exit up.
            runtime.shutdown_background();
            served
        });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// What this process runs: the binary (to notice that a package replaced it) and the
/// command line it was started with (to start its successor the same way).
struct Image {
    executable: Option<Executable>,
    argv: Vec<OsString>,
}

impl Image {
    fn current() -> Self {
        let executable = Executable::current()
            .inspect_err(|e| {
                warn!(error = %e, "cannot tell which binary runs (/proc/self/exe): no upgrade in place on reload");
            })
            .ok();
        Self {
            executable,
            argv: std::env::args_os().collect(),
        }
    }
}

/// Turns signals into control messages: TERM/INT stop; HUP reloads from `source`, or —
/// when the binary on disk has been replaced — upgrades to it in place once it has
/// checked the configuration.
///
/// An upgrade is one at a time: while the new binary is checked and until the server
/// has finished with the upgrade (an exec that fails comes back), a stop is forwarded
/// at once and further SIGHUPs become one reload afterwards — a second check started
/// meanwhile would be orphaned by the exec.
async fn forward_signals(
    mut signals: Signals,
    source: ConfigSource,
    image: Image,
    control: mpsc::Sender<Control>,
) {
    let mut reload_waiting = false;
    loop {
        let request = if std::mem::take(&mut reload_waiting) {
            Request::Reload
        } else {
            signals.recv().await
        };
        let message = match request {
            Request::Stop(signal) => Control::Stop(signal),
            Request::Reload => match image.executable.as_ref().and_then(Executable::replaced) {
                Some(binary) => {
                    info!(binary = %binary.display(), "the binary was replaced: checking the new one before handing over to it");
                    Control::Upgrade(Upgrade::new(
                        binary.to_path_buf(),
                        image.argv.clone(),
                        ConfigArgs::flags_for(&source),
                        source.clone(),
                    ))
                }
                None => {
                    info!(source = %describe_source(source.file.as_deref()), "reloading configuration");
                    let source = source.clone();
                    // Loading reads a file and validates: keep it off the serving threads.
                    let loaded = tokio::task::spawn_blocking(move || source.load())
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    Control::Reload(Box::new(loaded))
                }
            },
        };
        let (message, finished) = match message {
            Control::Upgrade(upgrade) => {
                let (upgrade, finished) = upgrade.watched();
                (Control::Upgrade(upgrade), Some(finished))
            }
            other => (other, None),
        };
        let reload_flag = Arc::clone(&signals.reload_meanwhile);
        if control.send(message).await.is_err() {
            return;
        }
        if let Some(finished) = finished {
            // The receiver completes when the server drops the upgrade: after a refused
            // check or an exec that failed (one that succeeded never returns).
            let _ = meanwhile(
                finished,
                &mut signals,
                &control,
                &mut reload_waiting,
                &reload_flag,
            )
            .await;
            // A reload the exec turned into a pending SIGHUP arrives as a signal.
            if !reload_flag.swap(false, Ordering::SeqCst) {
                reload_waiting = false;
            }
        }
    }
}

/// Awaits `work` while forwarding stop signals at once and noting reloads for later
/// (in `reload_flag` too: an exec under way reads it); `None` when a stop came first.
async fn meanwhile<T>(
    work: impl Future<Output = T>,
    signals: &mut Signals,
    control: &mpsc::Sender<Control>,
    reload_waiting: &mut bool,
    reload_flag: &AtomicBool,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            request = signals.recv() => match request {
                Request::Stop(signal) => {
                    info!(signal, "stop requested while an upgrade is under way: stopping instead");
                    let _ = control.send(Control::Stop(signal)).await;
                    return None;
                }
                Request::Reload => {
                    info!("reload requested while an upgrade is under way: it follows the upgrade");
                    *reload_waiting = true;
                    reload_flag.store(true, Ordering::SeqCst);
                }
            },
        }
    }
}

/// The log line of an exit on a second stop signal, prefixed with the journal's error
/// priority under journald.
fn second_signal_line(journald: bool) -> Vec<u8> {
    let prefix = if journald { "<3>" } else { "" };
    format!("{prefix}echod: second stop signal: exiting at once without draining (exit code {SECOND_SIGNAL_EXIT_CODE})\n").into_bytes()
}

/// What the operator asked for through a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// SIGTERM or SIGINT: drain and exit.
    Stop(&'static str),
    /// SIGHUP: re-read the configuration.
    Reload,
}

/// The process's signal handlers.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    /// Set on the first SIGTERM or SIGINT, by the handler itself.
    stopping: Arc<AtomicBool>,
    /// Set when a SIGHUP comes while an upgrade is under way.
    reload_meanwhile: Arc<AtomicBool>,
}

impl Signals {
    /// Installs the handlers. Must run inside the runtime, before listeners are bound,
    /// so that a stop arriving during start-up is not lost. A second TERM/INT exits at
    /// once, from the signal handler itself, so it works even if the runtime is busy.
    fn install() -> io::Result<Self> {
        // The first handler acts only when the flag is already set, and the flag is
        // set by the second handler, on the first signal. It may only make
        // async-signal-safe calls: one write(2) of a prepared line, then _exit(2).
        let stopping = Arc::new(AtomicBool::new(false));
        let line = second_signal_line(std::env::var_os("JOURNAL_STREAM").is_some());
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let flag = Arc::clone(&stopping);
            let line = line.clone();
            // SAFETY: the closure only loads an atomic, writes a buffer prepared in
            // advance and exits, all async-signal-safe.
            unsafe {
                signal_hook::low_level::register(sig, move || {
                    if flag.load(Ordering::SeqCst) {
                        libc::write(2, line.as_ptr().cast(), line.len());
                        libc::_exit(SECOND_SIGNAL_EXIT_CODE);
                    }
                })?;
            }
            signal_hook::flag::register(sig, Arc::clone(&stopping))?;
        }
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            stopping,
            reload_meanwhile: Arc::default(),
        })
    }

    async fn recv(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop("SIGTERM"),
            _ = self.int.recv() => Request::Stop("SIGINT"),
            _ = self.hup.recv() => Request::Reload,
        }
    }
}

fn check_open_files_limit(max_connections: usize) {
    match raise_open_files_limit() {
        Ok(limit) if limit < max_connections as u64 + RESERVED_FDS => warn!(
            limit,
            max_connections,
            "open-files limit is below tcp.max_connections; accept will fail with EMFILE \
             before the connection limit is reached (raise LimitNOFILE / ulimit -n)"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

/// Raises the soft open-files limit to the hard one: every connection costs a
/// descriptor, and the default soft limit (often 1024) is far below what
/// `tcp.max_connections` allows. Returns the limit now in force.
fn raise_open_files_limit() -> io::Result<u64> {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if rlim.rlim_cur < rlim.rlim_max {
            rlim.rlim_cur = rlim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(rlim.rlim_cur)
}
