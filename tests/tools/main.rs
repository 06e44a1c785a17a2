//! The tools shipped in the binary, as their users meet them: `echod client` (an `nc`
//! for echo), `echod probe` (a health check) and `echod bench` (load and latency).

mod support;

mod bench;
mod client;
mod probe;
