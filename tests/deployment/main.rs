//! echod as it is deployed: the Debian package under a real systemd, the container image
//! under podman, the Kubernetes and Compose files, and the Prometheus material against
//! the real Prometheus tools. Most of these tests need tools installed on the machine
//! (`.ci/run` installs them all). The benchmark script (`benches/compare.sh`) is checked
//! here too, as the other shell-and-tools piece of the repository.

// Test crates are binaries whose support modules are shared between crates by
// `#[path]`: `pub` there means "for the other test modules", which the crate-wide
// `unreachable_pub` lint cannot tell.
#![allow(unreachable_pub)]

mod support;

mod bench_script;
mod compose;
mod container;
mod kubernetes;
mod packaging;
mod prometheus;
mod systemd;
mod upgrade;
mod upgrade_compat;
mod upgrade_faults;

fn main() -> std::process::ExitCode {
    // The slowest first (a boot of systemd, an image build), so the others fill in
    // beside them.
    support::run(&[
        systemd::TESTS,
        upgrade::TESTS,
        upgrade_faults::TESTS,
        upgrade_compat::TESTS,
        container::TESTS,
        prometheus::TESTS,
        kubernetes::TESTS,
        compose::TESTS,
        packaging::TESTS,
        bench_script::TESTS,
    ])
}
