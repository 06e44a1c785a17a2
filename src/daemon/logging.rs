//! Logging: one line per lifecycle event, never one per byte.
//!
//! The level can change on reload (a `reload` layer), `RUST_LOG` wins over the config
//! so an operator can always turn up verbosity, and under journald (`JOURNAL_STREAM`)
//! text lines carry no timestamp (the journal adds its own) but a `<N>` priority prefix
//! (sd-daemon levels), and each event stays one line, so `journalctl -p err` finds
//! errors and a multi-line error is one entry with its level.

use std::fmt;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat, parse_log_filter};

/// Changes the log level of a running daemon (on reload).
pub(crate) struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    env_override: bool,
}

/// Installs the global subscriber; call once, early, before anything logs.
pub(crate) fn init(config: &LogConfig) -> LogHandle {
    let env_override = std::env::var("RUST_LOG").is_ok_and(|v| !v.is_empty());
    let filter = if env_override {
        EnvFilter::from_default_env()
    } else {
        parse_log_filter(&config.level).unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let (filter, handle) = reload::Layer::new(filter);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt_layer = match config.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text if journald => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .event_format(Journal(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            ))
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .try_init();
    LogHandle {
        filter: handle,
        env_override,
    }
}

/// Wraps a text format for journald: a `<N>` priority prefix, and one line per event.
struct Journal<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journal<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        writeln!(
            writer,
            "<{}>{}",
            journal_priority(*event.metadata().level()),
            one_line(&line)
        )
    }
}

/// The sd-daemon priority of a level: err 3, warning 4, info 6, debug 7.
fn journal_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Joins the lines of a formatted event, so the journal stores it as one entry.
fn one_line(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" | ")
}

impl LogHandle {
    /// Applies a new level from a reloaded config (unless `RUST_LOG` pins it).
    pub(crate) fn set_level(&self, level: &str) {
        if self.env_override {
            return;
        }
        if let Ok(filter) = parse_log_filter(level) {
            let _ = self.filter.reload(filter);
        }
    }
}

/// Lets a warning through at most once per interval and counts what it held back, so a
/// flood (EMFILE, rejected connections) cannot flood the journal too.
pub(crate) struct RateLimitedLog {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    /// A limiter letting one line through per `interval`.
    pub(crate) const fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(suppressed_since_last)` when a line may be written now.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_carry_the_level_and_stay_one_entry() {
        assert_eq!(journal_priority(Level::ERROR), 3);
        assert_eq!(journal_priority(Level::WARN), 4);
        assert_eq!(journal_priority(Level::INFO), 6);
        assert_eq!(journal_priority(Level::DEBUG), 7);
        assert_eq!(journal_priority(Level::TRACE), 7);
        assert_eq!(
            one_line("ERROR reload failed: TOML parse error\n  |\n3 | x\n"),
            "ERROR reload failed: TOML parse error |   | | 3 | x"
        );
        assert_eq!(one_line("INFO ready\n"), "INFO ready");
    }
}
