//! `nfcpayd`: the nfcpay platform daemon. See `nfcpay_daemon::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nfcpay_daemon::daemon::{load_config, run};

/// mimalloc instead of glibc malloc: the request path allocates and frees many small buffers
/// on many threads, where glibc spent a fifth of the daemon's CPU (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The nfcpay platform daemon: verifies, matches and settles what terminals send.
#[derive(Debug, Parser)]
#[command(name = "nfcpayd", version)]
struct Args {
    /// Configuration file (TOML); `NFCPAY_*` environment variables override it.
    #[arg(
        long,
        short,
        env = "NFCPAY_CONFIG",
        default_value = "/etc/nfcpay/nfcpay.toml"
    )]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log lines as text (journald) or as one JSON object each (ELK, Loki, …); the level
    /// filter is `NFCPAY_LOG` (default `info`).
    #[arg(long, value_enum, env = "NFCPAY_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `LEVEL target: message key=value …`, the request's span first.
    Text,
    /// tracing-subscriber's JSON: `timestamp`, `level`, `fields`, `target`, `span`, `spans`.
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("NFCPAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let config = match load_config(&args.config) {
        Ok(config) => config,
        Err(error) => return fail(&error, error.exit_code()),
    };
    if args.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&error, 71),
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error, error.exit_code()),
    }
}

fn fail(error: &dyn std::error::Error, code: u8) -> ExitCode {
    tracing::error!("{error}");
    eprintln!("nfcpayd: {error}");
    ExitCode::from(code)
}
