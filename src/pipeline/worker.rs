//! One dispatched item, taken one step along the flow: upload → verify →
//! record → delete. Every step checks its rule at the moment it acts and
//! every outcome goes back to the scheduler as an [`Outcome`]; storage errors
//! are reported, not judged (the scheduler's policy decides what follows).
//!
//! A file whose only change since its recorded upload is its ctime (chmod,
//! chown, setfacl, a rename back) goes through the same steps, but its body
//! is not sent when the bucket provably holds these bytes already (see
//! [`upload`]'s module docs): it is verified, recorded and deleted as after
//! an upload.

use crate::failpoint;
use crate::keys::ItemKey;
use crate::observe::metrics::Metrics;
use crate::pipeline::delete::{self, LocalOutcome};
use crate::pipeline::finished::{self, FileIdentity, Readiness};
use crate::pipeline::localfs::Counts;
use crate::pipeline::plan::{Deletion, Plan};
use crate::pipeline::queue::{AfterUpload, Blame, Queue, QueueItem, Record, Stage, StateError};
use crate::pipeline::root::RootGuard;
use crate::pipeline::upload::{self, Delivery, Job, UploadError, Uploader};
use crate::pipeline::{record, verify};
use crate::remote::error::StorageError;
use crate::remote::store::Store;
use crate::statedir::now_ms;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often a file held open by a writer is looked at again.
pub const WRITER_RECHECK: Duration = Duration::from_secs(1);

/// Which lane an item waits in: uploads need a healthy provider, deletes do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    Upload,
    Delete,
}

impl Lane {
    pub fn of(stage: &Stage) -> Option<Lane> {
        match stage {
            Stage::Upload { .. } => Some(Lane::Upload),
            Stage::Delete { .. } => Some(Lane::Delete),
            Stage::Parked { .. } => None,
        }
    }
}

/// When a file may be deleted locally: once it is `min_age` old (Unix ms),
/// counted from its ctime. A file moved in with an old mtime (`mv`,
/// `cp -p`, `rsync -t`, `tar x`) is as new to the results directory as its
/// ctime says, and is served from local disk that long. Its mtime counts
/// for nothing: only the kernel stamps a ctime, and a file written here has
/// a ctime no earlier than its mtime, unless the mtime was set to a time to
/// come (a camera's or an NFS server's clock ahead, `touch -d`), which
/// would keep the local copy until then.
pub fn delete_due_ms(identity: &FileIdentity, min_age: Duration) -> u64 {
    (identity.ctime_ns / 1_000_000).max(0) as u64 + min_age.as_millis() as u64
}

/// A delete that is not due yet comes back when it is.
fn not_due(identity: &FileIdentity, min_age: Duration) -> Option<Outcome> {
    let due_ms = delete_due_ms(identity, min_age);
    (now_ms() < due_ms).then_some(Outcome::Later {
        due_ms,
        lane: Lane::Delete,
    })
}

/// What follows a verified, recorded upload for its item.
#[derive(Debug)]
pub enum Then {
    /// Nothing: the item is done (its local copy stays, or went).
    Done,
    /// It comes back in `lane` at `due_ms` (Unix ms): its delete waits, or
    /// the file changed since and goes again.
    At { lane: Lane, due_ms: u64 },
    /// Its delete failed on the local file system: it backs off in the
    /// delete lane as any local failure does (see [`Outcome::LocalError`]).
    LocalError { error: String, blame: Blame },
}

/// What became of one dispatched item.
#[derive(Debug)]
pub enum Outcome {
    /// Uploaded, verified and durably recorded; `then`: what follows for the
    /// item (see [`Then`]).
    /// `delivery`: whether a body was sent, which proves the provider
    /// accepts writes, or the object already held the bytes (a HEAD, which
    /// proves only that it reads).
    Uploaded { then: Then, delivery: Delivery },
    /// The item left the queue without an upload: deleted locally, kept,
    /// dropped because the file vanished, or its delete was cancelled.
    Settled,
    /// Not ready (a writer, settling, too young to delete, changed after its
    /// upload): look again then.
    Later { due_ms: u64, lane: Lane },
    /// Parked (already written to the queue) with its reason.
    Parked(String),
    /// A storage request failed; the scheduler decides what follows.
    Failed(StorageError),
    /// The local file system failed (a mount that dropped out below the
    /// root, a disk error, a full disk on a delete) while the root was
    /// there: tried again in `lane` with backoff; blamed on the item
    /// ([`Blame::Item`]: a strike), it is parked after `MAX_STRIKES`.
    LocalError {
        lane: Lane,
        error: String,
        blame: Blame,
    },
    /// The state could not be written.
    State(StateError),
    /// The root is missing or replaced; the reason.
    RootGone(String),
}

impl From<StateError> for Outcome {
    fn from(e: StateError) -> Outcome {
        Outcome::State(e)
    }
}

/// Everything one dispatched item needs.
pub struct Worker {
    pub queue: Arc<Queue>,
    pub root: Arc<RootGuard>,
    /// The plan in force now (read again at the instant of a delete).
    pub plan: watch::Receiver<Arc<Plan>>,
    /// Held (shared) from that last read of the plan through the unlink: a
    /// reload that turns deletion off is applied only once every delete that
    /// read the old plan is done, and no delete begins under the old plan
    /// after it.
    pub deletes: Arc<tokio::sync::RwLock<()>>,
    /// The plan when the item was dispatched: an upload finishes where it started.
    pub started: Arc<Plan>,
    pub uploader: Arc<Uploader>,
    pub metrics: Metrics,
}

/// Turns a state result into an early return with [`Outcome::State`].
macro_rules! state {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Outcome::State(e),
        }
    };
}

impl Worker {
    pub async fn process(&self, key: &ItemKey) -> Outcome {
        // The record comes with the item, in the same read.
        let (record, item) = state!(self.queue.entry(key));
        let Some(item) = item else {
            return Outcome::Settled;
        };
        match &item.stage {
            Stage::Parked { reason } => Outcome::Parked(reason.clone()),
            Stage::Delete { .. } => self.delete(key).await,
            Stage::Upload { .. } => match self.started.target.store() {
                Some(store) => {
                    self.upload(key, &item, record.as_ref(), store.as_ref())
                        .await
                }
                None => Outcome::Later {
                    due_ms: now_ms() + 60_000,
                    lane: Lane::Upload,
                },
            },
        }
    }

    /// Parks the item; a multipart upload it had started is filed for an
    /// abort (the scheduler sends it).
    async fn park(&self, key: &ItemKey, reason: String) -> Outcome {
        state!(self.queue.park(key, &reason));
        self.metrics.upload_failed("parked");
        Outcome::Parked(reason)
    }

    /// The local file system failed on the item's file: if the root is gone,
    /// that is why (a mount that dropped out fails every file at once, before
    /// the root's poll sees it); else the failure counts as `counts` says.
    async fn local_failure(
        &self,
        key: &ItemKey,
        lane: Lane,
        error: String,
        counts: Counts,
    ) -> Outcome {
        if let Err(why) = self.root.check().await {
            return Outcome::RootGone(why);
        }
        match counts {
            Counts::Park => self.park(key, error).await,
            Counts::Never => Outcome::LocalError {
                lane,
                error,
                blame: Blame::Passing,
            },
            Counts::Strike => Outcome::LocalError {
                lane,
                error,
                blame: Blame::Item,
            },
        }
    }

    /// The file is gone: the item is dropped, if the root is there to prove it.
    async fn vanished(&self, key: &ItemKey) -> Outcome {
        let present = match self.root.check().await {
            Ok(p) => p,
            Err(why) => return Outcome::RootGone(why),
        };
        let abs = key.to_local(&self.started.options.root);
        // A file again at the name (recreated just now): look once more. A
        // directory or a FIFO there is not the file that was queued.
        if std::fs::symlink_metadata(&abs).is_ok_and(|m| m.is_file()) {
            return Outcome::Later {
                due_ms: now_ms(),
                lane: Lane::Upload,
            };
        }
        // A multipart upload it had started is filed for an abort.
        state!(self.queue.drop_vanished(key, &present));
        self.metrics.upload_failed("vanished");
        tracing::debug!(path = %key, "file deleted before its upload; dropped");
        Outcome::Settled
    }

    async fn upload(
        &self,
        key: &ItemKey,
        item: &QueueItem,
        record: Option<&Record>,
        store: &dyn Store,
    ) -> Outcome {
        let opts = &self.started.options;
        let abs = key.to_local(&opts.root);
        // A folder replaced by a symlink since the file was queued (moved
        // out to an archive, say) leads out of the tree offloadd manages.
        if let Some(link) = crate::keys::symlinked_folder(&opts.root, &abs) {
            let reason = format!(
                "{key} is below {}, a symbolic link; offloadd does not follow links inside the root",
                link.display()
            );
            return self.park(key, reason).await;
        }
        // Every attempt starts only when the finished-file rule holds now.
        let checked = match finished::check(&abs, opts.settle) {
            Readiness::Ready(identity) => identity,
            Readiness::Gone | Readiness::NotAFile => return self.vanished(key).await,
            Readiness::Writing => {
                return Outcome::Later {
                    due_ms: now_ms() + WRITER_RECHECK.max(opts.settle).as_millis() as u64,
                    lane: Lane::Upload,
                }
            }
            Readiness::Settling { until_ms } => {
                return Outcome::Later {
                    due_ms: until_ms,
                    lane: Lane::Upload,
                }
            }
            Readiness::Symlink => {
                return self.park(
                    key,
                    format!("{key} is a symbolic link; offloadd does not follow links (upload the target itself, or copy the file in)"),
                )
                .await
            }
            Readiness::Unreadable { reason, counts } => {
                return self
                    .local_failure(key, Lane::Upload, reason, counts)
                    .await
            }
        };
        let rel = match key.rel(&opts.root) {
            Ok(r) => r,
            Err(e) => return self.park(key, e.to_string()).await,
        };
        let object = match store.provider().object_key(&rel) {
            Ok(k) => k,
            Err(e) => return self.park(key, e.to_string()).await,
        };
        let provider = store.provider();
        let options = opts.object_rules.options_for(
            &rel,
            provider.cache_control.as_deref(),
            provider.storage_class.as_deref(),
        );
        let started = Instant::now();
        let job = Job {
            store,
            key: &object,
            abs: &abs,
            item_key: key,
            options: &options,
            previous: item.multipart(),
            plan: &self.started,
            checked: &checked,
            strikes: item.strikes,
        };
        // Only a file whose record matches it but for the ctime pays a HEAD
        // and a read here; any other is sent at once, and a multipart upload
        // under way is resumed as ever.
        let held = match upload::held_by(record, provider, &object, &checked) {
            Some(held) if job.previous.is_none() => {
                self.uploader.already_held(&job, &held, opts.upload).await
            }
            _ => Ok(None),
        };
        let attempt = match held {
            Ok(Some(sent)) => Ok(sent),
            Ok(None) => self.uploader.send(&job, opts.upload).await,
            Err(e) => Err(e),
        };
        let sent = match attempt {
            Ok(s) => s,
            Err(UploadError::Vanished) => return self.vanished(key).await,
            Err(UploadError::Changed) => {
                self.metrics.upload_failed("changed");
                tracing::info!(path = %rel, "file changed while being read; it is uploaded once it is finished again");
                return Outcome::Later {
                    due_ms: now_ms() + opts.settle.as_millis() as u64,
                    lane: Lane::Upload,
                };
            }
            Err(UploadError::Park(reason)) => return self.park(key, reason).await,
            Err(UploadError::Local { message, counts }) => {
                return self.local_failure(key, Lane::Upload, message, counts).await
            }
            Err(UploadError::Storage(e)) => return Outcome::Failed(e),
            Err(UploadError::State(e)) => return Outcome::State(e),
        };
        // Read once: a delete follows only if deletion is on now, and then
        // only after the HEAD that verification makes for it.
        let deletion = self.plan.borrow().deletion();
        let verified = match verify::upload(store, &object, &sent, deletion).await {
            Ok(v) => v,
            Err(e) => return Outcome::Failed(e),
        };
        failpoint::hit(failpoint::AFTER_UPLOAD_BEFORE_RECORD);
        let provider = &provider.name;
        state!(record::commit(&self.queue, key, provider, &object, &sent, &verified).await);
        let size = sent.identity.size;
        let delivery = sent.delivery;
        match delivery {
            Delivery::Sent | Delivery::FoundComplete => {
                self.metrics
                    .upload_succeeded(size, started.elapsed().as_secs_f64());
                tracing::info!(
                    path = %rel,
                    key = %object,
                    bytes = size,
                    duration_ms = started.elapsed().as_millis() as u64,
                    provider = %provider,
                    "uploaded {rel}"
                );
            }
            Delivery::AlreadyHeld => {
                self.metrics.upload_not_needed();
                tracing::info!(
                    path = %rel,
                    key = %object,
                    bytes = size,
                    provider = %provider,
                    "{rel} only changed its metadata; the bucket already holds these bytes, not sent again"
                );
            }
        }
        failpoint::hit(failpoint::AFTER_RECORD_BEFORE_DELETE);
        if verified.next() == AfterUpload::Finish {
            return Outcome::Uploaded {
                then: Then::Done,
                delivery,
            };
        }
        let then = match self.delete(key).await {
            Outcome::Later { due_ms, lane } => Then::At { lane, due_ms },
            Outcome::LocalError { error, blame, .. } => Then::LocalError { error, blame },
            // Its backoff starts with the next attempt.
            Outcome::State(_) | Outcome::RootGone(_) => Then::At {
                lane: Lane::Delete,
                due_ms: now_ms() + 1_000,
            },
            _ => Then::Done,
        };
        Outcome::Uploaded { then, delivery }
    }

    /// Deletes the local copy of an uploaded file if every rule holds now.
    async fn delete(&self, key: &ItemKey) -> Outcome {
        let plan = self.plan.borrow().clone();
        let Deletion::After(min_age) = plan.deletion() else {
            state!(self.queue.cancel_delete(key));
            return Outcome::Settled;
        };
        let Some(permit) = state!(self.queue.delete_permit(key).await) else {
            return Outcome::Settled;
        };
        if let Some(later) = not_due(permit.identity(), min_age) {
            return later;
        }
        if let Err(why) = self.root.check().await {
            return Outcome::RootGone(why);
        }
        let abs = key.to_local(&plan.options.root);
        // The running plan once more, at the instant of the delete.
        let applying = self.deletes.clone().read_owned().await;
        let min_age = match self.plan.borrow().deletion() {
            Deletion::After(min_age) => min_age,
            Deletion::Keep => {
                state!(self.queue.cancel_delete(key));
                return Outcome::Settled;
            }
        };
        // A reload meanwhile may have raised `delete_after`.
        if let Some(later) = not_due(permit.identity(), min_age) {
            return later;
        }
        let (outcome, permit) = {
            let abs = abs.clone();
            let root = plan.options.root.clone();
            tokio::task::spawn_blocking(move || {
                let deleted = delete::delete_local(&root, &abs, &permit);
                drop(applying);
                (deleted, permit)
            })
            .await
            .expect("delete task never panics")
        };
        match outcome {
            LocalOutcome::Deleted => {
                failpoint::hit(failpoint::AFTER_DELETE_BEFORE_MARK);
                state!(self.queue.local_deleted(permit));
                tracing::debug!(path = %key, "local copy deleted");
                Outcome::Settled
            }
            LocalOutcome::Gone => match self.root.check().await {
                Ok(present) => {
                    state!(self.queue.local_gone(key, &present));
                    Outcome::Settled
                }
                Err(why) => Outcome::RootGone(why),
            },
            LocalOutcome::Changed => {
                state!(self.queue.reupload(key));
                tracing::info!(path = %key, "file changed after its upload; it is uploaded again once it is finished");
                Outcome::Later {
                    due_ms: now_ms(),
                    lane: Lane::Upload,
                }
            }
            LocalOutcome::WriterActive => Outcome::Later {
                due_ms: now_ms() + WRITER_RECHECK.as_millis() as u64,
                lane: Lane::Delete,
            },
            LocalOutcome::Retry(error) => {
                self.local_failure(key, Lane::Delete, error, Counts::Never)
                    .await
            }
            // Every attempt renames the file aside and back: a failure
            // that does not pass (a file system that stays full, a bad
            // sector) parks it after a few, with the reason.
            LocalOutcome::PutBack { error, now } => {
                state!(self.queue.put_back(&permit, &now));
                self.local_failure(key, Lane::Delete, error, Counts::Strike)
                    .await
            }
            LocalOutcome::Kept(reason) => {
                tracing::warn!(path = %key, "{reason}");
                state!(self.queue.local_kept(key, &reason));
                Outcome::Settled
            }
        }
    }
}
