//! The `nfcpay-agent` command line: its arguments, its help, and how a parsed command runs
//! (on a small tokio runtime; NFC runs on a blocking thread). The work itself is in
//! [`crate::commands`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nfcpay_protocol::messages::{Description, PaymentKind};
use nfcpay_protocol::{AccountId, Currency, TerminalId, TxnId};

use crate::commands::{
    self, AgentError, EnrollOptions, KeystoreChoice, NfcSettings, PLATFORM_WAIT_MAX, PayOptions,
    PlatformWait, RequestOptions, TerminalPlace,
};
use crate::delivery::Attempts;
use crate::nfc::{Connstring, Role};

/// The exit code of a usage error (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

const LONG_ABOUT: &str = "\
nfcpay-agent runs on a payment terminal. It enrolls the terminal with the platform (TLS \
identity and DUKPT initial key, both kept in the terminal's keystore), then takes either part \
of a payment: the payee sends a payment request over NFC and submits half A; the payer \
receives it, consents, and submits half B. The platform settles when both halves agree, and \
each terminal prints the receipt after verifying it.

Examples:

  # The operator ran `nfcpay-admin terminals add --id shop-1 --account shop` and gave the
  # code to the installer, who enrolls the terminal:
  # (--enroll-address: the platform's enrollment listener, 8444 by default; --platform is
  # the terminal listener, 8443, where halves go.)
  nfcpay-agent --dir /var/lib/nfcpay-terminal enroll --platform pay.example:8443 \\
      --enroll-address pay.example:8444 --server-name pay.example --ca platform-ca.pem \\
      --terminal-id shop-1 --code-file code.txt

  # Keys in a PKCS#11 token instead of the software keystore (remembered: later commands
  # in this --dir use it without --keystore):
  nfcpay-agent --keystore 'pkcs11:token=terminal?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/nfcpay/pin' enroll ...

  # Which readers are there?
  nfcpay-agent devices
  nfcpay-agent devices pn532_uart:/dev/ttyUSB0

  # The payee asks for 12.50 EUR (its reader is the NFC initiator by default):
  nfcpay-agent --dir shop request --amount 12.50 --currency EUR \\
      --description 'coffee and cake' --device pn532_uart:/dev/ttyUSB0

  # The payer, in reach of the payee's reader (its own reader is the NFC target by default):
  nfcpay-agent --dir alice pay --device acr122_usb            # asks y/N on the terminal
  nfcpay-agent --dir alice pay --device acr122_usb --max-amount 20.00   # unattended, capped

  # Terminal ID, certificate expiry, next KSN counter, transactions left:
  nfcpay-agent --dir shop status

  # A payment left pending: ask the platform again, by its transaction ID:
  nfcpay-agent --dir shop status --txn 0123456789ABCDEF0123456789ABCDEF

  # Halves kept after a fault (a lost connection, the agent killed): list them, then send
  # the same bytes again:
  nfcpay-agent --dir shop pending
  nfcpay-agent --dir shop pending --resend

Exit codes: 0 success, 64 usage error, 1 anything else (a platform refusal prints its problem \
code and detail). Logs go to stderr (NFCPAY_LOG=debug for more); no key, PIN or enrollment \
code is ever printed.";

/// nfcpay-agent: the terminal side of nfcpay.
#[derive(Debug, Parser)]
#[command(name = "nfcpay-agent", version, about, long_about = LONG_ABOUT)]
pub struct Cli {
    /// The terminal directory: terminal.json, certificates, DUKPT state (and the software
    /// keystore).
    #[arg(
        long,
        global = true,
        env = "NFCPAY_AGENT_DIR",
        default_value = "nfcpay-terminal"
    )]
    pub dir: PathBuf,
    /// Where the terminal's keys are: `software` (DIR/keystore.json) or a `pkcs11:` URI
    /// (RFC 7512, with module-path and pin-source). Remembered at enrollment (DIR/keystore):
    /// later commands need it only to override. Default: software.
    #[arg(long, global = true, value_name = "software|pkcs11:URI")]
    pub keystore: Option<KeystoreChoice>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this terminal with a one-time code: makes its TLS and ECDH keys, sends a CSR,
    /// stores the certificate and loads the initial key; prints the terminal ID and the KCV.
    Enroll(EnrollArgs),
    /// Payee: send a payment request over NFC, submit half A, print the verified receipt.
    Request(RequestArgs),
    /// Payer: receive a payment request over NFC, consent, submit half B, print the verified
    /// receipt.
    Pay(PayArgs),
    /// List the NFC readers libnfc finds, or open the connection strings given.
    Devices {
        /// libnfc connection strings (e.g. `pn532_uart:/dev/ttyUSB0`, `acr122_usb`).
        connstrings: Vec<String>,
    },
    /// Show the terminal ID, certificate expiry, KSN counter and transactions left; with
    /// `--txn`, the payment of that transaction as the platform has it now.
    Status {
        /// Ask the platform for this transaction's latest receipt (32 hex digits; this
        /// terminal must be its payee or payer).
        #[arg(long, value_name = "TXN_ID")]
        txn: Option<TxnId>,
    },
    /// List the sealed halves kept in DIR/pending/ that got no final answer yet (a fault, or
    /// the agent stopped); with `--resend`, send each again, byte-identical, and print what
    /// came of it.
    Pending(PendingArgs),
    /// Diagnostic: submit a half saved with `--save-half` again (as is, or tampered) and show
    /// the platform's answer.
    Resend {
        /// The saved half.
        file: PathBuf,
        /// Flip the last byte (in the GCM tag) before sending.
        #[arg(long)]
        tamper: bool,
    },
}

/// `enroll` arguments.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("code").required(true).args(["code_file", "code_stdin"]))]
pub struct EnrollArgs {
    /// The platform's terminal listener, `host:port` (where halves go).
    #[arg(long, value_name = "HOST:PORT")]
    pub platform: String,
    /// The platform's enrollment listener, `host:port` (`[server] enroll_listen`, port 8444
    /// by default). Without it, enrollment goes to `--platform`, which a platform with a
    /// separate enrollment listener (the default) does not answer.
    #[arg(long, value_name = "HOST:PORT")]
    pub enroll_address: Option<String>,
    /// The name the platform's certificate carries.
    #[arg(long, value_name = "NAME")]
    pub server_name: String,
    /// The platform's CA certificate (PEM), from the operator.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// The terminal ID the operator registered.
    #[arg(long, value_name = "ID")]
    pub terminal_id: TerminalId,
    /// Read the one-time enrollment code from this file.
    #[arg(long, value_name = "FILE")]
    pub code_file: Option<PathBuf>,
    /// Read the one-time enrollment code from stdin.
    #[arg(long)]
    pub code_stdin: bool,
    /// Not needed: the platform's answer names the account the operator registered the
    /// terminal for. Given, it is checked against that (a mismatch is warned about, and the
    /// platform's account kept); used only with an older platform that does not say it.
    #[arg(long, value_name = "ACCOUNT")]
    pub account: Option<AccountId>,
}

/// `pending` arguments.
#[derive(Debug, Args)]
pub struct PendingArgs {
    /// Send every kept half again (the identical bytes) and forget those that get a final
    /// answer. Without it, the halves are only listed.
    #[arg(long)]
    pub resend: bool,
    /// Milliseconds the platform may hold a pending answer for the other half (at most 10000).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub wait_ms: u64,
    /// How many times each half is sent at most while the platform cannot be reached or
    /// answers 503 (1 to 10; waits between them: 0.25 s doubling to 4 s, or the platform's
    /// Retry-After, at most 10 s).
    #[arg(long, default_value_t = Attempts::DEFAULT.get(), value_name = "N")]
    pub attempts: u32,
}

/// NFC role, as a flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// NFC-DEP initiator: polls for the other terminal and speaks first.
    Initiator,
    /// NFC-DEP target: waits to be activated by the other terminal.
    Target,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Initiator => Self::Initiator,
            RoleArg::Target => Self::Target,
        }
    }
}

/// What a payment is for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// Goods or services.
    Purchase,
    /// Between people.
    Transfer,
    /// To another country.
    Remittance,
    /// A loan paid out or repaid.
    Loan,
}

impl From<KindArg> for PaymentKind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Purchase => Self::Purchase,
            KindArg::Transfer => Self::Transfer,
            KindArg::Remittance => Self::Remittance,
            KindArg::Loan => Self::Loan,
        }
    }
}

/// Reader and waits, common to `request` and `pay`.
#[derive(Debug, Args)]
pub struct LinkArgs {
    /// The terminal's NFC reader (libnfc connection string).
    #[arg(long, value_name = "CONNSTRING")]
    pub device: String,
    /// Seconds to wait for the other terminal on the NFC side.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub nfc_wait_s: u64,
    /// Milliseconds the platform may hold a pending answer for the other half (at most 10000).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub wait_ms: u64,
    /// Seconds to keep asking the platform while the payment is still pending afterwards.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub settle_wait_s: u64,
    /// How many times the half is sent at most while the platform cannot be reached or
    /// answers 503 (1 to 10; the same bytes each time; waits between them: 0.25 s doubling to
    /// 4 s, or the platform's Retry-After, at most 10 s). A half still without an answer stays
    /// in DIR/pending/ for `pending --resend`.
    #[arg(long, default_value_t = Attempts::DEFAULT.get(), value_name = "N")]
    pub attempts: u32,
    /// Diagnostic: also write the sealed half to FILE (for `resend`).
    #[arg(long, hide = true, value_name = "FILE")]
    pub save_half: Option<PathBuf>,
}

/// `request` arguments.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// Amount as a decimal in the currency's major unit (`12.50` EUR: twelve euros fifty,
    /// sent as 1250 minor units); at most the currency's number of decimals.
    #[arg(long)]
    pub amount: String,
    /// ISO 4217 currency code.
    #[arg(long)]
    pub currency: Currency,
    /// What the payer is shown (at most 140 bytes, no control characters).
    #[arg(long, default_value = "")]
    pub description: Description,
    /// What the payment is for.
    #[arg(long, value_enum, default_value_t = KindArg::Purchase)]
    pub kind: KindArg,
    /// This terminal's NFC role.
    #[arg(long, value_enum, default_value_t = RoleArg::Initiator)]
    pub role: RoleArg,
    /// Reader and waits.
    #[command(flatten)]
    pub link: LinkArgs,
}

/// `pay` arguments.
#[derive(Debug, Args)]
pub struct PayArgs {
    /// This terminal's NFC role.
    #[arg(long, value_enum, default_value_t = RoleArg::Target)]
    pub role: RoleArg,
    /// Consent without asking (unattended use).
    #[arg(long)]
    pub yes: bool,
    /// Consent without asking up to this amount, in the request's currency; refuse above it.
    #[arg(long, value_name = "AMOUNT")]
    pub max_amount: Option<String>,
    /// Reader and waits.
    #[command(flatten)]
    pub link: LinkArgs,
}

/// `--wait-ms` checked against the platform's limit.
fn half_wait(wait_ms: u64) -> Result<Duration, AgentError> {
    let half = Duration::from_millis(wait_ms);
    if half > PLATFORM_WAIT_MAX {
        return Err(AgentError::Usage(format!(
            "--wait-ms {wait_ms} is above the platform's limit of {}",
            PLATFORM_WAIT_MAX.as_millis()
        )));
    }
    Ok(half)
}

/// `--attempts` checked against its bounds.
fn attempts(count: u32) -> Result<Attempts, AgentError> {
    Attempts::try_from(count).map_err(|error| AgentError::Usage(format!("--attempts: {error}")))
}

impl PendingArgs {
    fn wait(&self) -> Result<PlatformWait, AgentError> {
        Ok(PlatformWait {
            half: half_wait(self.wait_ms)?,
            settle: Duration::ZERO,
            attempts: attempts(self.attempts)?,
        })
    }
}

impl LinkArgs {
    fn settings(&self, role: RoleArg) -> Result<(NfcSettings, PlatformWait), AgentError> {
        let connstring = Connstring::try_from(self.device.as_str())
            .map_err(|error| AgentError::Usage(format!("--device: {error}")))?;
        let half = half_wait(self.wait_ms)?;
        let attempts = attempts(self.attempts)?;
        if self.nfc_wait_s == 0 || self.nfc_wait_s > 3600 {
            return Err(AgentError::Usage("--nfc-wait-s must be 1 to 3600".into()));
        }
        Ok((
            NfcSettings {
                connstring,
                role: role.into(),
                wait: Duration::from_secs(self.nfc_wait_s),
            },
            PlatformWait {
                half,
                settle: Duration::from_secs(self.settle_wait_s),
                attempts,
            },
        ))
    }
}

/// Runs a parsed command, writing what it shows to stdout.
pub fn run(cli: Cli) -> Result<(), AgentError> {
    let place = TerminalPlace {
        dir: cli.dir,
        keystore: cli.keystore,
    };
    let mut stdout = std::io::stdout();
    let out: &mut dyn std::io::Write = &mut stdout;
    match cli.command {
        Command::Devices { connstrings } => {
            let given = connstrings
                .iter()
                .map(|text| Connstring::try_from(text.as_str()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| AgentError::Usage(error.to_string()))?;
            commands::devices::run(&given, out)
        }
        Command::Status { txn: None } => commands::status::run(&place, out),
        Command::Status { txn: Some(txn_id) } => {
            runtime()?.block_on(commands::status::run_transaction(&place, txn_id, out))
        }
        Command::Pending(args) => {
            let wait = args.wait()?;
            runtime()?.block_on(commands::pending::run(&place, args.resend, wait, out))
        }
        Command::Enroll(args) => {
            let code = commands::enroll::read_code(args.code_file.as_deref())?;
            let options = EnrollOptions {
                platform: args.platform,
                enroll_address: args.enroll_address,
                server_name: args.server_name,
                ca_file: args.ca,
                terminal_id: args.terminal_id,
                code,
                account: args.account,
            };
            runtime()?.block_on(commands::enroll::run(&place, options, out))
        }
        Command::Request(args) => {
            let (nfc, wait) = args.link.settings(args.role)?;
            let options = RequestOptions {
                amount: args.amount,
                currency: args.currency,
                description: args.description,
                kind: args.kind.into(),
                nfc,
                wait,
                save_half: args.link.save_half,
            };
            runtime()?.block_on(commands::request::run(&place, options, out))
        }
        Command::Pay(args) => {
            let (nfc, wait) = args.link.settings(args.role)?;
            let options = PayOptions {
                nfc,
                yes: args.yes,
                max_amount: args.max_amount,
                wait,
                save_half: args.link.save_half,
            };
            runtime()?.block_on(commands::pay::run(&place, options, out))
        }
        Command::Resend { file, tamper } => {
            runtime()?.block_on(commands::resend::run(&place, &file, tamper, out))
        }
    }
}

/// Installs the stderr log: `NFCPAY_LOG` (an `EnvFilter`), default `warn`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NFCPAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime, AgentError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| AgentError::internal_caused("tokio runtime", error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn the_help_shows_a_working_enroll_and_says_the_amount_unit() {
        use clap::CommandFactory;
        let enroll_example = LONG_ABOUT
            .split("\n\n")
            .find(|paragraph| paragraph.contains(" enroll "))
            .expect("an enroll example");
        assert!(
            enroll_example.contains("--enroll-address"),
            "{enroll_example}"
        );
        let mut cli = Cli::command();
        let amount = cli
            .find_subcommand_mut("request")
            .and_then(|request| {
                request
                    .get_arguments()
                    .find(|argument| argument.get_id() == "amount")
                    .and_then(|argument| argument.get_help())
                    .map(ToString::to_string)
            })
            .expect("request --amount has help");
        assert!(amount.contains("major unit"), "{amount}");
        assert!(!amount.contains("minor unit (`12.50`)"), "{amount}");
    }

    #[test]
    fn enroll_needs_exactly_one_code_source() {
        let base = [
            "nfcpay-agent",
            "enroll",
            "--platform",
            "h:1",
            "--server-name",
            "h",
            "--ca",
            "ca.pem",
            "--terminal-id",
            "t-1",
        ];
        assert!(Cli::try_parse_from(base).is_err());
        let with_both = [&base[..], &["--code-stdin", "--code-file", "c"]].concat();
        assert!(Cli::try_parse_from(with_both).is_err());
        let with_file = [&base[..], &["--code-file", "c"]].concat();
        assert!(Cli::try_parse_from(with_file).is_ok());
    }

    #[test]
    fn roles_default_to_payee_initiator_and_payer_target() {
        let request = Cli::try_parse_from([
            "nfcpay-agent",
            "request",
            "--amount",
            "1.00",
            "--currency",
            "EUR",
            "--device",
            "x",
        ]);
        assert!(matches!(
            request.map(|cli| cli.command),
            Ok(Command::Request(RequestArgs {
                role: RoleArg::Initiator,
                ..
            }))
        ));
        let pay = Cli::try_parse_from(["nfcpay-agent", "pay", "--device", "x", "--yes"]);
        assert!(matches!(
            pay.map(|cli| cli.command),
            Ok(Command::Pay(PayArgs {
                role: RoleArg::Target,
                yes: true,
                ..
            }))
        ));
    }

    #[test]
    fn a_wait_above_the_platform_limit_is_a_usage_error() {
        let Ok(cli) =
            Cli::try_parse_from(["nfcpay-agent", "pay", "--device", "x", "--wait-ms", "10001"])
        else {
            panic!("parses");
        };
        let Command::Pay(args) = cli.command else {
            panic!("pay");
        };
        assert!(matches!(
            args.link.settings(args.role),
            Err(AgentError::Usage(_))
        ));
    }

    #[test]
    fn attempts_out_of_bounds_are_usage_errors() {
        for (args, ok) in [
            (&["pending", "--attempts", "0"][..], false),
            (&["pending", "--attempts", "11"][..], false),
            (&["pending", "--attempts", "10", "--resend"][..], true),
            (&["pending", "--wait-ms", "10001"][..], false),
            (&["pay", "--device", "x", "--attempts", "0"][..], false),
            (&["pay", "--device", "x", "--attempts", "3"][..], true),
        ] {
            let cli = Cli::try_parse_from([&["nfcpay-agent"][..], args].concat())
                .unwrap_or_else(|error| panic!("{args:?}: {error}"));
            let checked = match cli.command {
                Command::Pending(args) => args.wait().map(|_| ()),
                Command::Pay(args) => args.link.settings(args.role).map(|_| ()),
                _ => panic!("{args:?}"),
            };
            assert_eq!(checked.is_ok(), ok, "{args:?}");
            if let Err(error) = checked {
                assert_eq!(error.exit_code(), 64, "{args:?}");
            }
        }
    }

    #[test]
    fn status_takes_a_transaction_id_and_refuses_a_malformed_one() {
        let cli = Cli::try_parse_from([
            "nfcpay-agent",
            "status",
            "--txn",
            "0123456789ABCDEF0123456789ABCDEF",
        ]);
        assert!(matches!(
            cli.map(|cli| cli.command),
            Ok(Command::Status { txn: Some(_) })
        ));
        for malformed in ["xyz", "00000000000000000000000000000000", "0123"] {
            assert!(
                Cli::try_parse_from(["nfcpay-agent", "status", "--txn", malformed]).is_err(),
                "{malformed}"
            );
        }
    }

    #[test]
    fn the_error_chain_shows_each_cause_once() {
        let inner = std::io::Error::other("disk full");
        let error = AgentError::File {
            path: "f".into(),
            action: "write",
            source: inner,
        };
        assert_eq!(
            nfcpay_protocol::ErrorChain(&error).to_string(),
            "f: cannot write: disk full"
        );
    }
}
