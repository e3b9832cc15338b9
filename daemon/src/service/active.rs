//! A short-lived memory of terminals found active, so that a terminal paying steadily costs
//! no database read before its half is verified.
//!
//! Only the pre-check of protocol §6.1 steps 3–4 uses it (refuse early, before any HSM work):
//! the ledger checks the terminal's state and enrolled certificate again, authoritatively, in
//! the same transaction that records the half, so a terminal suspended (or re-enrolled, its
//! old certificate superseded) a moment ago is still refused (`terminal-suspended`,
//! `terminal-mismatch`), only after its half was verified. Only active terminals are
//! remembered, so a reactivated terminal is admitted at once; an enrollment by this daemon
//! forgets the terminal at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nfcpay_protocol::{InitialKeyId, TerminalId};

use crate::pki::CertificateSerial;

/// How long a terminal found active is taken as active without asking the ledger.
pub const ACTIVE_TERMINAL_TTL: Duration = Duration::from_secs(1);
/// Most terminals remembered; when full, the memory is emptied (it refills in a second).
pub const ACTIVE_TERMINALS_MAX: usize = 65_536;

/// What the pre-check needs of a terminal found active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveTerminal {
    /// Its DUKPT initial key ID: a half's KSN must name it.
    pub initial_key_id: InitialKeyId,
    /// The serial of the client certificate issued at its enrollment (`None`: none readable,
    /// so no certificate is its).
    pub certificate_serial: Option<CertificateSerial>,
}

/// Terminals recently found active, with their initial key IDs and certificate serials.
#[derive(Debug, Default)]
pub struct ActiveTerminals {
    entries: Mutex<HashMap<TerminalId, (ActiveTerminal, Instant)>>,
}

impl ActiveTerminals {
    /// `terminal` as found active within the TTL, if it was.
    pub fn get(&self, terminal: &TerminalId, now: Instant) -> Option<ActiveTerminal> {
        let entries = self.lock();
        let (active, seen) = entries.get(terminal)?;
        (now.saturating_duration_since(*seen) < ACTIVE_TERMINAL_TTL).then_some(*active)
    }

    /// Remembers that `terminal` was found active at `now`.
    pub fn put(&self, terminal: &TerminalId, active: ActiveTerminal, now: Instant) {
        let mut entries = self.lock();
        if entries.len() >= ACTIVE_TERMINALS_MAX && !entries.contains_key(terminal) {
            entries.clear();
        }
        entries.insert(terminal.clone(), (active, now));
    }

    /// Forgets `terminal` (it enrolled: its certificate changed).
    pub fn forget(&self, terminal: &TerminalId) {
        self.lock().remove(terminal);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TerminalId, (ActiveTerminal, Instant)>> {
        // A panic while holding this lock leaves only a cache behind: keep using it.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active() -> ActiveTerminal {
        ActiveTerminal {
            initial_key_id: "12345678AABBCCDD".parse().unwrap(),
            certificate_serial: Some("40112233445566778899aabbccddeeff".parse().unwrap()),
        }
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let terminals = ActiveTerminals::default();
        let terminal: TerminalId = "term-1".parse().unwrap();
        let start = Instant::now();
        assert_eq!(terminals.get(&terminal, start), None);
        terminals.put(&terminal, active(), start);
        assert_eq!(terminals.get(&terminal, start), Some(active()));
        let later = start + ACTIVE_TERMINAL_TTL;
        assert_eq!(terminals.get(&terminal, later), None);
    }

    #[test]
    fn a_forgotten_terminal_is_asked_for_again() {
        let terminals = ActiveTerminals::default();
        let terminal: TerminalId = "term-1".parse().unwrap();
        let other: TerminalId = "term-2".parse().unwrap();
        let now = Instant::now();
        terminals.put(&terminal, active(), now);
        terminals.put(&other, active(), now);
        terminals.forget(&terminal);
        assert_eq!(terminals.get(&terminal, now), None);
        assert_eq!(terminals.get(&other, now), Some(active()));
    }

    #[test]
    fn a_full_memory_starts_afresh() {
        let terminals = ActiveTerminals::default();
        let now = Instant::now();
        for index in 0..ACTIVE_TERMINALS_MAX {
            let terminal: TerminalId = format!("t-{index}").parse().unwrap();
            terminals.put(&terminal, active(), now);
        }
        let first: TerminalId = "t-0".parse().unwrap();
        assert!(terminals.get(&first, now).is_some());
        let one_more: TerminalId = "t-extra".parse().unwrap();
        terminals.put(&one_more, active(), now);
        assert!(terminals.get(&first, now).is_none());
        assert!(terminals.get(&one_more, now).is_some());
    }
}
