//! One loopback connection from a chosen source address, echoed once: shared by
//! `examples/hold_connections.rs` (idle memory in `benches/compare.sh`) and the upgrade
//! pause test, which hold thousands of connections the same way. Not an example itself
//! (cargo takes only `examples/*.rs` and `examples/*/main.rs`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// One connection from `source` (port chosen at connect time, so the kernel may reuse
/// ports across destinations and from TIME_WAIT on loopback), after one echoed byte.
pub(crate) fn connect_from(source: Ipv4Addr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (a c_int, its size passed) on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(source), 0)))?;
    socket.connect_timeout(&SockAddr::from(target), Duration::from_secs(5))?;
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"x")?;
    let mut echo = [0u8; 1];
    s.read_exact(&mut echo)?;
    if echo != *b"x" {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(s)
}
