//! The tools shipped in the binary, as their users meet them: `echod client` (an `nc`
//! for echo), `echod probe` (a health check) and `echod bench` (load and latency).

// Test crates are binaries whose support modules are shared between crates by
// `#[path]`: `pub` there means "for the other test modules", which the crate-wide
// `unreachable_pub` lint cannot tell.
#![allow(unreachable_pub)]

mod support;

mod bench;
mod client;
mod probe;
mod tls;
