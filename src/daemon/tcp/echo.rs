//! The echo I/O of one connection: read at most one buffer, write all of it back, and
//! only then read again. What the traffic means for the connection — its deadlines,
//! caps, a cut or a handover, its counters — is the session's to decide (`session`).
//!
//! Bytes are read into the worker thread's one buffer and written back in the same
//! poll, so a connection holds no buffer of its own, idle or busy, unless its client
//! stops reading: then what could not be written is copied into a buffer of its size,
//! held until it is written. Why: allocating the buffer per burst cost a `malloc` and a
//! `free` per round trip (0.9 % of echod's CPU at 50 connections under `perf`).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::session::{End, Session};
use crate::config::TcpConfig;
use crate::daemon::alarms::Alarm;

thread_local! {
    /// The read buffer of every connection this thread serves, `tcp.buffer_size` long
    /// (the largest configured so far): borrowed within one poll, never across an await.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Bytes a connection moved since its counts were last added to its listener's series.
#[derive(Debug, Default)]
pub(super) struct ByteCounts {
    pub(super) received: u64,
    pub(super) echoed: u64,
}

/// A connection's socket and the bytes it moved.
pub(super) struct Echo {
    pub(super) stream: TcpStream,
    /// Bytes received and echoed since the last flush to the listener's counters.
    pub(super) unflushed: ByteCounts,
    /// Bytes echoed and flushed over the connection's life (before an upgrade too).
    pub(super) echoed: u64,
}

/// What one read did.
enum Burst {
    /// Read bytes and wrote all of them back.
    Echoed,
    /// Read bytes and wrote back what fit; the rest waits for room.
    Blocked(Vec<u8>),
    /// Nothing to read now (or the task's cooperative budget is spent).
    Drained,
    /// The client closed its side, and everything it sent has been echoed.
    Finished,
    /// A socket error (reset by the peer and the like).
    Error,
}

impl Echo {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            unflushed: ByteCounts::default(),
            echoed: 0,
        }
    }

    /// Per-connection options. Fixed send and receive buffers turn off the kernel's
    /// autotuning for this socket: without them a client that sends but never reads
    /// makes echod's send queue grow to `tcp_wmem` max (4 MiB) in kernel memory.
    pub(super) fn apply_socket_options(&self, config: &TcpConfig) {
        apply_socket_options(&self.stream, config);
    }

    /// Bytes echoed over the connection's life, unflushed ones included.
    pub(super) fn echoed_total(&self) -> u64 {
        self.echoed + self.unflushed.echoed
    }

    /// Adds the bytes moved since the last flush to the listener's series, and the echoed
    /// ones to the connection's total.
    pub(super) fn flush_counts(&mut self, session: &Session) {
        self.echoed += session.flush(&mut self.unflushed);
    }

    /// The echo loop: wait for data, echo what is readable, repeat; idle since `since`.
    ///
    /// One alarm (see `alarms`) serves the whole connection for its deadlines and for a
    /// cut or handover, while it waits to read and while it waits to write: it is moved
    /// only when it rings early (traffic moved the deadline), not once per message.
    /// Readiness is awaited through the stream's own per-direction waker slots
    /// (`poll_read_ready`), not a `readable()` future. All of this keeps an idle
    /// connection small.
    pub(super) async fn serve(&mut self, session: &Session, since: Instant) -> End {
        // Rings at the deadline, and at a cut or a handover; at every point it is
        // awaited no unechoed byte is held except what is waiting for room, which a
        // handover takes along.
        let mut last_traffic = since;
        let mut alarm = session.alarm(last_traffic);
        loop {
            tokio::select! {
                biased;
                // First, so that a client that keeps sending cannot hold a handover up.
                () = poll_fn(|cx| alarm.poll(cx)) => {
                    if let Some(end) = session.rung(&mut alarm, last_traffic, &[]) {
                        return end;
                    }
                    continue;
                }
                ready = poll_fn(|cx| self.stream.poll_read_ready(cx)) => if ready.is_err() {
                    return End::Error;
                },
            }
            loop {
                let burst =
                    poll_fn(|cx| Poll::Ready(self.read_and_echo(cx, session.buffer_size()))).await;
                match burst {
                    Burst::Echoed => {}
                    Burst::Drained => break,
                    Burst::Finished => return End::Finished,
                    Burst::Error => return End::Error,
                    Burst::Blocked(pending) => {
                        // Boxed: the rare wait for a client that is slow to read would
                        // otherwise enlarge every idle connection's task.
                        let written = Box::pin(self.write_back(
                            session,
                            &mut alarm,
                            &pending,
                            Instant::now(),
                        ));
                        if let Err(end) = written.await {
                            return end;
                        }
                    }
                }
                // Caps act once the current echo is written, so nothing read is lost;
                // a handover need not wait for the socket to run dry (a client that
                // never pauses would hold it up).
                if let Some(end) = session.after_echo(self.echoed_total()) {
                    return end;
                }
            }
            self.flush_counts(session);
            last_traffic = Instant::now();
        }
    }

    /// One read of at most `size` bytes into the thread's buffer, and as much of it
    /// written back as the socket takes.
    ///
    /// One poll of tokio's own read, not `try_read`: a read that returns less than the
    /// buffer shows the socket is drained, and tokio then clears its readiness, so the
    /// next pass waits for epoll instead of making a `read` that only returns EAGAIN
    /// (one syscall less per message; tokio clears only the readiness it saw before the
    /// read, so data arriving meanwhile is not missed). The read also spends tokio's
    /// cooperative budget and returns `Pending` when it is spent, so a client that keeps
    /// sending cannot keep the worker thread to itself.
    fn read_and_echo(&mut self, cx: &mut Context<'_>, size: usize) -> Burst {
        BUFFER.with_borrow_mut(|buffer| {
            if buffer.len() < size {
                buffer.resize(size, 0);
            }
            let mut read = ReadBuf::new(&mut buffer[..size]);
            match Pin::new(&mut self.stream).poll_read(cx, &mut read) {
                Poll::Pending => return Burst::Drained,
                Poll::Ready(Err(_)) => return Burst::Error,
                Poll::Ready(Ok(())) => {}
            }
            let n = read.filled().len();
            if n == 0 {
                return Burst::Finished;
            }
            self.unflushed.received += n as u64;
            let mut written = 0;
            while written < n {
                match self.stream.try_write(&buffer[written..n]) {
                    Ok(w) => {
                        written += w;
                        self.unflushed.echoed += w as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Burst::Blocked(buffer[written..n].to_vec());
                    }
                    Err(_) => return Burst::Error,
                }
            }
            Burst::Echoed
        })
    }

    /// Writes `pending` back to a client that is slow to read, waiting for room but not
    /// longer than the idle timeout without progress; only progress (bytes written since
    /// the last wait) restarts the clock, which last moved at `last_traffic`. Returns
    /// when it last moved a byte, or how the connection ended meanwhile (a handover
    /// takes what is left along).
    pub(super) async fn write_back(
        &mut self,
        session: &Session,
        alarm: &mut Alarm<'_>,
        pending: &[u8],
        mut last_traffic: Instant,
    ) -> Result<Instant, End> {
        let mut written = 0;
        let mut progressed = false;
        loop {
            while written < pending.len() {
                match self.stream.try_write(&pending[written..]) {
                    Ok(w) => {
                        written += w;
                        self.unflushed.echoed += w as u64;
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Err(End::Error),
                }
            }
            if written == pending.len() {
                return Ok(last_traffic);
            }
            if progressed {
                progressed = false;
                last_traffic = Instant::now();
            }
            // The counts go out before each wait: a stream to a slow reader may never
            // let the socket run dry, where they would go out otherwise.
            self.flush_counts(session);
            tokio::select! {
                biased;
                ready = poll_fn(|cx| self.stream.poll_write_ready(cx)) => if ready.is_err() {
                    return Err(End::Error);
                },
                () = poll_fn(|cx| alarm.poll(cx)) => {
                    if let Some(end) = session.rung(alarm, last_traffic, &pending[written..]) {
                        return Err(end);
                    }
                }
            }
        }
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
