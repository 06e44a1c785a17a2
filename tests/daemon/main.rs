//! The daemon as a process, the way an operator runs it: echo over TCP and UDP, limits,
//! metrics and health, reload on SIGHUP, stop on SIGTERM, configuration errors and exit
//! codes, sd_notify and socket activation. Every test starts the real `echod` binary on
//! its own loopback ports.

// Test crates are binaries whose support modules are shared between crates by
// `#[path]`: `pub` there means "for the other test modules", which the crate-wide
// `unreachable_pub` lint cannot tell.
#![allow(unreachable_pub)]

mod support;

mod access;
mod caps;
mod config;
mod docs;
mod hostile_caps;
mod hostile_config;
mod hostile_drain;
mod hostile_durations;
mod hostile_health;
mod hostile_http;
mod hostile_notify;
mod hostile_proxy;
mod hostile_tcp;
mod hostile_udp;
mod hostile_udp_loops;
mod in_process;
mod limits;
mod metrics;
mod operator;
mod proxy_protocol;
mod reload;
mod sd_notify;
mod shutdown;
mod soak;
mod socket_activation;
mod tcp_echo;
mod tls_echo;
mod udp_echo;
mod upgrade;
mod upgrade_faults;
mod upgrade_pause;
mod upgrade_series;
mod web_config;

fn main() -> std::process::ExitCode {
    // The soak (about 90 s) first, so the others run beside it.
    support::run(&[
        soak::TESTS,
        tcp_echo::TESTS,
        docs::TESTS,
        udp_echo::TESTS,
        limits::TESTS,
        metrics::TESTS,
        reload::TESTS,
        shutdown::TESTS,
        config::TESTS,
        sd_notify::TESTS,
        socket_activation::TESTS,
        in_process::TESTS,
        operator::TESTS,
        caps::TESTS,
        access::TESTS,
        proxy_protocol::TESTS,
        hostile_udp::TESTS,
        hostile_udp_loops::TESTS,
        hostile_tcp::TESTS,
        hostile_http::TESTS,
        hostile_health::TESTS,
        hostile_drain::TESTS,
        hostile_notify::TESTS,
        hostile_proxy::TESTS,
        hostile_caps::TESTS,
        hostile_config::TESTS,
        hostile_durations::TESTS,
        web_config::TESTS,
        upgrade::TESTS,
        upgrade_faults::TESTS,
        upgrade_pause::TESTS,
        upgrade_series::TESTS,
        tls_echo::TESTS,
    ])
}
