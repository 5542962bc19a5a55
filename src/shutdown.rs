//! The daemon's one stop signal (the pattern of mini-redis' `shutdown.rs`):
//! [`Stop`] fires it once, every task holds a [`Shutdown`] and ends when it
//! sees it. Signals are turned into it in `main`, so the daemon also runs
//! inside a test with any future as its stop.

use tokio::sync::watch;

/// Fires the stop signal; dropping it fires it too.
pub struct Stop {
    tx: watch::Sender<bool>,
}

/// Listens for the stop signal.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Stop {
    pub fn new() -> (Stop, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Stop { tx }, Shutdown { rx })
    }

    pub fn fire(&self) {
        self.tx.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits for the stop signal (returns at once if it was given).
    pub async fn recv(&mut self) {
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_sees_the_stop() {
        let (stop, mut a) = Stop::new();
        let mut b = stop.subscribe();
        assert!(!a.is_shutdown());
        let t = tokio::spawn(async move { b.recv().await });
        stop.fire();
        a.recv().await;
        t.await.unwrap();
        assert!(a.is_shutdown());
        a.recv().await;
        drop(stop);
        let (stop, mut c) = Stop::new();
        drop(stop);
        c.recv().await;
    }
}
