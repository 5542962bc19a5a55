//! Reads a file once and sends it: one PUT up to `multipart_threshold`, a
//! multipart upload above it.
//!
//! Guarantees: every buffer is reserved from the shared [`Budget`] before it is
//! read; every non-trailing part of a multipart upload has exactly the file's part
//! size; completed parts are recorded in the queue item so a restart resumes the
//! upload; a file that changed while being read is reported as
//! [`UploadError::Changed`], never as uploaded.

use crate::budget::{Budget, Pacer};
use crate::failpoint;
use crate::keys::ObjectKey;
use crate::state::{FileIdentity, MultipartProgress, PartDone, QueueItem, Stage, State};
use crate::storage::{Client, ErrorClass, StorageError};
use futures::stream::{self, StreamExt, TryStreamExt};
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

/// What was sent: enough to verify it and write the location record.
#[derive(Debug, Clone)]
pub struct Sent {
    pub identity: FileIdentity,
    /// The ETag an S3-compatible server computes for these bytes (quotes stripped).
    pub expected_etag: String,
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
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Opens a file for upload without following a symlink in its last component.
pub fn open(abs: &Path) -> Result<(File, FileIdentity), UploadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(abs)
        .map_err(|e| open_error(abs, e))?;
    let meta = file.metadata().map_err(|e| open_error(abs, e))?;
    if !meta.is_file() {
        return Err(UploadError::Vanished);
    }
    Ok((file, FileIdentity::of(&meta)))
}

fn open_error(abs: &Path, e: std::io::Error) -> UploadError {
    match e.kind() {
        std::io::ErrorKind::NotFound => UploadError::Vanished,
        std::io::ErrorKind::PermissionDenied => UploadError::Park(format!(
            "cannot read {}: permission denied; give the offloadd user read access (see README: shared group or default ACL)",
            abs.display()
        )),
        _ if e.raw_os_error() == Some(libc::ELOOP) => UploadError::Park(format!(
            "{} is a symbolic link; offloadd does not follow links",
            abs.display()
        )),
        _ => UploadError::Park(format!("cannot read {}: {e}", abs.display())),
    }
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

fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn unchanged(file: &File, identity: &FileIdentity) -> Result<(), UploadError> {
    let now = file.metadata().map_err(|_| UploadError::Changed)?;
    if FileIdentity::of(&now) == *identity {
        Ok(())
    } else {
        Err(UploadError::Changed)
    }
}

/// Sends files to one provider within the memory budget.
pub struct Uploader {
    pub budget: Budget,
    pub pacer: Pacer,
    /// Unix ms of the last request that finished; the watchdog reads it.
    pub progress: Arc<std::sync::atomic::AtomicU64>,
    pub state: State,
}

/// One file to send.
pub struct Job<'a> {
    pub client: &'a Client,
    pub key: &'a ObjectKey,
    pub abs: &'a Path,
    pub queue_key: &'a [u8],
    pub content_type: &'a str,
    pub item: &'a QueueItem,
}

impl Uploader {
    pub async fn send(&self, job: &Job<'_>, settings: Settings) -> Result<Sent, UploadError> {
        let (file, identity) = open(job.abs)?;
        if identity.size > MAX_OBJECT_SIZE {
            return Err(UploadError::Park(format!(
                "{} is {} bytes, larger than the 5 TiB an S3 object may hold",
                job.abs.display(),
                identity.size
            )));
        }
        if identity.size <= settings.multipart_threshold {
            self.send_single(job, file, identity).await
        } else {
            self.send_multipart(job, file, identity, settings).await
        }
    }

    async fn send_single(
        &self,
        job: &Job<'_>,
        file: File,
        identity: FileIdentity,
    ) -> Result<Sent, UploadError> {
        let len = identity.size;
        let _reserved = self.budget.reserve(len).await;
        let (body, md5) = tokio::task::spawn_blocking(move || {
            let body = read_at(&file, 0, len as usize).map_err(|_| UploadError::Changed)?;
            unchanged(&file, &identity)?;
            let md5: [u8; 16] = Md5::digest(&body).into();
            Ok::<_, UploadError>((body, md5))
        })
        .await
        .expect("reading task never panics")
        .map_err(|e| match e {
            UploadError::Park(_) | UploadError::Storage(_) | UploadError::Vanished => e,
            _ => UploadError::Changed,
        })?;
        self.pacer.take(len).await;
        let sent = job.client.put(job.key, &body, job.content_type).await;
        self.progressed();
        sent?;
        Ok(Sent {
            identity,
            expected_etag: hex::encode(md5),
            multipart: false,
        })
    }

    async fn send_multipart(
        &self,
        job: &Job<'_>,
        file: File,
        identity: FileIdentity,
        settings: Settings,
    ) -> Result<Sent, UploadError> {
        let size = identity.size;
        let part_size = part_size_for(size, settings.part_size);
        if part_size > MAX_PART_SIZE || part_size > self.budget.max_buffer() {
            return Err(UploadError::Park(format!(
                "{} needs parts of {} MiB to stay under 10,000 parts; raise upload.memory_limit to at least {} MiB",
                job.abs.display(),
                part_size / MIB,
                part_size * crate::budget::BODY_COPIES / MIB
            )));
        }
        let parts_total = size.div_ceil(part_size) as u32;
        let provider = job.client.provider.name.clone();

        // Resume the recorded upload if it is for this very file; abort it otherwise.
        let previous = match &job.item.stage {
            Stage::Upload { multipart: Some(p) } => Some(p.clone()),
            _ => None,
        };
        let progress = match previous {
            Some(p)
                if p.provider == provider
                    && p.key == job.key.as_str()
                    && p.identity == identity
                    && p.part_size == part_size =>
            {
                tracing::info!(path = %job.abs.display(), parts_done = p.parts.len(), "resuming multipart upload");
                p
            }
            stale => {
                if let Some(p) = stale {
                    abort_stale(job.client, &p).await;
                }
                let upload_id = job
                    .client
                    .initiate_multipart(job.key, job.content_type)
                    .await?;
                MultipartProgress {
                    provider: provider.clone(),
                    key: job.key.as_str().to_string(),
                    upload_id,
                    part_size,
                    identity,
                    parts: Vec::new(),
                }
            }
        };
        let upload_id = progress.upload_id.clone();
        let done: std::collections::HashSet<u32> =
            progress.parts.iter().map(|p| p.number).collect();
        let progress = Arc::new(Mutex::new(progress));
        self.save_progress(job, &progress);

        let file = Arc::new(file);
        let save_every = (parts_total / 100).max(1);
        let todo: Vec<u32> = (1..=parts_total).filter(|n| !done.contains(n)).collect();
        let result = stream::iter(todo.into_iter().map(|number| {
            let file = file.clone();
            let progress = progress.clone();
            let upload_id = upload_id.clone();
            async move {
                let offset = (number as u64 - 1) * part_size;
                let len = part_size.min(size - offset);
                let _reserved = self.budget.reserve(len).await;
                let (body, md5) = tokio::task::spawn_blocking(move || {
                    let body = read_at(&file, offset, len as usize)?;
                    let md5: [u8; 16] = Md5::digest(&body).into();
                    Ok::<_, std::io::Error>((body, md5))
                })
                .await
                .expect("reading task never panics")
                .map_err(|_| UploadError::Changed)?;
                self.pacer.take(len).await;
                let etag = job
                    .client
                    .put_part(job.key, &upload_id, number, body, job.content_type)
                    .await;
                self.progressed();
                let etag = etag?;
                let count = {
                    let mut p = progress.lock().expect("progress lock");
                    p.parts.push(PartDone { number, etag, md5 });
                    p.parts.len() as u32
                };
                if count == 1 {
                    failpoint::hit(failpoint::AFTER_FIRST_PART);
                }
                if count % save_every == 0 {
                    self.save_progress(job, &progress);
                }
                Ok::<_, UploadError>(())
            }
        }))
        .buffer_unordered(settings.part_concurrency.max(1))
        .try_collect::<()>()
        .await;

        if let Err(e) = result {
            self.save_progress(job, &progress);
            if matches!(e, UploadError::Changed)
                || matches!(&e, UploadError::Storage(s) if s.class == ErrorClass::RestartUpload)
            {
                let p = progress.lock().expect("progress lock").clone();
                abort_stale(job.client, &p).await;
                self.forget_progress(job);
            }
            return Err(e);
        }
        if let Err(e) = unchanged(&file, &identity) {
            let p = progress.lock().expect("progress lock").clone();
            abort_stale(job.client, &p).await;
            self.forget_progress(job);
            return Err(e);
        }

        let mut parts = progress.lock().expect("progress lock").parts.clone();
        parts.sort_by_key(|p| p.number);
        let md5s: Vec<[u8; 16]> = parts.iter().map(|p| p.md5).collect();
        let list = parts.into_iter().map(|p| (p.number, p.etag)).collect();
        if let Err(e) = job
            .client
            .complete_multipart(job.key, &upload_id, list)
            .await
        {
            if e.class == ErrorClass::RestartUpload {
                self.forget_progress(job);
            }
            return Err(e.into());
        }
        Ok(Sent {
            identity,
            expected_etag: multipart_etag(&md5s),
            multipart: true,
        })
    }

    fn progressed(&self) {
        self.progress
            .store(crate::state::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    fn save_progress(&self, job: &Job<'_>, progress: &Mutex<MultipartProgress>) {
        let mut item = job.item.clone();
        item.stage = Stage::Upload {
            multipart: Some(progress.lock().expect("progress lock").clone()),
        };
        if let Err(e) = self.state.put_queue_item(job.queue_key, &item) {
            tracing::warn!(error = %e, "could not record multipart progress; a restart will start this upload again");
        }
    }

    fn forget_progress(&self, job: &Job<'_>) {
        let mut item = job.item.clone();
        item.stage = Stage::Upload { multipart: None };
        let _ = self.state.put_queue_item(job.queue_key, &item);
    }
}

/// Aborts a multipart upload we no longer continue; failures only leave parts that
/// the bucket's lifecycle rules or a later start will clean up.
pub async fn abort_stale(client: &Client, p: &MultipartProgress) {
    if p.provider != client.provider.name {
        return;
    }
    if let Err(e) = client.abort_multipart(&p.key, &p.upload_id).await {
        tracing::warn!(key = %p.key, error = %e, "could not abort an abandoned multipart upload");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        match open(&link) {
            Err(UploadError::Park(m)) => assert!(m.contains("symbolic link"), "{m}"),
            other => panic!("expected park, got {:?}", other.map(|_| ())),
        }
        assert!(matches!(
            open(&dir.path().join("missing")),
            Err(UploadError::Vanished)
        ));
    }
}
