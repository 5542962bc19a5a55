//! Recording a verified upload: the location record (provider name and key,
//! size, ETag, the identity of the file that was read) and the item's next
//! stage, written in one transaction and made durable before anything acts on
//! them (guarantee 2: no delete without a durable record). The next stage is
//! the one [`Verified`] allows: a local delete only after a HEAD.

use crate::keys::{ItemKey, ObjectKey};
use crate::pipeline::queue::{Local, Queue, Record, StateError};
use crate::pipeline::upload::Sent;
use crate::pipeline::verify::Verified;

/// Writes the record of `sent` and waits until it is on disk.
pub async fn commit(
    queue: &Queue,
    key: &ItemKey,
    provider: &str,
    object: &ObjectKey,
    sent: &Sent,
    verified: &Verified,
) -> Result<(), StateError> {
    let record = Record {
        provider: provider.to_string(),
        key: object.as_str().to_string(),
        size: sent.identity.size,
        etag: verified.etag().to_string(),
        uploaded_ms: crate::statedir::now_ms(),
        identity: sent.identity,
        local: Local::Present,
    };
    queue.record_uploaded(key, &record, verified.next())?;
    queue.durable().await
}
