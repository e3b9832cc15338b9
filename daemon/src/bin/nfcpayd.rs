//! `nfcpayd`: the nfcpay platform daemon. See `nfcpay_daemon::daemon`.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nfcpay_daemon::daemon::{
    DaemonError, EXIT_OS_ERROR, EXIT_USAGE, check_startup, load_config, run,
};
use nfcpay_protocol::ErrorChain;

/// mimalloc instead of glibc malloc: the request path allocates and frees many small buffers
/// on many threads, where glibc spent a fifth of the daemon's CPU (docs/performance.md).
/// Built without transparent huge pages (`no_thp`): with them the kernel zeroed a fresh 2 MiB
/// page each time mimalloc reused purged memory, 7 % of the daemon's CPU under load.
///
/// Built with `override` too: mimalloc also defines `malloc`, `free` and the rest for the C
/// and C++ libraries in the process — the PKCS#11 module (SoftHSM2 allocates and frees on
/// every call), OpenSSL, SQLite, libpq. glibc's allocator in the HSM workers was 14 % of the
/// daemon's samples; with the override the HSM workers' CPU per payment fell by 10–15 %.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The nfcpay platform daemon: verifies, matches and settles what terminals send.
#[derive(Debug, Parser)]
#[command(
    name = "nfcpayd",
    version,
    after_help = "Exit codes: 64 command line or configuration, 69 HSM or database \
                  unavailable, 70 the ledger writer stopped while serving, 71 operating system \
                  (e.g. a port in use), 78 keys, certificates or PIN unusable \
                  (docs/operations.md §11)."
)]
struct Args {
    /// Configuration file (TOML); `NFCPAY_*` environment variables override it.
    #[arg(
        long,
        short,
        env = "NFCPAY_CONFIG",
        default_value = "/etc/nfcpay/nfcpay.toml"
    )]
    config: PathBuf,
    /// Check what start-up would (configuration, files, HSM login and keys, database, TLS)
    /// without serving, and exit with the code start-up would use.
    #[arg(long)]
    check_config: bool,
    /// Log lines as text (journald) or as one JSON object each (ELK, Loki, …); the level
    /// filter is `NFCPAY_LOG` (default `info`).
    #[arg(long, value_enum, env = "NFCPAY_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// With --check-config, run as root: check as this user (the service's, e.g. nfcpay),
    /// with the same environment, through `runuser`.
    #[arg(long, value_name = "USER", requires = "check_config")]
    as_user: Option<String>,
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
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => return command_line_error(&error),
    };
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
    if args.check_config {
        return check_config(&args);
    }
    let config = match load_config(&args.config) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_OS_ERROR);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

/// `--help` and `--version` print and exit 0; any other command-line error is printed as clap
/// words it and exits 64 (`EX_USAGE`, as a bad configuration does), not clap's 2, so that the
/// unit's `RestartPreventExitStatus=` stops systemd from restarting a daemon whose command
/// line (e.g. in a drop-in) no restart can fix.
fn command_line_error(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    if error.use_stderr() {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Logs a fatal error once, with its causes, and exits with its code.
fn fail(error: &DaemonError) -> ExitCode {
    tracing::error!("{}", ErrorChain(error));
    ExitCode::from(error.exit_code())
}

/// `--check-config`: the report on stdout, the failure (with the exit code it means) on
/// stderr.
fn check_config(args: &Args) -> ExitCode {
    let root = rustix::process::geteuid().is_root();
    if let Some(user) = &args.as_user {
        if !root {
            eprintln!("nfcpayd: --as-user needs root (or run the check as {user} directly)");
            return ExitCode::from(EXIT_USAGE);
        }
        // runuser keeps the environment (SOFTHSM2_CONF, NFCPAY_*) and sets the user's groups.
        let error = std::process::Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("nfcpayd")))
            .arg("--check-config")
            .arg("--config")
            .arg(&args.config)
            .exec();
        eprintln!("nfcpayd: cannot run runuser: {error}");
        return ExitCode::from(EXIT_OS_ERROR);
    }
    let outcome = load_config(&args.config).and_then(|config| {
        println!("ok    configuration {}", args.config.display());
        check_startup(&config, &mut std::io::stdout())
    });
    match outcome {
        Ok(()) => {
            println!("configuration OK: start-up would succeed");
            ExitCode::SUCCESS
        }
        Err(error) => {
            let code = error.exit_code();
            eprintln!("FAIL  {} (start-up would exit {code})", ErrorChain(&error));
            if root && matches!(error, DaemonError::Root) {
                eprintln!(
                    "      check as the service user instead: nfcpayd --check-config --as-user nfcpay"
                );
            }
            ExitCode::from(code)
        }
    }
}
