//! `nfcpay-admin bdk …`: generate, import and list base derivation keys.

use std::io::{BufRead, IsTerminal, Write};

use clap::Subcommand;
use nfcpay_keystore::components::{self, COMPONENTS_MAX, COMPONENTS_MIN, KeyComponent};
use nfcpay_keystore::{BdkInfo, Keystore};
use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::KeyAlgorithm;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::AdminError;

/// Longest line accepted for one component (64 hex digits plus generous spacing).
const COMPONENT_LINE_BYTES_MAX: usize = 256;

/// `bdk` subcommands.
#[derive(Debug, Subcommand)]
pub enum BdkCommand {
    /// Generate a BDK inside the keystore (sensitive, never extractable); prints its KCV.
    Generate {
        /// BDK ID: 8 hex digits, the first 4 bytes of every KSN under this BDK.
        #[arg(long)]
        bdk_id: BdkId,
        /// Key algorithm.
        #[arg(long, default_value = "aes256")]
        algorithm: KeyAlgorithm,
    },
    /// Import a BDK from 2 or 3 clear components (XORed together), read as hex from standard
    /// input, one per line (prompted without echo on a terminal). Prints each component's KCV
    /// and the combined key's KCV.
    Import {
        /// BDK ID: 8 hex digits.
        #[arg(long)]
        bdk_id: BdkId,
        /// Number of components (2 or 3).
        #[arg(long)]
        components: usize,
        /// Expected key algorithm; the components' length must match it.
        #[arg(long)]
        algorithm: Option<KeyAlgorithm>,
    },
    /// List the BDKs: ID, algorithm, KCV, creation time.
    List,
}

/// Runs a `bdk` subcommand.
pub fn run(
    command: BdkCommand,
    keystore: &dyn Keystore,
    out: &mut dyn Write,
) -> Result<Value, AdminError> {
    match command {
        BdkCommand::Generate { bdk_id, algorithm } => {
            let info = keystore.generate_bdk(bdk_id, algorithm)?;
            writeln!(
                out,
                "generated BDK {} ({}) KCV {}",
                info.bdk_id, info.algorithm, info.kcv
            )?;
            Ok(json!({ "bdk": bdk_json(&info) }))
        }
        BdkCommand::Import {
            bdk_id,
            components,
            algorithm,
        } => {
            let stdin = std::io::stdin();
            let interactive = stdin.is_terminal();
            import(bdk_id, components, algorithm, keystore, out, || {
                read_component(&mut stdin.lock(), interactive)
            })
        }
        BdkCommand::List => list(keystore, out),
    }
}

/// The import ceremony, with components supplied by `next_component`.
pub(crate) fn import(
    bdk_id: BdkId,
    count: usize,
    algorithm: Option<KeyAlgorithm>,
    keystore: &dyn Keystore,
    out: &mut dyn Write,
    mut next_component: impl FnMut() -> Result<Zeroizing<String>, AdminError>,
) -> Result<Value, AdminError> {
    if !(COMPONENTS_MIN..=COMPONENTS_MAX).contains(&count) {
        return Err(AdminError::Input(format!(
            "--components must be {COMPONENTS_MIN} or {COMPONENTS_MAX}"
        )));
    }
    let mut parts = Vec::with_capacity(count);
    let mut component_kcvs = Vec::with_capacity(count);
    for index in 1..=count {
        let text = next_component()?;
        let component = KeyComponent::from_hex(&text)
            .map_err(|error| AdminError::Input(format!("component {index}: {error}")))?;
        if let Some(algorithm) = algorithm
            && component.len() != algorithm.key_bytes()
        {
            return Err(AdminError::Input(format!(
                "component {index}: {} bytes, but {algorithm} needs {}",
                component.len(),
                algorithm.key_bytes()
            )));
        }
        let kcv = component.kcv()?;
        writeln!(out, "component {index} of {count}: KCV {kcv}")?;
        component_kcvs.push(kcv.to_string());
        parts.push(component);
    }
    let key = components::combine(&parts)
        .map_err(|error| AdminError::Input(format!("components: {error}")))?;
    drop(parts);
    let expected_kcv = components::clear_key_kcv(&key)?;
    writeln!(out, "combined key: KCV {expected_kcv}")?;
    let info = keystore.import_bdk(bdk_id, &key)?;
    drop(key);
    if info.kcv != expected_kcv {
        // The store holds something other than what the custodians entered: never use it.
        return Err(AdminError::Input(format!(
            "the keystore reports KCV {} for the imported key, expected {expected_kcv}",
            info.kcv
        )));
    }
    writeln!(
        out,
        "imported BDK {} ({}) KCV {}",
        info.bdk_id, info.algorithm, info.kcv
    )?;
    Ok(json!({ "bdk": bdk_json(&info), "component_kcvs": component_kcvs }))
}

/// A BDK in JSON (docs/admin-cli.md): never the key, only its check value.
fn bdk_json(info: &BdkInfo) -> Value {
    json!({
        "bdk_id": info.bdk_id.to_string(),
        "algorithm": info.algorithm.to_string(),
        "kcv": info.kcv.to_string(),
        "created_unix_seconds": info.created_unix_seconds,
    })
}

/// Reads one component: a prompt without echo on a terminal, else one line of input.
fn read_component(
    input: &mut dyn BufRead,
    interactive: bool,
) -> Result<Zeroizing<String>, AdminError> {
    if interactive {
        return Ok(Zeroizing::new(rpassword::prompt_password(
            "key component (hex, not echoed): ",
        )?));
    }
    let mut line = Zeroizing::new(String::new());
    let read = std::io::Read::take(&mut *input, COMPONENT_LINE_BYTES_MAX as u64 + 1)
        .read_line(&mut line)?;
    if read == 0 {
        return Err(AdminError::Input(
            "standard input ended before all components were read".into(),
        ));
    }
    if line.len() > COMPONENT_LINE_BYTES_MAX {
        return Err(AdminError::Input("component line too long".into()));
    }
    Ok(line)
}

fn list(keystore: &dyn Keystore, out: &mut dyn Write) -> Result<Value, AdminError> {
    let bdks = keystore.list_bdks()?;
    let document = json!({ "bdks": bdks.iter().map(bdk_json).collect::<Vec<_>>() });
    writeln!(
        out,
        "{:<10} {:<10} {:<8} CREATED (UTC)",
        "BDK ID", "ALGORITHM", "KCV"
    )?;
    for BdkInfo {
        bdk_id,
        algorithm,
        kcv,
        created_unix_seconds,
    } in bdks
    {
        writeln!(
            out,
            "{:<10} {:<10} {:<8} {}",
            bdk_id.to_string(),
            algorithm.to_string(),
            kcv.to_string(),
            format_utc(created_unix_seconds)
        )?;
    }
    Ok(document)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch.
fn format_utc(unix_seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_seconds.to_string())
}
