//! A bounded pool of logged-in PKCS#11 sessions, each used by one thread at a time.
//!
//! A caller checks a session out, uses it, and the guard gives it back on drop. When every
//! session is in use, callers wait — at most [`SESSION_WAIT`], and at most
//! [`SESSION_WAITERS_MAX`] of them at once; beyond either limit the call fails with
//! [`KeystoreError::Busy`] (a stalled HSM costs errors, not parked threads). A session that
//! reported a lost session, login, token or device is closed instead of returned; the store
//! then re-opens its token (see the parent module's *Recovery*).

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;

use super::errors::map_error;
use crate::KeystoreError;
use crate::uri::Pkcs11Uri;

/// Most PKCS#11 sessions the pool keeps open (the owner session of cached objects is extra).
pub const SESSIONS_MAX: usize = 4;
/// Longest a caller waits for a free session before the call fails as busy.
pub const SESSION_WAIT: Duration = Duration::from_secs(2);
/// Most callers waiting for a session at once; one more fails as busy at once. As many as the
/// daemon lets halves into its pipeline, so that only a stalled HSM, never load, reaches it.
pub const SESSION_WAITERS_MAX: usize = 256;

/// What opens a logged-in session on the token.
pub(super) struct Connector {
    pub(super) context: Pkcs11,
    /// Read again at each login, so the PIN is in memory only while logging in.
    pub(super) uri: Pkcs11Uri,
}

impl Connector {
    /// Opens a read-write session on `slot` and makes sure the user is logged in.
    pub(super) fn open(&self, slot: Slot) -> Result<Session, KeystoreError> {
        let session = self
            .context
            .open_rw_session(slot)
            .map_err(|error| map_error("C_OpenSession", error))?;
        self.ensure_logged_in(&session)?;
        Ok(session)
    }

    /// Logs the user in unless the application already is (login is per application: one
    /// login covers every session, and is lost when the last session closes or on logout).
    pub(super) fn ensure_logged_in(&self, session: &Session) -> Result<(), KeystoreError> {
        let info = session
            .get_session_info()
            .map_err(|error| map_error("C_GetSessionInfo", error))?;
        if matches!(
            info.session_state(),
            SessionState::RwUser | SessionState::RoUser
        ) {
            return Ok(());
        }
        // Dropped (and zeroized) at the end of this function, right after the login.
        let pin = self.uri.read_pin()?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => Ok(()),
            Err(error) => Err(map_error("C_Login", error)),
        }
    }
}

/// The pool: idle sessions, how many are open in all, and how many callers wait.
pub(super) struct SessionPool {
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Session>,
    open: usize,
    waiting: usize,
}

impl SessionPool {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(PoolState {
                idle: Vec::with_capacity(SESSIONS_MAX),
                open: 0,
                waiting: 0,
            }),
            returned: Condvar::new(),
        }
    }

    /// Runs `work` with a pooled session of `slot` (opened through `connector` if none is
    /// idle); a result that says the session, token or device went away retires the session.
    pub(super) fn with_session<T>(
        &self,
        connector: &Connector,
        slot: Slot,
        work: impl FnOnce(&Session) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        let mut pooled = self.checkout(connector, slot)?;
        let result = work(pooled.session());
        if let Err(error) = &result
            && matches!(
                error,
                KeystoreError::SessionLost { .. } | KeystoreError::Device { .. }
            )
        {
            tracing::warn!(%error, "PKCS#11 session retired");
            pooled.lost = true;
        }
        result
    }

    /// Closes every idle session. Called while no session is checked out (the store holds
    /// its gate exclusively), before the module is finalised.
    pub(super) fn close_all(&self) {
        let idle = {
            let mut state = self.lock();
            state.open -= state.idle.len();
            std::mem::take(&mut state.idle)
        };
        // Closed outside the lock; errors closing sessions of a lost token are expected.
        drop(idle);
        self.returned.notify_all();
    }

    fn checkout(
        &self,
        connector: &Connector,
        slot: Slot,
    ) -> Result<PooledSession<'_>, KeystoreError> {
        let deadline = Instant::now() + SESSION_WAIT;
        let mut state = self.lock();
        loop {
            if let Some(session) = state.idle.pop() {
                return Ok(PooledSession {
                    pool: self,
                    session: Some(session),
                    lost: false,
                });
            }
            if state.open < SESSIONS_MAX {
                state.open += 1;
                break;
            }
            if state.waiting >= SESSION_WAITERS_MAX {
                return Err(KeystoreError::Busy {
                    what: "too many callers already wait for an HSM session",
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(KeystoreError::Busy {
                    what: "no HSM session became free in time",
                });
            }
            state.waiting += 1;
            let (next, _) = self
                .returned
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner);
            state = next;
            state.waiting -= 1;
        }
        drop(state);
        match connector.open(slot) {
            Ok(session) => Ok(PooledSession {
                pool: self,
                session: Some(session),
                lost: false,
            }),
            Err(error) => {
                self.lock().open -= 1;
                self.returned.notify_one();
                Err(error)
            }
        }
    }

    /// The state is consistent whenever the lock is released (no panics while held).
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A checked-out session, given back (or closed, when lost) on drop.
struct PooledSession<'p> {
    pool: &'p SessionPool,
    session: Option<Session>,
    lost: bool,
}

impl PooledSession<'_> {
    fn session(&self) -> &Session {
        // `session` is `Some` from checkout until `drop` takes it.
        self.session
            .as_ref()
            .unwrap_or_else(|| unreachable!("pooled session taken before drop"))
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if self.lost {
            self.pool.lock().open -= 1;
            // Closed outside the lock; a close error on a lost session is expected.
            drop(session);
        } else {
            self.pool.lock().idle.push(session);
        }
        self.pool.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool whose every session is checked out, with `waiting` callers already waiting.
    /// Nothing here calls into the module (checkout opens a session only below the cap), so
    /// the module is only loaded, never initialised.
    fn full_pool(waiting: usize) -> (SessionPool, Connector) {
        let pool = SessionPool::new();
        {
            let mut state = pool.lock();
            state.open = SESSIONS_MAX;
            state.waiting = waiting;
        }
        let connector = Connector {
            context: Pkcs11::new("/usr/lib/softhsm/libsofthsm2.so").unwrap(),
            uri: "pkcs11:token=unused?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/nonexistent"
                .parse()
                .unwrap(),
        };
        (pool, connector)
    }

    #[test]
    fn a_caller_waits_for_a_session_only_so_long() {
        let (pool, connector) = full_pool(0);
        let slot = Slot::try_from(0_u64).unwrap();
        let result = pool.with_session(&connector, slot, |_| Ok(()));
        assert!(matches!(
            result,
            Err(KeystoreError::Busy {
                what: "no HSM session became free in time"
            })
        ));
        assert_eq!(pool.lock().waiting, 0);
    }

    #[test]
    fn callers_beyond_the_waiting_limit_are_refused_at_once() {
        let (pool, connector) = full_pool(SESSION_WAITERS_MAX);
        let slot = Slot::try_from(0_u64).unwrap();
        let result = pool.with_session(&connector, slot, |_| Ok(()));
        let Err(error) = result else {
            panic!("a session from a full pool")
        };
        assert!(error.is_unavailable());
        assert!(matches!(
            error,
            KeystoreError::Busy {
                what: "too many callers already wait for an HSM session"
            }
        ));
    }
}
