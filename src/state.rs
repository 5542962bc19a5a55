//! Durable state in `state_dir`: the instance lock, the "managed since" mark, and
//! the sled database holding the queue and the location records.
//!
//! Guarantees:
//! - the lock file is taken before sled opens, so a second instance on the same
//!   state_dir is refused with the pid of the first;
//! - a location record and the queue item's next stage are written in one
//!   transaction, and [`State::durable`] returns only once they are on disk
//!   (flushes are batched across workers, never one fsync per file);
//! - finished queue items leave nothing behind; a record holds a provider id and a
//!   key (bounded size), never a full URL;
//! - only real corruption moves the database aside (see [`State::open`]).

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Errors opening or using the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("offloadd is already running (pid {pid}) on state_dir {dir}; stop it first or give this instance its own state_dir")]
    AlreadyRunning { pid: u32, dir: PathBuf },
    #[error(
        "cannot use state_dir {dir}: {source}; create it and make it writable by the offloadd user"
    )]
    Unusable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state database in {dir} cannot be opened: {message}; check its permissions and free disk space")]
    Database { dir: PathBuf, message: String },
    #[error("the state database failed: {0}; check free disk space in state_dir")]
    Sled(#[from] sled::Error),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What makes a file "the same file": device, inode, size, mtime and ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }

    /// The later of mtime and ctime, in nanoseconds since the epoch.
    pub fn changed_ns(&self) -> i128 {
        self.mtime_ns.max(self.ctime_ns)
    }
}

/// One part of a multipart upload the server has accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartDone {
    pub number: u32,
    pub etag: String,
    pub md5: [u8; 16],
}

/// Progress of a multipart upload, kept so a restart resumes or aborts it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultipartProgress {
    pub provider: String,
    pub key: String,
    pub upload_id: String,
    pub part_size: u64,
    pub identity: FileIdentity,
    pub parts: Vec<PartDone>,
}

/// Where a queue item stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Stage {
    /// Waiting to be uploaded (possibly with a multipart upload under way).
    Upload {
        multipart: Option<MultipartProgress>,
    },
    /// Uploaded and recorded; the local copy is to be deleted once it is old enough
    /// and still the file that was uploaded.
    Delete {
        identity: FileIdentity,
        not_before_ms: u64,
    },
    /// Not going to be uploaded until an operator acts; `reason` says why.
    Parked { reason: String },
}

/// A durable queue entry, keyed by the raw bytes of the path relative to the root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueItem {
    pub stage: Stage,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub last_error: Option<String>,
}

impl QueueItem {
    pub fn upload_now() -> Self {
        QueueItem {
            stage: Stage::Upload { multipart: None },
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
        }
    }

    pub fn parked(reason: String) -> Self {
        QueueItem {
            stage: Stage::Parked {
                reason: reason.clone(),
            },
            attempts: 0,
            next_attempt_ms: 0,
            last_error: Some(reason),
        }
    }

    pub fn is_parked(&self) -> bool {
        matches!(self.stage, Stage::Parked { .. })
    }
}

/// Where an offloaded file lives now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub provider: String,
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub uploaded_ms: u64,
    pub identity: FileIdentity,
    pub local_deleted: bool,
    /// Set when the local copy was meant to be deleted but could not be.
    pub local_kept: Option<String>,
}

/// sled's page cache; its default (1 GiB) would let a large index eat memory.
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

const META_INITIALIZED: &[u8] = b"initialized";
const META_UPLOADED_COUNT: &[u8] = b"uploaded_count";
const META_UPLOADED_BYTES: &[u8] = b"uploaded_bytes";
const META_PAUSED_PREFIX: &str = "paused/";

/// The exclusive lock on a state directory, held for the life of the process.
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("offloadd.lock")
    }

    /// Takes the lock, or reports the pid of the instance holding it.
    pub fn acquire(state_dir: &Path) -> Result<Lock, StateError> {
        let unusable = |source| StateError::Unusable {
            dir: state_dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(unusable)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(Self::path(state_dir))
            .map_err(unusable)?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                return Err(StateError::AlreadyRunning {
                    pid: s.trim().parse().unwrap_or(0),
                    dir: state_dir.to_path_buf(),
                });
            }
            return Err(unusable(err));
        }
        file.set_len(0).map_err(unusable)?;
        file.rewind().map_err(unusable)?;
        writeln!(file, "{}", std::process::id()).map_err(unusable)?;
        Ok(Lock { _file: file })
    }

    /// The pid of the running instance, if one holds the lock.
    pub fn holder(state_dir: &Path) -> Option<u32> {
        let file = File::open(Self::path(state_dir)).ok()?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_SH | libc::LOCK_NB,
            )
        };
        if rc == 0 {
            return None;
        }
        let s = std::fs::read_to_string(Self::path(state_dir)).ok()?;
        s.trim().parse().ok()
    }
}

/// The "managed since" mark: files whose mtime and ctime are both older are left
/// for `backfill`. Kept in a small file outside the database so a database rebuild
/// never moves it.
pub mod mark {
    use super::*;

    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("managed-since")
    }

    /// The mark in nanoseconds since the epoch, if it has been set.
    pub fn read(state_dir: &Path) -> Option<i128> {
        std::fs::read_to_string(path(state_dir))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Returns the mark, setting it to now (durably) if it was not set yet.
    pub fn ensure(state_dir: &Path) -> std::io::Result<i128> {
        if let Some(m) = read(state_dir) {
            return Ok(m);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        let tmp = state_dir.join("managed-since.tmp");
        let mut f = File::create(&tmp)?;
        writeln!(f, "{now}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path(state_dir))?;
        File::open(state_dir)?.sync_all()?;
        Ok(now)
    }
}

/// Counts shown by `status`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Totals {
    pub queue_depth: u64,
    pub uploaded_count: u64,
    pub uploaded_bytes: u64,
}

/// The sled database: `queue` (path → [`QueueItem`]), `records` (path → [`Record`])
/// and `meta` (counters, paused providers).
#[derive(Clone)]
pub struct State {
    db: sled::Db,
    queue: sled::Tree,
    records: sled::Tree,
    meta: sled::Tree,
    commit: Arc<GroupCommit>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state values always serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

fn add_u64(meta: &sled::transaction::TransactionalTree, key: &[u8], delta: i128) -> TxResult<()> {
    let old = meta
        .get(key)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0);
    let new = (old as i128 + delta).max(0) as u64;
    meta.insert(key, &new.to_be_bytes())?;
    Ok(())
}

type TxResult<T> = Result<T, ConflictableTransactionError<()>>;

fn tx_err(e: TransactionError<()>) -> sled::Error {
    match e {
        TransactionError::Storage(e) => e,
        TransactionError::Abort(()) => sled::Error::Unsupported("transaction aborted".into()),
    }
}

impl State {
    /// Opens the database in `state_dir` (the caller holds the [`Lock`]).
    ///
    /// A database that sled reports as corrupt is moved aside to
    /// `db.corrupt-<time>` and a fresh one is created; `rebuilt` is then true.
    pub fn open(state_dir: &Path) -> Result<(State, bool), StateError> {
        let db_path = state_dir.join("db");
        let open = || {
            sled::Config::new()
                .path(&db_path)
                .flush_every_ms(Some(500))
                .cache_capacity(SLED_CACHE_BYTES)
                .open()
        };
        let (db, rebuilt) = match open() {
            Ok(db) => (db, false),
            Err(sled::Error::Corruption { .. }) => {
                let aside = state_dir.join(format!("db.corrupt-{}", now_ms()));
                std::fs::rename(&db_path, &aside).map_err(|source| StateError::Unusable {
                    dir: state_dir.to_path_buf(),
                    source,
                })?;
                tracing::error!(
                    moved_to = %aside.display(),
                    "the state database was corrupt and has been moved aside; starting a fresh one and rebuilding from the directory"
                );
                (open()?, true)
            }
            Err(sled::Error::Io(e)) => {
                return Err(StateError::Unusable {
                    dir: state_dir.to_path_buf(),
                    source: e,
                })
            }
            Err(e) => {
                return Err(StateError::Database {
                    dir: state_dir.to_path_buf(),
                    message: e.to_string(),
                })
            }
        };
        let state = State {
            queue: db.open_tree("queue")?,
            records: db.open_tree("records")?,
            meta: db.open_tree("meta")?,
            db,
            commit: Arc::new(GroupCommit::new()),
        };
        // A database without our marker, in a state_dir that has been managed
        // before, has lost its contents (deleted, or truncated by recovery).
        let fresh = state.meta.get(META_INITIALIZED)?.is_none();
        let lost = fresh && mark::read(state_dir).is_some();
        if lost && !rebuilt {
            tracing::warn!("the state database is empty although this state_dir was managed before; rebuilding the location records");
        }
        Ok((state, rebuilt || lost))
    }

    /// Marks the database as holding this state_dir's records (the daemon calls
    /// it once any rebuild is done), so a later loss is recognised.
    pub fn set_initialized(&self) -> Result<(), sled::Error> {
        if self.meta.get(META_INITIALIZED)?.is_none() {
            self.meta.insert(META_INITIALIZED, b"1".as_slice())?;
            self.db.flush()?;
        }
        Ok(())
    }

    pub fn queue_item(&self, path: &[u8]) -> Result<Option<QueueItem>, sled::Error> {
        Ok(self.queue.get(path)?.and_then(|v| decode(&v)))
    }

    pub fn put_queue_item(&self, path: &[u8], item: &QueueItem) -> Result<(), sled::Error> {
        self.queue.insert(path, encode(item))?;
        Ok(())
    }

    pub fn remove_queue_item(&self, path: &[u8]) -> Result<(), sled::Error> {
        self.queue.remove(path)?;
        Ok(())
    }

    pub fn record(&self, path: &[u8]) -> Result<Option<Record>, sled::Error> {
        Ok(self.records.get(path)?.and_then(|v| decode(&v)))
    }

    /// Every queue item, in path order.
    pub fn queue_items(&self) -> impl Iterator<Item = (Vec<u8>, QueueItem)> {
        self.queue.iter().filter_map(|r| {
            let (k, v) = r.ok()?;
            Some((k.to_vec(), decode(&v)?))
        })
    }

    /// Writes the location record and the item's next stage (or removes the item)
    /// in one transaction. Call [`State::durable`] before acting on it.
    pub fn record_uploaded(
        &self,
        path: &[u8],
        record: &Record,
        next: Option<&QueueItem>,
    ) -> Result<(), sled::Error> {
        let rec = encode(record);
        let next = next.map(encode);
        (&self.records, &self.queue, &self.meta)
            .transaction(|(records, queue, meta)| {
                let old: Option<Record> = records.get(path)?.and_then(|v| decode(&v));
                records.insert(path, rec.as_slice())?;
                match &next {
                    Some(item) => queue.insert(path, item.as_slice())?,
                    None => queue.remove(path)?,
                };
                let (dc, db) = match old {
                    Some(o) => (0, record.size as i128 - o.size as i128),
                    None => (1, record.size as i128),
                };
                add_u64(meta, META_UPLOADED_COUNT, dc)?;
                add_u64(meta, META_UPLOADED_BYTES, db)?;
                Ok(())
            })
            .map_err(tx_err)?;
        self.commit.wrote();
        Ok(())
    }

    /// Marks the local copy of an offloaded file as deleted (or kept, with a reason)
    /// and removes its queue item.
    pub fn finish_local(&self, path: &[u8], kept: Option<String>) -> Result<(), sled::Error> {
        (&self.records, &self.queue)
            .transaction(|(records, queue)| {
                if let Some(mut r) = records.get(path)?.and_then(|v| decode::<Record>(&v)) {
                    match &kept {
                        Some(reason) => r.local_kept = Some(reason.clone()),
                        None => r.local_deleted = true,
                    }
                    records.insert(path, encode(&r))?;
                }
                queue.remove(path)?;
                Ok(())
            })
            .map_err(tx_err)?;
        self.commit.wrote();
        Ok(())
    }

    /// Removes a file's record and queue item (delete-through).
    pub fn forget(&self, path: &[u8]) -> Result<(), sled::Error> {
        (&self.records, &self.queue, &self.meta)
            .transaction(|(records, queue, meta)| {
                if let Some(old) = records.remove(path)?.and_then(|v| decode::<Record>(&v)) {
                    add_u64(meta, META_UPLOADED_COUNT, -1)?;
                    add_u64(meta, META_UPLOADED_BYTES, -(old.size as i128))?;
                }
                queue.remove(path)?;
                Ok(())
            })
            .map_err(tx_err)?;
        self.commit.wrote();
        Ok(())
    }

    /// Waits until everything written so far is on disk. Concurrent callers share
    /// one flush.
    pub async fn durable(&self) -> Result<(), sled::Error> {
        self.commit.wait(&self.db).await
    }

    /// Uploaded count and bytes, from the counters kept with the records.
    pub fn uploaded(&self) -> (u64, u64) {
        let get = |k: &[u8]| {
            self.meta
                .get(k)
                .ok()
                .flatten()
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0)
        };
        (get(META_UPLOADED_COUNT), get(META_UPLOADED_BYTES))
    }

    pub fn totals(&self) -> Totals {
        let (uploaded_count, uploaded_bytes) = self.uploaded();
        Totals {
            queue_depth: self.queue_items().filter(|(_, i)| !i.is_parked()).count() as u64,
            uploaded_count,
            uploaded_bytes,
        }
    }

    /// Remembers (or, with `None`, forgets) why a provider is paused, so `status`
    /// can tell after the daemon stopped.
    pub fn set_paused(
        &self,
        provider: &str,
        reason: Option<&PausedInfo>,
    ) -> Result<(), sled::Error> {
        let key = format!("{META_PAUSED_PREFIX}{provider}");
        match reason {
            Some(info) => self.meta.insert(key.as_bytes(), encode(info))?,
            None => self.meta.remove(key.as_bytes())?,
        };
        Ok(())
    }

    pub fn paused(&self) -> Vec<PausedInfo> {
        self.meta
            .scan_prefix(META_PAUSED_PREFIX.as_bytes())
            .filter_map(|r| decode(&r.ok()?.1))
            .collect()
    }

    pub fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush()?;
        Ok(())
    }
}

/// A paused provider and why, as shown by `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PausedInfo {
    pub provider: String,
    pub reason: String,
    pub since: String,
}

/// Batches fsyncs: every writer bumps `written`; a waiter flushes only if nobody
/// has flushed past its write yet, so N concurrent waiters cost about one fsync.
struct GroupCommit {
    written: AtomicU64,
    flushed: watch::Sender<u64>,
    flushing: tokio::sync::Mutex<()>,
}

impl GroupCommit {
    fn new() -> Self {
        GroupCommit {
            written: AtomicU64::new(0),
            flushed: watch::channel(0).0,
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    fn wrote(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }

    async fn wait(&self, db: &sled::Db) -> Result<(), sled::Error> {
        let target = self.written.load(Ordering::SeqCst);
        if *self.flushed.borrow() >= target {
            return Ok(());
        }
        let _guard = self.flushing.lock().await;
        if *self.flushed.borrow() >= target {
            return Ok(());
        }
        let upto = self.written.load(Ordering::SeqCst);
        db.flush_async().await?;
        self.flushed.send_replace(upto);
        Ok(())
    }
}

/// Formats a time for humans and JSON (RFC 3339, UTC, seconds).
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How long ago `ms` was, for log lines.
pub fn since(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn second_lock_reports_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _l = Lock::acquire(dir.path()).unwrap();
        assert_eq!(Lock::holder(dir.path()), Some(std::process::id()));
        // flock locks are per open file description, so a second acquire in the
        // same process is refused too.
        match Lock::acquire(dir.path()) {
            Err(StateError::AlreadyRunning { pid, .. }) => assert_eq!(pid, std::process::id()),
            other => panic!("expected AlreadyRunning, got {:?}", other.err()),
        }
    }

    #[test]
    fn record_transaction_updates_totals_once_per_path() {
        let dir = tempfile::tempdir().unwrap();
        let (s, rebuilt) = State::open(dir.path()).unwrap();
        assert!(!rebuilt);
        let id = FileIdentity {
            dev: 1,
            ino: 2,
            size: 10,
            mtime_ns: 3,
            ctime_ns: 4,
        };
        let rec = Record {
            provider: "p".into(),
            key: "k".into(),
            size: 10,
            etag: "e".into(),
            uploaded_ms: 1,
            identity: id,
            local_deleted: false,
            local_kept: None,
        };
        s.put_queue_item(b"a", &QueueItem::upload_now()).unwrap();
        s.record_uploaded(b"a", &rec, None).unwrap();
        s.record_uploaded(b"a", &rec, None).unwrap();
        let t = s.totals();
        assert_eq!(
            (t.queue_depth, t.uploaded_count, t.uploaded_bytes),
            (0, 1, 10)
        );
        assert!(s.queue_item(b"a").unwrap().is_none());
    }

    #[test]
    fn mark_is_set_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(mark::read(dir.path()), None);
        let m = mark::ensure(dir.path()).unwrap();
        assert_eq!(mark::ensure(dir.path()).unwrap(), m);
    }
}
