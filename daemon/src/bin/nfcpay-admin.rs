//! `nfcpay-admin`: the operator's command line. See `nfcpay_daemon::admin`.

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("NFCPAY_LOG"))
        .with_writer(std::io::stderr)
        .init();
    nfcpay_daemon::admin::main(std::env::args_os())
}
