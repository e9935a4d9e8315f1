//! Load-test harness for a Keyvex engine deployment.
//!
//! Not built yet: the goose scenarios arrive with the load-test issue. Until then this binary
//! says so and exits non-zero, so nobody mistakes it for a passing run.

fn main() -> std::process::ExitCode {
    eprintln!(
        "loadtest: the goose scenarios are not implemented yet (see the load-test issue); nothing was run"
    );
    std::process::ExitCode::from(2)
}
