//! Verification before anything is recorded or deleted (guarantee 2).
//!
//! [`remote`] checks with a HEAD that the object has the expected size and, where
//! the provider guarantees MD5 ETags, the expected ETag. [`delete_local`] deletes a
//! local copy only if it is still exactly the file that was uploaded and old enough.

use crate::keys::ObjectKey;
use crate::state::FileIdentity;
use crate::storage::{Client, ErrorClass, StorageError};
use crate::upload::Sent;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Confirms the uploaded object matches what was sent.
pub async fn remote(client: &Client, key: &ObjectKey, sent: &Sent) -> Result<String, StorageError> {
    let head = client.head(key).await?.ok_or_else(|| {
        StorageError::new(
            ErrorClass::RestartUpload,
            format!("object `{key}` is missing right after its upload; uploading it again"),
        )
    })?;
    if head.size != Some(sent.identity.size) {
        return Err(StorageError::new(
            ErrorClass::RestartUpload,
            format!(
                "object `{key}` has {} bytes after upload, expected {}; uploading it again",
                head.size
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "an unknown number of".into()),
                sent.identity.size
            ),
        ));
    }
    let etag = head
        .etag
        .as_deref()
        .map(|e| e.trim_matches('"').to_ascii_lowercase())
        .unwrap_or_default();
    let comparable = client.provider.etag_is_md5 && (!sent.multipart || etag.contains('-'));
    if comparable && !etag.is_empty() && etag != sent.expected_etag {
        return Err(StorageError::new(
            ErrorClass::RestartUpload,
            format!(
                "object `{key}` has ETag {etag} after upload, expected {}; uploading it again",
                sent.expected_etag
            ),
        ));
    }
    Ok(if etag.is_empty() {
        sent.expected_etag.clone()
    } else {
        etag
    })
}

/// What happened to a local copy.
#[derive(Debug, PartialEq, Eq)]
pub enum LocalOutcome {
    Deleted,
    /// Already gone (deleted by the application, or by us before a crash).
    AlreadyGone,
    /// Not deleted yet: it is younger than `delete_after`; try again at this time (ms).
    TooYoung {
        retry_at_ms: u64,
    },
    /// It is no longer the uploaded file (rewritten or replaced): upload it again.
    Changed,
    /// Deleting it failed for good; the reason is recorded and shown once.
    Kept(String),
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Deletes `abs` only if it is still `identity` and at least `min_age` old.
pub fn delete_local(abs: &Path, identity: &FileIdentity, min_age: Duration) -> LocalOutcome {
    let meta = match std::fs::symlink_metadata(abs) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return LocalOutcome::AlreadyGone,
        Err(e) => {
            return LocalOutcome::Kept(format!(
                "uploaded, local copy kept: cannot inspect {}: {e}",
                abs.display()
            ))
        }
    };
    if !meta.is_file() || FileIdentity::of(&meta) != *identity {
        return LocalOutcome::Changed;
    }
    let mtime_ms = (identity.mtime_ns / 1_000_000).max(0) as u64;
    let due = mtime_ms + min_age.as_millis() as u64;
    if unix_ms(SystemTime::now()) < due {
        return LocalOutcome::TooYoung { retry_at_ms: due };
    }
    match std::fs::remove_file(abs) {
        Ok(()) => LocalOutcome::Deleted,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => LocalOutcome::AlreadyGone,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => LocalOutcome::Kept(format!(
            "uploaded, local copy kept: permission denied deleting {}; give the offloadd user write access to its directory (see README)",
            abs.display()
        )),
        Err(e) => LocalOutcome::Kept(format!("uploaded, local copy kept: cannot delete {}: {e}", abs.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(p: &Path) -> FileIdentity {
        FileIdentity::of(&std::fs::symlink_metadata(p).unwrap())
    }

    #[test]
    fn deletes_only_the_same_old_enough_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"one").unwrap();
        let id = identity(&f);
        assert!(matches!(
            delete_local(&f, &id, Duration::from_secs(3600)),
            LocalOutcome::TooYoung { .. }
        ));
        std::fs::write(&f, b"two!").unwrap();
        assert_eq!(delete_local(&f, &id, Duration::ZERO), LocalOutcome::Changed);
        assert!(f.exists());
        let id = identity(&f);
        assert_eq!(delete_local(&f, &id, Duration::ZERO), LocalOutcome::Deleted);
        assert!(!f.exists());
        assert_eq!(
            delete_local(&f, &id, Duration::ZERO),
            LocalOutcome::AlreadyGone
        );
    }
}
