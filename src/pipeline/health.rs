//! The health of the active provider, as a small state machine the scheduler
//! drives (pure logic on tokio's clock, so its tests run on paused time).
//!
//! Rule: an error is provider-wide only when a request that involves no item
//! fails too. After an item's upload fails, the provider is *suspect*: new
//! uploads wait while one probe ([`crate::remote::store::Store::probe`]) asks
//! the provider; an upload of another item that succeeded after the failed one
//! started counts as that probe. If the probe fails, the provider is *paused*:
//! nothing is sent but one probe at a time, with exponential backoff and
//! jitter, until one succeeds. The outage is logged when it starts and when it
//! ends, not once per item. A reload or a switch of provider starts afresh: the
//! answer of a probe sent before it ([`ProbeTicket`]) no longer counts.
//!
//! Throttling ("slow down": 503 SlowDown, 429) also shrinks how many uploads
//! may be in flight at once ([`Window`]): halved at most once per
//! [`SLOW_DOWN_EVERY`], one more for each upload that succeeds, until
//! `upload.workers` alone governs again. A throttled item backing off alone
//! would leave its worker to a fresh item at once, and the rate the
//! provider asked to lower would not fall.

use crate::pipeline::backoff::Backoff;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq)]
enum State {
    Healthy,
    /// An item failed; a probe is deciding whether the provider is at fault.
    Suspect,
    Paused {
        reason: String,
        since: Instant,
        attempt: u32,
        next_probe: Instant,
    },
}

/// A change worth a log line and a status update.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Paused, with the reason.
    Paused(String),
    /// The reason of a pause changed.
    Reason(String),
    /// Back after a pause of this long (seconds), with the reason it had.
    Resumed { reason: String, paused_s: u64 },
}

/// Which probe an answer belongs to: only the latest one's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTicket(u64);

/// See the module docs.
#[derive(Debug)]
pub struct Health {
    state: State,
    probing: bool,
    /// Bumped by a reload and a switch: answers to older probes are stale.
    generation: u64,
    backoff: Backoff,
    /// When an upload last succeeded.
    last_success: Option<Instant>,
    /// When the active provider took over: uploads started before went to
    /// another and say nothing of this one.
    provider_since: Instant,
    /// Throttling answers (429, 503 SlowDown) since the last success.
    throttled: u32,
    window: Window,
}

/// How many uploads may be in flight at once, besides `upload.workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    /// No limit of its own.
    Open,
    /// At most `size`, since the provider last asked to slow down at `since`.
    Limited { size: usize, since: Instant },
}

/// The window is halved at most this often: the answers to one burst of
/// requests halve it once, not once each.
pub const SLOW_DOWN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A window grown back to this size no longer limits anything.
const WINDOW_OPENS_AT: usize = 1024;

/// Throttling answers in a row after which the provider is suspect.
pub const THROTTLED_SUSPECT_AFTER: u32 = 3;

impl Health {
    pub fn new(backoff: Backoff) -> Health {
        Health {
            state: State::Healthy,
            probing: false,
            generation: 0,
            backoff,
            last_success: None,
            provider_since: Instant::now(),
            throttled: 0,
            window: Window::Open,
        }
    }

    /// How many uploads may be in flight now, with `workers` the most.
    pub fn upload_room(&self, workers: usize) -> usize {
        match self.window {
            Window::Open => workers,
            Window::Limited { size, .. } => size.min(workers),
        }
    }

    /// The provider asked to slow down while `in_flight` uploads were out:
    /// the window halves, unless it did so within [`SLOW_DOWN_EVERY`].
    /// Returns the new size when it shrank.
    pub fn slow_down(&mut self, in_flight: usize, now: Instant) -> Option<usize> {
        let (current, was) = match self.window {
            Window::Limited { since, .. } if now.duration_since(since) < SLOW_DOWN_EVERY => {
                return None
            }
            Window::Open => (in_flight.max(1), usize::MAX),
            Window::Limited { size, .. } => (size.min(in_flight.max(1)), size),
        };
        let size = (current / 2).max(1);
        self.window = Window::Limited { size, since: now };
        (size < was).then_some(size)
    }

    /// Whether an upload that started at `started` went to the active
    /// provider (not to the one before a switch).
    pub fn is_current(&self, started: Instant) -> bool {
        started >= self.provider_since
    }

    /// Whether a probe of the current provider is out.
    pub fn probe_out(&self) -> bool {
        self.probing
    }

    /// The provider answered "slow down" to an item. Returns whether that
    /// has happened often enough in a row (with no success between) that
    /// the provider itself is suspect; until then, no probe adds to the load.
    pub fn throttled(&mut self) -> bool {
        self.throttled += 1;
        self.throttled >= THROTTLED_SUSPECT_AFTER
    }

    pub fn set_backoff(&mut self, backoff: Backoff) {
        self.backoff = backoff;
    }

    /// Whether new uploads may start.
    pub fn uploads_allowed(&self) -> bool {
        self.state == State::Healthy
    }

    /// The reason and start of a pause.
    pub fn paused(&self) -> Option<(&str, Instant)> {
        match &self.state {
            State::Paused { reason, since, .. } => Some((reason, *since)),
            _ => None,
        }
    }

    /// An upload that started at `started` failed in a way that may be the
    /// provider's. Returns `Some(true)` if the provider is already cleared (an
    /// upload succeeded after this one started), `Some(false)` if it is
    /// already paused (blame the provider), `None` if the verdict waits for a
    /// probe ([`Health::want_probe`] says whether to start one).
    pub fn item_failed(&mut self, started: Instant) -> Option<bool> {
        match self.state {
            State::Paused { .. } => Some(false),
            State::Healthy if self.last_success.is_some_and(|t| t >= started) => Some(true),
            State::Healthy | State::Suspect => {
                self.state = State::Suspect;
                None
            }
        }
    }

    /// A ticket if a probe should start now; it counts as started.
    pub fn want_probe(&mut self, now: Instant) -> Option<ProbeTicket> {
        if self.probing {
            return None;
        }
        let due = match &self.state {
            State::Healthy => false,
            State::Suspect => true,
            State::Paused { next_probe, .. } => now >= *next_probe,
        };
        self.probing = due;
        due.then_some(ProbeTicket(self.generation))
    }

    /// Whether the answer to `ticket`'s probe still counts; a stale one is
    /// dropped.
    fn current(&self, ticket: ProbeTicket) -> bool {
        ticket.0 == self.generation
    }

    /// Makes the answers of every probe sent so far stale.
    fn start_afresh(&mut self) {
        self.generation += 1;
        self.probing = false;
    }

    /// An upload succeeded: the provider works. It counts as the probe in
    /// flight, if any, whose answer then no longer counts: a probe that
    /// fails afterwards would pause a provider that works.
    pub fn upload_succeeded(&mut self, now: Instant) -> Option<Change> {
        self.last_success = Some(now);
        self.throttled = 0;
        if let Window::Limited { size, since } = self.window {
            self.window = match size + 1 {
                WINDOW_OPENS_AT.. => Window::Open,
                size => Window::Limited { size, since },
            };
        }
        if self.probing {
            self.start_afresh();
        }
        self.healthy(now)
    }

    /// The probe succeeded.
    pub fn probe_succeeded(&mut self, ticket: ProbeTicket, now: Instant) -> Option<Change> {
        if !self.current(ticket) {
            return None;
        }
        self.probing = false;
        self.healthy(now)
    }

    fn healthy(&mut self, now: Instant) -> Option<Change> {
        let old = std::mem::replace(&mut self.state, State::Healthy);
        match old {
            State::Paused { reason, since, .. } => Some(Change::Resumed {
                reason,
                paused_s: now.saturating_duration_since(since).as_secs(),
            }),
            _ => None,
        }
    }

    /// The probe failed with `reason`: the provider is paused (or stays
    /// paused, probing again later).
    pub fn probe_failed(
        &mut self,
        ticket: ProbeTicket,
        reason: &str,
        now: Instant,
    ) -> Option<Change> {
        if !self.current(ticket) {
            return None;
        }
        self.probing = false;
        match &mut self.state {
            State::Paused {
                reason: r,
                attempt,
                next_probe,
                ..
            } => {
                *attempt += 1;
                *next_probe = now + self.backoff.jittered(*attempt);
                if r != reason {
                    *r = reason.to_string();
                    return Some(Change::Reason(reason.to_string()));
                }
                None
            }
            _ => {
                self.state = State::Paused {
                    reason: reason.to_string(),
                    since: now,
                    attempt: 1,
                    next_probe: now + self.backoff.jittered(1),
                };
                Some(Change::Paused(reason.to_string()))
            }
        }
    }

    /// A probe was abandoned (its task failed).
    pub fn probe_abandoned(&mut self, ticket: ProbeTicket) {
        if self.current(ticket) {
            self.probing = false;
        }
    }

    /// The ticket of the probe that would be current (for a probe task
    /// that failed without saying which it was).
    pub fn latest_ticket(&self) -> ProbeTicket {
        ProbeTicket(self.generation)
    }

    /// A reload may have fixed the cause: probe at once, with the new
    /// settings, whatever a probe sent before answers.
    pub fn probe_now(&mut self, now: Instant) {
        self.start_afresh();
        if let State::Paused { next_probe, .. } = &mut self.state {
            *next_probe = now;
        }
    }

    /// Forgets everything (the active provider changed).
    pub fn reset(&mut self) -> Option<Change> {
        self.start_afresh();
        self.last_success = None;
        self.provider_since = Instant::now();
        self.window = Window::Open;
        match std::mem::replace(&mut self.state, State::Healthy) {
            State::Paused { reason, .. } => Some(Change::Resumed {
                reason,
                paused_s: 0,
            }),
            _ => None,
        }
    }

    /// When the next probe is due, if one waits.
    pub fn next_probe(&self) -> Option<Instant> {
        match &self.state {
            State::Paused { next_probe, .. } if !self.probing => Some(*next_probe),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Slow-downs halve the room, once per burst; successes give it back one
    /// by one; a new provider starts open.
    #[tokio::test(start_paused = true)]
    async fn throttling_halves_the_room_once_per_burst_and_successes_grow_it() {
        let mut h = Health::new(Backoff::new(Duration::from_secs(1), Duration::from_secs(8)));
        assert_eq!(h.upload_room(64), 64);
        let t0 = Instant::now();
        assert_eq!(h.slow_down(64, t0), Some(32));
        // The rest of the same burst's answers change nothing.
        assert_eq!(h.slow_down(63, t0 + Duration::from_millis(500)), None);
        assert_eq!(h.upload_room(64), 32);
        // A second burst a second later halves it again, from what was out.
        assert_eq!(h.slow_down(20, t0 + SLOW_DOWN_EVERY), Some(10));
        for _ in 0..5 {
            h.upload_succeeded(t0 + SLOW_DOWN_EVERY);
        }
        assert_eq!(h.upload_room(64), 15);
        // Never below one, and told only when it shrinks.
        let mut t = t0 + SLOW_DOWN_EVERY;
        for _ in 0..10 {
            t += SLOW_DOWN_EVERY;
            h.slow_down(64, t);
        }
        assert_eq!(h.upload_room(64), 1);
        assert_eq!(h.slow_down(64, t + SLOW_DOWN_EVERY), None);
        // `workers` stays the most.
        for _ in 0..100 {
            h.upload_succeeded(t);
        }
        assert_eq!(h.upload_room(64), 64);
        assert_eq!(h.upload_room(200), 101);
        h.reset();
        assert_eq!(h.upload_room(200), 200);
    }

    fn health() -> Health {
        Health::new(Backoff::new(Duration::from_secs(1), Duration::from_secs(8)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_provider_wide_only_if_the_probe_fails() {
        let mut h = health();
        let t0 = Instant::now();
        assert_eq!(h.item_failed(t0), None);
        assert!(!h.uploads_allowed(), "suspect: new uploads wait");
        let t = h.want_probe(Instant::now()).unwrap();
        assert!(
            h.want_probe(Instant::now()).is_none(),
            "one probe at a time"
        );
        assert_eq!(h.probe_succeeded(t, Instant::now()), None);
        assert!(h.uploads_allowed());

        assert_eq!(h.item_failed(Instant::now()), None);
        let t = h.want_probe(Instant::now()).unwrap();
        assert_eq!(
            h.probe_failed(t, "bad key", Instant::now()),
            Some(Change::Paused("bad key".into()))
        );
        assert_eq!(h.item_failed(Instant::now()), Some(false));
        assert!(
            h.want_probe(Instant::now()).is_none(),
            "backoff before the next probe"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let t = h.want_probe(Instant::now()).unwrap();
        assert_eq!(h.probe_failed(t, "bad key", Instant::now()), None);
        let next = h.next_probe().unwrap();
        let wait = next - Instant::now();
        assert!(
            wait >= Duration::from_secs(1) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        tokio::time::advance(wait).await;
        let t = h.want_probe(Instant::now()).unwrap();
        assert!(matches!(
            h.probe_succeeded(t, Instant::now()),
            Some(Change::Resumed { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_success_clears_the_provider_without_a_probe() {
        let mut h = health();
        let started = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        h.upload_succeeded(Instant::now());
        assert_eq!(h.item_failed(started), Some(true));
        assert!(h.uploads_allowed());
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(h.item_failed(Instant::now()), None);
    }

    /// A success while the probe is out answers for it; the probe failing
    /// afterwards (a passing error) used to pause the working provider.
    #[test]
    fn a_success_answers_for_the_probe_in_flight() {
        let mut h = health();
        let t = Instant::now();
        assert_eq!(h.item_failed(t), None);
        let ticket = h.want_probe(t).expect("a probe");
        assert_eq!(h.upload_succeeded(t), None);
        assert_ne!(ticket, h.latest_ticket(), "the probe's answer is stale");
        assert_eq!(h.probe_failed(ticket, "timed out", t), None);
        assert!(h.uploads_allowed());
        assert_eq!(h.want_probe(t), None, "healthy: no probe");
    }

    /// After a switch, uploads that went to the provider before say
    /// nothing of the new one.
    #[tokio::test(start_paused = true)]
    async fn uploads_started_before_a_switch_are_not_the_current_providers() {
        let mut h = health();
        let before = Instant::now();
        assert!(h.is_current(before));
        tokio::time::advance(Duration::from_secs(1)).await;
        let _ = h.reset();
        assert!(!h.is_current(before));
        assert!(h.is_current(Instant::now()));
    }

    #[test]
    fn only_a_run_of_throttling_makes_the_provider_suspect() {
        let mut h = health();
        assert!(!h.throttled());
        assert!(!h.throttled());
        h.upload_succeeded(Instant::now());
        assert!(!h.throttled());
        assert!(!h.throttled());
        assert!(h.throttled(), "the third in a row");
    }

    #[tokio::test(start_paused = true)]
    async fn probes_back_off_up_to_the_maximum() {
        let mut h = health();
        h.item_failed(Instant::now());
        let t = h.want_probe(Instant::now()).unwrap();
        h.probe_failed(t, "down", Instant::now());
        for _ in 0..10 {
            let wait = h.next_probe().unwrap() - Instant::now();
            assert!(wait <= Duration::from_secs(8), "{wait:?}");
            tokio::time::advance(wait).await;
            let t = h.want_probe(Instant::now()).unwrap();
            h.probe_failed(t, "down", Instant::now());
        }
        let wait = h.next_probe().unwrap() - Instant::now();
        assert!(wait >= Duration::from_secs(4), "{wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_reload_a_probe_sent_before_it_does_not_count() {
        let mut h = health();
        h.item_failed(Instant::now());
        let t = h.want_probe(Instant::now()).unwrap();
        h.probe_failed(t, "wrong endpoint", Instant::now());
        tokio::time::advance(Duration::from_secs(8)).await;
        let stale = h.want_probe(Instant::now()).unwrap();
        // The operator fixes the endpoint and reloads while that probe runs.
        h.probe_now(Instant::now());
        let fresh = h.want_probe(Instant::now()).expect("a probe at once");
        assert_eq!(
            h.probe_failed(stale, "wrong endpoint", Instant::now()),
            None
        );
        assert!(
            h.want_probe(Instant::now()).is_none(),
            "still one current probe"
        );
        assert!(matches!(
            h.probe_succeeded(fresh, Instant::now()),
            Some(Change::Resumed { .. })
        ));
        assert!(h.uploads_allowed());
        // A switch of provider: the old one's late answer changes nothing.
        h.item_failed(Instant::now());
        let old = h.want_probe(Instant::now()).unwrap();
        h.reset();
        h.item_failed(Instant::now());
        let new = h.want_probe(Instant::now()).unwrap();
        h.probe_abandoned(old);
        assert!(h.want_probe(Instant::now()).is_none(), "no second probe");
        assert_eq!(h.probe_succeeded(new, Instant::now()), None);
        assert!(h.uploads_allowed());
    }
}
