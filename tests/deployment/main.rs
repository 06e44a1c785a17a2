//! echod as it is deployed: the Debian package under a real systemd, the container image
//! under podman, the Kubernetes and Compose files, and the Prometheus material against
//! the real Prometheus tools. Most of these tests need tools installed on the machine
//! (`.ci/run` installs them all).

mod support;

mod compose;
mod container;
mod kubernetes;
mod packaging;
mod prometheus;
mod systemd;
