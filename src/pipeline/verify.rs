//! Verification of an upload before anything is recorded (guarantee 2): a
//! HEAD shows the expected size and, where the provider guarantees MD5 ETags,
//! the expected ETag (the body's MD5, or the composite of the parts' MD5s).
//! The server already checked our Content-MD5 of every body it accepted.

use crate::keys::ObjectKey;
use crate::pipeline::upload::Sent;
use crate::remote::error::{ErrorClass, StorageError};
use crate::remote::store::Store;

/// Confirms the uploaded object matches what was sent; returns its ETag.
pub async fn remote(
    store: &dyn Store,
    key: &ObjectKey,
    sent: &Sent,
) -> Result<String, StorageError> {
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
    let comparable = store.provider().etag_is_md5 && (!sent.multipart || etag.contains('-'));
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
