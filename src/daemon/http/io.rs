//! The socket as the HTTP endpoint uses it: a deadline on writes (hyper has header and
//! keep-alive timeouts but none for writes), and every read that brings bytes and every
//! write recorded as progress in the connection's slot, so eviction can tell a client
//! that is getting somewhere (a probe mid-handshake, answered with a server flight)
//! from one that stalled (a slowloris, a stalled ClientHello).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::slots::SlotHandle;

/// The connection's socket, with a deadline on writes: a write that makes no progress
/// for `timeout` fails, so a client that requests and never reads cannot hold its
/// connection (and the response in memory) forever.
pub(super) struct Socket {
    pub(super) stream: TcpStream,
    timeout: Duration,
    /// Armed while a write waits for room; disarmed by any progress.
    stall: Option<Pin<Box<Sleep>>>,
    /// Told of every read that brings bytes.
    slot: SlotHandle,
}

impl Socket {
    pub(super) fn new(stream: TcpStream, timeout: Duration, slot: SlotHandle) -> Self {
        Self {
            stream,
            timeout,
            stall: None,
            slot,
        }
    }

    /// Called when a write would block: pending until the stall outlasts the timeout,
    /// then an error, after arranging for the close to reset the connection (the
    /// unsent response is thrown away instead of lingering in the kernel).
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let timeout = self.timeout;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let _ = SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read the response",
        )))
    }

    /// What a write to the stream returned, as the deadline and the slot see it: a write
    /// that would block arms the stall timer ([`Self::poll_stall`]), any other answer
    /// disarms it, and bytes written are progress. Every kind of write ends here.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if result.is_pending() {
            return self.poll_stall(cx);
        }
        self.stall = None;
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.slot.wrote();
        }
        result
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.slot.progressed();
        }
        result
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.after_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
