//! The `keyvex` binary: the command line over the engine library.
//!
//! Commands write their results to stdout and everything else (banners, progress, logs) to
//! stderr, so output can be piped.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("keyvex: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("keyvex: {err:#}");
            ExitCode::FAILURE
        }
    }
}
