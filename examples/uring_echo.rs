//! A TCP echo on io_uring, one thread: not part of echod, a measuring stick for
//! `benches/compare.sh` (`URING=1`). It asks one question: does submitting the reads and
//! writes of many connections in one system call, instead of a `read` and a `write`
//! each plus `epoll_wait`, buy the server CPU per round trip that echod's epoll design
//! cannot (echod already makes the same system calls per message as the naive loop)?
//! Like the naive server: an 8 KiB buffer per connection, read then write all of it.
//!
//! Run: `cargo run --release --example uring_echo -- 7010` (TCP on 127.0.0.1).

use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

const BUFFER: usize = 8192;
const ACCEPT: u64 = u64::MAX;

/// One connection: its socket, its buffer, and how much of a read is written back.
struct Conn {
    fd: OwnedFd,
    buf: Box<[u8; BUFFER]>,
    len: usize,
    sent: usize,
}

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(7010);
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let mut ring: IoUring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut pending: Vec<squeue::Entry> = Vec::new();
    let accept = || {
        opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .build()
            .user_data(ACCEPT)
    };
    pending.push(accept());
    loop {
        {
            let mut sq = ring.submission();
            while let Some(entry) = pending.pop() {
                // SAFETY: every buffer an entry points at is a connection's boxed buffer,
                // which stays alive (and unmoved) until that connection's completion.
                if unsafe { sq.push(&entry) }.is_err() {
                    pending.push(entry);
                    break;
                }
            }
        }
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            let result = cqe.result();
            if cqe.user_data() == ACCEPT {
                if !cqueue::more(cqe.flags()) {
                    pending.push(accept());
                }
                if result < 0 {
                    continue;
                }
                // SAFETY: a successful accept returns a new descriptor that we own.
                let fd = unsafe { OwnedFd::from_raw_fd(result) };
                let conn = Conn {
                    fd,
                    buf: Box::new([0; BUFFER]),
                    len: 0,
                    sent: 0,
                };
                let id = match free.pop() {
                    Some(id) => {
                        conns[id] = Some(conn);
                        id
                    }
                    None => {
                        conns.push(Some(conn));
                        conns.len() - 1
                    }
                };
                pending.push(recv(id, conns[id].as_mut().expect("just stored")));
                continue;
            }
            let id = (cqe.user_data() >> 1) as usize;
            let is_send = cqe.user_data() & 1 == 1;
            let Some(conn) = conns[id].as_mut() else {
                continue;
            };
            if result <= 0 {
                conns[id] = None;
                free.push(id);
                continue;
            }
            if is_send {
                conn.sent += result as usize;
            } else {
                conn.len = result as usize;
                conn.sent = 0;
            }
            pending.push(if conn.sent < conn.len {
                send(id, conn)
            } else {
                recv(id, conn)
            });
        }
    }
}

fn recv(id: usize, conn: &mut Conn) -> squeue::Entry {
    opcode::Recv::new(
        types::Fd(conn.fd.as_raw_fd()),
        conn.buf.as_mut_ptr(),
        BUFFER as u32,
    )
    .build()
    .user_data((id as u64) << 1)
}

fn send(id: usize, conn: &mut Conn) -> squeue::Entry {
    let rest = &conn.buf[conn.sent..conn.len];
    opcode::Send::new(
        types::Fd(conn.fd.as_raw_fd()),
        rest.as_ptr(),
        rest.len() as u32,
    )
    .build()
    .user_data(((id as u64) << 1) | 1)
}
