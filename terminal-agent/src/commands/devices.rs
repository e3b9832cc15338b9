//! `nfcpay-agent devices`: the NFC readers libnfc finds, or the ones given, opened.

use std::io::Write;

use super::shared::{AgentError, line};
use crate::nfc::Connstring;
use crate::nfc::libnfc::Probe;

/// Lists the readers libnfc finds, or opens the connection strings given.
pub fn run(given: &[Connstring], out: &mut dyn Write) -> Result<(), AgentError> {
    let reports = crate::nfc::devices(given)?;
    if reports.is_empty() {
        line(
            out,
            format_args!("libnfc found no reader (give connection strings to open them)"),
        )?;
    }
    for report in reports {
        match report.probe {
            Probe::Opened { name, chip } => line(
                out,
                format_args!(
                    "{}: {name}{}",
                    report.connstring,
                    chip.map(|chip| format!(", chip: {chip}"))
                        .unwrap_or_default()
                ),
            )?,
            Probe::Failed { error } => {
                line(
                    out,
                    format_args!("{}: cannot open: {error}", report.connstring),
                )?;
            }
        }
    }
    Ok(())
}
