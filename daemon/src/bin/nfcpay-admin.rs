//! `nfcpay-admin`: the operator's command line. See `nfcpay_daemon::admin`.

use std::process::ExitCode;

use clap::Parser;
use nfcpay_daemon::admin::{Cli, run};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("NFCPAY_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nfcpay-admin: {error}");
            error.exit_code()
        }
    }
}
