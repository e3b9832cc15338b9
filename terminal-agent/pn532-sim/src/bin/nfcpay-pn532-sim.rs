//! nfcpay-pn532-sim: emulated PN532 readers on pseudo-terminals, for libnfc's `pn532_uart`
//! driver. Prints one connection string per device, then runs until SIGINT or SIGTERM.
#![forbid(unsafe_code)]

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use nfcpay_pn532_sim::{DEVICES_MAX, Simulator};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;

/// Emulated PN532 NFC readers sharing one virtual RF field.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Number of emulated readers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=DEVICES_MAX as i64))]
    devices: u8,
    /// After the connection strings, print one `LIBNFC_DEVICE=...` line per device.
    #[arg(long)]
    print_env: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    // Signals are caught before the connection strings go out, so a caller that signals right
    // after reading them gets a clean exit.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot catch SIGINT/SIGTERM")?;
    let simulator = Simulator::start(usize::from(args.devices))?;

    let mut stdout = std::io::stdout().lock();
    for connstring in simulator.connstrings() {
        writeln!(stdout, "{connstring}")?;
    }
    if args.print_env {
        for connstring in simulator.connstrings() {
            writeln!(stdout, "LIBNFC_DEVICE={connstring}")?;
        }
    }
    stdout.flush()?;
    drop(stdout);

    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "stopping");
    }
    simulator.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_help_describes_the_emulator_not_the_agent() {
        let about = Args::command()
            .get_about()
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(
            about.starts_with("nfcpay-pn532-sim: emulated PN532"),
            "{about}"
        );
        assert!(!about.contains("nfcpay-agent"), "{about}");
    }
}
