//! Reads a file once and sends it: one PUT up to `multipart_threshold`, a
//! multipart upload above it.
//!
//! Guarantees: every buffer is reserved from the shared [`Budget`] before it is
//! read; every non-trailing part of a multipart upload has exactly the file's
//! part size, which the object carries in its metadata; a new upload id is
//! durable in the queue before its first part is sent, and completed parts are
//! recorded so a restart resumes the upload; a resumed upload the server no
//! longer knows is first compared with the object already in the bucket (a
//! crash after CompleteMultipartUpload), else started afresh; a file that
//! changed while being read is reported as [`UploadError::Changed`], never as
//! uploaded; a read that fails while the file is unchanged (a bad sector, a
//! mount that dropped out) is [`UploadError::Local`], not a change.
//!
//! A file whose record shows it uploaded from the same inode with the same
//! size and mtime, to the key it maps to now on the active provider (only
//! its ctime changed: chmod, chown, setfacl, a rename back), is first
//! compared with the object ([`held_by`], [`Uploader::already_held`]): a
//! HEAD showing the recorded size and ETag, and that ETag recomputed from
//! the file, spare sending its body again. Only such files pay the HEAD and
//! the read; where the provider's ETags are not MD5s (SSE-KMS) the body is
//! sent.

use crate::failpoint;
use crate::keys::{ItemKey, ObjectKey};
use crate::pipeline::budget::{Budget, Buffer, BufferKind, Pacer, Turn};
use crate::pipeline::finished::FileIdentity;
use crate::pipeline::live::Progress;
use crate::pipeline::localfs::{self, Call, Counts};
use crate::pipeline::plan::Plan;
use crate::pipeline::queue::{
    GivenUp, MultipartProgress, PartDone, PendingAbort, Queue, Record, StateError,
};
use crate::remote::client::{complete_timeout, request_timeout};
use crate::remote::error::{ErrorClass, StorageError};
use crate::remote::object_options::ObjectOptions;
use crate::remote::provider::Resolved;
use crate::remote::store::Store;
use md5::{Digest, Md5};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// S3's limits.
pub const MAX_PARTS: u64 = 10_000;
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// Upload settings taken from `upload.*` when an upload starts.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub multipart_threshold: u64,
    pub part_size: u64,
    pub part_concurrency: usize,
}

/// How the bytes of an upload came to be in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A body sent now, which proves the provider accepts writes.
    Sent,
    /// Found there by a HEAD after a resumed multipart upload was refused:
    /// it had completed before (a crash before its record). Proves only
    /// that the provider reads.
    FoundComplete,
    /// Found there by a HEAD: only the file's ctime changed since its
    /// recorded upload, and the object proved to hold these bytes. Proves
    /// only that the provider reads.
    AlreadyHeld,
}

/// What was sent: enough to verify it and write the location record.
#[derive(Debug, Clone)]
pub struct Sent {
    pub identity: FileIdentity,
    /// How the bytes came to be in the bucket.
    pub delivery: Delivery,
    /// The ETag an S3-compatible server computes for these bytes (quotes stripped).
    pub expected_etag: String,
    /// The ETag the server answered the PUT or the completion with (or
    /// showed on the HEAD that found the object already there), if any.
    pub answered_etag: Option<String>,
    pub multipart: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the file disappeared before it could be uploaded")]
    Vanished,
    #[error("the file changed while it was being read; it will be uploaded again once it settles")]
    Changed,
    #[error("{0}")]
    Park(String),
    /// The file could not be opened or read; the worker checks the root
    /// first, then the failure counts as `counts` says.
    #[error("{message}")]
    Local { message: String, counts: Counts },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Opens a file for upload without following a symlink in its last component.
pub fn open(abs: &Path) -> Result<(File, FileIdentity), UploadError> {
    let file = localfs::fault(abs, Call::Open)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(abs)
        })
        .map_err(|e| open_error(abs, e))?;
    let meta = file.metadata().map_err(|e| open_error(abs, e))?;
    if !meta.is_file() {
        return Err(UploadError::Vanished);
    }
    Ok((file, FileIdentity::of(&meta)))
}

fn open_error(abs: &Path, e: std::io::Error) -> UploadError {
    let counts = localfs::of_open(&e);
    let message = match e.kind() {
        std::io::ErrorKind::NotFound => return UploadError::Vanished,
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot read {}: permission denied; give the offloadd user read access (shared group or default ACL: see /usr/share/doc/offloadd/README.md, packaging/README.md in the source), then run `offloadd retry`",
            abs.display()
        ),
        _ if e.raw_os_error() == Some(libc::ELOOP) => format!(
            "{} is a symbolic link; offloadd does not follow links",
            abs.display()
        ),
        _ if counts == Counts::Park => format!(
            "cannot read {}: {e}; fix that, then run `offloadd retry`",
            abs.display()
        ),
        _ => localfs::tried_again("cannot read", abs, &e),
    };
    UploadError::Local { message, counts }
}

/// The part size for a file: the configured size, grown in whole MiB so the file
/// needs at most 10,000 parts.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS);
    let grown = configured.max(needed);
    if grown == configured {
        grown
    } else {
        grown.div_ceil(MIB) * MIB
    }
}

/// The ETag S3 gives a multipart object: MD5 of the parts' MD5s, then `-N`.
pub fn multipart_etag(part_md5s: &[[u8; 16]]) -> String {
    let mut h = Md5::new();
    for m in part_md5s {
        h.update(m);
    }
    format!("{}-{}", hex::encode(h.finalize()), part_md5s.len())
}

/// How an object's ETag is made from its bytes, where it is an MD5 at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtagKind {
    /// The MD5 of the whole body (a single PUT).
    Md5,
    /// The MD5 of the parts' MD5s, then `-parts` (a multipart upload).
    Composite { parts: u64 },
}

impl EtagKind {
    /// The kind of `etag` (quotes stripped), if it has the shape of either.
    pub fn of(etag: &str) -> Option<EtagKind> {
        let (hash, kind) = match etag.split_once('-') {
            None => (etag, EtagKind::Md5),
            Some((hash, n)) => {
                let parts = n.parse().ok().filter(|n| *n > 0)?;
                (hash, EtagKind::Composite { parts })
            }
        };
        let hex = hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then_some(kind)
    }
}

/// What the bucket holds of a file whose body may not need sending again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The recorded size and ETag of the object.
    pub size: u64,
    pub etag: String,
    pub kind: EtagKind,
}

/// Whether the bucket may already hold the bytes of the file `checked`,
/// uploaded to `key` on `provider`: its `record` names that provider and
/// key, was made from the same inode with the same size and mtime (only
/// the ctime may differ), and its ETag is an MD5 the file can be compared
/// with. Then what the object should show; else `None` (the body is sent).
pub fn held_by(
    record: Option<&Record>,
    provider: &Resolved,
    key: &ObjectKey,
    checked: &FileIdentity,
) -> Option<Held> {
    let r = record?;
    let same_place = r.provider == provider.name && r.key == key.as_str();
    let same_bytes = r.identity.same_contents(checked) && r.size == checked.size;
    if !(same_place && same_bytes && provider.etag_is_md5) {
        return None;
    }
    let kind = EtagKind::of(&r.etag)?;
    Some(Held {
        size: r.size,
        etag: r.etag.clone(),
        kind,
    })
}

/// Fills `buf` from the file at `offset` and hashes it.
fn read_and_hash(file: &File, offset: u64, mut buf: Buffer) -> std::io::Result<(Buffer, [u8; 16])> {
    localfs::fault_on(file, Call::Read)?;
    file.read_exact_at(buf.as_mut_slice(), offset)?;
    let md5 = Md5::digest(buf.as_ref()).into();
    Ok((buf, md5))
}

/// Whether `file`, opened at `abs`, is still `identity`.
fn unchanged(abs: &Path, file: &File, identity: &FileIdentity) -> Result<(), UploadError> {
    let now = file.metadata().map_err(|e| local_read_error(abs, &e))?;
    if FileIdentity::of(&now) == *identity {
        Ok(())
    } else {
        Err(UploadError::Changed)
    }
}

/// A read of `file` (opened at `abs` as `identity`) failed. It changed if it
/// ended early or is no longer `identity`; else the read itself failed (a
/// bad sector, a mount that dropped out), which is no change: sending it
/// again at once would fail the same way, for ever.
fn read_failed(abs: &Path, file: &File, identity: &FileIdentity, e: std::io::Error) -> UploadError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return UploadError::Changed;
    }
    match file.metadata() {
        Ok(now) if FileIdentity::of(&now) != *identity => UploadError::Changed,
        _ => local_read_error(abs, &e),
    }
}

fn local_read_error(abs: &Path, e: &std::io::Error) -> UploadError {
    UploadError::Local {
        message: localfs::tried_again("cannot read", abs, e),
        counts: localfs::of_read(e),
    }
}

/// Files hashed at once to compare them with an object
/// ([`Uploader::already_held`], [`Uploader::already_there`]): each takes a
/// 256 KiB block buffer outside `memory_limit`, and a blocking thread, so a
/// `chmod -R` over thousands of files takes 1 MiB and 4 threads, not one of
/// each per worker.
const HASHED_AT_ONCE: usize = 4;

/// The turns of [`HASHED_AT_ONCE`], for [`Uploader::hashing`].
pub fn hashing_turns() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(HASHED_AT_ONCE))
}

/// Sends files within the memory budget and the bandwidth limit.
pub struct Uploader {
    pub budget: Budget,
    /// Turns to hash a file ([`hashing_turns`]).
    pub hashing: Arc<tokio::sync::Semaphore>,
    pub pacer: Pacer,
    /// When the watchdog expects the next step (see [`Progress`]).
    pub progress: Arc<Progress>,
    pub queue: Arc<Queue>,
}

/// One file to send.
pub struct Job<'a> {
    pub store: &'a dyn Store,
    pub key: &'a ObjectKey,
    pub abs: &'a Path,
    pub item_key: &'a ItemKey,
    /// The headers the object gets (content type, rules).
    pub options: &'a ObjectOptions,
    /// The multipart upload recorded for this item, if any.
    pub previous: Option<&'a MultipartProgress>,
    /// The plan the job started with: `store` is its target's, and an
    /// upload given up is aborted through it on the provider it began on.
    pub plan: &'a Plan,
    /// The file as it was when the finished-file rule held, just before.
    pub checked: &'a FileIdentity,
    /// Failures already blamed on this item while the provider answered
    /// others (see the scheduler).
    pub strikes: u32,
}

impl Uploader {
    pub async fn send(&self, job: &Job<'_>, settings: Settings) -> Result<Sent, UploadError> {
        let (file, identity) = open(job.abs)?;
        if identity != *job.checked {
            // A writer came between the check and the open: what is read
            // now may be half written.
            return Err(UploadError::Changed);
        }
        if identity.size > MAX_OBJECT_SIZE {
            return Err(UploadError::Park(format!(
                "{} is {} bytes, larger than the 5 TiB an S3 object may hold",
                job.abs.display(),
                identity.size
            )));
        }
        // This file's buffers come before those of every file of its kind
        // started later (whole files before parts: budget.rs).
        if identity.size <= settings.multipart_threshold {
            if job.previous.is_some() {
                self.abandon(job)?;
            }
            let turn = self.budget.turn(BufferKind::WholeFile);
            self.send_single(job, file, identity, turn).await
        } else {
            let turn = self.budget.turn(BufferKind::Part);
            self.send_multipart(job, file, identity, settings, turn)
                .await
        }
    }

    async fn send_single(
        &self,
        job: &Job<'_>,
        file: File,
        identity: FileIdentity,
        turn: Turn,
    ) -> Result<Sent, UploadError> {
        let len = identity.size;
        let _reserved = self.budget.reserve(turn, len).await;
        let buffer = self.budget.buffer(len as usize);
        let abs = job.abs.to_path_buf();
        let (body, md5) = tokio::task::spawn_blocking(move || {
            let (body, md5) = read_and_hash(&file, 0, buffer)
                .map_err(|e| read_failed(&abs, &file, &identity, e))?;
            unchanged(&abs, &file, &identity)?;
            Ok::<_, UploadError>((body, md5))
        })
        .await
        .expect("reading task never panics")?;
        self.paced(len).await;
        let answered = job
            .store
            .put(job.key, body.into_bytes(), md5, job.options)
            .await;
        self.progressed();
        Ok(Sent {
            identity,
            delivery: Delivery::Sent,
            expected_etag: hex::encode(md5),
            answered_etag: answered?,
            multipart: false,
        })
    }

    async fn send_multipart(
        &self,
        job: &Job<'_>,
        file: File,
        identity: FileIdentity,
        settings: Settings,
        turn: Turn,
    ) -> Result<Sent, UploadError> {
        let size = identity.size;
        let part_size = part_size_for(size, settings.part_size);
        if part_size > MAX_PART_SIZE || part_size > self.budget.max_buffer() {
            return Err(UploadError::Park(format!(
                "{} needs parts of {} MiB to stay under 10,000 parts; raise upload.memory_limit to at least {} MiB",
                job.abs.display(),
                part_size / MIB,
                part_size * crate::pipeline::budget::BODY_COPIES / MIB
            )));
        }
        let file = Arc::new(file);
        // Resume the recorded upload if it is for this very file; abandon it otherwise.
        if let Some(p) = job.previous {
            let same = p.provider == job.store.provider().name
                && p.key == job.key.as_str()
                && p.identity == identity
                && p.part_size == part_size;
            if same {
                tracing::info!(path = %job.abs.display(), parts_done = p.parts.len(), "resuming multipart upload");
                match self.send_parts(job, &file, p.clone(), settings, turn).await {
                    Err(UploadError::Storage(e))
                        if e.status.is_some()
                            && e.class != ErrorClass::Transient
                            && !e.is_throttle() =>
                    {
                        // The server may no longer know the upload id, e.g. because
                        // it completed just before a crash (S3 says NoSuchUpload,
                        // some servers AccessDenied): is the object there?
                        if let Some(sent) =
                            self.already_there(job, &file, identity, part_size).await?
                        {
                            self.queue.clear_multipart(job.item_key, GivenUp::Gone)?;
                            return Ok(sent);
                        }
                        // Only an upload the server says is gone starts again.
                        // A refusal (a key that lost PutObject) keeps the upload
                        // and its parts for when the operator has fixed it, as
                        // does a 500.
                        // Refused again while the provider accepts other
                        // uploads (a strike): the server does not know this
                        // upload any more (s3s-fs answers AccessDenied for an
                        // id it forgot), so it starts again.
                        if e.class != ErrorClass::RestartUpload && job.strikes == 0 {
                            return Err(UploadError::Storage(e));
                        }
                        tracing::info!(path = %job.abs.display(), error = %e, "the recorded multipart upload cannot be resumed; starting it again");
                        self.abandon(job)?;
                    }
                    other => return other,
                }
            } else {
                self.abandon(job)?;
            }
        }
        let upload_id = job.store.initiate(job.key, job.options, part_size).await?;
        let progress = MultipartProgress {
            provider: job.store.provider().name.clone(),
            key: job.key.as_str().to_string(),
            upload_id,
            part_size,
            identity,
            parts: Vec::new(),
            started_ms: crate::statedir::now_ms(),
        };
        // The upload id is durable before its first part, so a crash never
        // orphans it.
        if let Err(e) = self.queue.save_multipart(job.item_key, &progress).await {
            let _ = job.store.abort(job.key.as_str(), &progress.upload_id).await;
            return Err(e.into());
        }
        self.send_parts(job, &file, progress, settings, turn).await
    }

    /// Sends the parts not yet done and completes the upload.
    async fn send_parts(
        &self,
        job: &Job<'_>,
        file: &Arc<File>,
        progress: MultipartProgress,
        settings: Settings,
        turn: Turn,
    ) -> Result<Sent, UploadError> {
        let identity = progress.identity;
        let (size, part_size) = (identity.size, progress.part_size);
        let parts_total = size.div_ceil(part_size) as u32;
        let upload_id = progress.upload_id.clone();
        let done: std::collections::HashSet<u32> =
            progress.parts.iter().map(|p| p.number).collect();
        let progress = Mutex::new(progress);
        let save_every = (parts_total / 100).max(1);
        let len_of = |number: u32| part_size.min(size - (number as u64 - 1) * part_size);
        let todo: Mutex<std::vec::IntoIter<u32>> = Mutex::new(
            (1..=parts_total)
                .filter(|n| !done.contains(n))
                .collect::<Vec<_>>()
                .into_iter(),
        );
        let next = || todo.lock().expect("parts lock").next();
        // `part_concurrency` lanes, each sending one part after another. A lane
        // asks for its next part's buffer before it gives back the last one,
        // so this file's parts stay ahead of those of files started later.
        let lane = || async {
            let Some(mut number) = next() else {
                return Ok::<_, UploadError>(());
            };
            let mut reserved = self.budget.reserve(turn, len_of(number)).await;
            loop {
                self.send_part(
                    job,
                    file,
                    &upload_id,
                    number,
                    part_size,
                    len_of(number),
                    &progress,
                    save_every,
                )
                .await?;
                let Some(n) = next() else {
                    return Ok(());
                };
                let next_buffer = self.budget.reserve(turn, len_of(n));
                drop(reserved);
                reserved = next_buffer.await;
                number = n;
            }
        };
        let result =
            futures::future::try_join_all((0..settings.part_concurrency.max(1)).map(|_| lane()))
                .await;

        let snapshot = progress.into_inner().expect("progress lock");
        if let Err(e) = result {
            let restart = matches!(e, UploadError::Changed)
                || matches!(&e, UploadError::Storage(s) if s.class == ErrorClass::RestartUpload);
            if restart {
                self.abandon(job)?;
            } else {
                // Keep what was sent for the next attempt.
                let _ = self.queue.note_multipart(job.item_key, &snapshot);
            }
            return Err(e);
        }
        if let Err(e) = unchanged(job.abs, file, &identity) {
            if matches!(e, UploadError::Changed) {
                self.abandon(job)?;
            } else {
                let _ = self.queue.note_multipart(job.item_key, &snapshot);
            }
            return Err(e);
        }
        let mut parts = snapshot.parts.clone();
        parts.sort_by_key(|p| p.number);
        let md5s: Vec<[u8; 16]> = parts.iter().map(|p| p.md5).collect();
        let list = parts.into_iter().map(|p| (p.number, p.etag)).collect();
        self.progress.request(
            crate::statedir::now_ms(),
            std::time::Duration::ZERO,
            complete_timeout(),
        );
        let answered = match job.store.complete(job.key, &upload_id, list).await {
            Ok(etag) => etag,
            Err(e) => {
                // InvalidPart leaves the upload open at the server: abort it
                // before it is forgotten (NoSuchUpload: nothing to abort).
                if e.code.as_deref() == Some("NoSuchUpload") {
                    self.queue.clear_multipart(job.item_key, GivenUp::Gone)?;
                } else if e.class == ErrorClass::RestartUpload {
                    self.abandon(job)?;
                }
                return Err(e.into());
            }
        };
        Ok(Sent {
            identity,
            delivery: Delivery::Sent,
            expected_etag: multipart_etag(&md5s),
            answered_etag: answered,
            multipart: true,
        })
    }

    /// Reads, hashes and sends one part (its buffer already reserved) and
    /// records it as done.
    #[allow(clippy::too_many_arguments)]
    async fn send_part(
        &self,
        job: &Job<'_>,
        file: &Arc<File>,
        upload_id: &str,
        number: u32,
        part_size: u64,
        len: u64,
        progress: &Mutex<MultipartProgress>,
        save_every: u32,
    ) -> Result<(), UploadError> {
        let offset = (number as u64 - 1) * part_size;
        let (reader, abs) = (file.clone(), job.abs.to_path_buf());
        let identity = progress.lock().expect("progress lock").identity;
        let buffer = self.budget.buffer(len as usize);
        let (body, md5) = tokio::task::spawn_blocking(move || {
            read_and_hash(&reader, offset, buffer)
                .map_err(|e| read_failed(&abs, &reader, &identity, e))
        })
        .await
        .expect("reading task never panics")?;
        self.paced(len).await;
        let etag = job
            .store
            .put_part(job.key, upload_id, number, body.into_bytes(), md5)
            .await;
        self.progressed();
        let etag = etag?;
        let (first, snapshot) = {
            let mut p = progress.lock().expect("progress lock");
            p.parts.push(PartDone { number, etag, md5 });
            let n = p.parts.len() as u32;
            (n == 1, n.is_multiple_of(save_every).then(|| p.clone()))
        };
        if first {
            failpoint::hit(failpoint::AFTER_FIRST_PART);
        }
        if let Some(p) = snapshot {
            self.queue.note_multipart(job.item_key, &p)?;
        }
        Ok(())
    }

    /// Whether the object in the bucket already is this file (size and the
    /// composite ETag recomputed from the file); reads the file to tell.
    async fn already_there(
        &self,
        job: &Job<'_>,
        file: &Arc<File>,
        identity: FileIdentity,
        part_size: u64,
    ) -> Result<Option<Sent>, UploadError> {
        let Some(head) = job.store.head(job.key).await? else {
            return Ok(None);
        };
        let etag = head.etag.unwrap_or_default();
        if head.size != Some(identity.size) || !etag.contains('-') {
            return Ok(None);
        }
        let computed = self
            .etag_of(job.abs, file.clone(), identity, Some(part_size))
            .await?;
        Ok((computed == etag).then_some(Sent {
            identity,
            delivery: Delivery::FoundComplete,
            expected_etag: computed,
            answered_etag: Some(etag),
            multipart: true,
        }))
    }

    /// Whether the object at `job.key` already is this file, as `held`
    /// says it should be: a HEAD shows the recorded size and ETag, and that
    /// ETag recomputed from the file (unchanged while read) is the same.
    /// `Ok(None)` when it is not, or cannot be told (the object is missing,
    /// the HEAD refused): the body is then sent. A transient error of the
    /// HEAD is returned, to be retried as any upload's.
    pub async fn already_held(
        &self,
        job: &Job<'_>,
        held: &Held,
        settings: Settings,
    ) -> Result<Option<Sent>, UploadError> {
        let head = match job.store.head(job.key).await {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(None),
            Err(e) if e.class == ErrorClass::Transient => return Err(e.into()),
            Err(e) => {
                tracing::debug!(path = %job.abs.display(), error = %e, "could not look at the object the file was uploaded to; sending it again");
                return Ok(None);
            }
        };
        self.progressed();
        if head.size != Some(held.size) || head.etag.as_deref() != Some(held.etag.as_str()) {
            return Ok(None);
        }
        // The object's own part size, which offloadd records in its metadata.
        let part_size = match held.kind {
            EtagKind::Md5 => None,
            EtagKind::Composite { parts } => {
                let part_size = head
                    .part_size
                    .unwrap_or_else(|| part_size_for(held.size, settings.part_size));
                if part_size == 0 || held.size.div_ceil(part_size) != parts {
                    return Ok(None);
                }
                Some(part_size)
            }
        };
        let (file, identity) = open(job.abs)?;
        if identity != *job.checked {
            return Err(UploadError::Changed);
        }
        let computed = self
            .etag_of(job.abs, Arc::new(file), identity, part_size)
            .await?;
        Ok((computed == held.etag).then(|| Sent {
            identity,
            delivery: Delivery::AlreadyHeld,
            expected_etag: computed,
            answered_etag: head.etag,
            multipart: part_size.is_some(),
        }))
    }

    /// The ETag an S3-compatible server gives `file` ([`etag_of_file`]),
    /// read at `abs` as `identity` says it is, and unchanged while read.
    /// Waits for a turn of [`Uploader::hashing`]; each block read is a step
    /// for the watchdog (a huge file takes longer to read than the time
    /// allowed between two steps).
    async fn etag_of(
        &self,
        abs: &Path,
        file: Arc<File>,
        identity: FileIdentity,
        part_size: Option<u64>,
    ) -> Result<String, UploadError> {
        let (abs, progress) = (abs.to_path_buf(), self.progress.clone());
        let _turn = self.hashing.acquire().await.expect("never closed");
        tokio::task::spawn_blocking(move || {
            let step = || progress.step(crate::statedir::now_ms());
            let computed = etag_of_file(&file, identity.size, part_size, step)
                .map_err(|e| read_failed(&abs, &file, &identity, e))?;
            unchanged(&abs, &file, &identity)?;
            Ok(computed)
        })
        .await
        .expect("hashing task never panics")
    }

    /// Forgets the recorded multipart upload, filed for an abort (the
    /// scheduler sends it).
    fn abandon(&self, job: &Job<'_>) -> Result<(), StateError> {
        self.queue.clear_multipart(job.item_key, GivenUp::Open)
    }

    fn progressed(&self) {
        self.progress.step(crate::statedir::now_ms());
    }

    /// Waits for this body's turn under `bandwidth_limit`, having told the
    /// watchdog how long the wait and the request may take. Bodies sent at
    /// once share the link, so the request may take as long as all the bytes
    /// buffered for uploads (this one's among them) need.
    async fn paced(&self, len: u64) {
        let wait = self.pacer.turn(len);
        let sharing = self.budget.in_use().max(len);
        self.progress
            .request(crate::statedir::now_ms(), wait, request_timeout(sharing));
        tokio::time::sleep(wait).await;
    }
}

/// The composite ETag of `size` bytes of `file` cut into `part_size` parts.
pub fn composite_etag(file: &File, size: u64, part_size: u64) -> std::io::Result<String> {
    composite_etag_stepping(file, size, part_size, || {})
}

/// [`composite_etag`], calling `step` after every block read (a long read
/// is progress for the watchdog).
fn composite_etag_stepping(
    file: &File,
    size: u64,
    part_size: u64,
    step: impl Fn(),
) -> std::io::Result<String> {
    if part_size == 0 {
        return Err(std::io::Error::other("part size 0"));
    }
    part_md5s(file, size, part_size, step).map(|md5s| multipart_etag(&md5s))
}

/// The ETag of `size` bytes of `file` as uploaded: the composite of its
/// `part_size` parts (a multipart upload), or its MD5 (a single PUT);
/// `step` is called after every block read.
pub fn etag_of_file(
    file: &File,
    size: u64,
    part_size: Option<u64>,
    step: impl Fn(),
) -> std::io::Result<String> {
    match part_size {
        Some(part_size) => composite_etag_stepping(file, size, part_size, step),
        None => md5_etag_stepping(file, size, step),
    }
}

/// The MD5 of `size` bytes of `file`, hex: a single PUT's ETag.
fn md5_etag_stepping(file: &File, size: u64, step: impl Fn()) -> std::io::Result<String> {
    let md5s = part_md5s(file, size, size.max(1), step)?;
    let md5 = md5s
        .first()
        .copied()
        .unwrap_or_else(|| Md5::digest([]).into());
    Ok(hex::encode(md5))
}

/// The MD5s of the `part_size` parts of the first `size` bytes of `file`.
fn part_md5s(
    file: &File,
    size: u64,
    part_size: u64,
    step: impl Fn(),
) -> std::io::Result<Vec<[u8; 16]>> {
    let mut md5s = Vec::new();
    // Hashing needs no big buffer, and this one is outside the budget.
    let mut buf = vec![0u8; part_size.min(256 * 1024) as usize];
    localfs::fault_on(file, Call::Read)?;
    let mut offset = 0;
    while offset < size {
        let end = (offset + part_size).min(size);
        let mut h = Md5::new();
        while offset < end {
            let n = ((end - offset) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], offset)?;
            h.update(&buf[..n]);
            offset += n as u64;
            step();
        }
        md5s.push(h.finalize().into());
    }
    Ok(md5s)
}

/// Whether a filed abort is done with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortOutcome {
    /// Aborted, or never can be: unfiled.
    Settled,
    /// The provider could not be reached, or refused everything: tried
    /// again later.
    Later,
    /// The provider refused the abort itself (AccessDenied: the key lacks
    /// AbortMultipartUpload): tried again later, and the scheduler says so.
    Refused,
}

/// Sends the abort of a multipart upload given up (see [`Queue`]'s
/// `PendingAbort`), on the provider of `plan` it was started on (the target,
/// or another one since a switch); failures, or a provider no longer
/// configured, only leave parts that the bucket's lifecycle rules or a later
/// rebuild clean up.
pub async fn abort_filed(plan: &Plan, p: &PendingAbort) -> AbortOutcome {
    // Kept filed: a provider that cannot be used now (a secret unreadable
    // at this start) may be again, and one removed from the config costs a
    // look every 10 minutes, no request.
    let Some(store) = plan.store_named(&p.provider) else {
        tracing::debug!(key = %p.key, provider = %p.provider, "an abandoned multipart upload on provider `{}` waits: that provider cannot be used now", p.provider);
        return AbortOutcome::Later;
    };
    match store.abort(&p.key, &p.upload_id).await {
        Ok(()) => AbortOutcome::Settled,
        // Completed or aborted already.
        Err(e) if e.code.as_deref() == Some("NoSuchUpload") => AbortOutcome::Settled,
        // A key without AbortMultipartUpload (the others are refused their
        // own way: a wrong secret, a clock off).
        Err(e)
            if e.code.as_deref() == Some("AccessDenied")
                || (e.status == Some(403) && e.code.is_none()) =>
        {
            tracing::debug!(key = %p.key, error = %e, "the abort of an abandoned multipart upload was refused; trying again later");
            AbortOutcome::Refused
        }
        // Unreachable, or refusing everything (a key being fixed).
        Err(e) if matches!(e.class, ErrorClass::Transient | ErrorClass::ProviderWide) => {
            tracing::debug!(key = %p.key, error = %e, "could not abort an abandoned multipart upload yet; trying again later");
            AbortOutcome::Later
        }
        Err(e) => {
            tracing::warn!(key = %p.key, error = %e, "could not abort an abandoned multipart upload; it is left to the bucket's lifecycle rules");
            AbortOutcome::Settled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that `bandwidth_limit` holds back is no stall: before it
    /// waits, the watchdog's deadline covers the wait and the request.
    #[tokio::test(start_paused = true)]
    async fn a_body_held_back_by_the_bandwidth_limit_is_no_stall() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _) = Queue::open(dir.path()).unwrap();
        let up = Uploader {
            budget: Budget::new(64 * MIB),
            hashing: hashing_turns(),
            pacer: Pacer::new(1_000),
            progress: Arc::new(Progress::default()),
            queue: Arc::new(queue),
        };
        up.paced(300_000).await; // the first body starts at once
        let second = up.paced(300_000); // the next one 300 s later
        tokio::pin!(second);
        assert!(futures::poll!(&mut second).is_pending());
        let now = crate::statedir::now_ms();
        // 300 s of waiting, then three timeouts of 31 s.
        assert!(!up.progress.overdue(now + 380_000));
        assert!(up.progress.overdue(now + 400_000));
        second.await;
    }

    #[test]
    fn part_size_grows_to_stay_under_10000_parts() {
        let eight = 8 * MIB;
        assert_eq!(part_size_for(100 * MIB, eight), eight);
        assert_eq!(part_size_for(10_000 * eight, eight), eight);
        let big = 10_000 * eight + 1;
        let p = part_size_for(big, eight);
        assert_eq!(p, 9 * MIB);
        assert!(big.div_ceil(p) <= MAX_PARTS);
        let huge = MAX_OBJECT_SIZE;
        let p = part_size_for(huge, eight);
        assert!(huge.div_ceil(p) <= MAX_PARTS);
        assert_eq!(p % MIB, 0);
    }

    #[test]
    fn multipart_etag_matches_s3_rule() {
        let a: [u8; 16] = Md5::digest(b"hello").into();
        let b: [u8; 16] = Md5::digest(b"world").into();
        let mut h = Md5::new();
        h.update(a);
        h.update(b);
        assert_eq!(
            multipart_etag(&[a, b]),
            format!("{}-2", hex::encode(h.finalize()))
        );
    }

    #[test]
    fn composite_etag_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(5 * MIB + 7)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let md5s: Vec<[u8; 16]> = data
            .chunks((2 * MIB) as usize)
            .map(|c| Md5::digest(c).into())
            .collect();
        assert_eq!(
            composite_etag(&f, data.len() as u64, 2 * MIB).unwrap(),
            multipart_etag(&md5s)
        );
        assert!(multipart_etag(&md5s).ends_with("-3"));
        // Each part hashed (each block read, in fact) is a step for the
        // watchdog.
        let steps = std::cell::Cell::new(0);
        composite_etag_stepping(&f, data.len() as u64, 2 * MIB, || {
            steps.set(steps.get() + 1)
        })
        .unwrap();
        assert!(steps.get() >= 3, "{} steps", steps.get());
    }

    #[test]
    fn etag_kinds() {
        let md5 = "0123456789abcdef0123456789ABCDEF";
        assert_eq!(EtagKind::of(md5), Some(EtagKind::Md5));
        assert_eq!(
            EtagKind::of(&format!("{md5}-12")),
            Some(EtagKind::Composite { parts: 12 })
        );
        for not in [
            "",
            "abc",
            &format!("{md5}-0"),
            &format!("{md5}-x"),
            &format!("{md5}0"),
        ] {
            assert_eq!(EtagKind::of(not), None, "{not}");
        }
        let kms = "g123456789abcdef0123456789abcdef";
        assert_eq!(EtagKind::of(kms), None);
    }

    /// Only a record of this inode with the same size and mtime, on the
    /// active provider under the key the file maps to now, with an MD5
    /// ETag, spares sending the body.
    #[test]
    fn which_records_may_spare_sending_the_body() {
        use crate::keys::RelPath;
        use crate::pipeline::queue::Local;
        let provider = crate::remote::fake::provider();
        let key = ObjectKey::new("pre", &RelPath::parse("a/b.png").unwrap()).unwrap();
        let uploaded = FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        let md5 = "0123456789abcdef0123456789abcdef".to_string();
        let record = Record {
            provider: "fake".into(),
            key: key.as_str().into(),
            size: 3,
            etag: md5.clone(),
            uploaded_ms: 1,
            identity: uploaded,
            local: Local::Present,
        };
        let chmoded = FileIdentity {
            ctime_ns: 9,
            ..uploaded
        };
        let held = |r: &Record, p: &Resolved, now: &FileIdentity| held_by(Some(r), p, &key, now);
        let expected = Some(Held {
            size: 3,
            etag: md5.clone(),
            kind: EtagKind::Md5,
        });
        assert_eq!(held(&record, &provider, &chmoded), expected);
        assert_eq!(held(&record, &provider, &uploaded), expected);
        assert_eq!(held_by(None, &provider, &key, &chmoded), None);

        // Another file, or other contents.
        for now in [
            FileIdentity { dev: 7, ..chmoded },
            FileIdentity { ino: 7, ..chmoded },
            FileIdentity { size: 7, ..chmoded },
            FileIdentity {
                mtime_ns: 7,
                ..chmoded
            },
        ] {
            assert_eq!(held(&record, &provider, &now), None, "{now:?}");
        }
        // Recorded on another provider, or under another key (a prefix
        // changed since).
        let elsewhere = Record {
            provider: "other".into(),
            ..record.clone()
        };
        assert_eq!(held(&elsewhere, &provider, &chmoded), None);
        let other_key = Record {
            key: "old/a/b.png".into(),
            ..record.clone()
        };
        assert_eq!(held(&other_key, &provider, &chmoded), None);
        // ETags that prove nothing: SSE-KMS, or none recorded.
        let kms = Resolved {
            etag_is_md5: false,
            ..provider.clone()
        };
        assert_eq!(held(&record, &kms, &chmoded), None);
        let no_etag = Record {
            etag: String::new(),
            ..record.clone()
        };
        assert_eq!(held(&no_etag, &provider, &chmoded), None);
        // A record whose size disagrees with its identity proves nothing.
        let odd = Record {
            size: 4,
            ..record.clone()
        };
        assert_eq!(held(&odd, &provider, &chmoded), None);
        // A multipart object.
        let multipart = Record {
            etag: format!("{md5}-2"),
            ..record.clone()
        };
        assert_eq!(
            held(&multipart, &provider, &chmoded),
            Some(Held {
                size: 3,
                etag: format!("{md5}-2"),
                kind: EtagKind::Composite { parts: 2 },
            })
        );
    }

    #[test]
    fn md5_etag_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(700 * 1024)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let steps = std::cell::Cell::new(0);
        let f = File::open(&p).unwrap();
        let etag = md5_etag_stepping(&f, data.len() as u64, || steps.set(steps.get() + 1));
        assert_eq!(etag.unwrap(), hex::encode(Md5::digest(&data)));
        assert_eq!(steps.get(), 3, "a step per block read");
        std::fs::write(&p, b"").unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(
            md5_etag_stepping(&f, 0, || {}).unwrap(),
            hex::encode(Md5::digest(b""))
        );
    }

    #[test]
    fn symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        match open(&link) {
            Err(UploadError::Local {
                message,
                counts: Counts::Park,
            }) => assert!(message.contains("symbolic link"), "{message}"),
            other => panic!("expected park, got {:?}", other.map(|_| ())),
        }
        assert!(matches!(
            open(&dir.path().join("missing")),
            Err(UploadError::Vanished)
        ));
    }
}
