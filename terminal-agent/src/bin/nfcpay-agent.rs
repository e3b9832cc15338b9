//! nfcpay-agent: the terminal side of nfcpay (enroll, request, pay, pending, status, devices,
//! resend). Thin: the command line is `nfcpay_terminal_agent::cli`, the work
//! `nfcpay_terminal_agent::commands`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use nfcpay_terminal_agent::cli::{self, Cli, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version are "errors" that go to stdout and succeed.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    cli::init_logging();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nfcpay-agent: {}", nfcpay_protocol::ErrorChain(&error));
            if let Some(problem) = error.problem() {
                eprintln!("problem code: {}", problem.code);
                eprintln!("detail: {}", problem.detail);
            }
            ExitCode::from(error.exit_code())
        }
    }
}
