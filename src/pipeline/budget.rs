//! Shared upload resources: the byte budget for buffered file contents and the
//! bandwidth pacer.
//!
//! Guarantees that the file bytes held in memory for uploads never exceed
//! `upload.memory_limit`; that buffers are handed out by [`Turn`]: whole files
//! (single PUTs, small) before parts, and among parts an earlier file's before
//! a later file's, so big files finish one after another (the server's work
//! completing one overlaps the next one's parts) while small results never
//! wait for a video; and that bodies start no faster than
//! `upload.bandwidth_limit` allows on average.
//!
//! It also keeps big buffers for reuse ([`Buffer`]): a part's buffer, once
//! sent, serves the next part of the same size instead of being unmapped and
//! faulted in again (a tenth of the CPU of a big upload). Spares are held but
//! not reserved, so the invariant is on the bytes held: spare buffers and the
//! buffers in use (taken under reservations), of every size, never exceed the
//! limit together, and no spare is kept while the buffers in use alone do (a
//! lowered limit). A new buffer takes a spare of its own size if there is one,
//! else first frees the spares that do not fit beside it. Small files' buffers
//! count too: whole files are served before parts, so the bytes a sent part
//! gives back go to them while its buffer is a spare. The spares are freed as
//! soon as no upload holds a reservation, so an idle daemon keeps none.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Copies of a body in memory while it is sent: the data path hands the
/// buffer itself to the HTTP client, so a buffer of `n` bytes costs `n`.
pub const BODY_COPIES: u64 = 1;

/// The bytes all uploads may hold in memory at once, served in file order.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

/// A file's place in line for the budget: every buffer of an earlier turn is
/// served before any of a later one; within a turn, first come first served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Turn {
    // Field order is the order of service.
    kind: BufferKind,
    seq: u64,
}

/// What a file's buffers hold; whole files are served before parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BufferKind {
    /// The whole file, for one PUT.
    WholeFile,
    /// One part of a multipart upload.
    Part,
}

struct Inner {
    next_turn: AtomicU64,
    // A std Mutex: it is held only to move counts and wake a waiter, never
    // across an await.
    line: Mutex<Line>,
}

/// The limit, the bytes reserved and who waits for them; the big buffers in
/// use and spare.
struct Line {
    /// `upload.memory_limit`; a reload may change it ([`Budget::set_limit`]).
    total: u64,
    /// Bytes reserved now; above `total` only after the limit was lowered.
    used: u64,
    /// Keyed by (turn, arrival): the first entry is served first, and nobody
    /// behind it is served while it does not fit (no buffer starves).
    waiting: BTreeMap<(Turn, u64), Waiter>,
    arrivals: u64,
    /// Bytes of the [`Buffer`]s alive now, of every size: spares must fit
    /// beside small ones too.
    buffers_live: u64,
    /// Sent buffers kept for the next one of the same size.
    spares: Vec<Vec<u8>>,
    spare_bytes: u64,
}

/// Buffers from this size up are kept for reuse: glibc maps them on their
/// own (`tune_allocator`), so each new one costs a page fault per 4 KiB.
pub const REUSE_MIN: usize = 1024 * 1024;

struct Waiter {
    bytes: u64,
    wake: oneshot::Sender<()>,
}

impl Line {
    /// Whether `bytes` more fit now. When nothing is reserved, anything fits:
    /// a waiter sized under a larger limit is not stuck after a reload.
    fn fits(&self, bytes: u64) -> bool {
        self.used == 0 || self.used + bytes <= self.total
    }

    /// Hands free bytes to the waiters at the front of the line.
    fn serve(&mut self) {
        while let Some((_, first)) = self.waiting.first_key_value() {
            if !self.fits(first.bytes) {
                break;
            }
            let (_, w) = self.waiting.pop_first().expect("the first waiter");
            self.used += w.bytes;
            // A send fails only for a waiter being dropped between its
            // receiver and its `InLine`: that `InLine`, finding itself out of
            // the line, gives the bytes back.
            let _ = w.wake.send(());
        }
    }

    /// Takes out the spares that do not fit beside the buffers in use, for
    /// the caller to free once it has let go of the lock.
    fn evict(&mut self) -> Vec<Vec<u8>> {
        let mut evicted = Vec::new();
        while self.spare_bytes + self.buffers_live > self.total {
            let Some(b) = self.spares.pop() else { break };
            self.spare_bytes -= b.len() as u64;
            evicted.push(b);
        }
        evicted
    }
}

/// Bytes reserved from the budget; released when dropped.
pub struct Reservation {
    budget: Option<Arc<Inner>>,
    pub bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(inner) = self.budget.take() {
            let idle_spares = {
                let mut line = inner.line.lock().expect("budget lock");
                line.used -= self.bytes;
                line.serve();
                if line.used == 0 {
                    line.spare_bytes = 0;
                    std::mem::take(&mut line.spares)
                } else {
                    Vec::new()
                }
            };
            // Unmapped outside the lock.
            drop(idle_spares);
        }
    }
}

/// A buffer for one body, taken with [`Budget::buffer`] under a
/// [`Reservation`]; a big one goes back to the budget's spares when the
/// HTTP client drops it (see [`Buffer::into_bytes`]).
pub struct Buffer {
    data: Vec<u8>,
    home: Option<Arc<Inner>>,
}

impl Buffer {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// The body for the HTTP client, without a copy; the buffer comes back
    /// when the client drops the last handle on it.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let Some(inner) = self.home.take() else {
            return;
        };
        let len = self.data.len() as u64;
        let mut line = inner.line.lock().expect("budget lock");
        line.buffers_live -= len;
        // Kept only if big, while an upload may want it, and only as long as
        // spares and buffers in use fit the budget together.
        let wanted = line.used > 0 && len >= REUSE_MIN as u64;
        if wanted && line.spare_bytes + line.buffers_live + len <= line.total {
            line.spare_bytes += len;
            line.spares.push(std::mem::take(&mut self.data));
        }
        // A buffer not kept is unmapped after this, outside the lock.
    }
}

/// A reservation waiting in line; if the wait is abandoned (the upload was
/// cancelled), it leaves the line, or gives back what it was just granted.
struct InLine {
    inner: Arc<Inner>,
    key: (Turn, u64),
    bytes: u64,
    granted: bool,
}

impl Drop for InLine {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut line = self.inner.line.lock().expect("budget lock");
        if line.waiting.remove(&self.key).is_none() {
            line.used -= self.bytes;
        }
        // Whoever waited behind this one may fit now.
        line.serve();
    }
}

impl Budget {
    pub fn new(limit_bytes: u64) -> Self {
        Budget {
            inner: Arc::new(Inner {
                next_turn: AtomicU64::new(0),
                line: Mutex::new(Line {
                    total: limit_bytes.max(1),
                    used: 0,
                    waiting: BTreeMap::new(),
                    arrivals: 0,
                    buffers_live: 0,
                    spares: Vec::new(),
                    spare_bytes: 0,
                }),
            }),
        }
    }

    /// The largest buffer that can be reserved, taking the body copy into account.
    pub fn max_buffer(&self) -> u64 {
        self.inner.line.lock().expect("budget lock").total / BODY_COPIES
    }

    /// Changes the limit (a reload). Every upload, old and new, shares this
    /// one budget, so the bytes held never exceed the limit in force; after a
    /// lower limit, nothing more is handed out until the bytes held fit it,
    /// and the spares that no longer fit are freed.
    pub fn set_limit(&self, limit_bytes: u64) {
        let evicted = {
            let mut line = self.inner.line.lock().expect("budget lock");
            line.total = limit_bytes.max(1);
            line.serve();
            line.evict()
        };
        drop(evicted);
    }

    /// A new place in line for a file's buffers of `kind`, after every turn
    /// of that kind given out before.
    pub fn turn(&self, kind: BufferKind) -> Turn {
        Turn {
            kind,
            seq: self.inner.next_turn.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A buffer of `buffer_len` bytes (plus its in-flight copy), once it fits
    /// and every earlier turn that waits has been served. Buffers larger than
    /// [`Budget::max_buffer`] take the whole budget.
    ///
    /// The place in line is taken when this is called, not when the future is
    /// first polled: a part that asks for the next part's buffer before
    /// dropping its own keeps its file ahead of later files.
    pub fn reserve(
        &self,
        turn: Turn,
        buffer_len: u64,
    ) -> impl std::future::Future<Output = Reservation> + Send + 'static {
        let inner = self.inner.clone();
        let mut line = inner.line.lock().expect("budget lock");
        let bytes = buffer_len.saturating_mul(BODY_COPIES).min(line.total);
        let place = if bytes == 0 {
            Ok(Reservation {
                budget: None,
                bytes,
            })
        } else {
            let behind = line
                .waiting
                .first_key_value()
                .is_some_and(|(k, _)| k.0 <= turn);
            if !behind && line.fits(bytes) {
                line.used += bytes;
                Ok(Reservation {
                    budget: Some(inner.clone()),
                    bytes,
                })
            } else {
                let key = (turn, line.arrivals);
                line.arrivals += 1;
                let (wake, granted) = oneshot::channel();
                line.waiting.insert(key, Waiter { bytes, wake });
                let in_line = InLine {
                    inner: inner.clone(),
                    key,
                    bytes,
                    granted: false,
                };
                Err((in_line, granted))
            }
        };
        drop(line);
        async move {
            match place {
                Ok(reservation) => reservation,
                Err((mut in_line, granted)) => {
                    granted
                        .await
                        .expect("a waiter is woken before it leaves the line");
                    in_line.granted = true;
                    Reservation {
                        budget: Some(in_line.inner.clone()),
                        bytes: in_line.bytes,
                    }
                }
            }
        }
    }

    /// A buffer of `len` bytes for a body, to be taken under a reservation
    /// of at least `len`: a spare one of this very size if there is one
    /// (its old contents are overwritten by the caller), else a new one, for
    /// which spares that no longer fit the budget beside it are freed.
    pub fn buffer(&self, len: usize) -> Buffer {
        let evicted = {
            let mut line = self.inner.line.lock().expect("budget lock");
            line.buffers_live += len as u64;
            // Taken before any spare is freed: a part reuses its own size's.
            let spare = (len >= REUSE_MIN)
                .then(|| line.spares.iter().position(|b| b.len() == len))
                .flatten();
            if let Some(i) = spare {
                let data = line.spares.swap_remove(i);
                line.spare_bytes -= len as u64;
                return Buffer {
                    data,
                    home: Some(self.inner.clone()),
                };
            }
            line.evict()
        };
        drop(evicted);
        Buffer {
            data: vec![0; len],
            home: Some(self.inner.clone()),
        }
    }

    /// Bytes of spare buffers held for reuse.
    pub fn spare_bytes(&self) -> u64 {
        self.inner.line.lock().expect("budget lock").spare_bytes
    }

    /// Bytes currently reserved.
    pub fn in_use(&self) -> u64 {
        self.inner.line.lock().expect("budget lock").used
    }
}

/// Tunes glibc's allocator so that resident memory follows the budget
/// instead of its high-water mark; call it once, before the runtime starts.
/// - Every buffer of 1 MiB or more goes straight back to the OS when freed
///   (glibc otherwise raises its mmap threshold after the first large free and
///   keeps later part buffers in the heap).
/// - One arena: glibc gives threads that allocate at once arenas of their own
///   (up to 8 per core), and memory freed in one is not reused by another;
///   with dozens of upload tasks moving between runtime threads and sled's
///   own threads, peak RSS grew far beyond the bytes in use. Two arenas still
///   cost 12 MiB in the state benchmark (bench/RESULTS.md), and small-file
///   throughput did not change with one.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called once at start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Spaces request bodies so that, on average, no more than `bytes_per_sec` are
/// sent. A body waits until the bodies before it would have been sent at that rate.
#[derive(Clone)]
pub struct Pacer {
    /// Bytes per second; 0 is unlimited. Changed by the bandwidth schedule.
    bytes_per_sec: Arc<std::sync::atomic::AtomicU64>,
    next_free: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl Pacer {
    /// `0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> Self {
        Pacer {
            bytes_per_sec: Arc::new(std::sync::atomic::AtomicU64::new(bytes_per_sec)),
            next_free: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Changes the rate for the bodies that start from now on (every clone).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let old = self
            .bytes_per_sec
            .swap(bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
        if old != bytes_per_sec {
            // Bodies already spaced out at the old rate keep their turn; the
            // next one waits no longer than the new rate asks.
            *self.next_free.lock().expect("pacer lock") = None;
        }
    }

    pub fn rate(&self) -> u64 {
        self.bytes_per_sec
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes this body's turn: how long from now it must wait before it
    /// starts.
    pub fn turn(&self, bytes: u64) -> std::time::Duration {
        let rate = self.rate();
        if rate == 0 || bytes == 0 {
            return std::time::Duration::ZERO;
        }
        let cost = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
        let mut next = self.next_free.lock().expect("pacer lock");
        let now = tokio::time::Instant::now();
        let start = next.map_or(now, |n| n.max(now));
        *next = Some(start + cost);
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Pacer {
        /// Waits for this body's turn (the uploader's `paced` without the
        /// watchdog).
        async fn take(&self, bytes: u64) {
            tokio::time::sleep(self.turn(bytes)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_bodies_by_rate() {
        let p = Pacer::new(1000);
        let t0 = tokio::time::Instant::now();
        p.take(500).await;
        assert_eq!(t0.elapsed(), std::time::Duration::ZERO);
        p.take(1000).await;
        assert_eq!(t0.elapsed(), std::time::Duration::from_millis(500));
        p.take(10).await;
        assert_eq!(t0.elapsed(), std::time::Duration::from_millis(1500));
        Pacer::new(0).take(u64::MAX).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_applies_to_the_next_body() {
        let p = Pacer::new(1000);
        let t0 = tokio::time::Instant::now();
        p.take(1000).await;
        p.take(1000).await;
        assert_eq!(t0.elapsed(), std::time::Duration::from_secs(1));
        p.clone().set_rate(0);
        p.take(1_000_000).await;
        p.take(1_000_000).await;
        assert_eq!(
            t0.elapsed(),
            std::time::Duration::from_secs(1),
            "unlimited now"
        );
        p.set_rate(500);
        assert_eq!(p.rate(), 500);
        p.take(500).await;
        p.take(500).await;
        assert_eq!(t0.elapsed(), std::time::Duration::from_secs(2));
    }

    #[tokio::test]
    async fn reservations_block_until_released() {
        let b = Budget::new(64 * 1024 * 1024);
        let half = b.max_buffer() / 2;
        assert_eq!(b.max_buffer(), 64 * 1024 * 1024 / BODY_COPIES);
        let t = b.turn(BufferKind::Part);
        let r1 = b.reserve(t, half).await;
        let _r2 = b.reserve(t, half).await;
        assert_eq!(b.in_use(), 64 * 1024 * 1024);
        let waiter = reserved_bytes(&b, t, 1024);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(r1);
        assert_eq!(waiter.await.unwrap(), 1024 * BODY_COPIES);
        assert_eq!(b.in_use(), half);
    }

    #[tokio::test]
    async fn zero_bytes_reserve_nothing() {
        let b = Budget::new(1024 * 1024);
        let _r = b.reserve(b.turn(BufferKind::WholeFile), 0).await;
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn a_buffer_larger_than_the_budget_takes_all_of_it() {
        let b = Budget::new(1000);
        let r = b.reserve(b.turn(BufferKind::WholeFile), 5000).await;
        assert_eq!((r.bytes, b.in_use()), (1000, 1000));
        drop(r);
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn a_lower_limit_holds_for_bytes_reserved_before_it() {
        let b = Budget::new(100);
        let t = b.turn(BufferKind::Part);
        let old = b.reserve(t, 80).await;
        b.set_limit(50);
        // 80 held under the old limit: nothing more until they are back.
        let small = reserved_bytes(&b, b.turn(BufferKind::WholeFile), 10);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!small.is_finished());
        assert_eq!(b.max_buffer(), 50 / BODY_COPIES);
        drop(old);
        assert_eq!(small.await.unwrap(), 10);
        // A waiter sized under the old limit is served once nothing is held.
        let held = b.reserve(t, 50).await;
        let big = reserved_bytes(&b, t, 80);
        until_waiting(&b, 1).await;
        b.set_limit(40);
        drop(held);
        assert_eq!(big.await.unwrap(), 50);
        // A higher limit lets waiters in at once.
        let held = b.reserve(t, 40).await;
        let next = reserved_bytes(&b, t, 30);
        until_waiting(&b, 1).await;
        b.set_limit(70);
        assert_eq!(next.await.unwrap(), 30);
        assert_eq!(b.in_use(), 40);
        drop(held);
        assert_eq!(b.in_use(), 0);
    }

    /// A task that reserves `len` bytes in `turn` (asking when it first
    /// runs), then gives them back; its output is the bytes it was granted.
    fn reserved_bytes(b: &Budget, turn: Turn, len: u64) -> tokio::task::JoinHandle<u64> {
        let b = b.clone();
        tokio::spawn(async move { b.reserve(turn, len).await.bytes })
    }

    /// Waits until `n` reservations wait in line.
    async fn until_waiting(b: &Budget, n: usize) {
        while b.inner.line.lock().unwrap().waiting.len() < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_earlier_file_is_served_before_a_later_one_that_waited_longer() {
        let b = Budget::new(100);
        let (first, second) = (b.turn(BufferKind::Part), b.turn(BufferKind::Part));
        let held = b.reserve(first, 100).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |turn: Turn, name: &'static str| {
            let (b, order) = (b.clone(), order.clone());
            tokio::spawn(async move {
                let r = b.reserve(turn, 60).await;
                order.lock().unwrap().push(name);
                tokio::task::yield_now().await;
                drop(r);
            })
        };
        let late = spawn(second, "second file");
        until_waiting(&b, 1).await;
        let early = spawn(first, "first file, next part");
        until_waiting(&b, 2).await;
        drop(held);
        early.await.unwrap();
        late.await.unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            ["first file, next part", "second file"]
        );
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn a_later_file_does_not_jump_a_waiting_earlier_one() {
        let b = Budget::new(100);
        let (first, second) = (b.turn(BufferKind::Part), b.turn(BufferKind::Part));
        let held = b.reserve(first, 50).await;
        let big = reserved_bytes(&b, first, 100);
        until_waiting(&b, 1).await;
        // 50 bytes are free, but the earlier file waits for 100: the later
        // one queues behind it instead of starving it.
        let small = reserved_bytes(&b, second, 10);
        until_waiting(&b, 2).await;
        assert_eq!(b.in_use(), 50);
        drop(held);
        assert_eq!(big.await.unwrap(), 100);
        assert_eq!(small.await.unwrap(), 10);
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_line_and_lets_the_next_in() {
        let b = Budget::new(100);
        let (first, second) = (b.turn(BufferKind::Part), b.turn(BufferKind::Part));
        let held = b.reserve(first, 50).await;
        let blocked = reserved_bytes(&b, first, 100);
        until_waiting(&b, 1).await;
        let behind = reserved_bytes(&b, second, 50);
        until_waiting(&b, 2).await;
        blocked.abort();
        assert!(blocked.await.unwrap_err().is_cancelled());
        assert_eq!(behind.await.unwrap(), 50, "served once the head left");
        drop(held);
        assert_eq!(b.in_use(), 0, "nothing leaked by the cancelled wait");
    }

    #[tokio::test]
    async fn a_whole_file_goes_before_parts_of_an_earlier_file() {
        let b = Budget::new(100);
        let video = b.turn(BufferKind::Part);
        let image = b.turn(BufferKind::WholeFile);
        assert!(image < video);
        let held = b.reserve(video, 100).await;
        let next_part = b.reserve(video, 100);
        let small = b.reserve(image, 10);
        drop(held);
        let small = small.await;
        assert_eq!(b.in_use(), 10, "the image first; the part waits for room");
        drop(small);
        assert_eq!(next_part.await.bytes, 100);
    }

    #[tokio::test]
    async fn the_place_in_line_is_taken_at_the_call() {
        let b = Budget::new(100);
        let (first, second) = (b.turn(BufferKind::Part), b.turn(BufferKind::Part));
        let held = b.reserve(first, 100).await;
        let other_file = b.reserve(second, 100);
        // The first file asks for its next part's buffer, then gives back the
        // one it holds: its next part is served, not the later file.
        let next = b.reserve(first, 100);
        drop(held);
        let next = next.await;
        drop(other_file);
        assert_eq!(b.in_use(), 100);
        drop(next);
        assert_eq!(
            b.in_use(),
            0,
            "the dropped, never polled wait left the line"
        );
    }

    const MIB: usize = 1024 * 1024;

    fn turn(b: &Budget) -> Turn {
        b.turn(BufferKind::Part)
    }

    #[tokio::test]
    async fn a_sent_part_buffer_serves_the_next_part_of_its_size() {
        let b = Budget::new(32 * MIB as u64);
        let r1 = b.reserve(turn(&b), 8 * MIB as u64).await;
        let mut first = b.buffer(8 * MIB);
        first.as_mut_slice()[0] = 42;
        let at = first.as_ref().as_ptr();
        let sent = first.into_bytes();
        let clone = sent.clone();
        drop(sent);
        assert_eq!(b.spare_bytes(), 0, "still held by the HTTP client");
        drop(clone);
        assert_eq!(b.spare_bytes(), 8 * MIB as u64);
        let r2 = b.reserve(turn(&b), 8 * MIB as u64).await;
        drop(r1);
        let next = b.buffer(8 * MIB);
        assert_eq!(next.as_ref().as_ptr(), at, "the same memory again");
        assert_eq!(b.spare_bytes(), 0);
        let other = b.buffer(2 * MIB);
        assert_ne!(other.as_ref().as_ptr(), at, "another size is new");
        drop((next, other, r2));
    }

    #[tokio::test]
    async fn spares_and_buffers_in_use_fit_the_budget_together() {
        let b = Budget::new(16 * MIB as u64);
        let r = b.reserve(turn(&b), 16 * MIB as u64).await;
        drop(b.buffer(8 * MIB));
        drop(b.buffer(4 * MIB));
        assert_eq!(b.spare_bytes(), 12 * MIB as u64);
        // Two new 6 MiB buffers: the spares that no longer fit beside them go.
        let x = b.buffer(6 * MIB);
        assert_eq!(b.spare_bytes(), 8 * MIB as u64, "the 4 MiB spare went");
        let y = b.buffer(6 * MIB);
        assert_eq!(b.spare_bytes(), 0, "the 8 MiB spare went");
        drop(x);
        drop(y);
        assert_eq!(b.spare_bytes(), 12 * MIB as u64);
        // Small buffers come from the heap and are never kept.
        drop(b.buffer(REUSE_MIN - 1));
        assert_eq!(b.spare_bytes(), 12 * MIB as u64);
        drop(r);
    }

    /// Bytes in the buffers the test holds plus the budget's spares.
    fn held(b: &Budget, buffers: &[&Buffer]) -> u64 {
        let in_use: usize = buffers.iter().map(|buf| buf.as_ref().len()).sum();
        in_use as u64 + b.spare_bytes()
    }

    /// A video's four lanes, each with an 8 MiB part's reservation and buffer.
    async fn four_part_lanes(b: &Budget, video: Turn) -> Vec<(Reservation, Buffer)> {
        let mut lanes = Vec::new();
        for _ in 0..4 {
            let r = b.reserve(video, 8 * MIB as u64).await;
            lanes.push((r, b.buffer(8 * MIB)));
        }
        lanes
    }

    #[tokio::test]
    async fn spares_and_small_buffers_fit_the_budget_together() {
        // A video's four lanes fill the budget; one part is sent and its
        // buffer kept as a spare, then thumbnails (whole files, served before
        // the video's next part) take the bytes that part gives back.
        let total = 32 * MIB as u64;
        let b = Budget::new(total);
        let video = turn(&b);
        let mut lanes = four_part_lanes(&b, video).await;
        let (sent_reservation, sent) = lanes.pop().expect("a lane");
        drop(sent.into_bytes());
        assert_eq!(b.spare_bytes(), 8 * MIB as u64);
        let thumbnails: Vec<_> = (0..16)
            .map(|_| b.reserve(b.turn(BufferKind::WholeFile), (MIB / 2) as u64))
            .collect();
        let next_part = b.reserve(video, 8 * MIB as u64);
        drop(sent_reservation);
        let mut small = Vec::new();
        for t in thumbnails {
            let r = t.await;
            small.push((r, b.buffer(MIB / 2)));
        }
        assert_eq!(b.in_use(), total, "the thumbnails took the freed bytes");
        let buffers: Vec<&Buffer> = lanes.iter().chain(&small).map(|(_, buf)| buf).collect();
        assert!(
            held(&b, &buffers) <= total,
            "{} bytes held: the spare was kept beside the thumbnails",
            held(&b, &buffers)
        );
        drop(small);
        let r = next_part.await;
        let part = b.buffer(8 * MIB);
        let buffers: Vec<&Buffer> = lanes.iter().map(|(_, buf)| buf).chain([&part]).collect();
        assert!(held(&b, &buffers) <= total);
        drop((r, part, lanes));
        assert_eq!((b.in_use(), b.spare_bytes()), (0, 0));
    }

    #[tokio::test]
    async fn a_lower_limit_frees_the_spares_that_no_longer_fit() {
        let b = Budget::new(32 * MIB as u64);
        let r = b.reserve(turn(&b), 16 * MIB as u64).await;
        let in_use = b.buffer(8 * MIB);
        drop(b.buffer(8 * MIB));
        assert_eq!(b.spare_bytes(), 8 * MIB as u64);
        b.set_limit(12 * MIB as u64);
        assert_eq!(b.spare_bytes(), 0, "8 + 8 MiB held, over 12");
        drop((in_use, r));
    }

    #[tokio::test]
    async fn a_full_budget_still_reuses_a_part_buffer() {
        // Four lanes of 8 MiB fill the default 32 MiB budget: a lane's next
        // part takes its last part's buffer, not a new one.
        let b = Budget::new(32 * MIB as u64);
        let video = turn(&b);
        let mut lanes = four_part_lanes(&b, video).await;
        let (sent_reservation, sent) = lanes.pop().expect("a lane");
        let at = sent.as_ref().as_ptr();
        drop(sent.into_bytes());
        let next = b.reserve(video, 8 * MIB as u64);
        drop(sent_reservation);
        let r = next.await;
        let part = b.buffer(8 * MIB);
        assert_eq!(part.as_ref().as_ptr(), at, "the same memory again");
        assert_eq!(b.spare_bytes(), 0);
        drop((r, part, lanes));
    }

    #[tokio::test]
    async fn an_idle_budget_keeps_no_spares() {
        let b = Budget::new(32 * MIB as u64);
        let r = b.reserve(turn(&b), 8 * MIB as u64).await;
        let held = b.buffer(8 * MIB).into_bytes();
        drop(b.buffer(8 * MIB));
        assert_eq!(b.spare_bytes(), 8 * MIB as u64);
        drop(r);
        assert_eq!(b.spare_bytes(), 0, "freed with the last reservation");
        drop(held);
        assert_eq!(b.spare_bytes(), 0, "a buffer sent after that is freed too");
    }
}
