//! Verification of an upload before anything is recorded, as strict as what
//! follows the record needs. The server already checked our Content-MD5 of
//! every body it accepted; on top of that:
//!
//! - a local copy that will be deleted needs a HEAD (guarantee 2): it shows
//!   the expected size and, where the provider guarantees MD5 ETags, the
//!   expected ETag (the body's MD5, or the composite of the parts' MD5s);
//! - a local copy that stays is checked against the server's own answer to
//!   the PUT or the completion: where the provider guarantees MD5 ETags, the
//!   ETag it answered must be the expected one. This saves a request per
//!   file, which is what the server spends most on for small files.
//!
//! [`Verified`] is the only way to a record, and only its HEAD-checked form
//! leads to a delete ([`AfterUpload::DeleteLocal`]).

use crate::keys::ObjectKey;
use crate::pipeline::plan::Deletion;
use crate::pipeline::queue::AfterUpload;
use crate::pipeline::upload::Sent;
use crate::remote::error::{ErrorClass, StorageError};
use crate::remote::store::Store;

/// An upload checked for what follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    etag: String,
    next: AfterUpload,
}

impl Verified {
    /// The object's ETag (the server's, else the one we computed).
    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// What follows the record: a local delete only after a HEAD.
    pub fn next(&self) -> AfterUpload {
        self.next
    }
}

/// Checks `sent` as `deletion` requires: by a HEAD when its local copy is to
/// be deleted (never a zero-byte file), else by the server's answer.
pub async fn upload(
    store: &dyn Store,
    key: &ObjectKey,
    sent: &Sent,
    deletion: Deletion,
) -> Result<Verified, StorageError> {
    let deletes = matches!(deletion, Deletion::After(_)) && sent.identity.size > 0;
    if deletes {
        let etag = by_head(store, key, sent).await?;
        return Ok(Verified {
            etag,
            next: AfterUpload::DeleteLocal,
        });
    }
    let etag = sent.answered_etag.as_deref().unwrap_or_default();
    check_etag(store, key, sent, etag, "answered")?;
    Ok(Verified {
        etag: or_expected(etag, sent),
        next: AfterUpload::Finish,
    })
}

async fn by_head(store: &dyn Store, key: &ObjectKey, sent: &Sent) -> Result<String, StorageError> {
    let head = store.head(key).await?.ok_or_else(|| {
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
    let etag = head.etag.unwrap_or_default();
    check_etag(store, key, sent, &etag, "has")?;
    Ok(or_expected(&etag, sent))
}

/// Where the provider guarantees MD5 ETags, `etag` (what the server `said`
/// of the object) must be the one computed from what was sent.
fn check_etag(
    store: &dyn Store,
    key: &ObjectKey,
    sent: &Sent,
    etag: &str,
    said: &str,
) -> Result<(), StorageError> {
    let comparable = store.provider().etag_is_md5 && (!sent.multipart || etag.contains('-'));
    if comparable && !etag.is_empty() && etag != sent.expected_etag {
        return Err(StorageError::new(
            ErrorClass::RestartUpload,
            format!(
                "object `{key}` {said} ETag {etag} after upload, expected {} (the MD5 of what was sent); if bucket `{}` encrypts with SSE-KMS by default, set `server_side_encryption: aws:kms` for provider `{}`; uploading it again",
                sent.expected_etag,
                store.provider().bucket,
                store.provider().name,
            ),
        ));
    }
    Ok(())
}

fn or_expected(etag: &str, sent: &Sent) -> String {
    if etag.is_empty() {
        sent.expected_etag.clone()
    } else {
        etag.to_string()
    }
}
