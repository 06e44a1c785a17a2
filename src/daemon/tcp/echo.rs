//! The echo loop: read at most one buffer, write all of it back, and only then read
//! again; one alarm per connection serves its deadlines and a cut or handover.

use std::future::poll_fn;
use std::io;
use std::task::Poll;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::session::{Connection, End, cap_reached, flush_bytes, interrupt};
use crate::config::TcpConfig;
use crate::daemon::alarms::Alarm;
use crate::daemon::reasons::ConnectionCap;

impl Connection {
    /// Per-connection options. Fixed send and receive buffers turn off the kernel's
    /// autotuning for this socket: without them a client that sends but never reads
    /// makes echod's send queue grow to `tcp_wmem` max (4 MiB) in kernel memory.
    pub(super) fn apply_socket_options(&self) {
        apply_socket_options(&self.stream, &self.config);
    }

    /// The echo loop: wait for data, echo what is readable, repeat; idle since `since`.
    ///
    /// One alarm (see `alarms`) serves the whole connection for its deadlines and for a
    /// cut or handover, while it waits to read and while it waits to write: it is moved
    /// only when it rings early (traffic moved the deadline), not once per message.
    /// Readiness is awaited through the stream's own per-direction waker slots
    /// (`poll_read_ready`), not a `readable()` future. All of this keeps an idle
    /// connection small.
    pub(super) async fn echo(&mut self, since: Instant) -> End {
        // Fields are used through `self` (the alarm borrows `self.shutdown` while
        // `self.stream` is used): borrowing them apart into locals would store a pointer
        // per field in every connection's state.
        //
        // Rings at the deadline, and at a cut or a handover; at every point it is
        // awaited no unechoed byte is held except the one burst being written, which a
        // handover takes along.
        let mut last_traffic = since;
        let span = self
            .config
            .max_connection_duration
            .map_or(self.config.idle_timeout, |d| {
                d.min(self.config.idle_timeout)
            });
        let mut alarm = self.shutdown.alarms().set(
            next_deadline(last_traffic, self.config.idle_timeout, self.hard_deadline),
            span,
        );
        loop {
            tokio::select! {
                biased;
                // First, so that a client that keeps sending cannot hold a handover up.
                () = poll_fn(|cx| alarm.poll(cx)) => {
                    if let Some(end) = self.rung(&mut alarm, last_traffic, &[]) {
                        return end;
                    }
                    continue;
                }
                ready = poll_fn(|cx| self.stream.poll_read_ready(cx)) => if ready.is_err() {
                    return End::Error;
                },
            }
            // Echo one burst: at most one buffer is read before all of it is written.
            let mut buf = Vec::with_capacity(self.config.buffer_size);
            let mut progressed = true;
            loop {
                buf.clear();
                // One poll of tokio's own read, not `try_read_buf`: a read that returns
                // less than the buffer shows the socket is drained, and tokio then clears
                // its readiness, so the next pass waits for epoll instead of making a
                // `read` that only returns EAGAIN (one syscall less per message; tokio
                // clears only the readiness it saw before the read, so data arriving
                // meanwhile is not missed). The read also spends tokio's cooperative
                // budget and returns `Pending` when it is spent, so a client that keeps
                // sending cannot keep the worker thread to itself.
                let read = poll_fn(|cx| {
                    let read = std::pin::pin!(self.stream.read_buf(&mut buf));
                    Poll::Ready(read.poll(cx))
                })
                .await;
                let n = match read {
                    // Everything it sent is echoed; `finish` closes our side.
                    Poll::Ready(Ok(0)) => return End::Finished,
                    Poll::Ready(Ok(n)) => n,
                    Poll::Pending => break,
                    Poll::Ready(Err(_)) => return End::Error,
                };
                self.unflushed.received += n as u64;
                let mut written = 0;
                while written < n {
                    match self.stream.try_write(&buf[written..]) {
                        Ok(w) => {
                            written += w;
                            self.unflushed.echoed += w as u64;
                            progressed = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // The client is not reading: wait for room, but not longer
                            // than the idle timeout without progress. Only progress
                            // (bytes written since the last wait) restarts the clock.
                            if progressed {
                                progressed = false;
                                last_traffic = Instant::now();
                            }
                            tokio::select! {
                                biased;
                                ready = poll_fn(|cx| self.stream.poll_write_ready(cx)) => if ready.is_err() {
                                    return End::Error;
                                },
                                // The client is not reading: what is left of the burst
                                // goes along with a handover.
                                () = poll_fn(|cx| alarm.poll(cx)) => {
                                    if let Some(end) = self.rung(&mut alarm, last_traffic, &buf[written..n]) {
                                        return end;
                                    }
                                }
                            }
                        }
                        Err(_) => return End::Error,
                    }
                }
                // Caps act once the current echo is written, so nothing read is lost.
                if let Some(cap) = cap_reached(
                    &self.config,
                    self.echoed_total + self.unflushed.echoed,
                    self.hard_deadline,
                ) {
                    return End::Capped(cap);
                }
                // Everything read is echoed: a handover need not wait for the socket to
                // run dry (a client that never pauses would hold it up).
                if self.shutdown.is_handing_over() {
                    return interrupt(&self.shutdown, &[], Instant::now());
                }
            }
            self.echoed_total += flush_bytes(&self.metrics, &mut self.unflushed);
            last_traffic = Instant::now();
        }
    }

    /// How the connection ends now that its alarm rang: interrupted (with `pending`,
    /// the bytes read and not yet echoed, for a handover), or past a deadline; `None`
    /// when traffic moved the deadline, and the alarm is moved with it.
    fn rung(&self, alarm: &mut Alarm<'_>, last_traffic: Instant, pending: &[u8]) -> Option<End> {
        if self.shutdown.is_interrupted() {
            return Some(interrupt(&self.shutdown, pending, last_traffic));
        }
        let now = Instant::now();
        if self.hard_deadline.is_some_and(|h| h <= now) {
            return Some(End::Capped(ConnectionCap::MaxDuration));
        }
        if last_traffic + self.config.idle_timeout <= now {
            return Some(End::Idle);
        }
        alarm.reset(next_deadline(
            last_traffic,
            self.config.idle_timeout,
            self.hard_deadline,
        ));
        None
    }
}

/// The `[tcp]` socket options of an accepted connection (TLS connections take them too).
pub(crate) fn apply_socket_options(stream: &tokio::net::TcpStream, config: &TcpConfig) {
    let _ = stream.set_nodelay(config.nodelay);
    let sock = SockRef::from(stream);
    if config.send_buffer_size != 0 {
        let _ = sock.set_send_buffer_size(config.send_buffer_size);
    }
    if config.receive_buffer_size != 0 {
        let _ = sock.set_recv_buffer_size(config.receive_buffer_size);
    }
    if !config.keepalive.is_zero() {
        let keepalive = TcpKeepalive::new()
            .with_time(config.keepalive)
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = sock.set_tcp_keepalive(&keepalive);
    }
}

/// When the connection's timer must fire next: at the idle deadline, or earlier at the
/// `tcp.max_connection_duration` deadline.
fn next_deadline(last_traffic: Instant, idle: Duration, hard: Option<Instant>) -> Instant {
    let idle_deadline = last_traffic + idle;
    hard.map_or(idle_deadline, |h| h.min(idle_deadline))
}
