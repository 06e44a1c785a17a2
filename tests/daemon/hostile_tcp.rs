//! TCP under hostile clients: what one connection may pin in kernel memory.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::{Daemon, write_until_stalled};

crate::support::tests![
    a_client_that_never_reads_pins_bounded_kernel_memory needs &[crate::support::Need::Tool("ss")],
    out_of_range_tcp_buffers_are_refused_by_name,
];

/// The kernel's view of the TCP socket from `local` to `peer`: `skmem` fields by name
/// (`r`/`rb`: bytes queued for reading / receive buffer limit, `t`/`tb`: bytes queued
/// for sending / send buffer limit, `w`: send queue including unsent data).
fn tcp_skmem(local: SocketAddr, peer: SocketAddr) -> HashMap<String, u64> {
    let out = std::process::Command::new("ss")
        .args([
            "-tmnH",
            "state",
            "established",
            &format!("src {local} and dst {peer}"),
        ])
        .output()
        .expect("run ss");
    crate::support::skmem(&String::from_utf8_lossy(&out.stdout))
}

/// A client that first streams `warm_up` bytes while reading the echo (so the kernel's
/// autotuning grows echod's buffers for a fast peer), then sends and never reads;
/// returns echod's side of the connection as `ss` sees it once the writes have
/// stalled, and the bytes written.
fn pin_kernel_memory(daemon: &Daemon, warm_up: usize) -> (HashMap<String, u64>, usize) {
    let mut s = TcpStream::connect(daemon.tcp).unwrap();
    if warm_up > 0 {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = s.try_clone().unwrap();
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut left = warm_up;
            while left > 0 {
                let n = reader.read(&mut buf).expect("read echo");
                assert!(n > 0, "EOF during warm-up");
                left = left.saturating_sub(n);
            }
        });
        let chunk = vec![0xa5u8; 1 << 20];
        for _ in 0..warm_up / chunk.len() {
            s.write_all(&chunk).unwrap();
        }
        echo.join().expect("warm-up reader");
    }
    let written = write_until_stalled(&mut s, 256 << 20, Duration::from_millis(500))
        .expect("write failed before echod stalled");
    let skmem = tcp_skmem(daemon.tcp, s.local_addr().unwrap());
    (skmem, written)
}

const KIB: u64 = 1024;

/// Asserts echod's side of a connection holds at most what `send` and `receive` allow:
/// the kernel doubles a requested size (its bookkeeping) and may queue one more
/// segment train beyond the limit.
fn assert_bounded(mem: &HashMap<String, u64>, send: u64, receive: u64) {
    let slack = 128 * KIB;
    assert!(mem["tb"] <= 2 * send, "send buffer {} bytes", mem["tb"]);
    assert!(
        mem["w"] <= 2 * send + slack,
        "send queue {} bytes",
        mem["w"]
    );
    assert!(
        mem["rb"] <= 2 * receive,
        "receive buffer {} bytes",
        mem["rb"]
    );
    assert!(
        mem["r"] <= 2 * receive + slack,
        "receive queue {} bytes",
        mem["r"]
    );
}

fn a_client_that_never_reads_pins_bounded_kernel_memory() {
    // Defaults: 256 KiB each way. With the kernel's autotuning (the old behaviour, and
    // what 0 still selects) this client pinned 4.2 MB of send queue and 1.5 MB of
    // receive queue.
    let daemon = Daemon::start("");
    let (mem, written) = pin_kernel_memory(&daemon, 64 << 20);
    eprintln!("defaults: client wrote {written} bytes unread; echod's socket {mem:?}");
    assert_bounded(&mem, 256 * KIB, 256 * KIB);

    let daemon = Daemon::start(
        r#"
        [tcp]
        send_buffer_size = 65536
        receive_buffer_size = 32768
        "#,
    );
    let (mem, written) = pin_kernel_memory(&daemon, 64 << 20);
    eprintln!("64 KiB / 32 KiB: client wrote {written} bytes unread; echod's socket {mem:?}");
    assert_eq!((mem["tb"], mem["rb"]), (128 * KIB, 64 * KIB));
    assert_bounded(&mem, 64 * KIB, 32 * KIB);
    // The connection still echoes once the client reads again.
    assert!(crate::support::tcp_roundtrip(daemon.tcp, &[1u8; 1 << 20], 3) == [1u8; 1 << 20]);
}

fn out_of_range_tcp_buffers_are_refused_by_name() {
    for (key, value) in [
        ("send_buffer_size", "4095"),
        ("receive_buffer_size", "1"),
        ("send_buffer_size", "268435457"),
    ] {
        let (code, stderr) =
            crate::support::check_config_text(&format!("[tcp]\n{key} = {value}\n"));
        assert_eq!(code, Some(78), "{key} = {value}: {stderr}");
        assert!(stderr.contains(&format!("tcp.{key}")), "{stderr}");
    }
}
