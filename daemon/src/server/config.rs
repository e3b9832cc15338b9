//! The `[server]` section: listener addresses, certificate files and every limit of the front
//! end, each a named constant that the configuration may override. [`ServerConfig::validate`]
//! runs before any port is bound.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ServerError;

/// Largest request body, in bytes (docs/protocol.md §9).
pub const BODY_BYTES_MAX: usize = 4096;
/// Largest request head (request line and headers), in bytes; hyper's smallest read buffer.
pub const HEAD_BYTES_MAX: usize = 8192;
/// Most header fields in one request.
pub const HEADERS_MAX: usize = 32;
/// Time a client has for the TLS handshake, from the moment it is accepted.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Time a client has to send a whole request head, from its first byte (or from the end of the
/// handshake for a connection's first request).
pub const HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Time a client has to send a whole body, from the end of the head.
pub const BODY_READ_TIMEOUT_MS: u64 = 10_000;
/// Time an authenticated connection may stay open between requests.
pub const KEEP_ALIVE_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Time in-flight requests have to finish after a shutdown is asked for.
pub const DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Most open TLS connections on the terminal listener; further terminals wait in its listen
/// backlog. The enrollment listener has its own cap, so nobody who can only reach that one can
/// take a terminal's place.
pub const CONNECTIONS_MAX: usize = 1024;
/// Most open TLS connections on the enrollment listener; further enrollees wait in its listen
/// backlog. Enrollment is rare (once per terminal) and each connection carries one request.
pub const ENROLLMENT_CONNECTIONS_MAX: usize = 64;
/// Most open connections on the terminal listener from one address (an IPv4 address, an IPv6
/// /64): the terminals of one shop behind one NAT fit, one host cannot take the listener.
pub const CONNECTIONS_PER_ADDRESS_MAX: usize = 256;
/// Most open connections on the enrollment listener from one address (IPv4, IPv6 /64).
pub const ENROLLMENT_CONNECTIONS_PER_ADDRESS_MAX: usize = 8;
/// Most open connections on the operations listener.
pub const OPS_CONNECTIONS_MAX: usize = 16;
/// Sustained requests per second allowed to one terminal.
pub const TERMINAL_REQUESTS_PER_SECOND: u32 = 50;
/// Requests one terminal may send at once after being quiet.
pub const TERMINAL_REQUEST_BURST: u32 = 100;
/// Sustained enrollment requests per second allowed from one IP address.
pub const ENROLLMENT_REQUESTS_PER_SECOND: u32 = 1;
/// Enrollment requests one IP address may send at once after being quiet.
pub const ENROLLMENT_REQUEST_BURST: u32 = 5;
/// Most terminals (or addresses) whose request rate is remembered at once.
pub const RATE_LIMITER_ENTRIES_MAX: usize = 100_000;
/// Longest a client may ask the platform to hold a pending answer (docs/protocol.md §6.2).
pub use nfcpay_protocol::api::WAIT_MS_MAX;

/// Longest any configured timeout may be: a typo of a few zeros should not disable a limit.
const TIMEOUT_MS_CEILING: u64 = 3_600_000;
/// Largest body the configuration may allow.
const BODY_BYTES_CEILING: usize = 65_536;
/// Most connections the configuration may allow.
const CONNECTIONS_CEILING: usize = 65_536;

/// The front end's settings (`[server]`); every field has a default.
/// Serializable too, so the effective settings can be shown.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Terminal listener (HTTPS, mutual TLS 1.3: a client certificate from the terminal CA is
    /// required in the handshake).
    pub listen: SocketAddr,
    /// Enrollment listener (HTTPS, TLS 1.3, no client certificate): `POST /v1/enroll` only.
    pub enroll_listen: SocketAddr,
    /// Operations listener (plain HTTP: `/metrics`, `/healthz`, `/readyz`); loopback only.
    pub ops_listen: SocketAddr,
    /// The server's certificate chain, PEM, leaf first. Its private key is not a file: it
    /// stays in the keystore.
    pub certificate_chain: PathBuf,
    /// The platform's terminal CA certificate(s), PEM: client certificates must chain to one.
    pub client_ca: PathBuf,
    /// Largest request body, in bytes.
    pub body_bytes_max: usize,
    /// See [`TLS_HANDSHAKE_TIMEOUT_MS`].
    pub tls_handshake_timeout_ms: u64,
    /// See [`HEADER_READ_TIMEOUT_MS`].
    pub header_read_timeout_ms: u64,
    /// See [`BODY_READ_TIMEOUT_MS`].
    pub body_read_timeout_ms: u64,
    /// See [`KEEP_ALIVE_IDLE_TIMEOUT_MS`].
    pub keep_alive_idle_timeout_ms: u64,
    /// See [`DRAIN_TIMEOUT_MS`].
    pub drain_timeout_ms: u64,
    /// See [`CONNECTIONS_MAX`] (terminal listener).
    pub connections_max: usize,
    /// See [`ENROLLMENT_CONNECTIONS_MAX`].
    pub enrollment_connections_max: usize,
    /// See [`CONNECTIONS_PER_ADDRESS_MAX`].
    pub connections_per_address_max: usize,
    /// See [`ENROLLMENT_CONNECTIONS_PER_ADDRESS_MAX`].
    pub enrollment_connections_per_address_max: usize,
    /// See [`TERMINAL_REQUESTS_PER_SECOND`].
    pub terminal_requests_per_second: u32,
    /// See [`TERMINAL_REQUEST_BURST`].
    pub terminal_request_burst: u32,
    /// See [`ENROLLMENT_REQUESTS_PER_SECOND`].
    pub enrollment_requests_per_second: u32,
    /// See [`ENROLLMENT_REQUEST_BURST`].
    pub enrollment_request_burst: u32,
    /// See [`RATE_LIMITER_ENTRIES_MAX`].
    pub rate_limiter_entries_max: usize,
    /// Largest `wait_ms` honoured; larger requests are capped to it. At most [`WAIT_MS_MAX`].
    pub wait_ms_max: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8443),
            enroll_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8444),
            ops_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9443),
            certificate_chain: PathBuf::from("/var/lib/nfcpay/pki/server.pem"),
            client_ca: PathBuf::from("/var/lib/nfcpay/pki/ca.pem"),
            body_bytes_max: BODY_BYTES_MAX,
            tls_handshake_timeout_ms: TLS_HANDSHAKE_TIMEOUT_MS,
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS,
            body_read_timeout_ms: BODY_READ_TIMEOUT_MS,
            keep_alive_idle_timeout_ms: KEEP_ALIVE_IDLE_TIMEOUT_MS,
            drain_timeout_ms: DRAIN_TIMEOUT_MS,
            connections_max: CONNECTIONS_MAX,
            enrollment_connections_max: ENROLLMENT_CONNECTIONS_MAX,
            connections_per_address_max: CONNECTIONS_PER_ADDRESS_MAX,
            enrollment_connections_per_address_max: ENROLLMENT_CONNECTIONS_PER_ADDRESS_MAX,
            terminal_requests_per_second: TERMINAL_REQUESTS_PER_SECOND,
            terminal_request_burst: TERMINAL_REQUEST_BURST,
            enrollment_requests_per_second: ENROLLMENT_REQUESTS_PER_SECOND,
            enrollment_request_burst: ENROLLMENT_REQUEST_BURST,
            rate_limiter_entries_max: RATE_LIMITER_ENTRIES_MAX,
            wait_ms_max: WAIT_MS_MAX,
        }
    }
}

impl ServerConfig {
    /// Checks every setting; run before any port is bound. A refusal names the setting.
    pub fn validate(&self) -> Result<(), ServerError> {
        let invalid =
            |setting: &'static str, reason: String| Err(ServerError::Config { setting, reason });
        if !self.ops_listen.ip().is_loopback() {
            return invalid(
                "ops_listen",
                format!(
                    "{} is not a loopback address: the operations listener is plain HTTP and local only",
                    self.ops_listen
                ),
            );
        }
        // Each pair once; the second of a pair is the setting named in a refusal.
        for (first, (setting, second)) in [
            (
                ("listen", self.listen),
                ("enroll_listen", self.enroll_listen),
            ),
            (("listen", self.listen), ("ops_listen", self.ops_listen)),
            (
                ("enroll_listen", self.enroll_listen),
                ("ops_listen", self.ops_listen),
            ),
        ] {
            if overlaps(first.1, second) {
                return invalid(
                    setting,
                    format!("{second} overlaps {} = {}", first.0, first.1),
                );
            }
        }
        if !(1..=BODY_BYTES_CEILING).contains(&self.body_bytes_max) {
            return invalid(
                "body_bytes_max",
                format!("must be 1 to {BODY_BYTES_CEILING}"),
            );
        }
        for (setting, value) in [
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            (
                "keep_alive_idle_timeout_ms",
                self.keep_alive_idle_timeout_ms,
            ),
            ("drain_timeout_ms", self.drain_timeout_ms),
        ] {
            if !(1..=TIMEOUT_MS_CEILING).contains(&value) {
                return invalid(setting, format!("must be 1 to {TIMEOUT_MS_CEILING} ms"));
            }
        }
        for (setting, value) in [
            ("connections_max", self.connections_max),
            (
                "enrollment_connections_max",
                self.enrollment_connections_max,
            ),
            (
                "connections_per_address_max",
                self.connections_per_address_max,
            ),
            (
                "enrollment_connections_per_address_max",
                self.enrollment_connections_per_address_max,
            ),
        ] {
            if !(1..=CONNECTIONS_CEILING).contains(&value) {
                return invalid(setting, format!("must be 1 to {CONNECTIONS_CEILING}"));
            }
        }
        for (setting, value) in [
            (
                "terminal_requests_per_second",
                self.terminal_requests_per_second,
            ),
            ("terminal_request_burst", self.terminal_request_burst),
            (
                "enrollment_requests_per_second",
                self.enrollment_requests_per_second,
            ),
            ("enrollment_request_burst", self.enrollment_request_burst),
        ] {
            if value == 0 {
                return invalid(setting, "must be at least 1".to_owned());
            }
        }
        if self.rate_limiter_entries_max == 0 {
            return invalid("rate_limiter_entries_max", "must be at least 1".to_owned());
        }
        if self.wait_ms_max > WAIT_MS_MAX {
            return invalid("wait_ms_max", format!("must be at most {WAIT_MS_MAX}"));
        }
        Ok(())
    }

    pub(crate) fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }

    pub(crate) fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub(crate) fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    pub(crate) fn keep_alive_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.keep_alive_idle_timeout_ms)
    }

    pub(crate) fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// Whether binding `first` and `second` would collide: the same fixed port on the same
/// address, or on any address when either is a wildcard. Port 0 (the system picks) never does.
fn overlaps(first: SocketAddr, second: SocketAddr) -> bool {
    first.port() != 0
        && first.port() == second.port()
        && (first.ip() == second.ip()
            || first.ip().is_unspecified()
            || second.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_constants() {
        let config = ServerConfig::default();
        config.validate().unwrap();
        assert_eq!(config.body_bytes_max, 4096);
        assert_eq!(config.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(config.enroll_listen.to_string(), "0.0.0.0:8444");
        assert_eq!(config.ops_listen.to_string(), "127.0.0.1:9443");
    }

    #[test]
    fn refuses_each_bad_setting_by_name() {
        type Change = fn(&mut ServerConfig);
        let cases: [(&str, Change); 15] = [
            ("ops_listen", |c| {
                c.ops_listen = "0.0.0.0:9443".parse().unwrap()
            }),
            ("ops_listen", |c| {
                c.ops_listen = "127.0.0.1:8443".parse().unwrap()
            }),
            ("enroll_listen", |c| {
                c.enroll_listen = "127.0.0.1:8443".parse().unwrap()
            }),
            ("enroll_listen", |c| {
                c.listen = "127.0.0.1:8444".parse().unwrap()
            }),
            ("ops_listen", |c| {
                c.enroll_listen = "0.0.0.0:9443".parse().unwrap()
            }),
            ("body_bytes_max", |c| c.body_bytes_max = 0),
            ("header_read_timeout_ms", |c| c.header_read_timeout_ms = 0),
            ("drain_timeout_ms", |c| {
                c.drain_timeout_ms = TIMEOUT_MS_CEILING + 1
            }),
            ("connections_max", |c| c.connections_max = 0),
            ("enrollment_connections_max", |c| {
                c.enrollment_connections_max = 0
            }),
            ("enrollment_connections_max", |c| {
                c.enrollment_connections_max = CONNECTIONS_CEILING + 1
            }),
            ("connections_per_address_max", |c| {
                c.connections_per_address_max = 0
            }),
            ("enrollment_connections_per_address_max", |c| {
                c.enrollment_connections_per_address_max = CONNECTIONS_CEILING + 1
            }),
            ("terminal_request_burst", |c| c.terminal_request_burst = 0),
            ("wait_ms_max", |c| c.wait_ms_max = WAIT_MS_MAX + 1),
        ];
        for (setting, change) in cases {
            let mut config = ServerConfig::default();
            change(&mut config);
            match config.validate() {
                Err(ServerError::Config { setting: named, .. }) => assert_eq!(named, setting),
                other => panic!("{setting}: {other:?}"),
            }
        }
    }

    #[test]
    fn listeners_on_port_0_or_on_different_addresses_do_not_overlap() {
        let any_port = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            enroll_listen: "127.0.0.1:0".parse().unwrap(),
            ops_listen: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        };
        any_port.validate().unwrap();
        let two_addresses = ServerConfig {
            listen: "192.0.2.1:8443".parse().unwrap(),
            enroll_listen: "192.0.2.2:8443".parse().unwrap(),
            ..ServerConfig::default()
        };
        two_addresses.validate().unwrap();
    }

    #[test]
    fn fills_defaults_and_refuses_unknown_fields() {
        let config: ServerConfig =
            serde_json::from_str(r#"{"listen": "127.0.0.1:0", "body_read_timeout_ms": 250}"#)
                .unwrap();
        assert_eq!(config.body_read_timeout_ms, 250);
        assert_eq!(config.connections_max, CONNECTIONS_MAX);
        assert_eq!(
            config.enrollment_connections_max,
            ENROLLMENT_CONNECTIONS_MAX
        );
        assert!(serde_json::from_str::<ServerConfig>(r#"{"body_limit": 1}"#).is_err());
    }

    #[test]
    fn the_sample_files_server_section_is_valid_and_shows_the_defaults() {
        let sample = include_str!("../../nfcpay.sample.toml");
        let file = config::Config::builder()
            .add_source(config::File::from_str(sample, config::FileFormat::Toml))
            .build()
            .unwrap();
        let server: ServerConfig = file.get("server").unwrap();
        server.validate().unwrap();
        assert_eq!(server, ServerConfig::default());
        // Every setting appears in the sample, commented or not.
        let fields = serde_json::to_value(ServerConfig::default()).unwrap();
        for field in fields.as_object().unwrap().keys() {
            assert!(
                sample.contains(&format!("{field} = ")),
                "{field} missing from the sample"
            );
        }
    }
}
