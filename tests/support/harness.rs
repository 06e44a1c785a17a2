//! The test harness of the crates whose tests need something of the machine (a tool on
//! `PATH`, root, an IPv6 loopback): built on libtest-mimic, so such a test shows as
//! `ignored` in plain `cargo test` output when its need is missing, and fails instead
//! when `ECHOD_REQUIRE_E2E=1` (set by `.ci/run`), so CI cannot pass by skipping.
//!
//! Each test module lists its tests with [`tests!`], with what each one needs; `main`
//! hands the lists to [`run`]. A test function left out of its module's list is dead
//! code, which the build (clippy `-D warnings`) rejects.
//!
//! Included (by `#[path]`, through `e2e.rs`) into the `daemon` and `deployment` crates,
//! both declared with `harness = false`.

use std::collections::BTreeSet;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Trial};

/// Something a test needs from the machine.
#[derive(Clone, Copy)]
pub enum Need {
    /// A program on `PATH`.
    Tool(&'static str),
    /// A property of the machine: what it is, and the check that tells.
    Host(&'static str, fn() -> bool),
    /// Something no package or setup step can provide (the history of a shallow clone):
    /// checked like `Host`, but its absence leaves the test ignored, with the note, even
    /// with `ECHOD_REQUIRE_E2E=1`.
    #[allow(dead_code, reason = "the deployment crate alone uses it")]
    Optional(&'static str, fn() -> bool),
}

impl Need {
    fn is_met(&self) -> bool {
        match self {
            Need::Tool(program) => on_path(program),
            Need::Host(_, check) | Need::Optional(_, check) => check(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Need::Tool(program) => program.to_string(),
            Need::Host(what, _) | Need::Optional(what, _) => what.to_string(),
        }
    }
}

/// True when `program` is an executable file in a directory of `PATH`.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// An IPv6 loopback address (`::1`) to listen and connect on.
pub const IPV6_LOOPBACK: Need = Need::Host("an IPv6 loopback address (::1)", || {
    std::net::TcpListener::bind("[::1]:0").is_ok()
});

/// One test: `module::function`, its body (which panics on failure) and its needs.
pub struct Test {
    pub name: &'static str,
    pub body: fn(),
    pub needs: &'static [Need],
}

/// Lists a module's tests as `pub const TESTS`, each named by its module and function,
/// with what it needs: `tests![plain_test, needs_podman needs &[Need::Tool("podman")]];`
macro_rules! tests {
    ($($test:ident $(needs $needs:expr)?),* $(,)?) => {
        pub const TESTS: &[$crate::support::Test] = &[$(
            $crate::support::Test {
                name: concat!(module_path!(), "::", stringify!($test)),
                body: $test,
                needs: $crate::support::tests!(@needs $($needs)?),
            }
        ),*];
    };
    (@needs) => { &[] };
    (@needs $needs:expr) => { $needs };
}
pub(crate) use tests;

/// Runs the listed tests under the command line of `cargo test -- …` (filters,
/// `--list`, `--ignored`, `--test-threads`) and returns the exit code to end with.
pub fn run(lists: &[&[Test]]) -> ExitCode {
    let args = Arguments::from_args();
    let required = std::env::var("ECHOD_REQUIRE_E2E").is_ok_and(|v| v == "1");
    let (mut missing_anywhere, mut ignored) = (BTreeSet::new(), 0);
    let trials = lists
        .iter()
        .flat_map(|list| list.iter())
        .map(|test| {
            // module_path!() starts with the crate's name; test names start at the module.
            let name = test
                .name
                .split_once("::")
                .map_or(test.name, |(_, rest)| rest);
            let missing: Vec<String> = test
                .needs
                .iter()
                .filter(|need| !need.is_met())
                .map(Need::describe)
                .collect();
            if missing.is_empty() {
                let body = test.body;
                return Trial::test(name, move || {
                    body();
                    Ok(())
                });
            }
            missing_anywhere.extend(missing.iter().cloned());
            let optional_only = test
                .needs
                .iter()
                .filter(|need| !need.is_met())
                .all(|need| matches!(need, Need::Optional(..)));
            let missing = format!("needs {}, missing here", missing.join(", "));
            if required && !optional_only {
                Trial::test(name, move || {
                    Err(format!("{missing} (ECHOD_REQUIRE_E2E=1 requires every test)").into())
                })
            } else {
                ignored += 1;
                // Run anyway (`--include-ignored`), it fails naming what is missing.
                Trial::test(name, move || Err(missing.into())).with_ignored_flag(true)
            }
        })
        .collect();
    if !args.list && ignored > 0 {
        let missing: Vec<String> = missing_anywhere.into_iter().collect();
        let tests = if ignored == 1 { "test" } else { "tests" };
        eprintln!(
            "note: {ignored} {tests} ignored, missing here: {}; ECHOD_REQUIRE_E2E=1 makes that fail",
            missing.join(", ")
        );
    }
    libtest_mimic::run(&args, trials).exit_code()
}
