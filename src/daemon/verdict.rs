//! The reload verdict: how `systemctl reload` learns whether echod applied a reload.
//!
//! A SIGHUP has no answer: `kill -HUP` succeeds whether or not the daemon then refuses
//! the new configuration, so a unit whose `ExecReload=` only signals makes
//! `systemctl reload` (and a package's postinst) report success for an edit that is not
//! in force — and the next upgrade starts from it. echod writes the outcome of every
//! reload and upgrade to a small file in its runtime directory (`$RUNTIME_DIRECTORY`,
//! `RuntimeDirectory=echod` in the unit), one line with a generation number:
//!
//! ```text
//! 7 ok
//! 8 failed cannot listen on TCP 0.0.0.0:7: Address in use (…)
//! ```
//!
//! `echod reload --pid PID` (the unit's `ExecReload=`) reads the generation, sends the
//! SIGHUP, waits for the next generation and exits 0 on `ok`, 1 with the reason on
//! `failed`, and 1 when no verdict comes in time.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

/// The verdict file's name in the runtime directory.
const FILE: &str = "reload-verdict";

/// How often `echod reload` looks for the verdict.
const POLL: Duration = Duration::from_millis(20);

/// The verdict file, when the service manager gave echod a runtime directory.
fn path() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    // systemd lists several directories separated by `:` when the unit names several.
    let first = dirs.to_string_lossy().split(':').next()?.to_string();
    (!first.is_empty()).then(|| Path::new(&first).join(FILE))
}

/// One verdict: its generation, and the reason when the reload failed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    generation: u64,
    failure: Option<String>,
}

impl Verdict {
    fn parse(text: &str) -> Option<Self> {
        let line = text.lines().next()?;
        let (generation, rest) = line.split_once(' ')?;
        let generation = generation.parse().ok()?;
        let failure = match rest.split_once(' ') {
            None if rest == "ok" => None,
            Some(("failed", why)) => Some(why.to_string()),
            _ => return None,
        };
        Some(Self {
            generation,
            failure,
        })
    }

    fn line(&self) -> String {
        match &self.failure {
            None => format!("{} ok\n", self.generation),
            Some(why) => format!("{} failed {}\n", self.generation, why.replace('\n', " ")),
        }
    }
}

fn read(path: &Path) -> Option<Verdict> {
    Verdict::parse(&std::fs::read_to_string(path).ok()?)
}

/// Records the outcome of a reload or upgrade, when there is a runtime directory: the
/// next generation after the one on file, written whole (a temporary file renamed over
/// the old one, so a reader never sees half a line).
pub(crate) fn record(outcome: Result<(), &str>) {
    let Some(path) = path() else {
        return;
    };
    let verdict = Verdict {
        generation: read(&path).map_or(1, |v| v.generation.wrapping_add(1)),
        failure: outcome.err().map(str::to_string),
    };
    let partial = path.with_extension("partial");
    let written = std::fs::File::create(&partial)
        .and_then(|mut f| f.write_all(verdict.line().as_bytes()))
        .and_then(|()| std::fs::rename(&partial, &path));
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "cannot record the reload verdict; `echod reload` will time out");
    }
}

/// `echod reload`: asks the daemon `pid` to reload (SIGHUP) and waits up to `timeout`
/// for its verdict. Exit 0 when the reload (or upgrade) was applied, 1 otherwise.
///
/// A SIGTERM while it waits is systemd stopping the unit (it signals the reload's
/// control process with the main one): the reload is moot and its job already
/// cancelled, so it exits 0 at once — killed by the signal, it would leave the stopped
/// unit `failed` with `Result=signal`.
pub fn request(pid: i32, timeout: Duration) -> ExitCode {
    let stopping = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stopping))
    {
        eprintln!("echod reload: cannot handle SIGTERM: {e}");
    }
    match wait_for(pid, timeout, &stopping) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) if stopping.load(Ordering::SeqCst) => {
            eprintln!("echod reload: stopped (SIGTERM) while {why}; the reload is abandoned");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("echod reload: {why}");
            ExitCode::FAILURE
        }
    }
}

fn wait_for(pid: i32, timeout: Duration, stopping: &AtomicBool) -> Result<(), String> {
    let path = path().ok_or(
        "RUNTIME_DIRECTORY is not set: run it as the unit's ExecReload= (the unit sets \
         RuntimeDirectory=echod), or send SIGHUP yourself and read the log",
    )?;
    if pid <= 0 {
        return Err(format!("{pid} is not a process ID"));
    }
    // A mistyped PID must not send SIGHUP to some other program.
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_err(|e| format!("no process {pid}: {e}"))?;
    let name = name.trim();
    if !name.starts_with("echod") {
        return Err(format!(
            "process {pid} is {name:?}, not echod: nothing was signalled"
        ));
    }
    let before = read(&path).map_or(0, |v| v.generation);
    // SAFETY: kill(2) with a checked positive PID and a valid signal number.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Err(format!(
            "cannot signal process {pid}: {}",
            io::Error::last_os_error()
        ));
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(verdict) = read(&path).filter(|v| v.generation != before) {
            return match verdict.failure {
                None => Ok(()),
                Some(why) => Err(format!("the daemon refused the reload: {why}")),
            };
        }
        if stopping.load(Ordering::SeqCst) {
            return Err(format!("waiting for the verdict of process {pid}"));
        }
        if exited(pid) {
            return Err(format!(
                "process {pid} exited before it gave a verdict (see its log)"
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no verdict from process {pid} within {}",
                humantime::format_duration(timeout)
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// True when process `pid` is gone, or a zombie waiting to be reaped.
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_survive_their_round_trip_and_junk_is_none() {
        for v in [
            Verdict {
                generation: 7,
                failure: None,
            },
            Verdict {
                generation: 8,
                failure: Some("cannot listen on TCP 0.0.0.0:7: in use".into()),
            },
        ] {
            assert_eq!(Verdict::parse(&v.line()), Some(v));
        }
        let multi = Verdict {
            generation: 1,
            failure: Some("first\nsecond".into()),
        };
        assert_eq!(multi.line(), "1 failed first second\n");
        for junk in ["", "7", "x ok", "7 fine", "7 failed", "\n7 ok"] {
            assert_eq!(Verdict::parse(junk), None, "{junk:?}");
        }
    }
}
