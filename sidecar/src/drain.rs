//! Graceful shutdown.
//!
//! On SIGTERM (or `/shutdown`) the sidecar: fails readiness at once (endpoints controllers stop
//! sending new traffic), keeps accepting for the drain delay (traffic already routed to this pod
//! still arrives while the removal propagates), then stops accepting, lets in-flight requests
//! finish up to the grace period, and exits 0.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Lifecycle phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving; ready.
    Running,
    /// Readiness fails; still accepting.
    Draining,
    /// Listeners closed; connections finishing.
    Stopped,
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

    fn advance(&self, to: Phase) {
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

    /// Closes the listeners.
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
