//! Accepting connections on the two HTTPS listeners (terminal and enrollment): the connection
//! cap, the TLS handshake with its timeout, the header and keep-alive timeouts, and draining on
//! shutdown.
//!
//! # The connection caps
//!
//! Each HTTPS listener has its own cap (`connections_max` for terminals,
//! `enrollment_connections_max` for enrollment) and its own accept loop: whoever can reach only
//! the enrollment port, unauthenticated, can fill that cap and no other. A permit of the
//! listener's [`Semaphore`] is taken *before* `accept` (as in mini-redis): when all permits are
//! in use the daemon stops accepting on that listener, further clients wait in the kernel's
//! listen backlog (their TCP handshake completes, their TLS handshake does not start), and each
//! is accepted as soon as an open connection closes. Once a backlog is full the kernel drops
//! new SYNs and clients retry. Nothing is allocated for a waiting client.
//!
//! Within a cap, one client address ([`ClientAddress`]: an IPv4 address, an IPv6 /64) may hold
//! at most its share (`connections_per_address_max`, `enrollment_connections_per_address_max`);
//! a connection beyond it is closed at accept, before any TLS work. And when fewer than an
//! eighth of a listener's connections are free, the listener is *crowded*: a connection idle
//! between requests then gets the header timeout instead of the keep-alive one, and the
//! connection that tips a listener over wakes the idle ones, so those idle longer than that
//! close and free slots for newcomers.
//!
//! # Timeouts (all configurable)
//!
//! - TLS handshake: from accept to a completed handshake.
//! - Request head: a connection's first request head must be complete within the header
//!   timeout of the handshake's end; a later one within the header timeout of its first byte.
//! - Keep-alive idle: between the end of an answer and the first byte of the next request.
//! - Body: see `routes` (answered `408 timeout`).
//!
//! A connection that runs out of a handshake, head or idle time is closed without an answer.
//!
//! # Before authentication
//!
//! Until its handshake completes, a client can make the daemon hold at most one TLS handshake
//! message (rustls refuses larger than 64 KiB) for at most the handshake timeout. On the
//! terminal listener that is all: the handshake fails without a client certificate from the
//! terminal CA, so every HTTP request there comes from a terminal. On the enrollment listener,
//! where nobody is authenticated, a client then gets one request — a head of at most
//! `HEAD_BYTES_MAX` and a body of at most `body_bytes_max` — and the connection closes after
//! the answer.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::address::{AddressShare, AddressShares, ClientAddress};
use super::config::{HEAD_BYTES_MAX, HEADERS_MAX, ServerConfig};
use super::metrics::TimeoutLabel;
use super::tls::{self, TlsReloader};
use super::{Api, Shared, routes};
use crate::pki::ClientTerminal;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE_MS: u64 = 100;

/// The limits of one accept loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most open connections across the loop's listeners.
    pub(crate) connections_max: usize,
    /// Most open connections from one [`ClientAddress`] (an IPv4 address, an IPv6 /64).
    pub(crate) per_address_max: usize,
}

/// What an open connection holds of its listener's capacity: a slot of the cap and a part of
/// its address's share (both given back when dropped), and a view of how crowded the listener
/// is.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    _share: AddressShare,
    /// Whether the listener is short of free slots.
    pub(crate) crowding: Crowding,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.crowding.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a listener is crowded: fewer than an eighth of its slots free. Then a connection
/// idle between requests gets the (short) header timeout instead of the keep-alive one, so
/// that idle connections cannot keep the listener full.
///
/// Open connections are counted here rather than read off the semaphore, which always has one
/// more permit taken while the accept loop waits for the next client.
#[derive(Debug, Clone)]
pub(crate) struct Crowding {
    open: Arc<AtomicUsize>,
    connections_max: usize,
    spare_min: usize,
    became_crowded: watch::Receiver<()>,
}

impl Crowding {
    fn new(connections_max: usize) -> (Self, watch::Sender<()>) {
        let (sender, became_crowded) = watch::channel(());
        let crowding = Self {
            open: Arc::new(AtomicUsize::new(0)),
            connections_max,
            spare_min: (connections_max / 8).max(1),
            became_crowded,
        };
        (crowding, sender)
    }

    /// A slot for one more open connection, counted until dropped.
    fn slot(&self, permit: OwnedSemaphorePermit, share: AddressShare) -> Slot {
        self.open.fetch_add(1, Ordering::Relaxed);
        Slot {
            _permit: permit,
            _share: share,
            crowding: self.clone(),
        }
    }

    /// Whether fewer than an eighth of the listener's slots are free now.
    pub(crate) fn is_crowded(&self) -> bool {
        let open = self.open.load(Ordering::Relaxed);
        self.connections_max.saturating_sub(open) < self.spare_min
    }

    /// Completes when the listener has just become crowded.
    pub(crate) async fn became_crowded(&mut self) {
        if self.became_crowded.changed().await.is_err() {
            // The accept loop is gone (draining): nothing will change any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Accepts on `listeners` while `stopped` is false, within `limits`, and runs `serve` for each
/// connection in its own task, told which listener it came on. A connection from an address
/// that has its share open already is closed at once, and `refused` is told. Once stopped,
/// closes the listeners and waits for the tasks until `drain_timeout`, then aborts those left.
///
/// One loop serves every listener that shares a cap: the permit is taken before `accept`, and
/// a loop per listener would sit on a permit while its own listener is quiet.
pub(crate) async fn accept_loop<K, F, Fut, R>(
    listeners: Vec<(TcpListener, K)>,
    limits: Limits,
    drain_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
    mut serve: F,
    refused: R,
) where
    K: Copy + fmt::Display,
    F: FnMut(K, TcpStream, SocketAddr, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn(K, SocketAddr),
{
    assert!(!listeners.is_empty(), "an accept loop needs a listener");
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let shares = AddressShares::new(limits.per_address_max);
    let (crowding, crowded_signal) = Crowding::new(limits.connections_max);
    let mut connections = JoinSet::new();
    let mut first = 0;
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            () = until_stopped(&mut stopped) => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => break,
            },
        };
        // Each round starts at the next listener, so a busy one cannot starve the others.
        first = (first + 1) % listeners.len();
        let (kind, accepted) = tokio::select! {
            biased;
            () = until_stopped(&mut stopped) => break,
            accepted = accept_any(&listeners, first) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let address = ClientAddress::from(peer.ip());
                let Some(share) = shares.claim(address) else {
                    // Closed before any TLS work; the permit goes back at once.
                    refused(kind, peer);
                    continue;
                };
                let was_crowded = crowding.is_crowded();
                connections.spawn(serve(kind, stream, peer, crowding.slot(permit, share)));
                if crowding.is_crowded() && !was_crowded {
                    // This connection tipped the listener over: the idle connections wake
                    // and get the short timeout; those idle longer than it close, and free
                    // slots again.
                    crowded_signal.send_replace(());
                }
            }
            Err(error) => {
                tracing::warn!(listener = %kind, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
            }
        }
    }
    let names = listeners
        .iter()
        .map(|(_, kind)| kind.to_string())
        .collect::<Vec<_>>()
        .join("+");
    drop(listeners);
    drain(connections, drain_timeout, &names).await;
}

/// The next connection (or accept error) on any of `listeners`, looking from `first` on.
async fn accept_any<K: Copy>(
    listeners: &[(TcpListener, K)],
    first: usize,
) -> (K, io::Result<(TcpStream, SocketAddr)>) {
    std::future::poll_fn(|cx| {
        let count = listeners.len();
        for offset in 0..count {
            let (listener, kind) = &listeners[(first + offset) % count];
            if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                return Poll::Ready((*kind, accepted));
            }
        }
        Poll::Pending
    })
    .await
}

/// Completes once `stopped` holds `true` (or its sender is gone, which also means stop).
pub(crate) async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    // The borrow `wait_for` returns is dropped here, never held across an `.await`.
    let _ = stopped.wait_for(|stopped| *stopped).await;
}

async fn drain(mut connections: JoinSet<()>, drain_timeout: Duration, listener_name: &str) {
    let all_done = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_timeout, all_done).await.is_err() {
        tracing::warn!(
            listener = listener_name,
            connections = connections.len(),
            "drain deadline passed: closing connections with requests in flight"
        );
        connections.shutdown().await;
    }
}

/// Which HTTPS listener a connection came in on; it decides the TLS configuration, who the
/// caller can be, and which routes exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// `[server] listen`: a client certificate from the terminal CA is required in the
    /// handshake; the half and transaction routes.
    Terminals,
    /// `[server] enroll_listen`: no client certificate; `POST /v1/enroll` only.
    Enrollment,
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Self::Terminals => "terminals",
            Self::Enrollment => "enrollment",
        }
    }

    fn acceptor(self, tls: &TlsReloader) -> TlsAcceptor {
        match self {
            Self::Terminals => tls.terminal_acceptor(),
            Self::Enrollment => tls.enrollment_acceptor(),
        }
    }
}

/// Who is at the other end of an HTTPS connection, as its listener and handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// On the terminal listener: the terminal its verified client certificate names, and the
    /// certificate's serial.
    Terminal(ClientTerminal),
    /// On the enrollment listener: a client nobody has authenticated.
    Enrollee,
}

impl Caller {
    /// The listener this caller can only have come in on.
    pub(crate) fn listener(&self) -> Listener {
        match self {
            Self::Terminal(_) => Listener::Terminals,
            Self::Enrollee => Listener::Enrollment,
        }
    }
}

/// Serves the terminal and enrollment listeners until stopped, each under its own connection
/// cap.
pub(super) async fn serve_https<A: Api>(
    terminals: TcpListener,
    enrollment: TcpListener,
    shared: Arc<Shared<A>>,
    stopped: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let drain_timeout = config.drain_timeout();
    let serve = |kind, stream, peer, slot| {
        https_connection(
            Arc::clone(&shared),
            kind,
            stream,
            peer,
            stopped.clone(),
            slot,
        )
    };
    let refused = |kind: Listener, peer: SocketAddr| {
        shared.metrics.refused_per_address(kind.name());
        let address = ClientAddress::from(peer.ip());
        // Once per refused connection. On the terminal listener an operator wants to see it
        // (a shop's terminals behind one NAT over their share); on the enrollment listener,
        // open to anyone, a flood would fill the log.
        match kind {
            Listener::Terminals => tracing::info!(
                listener = kind.name(),
                %peer,
                %address,
                reason = "its address has its share of the listener open",
                "connection refused"
            ),
            Listener::Enrollment => tracing::debug!(
                listener = kind.name(),
                %peer,
                %address,
                reason = "its address has its share of the listener open",
                "connection refused"
            ),
        }
    };
    tokio::join!(
        accept_loop(
            vec![(terminals, Listener::Terminals)],
            Limits {
                connections_max: config.connections_max,
                per_address_max: config.connections_per_address_max,
            },
            drain_timeout,
            stopped.clone(),
            serve,
            refused,
        ),
        accept_loop(
            vec![(enrollment, Listener::Enrollment)],
            Limits {
                connections_max: config.enrollment_connections_max,
                per_address_max: config.enrollment_connections_per_address_max,
            },
            drain_timeout,
            stopped.clone(),
            serve,
            refused,
        ),
    );
}

/// What the routes know about the connection a request came on.
#[derive(Debug)]
pub(crate) struct ConnectionContext {
    pub(crate) peer: SocketAddr,
    pub(crate) caller: Caller,
    pub(crate) activity: Arc<Activity>,
    /// Whether the connection may carry another request after this one's answer: terminals
    /// only. When it may not, every answer says `Connection: close`.
    pub(crate) keep_alive: bool,
}

async fn https_connection<A: Api>(
    shared: Arc<Shared<A>>,
    kind: Listener,
    stream: TcpStream,
    peer: SocketAddr,
    mut stopped: watch::Receiver<bool>,
    slot: Slot,
) {
    let _open = shared.metrics.connection_opened(kind.name());
    let mut crowding = slot.crowding.clone();
    // Small answers go out at once; a failure here only costs latency.
    let _ = stream.set_nodelay(true);
    let handshake = tokio::time::timeout(
        shared.config.tls_handshake_timeout(),
        kind.acceptor(&shared.tls).accept(stream),
    );
    let tls_stream = tokio::select! {
        result = handshake => match result {
            Ok(Ok(tls_stream)) => {
                shared.metrics.handshake(kind.name(), "ok");
                tls_stream
            }
            Ok(Err(error)) => {
                shared.metrics.handshake_failed();
                shared.metrics.handshake(kind.name(), "failed");
                // Once per refused connection, with rustls's reason (an alert, a missing or
                // unknown client certificate: never a secret). At info on the terminal
                // listener, where it is a terminal that cannot connect; scanners on the open
                // enrollment listener stay at debug.
                match kind {
                    Listener::Terminals => tracing::info!(
                        %peer,
                        listener = kind.name(),
                        reason = %error,
                        "TLS handshake refused"
                    ),
                    Listener::Enrollment => tracing::debug!(
                        %peer,
                        listener = kind.name(),
                        reason = %error,
                        "TLS handshake refused"
                    ),
                }
                return;
            }
            Err(_) => {
                shared.metrics.handshake_failed();
                shared.metrics.handshake(kind.name(), "timeout");
                shared.metrics.timed_out(TimeoutLabel::Handshake);
                tracing::debug!(%peer, listener = kind.name(), "TLS handshake timed out");
                return;
            }
        },
        () = until_stopped(&mut stopped) => return,
    };
    let caller = match kind {
        Listener::Terminals => match tls::client_terminal(tls_stream.get_ref().1) {
            Ok(terminal) => Caller::Terminal(terminal),
            Err(error) => {
                // The terminal CA signs only certificates that name a terminal: whoever holds
                // this one is no terminal of ours, and gets no answer.
                tracing::warn!(%peer, %error, "client certificate names no valid terminal; closing");
                return;
            }
        },
        Listener::Enrollment => Caller::Enrollee,
    };
    // Only terminals keep connections open: an enrollee gets one answer and the connection
    // closes, so it cannot hold a connection slot idle.
    let keep_alive = matches!(caller, Caller::Terminal(_));
    let activity = Arc::new(Activity::new(Instant::now()));
    let context = Arc::new(ConnectionContext {
        peer,
        caller,
        activity: Arc::clone(&activity),
        keep_alive,
    });
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |request| {
        routes::handle(Arc::clone(&service_shared), Arc::clone(&context), request)
    });
    let io = TokioIo::new(Tracked {
        inner: tls_stream,
        activity: Arc::clone(&activity),
    });
    let connection = http1::Builder::new()
        .keep_alive(keep_alive)
        .max_buf_size(HEAD_BYTES_MAX)
        .max_headers(HEADERS_MAX)
        // The head and idle timeouts are enforced below, with separate lengths.
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let (check_at, _) = activity.deadline(&shared.config, crowding.is_crowded());
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                break;
            }
            () = activity.changed.notified() => {}
            () = crowding.became_crowded() => {}
            () = tokio::time::sleep_until(check_at) => {
                let (deadline, phase) = activity.deadline(&shared.config, crowding.is_crowded());
                if let Some(phase) = phase.filter(|_| deadline <= Instant::now()) {
                    shared.metrics.timed_out(phase);
                    tracing::debug!(%peer, ?phase, "connection too slow; closing");
                    break;
                }
            }
            () = until_stopped(&mut stopped), if !draining => {
                // Finishes the request in flight, if any, then closes.
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// Where a connection is between requests, for the head and idle timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the first byte of a request head since `since`; `first` for the
    /// connection's first request (held to the header timeout, not the idle timeout).
    Idle { since: Instant, first: bool },
    /// A request head has been arriving since `since`.
    Head { since: Instant },
    /// A request is being answered (its body has its own timeout).
    Busy,
}

/// The connection's [`Phase`], updated by reads and by the routes; each change wakes the
/// connection's task so that it re-arms its timer for the new phase.
#[derive(Debug)]
pub(crate) struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            phase: Mutex::new(Phase::Idle {
                since: now,
                first: true,
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, change: impl FnOnce(Phase) -> Phase) {
        let changed = {
            // Each update stores a whole `Phase`: a poisoned lock still holds a valid one.
            let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
            let before = *phase;
            *phase = change(before);
            std::mem::discriminant(&before) != std::mem::discriminant(&*phase)
        };
        if changed {
            // Stores a permit if the task is not waiting, so no change goes unnoticed.
            self.changed.notify_one();
        }
    }

    fn bytes_arrived(&self, now: Instant) {
        self.update(|phase| match phase {
            Phase::Idle { since, first: true } => Phase::Head { since },
            Phase::Idle { first: false, .. } => Phase::Head { since: now },
            other => other,
        });
    }

    /// A request head is complete and its answer is being made.
    pub(crate) fn request_started(&self) {
        self.update(|_| Phase::Busy);
    }

    /// The answer is made; the connection waits for the next request.
    pub(crate) fn request_finished(&self, now: Instant) {
        self.update(|_| Phase::Idle {
            since: now,
            first: false,
        });
    }

    /// When the current phase runs out and which timeout that is; while busy, no timeout
    /// applies and the answer is merely a time to look again. On a `crowded` listener an idle
    /// connection gets the header timeout when that is the shorter.
    fn deadline(&self, config: &ServerConfig, crowded: bool) -> (Instant, Option<TimeoutLabel>) {
        let phase = *self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        match phase {
            Phase::Idle { since, first: true } | Phase::Head { since } => (
                since + config.header_read_timeout(),
                Some(TimeoutLabel::Header),
            ),
            Phase::Idle {
                since,
                first: false,
            } if crowded && config.header_read_timeout() < config.keep_alive_idle_timeout() => (
                since + config.header_read_timeout(),
                Some(TimeoutLabel::IdleCrowded),
            ),
            Phase::Idle {
                since,
                first: false,
            } => (
                since + config.keep_alive_idle_timeout(),
                Some(TimeoutLabel::Idle),
            ),
            Phase::Busy => (Instant::now() + config.header_read_timeout(), None),
        }
    }
}

/// A stream that reports arriving bytes to its connection's [`Activity`].
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_arrived(Instant::now());
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_pick_the_right_timeout() {
        let config = ServerConfig {
            header_read_timeout_ms: 5,
            keep_alive_idle_timeout_ms: 60,
            ..ServerConfig::default()
        };
        let start = Instant::now();
        let activity = Activity::new(start);
        let ms = Duration::from_millis;
        assert_eq!(
            activity.deadline(&config, false),
            (start + ms(5), Some(TimeoutLabel::Header))
        );
        // The first head is held to the handshake's end, not to its first byte.
        activity.bytes_arrived(start + ms(3));
        assert_eq!(
            activity.deadline(&config, false),
            (start + ms(5), Some(TimeoutLabel::Header))
        );
        // Crowding changes nothing but the idle timeout.
        assert_eq!(
            activity.deadline(&config, true),
            (start + ms(5), Some(TimeoutLabel::Header))
        );
        activity.request_started();
        assert_eq!(activity.deadline(&config, false).1, None);
        activity.request_finished(start + ms(10));
        assert_eq!(
            activity.deadline(&config, false),
            (start + ms(70), Some(TimeoutLabel::Idle))
        );
        // On a crowded listener an idle connection gets the shorter header timeout.
        assert_eq!(
            activity.deadline(&config, true),
            (start + ms(15), Some(TimeoutLabel::IdleCrowded))
        );
        activity.bytes_arrived(start + ms(20));
        assert_eq!(
            activity.deadline(&config, false),
            (start + ms(25), Some(TimeoutLabel::Header))
        );
    }
}
