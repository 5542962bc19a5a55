//! The durable queue and the location records (sled, in `state_dir/db`): the
//! only code that reads or writes them.
//!
//! Every step of a file's life is one method here, and each checks its rule
//! and returns an error the caller must handle:
//! - [`Queue::admit`] queues a finished file unless its record shows it
//!   offloaded as it is now;
//! - [`Queue::save_multipart`] makes an upload id durable before the first part
//!   is sent, so a crash never orphans it;
//! - [`Queue::record_uploaded`] writes the location record and the item's next
//!   stage in one transaction;
//! - [`Queue::delete_permit`] is the only way to a [`DeletePermit`], and it
//!   gives one only after the record's durable write succeeded;
//! - an upload id an item gives up (parked, dropped, forgotten, abandoned) is
//!   filed for an abort in the same transaction ([`PendingAbort`]), and stays
//!   filed until the abort went through ([`Queue::abort_done`]), so neither a
//!   failed abort nor a stop in the middle leaves its parts billed for good;
//! - [`Queue::drop_vanished`] and [`Queue::local_gone`] need proof that the
//!   root was present just now ([`RootPresent`]), so an unmounted root never
//!   empties the queue.
//!
//! A failed write puts the queue into a failed state that names the disk
//! ([`StateError::Failed`]); writes are refused until [`Queue::recover`]
//! succeeds, which reopens the database when sled's error is sticky. What a
//! reopen cannot mend fails it for good ([`StateError::Restart`], which
//! [`Queue::restart_needed`] announces, and the daemon exits with): a
//! database found corrupt on a read (the next open moves it aside), one that
//! lost records when it was reopened (the same check as at open), and a
//! state_dir or database removed or replaced while the daemon ran
//! ([`Queue::check_place`]; the new state_dir is told that records were
//! lost, so the restart rebuilds them and keeps the managed-since mark).
//!
//! Finished items leave nothing behind; a record holds a provider name and a
//! key (bounded size), never a full URL.
//!
//! A file's record and its queue item share one value under the file's path
//! (one tree, `files`): a burst of uploads rewrites values in place instead of
//! swelling a tree of its own and emptying it again, which sled's log never
//! fully reclaims (a database with a separate queue tree tripled in size over
//! ten bursts of 100,000 files). Databases in the older layout (trees `queue`
//! and `records`) are moved over when opened. The locks are std locks: every
//! critical section is a few synchronous sled calls and never awaits (the
//! reasoning of mini-redis' `db.rs`).

use crate::keys::ItemKey;
use crate::pipeline::finished::FileIdentity;
use crate::pipeline::root::RootPresent;
use crate::statedir;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;

mod encoding;

use encoding::{decode, decode_record, encode, encode_record, Entry};

/// Errors opening or using the state directory.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error("offloadd is already running (pid {pid}) on state_dir {dir}; stop it first or give this instance its own state_dir")]
    AlreadyRunning { pid: u32, dir: PathBuf },
    #[error("an offloadd command (pid {pid}) has kept state_dir {dir} open for more than 10 s (a backfill of a stopped daemon, say); try again once it has finished")]
    Busy { pid: u32, dir: PathBuf },
    #[error("cannot use state_dir {dir}: {message}; create it and make it writable by the offloadd user")]
    Unusable { dir: PathBuf, message: String },
    /// This user may not open state_dir or a file in it (EACCES, EPERM).
    #[error("cannot use state_dir {dir}: {message}; create it and make it writable by the offloadd user")]
    Denied { dir: PathBuf, message: String },
    #[error("the state database in {dir} cannot be opened: {message}; check its permissions and free disk space")]
    Database { dir: PathBuf, message: String },
    #[error("cannot write to state_dir {dir}: {message}; free space there or fix the disk (uploads and deletes wait, nothing is lost, and offloadd resumes by itself)")]
    Failed { dir: PathBuf, message: String },
    /// A multipart upload's progress was to be saved for an item that is no
    /// longer waiting for its upload (a reopened database lost its admission).
    #[error("{key} is no longer queued for upload in the state database, so its multipart upload was given up; a rescan queues it again")]
    NotQueued { key: String },
    /// Only a restart mends the state (a database that lost records or is
    /// corrupt, a state_dir removed or replaced): `run` exits 1 with this
    /// sentence, and the restart moves aside or rebuilds what it must.
    #[error("{message}")]
    Restart { dir: PathBuf, message: String },
}

impl StateError {
    pub fn unusable(dir: &Path, e: impl std::fmt::Display) -> StateError {
        StateError::Unusable {
            dir: dir.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// An I/O error in `dir`, `message` saying what failed: a full or failing
    /// disk may clear, so `run` exits 1 and systemd tries again; anything
    /// else (permissions, a read-only mount) waits for ops (exit 78).
    pub fn of_io(dir: &Path, e: &std::io::Error, message: String) -> StateError {
        let dir = dir.to_path_buf();
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EIO) => StateError::Failed { dir, message },
            Some(libc::EACCES | libc::EPERM) => StateError::Denied { dir, message },
            _ => StateError::Unusable { dir, message },
        }
    }

    /// The sentence for a command (status, locate, …) that opens the state
    /// of a stopped daemon: the daemon's fix for a denied state_dir ("make
    /// it writable by the offloadd user") is wrong for an operator who
    /// merely may not open the service's files.
    pub fn for_command(&self) -> String {
        match self {
            StateError::Denied { dir, message } => format!(
                "offloadd is not running (nothing answers on its control socket) and this user may not open its state in {} ({message}); run the command as root or as the service user",
                dir.display()
            ),
            // The daemon holds the state, yet its socket did not answer.
            StateError::AlreadyRunning { pid, .. } => format!(
                "offloadd is running (pid {pid}) but did not answer on its control socket; it may still be starting, so try again in a moment (if it keeps failing, check control_socket and the socket's directory, RuntimeDirectory= under systemd)"
            ),
            e => e.to_string(),
        }
    }
}

/// Left in state_dir when a read found the database corrupt: the next open
/// moves it aside as it would one it found corrupt itself.
const CORRUPT_NOTE: &str = "db-corrupt";

/// Why the state cannot be written.
#[derive(Debug, Clone)]
enum Failure {
    /// A write failed (a full or failing disk): [`Queue::recover`] tries again.
    Write(String),
    /// Only a restart mends it; the sentence.
    Restart(String),
}

/// The state_dir and sled's log file as opened (device, inode): a state_dir
/// removed or replaced while the daemon runs has others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    dir: (u64, u64),
    log: (u64, u64),
}

impl Place {
    fn id(m: &std::fs::Metadata) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    }

    /// The place the open database is in: the state_dir by path, the log by
    /// the file held.
    fn held(state_dir: &Path, log: &std::fs::File) -> std::io::Result<Place> {
        Ok(Place {
            dir: Place::id(&std::fs::metadata(state_dir)?),
            log: Place::id(&log.metadata()?),
        })
    }

    /// What the paths name now.
    fn now(state_dir: &Path) -> std::io::Result<Place> {
        Ok(Place {
            dir: Place::id(&std::fs::metadata(state_dir)?),
            log: Place::id(&std::fs::metadata(state_dir.join("db").join("db"))?),
        })
    }
}

/// Why the database in `dir` did not open.
fn open_error(dir: &Path, e: sled::Error) -> StateError {
    match e {
        sled::Error::Io(io) => StateError::of_io(dir, &io, io.to_string()),
        e => StateError::Database {
            dir: dir.to_path_buf(),
            message: e.to_string(),
        },
    }
}

/// One part of a multipart upload the server has accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartDone {
    pub number: u32,
    pub etag: String,
    pub md5: [u8; 16],
}

/// Progress of a multipart upload, kept so a restart resumes or aborts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartProgress {
    pub provider: String,
    pub key: String,
    pub upload_id: String,
    pub part_size: u64,
    pub identity: FileIdentity,
    pub parts: Vec<PartDone>,
    /// Unix ms when the upload was initiated.
    #[serde(default)]
    pub started_ms: u64,
}

/// A multipart upload given up, to be aborted at its provider.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingAbort {
    pub provider: String,
    pub key: String,
    pub upload_id: String,
}

impl PendingAbort {
    fn meta_key(&self) -> String {
        format!("{META_ABORT_PREFIX}{}/{}", self.provider, self.upload_id)
    }
}

/// What became of the upload id an item gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GivenUp {
    /// Still open at the server: filed for an abort.
    Open,
    /// Gone at the server already (NoSuchUpload, or completed): nothing to
    /// abort.
    Gone,
}

/// Where a queue item stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Waiting to be uploaded (possibly with a multipart upload under way).
    Upload {
        multipart: Option<MultipartProgress>,
    },
    /// Uploaded and durably recorded; the local copy is to be deleted once it
    /// is old enough and still the file that was uploaded.
    Delete { identity: FileIdentity },
    /// Not going to be uploaded until an operator acts; `reason` says why.
    Parked { reason: String },
}

/// A durable queue entry, keyed by the raw bytes of the path relative to the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueItem {
    pub stage: Stage,
    /// Failed attempts so far (drives the backoff).
    #[serde(default)]
    pub attempts: u32,
    /// Failures of this item while the provider answered a probe that did not
    /// involve it: the item, not the provider, is the problem.
    #[serde(default)]
    pub strikes: u32,
    pub next_attempt_ms: u64,
    pub last_error: Option<String>,
    /// Unix ms when the file was queued for upload (0: unknown).
    #[serde(default)]
    pub queued_ms: u64,
}

impl QueueItem {
    fn upload_now() -> Self {
        QueueItem {
            stage: Stage::Upload { multipart: None },
            attempts: 0,
            strikes: 0,
            next_attempt_ms: 0,
            last_error: None,
            queued_ms: statedir::now_ms(),
        }
    }

    fn parked(reason: String) -> Self {
        QueueItem {
            stage: Stage::Parked {
                reason: reason.clone(),
            },
            attempts: 0,
            strikes: 0,
            next_attempt_ms: 0,
            last_error: Some(reason),
            queued_ms: 0,
        }
    }

    fn delete(identity: FileIdentity) -> Self {
        QueueItem {
            stage: Stage::Delete { identity },
            attempts: 0,
            strikes: 0,
            next_attempt_ms: 0,
            last_error: None,
            queued_ms: 0,
        }
    }

    pub fn is_parked(&self) -> bool {
        matches!(self.stage, Stage::Parked { .. })
    }

    pub fn multipart(&self) -> Option<&MultipartProgress> {
        match &self.stage {
            Stage::Upload { multipart } => multipart.as_ref(),
            _ => None,
        }
    }
}

/// What became of the local copy of an offloaded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Local {
    /// Still on disk (deletion off, not due yet, or not asked for).
    Present,
    /// Deleted by offloadd after a verified upload, or gone by other hands.
    Deleted,
    /// Meant to be deleted, but that failed for good; the reason is shown once.
    Kept { reason: String },
}

/// Where an offloaded file lives now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub provider: String,
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub uploaded_ms: u64,
    pub identity: FileIdentity,
    pub local: Local,
}

/// What follows a verified upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterUpload {
    /// The item is done; the local copy stays.
    Finish,
    /// The local copy is to be deleted once that is safe.
    DeleteLocal,
}

/// Why a path is offered to [`Queue::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A file event: a parked item is retried, since the file changed.
    Event,
    /// A scan: a parked item stays parked.
    Scan,
}

/// What [`Queue::admit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Queued now.
    Queued(Box<QueueItem>),
    /// It was queued already and stays as it is.
    AlreadyQueued(Box<QueueItem>),
    /// Its record shows it offloaded exactly as it is now.
    AlreadyOffloaded,
    /// Parked; a scan does not retry it.
    StillParked,
}

/// How far [`Queue::scan_ring`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// Every item was read.
    Whole,
    /// The reader stopped early.
    Stopped,
}

/// Proof that a file's location record is durable and names this very file;
/// only [`Queue::delete_permit`] makes one. The delete step needs it.
#[derive(Debug)]
pub struct DeletePermit {
    key: ItemKey,
    identity: FileIdentity,
}

impl DeletePermit {
    pub fn key(&self) -> &ItemKey {
        &self.key
    }

    /// The file that was uploaded: only this inode may be deleted.
    pub fn identity(&self) -> &FileIdentity {
        &self.identity
    }
}

/// A paused provider and why, as shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedInfo {
    pub provider: String,
    pub reason: String,
    pub since: String,
}

/// Counts shown by `status`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Totals {
    pub queue_depth: u64,
    pub uploaded_count: u64,
    pub uploaded_bytes: u64,
}

/// sled's page cache; its default (1 GiB) would let a large index eat memory.
/// sled holds about twice this in node copies and values; 8 MiB (with one
/// malloc arena) kept the state benchmark's peak RSS 12 MiB lower than 16 MiB
/// at the same drain rate.
const SLED_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// The database holds this state_dir's records (in the one-entry-per-file
/// layout: an older version, which knows only [`META_INITIALIZED_SPLIT`], takes
/// a newer database for a lost one and rebuilds, instead of reading no records).
const META_INITIALIZED: &[u8] = b"initialized/files";
/// [`META_INITIALIZED`] of the layout with trees `records` and `queue`.
const META_INITIALIZED_SPLIT: &[u8] = b"initialized";
const META_UPLOADED_COUNT: &[u8] = b"uploaded_count";
const META_UPLOADED_BYTES: &[u8] = b"uploaded_bytes";
/// Records removed by delete-through: with the records held, a count that
/// only grows (see [`Queue::records_written`]).
const META_FORGOTTEN: &[u8] = b"forgotten_count";
const META_PAUSED_PREFIX: &str = "paused/";
/// `abort/{provider}/{upload id}`: a [`PendingAbort`] (ids are unique per
/// provider only).
const META_ABORT_PREFIX: &str = "abort/";
const META_ALIVE: &[u8] = b"alive";

struct Trees {
    db: sled::Db,
    /// sled's log file. sled ends a flush with `sync_file_range`, which
    /// neither empties the drive's write cache nor saves the size of a log
    /// that grew, so a power cut could take writes a delete relied on: a
    /// durable write ends with an `fdatasync` of it ([`Trees::flush`]).
    log: Arc<std::fs::File>,
    /// Per file (keyed by its path): an [`Entry`] of its record and queue item.
    files: sled::Tree,
    meta: sled::Tree,
}

/// The trees of the layout before `files`, and which half of an entry each
/// value becomes.
const OLD_TREES: [(&str, Half); 2] = [("records", Half::Record), ("queue", Half::Item)];

#[derive(Debug, Clone, Copy)]
enum Half {
    Record,
    Item,
}

fn open_trees(db_path: &Path) -> sled::Result<Trees> {
    let db = sled::Config::new()
        .path(db_path)
        .flush_every_ms(Some(500))
        .cache_capacity(SLED_CACHE_BYTES)
        .open()?;
    let files = db.open_tree("files")?;
    let meta = db.open_tree("meta")?;
    move_old_trees(&db, &files, &meta)?;
    // sled 0.34 keeps its log in `db` inside its directory.
    let log = Arc::new(std::fs::File::open(db_path.join("db"))?);
    Ok(Trees {
        meta,
        files,
        db,
        log,
    })
}

impl Trees {
    /// Everything written so far, on disk (blocking).
    fn flush(&self) -> sled::Result<()> {
        self.db.flush()?;
        self.log.sync_data()?;
        Ok(())
    }
}

/// Moves the records and queue items of the older layout into `files`. It
/// runs before anything else writes, and the old trees go only once the
/// moved entries are on disk, so an interrupted move is simply done again.
fn move_old_trees(db: &sled::Db, files: &sled::Tree, meta: &sled::Tree) -> sled::Result<()> {
    let names = db.tree_names();
    let old: Vec<(&str, Half)> = OLD_TREES
        .into_iter()
        .filter(|(n, _)| names.iter().any(|t| t == n.as_bytes()))
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    let mut moved = 0u64;
    for &(name, half) in &old {
        for r in db.open_tree(name)?.iter() {
            let (k, v) = r?;
            files.fetch_and_update(&k, |current| {
                let mut e = current.and_then(Entry::split).unwrap_or_default();
                match half {
                    Half::Record => e.record = Some(&v),
                    Half::Item => e.item = Some(&v),
                }
                e.join()
            })?;
            moved += 1;
        }
    }
    if meta.get(META_INITIALIZED_SPLIT)?.is_some() {
        meta.insert(META_INITIALIZED, b"1".as_slice())?;
    }
    db.flush()?;
    for (name, _) in &old {
        db.drop_tree(name)?;
    }
    meta.remove(META_INITIALIZED_SPLIT)?;
    db.flush()?;
    tracing::info!(
        values = moved,
        "the state database was moved to the one-entry-per-file layout"
    );
    Ok(())
}

/// The queue item half of a stored entry.
fn item_of(value: &[u8]) -> Option<QueueItem> {
    decode(Entry::split(value)?.item?)
}

/// The record half of a stored entry under `key`.
fn record_of(key: &[u8], value: &[u8]) -> Option<Record> {
    decode_record(key, Entry::split(value)?.record?)
}

/// How many records were ever written to `t` and not lost (see
/// [`Queue::records_written`]).
fn written_in(t: &Trees) -> sled::Result<u64> {
    // Forgotten first: a removal between the two reads then counts once
    // too few, never once too many (which would look like a loss).
    let forgotten = get_u64(&t.meta, META_FORGOTTEN)?;
    Ok(get_u64(&t.meta, META_UPLOADED_COUNT)? + forgotten)
}

/// How the database `t` of `state_dir`, just opened (at start, or again after
/// a failure), compares with what was noted beside it: empty although the
/// state_dir was managed before, or holding fewer records than noted, it lost
/// records. It then no longer counts as whole until a rebuild completes
/// (the next note of the count, at the first flush, forgets the loss), so a
/// stop before that rebuilds again.
fn judge(state_dir: &Path, t: &Trees) -> sled::Result<Opened> {
    let fresh = t.meta.get(META_INITIALIZED)?.is_none();
    // Records noted before count as having been managed too, should the
    // mark be gone.
    let held = statedir::record_count::read(state_dir);
    if fresh {
        let managed_before =
            statedir::mark::read(state_dir).is_some() || held.is_some_and(|n| n > 0);
        if !managed_before {
            return Ok(Opened::Fresh);
        }
        tracing::warn!("the state database is empty although this state_dir was managed before; the location records are to be rebuilt from the bucket");
        return Ok(Opened::Lost);
    }
    // sled recovers a damaged log by dropping what follows the damage: fewer
    // records written than were durable before means records were lost.
    let now = written_in(t)?;
    match held {
        Some(before) if now < before => {
            tracing::warn!(
                records = now,
                before,
                "the state database holds fewer location records than it did ({now} < {before}): it was damaged; the location records are to be rebuilt from the bucket"
            );
            t.meta.remove(META_INITIALIZED)?;
            t.flush()?;
            Ok(Opened::Lost)
        }
        _ => Ok(Opened::Intact),
    }
}

/// How the database was found when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// Opened as it was.
    Intact,
    /// New in a state_dir never managed before.
    Fresh,
    /// Lost (corrupt and moved aside, or empty although the state_dir was
    /// managed before): the records are to be rebuilt from the bucket.
    Lost,
}

/// The queue and the records; see the module docs.
pub struct Queue {
    dir: PathBuf,
    trees: RwLock<Option<Trees>>,
    commit: GroupCommit,
    failure: Mutex<Option<Failure>>,
    /// Set once the state fails for good ([`Failure::Restart`]).
    restart: watch::Sender<bool>,
    /// The state_dir and log as opened (`None` if they could not be told).
    place: Option<Place>,
    /// The managed-since mark last seen in state_dir, to write back into a
    /// state_dir that replaced it.
    mark: Mutex<Option<i128>>,
    /// An abort was filed since [`Queue::take_filed_aborts`] last looked.
    aborts_filed: AtomicBool,
}

type TxResult<T> = Result<T, ConflictableTransactionError<()>>;

/// Files the multipart upload of `item` (an encoded [`QueueItem`]), if it
/// has one, for an abort; whether it did.
fn file_abort_of(
    meta: &sled::transaction::TransactionalTree,
    item: Option<&[u8]>,
) -> TxResult<bool> {
    let Some(p) = item
        .and_then(decode::<QueueItem>)
        .and_then(|i| i.multipart().cloned())
    else {
        return Ok(false);
    };
    let pending = PendingAbort {
        provider: p.provider,
        key: p.key,
        upload_id: p.upload_id,
    };
    meta.insert(pending.meta_key().as_bytes(), encode(&pending))?;
    Ok(true)
}

fn get_u64(meta: &sled::Tree, key: &[u8]) -> sled::Result<u64> {
    Ok(meta
        .get(key)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
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

fn tx_err(e: TransactionError<()>) -> sled::Error {
    match e {
        TransactionError::Storage(e) => e,
        TransactionError::Abort(()) => sled::Error::Unsupported("transaction aborted".into()),
    }
}

impl Queue {
    /// Opens the database in `state_dir` (the caller holds the
    /// [`statedir::Lock`]). Only real corruption moves it aside, to
    /// `db.corrupt-<time>`; a held lock or a permission error is an error.
    pub fn open(state_dir: &Path) -> Result<(Queue, Opened), StateError> {
        let db_path = state_dir.join("db");
        let corrupt_note = state_dir.join(CORRUPT_NOTE);
        let found_corrupt = if corrupt_note.exists() && db_path.exists() {
            Err(sled::Error::Corruption { at: None, bt: () })
        } else {
            // A note whose database is gone (removed by hand) is of no
            // database: the new one must not be moved aside at the next start.
            let _ = std::fs::remove_file(&corrupt_note);
            open_trees(&db_path)
        };
        let (trees, moved_aside) = match found_corrupt {
            Ok(t) => (t, false),
            Err(sled::Error::Corruption { .. }) => {
                let aside = state_dir.join(format!("db.corrupt-{}", statedir::now_ms()));
                std::fs::rename(&db_path, &aside).map_err(|e| {
                    StateError::of_io(
                        state_dir,
                        &e,
                        format!("cannot move the corrupt database aside: {e}"),
                    )
                })?;
                tracing::error!(
                    moved_to = %aside.display(),
                    "the state database was corrupt and has been moved aside; a fresh one is started, and the location records are to be rebuilt from the bucket"
                );
                let t = open_trees(&db_path).map_err(|e| open_error(state_dir, e))?;
                let _ = std::fs::remove_file(&corrupt_note);
                (t, true)
            }
            Err(e) => return Err(open_error(state_dir, e)),
        };
        let opened = if moved_aside {
            Opened::Lost
        } else {
            judge(state_dir, &trees).map_err(|e| open_error(state_dir, e))?
        };
        let place = Place::held(state_dir, &trees.log).ok();
        let queue = Queue {
            dir: state_dir.to_path_buf(),
            trees: RwLock::new(Some(trees)),
            commit: GroupCommit::new(),
            failure: Mutex::new(None),
            restart: watch::channel(false).0,
            place,
            mark: Mutex::new(statedir::mark::read(state_dir)),
            aborts_filed: AtomicBool::new(false),
        };
        Ok((queue, opened))
    }

    /// How many records were ever written and not lost: those held plus
    /// those delete-through removed. It only grows, so a count taken before a
    /// flush is durable once the flush is, whatever was written or removed
    /// meanwhile.
    fn records_written(&self) -> u64 {
        self.read(written_in).unwrap_or(0)
    }

    /// Notes `written` (a [`Queue::records_written`] taken before a flush that
    /// went through) beside the database: a later start that finds fewer
    /// knows records were lost.
    fn note_record_count(&self, written: u64) {
        if let Err(e) = statedir::record_count::write(&self.dir, written) {
            tracing::debug!(error = %e, "cannot note the record count");
        }
    }

    /// Why the state cannot be written right now, if it cannot.
    pub fn failure(&self) -> Option<String> {
        self.failure_kind().map(|f| match f {
            Failure::Write(m) | Failure::Restart(m) => m,
        })
    }

    fn failure_kind(&self) -> Option<Failure> {
        self.failure.lock().expect("failure lock").clone()
    }

    /// The failure as an error naming the state_dir, if the state is failed.
    pub fn failed_state(&self) -> Option<StateError> {
        self.failure_kind().map(|f| self.error_of(f))
    }

    fn error_of(&self, f: Failure) -> StateError {
        match f {
            Failure::Write(message) => self.failed(message),
            Failure::Restart(message) => StateError::Restart {
                dir: self.dir.clone(),
                message,
            },
        }
    }

    fn failed(&self, message: String) -> StateError {
        StateError::Failed {
            dir: self.dir.clone(),
            message,
        }
    }

    /// The error of the state failing now: the failure in force, else
    /// `message` as a write failure.
    fn failed_now(&self, message: String) -> StateError {
        self.failed_state().unwrap_or_else(|| self.failed(message))
    }

    /// Records a failure (the first one wins until [`Queue::recover`]). A
    /// corrupt database (or a bug sled reports) is one only a restart mends.
    fn fail(&self, e: sled::Error) -> StateError {
        let message = match e {
            sled::Error::Io(io) => io.to_string(),
            sled::Error::Corruption { .. } => {
                if let Err(e) = self.note_corrupt() {
                    tracing::warn!(error = %e, "cannot note in state_dir that the database is corrupt: {e}");
                }
                return self.must_restart(format!(
                    "the state database in {} is corrupt; offloadd exits so that its restart moves it aside and rebuilds the location records from the bucket",
                    self.dir.display()
                ));
            }
            e @ sled::Error::ReportableBug(_) => {
                return self.must_restart(format!(
                    "the state database in {} failed ({e}); offloadd exits so that its restart opens it again",
                    self.dir.display()
                ))
            }
            other => other.to_string(),
        };
        let mut f = self.failure.lock().expect("failure lock");
        if f.is_none() {
            tracing::error!(
                state_dir = %self.dir.display(),
                error = %message,
                "cannot write to state_dir {}: {message}; uploads and deletes wait until it is writable again",
                self.dir.display()
            );
            *f = Some(Failure::Write(message.clone()));
        }
        self.error_of(f.clone().unwrap_or(Failure::Write(message)))
    }

    /// Fails the state for good with `message` (one sentence): writes are
    /// refused, [`Queue::recover`] does not clear it, and
    /// [`Queue::restart_needed`] returns. The first such failure wins.
    fn must_restart(&self, message: String) -> StateError {
        let mut f = self.failure.lock().expect("failure lock");
        // Not logged here: the daemon exits with it at once, and `main`
        // writes the one sentence.
        if !matches!(*f, Some(Failure::Restart(_))) {
            *f = Some(Failure::Restart(message));
        }
        let out = self.error_of(f.clone().expect("a failure"));
        drop(f);
        self.restart.send_replace(true);
        out
    }

    /// Waits until the state has failed for good; the error to exit with.
    pub async fn restart_needed(&self) -> StateError {
        let mut rx = self.restart.subscribe();
        let _ = rx.wait_for(|r| *r).await;
        match self.failure_kind() {
            Some(f @ Failure::Restart(_)) => self.error_of(f),
            _ => unreachable!("a restart is announced after its failure is set"),
        }
    }

    /// Leaves [`CORRUPT_NOTE`] in state_dir (durably).
    fn note_corrupt(&self) -> std::io::Result<()> {
        let path = self.dir.join(CORRUPT_NOTE);
        let f = std::fs::File::create(&path)?;
        f.sync_all()?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Compares the state_dir and the database's log with those opened: if
    /// either was removed or replaced (an `rm -rf`, a restored copy, a
    /// lazily unmounted filesystem), the records written since go to a file
    /// nobody will open again. The state then fails for good, and the
    /// state_dir now at the path is told that records were lost (the record
    /// count, the managed-since mark), so that the restart rebuilds them and
    /// still uploads what was queued. An error other than a missing path
    /// (a failing disk) tells nothing and is left to the writes.
    pub fn check_place(&self) -> Result<(), StateError> {
        if let Some(e @ StateError::Restart { .. }) = self.failed_state() {
            return Err(e);
        }
        let Some(held) = self.place else {
            return Ok(());
        };
        match Place::now(&self.dir) {
            Ok(now) if now == held => {
                if let Some(mark) = statedir::mark::read(&self.dir) {
                    *self.mark.lock().expect("mark lock") = Some(mark);
                }
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {}
            Err(_) => return Ok(()),
        }
        if let Err(e) = self.tell_new_place() {
            tracing::warn!(error = %e, "cannot note in the new state_dir {} that records were lost: {e}", self.dir.display());
        }
        Err(self.must_restart(format!(
            "state_dir {} was removed or replaced while offloadd ran; offloadd exits so that its restart rebuilds the location records from the bucket",
            self.dir.display()
        )))
    }

    /// Tells the state_dir now at the path that this one's records are not
    /// in it: the record count (if higher than it notes) and the mark.
    fn tell_new_place(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let written = self.records_written();
        if statedir::record_count::read(&self.dir).is_none_or(|n| n < written) {
            statedir::record_count::write(&self.dir, written)?;
        }
        if let Some(mark) = *self.mark.lock().expect("mark lock") {
            statedir::mark::set_once(&self.dir, mark)?;
        }
        Ok(())
    }

    fn read<T>(&self, f: impl FnOnce(&Trees) -> sled::Result<T>) -> Result<T, StateError> {
        let guard = self.trees.read().expect("trees lock");
        let Some(trees) = guard.as_ref() else {
            return Err(self.failed_now("the database is closed".into()));
        };
        f(trees).map_err(|e| self.fail(e))
    }

    fn write<T>(&self, f: impl FnOnce(&Trees) -> sled::Result<T>) -> Result<T, StateError> {
        if let Some(e) = self.failed_state() {
            return Err(e);
        }
        let out = self.read(f)?;
        self.commit.wrote();
        Ok(out)
    }

    /// Fails the queue as a full disk would (for tests of the pause).
    #[cfg(test)]
    pub fn inject_failure(&self, message: &str) {
        self.fail(sled::Error::Io(std::io::Error::other(message.to_string())));
    }

    /// Leaves the queue as a recover that could not reopen the database
    /// does: failed, with no database to read (for tests of readers).
    #[cfg(test)]
    pub fn inject_closed(&self, message: &str) {
        self.inject_failure(message);
        *self.trees.write().expect("trees lock") = None;
    }

    /// Makes the state writable again after a failure: a flush that succeeds
    /// clears it; otherwise the database is closed and opened again (sled's
    /// errors are sticky). Unflushed writes may be lost; the caller reloads
    /// its view of the queue. A failure only a restart mends is not cleared;
    /// nor is a database reopened that lost records, or in a state_dir
    /// removed or replaced meanwhile (both fail the state for good).
    pub fn recover(&self) -> Result<Recovered, StateError> {
        let message = match self.failure_kind() {
            None => return Ok(Recovered::Flushed),
            Some(f @ Failure::Restart(_)) => return Err(self.error_of(f)),
            Some(Failure::Write(message)) => message,
        };
        let guard = self.trees.write().expect("trees lock");
        // A database not marked whole before (local mode after a loss, a
        // rebuild that could not finish) is judged "lost" after the reopen
        // too: that is no new loss, and the next start rebuilds it anyway.
        let was_whole = guard
            .as_ref()
            .and_then(|t| t.meta.get(META_INITIALIZED).ok())
            .is_none_or(|v| v.is_some());
        if let Some(t) = guard.as_ref() {
            let probe = t
                .meta
                .insert(b"probe", &statedir::now_ms().to_be_bytes())
                .and_then(|_| t.flush());
            if probe.is_ok() {
                *self.failure.lock().expect("failure lock") = None;
                tracing::info!(state_dir = %self.dir.display(), "state_dir is writable again; uploads and deletes resume");
                return Ok(Recovered::Flushed);
            }
        }
        // Never a new database in a state_dir removed or replaced meanwhile.
        drop(guard);
        self.check_place()?;
        let mut guard = self.trees.write().expect("trees lock");
        *guard = None;
        match open_trees(&self.dir.join("db")) {
            Ok(t) => {
                let writable = t
                    .meta
                    .insert(b"probe", &statedir::now_ms().to_be_bytes())
                    .and_then(|_| t.flush());
                // The same check as at open: sled may have dropped what
                // followed damage in its log.
                let judged = writable.as_ref().ok().map(|_| judge(&self.dir, &t));
                *guard = Some(t);
                drop(guard);
                match judged {
                    Some(Ok(Opened::Lost)) if was_whole => Err(self.must_restart(format!(
                        "the state database in {} lost location records when it was reopened; offloadd exits so that its restart rebuilds them from the bucket",
                        self.dir.display()
                    ))),
                    Some(Err(e)) => Err(self.fail(e)),
                    _ => match writable {
                    Ok(_) => {
                        *self.failure.lock().expect("failure lock") = None;
                        self.commit.reset();
                        tracing::info!(state_dir = %self.dir.display(), "state database reopened; uploads and deletes resume, and the tree is rescanned for what was not written");
                        Ok(Recovered::Reopened)
                    }
                    Err(e) => Err(self.failed(format!("{message} (still: {e})"))),
                    },
                }
            }
            Err(e) => Err(self.failed(format!("{message} (reopening: {e})"))),
        }
    }

    /// Marks the database as holding this state_dir's records (once any
    /// rebuild is done), so that a later loss is recognised.
    pub fn set_initialized(&self) -> Result<(), StateError> {
        self.write(|t| {
            if t.meta.get(META_INITIALIZED)?.is_none() {
                t.meta.insert(META_INITIALIZED, b"1".as_slice())?;
            }
            Ok(())
        })
    }

    /// One small write (no flush), to learn whether the database still
    /// answers: sled can hang under load (spacejam/sled#1412), and a hung
    /// database must be noticed (see `daemon`'s state probe). An error is an
    /// answer too.
    pub fn ping(&self) -> Result<(), StateError> {
        let now = statedir::now_ms().to_be_bytes();
        self.write(|t| t.meta.insert(META_ALIVE, now.as_slice()).map(|_| ()))
    }

    // --- reads ----------------------------------------------------------------

    pub fn item(&self, key: &ItemKey) -> Result<Option<QueueItem>, StateError> {
        self.entry(key).map(|(_, item)| item)
    }

    pub fn record(&self, key: &ItemKey) -> Result<Option<Record>, StateError> {
        self.entry(key).map(|(record, _)| record)
    }

    /// A file's record and queue item, read together.
    pub fn entry(&self, key: &ItemKey) -> Result<(Option<Record>, Option<QueueItem>), StateError> {
        let k = key.as_bytes();
        self.read(|t| {
            Ok(t.files
                .get(k)?
                .map_or((None, None), |v| (record_of(k, &v), item_of(&v))))
        })
    }

    /// Every queue item, in path order.
    pub fn items(&self) -> Result<Vec<(ItemKey, QueueItem)>, StateError> {
        let mut out = Vec::new();
        self.for_each_item(|key, item| out.push((key, item)))?;
        Ok(out)
    }

    /// Every queue item, in path order, one at a time (a queue of a million
    /// items is never all in memory at once).
    pub fn for_each_item(&self, mut f: impl FnMut(ItemKey, QueueItem)) -> Result<(), StateError> {
        self.scan_ring(&[], |key, item| {
            f(key, item);
            ControlFlow::Continue(())
        })
        .map(|_| ())
    }

    /// Queue items one at a time in path order from `from` (inclusive) to the
    /// end, then from the start up to `from`, until `f` breaks. Returns
    /// whether the whole ring was read. `f` must not call the queue. Entries
    /// with a record only are passed over (a read of the whole ring reads
    /// every record: it happens at start and while a backlog waits on disk).
    pub fn scan_ring(
        &self,
        from: &[u8],
        mut f: impl FnMut(ItemKey, QueueItem) -> ControlFlow<()>,
    ) -> Result<Ring, StateError> {
        self.read(|t| {
            for r in t.files.range(from..).chain(t.files.range(..from)) {
                let (k, v) = r?;
                let Some(item) = item_of(&v) else {
                    continue;
                };
                if let Some(key) = ItemKey::from_bytes(k.to_vec()) {
                    if f(key, item).is_break() {
                        return Ok(Ring::Stopped);
                    }
                }
            }
            Ok(Ring::Whole)
        })
    }

    /// Uploaded count and bytes, from the counters kept with the records.
    pub fn uploaded(&self) -> (u64, u64) {
        self.read(|t| {
            Ok((
                get_u64(&t.meta, META_UPLOADED_COUNT)?,
                get_u64(&t.meta, META_UPLOADED_BYTES)?,
            ))
        })
        .unwrap_or((0, 0))
    }

    pub fn totals(&self) -> Result<Totals, StateError> {
        let (uploaded_count, uploaded_bytes) = self.uploaded();
        let depth = self.items()?.iter().filter(|(_, i)| !i.is_parked()).count();
        Ok(Totals {
            queue_depth: depth as u64,
            uploaded_count,
            uploaded_bytes,
        })
    }

    pub fn paused(&self) -> Vec<PausedInfo> {
        self.read(|t| {
            Ok(t.meta
                .scan_prefix(META_PAUSED_PREFIX.as_bytes())
                .filter_map(|r| decode(&r.ok()?.1))
                .collect())
        })
        .unwrap_or_default()
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.read(|t| t.db.size_on_disk()).unwrap_or(0)
    }

    // --- transitions ------------------------------------------------------------

    /// Queues a finished file for upload, unless its record shows it offloaded
    /// exactly as it is now (`identity`) or it is parked and only a scan saw it.
    /// An item already queued is left as it is (a multipart upload under way
    /// keeps its progress), unless it waits to delete a different file.
    pub fn admit(
        &self,
        key: &ItemKey,
        identity: &FileIdentity,
        why: Admit,
    ) -> Result<Admission, StateError> {
        let (record, queued) = self.entry(key)?;
        if record.is_some_and(|r| r.identity == *identity) && queued.is_none() {
            return Ok(Admission::AlreadyOffloaded);
        }
        if let Some(item) = queued {
            match &item.stage {
                Stage::Upload { .. } => return Ok(Admission::AlreadyQueued(Box::new(item))),
                Stage::Delete { identity: id } if id == identity => {
                    return Ok(Admission::AlreadyQueued(Box::new(item)))
                }
                Stage::Parked { .. } if why == Admit::Scan => return Ok(Admission::StillParked),
                _ => {}
            }
        }
        let item = QueueItem::upload_now();
        self.set_item(key, Some(&item))?;
        Ok(Admission::Queued(Box::new(item)))
    }

    /// Makes a multipart upload's progress durable (call before sending the
    /// first part of a new upload id). An item no longer waiting for its
    /// upload is an error ([`StateError::NotQueued`]): nothing would hold the
    /// upload id, and the caller aborts the upload.
    pub async fn save_multipart(
        &self,
        key: &ItemKey,
        progress: &MultipartProgress,
    ) -> Result<(), StateError> {
        let Some(item) = self.with_multipart(key, Some(progress.clone()))? else {
            return Err(StateError::NotQueued {
                key: key.to_string(),
            });
        };
        self.set_item(key, Some(&item))?;
        self.durable().await
    }

    /// Records progress of a multipart upload without waiting for the disk
    /// (parts are cheap to send again).
    pub fn note_multipart(
        &self,
        key: &ItemKey,
        progress: &MultipartProgress,
    ) -> Result<(), StateError> {
        self.set_multipart(key, Some(progress.clone()))
    }

    /// Forgets the multipart upload of an item: the next attempt starts
    /// afresh. One still `Open` at the server is filed for an abort.
    pub fn clear_multipart(&self, key: &ItemKey, given_up: GivenUp) -> Result<(), StateError> {
        let Some(item) = self.with_multipart(key, None)? else {
            return Ok(());
        };
        match given_up {
            GivenUp::Open => self.replace_item_filing_abort(key, Some(&item)),
            GivenUp::Gone => self.set_item(key, Some(&item)),
        }
    }

    fn set_multipart(
        &self,
        key: &ItemKey,
        multipart: Option<MultipartProgress>,
    ) -> Result<(), StateError> {
        match self.with_multipart(key, multipart)? {
            Some(item) => self.set_item(key, Some(&item)),
            None => Ok(()),
        }
    }

    /// The item of `key` with `multipart` as its upload's progress, unwritten;
    /// `None` if it is not waiting to be uploaded.
    fn with_multipart(
        &self,
        key: &ItemKey,
        multipart: Option<MultipartProgress>,
    ) -> Result<Option<QueueItem>, StateError> {
        let Some(mut item) = self.item(key)? else {
            return Ok(None);
        };
        if !matches!(item.stage, Stage::Upload { .. }) {
            return Ok(None);
        }
        item.stage = Stage::Upload { multipart };
        Ok(Some(item))
    }

    /// A failed attempt: backs the item off until `due_ms`. With
    /// [`Blame::Item`] the failure counts as a strike against the item; the
    /// item's strikes are returned.
    pub fn back_off(
        &self,
        key: &ItemKey,
        due_ms: u64,
        error: &str,
        blame: Blame,
    ) -> Result<u32, StateError> {
        let Some(mut item) = self.item(key)? else {
            return Ok(0);
        };
        item.attempts += 1;
        if blame == Blame::Item {
            item.strikes += 1;
        }
        item.next_attempt_ms = due_ms;
        item.last_error = Some(error.to_string());
        self.set_item(key, Some(&item))?;
        Ok(item.strikes)
    }

    /// Parks an item with its reason until an operator retries it; a
    /// multipart upload it had started is filed for an abort.
    pub fn park(&self, key: &ItemKey, reason: &str) -> Result<(), StateError> {
        self.replace_item_filing_abort(key, Some(&QueueItem::parked(reason.to_string())))
    }

    /// Queues a parked item again (`retry`); false if it was not parked.
    pub fn unpark(&self, key: &ItemKey) -> Result<bool, StateError> {
        if !self.item(key)?.is_some_and(|i| i.is_parked()) {
            return Ok(false);
        }
        self.set_item(key, Some(&QueueItem::upload_now()))?;
        Ok(true)
    }

    /// Drops an item whose file is gone before it was uploaded. Needs proof
    /// that the root was present after the file was found missing.
    /// A multipart upload it had started is filed for an abort.
    pub fn drop_vanished(&self, key: &ItemKey, _root: &RootPresent) -> Result<(), StateError> {
        self.replace_item_filing_abort(key, None)
    }

    /// [`Queue::set_item`], filing the multipart upload of the item it
    /// replaces (if any) for an abort, in one transaction: the upload id is
    /// never gone from the database before its abort went through.
    fn replace_item_filing_abort(
        &self,
        key: &ItemKey,
        item: Option<&QueueItem>,
    ) -> Result<(), StateError> {
        let k = key.as_bytes();
        let item = item.map(encode);
        let filed = self.write(|t| {
            (&t.files, &t.meta)
                .transaction(|(files, meta)| {
                    let current = files.get(k)?;
                    let entry = current.as_deref().and_then(Entry::split);
                    let filed = file_abort_of(meta, entry.as_ref().and_then(|e| e.item))?;
                    let new = Entry {
                        record: entry.and_then(|e| e.record),
                        item: item.as_deref(),
                    }
                    .join();
                    match new {
                        Some(v) => files.insert(k, v)?,
                        None => files.remove(k)?,
                    };
                    Ok(filed)
                })
                .map_err(tx_err)
        })?;
        if filed {
            self.aborts_filed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Whether aborts were filed since the last call.
    pub fn take_filed_aborts(&self) -> bool {
        self.aborts_filed.swap(false, Ordering::SeqCst)
    }

    /// Every multipart upload filed for an abort.
    pub fn pending_aborts(&self) -> Vec<PendingAbort> {
        self.read(|t| {
            Ok(t.meta
                .scan_prefix(META_ABORT_PREFIX.as_bytes())
                .values()
                .filter_map(|v| v.ok().and_then(|v| decode(&v)))
                .collect())
        })
        .unwrap_or_default()
    }

    /// The abort went through (or never can): unfiles it.
    pub fn abort_done(&self, pending: &PendingAbort) -> Result<(), StateError> {
        let key = pending.meta_key();
        self.write(|t| t.meta.remove(key.as_bytes()).map(|_| ()))
    }

    /// Replaces (or, with `None`, removes) a file's queue item and keeps its
    /// record: one atomic update of the file's entry.
    fn set_item(&self, key: &ItemKey, item: Option<&QueueItem>) -> Result<(), StateError> {
        let item = item.map(encode);
        self.write(|t| {
            t.files
                .fetch_and_update(key.as_bytes(), |current| {
                    Entry {
                        record: current.and_then(Entry::split).and_then(|e| e.record),
                        item: item.as_deref(),
                    }
                    .join()
                })
                .map(|_| ())
        })
    }

    /// Writes the location record and the item's next stage (or removes the
    /// item) in one transaction. Nothing may act on it before
    /// [`Queue::durable`] (or [`Queue::delete_permit`]) succeeds.
    pub fn record_uploaded(
        &self,
        key: &ItemKey,
        record: &Record,
        after: AfterUpload,
    ) -> Result<(), StateError> {
        let rec = encode_record(key.as_bytes(), record);
        // A zero-byte file is never deleted locally (DESIGN), on every path
        // that records an upload: verify, a rebuild, a resumed multipart.
        let next = match after {
            AfterUpload::DeleteLocal if record.identity.size > 0 => {
                Some(encode(&QueueItem::delete(record.identity)))
            }
            AfterUpload::DeleteLocal | AfterUpload::Finish => None,
        };
        let k = key.as_bytes();
        let entry = Entry {
            record: Some(&rec),
            item: next.as_deref(),
        }
        .join()
        .expect("an entry with a record");
        self.write(|t| {
            (&t.files, &t.meta)
                .transaction(|(files, meta)| {
                    let old = files.insert(k, entry.as_slice())?;
                    let old = old.and_then(|v| record_of(k, &v));
                    let (dc, db) = match old {
                        Some(o) => (0, record.size as i128 - o.size as i128),
                        None => (1, record.size as i128),
                    };
                    add_u64(meta, META_UPLOADED_COUNT, dc)?;
                    add_u64(meta, META_UPLOADED_BYTES, db)?;
                    Ok(())
                })
                .map_err(tx_err)
        })
    }

    /// Restores a record found by a rebuild, unless one exists. Only for
    /// objects proven equal to the local file, or whose local file is gone.
    pub fn restore(
        &self,
        key: &ItemKey,
        record: &Record,
        after: AfterUpload,
    ) -> Result<bool, StateError> {
        if self.record(key)?.is_some() {
            return Ok(false);
        }
        // A queued upload of the file (its record lost, its item not) ends
        // here: its multipart upload, if it began one, goes for an abort.
        self.clear_multipart(key, GivenUp::Open)?;
        self.record_uploaded(key, record, after)?;
        Ok(true)
    }

    /// Replaces a file's record `old` by `new` (a rebuild found a newer
    /// object of the path), if the record is still `old`; the queue item
    /// stays. Whether it was replaced.
    pub fn replace_record(
        &self,
        key: &ItemKey,
        old: &Record,
        new: &Record,
    ) -> Result<bool, StateError> {
        let k = key.as_bytes();
        let rec = encode_record(k, new);
        self.write(|t| {
            (&t.files, &t.meta)
                .transaction(|(files, meta)| {
                    let Some(current) = files.get(k)? else {
                        return Ok(false);
                    };
                    if record_of(k, &current).as_ref() != Some(old) {
                        return Ok(false);
                    }
                    let entry = Entry {
                        record: Some(&rec),
                        item: Entry::split(&current).and_then(|e| e.item),
                    }
                    .join()
                    .expect("an entry with a record");
                    files.insert(k, entry)?;
                    add_u64(
                        meta,
                        META_UPLOADED_BYTES,
                        new.size as i128 - old.size as i128,
                    )?;
                    Ok(true)
                })
                .map_err(tx_err)
        })
    }

    /// Waits until everything written so far is on disk; concurrent callers
    /// share one flush. A failed flush fails the queue (no delete follows).
    pub async fn durable(&self) -> Result<(), StateError> {
        if let Some(e) = self.failed_state() {
            return Err(e);
        }
        let (db, log) = self.read(|t| Ok((t.db.clone(), t.log.clone())))?;
        let written = self.records_written();
        if self.commit.wait(&db, log).await.map_err(|e| self.fail(e))? {
            self.note_record_count(written);
        }
        Ok(())
    }

    /// The permission to delete a file's local copy: the item waits for it,
    /// its record names the same file and is still "present", and the record's
    /// durable write has succeeded. `Ok(None)` if the item is not waiting for a
    /// delete (any more).
    pub async fn delete_permit(&self, key: &ItemKey) -> Result<Option<DeletePermit>, StateError> {
        let (
            Some(record),
            Some(QueueItem {
                stage: Stage::Delete { identity },
                ..
            }),
        ) = self.entry(key)?
        else {
            return Ok(None);
        };
        if record.identity != identity || record.local != Local::Present {
            return Ok(None);
        }
        self.durable().await?;
        Ok(Some(DeletePermit {
            key: key.clone(),
            identity,
        }))
    }

    /// The local copy was deleted under `permit`.
    pub fn local_deleted(&self, permit: DeletePermit) -> Result<(), StateError> {
        self.finish_local(&permit.key, Local::Deleted)
    }

    /// The local copy is already gone (deleted by the application, or by us
    /// before a crash). Needs proof the root was present just now.
    pub fn local_gone(&self, key: &ItemKey, _root: &RootPresent) -> Result<(), StateError> {
        self.finish_local(key, Local::Deleted)
    }

    /// Deleting the local copy failed for good; the record keeps the reason.
    pub fn local_kept(&self, key: &ItemKey, reason: &str) -> Result<(), StateError> {
        self.finish_local(
            key,
            Local::Kept {
                reason: reason.to_string(),
            },
        )
    }

    /// Deletion was turned off (`delete_local: false` or local mode): the
    /// pending delete is dropped and the local copy stays.
    pub fn cancel_delete(&self, key: &ItemKey) -> Result<(), StateError> {
        self.finish_local(key, Local::Present)
    }

    fn finish_local(&self, key: &ItemKey, local: Local) -> Result<(), StateError> {
        let k = key.as_bytes();
        self.write(|t| {
            t.files
                .fetch_and_update(k, |current| {
                    let record = current.and_then(|v| record_of(k, v)).map(|mut r| {
                        r.local = local.clone();
                        encode_record(k, &r)
                    });
                    Entry {
                        record: record.as_deref(),
                        item: None,
                    }
                    .join()
                })
                .map(|_| ())
        })
    }

    /// The file changed after its upload: it is to be uploaded again (its old
    /// record stays until the new one replaces it).
    pub fn reupload(&self, key: &ItemKey) -> Result<(), StateError> {
        self.set_item(key, Some(&QueueItem::upload_now()))
    }

    /// The uploaded file that `permit` names was set aside for its delete
    /// and put back under its name (its unlink failed): the same inode and
    /// bytes, whose ctime the renames moved, now `now`. Its record and its
    /// pending delete are made to name it as it is now, so that it is not
    /// taken for a changed file and uploaded again; the item's attempts and
    /// strikes stay. Nothing changes if the entry no longer names the file
    /// of `permit`.
    pub fn put_back(&self, permit: &DeletePermit, now: &FileIdentity) -> Result<(), StateError> {
        let k = permit.key.as_bytes();
        let was = permit.identity;
        if !was.same_contents(now) {
            return Ok(());
        }
        self.write(|t| {
            t.files
                .fetch_and_update(k, |current| {
                    let current = current?;
                    let (Some(mut record), Some(mut item)) =
                        (record_of(k, current), item_of(current))
                    else {
                        return Some(current.to_vec());
                    };
                    if record.identity != was || item.stage != (Stage::Delete { identity: was }) {
                        return Some(current.to_vec());
                    }
                    record.identity = *now;
                    item.stage = Stage::Delete { identity: *now };
                    let (record, item) = (encode_record(k, &record), encode(&item));
                    Entry {
                        record: Some(&record),
                        item: Some(&item),
                    }
                    .join()
                })
                .map(|_| ())
        })
    }

    /// Removes a file's record and queue item (delete-through); a multipart
    /// upload the item had started is filed for an abort.
    pub fn forget(&self, key: &ItemKey) -> Result<(), StateError> {
        let k = key.as_bytes();
        let filed = self.write(|t| {
            (&t.files, &t.meta)
                .transaction(|(files, meta)| {
                    let Some(old) = files.remove(k)? else {
                        return Ok(false);
                    };
                    if let Some(old) = record_of(k, &old) {
                        add_u64(meta, META_UPLOADED_COUNT, -1)?;
                        add_u64(meta, META_UPLOADED_BYTES, -(old.size as i128))?;
                        add_u64(meta, META_FORGOTTEN, 1)?;
                    }
                    file_abort_of(meta, Entry::split(&old).and_then(|e| e.item))
                })
                .map_err(tx_err)
        })?;
        if filed {
            self.aborts_filed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Remembers (or, with `None`, forgets) why a provider is paused, so
    /// `status` can tell after the daemon stopped.
    pub fn set_paused(&self, provider: &str, info: Option<&PausedInfo>) -> Result<(), StateError> {
        let key = format!("{META_PAUSED_PREFIX}{provider}");
        self.write(|t| {
            match info {
                Some(info) => t.meta.insert(key.as_bytes(), encode(info))?,
                None => t.meta.remove(key.as_bytes())?,
            };
            Ok(())
        })
    }

    /// Flushes everything to disk (at exit).
    pub fn flush(&self) -> Result<(), StateError> {
        let written = self.records_written();
        self.read(|t| t.flush())?;
        self.note_record_count(written);
        Ok(())
    }
}

/// How [`Queue::recover`] made the state writable again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovered {
    /// Everything written so far is on disk.
    Flushed,
    /// The database was opened again: writes since the last successful
    /// flush are lost (the caller rescans).
    Reopened,
}

/// Whom a failed attempt is blamed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The provider was unreachable or refused everything: no strike.
    Provider,
    /// The local file system failed in a way that says nothing about the
    /// file (a mount that dropped out, a full disk): no strike.
    Passing,
    /// The provider answered a probe that did not involve the item: a strike.
    Item,
}

/// Batches fsyncs: every writer bumps `written`; a waiter flushes only if nobody
/// has flushed past its write yet, so N concurrent waiters cost about one fsync.
struct GroupCommit {
    written: AtomicU64,
    flushed: watch::Sender<u64>,
    flushing: tokio::sync::Mutex<()>,
    /// When the record count was last noted beside the database.
    noted: Mutex<Option<std::time::Instant>>,
}

/// How often the record count is noted beside the database.
const NOTE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl GroupCommit {
    fn new() -> Self {
        GroupCommit {
            written: AtomicU64::new(0),
            flushed: watch::channel(0).0,
            flushing: tokio::sync::Mutex::new(()),
            noted: Mutex::new(None),
        }
    }

    fn wrote(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }

    /// After a reopen nothing counts as flushed any more.
    fn reset(&self) {
        self.flushed.send_replace(0);
        self.written.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until everything written is flushed; true when this flush is
    /// the one to note the record count (at most every [`NOTE_EVERY`]).
    async fn wait(&self, db: &sled::Db, log: Arc<std::fs::File>) -> sled::Result<bool> {
        let target = self.written.load(Ordering::SeqCst);
        if *self.flushed.borrow() >= target {
            return Ok(false);
        }
        let _guard = self.flushing.lock().await;
        if *self.flushed.borrow() >= target {
            return Ok(false);
        }
        let upto = self.written.load(Ordering::SeqCst);
        db.flush_async().await?;
        tokio::task::spawn_blocking(move || log.sync_data())
            .await
            .expect("fdatasync never panics")?;
        self.flushed.send_replace(upto);
        let mut noted = self.noted.lock().expect("noted lock");
        let due = noted.is_none_or(|t| t.elapsed() >= NOTE_EVERY);
        if due {
            *noted = Some(std::time::Instant::now());
        }
        Ok(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64, size: u64) -> FileIdentity {
        FileIdentity {
            dev: 1,
            ino,
            size,
            mtime_ns: 3,
            ctime_ns: 4,
        }
    }

    fn record(identity: FileIdentity) -> Record {
        Record {
            provider: "p".into(),
            key: "k".into(),
            size: identity.size,
            etag: "e".into(),
            uploaded_ms: 1,
            identity,
            local: Local::Present,
        }
    }

    fn key(s: &str) -> ItemKey {
        ItemKey::from_bytes(s.as_bytes().to_vec()).unwrap()
    }

    fn open() -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().unwrap();
        let (q, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Fresh);
        (dir, q)
    }

    #[test]
    fn queue_items_are_compact_and_json_written_by_older_versions_still_reads() {
        let item = QueueItem::delete(id(2, 10));
        let compact = encode(&item);
        let json = serde_json::to_vec(&item).unwrap();
        assert!(
            compact.len() * 2 < json.len(),
            "{} vs {}",
            compact.len(),
            json.len()
        );
        assert_eq!(decode::<QueueItem>(&compact), Some(item.clone()));
        assert_eq!(decode::<QueueItem>(&json), Some(item));
    }

    /// Whatever gives up an item's upload id files it for an abort in the
    /// same write, except where the server has it gone already.
    #[test]
    fn a_given_up_upload_id_is_filed_for_an_abort() {
        let (_d, q) = open();
        let progress = |upload_id: &str| MultipartProgress {
            provider: "p".into(),
            key: "pre/v.mp4".into(),
            upload_id: upload_id.into(),
            part_size: 5,
            identity: id(2, 10),
            parts: Vec::new(),
            started_ms: 0,
        };
        let v = key("v.mp4");
        let queued = |upload_id: &str| {
            q.admit(&v, &id(2, 10), Admit::Event).unwrap();
            q.note_multipart(&v, &progress(upload_id)).unwrap();
        };
        let filed = || -> Vec<String> {
            q.pending_aborts()
                .into_iter()
                .map(|p| p.upload_id)
                .collect()
        };
        queued("gone");
        q.clear_multipart(&v, GivenUp::Gone).unwrap();
        assert!(filed().is_empty());
        assert!(!q.take_filed_aborts());
        q.clear_multipart(&v, GivenUp::Gone).unwrap();
        q.note_multipart(&v, &progress("cleared")).unwrap();
        q.clear_multipart(&v, GivenUp::Open).unwrap();
        q.note_multipart(&v, &progress("parked")).unwrap();
        q.park(&v, "refused").unwrap();
        q.forget(&v).unwrap();
        queued("forgotten");
        q.forget(&v).unwrap();
        // A rebuild restoring the record of a file whose upload is queued
        // (its record lost, its item not).
        queued("restored");
        assert!(q
            .restore(&v, &record(id(2, 10)), AfterUpload::Finish)
            .unwrap());
        assert!(q.item(&v).unwrap().is_none());
        q.forget(&v).unwrap();
        assert!(q.take_filed_aborts());
        assert_eq!(filed(), ["cleared", "forgotten", "parked", "restored"]);
        let parked = q
            .pending_aborts()
            .into_iter()
            .find(|p| p.upload_id == "parked");
        q.abort_done(&parked.unwrap()).unwrap();
        assert_eq!(filed(), ["cleared", "forgotten", "restored"]);
        assert!(q.item(&v).unwrap().is_none());
    }

    /// A database marked whole, with the records of `a` and `b` on disk.
    async fn whole_with_two_records(q: &Queue) {
        q.set_initialized().unwrap();
        for k in ["a", "b"] {
            q.record_uploaded(&key(k), &record(id(2, 10)), AfterUpload::Finish)
                .unwrap();
        }
        q.durable().await.unwrap();
    }

    /// The record count noted beside the database counts what
    /// delete-through removed too: a start after a removal the note did not
    /// follow (notes come at most every 10 s; then a SIGKILL) is no reason to
    /// rebuild. Fewer records than noted still is.
    #[tokio::test]
    async fn a_forgotten_record_is_not_a_lost_one() {
        let (dir, q) = open();
        whole_with_two_records(&q).await;
        q.forget(&key("a")).unwrap();
        q.durable().await.unwrap();
        drop(q);
        let (q, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Intact);
        assert_eq!(q.uploaded().0, 1);
        q.flush().unwrap();
        drop(q);
        // A record sled lost (here: a noted count above what it holds).
        statedir::record_count::write(dir.path(), 3).unwrap();
        let (q, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Lost);
        // A stop before the rebuild completes notes the lower count: the
        // loss must still be found at the next start.
        q.flush().unwrap();
        drop(q);
        // One held, one removed by delete-through: 2, below the 3 noted.
        assert_eq!(statedir::record_count::read(dir.path()), Some(2));
        let (q, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Lost, "the loss was forgotten");
        // Until a rebuild completes (the daemon then marks it whole).
        q.set_initialized().unwrap();
        q.flush().unwrap();
        drop(q);
        let (_q, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(opened, Opened::Intact);
    }

    /// An upload id is saved only with an item waiting for its upload: for
    /// any other, saving fails (the caller aborts the upload) instead of
    /// reporting a durable id nothing holds.
    #[tokio::test]
    async fn a_multipart_upload_is_saved_only_for_an_item_waiting_to_upload() {
        let (_d, q) = open();
        let progress = MultipartProgress {
            provider: "p".into(),
            key: "pre/v.mp4".into(),
            upload_id: "u".into(),
            part_size: 5,
            identity: id(2, 10),
            parts: Vec::new(),
            started_ms: 0,
        };
        let v = key("v.mp4");
        let e = q.save_multipart(&v, &progress).await.unwrap_err();
        assert!(matches!(e, StateError::NotQueued { .. }), "{e}");
        assert!(e.to_string().contains("v.mp4 is no longer queued"), "{e}");
        q.record_uploaded(&v, &record(id(2, 10)), AfterUpload::DeleteLocal)
            .unwrap();
        let e = q.save_multipart(&v, &progress).await.unwrap_err();
        assert!(matches!(e, StateError::NotQueued { .. }), "{e}");
        q.reupload(&v).unwrap();
        q.save_multipart(&v, &progress).await.unwrap();
        assert_eq!(q.item(&v).unwrap().unwrap().multipart(), Some(&progress));
        assert!(q.failure().is_none());
    }

    /// Opens `dir` again, waiting for sled's threads of an earlier handle
    /// to let go of its file lock.
    fn reopen(dir: &Path) -> (Queue, Opened) {
        for _ in 0..50 {
            match Queue::open(dir) {
                Ok(opened) => return opened,
                Err(e) => eprintln!("reopening: {e}"),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("cannot open {}", dir.display());
    }

    /// A reopen after a failure runs the loss check of an open: a database
    /// that comes back with fewer records than noted fails the state for
    /// good (the daemon exits), and the next start still rebuilds, although
    /// the count noted meanwhile is the lower one.
    #[tokio::test]
    async fn a_reopen_that_lost_records_needs_a_restart_that_rebuilds() {
        let (dir, q) = open();
        whole_with_two_records(&q).await;
        // As if sled dropped a third record when it recovered its log.
        statedir::record_count::write(dir.path(), 3).unwrap();
        q.inject_closed("Input/output error");
        let e = loop {
            match q.recover() {
                Err(e @ StateError::Restart { .. }) => break e,
                Err(e) => eprintln!("recovering: {e}"),
                Ok(r) => panic!("recovered ({r:?}) although records were lost"),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(e.to_string().contains("lost location records"), "{e}");
        let needed = tokio::time::timeout(std::time::Duration::from_secs(5), q.restart_needed())
            .await
            .expect("the restart is announced");
        assert_eq!(needed.to_string(), e.to_string());
        assert!(q.recover().is_err(), "a restart is needed, not a reopen");
        assert!(q.admit(&key("c"), &id(3, 1), Admit::Event).is_err());
        q.flush().unwrap();
        drop(q);
        assert_eq!(statedir::record_count::read(dir.path()), Some(2));
        let (_q, opened) = reopen(dir.path());
        assert_eq!(opened, Opened::Lost);
    }

    /// Corruption found on a read is not a full disk: the state fails for
    /// good with its own sentence, and the next open moves the database
    /// aside and rebuilds.
    #[tokio::test]
    async fn corruption_found_on_a_read_moves_the_database_aside_at_the_restart() {
        let (dir, q) = open();
        q.set_initialized().unwrap();
        q.record_uploaded(&key("a"), &record(id(2, 10)), AfterUpload::Finish)
            .unwrap();
        q.durable().await.unwrap();
        let e = q
            .read(|_| -> sled::Result<()> { Err(sled::Error::Corruption { at: None, bt: () }) })
            .unwrap_err();
        assert!(matches!(e, StateError::Restart { .. }), "{e}");
        assert!(e.to_string().contains("is corrupt"), "{e}");
        assert!(!e.to_string().contains("free space"), "{e}");
        assert!(q.recover().is_err(), "a restart is needed, not a probe");
        assert!(q.failed_state().is_some());
        drop(q);
        let (q, opened) = reopen(dir.path());
        assert_eq!(opened, Opened::Lost);
        assert_eq!(q.record(&key("a")).unwrap(), None, "a fresh database");
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("db.corrupt-")
            })
            .count();
        assert_eq!(aside, 1);
        assert!(!dir.path().join(CORRUPT_NOTE).exists());
    }

    /// A state_dir replaced while the queue is open is noticed: the state
    /// fails for good, and the new state_dir learns the record count and the
    /// mark, so that the next start rebuilds (not "fresh") and keeps the
    /// mark (the queued backlog is still walked).
    #[tokio::test]
    async fn a_replaced_state_dir_fails_the_state_and_the_restart_rebuilds() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let (q, _) = Queue::open(&dir).unwrap();
        q.set_initialized().unwrap();
        statedir::mark::set_once(&dir, 1234).unwrap();
        q.record_uploaded(&key("a"), &record(id(2, 10)), AfterUpload::Finish)
            .unwrap();
        q.durable().await.unwrap();
        q.check_place().unwrap();
        std::fs::rename(&dir, top.path().join("state.old")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let e = q.check_place().unwrap_err();
        assert!(matches!(e, StateError::Restart { .. }), "{e}");
        assert!(e.to_string().contains("was removed or replaced"), "{e}");
        assert!(q.recover().is_err());
        assert_eq!(statedir::record_count::read(&dir), Some(1));
        assert_eq!(statedir::mark::read(&dir), Some(1234));
        drop(q);
        let (_q, opened) = reopen(&dir);
        assert_eq!(opened, Opened::Lost);
    }

    #[test]
    fn record_transaction_updates_totals_once_per_path() {
        let (_d, q) = open();
        let a = key("a");
        q.admit(&a, &id(2, 10), Admit::Event).unwrap();
        q.record_uploaded(&a, &record(id(2, 10)), AfterUpload::Finish)
            .unwrap();
        q.record_uploaded(&a, &record(id(2, 10)), AfterUpload::Finish)
            .unwrap();
        let t = q.totals().unwrap();
        assert_eq!(
            (t.queue_depth, t.uploaded_count, t.uploaded_bytes),
            (0, 1, 10)
        );
        assert!(q.item(&a).unwrap().is_none());
        assert_eq!(
            q.admit(&a, &id(2, 10), Admit::Event).unwrap(),
            Admission::AlreadyOffloaded
        );
        // The same path with other contents is queued again.
        assert!(matches!(
            q.admit(&a, &id(3, 10), Admit::Event).unwrap(),
            Admission::Queued(_)
        ));
    }

    #[tokio::test]
    async fn delete_permit_needs_a_matching_durable_record() {
        let (_d, q) = open();
        let a = key("a");
        q.admit(&a, &id(2, 10), Admit::Event).unwrap();
        assert!(q.delete_permit(&a).await.unwrap().is_none(), "not uploaded");
        q.record_uploaded(&a, &record(id(2, 10)), AfterUpload::DeleteLocal)
            .unwrap();
        let permit = q.delete_permit(&a).await.unwrap().expect("permit");
        assert_eq!(permit.identity(), &id(2, 10));
        q.local_deleted(permit).unwrap();
        assert!(q.item(&a).unwrap().is_none());
        assert_eq!(q.record(&a).unwrap().unwrap().local, Local::Deleted);
        assert!(q.delete_permit(&a).await.unwrap().is_none(), "only once");
    }

    #[test]
    fn parked_items_stay_parked_on_scans_only() {
        let (_d, q) = open();
        let a = key("a");
        q.park(&a, "too long").unwrap();
        assert_eq!(
            q.admit(&a, &id(2, 1), Admit::Scan).unwrap(),
            Admission::StillParked
        );
        assert!(matches!(
            q.admit(&a, &id(2, 1), Admit::Event).unwrap(),
            Admission::Queued(_)
        ));
        q.park(&a, "again").unwrap();
        assert!(q.unpark(&a).unwrap());
        assert!(!q.unpark(&a).unwrap());
    }

    #[test]
    fn strikes_count_only_item_blame() {
        let (_d, q) = open();
        let a = key("a");
        q.admit(&a, &id(2, 1), Admit::Event).unwrap();
        assert_eq!(q.back_off(&a, 5, "down", Blame::Provider).unwrap(), 0);
        assert_eq!(q.back_off(&a, 5, "500", Blame::Item).unwrap(), 1);
        let item = q.item(&a).unwrap().unwrap();
        assert_eq!((item.attempts, item.strikes), (2, 1));
    }

    #[test]
    fn a_database_in_the_older_layout_is_moved_over_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (key("a/uploaded"), key("b/waits-to-delete"), key("c/queued"));
        let old_json = serde_json::to_vec(&record(id(1, 5))).unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            let (records, queue) = (
                db.open_tree("records").unwrap(),
                db.open_tree("queue").unwrap(),
            );
            records.insert(a.as_bytes(), old_json).unwrap();
            let rb = encode_record(b.as_bytes(), &record(id(2, 6)));
            records.insert(b.as_bytes(), rb).unwrap();
            queue
                .insert(b.as_bytes(), encode(&QueueItem::delete(id(2, 6))))
                .unwrap();
            queue
                .insert(c.as_bytes(), encode(&QueueItem::parked("why".into())))
                .unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(META_INITIALIZED_SPLIT, b"1".as_slice())
                .unwrap();
            db.flush().unwrap();
        }
        // sled's own threads may hold the file lock for a moment after the
        // handle is dropped (a truncation in its thread pool).
        let mut tries = 0;
        let (q, opened) = loop {
            match Queue::open(dir.path()) {
                Ok(opened) => break opened,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("reopening: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(opened, Opened::Intact);
        assert_eq!(q.record(&a).unwrap(), Some(record(id(1, 5))));
        assert_eq!(q.item(&a).unwrap(), None);
        assert_eq!(q.record(&b).unwrap(), Some(record(id(2, 6))));
        assert_eq!(q.item(&b).unwrap(), Some(QueueItem::delete(id(2, 6))));
        assert_eq!(q.record(&c).unwrap(), None);
        assert!(q.item(&c).unwrap().is_some_and(|i| i.is_parked()));
        let keys: Vec<_> = q.items().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b.clone(), c.clone()]);
        let names = q.read(|t| Ok(t.db.tree_names())).unwrap();
        assert!(
            !names
                .iter()
                .any(|n| OLD_TREES.iter().any(|(o, _)| n == o.as_bytes())),
            "the old trees are gone"
        );
        let initialized = |k: &[u8]| q.read(|t| t.meta.get(k)).unwrap().is_some();
        assert!(initialized(META_INITIALIZED) && !initialized(META_INITIALIZED_SPLIT));
        // Finishing the delete keeps the record and drops only the item.
        q.cancel_delete(&b).unwrap();
        assert_eq!(q.item(&b).unwrap(), None);
        assert_eq!(q.record(&b).unwrap(), Some(record(id(2, 6))));
    }

    #[tokio::test]
    async fn queueing_a_recorded_file_keeps_its_record_until_the_new_one() {
        let (_d, q) = open();
        let a = key("a");
        q.record_uploaded(&a, &record(id(2, 10)), AfterUpload::Finish)
            .unwrap();
        q.reupload(&a).unwrap();
        q.back_off(&a, 5, "down", Blame::Provider).unwrap();
        q.park(&a, "too long").unwrap();
        assert_eq!(q.record(&a).unwrap(), Some(record(id(2, 10))));
        assert!(q.item(&a).unwrap().is_some_and(|i| i.is_parked()));
        q.forget(&a).unwrap();
        assert_eq!(q.entry(&a).unwrap(), (None, None));
        assert_eq!(q.totals().unwrap().uploaded_count, 0);
        // A vanished file that was never uploaded leaves nothing behind.
        q.admit(&a, &id(3, 1), Admit::Event).unwrap();
        let root = tempfile::tempdir().unwrap();
        let guard = crate::pipeline::root::RootGuard::new(root.path(), _d.path()).unwrap();
        q.drop_vanished(&a, &guard.check().await.unwrap()).unwrap();
        assert_eq!(q.read(|t| Ok(t.files.len())).unwrap(), 0);
    }

    #[test]
    fn a_failed_queue_refuses_writes_until_recovered() {
        let (_d, q) = open();
        let a = key("a");
        let e = q.fail(sled::Error::Io(std::io::Error::from_raw_os_error(
            libc::ENOSPC,
        )));
        assert!(e.to_string().contains("cannot write to state_dir"), "{e}");
        assert!(q.failure().is_some());
        assert!(q.admit(&a, &id(2, 1), Admit::Event).is_err());
        q.recover().unwrap();
        assert!(q.failure().is_none());
        assert!(q.admit(&a, &id(2, 1), Admit::Event).is_ok());
    }
}

#[cfg(test)]
mod size {
    use super::*;

    /// `cargo test --release --lib queue::size -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread")]
    #[ignore]
    async fn bytes_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(dir.path()).unwrap();
        let n = 100_000u64;
        for i in 0..n {
            let key =
                ItemKey::from_bytes(format!("images/2026/11/26/{i:08}-result.png").into_bytes())
                    .unwrap();
            let id = FileIdentity {
                dev: 65024,
                ino: 10_000_000 + i,
                size: 65536,
                mtime_ns: 1_795_691_565_690_842_672,
                ctime_ns: 1_795_691_565_690_842_672,
            };
            q.admit(&key, &id, Admit::Event).unwrap();
            let record = Record {
                provider: "r2-media".into(),
                key: format!("magicads/images/2026/11/26/{i:08}-result.png"),
                size: 65536,
                etag: "d41d8cd98f00b204e9800998ecf8427e".into(),
                uploaded_ms: 1_795_691_565_690,
                identity: id,
                local: Local::Present,
            };
            q.record_uploaded(&key, &record, AfterUpload::Finish)
                .unwrap();
            if i % 1000 == 0 {
                q.durable().await.unwrap();
            }
        }
        q.flush().unwrap();
        println!("records {n}: size_on_disk {} MiB", q.size_on_disk() >> 20);
    }
}
