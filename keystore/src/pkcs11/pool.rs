//! A bounded pool of logged-in PKCS#11 sessions, each used by one thread at a time.
//!
//! A caller checks a session out, uses it, and the guard gives it back on drop. When every
//! session is in use, callers wait (the methods of the store are blocking; async callers run
//! them on blocking threads). A session that reported a lost session, login or token is marked
//! lost and closed instead of returned; the next checkout opens a new one and logs in again.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use cryptoki::context::Pkcs11;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;

use super::errors::map_error;
use crate::KeystoreError;
use crate::uri::Pkcs11Uri;

/// Most PKCS#11 sessions the pool keeps open (the owner session of cached objects is extra).
pub const SESSIONS_MAX: usize = 4;

/// What opens a logged-in session on the token.
pub(super) struct Connector {
    pub(super) context: Pkcs11,
    pub(super) slot: Slot,
    /// Read again at each login, so the PIN is in memory only while logging in.
    pub(super) uri: Pkcs11Uri,
}

impl Connector {
    /// Opens a read-write session and makes sure the user is logged in.
    pub(super) fn open(&self) -> Result<Session, KeystoreError> {
        let session = self
            .context
            .open_rw_session(self.slot)
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

/// The pool: idle sessions and how many are open in all.
pub(super) struct SessionPool {
    connector: Connector,
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Session>,
    open: usize,
}

impl SessionPool {
    pub(super) fn new(connector: Connector) -> Self {
        Self {
            connector,
            state: Mutex::new(PoolState {
                idle: Vec::with_capacity(SESSIONS_MAX),
                open: 0,
            }),
            returned: Condvar::new(),
        }
    }

    pub(super) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Runs `work` with a pooled session; a [`KeystoreError::SessionLost`] result retires the
    /// session so that the next call opens a fresh one.
    pub(super) fn with_session<T>(
        &self,
        work: impl FnOnce(&Session) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        let mut pooled = self.checkout()?;
        let result = work(pooled.session());
        if let Err(KeystoreError::SessionLost { function, code }) = &result {
            tracing::warn!(function, code, "PKCS#11 session lost; it will be reopened");
            pooled.lost = true;
        }
        result
    }

    fn checkout(&self) -> Result<PooledSession<'_>, KeystoreError> {
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
            state = self
                .returned
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(state);
        match self.connector.open() {
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
