//! `nfcpay-admin`: the operator's command line. See `nfcpay_daemon::admin`.

use std::process::ExitCode;

fn main() -> ExitCode {
    nfcpay_daemon::admin::main(std::env::args_os())
}
