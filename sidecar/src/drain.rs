//! Graceful shutdown, ordered so the application outlives its inbound traffic and the outbound
//! proxy outlives the application.
//!
//! A drain begins on SIGTERM, on `POST /drain` (the application's preStop hook,
//! `shardmesh-hook wait-drained`; with native sidecars the sidecar gets SIGTERM only after the
//! application exited, so the hook is what starts it there) or on `/shutdown`. With an inbound
//! proxy (`--app-port`):
//!
//! 1. [`Phase::Draining`]: readiness fails and the registry Leases are released, so callers
//!    stop choosing this pod; inbound keeps accepting for `--drain-delay` (traffic already
//!    routed here still arrives while the removal propagates).
//! 2. [`Phase::InboundClosed`]: the inbound listener closes; inbound connections finish their
//!    in-flight requests and close.
//! 3. [`Phase::InboundDrained`]: every inbound connection is gone (or `--grace-period` passed).
//!    `POST /drain` answers now, so the kubelet sends SIGTERM to the application only when no
//!    request is left for it. The outbound proxy stays open — the application may still call
//!    others while it shuts down — and the sidecar probes the application's port every
//!    [`APP_POLL_INTERVAL`] until a connection is refused (it exited) or the grace period ends.
//! 4. [`Phase::Stopped`]: the outbound listener closes, its connections finish (bounded), the
//!    process exits 0.
//!
//! Without an inbound proxy there is nothing to order: after the drain delay every listener
//! closes at once. `/shutdown` (the application says it is done, e.g. a Job) skips the delay and
//! closes every listener at once.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::sync::{mpsc, watch};

/// How often the application's port is probed once inbound traffic is drained.
pub const APP_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Lifecycle phase; phases only move forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving; ready.
    Running,
    /// Readiness fails, Leases released; every listener still accepting.
    Draining,
    /// Inbound listener closed, inbound connections finishing; outbound open.
    InboundClosed,
    /// Inbound connections gone; outbound open until the application exits.
    InboundDrained,
    /// Every listener closed; connections finishing.
    Stopped,
}

impl Phase {
    /// Lower-case name, for `GET /drain` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::InboundClosed => "inbound-closed",
            Phase::InboundDrained => "inbound-drained",
            Phase::Stopped => "stopped",
        }
    }
}

/// Shared lifecycle signal.
#[derive(Clone, Debug)]
pub struct Drain {
    tx: watch::Sender<Phase>,
    /// Whether the drain was asked for by `/shutdown` (no drain delay: the app is done).
    immediate: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// Running.
    pub fn new() -> Self {
        Drain {
            tx: watch::Sender::new(Phase::Running),
            immediate: watch::Sender::new(false),
        }
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    /// Whether readiness must fail.
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Moves to `to` unless already there or beyond (phases never go back).
    pub fn advance(&self, to: Phase) {
        self.tx.send_if_modified(|p| {
            if *p < to {
                *p = to;
                true
            } else {
                false
            }
        });
    }

    /// Starts draining (idempotent). `immediate` skips the drain delay.
    pub fn begin(&self, immediate: bool) {
        if immediate {
            self.immediate.send_replace(true);
        }
        self.advance(Phase::Draining);
    }

    /// Closes every listener.
    pub fn stop(&self) {
        self.advance(Phase::Stopped);
    }

    /// Waits until the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.tx.subscribe();
        // The sender lives in self, so the channel cannot close while we wait.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// Whether the drain was requested with `immediate`.
    pub fn is_immediate(&self) -> bool {
        *self.immediate.borrow()
    }

    /// Waits until a drain is requested with `immediate` (a `/shutdown` during the drain delay
    /// cuts the delay short).
    pub async fn immediate_requested(&self) {
        let mut rx = self.immediate.subscribe();
        let _ = rx.wait_for(|i| *i).await;
    }
}

/// Counts live connections: each holds a token; [`Connections::wait`] returns when all are
/// gone.
#[derive(Debug)]
pub struct Connections {
    tx: mpsc::Sender<()>,
    rx: mpsc::Receiver<()>,
}

/// Held by a connection task for its lifetime.
#[derive(Clone, Debug)]
pub struct ConnToken(#[allow(dead_code)] mpsc::Sender<()>);

impl Default for Connections {
    fn default() -> Self {
        Self::new()
    }
}

impl Connections {
    /// No connections yet.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(1);
        Connections { tx, rx }
    }

    /// A token for a new connection.
    pub fn token(&self) -> ConnToken {
        ConnToken(self.tx.clone())
    }

    /// Waits until every token is dropped, at most `grace`. Returns whether all finished.
    pub async fn wait(self, grace: Duration) -> bool {
        let Connections { tx, mut rx } = self;
        drop(tx);
        tokio::time::timeout(grace, rx.recv()).await.is_ok()
    }
}

/// Probes `gone` every `interval` until it reports the application gone or `within` elapses.
/// Returns whether the application was seen gone. Generic over the probe so the timing is
/// tested with a paused clock; [`app_refuses`] is the real probe.
pub async fn app_exited<F, Fut>(mut gone: F, interval: Duration, within: Duration) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let poll = async {
        loop {
            if gone().await {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    };
    tokio::time::timeout(within, poll).await.is_ok()
}

/// Whether a connection to the application is refused: nothing listens on its port any more.
/// A timeout or another error does not count — a busy application is still running.
pub async fn app_refuses(app: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(APP_POLL_INTERVAL, tokio::net::TcpStream::connect(app)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    };
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn app_exit_is_seen_at_the_next_poll() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let started = Instant::now();
        // The application goes away after the fourth probe.
        let gone = app_exited(
            move || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move { n >= 4 }
            },
            APP_POLL_INTERVAL,
            Duration::from_secs(20),
        )
        .await;
        assert!(gone);
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(started.elapsed(), APP_POLL_INTERVAL * 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_app_is_waited_for_at_most_the_bound() {
        let started = Instant::now();
        let gone = app_exited(
            || async { false },
            APP_POLL_INTERVAL,
            Duration::from_secs(3),
        )
        .await;
        assert!(!gone);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn refused_only_when_nothing_listens() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert!(!app_refuses(addr).await, "listening: still running");
        drop(l);
        assert!(app_refuses(addr).await, "listener gone: exited");
    }

    #[tokio::test(start_paused = true)]
    async fn phases_only_move_forward() {
        let d = Drain::new();
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.reached(Phase::InboundDrained).await }
        });
        d.begin(false);
        d.advance(Phase::InboundClosed);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "InboundClosed is not InboundDrained");
        d.stop();
        d.advance(Phase::Draining);
        assert_eq!(d.phase(), Phase::Stopped);
        waiter.await.unwrap();
        assert!(!d.is_immediate());
        d.begin(true);
        assert!(d.is_immediate());
        d.immediate_requested().await;
    }
}
