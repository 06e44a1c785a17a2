//! An echo loop between two echo servers on **different** ports, started by one spoofed
//! datagram, with echod's defaults: nothing tells echod that the other port is an echo
//! server, but servers talk from fixed ports below the ephemeral range
//! (`net.ipv4.ip_local_port_range`), and a source port there gets only a small burst.
//! A client on an ephemeral port is not limited by it.
//!
//! Spoofing needs a raw socket (root); every packet goes to 127.0.0.1.

use std::net::UdpSocket;
use std::time::Duration;

use crate::hostile_udp::{echoes_once_settled, sent};
use crate::support::{Daemon, spoof, v4};

crate::support::tests![
    one_spoofed_datagram_between_echods_on_two_ports_costs_at_most_100_echoes needs &[crate::support::RAW_SOCKETS],
];

fn one_spoofed_datagram_between_echods_on_two_ports_costs_at_most_100_echoes() {
    // Servers listen on fixed ports below the ephemeral range (as echo servers do: 7,
    // 7007…); port 0 would give them ephemeral ports, which echod treats as clients'.
    // The loopback addresses are this test's own, so no other test can hold them.
    let a = Daemon::start("[udp]\nlisten = [\"127.0.8.1:5000\"]\n");
    let b = Daemon::start("[udp]\nlisten = [\"127.0.8.2:5001\"]\n");
    spoof(v4(b.udp), v4(a.udp), b"ping-pong");
    let (echoes, lasted) = echoes_once_settled(&[&a, &b]);
    eprintln!("different ports, defaults: {echoes} echoes over {lasted:?}");
    assert!(echoes <= 100.0, "{echoes} echoes (at most 100)");
    // A client on an ephemeral port gets a burst of 500 answered as before.
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let before = sent(&a);
    let mut answered = 0;
    for i in 0..500u32 {
        client.send_to(&i.to_be_bytes(), a.udp).expect("send");
        let mut buf = [0u8; 8];
        if client.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
    }
    eprintln!("an ephemeral-port client after the loop: {answered} of 500 answered");
    assert_eq!(answered, 500, "a client on an ephemeral port was limited");
    assert_eq!(sent(&a) - before, 500.0);
}
