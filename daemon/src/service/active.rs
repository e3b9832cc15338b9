//! A short-lived memory of terminals found active, so that a terminal paying steadily costs
//! no database read before its half is verified.
//!
//! Only the pre-check of protocol §6.1 steps 3–4 uses it (refuse early, before any HSM work):
//! the ledger checks the terminal's state again, authoritatively, in the same transaction that
//! records the half, so a terminal suspended a moment ago is still refused
//! (`terminal-suspended`), only after its half was verified. Only active terminals are
//! remembered, so a reactivated terminal is admitted at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nfcpay_protocol::{InitialKeyId, TerminalId};

/// How long a terminal found active is taken as active without asking the ledger.
pub const ACTIVE_TERMINAL_TTL: Duration = Duration::from_secs(1);
/// Most terminals remembered; when full, the memory is emptied (it refills in a second).
pub const ACTIVE_TERMINALS_MAX: usize = 65_536;

/// Terminals recently found active, with their initial key IDs.
#[derive(Debug, Default)]
pub struct ActiveTerminals {
    entries: Mutex<HashMap<TerminalId, (InitialKeyId, Instant)>>,
}

impl ActiveTerminals {
    /// The initial key ID of `terminal` if it was found active within the TTL.
    pub fn get(&self, terminal: &TerminalId, now: Instant) -> Option<InitialKeyId> {
        let entries = self.lock();
        let (initial_key_id, seen) = entries.get(terminal)?;
        (now.saturating_duration_since(*seen) < ACTIVE_TERMINAL_TTL).then_some(*initial_key_id)
    }

    /// Remembers that `terminal` was found active at `now`.
    pub fn put(&self, terminal: &TerminalId, initial_key_id: InitialKeyId, now: Instant) {
        let mut entries = self.lock();
        if entries.len() >= ACTIVE_TERMINALS_MAX && !entries.contains_key(terminal) {
            entries.clear();
        }
        entries.insert(terminal.clone(), (initial_key_id, now));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TerminalId, (InitialKeyId, Instant)>> {
        // A panic while holding this lock leaves only a cache behind: keep using it.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_the_ttl() {
        let terminals = ActiveTerminals::default();
        let terminal: TerminalId = "term-1".parse().unwrap();
        let initial_key_id: InitialKeyId = "12345678AABBCCDD".parse().unwrap();
        let start = Instant::now();
        assert_eq!(terminals.get(&terminal, start), None);
        terminals.put(&terminal, initial_key_id, start);
        assert_eq!(terminals.get(&terminal, start), Some(initial_key_id));
        let later = start + ACTIVE_TERMINAL_TTL;
        assert_eq!(terminals.get(&terminal, later), None);
    }

    #[test]
    fn a_full_memory_starts_afresh() {
        let terminals = ActiveTerminals::default();
        let initial_key_id: InitialKeyId = "12345678AABBCCDD".parse().unwrap();
        let now = Instant::now();
        for index in 0..ACTIVE_TERMINALS_MAX {
            let terminal: TerminalId = format!("t-{index}").parse().unwrap();
            terminals.put(&terminal, initial_key_id, now);
        }
        let first: TerminalId = "t-0".parse().unwrap();
        assert!(terminals.get(&first, now).is_some());
        let one_more: TerminalId = "t-extra".parse().unwrap();
        terminals.put(&one_more, initial_key_id, now);
        assert!(terminals.get(&first, now).is_none());
        assert!(terminals.get(&one_more, now).is_some());
    }
}
