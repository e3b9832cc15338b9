//! Telling systemd how the service is doing (`sd_notify(3)`), for a `Type=notify` unit with
//! `NotifyAccess=main` and `WatchdogSec=`. Every function does nothing when `NOTIFY_SOCKET` is
//! unset (not started by systemd, or in tests); a failure to notify is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "sd_notify failed");
    }
}

/// `READY=1` with a status line: both listeners are bound (or a reload finished).
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1`: a SIGHUP reload has started; [`ready`] ends it.
pub fn reloading() {
    let now = NotifyState::monotonic_usec_now();
    match now {
        Ok(now) => notify(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(_) => notify(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
    }
}

/// `STOPPING=1`: shutdown has begun; in-flight requests are draining.
pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight requests"),
    ]);
}

/// The interval between `WATCHDOG=1` pings: half of `WatchdogSec=`, as sd_watchdog_enabled(3)
/// advises, or `None` when systemd set no watchdog for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// Spawns a task that pings the watchdog at [`watchdog_interval`], if there is one. The pings
/// come from the same runtime that serves requests, so a runtime that stops making progress
/// stops pinging and systemd restarts the service.
pub fn spawn_watchdog() -> Option<JoinHandle<()>> {
    let interval = watchdog_interval()?;
    tracing::info!(
        interval_ms = interval.as_millis(),
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}
