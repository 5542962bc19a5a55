//! The scheduler's view of the queue: the due times of queued items, in two
//! lanes (uploads need a healthy provider, deletes do not).
//!
//! Owns the bound on memory whatever the queue's length (DESIGN, guarantee
//! 9): each lane holds at most its window of items in memory, the ones due
//! first among those it was given; the others wait in the durable queue only
//! (the lane's backlog, counted here) until the scheduler reads them in again
//! ([`Lanes::wants_items`], [`Lanes::take_from_backlog`]). Nothing is lost by
//! leaving memory: every item given to [`Lanes::insert`] is already in the
//! durable queue.

use crate::keys::ItemKey;
use crate::pipeline::worker::Lane;
use std::collections::{BTreeSet, HashMap};

/// Items each lane holds in memory by default: far more than the workers
/// can take between two reads of the backlog.
pub const WINDOW: usize = 4096;

/// One item in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub lane: Lane,
    /// When it may be worked on (Unix ms).
    pub due_ms: u64,
    /// When it was queued for its upload (Unix ms; uploads only), for the
    /// age of the oldest.
    pub queued_ms: Option<u64>,
}

/// One lane: what it holds in memory, and what waits on disk only.
#[derive(Default)]
struct Window {
    due: BTreeSet<(u64, ItemKey)>,
    /// Items of this lane in the durable queue and nowhere in memory.
    backlog: usize,
    /// The earliest queue time of an item that went to the backlog since it
    /// was last empty (an upper bound of the backlog's age).
    backlog_queued_ms: Option<u64>,
}

impl Window {
    fn count_in_backlog(&mut self, queued_ms: Option<u64>) {
        self.backlog += 1;
        self.backlog_queued_ms = min_some(self.backlog_queued_ms, queued_ms);
    }

    fn set_backlog(&mut self, n: usize) {
        self.backlog = n;
        if n == 0 {
            self.backlog_queued_ms = None;
        }
    }
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Due items (Unix ms) of both lanes; see the module docs.
pub struct Lanes {
    uploads: Window,
    deletes: Window,
    index: HashMap<ItemKey, Entry>,
    window: usize,
}

impl Default for Lanes {
    fn default() -> Lanes {
        Lanes::with_window(WINDOW)
    }
}

impl Lanes {
    pub fn with_window(window: usize) -> Lanes {
        Lanes {
            uploads: Window::default(),
            deletes: Window::default(),
            index: HashMap::new(),
            window: window.max(1),
        }
    }

    fn lane(&self, lane: Lane) -> &Window {
        match lane {
            Lane::Upload => &self.uploads,
            Lane::Delete => &self.deletes,
        }
    }

    fn lane_mut(&mut self, lane: Lane) -> &mut Window {
        match lane {
            Lane::Upload => &mut self.uploads,
            Lane::Delete => &mut self.deletes,
        }
    }

    /// Schedules an item that is in the durable queue: in memory if its lane
    /// has room, or if it is due before the lane's latest (which then waits
    /// on disk instead); otherwise it waits on disk. An item already in
    /// memory is moved.
    pub fn insert(&mut self, key: ItemKey, entry: Entry) {
        self.remove(&key);
        let window = self.window;
        let w = self.lane_mut(entry.lane);
        if w.due.len() >= window {
            match w.due.last() {
                Some((latest, _)) if entry.due_ms < *latest => {
                    let (_, evicted) = w.due.pop_last().expect("a latest item");
                    let queued = self.index.remove(&evicted).and_then(|e| e.queued_ms);
                    self.lane_mut(entry.lane).count_in_backlog(queued);
                }
                _ => {
                    w.count_in_backlog(entry.queued_ms);
                    return;
                }
            }
        }
        self.lane_mut(entry.lane)
            .due
            .insert((entry.due_ms, key.clone()));
        self.index.insert(key, entry);
    }

    /// Schedules an item read from the backlog on disk (see [`Lanes::insert`]).
    pub fn take_from_backlog(&mut self, key: ItemKey, entry: Entry) {
        let w = self.lane_mut(entry.lane);
        w.backlog = w.backlog.saturating_sub(1);
        self.insert(key, entry);
    }

    /// Takes an item out of memory (it stays in the durable queue).
    pub fn remove(&mut self, key: &ItemKey) -> Option<Entry> {
        let entry = self.index.remove(key)?;
        self.lane_mut(entry.lane)
            .due
            .remove(&(entry.due_ms, key.clone()));
        Some(entry)
    }

    pub fn first_due(&self, lane: Lane) -> Option<u64> {
        self.lane(lane).due.first().map(|(due, _)| *due)
    }

    /// The first item of `lane` if it is due at `now_ms`, out of the lane.
    pub fn pop_due(&mut self, lane: Lane, now_ms: u64) -> Option<(ItemKey, Entry)> {
        if self.first_due(lane)? > now_ms {
            return None;
        }
        let (_, key) = self.lane_mut(lane).due.pop_first()?;
        let entry = self.index.remove(&key)?;
        Some((key, entry))
    }

    /// The keys of `lane` held in memory.
    #[cfg(test)]
    pub fn keys(&self, lane: Lane) -> Vec<ItemKey> {
        self.lane(lane).due.iter().map(|(_, k)| k.clone()).collect()
    }

    /// Whether the item is held in memory.
    pub fn contains(&self, key: &ItemKey) -> bool {
        self.index.contains_key(key)
    }

    /// Items of `lane` in memory and in its backlog.
    pub fn pending(&self, lane: Lane) -> usize {
        let w = self.lane(lane);
        w.due.len() + w.backlog
    }

    /// Items of both lanes, in memory and in their backlogs.
    pub fn len(&self) -> usize {
        self.pending(Lane::Upload) + self.pending(Lane::Delete)
    }

    pub fn backlog(&self, lane: Lane) -> usize {
        self.lane(lane).backlog
    }

    /// Whether `lane` should read items from its backlog: it has one, and
    /// either half its window is free or (`rotate`) nothing it holds is due
    /// at `now_ms`, so items on disk may be due sooner.
    pub fn wants_items(&self, lane: Lane, now_ms: u64, rotate: bool) -> bool {
        let w = self.lane(lane);
        w.backlog > 0
            && (w.due.len() <= self.window / 2
                || (rotate && w.due.first().is_some_and(|(due, _)| *due > now_ms)))
    }

    /// After a read of the whole durable queue: `n` items of `lane` are in
    /// it and neither in memory nor in the scheduler's other hands.
    pub fn set_backlog(&mut self, lane: Lane, n: usize) {
        self.lane_mut(lane).set_backlog(n);
    }

    /// The earliest queue time of an item waiting for its upload, in memory
    /// or (an upper bound of its age) in the backlog.
    pub fn oldest_queued_ms(&self) -> Option<u64> {
        let in_memory = self.index.values().filter_map(|e| e.queued_ms).min();
        min_some(in_memory, self.uploads.backlog_queued_ms)
    }

    /// Items each lane holds in memory at most (also the most one read of
    /// the backlog takes).
    pub fn window(&self) -> usize {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> ItemKey {
        ItemKey::from_bytes(format!("f{n:04}").into_bytes()).unwrap()
    }

    fn upload(due_ms: u64) -> Entry {
        Entry {
            lane: Lane::Upload,
            due_ms,
            queued_ms: Some(due_ms),
        }
    }

    fn delete(due_ms: u64) -> Entry {
        Entry {
            lane: Lane::Delete,
            due_ms,
            queued_ms: None,
        }
    }

    #[test]
    fn a_full_lane_keeps_the_items_due_first_and_counts_the_rest() {
        let mut l = Lanes::with_window(3);
        for (n, due) in [(1, 50), (2, 40), (3, 30), (4, 60), (5, 10)] {
            l.insert(key(n), upload(due));
        }
        // 4 (due 60) never got in; 1 (due 50) made way for 5 (due 10).
        assert_eq!(l.keys(Lane::Upload), vec![key(5), key(3), key(2)]);
        assert_eq!(l.backlog(Lane::Upload), 2);
        assert_eq!(l.pending(Lane::Upload), 5);
        assert!(!l.contains(&key(1)) && !l.contains(&key(4)));
        // The backlog's age is that of the oldest item sent there.
        assert_eq!(l.oldest_queued_ms(), Some(10));
        l.pop_due(Lane::Upload, 100).unwrap();
        assert_eq!(l.oldest_queued_ms(), Some(30));
        l.set_backlog(Lane::Upload, 0);
        assert_eq!(l.oldest_queued_ms(), Some(30));
    }

    #[test]
    fn lanes_have_their_own_windows() {
        let mut l = Lanes::with_window(2);
        for n in 0..5 {
            l.insert(key(n), delete(1000 + n as u64));
        }
        l.insert(key(10), upload(5));
        assert_eq!(l.keys(Lane::Upload), vec![key(10)]);
        assert_eq!(l.backlog(Lane::Delete), 3);
        assert_eq!(l.backlog(Lane::Upload), 0);
        assert_eq!(l.len(), 6);
    }

    #[test]
    fn reading_the_backlog_moves_items_between_disk_and_memory() {
        let mut l = Lanes::with_window(4);
        for n in 0..6 {
            l.insert(key(n), upload(100));
        }
        assert_eq!(l.backlog(Lane::Upload), 2);
        // A full lane with items due: no read.
        assert!(!l.wants_items(Lane::Upload, 100, true));
        // Nothing due yet: a read may bring sooner items (rotation).
        assert!(l.wants_items(Lane::Upload, 99, true));
        assert!(!l.wants_items(Lane::Upload, 99, false));
        l.take_from_backlog(key(4), upload(50));
        assert_eq!(l.backlog(Lane::Upload), 2, "one in, the latest out");
        assert!(l.contains(&key(4)));
        // Half the window free: a read is wanted.
        l.pop_due(Lane::Upload, 100).unwrap();
        l.pop_due(Lane::Upload, 100).unwrap();
        assert!(l.wants_items(Lane::Upload, 0, false));
        l.take_from_backlog(key(5), upload(100));
        l.take_from_backlog(key(0), upload(100));
        assert_eq!(l.backlog(Lane::Upload), 0);
        assert!(!l.wants_items(Lane::Upload, 0, true));
    }

    #[test]
    fn moving_an_item_in_memory_does_not_count_it_twice() {
        let mut l = Lanes::with_window(2);
        l.insert(key(1), upload(10));
        l.insert(key(2), upload(20));
        l.insert(key(1), upload(30));
        assert_eq!((l.pending(Lane::Upload), l.backlog(Lane::Upload)), (2, 0));
        assert_eq!(l.remove(&key(1)), Some(upload(30)));
        assert_eq!(l.first_due(Lane::Upload), Some(20));
    }
}
