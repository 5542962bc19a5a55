//! Recording a verified upload: the location record (provider name and key,
//! size, ETag, the identity of the file that was read) and the item's next
//! stage, written in one transaction and made durable before anything acts on
//! them (guarantee 2: no delete without a durable record).

use crate::keys::{ItemKey, ObjectKey};
use crate::pipeline::queue::{AfterUpload, Local, Queue, Record, StateError};
use crate::pipeline::upload::Sent;

/// Writes the record of `sent` and waits until it is on disk.
pub async fn commit(
    queue: &Queue,
    key: &ItemKey,
    provider: &str,
    object: &ObjectKey,
    sent: &Sent,
    etag: String,
    after: AfterUpload,
) -> Result<(), StateError> {
    let record = Record {
        provider: provider.to_string(),
        key: object.as_str().to_string(),
        size: sent.identity.size,
        etag,
        uploaded_ms: crate::statedir::now_ms(),
        identity: sent.identity,
        local: Local::Present,
    };
    // Zero-byte files are never deleted locally.
    let after = if sent.identity.size == 0 {
        AfterUpload::Finish
    } else {
        after
    };
    queue.record_uploaded(key, &record, after)?;
    queue.durable().await
}
