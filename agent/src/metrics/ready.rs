//! Readiness, as `/readyz` reports it and as the conflist waits for it:
//! the data path is loaded and its programs attached (the agent does not
//! get as far as making a `Ready` otherwise), the CNI socket is serving,
//! and, in cluster mode, every watched kind is listed and programmed.
use std::sync::Arc;

use tokio::sync::watch;

/// The conditions `/readyz` combines; each one set by the part it is about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Standalone: from the start. Cluster mode: every kind listed and
    /// programmed, nothing left to retry (the reconciler says so).
    pub synced: bool,
    /// The CNI socket is bound and its accept loop runs.
    pub serving: bool,
}

impl Readiness {
    pub fn is_ready(self) -> bool {
        self.synced && self.serving
    }

    /// What is missing, for `/readyz`'s body and the logs.
    pub fn missing(self) -> &'static str {
        match (self.synced, self.serving) {
            (true, true) => "",
            (false, true) => "not synced with the API server",
            (true, false) => "CNI socket not serving",
            (false, false) => "not synced with the API server; CNI socket not serving",
        }
    }
}

/// A cheap handle on the agent's readiness; it can be awaited.
#[derive(Clone, Debug)]
pub struct Ready(Arc<watch::Sender<Readiness>>);

impl Default for Ready {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(Readiness::default())))
    }
}

impl Ready {
    /// Synced with the API server (standalone: always).
    pub fn set_synced(&self, synced: bool) {
        self.0
            .send_if_modified(|r| std::mem::replace(&mut r.synced, synced) != synced);
    }

    /// The CNI socket serves (set when its accept loop starts).
    pub fn set_serving(&self, serving: bool) {
        self.0
            .send_if_modified(|r| std::mem::replace(&mut r.serving, serving) != serving);
    }

    pub fn get(&self) -> Readiness {
        *self.0.borrow()
    }

    pub fn is_ready(&self) -> bool {
        self.get().is_ready()
    }

    /// Returns once the agent is ready (at once if it is).
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ready = rx.wait_for(|r| r.is_ready()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_needs_both_the_sync_and_the_socket_and_wakes_a_waiter() {
        let ready = Ready::default();
        let waiter = tokio::spawn({
            let r = ready.clone();
            async move { r.wait().await }
        });
        ready.set_synced(true);
        assert!(!ready.is_ready());
        assert_eq!(ready.get().missing(), "CNI socket not serving");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        ready.set_serving(true);
        assert!(ready.is_ready());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes")
            .expect("the waiter ends");
        ready.set_synced(false);
        assert_eq!(ready.get().missing(), "not synced with the API server");
    }
}
