//! Rebuilding the location records after the database was lost (guarantee
//! 8): the directory and the bucket are the truth.
//!
//! Lists each provider's prefix, the active one first. For every object of
//! the active provider:
//! - no local file any more: its record is restored ("local copy deleted"),
//!   so its URL keeps working;
//! - a local file whose content is proven equal to the object (size, and the
//!   ETag recomputed from the file: its MD5 for a single PUT, the composite of
//!   its parts' MD5s for a multipart object, whose part size offloadd records
//!   in `x-amz-meta-offloadd-part-size`): the record is restored, and with
//!   deletion on the local copy goes through the usual delete step;
//! - anything else (changed, or an ETag that proves nothing, as under
//!   SSE-KMS): no record, and the file is queued to be uploaded again.
//!
//! Every other provider (retired ones, `enabled: false`, included) only gets
//! back the records of what it holds and the local files no longer have (a
//! file's record keeps the provider it was uploaded to), or that are proven
//! equal; it never queues an upload or a delete. A key recorded by an earlier
//! listing keeps that record, but for one whose local copy is gone: there
//! the newest version wins, by LastModified across the providers listed (the
//! restored record's upload time), so a later listing's strictly newer object
//! of other bytes (size, or an ETag of the same form) takes the record; a
//! later copy of the same bytes does not (nor one of the same size whose
//! ETag has another form: a copy by another tool cuts other parts), nor does
//! a time unknown on either side, and a record of a real upload (one that
//! read the file) is never replaced.
//!
//! Only keys that name a result count ([`Managed::path_of`]): the exact key
//! of a path, not offloadd's own objects, not below a symlink. A local file
//! the include and exclude rules leave out now, or older than the
//! managed-since mark (left for `backfill`), is not touched and gets no
//! record; an object whose local file is gone gets its record back whatever
//! the rules say now.
//!
//! Then aborts our multipart uploads under the prefix that are older than 24 h
//! (for a managed path whose file is still there), where the provider can list
//! them. Errors end the rebuild early; the catch-up scan uploads whatever has
//! no record.

use crate::keys::{ItemKey, ObjectKey, RelPath};
use crate::pipeline::filter::Rules;
use crate::pipeline::finished::FileIdentity;
use crate::pipeline::plan::Deletion;
use crate::pipeline::queue::{Admit, AfterUpload, Local, Queue, Record};
use crate::pipeline::root::RootGuard;
use crate::pipeline::upload::{etag_of_file, part_size_for};
use crate::remote::store::{Listed, Store};
use crate::shutdown::Shutdown;
use crate::statedir::now_ms;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Multipart uploads older than this are ours to abort after state loss.
const STALE_UPLOAD_MS: u64 = 24 * 3600 * 1000;

/// The upload time of a restored record whose object was listed without a
/// (readable) LastModified: older than any known one.
const UNKNOWN_MODIFIED_MS: u64 = 0;

/// Whether `record` was restored from a listing with its local copy gone
/// (by this rebuild, or an earlier one that stopped: the database holds no
/// other records of the file), which a newer object of the path listed later
/// replaces. A record of a real upload names the file it read: never.
fn restored_gone(record: &Record) -> bool {
    record.local == Local::Deleted && !record.identity.was_seen()
}

/// Whether `o` is another version of the file than the object `record`
/// names ([`other_version`]) and strictly newer (LastModified, which is
/// the record's `uploaded_ms`). An unknown time on either side says nothing,
/// and a copy of the same bytes made later (replication, `rclone copy` to a
/// backup bucket) is no newer version: the record listed first (the active
/// provider's) stays.
fn newer(o: &Listed, record: &Record) -> bool {
    other_version(o, record)
        && record.uploaded_ms != UNKNOWN_MODIFIED_MS
        && o.modified_ms.is_some_and(|t| t > record.uploaded_ms)
}

/// Whether `o` holds other bytes than the object `record` names: another
/// size, or an ETag of the same form (an MD5, or a composite of as many
/// parts) with another value. ETags of different forms tell nothing (a copy
/// by another tool cuts other parts, or none), so such objects of one size
/// count as the same version.
fn other_version(o: &Listed, record: &Record) -> bool {
    if o.size != record.size {
        return true;
    }
    let form = |etag: &str| etag.split_once('-').map(|(_, parts)| parts.to_owned());
    match o.etag.as_deref() {
        Some(etag) if form(etag) == form(&record.etag) => etag != record.etag,
        _ => false,
    }
}

/// Progress shown by `status` as "rebuilding n/m": objects checked of those
/// listed so far.
#[derive(Debug, Default)]
pub struct Progress {
    pub listed: AtomicU64,
    pub checked: AtomicU64,
    pub matched: AtomicU64,
    pub reupload: AtomicU64,
}

/// What a listed object says about its local file.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Restore this record; a local copy goes through the delete step if
    /// deletion is on.
    Restore(Record),
    /// The local file differs or cannot be proven equal: upload it again.
    Reupload(FileIdentity),
    /// Not ours to decide (not a file, or a local file offloadd does not
    /// handle: see [`Handling`]).
    Skip,
}

/// Which keys name a file, and which local files are offloadd's to upload
/// and delete: the include and exclude rules and the managed-since mark the
/// scheduler applies to every file.
pub struct Managed<'a> {
    pub rules: &'a Rules,
    /// The managed-since mark (ns since the epoch).
    pub mark_ns: i128,
}

/// How the rules take a listed path now.
#[derive(Debug, Clone, Copy)]
enum Handling {
    /// Selected: its local file is offloadd's if changed since the mark.
    Selected { mark_ns: i128 },
    /// Left out (uploaded under earlier rules, say): a record comes back only
    /// for an object whose local file is gone; a file still there is left
    /// alone.
    Excluded,
}

/// The prefix of offloadd's own objects (`.offloadd-health`, the probes of
/// `test-connection`): never a result.
const OWN_OBJECT_PREFIX: &str = ".offloadd-";

impl Managed<'_> {
    /// The relative path of a listed key, if it names a result: under the
    /// prefix, exactly the key that path maps to (not `./a` for `a`), not one
    /// of offloadd's own objects, and not below a symlink.
    fn path_of(&self, prefix: &str, key: &str, root: &Path) -> Option<RelPath> {
        let rel = rel_of(prefix, key)?;
        let own = rel
            .as_str()
            .rsplit('/')
            .next()
            .is_some_and(|name| name.starts_with(OWN_OBJECT_PREFIX));
        (!own && rel.symlinked_folder(root).is_none()).then_some(rel)
    }

    fn handling(&self, rel: &RelPath, root: &Path) -> Handling {
        match self.rules.matches(&rel.to_local(root)) {
            true => Handling::Selected {
                mark_ns: self.mark_ns,
            },
            false => Handling::Excluded,
        }
    }
}

/// The relative path of a listed key under `prefix`, if the path maps back
/// to exactly this key.
fn rel_of(prefix: &str, key: &str) -> Option<RelPath> {
    let rel = match prefix.trim_matches('/') {
        "" => key,
        p => key.strip_prefix(p)?.strip_prefix('/')?,
    };
    let rel = RelPath::parse(rel).ok()?;
    (ObjectKey::new(prefix, &rel).ok()?.as_str() == key).then_some(rel)
}

/// Decides one object. `part_size` is the object's recorded part size (from
/// a HEAD) or the configured one, for multipart ETags.
fn judge(
    root: &Path,
    rel: &RelPath,
    provider: &str,
    o: &Listed,
    etag_is_md5: bool,
    part_size: Option<u64>,
    handling: Handling,
) -> Verdict {
    let local = rel.to_local(root);
    let record = |identity, local| Record {
        provider: provider.to_string(),
        key: o.key.clone(),
        size: o.size,
        etag: o.etag.clone().unwrap_or_default(),
        uploaded_ms: o.modified_ms.unwrap_or(UNKNOWN_MODIFIED_MS),
        identity,
        local,
    };
    let meta = match std::fs::symlink_metadata(&local) {
        Ok(m) if m.is_file() => m,
        Ok(_) => return Verdict::Skip,
        // Not readable now (permissions, I/O): no verdict; the catch-up scan
        // finds the file if it is there.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Verdict::Skip,
        Err(_) => return Verdict::Restore(record(FileIdentity::unseen(o.size), Local::Deleted)),
    };
    let identity = FileIdentity::of(&meta);
    // A file older than the mark is left for `backfill`, one the rules leave
    // out is not offloadd's: no upload, no delete, and no record either (a
    // record would make backfill skip it).
    match handling {
        Handling::Selected { mark_ns } if identity.changed_ns() >= mark_ns => {}
        Handling::Selected { .. } | Handling::Excluded => return Verdict::Skip,
    }
    let etag = o.etag.clone().unwrap_or_default();
    if meta.len() != o.size || !etag_is_md5 || etag.is_empty() {
        return Verdict::Reupload(identity);
    }
    // A multipart object's ETag needs its part size.
    let part_size = match (etag.contains('-'), part_size) {
        (false, _) => None,
        (true, Some(ps)) => Some(ps),
        (true, None) => return Verdict::Reupload(identity),
    };
    let computed = std::fs::File::open(&local)
        .and_then(|f| etag_of_file(&f, o.size, part_size, || {}))
        .ok();
    let still = std::fs::symlink_metadata(&local).map(|m| FileIdentity::of(&m));
    match (computed, still) {
        (Some(c), Ok(now)) if c == etag && now == identity => {
            Verdict::Restore(record(identity, Local::Present))
        }
        _ => Verdict::Reupload(identity),
    }
}

/// Which provider a rebuild lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// The active provider: what it cannot prove is uploaded again, and with
    /// deletion on, proven local copies go through the delete step.
    Active(Deletion),
    /// Another provider: its records come back, nothing else.
    Other,
}

/// Whether a listing went through to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    Complete,
    /// Stopped early (a stop, the root gone, the state); the next start
    /// rebuilds again.
    Stopped,
    /// The provider's listing failed (its bucket gone, its key revoked);
    /// the caller decides whether the next start lists it again.
    Unlisted,
}

/// Lists the provider's prefix and restores what is proven; see the module docs.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    store: &dyn Store,
    root: &RootGuard,
    queue: &Queue,
    listing: Listing,
    managed: &Managed<'_>,
    configured_part_size: u64,
    progress: &Progress,
    shutdown: &mut Shutdown,
) -> Outcome {
    let p = store.provider();
    let prefix = match p.prefix.trim_matches('/') {
        "" => String::new(),
        x => format!("{x}/"),
    };
    tracing::warn!(provider = %p.name, prefix = %prefix, "rebuilding location records from the bucket listing");
    let after = match listing {
        Listing::Active(Deletion::After(_)) => AfterUpload::DeleteLocal,
        Listing::Active(Deletion::Keep) | Listing::Other => AfterUpload::Finish,
    };
    let mut token = None;
    loop {
        let page = tokio::select! {
            page = store.list_page(&prefix, token) => page,
            _ = shutdown.recv() => return Outcome::Stopped,
        };
        let (objects, next) = match page {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(provider = %p.name, error = %e, "rebuild of provider `{}` stopped: cannot list the bucket ({e})", p.name);
                return Outcome::Unlisted;
            }
        };
        progress
            .listed
            .fetch_add(objects.len() as u64, Ordering::Relaxed);
        for o in objects {
            if shutdown.is_shutdown() {
                return Outcome::Stopped;
            }
            progress.checked.fetch_add(1, Ordering::Relaxed);
            let Some(rel) = managed.path_of(&p.prefix, &o.key, root.path()) else {
                continue;
            };
            let key = ItemKey::from_rel(&rel);
            // A recorded path keeps its record, but for an older object
            // restored with its local copy gone: the newest object wins.
            let replaces = match queue.record(&key).ok().flatten() {
                None => None,
                Some(r) if restored_gone(&r) && newer(&o, &r) => Some(r),
                Some(_) => continue,
            };
            // A multipart object tells its part size on HEAD.
            let part_size = match o.etag.as_deref() {
                Some(e) if e.contains('-') && rel.to_local(root.path()).is_file() => {
                    match store.head(&ObjectKey::from_raw(o.key.clone())).await {
                        Ok(Some(h)) => h
                            .part_size
                            .or(Some(part_size_for(o.size, configured_part_size))),
                        _ => None,
                    }
                }
                _ => None,
            };
            let (path, name, md5_etags, handling) = (
                root.path().to_path_buf(),
                p.name.clone(),
                p.etag_is_md5,
                managed.handling(&rel, root.path()),
            );
            let verdict = tokio::task::spawn_blocking(move || {
                judge(&path, &rel, &name, &o, md5_etags, part_size, handling)
            })
            .await
            .unwrap_or(Verdict::Skip);
            // A missing file says "deleted" only if the root was there after
            // the miss: a vanished root is not a tree of deleted files.
            if matches!(&verdict, Verdict::Restore(r) if r.local == Local::Deleted) {
                if let Err(why) = root.check().await {
                    tracing::error!("rebuild stopped: {why}; it runs again at the next start");
                    return Outcome::Stopped;
                }
            }
            let done = match (verdict, replaces) {
                // Replaced only while the local copy is still gone.
                (Verdict::Restore(record), Some(old)) if record.local == Local::Deleted => {
                    queue.replace_record(&key, &old, &record).map(|_| ())
                }
                (_, Some(_)) => Ok(()),
                (Verdict::Restore(record), None) => {
                    let after = if record.local == Local::Present {
                        after
                    } else {
                        AfterUpload::Finish
                    };
                    queue.restore(&key, &record, after).map(|restored| {
                        if restored {
                            progress.matched.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                }
                (Verdict::Reupload(identity), None) if listing != Listing::Other => {
                    progress.reupload.fetch_add(1, Ordering::Relaxed);
                    queue.admit(&key, &identity, Admit::Event).map(|_| ())
                }
                (Verdict::Reupload(_), None) => Ok(()),
                (Verdict::Skip, None) => Ok(()),
            };
            if let Err(e) = done {
                tracing::error!(error = %e, "rebuild stopped: {e}");
                return Outcome::Stopped;
            }
        }
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    if let Err(e) = queue.durable().await {
        tracing::error!(error = %e, "rebuild: {e}");
        return Outcome::Stopped;
    }
    abort_stale_uploads(store, &prefix, managed, root.path()).await;
    tracing::info!(
        listed = progress.listed.load(Ordering::Relaxed),
        restored = progress.matched.load(Ordering::Relaxed),
        reupload = progress.reupload.load(Ordering::Relaxed),
        "rebuild finished"
    );
    Outcome::Complete
}

/// Aborts our multipart uploads older than 24 h: after state loss, their
/// upload ids are not recorded anywhere else. Ours: under our prefix, for a
/// path offloadd manages (see [`Managed::path_of`]) whose file is still
/// there; another tool's upload into the same bucket (or an empty prefix)
/// is never touched.
async fn abort_stale_uploads(store: &dyn Store, prefix: &str, managed: &Managed<'_>, root: &Path) {
    let uploads = match store.list_uploads(prefix).await {
        Ok(Some(u)) => u,
        Ok(None) => {
            tracing::info!("this provider cannot list multipart uploads; interrupted ones are left to the bucket's lifecycle rules");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list interrupted multipart uploads: {e}");
            return;
        }
    };
    let cutoff = now_ms().saturating_sub(STALE_UPLOAD_MS);
    let ours = |key: &str| {
        managed.path_of(prefix, key, root).is_some_and(|rel| {
            let local = rel.to_local(root);
            managed.rules.matches(&local)
                && std::fs::symlink_metadata(&local).is_ok_and(|m| m.is_file())
        })
    };
    for u in uploads {
        if u.initiated_ms.is_some_and(|t| t < cutoff) && ours(&u.key) {
            match store.abort(&u.key, &u.upload_id).await {
                Ok(()) => {
                    tracing::info!(key = %u.key, "aborted an interrupted multipart upload older than 24 h")
                }
                Err(e) => {
                    tracing::warn!(key = %u.key, error = %e, "cannot abort an interrupted multipart upload")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::upload::composite_etag;
    use crate::remote::fake::FakeStore;
    use md5::{Digest, Md5};

    fn listed(key: &str, size: u64, etag: Option<&str>) -> Listed {
        Listed {
            key: key.into(),
            size,
            etag: etag.map(str::to_string),
            modified_ms: None,
        }
    }

    fn verdict(root: &Path, o: &Listed, md5: bool, part: Option<u64>) -> Verdict {
        let rel = rel_of("pre", &o.key).unwrap();
        let all = Handling::Selected { mark_ns: i128::MIN };
        judge(root, &rel, "p", o, md5, part, all)
    }

    fn rules(root: &Path) -> Rules {
        Rules::new(
            root,
            &["**".into()],
            &["**/.*".into()],
            std::time::Duration::from_secs(1),
        )
        .unwrap()
    }

    /// A file older than the managed-since mark is left for `backfill`, and
    /// one the rules leave out is not offloadd's: neither is uploaded over
    /// the object (which another tool may have put there) nor deleted, and
    /// neither gets a record (which would make backfill skip it), proven or
    /// not. An object whose file is gone gets its record back all the same.
    #[test]
    fn files_offloadd_does_not_handle_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.txt"), b"hello").unwrap();
        let md5 = hex::encode(Md5::digest(b"hello"));
        let after_the_file = Handling::Selected { mark_ns: i128::MAX };
        for handling in [after_the_file, Handling::Excluded] {
            let judge_one = |key: &str, etag: &str| {
                let rel = rel_of("pre", key).unwrap();
                let o = listed(key, 5, Some(etag));
                judge(dir.path(), &rel, "p", &o, true, None, handling)
            };
            assert_eq!(
                judge_one("pre/old.txt", &md5),
                Verdict::Skip,
                "{handling:?}"
            );
            assert_eq!(
                judge_one("pre/old.txt", "0000"),
                Verdict::Skip,
                "{handling:?}"
            );
            let v = judge_one("pre/gone.txt", &md5);
            assert!(
                matches!(&v, Verdict::Restore(r) if r.local == Local::Deleted),
                "{handling:?}: {v:?}"
            );
        }
    }

    /// Only keys that name a result count: exactly the key of their path,
    /// not our own `.offloadd-*` objects, and not below a symlink (a rebuild
    /// deleted a file outside the root through one).
    #[test]
    fn only_keys_of_managed_paths_are_judged() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("archive");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("a.png"), b"outside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("arch")).unwrap();
        let rules = rules(&root);
        let managed = Managed {
            rules: &rules,
            mark_ns: 0,
        };
        let path = |key| managed.path_of("pre", key, &root).map(|r| r.to_string());
        assert_eq!(path("pre/img/a.png").as_deref(), Some("img/a.png"));
        // Left out by the rules now, but maybe uploaded under earlier ones.
        assert_eq!(path("pre/.cache/a.png").as_deref(), Some(".cache/a.png"));
        assert_eq!(path("pre/arch/a.png"), None, "below a symlink");
        assert_eq!(path("pre/.offloadd-health"), None);
        assert_eq!(path("pre/.offloadd-probe-0123"), None);
        assert_eq!(path("pre/./a.png"), None, "not the key of a.png");
        assert_eq!(path("pre//a.png"), None);
        assert_eq!(path("other/a.png"), None);
    }

    /// After state loss, only our own stale multipart uploads are aborted:
    /// not another tool's in the same bucket (an empty prefix is the whole
    /// bucket), nor one for a path offloadd does not manage.
    #[tokio::test]
    async fn only_our_stale_uploads_are_aborted() {
        use crate::remote::fake::Op;
        use crate::remote::object_options::Rules as ObjectRules;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("video.mp4"), b"ours").unwrap();
        let store = FakeStore::new();
        for key in ["video.mp4", "backup/other-tool.tar", ".hidden.mp4"] {
            let rel = RelPath::parse(key).unwrap();
            let options = ObjectRules::default().options_for(&rel, None, None);
            store
                .initiate(&ObjectKey::from_raw(key.into()), &options, 5 << 20)
                .await
                .unwrap();
        }
        std::fs::write(root.join(".hidden.mp4"), b"excluded").unwrap();
        let rules = rules(&root);
        let managed = Managed {
            rules: &rules,
            mark_ns: 0,
        };
        abort_stale_uploads(&store, "", &managed, &root).await;
        let aborted: Vec<String> = store
            .requests()
            .into_iter()
            .filter(|r| r.op == Op::Abort)
            .map(|r| r.key)
            .collect();
        assert_eq!(aborted, ["video.mp4"]);
    }

    #[test]
    fn restores_deleted_and_proven_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("same.txt"), b"hello").unwrap();
        let md5 = hex::encode(Md5::digest(b"hello"));
        let v = verdict(
            dir.path(),
            &listed("pre/same.txt", 5, Some(&md5)),
            true,
            None,
        );
        assert!(
            matches!(&v, Verdict::Restore(r) if r.local == Local::Present),
            "{v:?}"
        );
        // Same size, other bytes.
        let v = verdict(
            dir.path(),
            &listed("pre/same.txt", 5, Some("0000")),
            true,
            None,
        );
        assert!(matches!(v, Verdict::Reupload(_)), "{v:?}");
        // An ETag that proves nothing (SSE-KMS).
        let v = verdict(
            dir.path(),
            &listed("pre/same.txt", 5, Some(&md5)),
            false,
            None,
        );
        assert!(matches!(v, Verdict::Reupload(_)), "{v:?}");
        let v = verdict(dir.path(), &listed("pre/gone/x.png", 9, None), true, None);
        assert!(
            matches!(&v, Verdict::Restore(r) if r.local == Local::Deleted),
            "{v:?}"
        );
        assert!(rel_of("pre", "elsewhere/x.png").is_none());
        assert!(rel_of("pre", "pre/./x.png").is_none());
        assert!(rel_of("", "x.png").is_some());
    }

    #[test]
    fn multipart_objects_are_proven_by_their_part_size() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("big"), &data).unwrap();
        let f = std::fs::File::open(dir.path().join("big")).unwrap();
        let etag = composite_etag(&f, 3000, 1000).unwrap();
        let o = listed("pre/big", 3000, Some(&etag));
        assert!(matches!(
            verdict(dir.path(), &o, true, Some(1000)),
            Verdict::Restore(_)
        ));
        // The same size rewritten in place: not proven.
        let mut other = data.clone();
        other[1500] ^= 1;
        std::fs::write(dir.path().join("big"), &other).unwrap();
        assert!(matches!(
            verdict(dir.path(), &o, true, Some(1000)),
            Verdict::Reupload(_)
        ));
        assert!(matches!(
            verdict(dir.path(), &o, true, None),
            Verdict::Reupload(_)
        ));
    }

    /// Lists `stores` in turn, the first as the active provider, into `queue`.
    async fn rebuild_from(stores: &[&FakeStore], root: &Path, state: &Path, queue: &Queue) {
        let guard = RootGuard::new(root, state).unwrap();
        let (_stop, mut shutdown) = crate::shutdown::Stop::new();
        let rules = rules(root);
        let managed = Managed {
            rules: &rules,
            mark_ns: 0,
        };
        for (i, store) in stores.iter().enumerate() {
            let listing = match i {
                0 => Listing::Active(Deletion::Keep),
                _ => Listing::Other,
            };
            let outcome = run(
                *store,
                &guard,
                queue,
                listing,
                &managed,
                8 << 20,
                &Progress::default(),
                &mut shutdown,
            )
            .await;
            assert_eq!(outcome, Outcome::Complete);
        }
    }

    /// Puts `body` at `pre/{path}`, listed as last modified at `modified_ms`.
    async fn put(store: &FakeStore, path: &str, body: &'static [u8], modified_ms: Option<u64>) {
        use crate::remote::object_options::Rules;
        let key = format!("pre/{path}");
        let rel = RelPath::parse(path).unwrap();
        let options = Rules::default().options_for(&rel, None, None);
        let md5 = Md5::digest(body).into();
        let body = bytes::Bytes::from_static(body);
        store
            .put(&ObjectKey::from_raw(key.clone()), body, md5, &options)
            .await
            .unwrap();
        store.set_modified(&key, modified_ms);
    }

    /// A path whose local copy is gone gets the record of its newest object
    /// (by LastModified) across the providers, whichever is listed first; an
    /// object of unknown time, of the same time, or a later copy of the same
    /// bytes, does not take a record from another, nor is a record of unknown
    /// time taken. A record of a real upload is never replaced.
    #[tokio::test]
    async fn the_newest_object_of_a_gone_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (root, state) = (dir.path().join("root"), dir.path().join("state"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let (queue, _) = Queue::open(&state).unwrap();
        let (a, b, c) = (
            FakeStore::named("a"),
            FakeStore::named("b"),
            FakeStore::named("c"),
        );
        put(&a, "newer-on-b.png", b"old", Some(1_000)).await;
        put(&b, "newer-on-b.png", b"newer", Some(2_000)).await;
        put(&a, "older-on-b.png", b"newer", Some(2_000)).await;
        put(&b, "older-on-b.png", b"old", Some(1_000)).await;
        put(&a, "same-time.png", b"first", Some(1_000)).await;
        put(&b, "same-time.png", b"second", Some(1_000)).await;
        put(&a, "unknown-on-b.png", b"known", Some(1_000)).await;
        put(&b, "unknown-on-b.png", b"unknown", None).await;
        put(&a, "unknown-on-a.png", b"unknown", None).await;
        put(&b, "unknown-on-a.png", b"known", Some(1_000)).await;
        put(&b, "newest-on-c.png", b"old", Some(1_000)).await;
        put(&c, "newest-on-c.png", b"newest", Some(3_000)).await;
        put(&b, "uploaded.png", b"listed", Some(2_000)).await;
        put(&a, "copied-to-b.png", b"same", Some(1_000)).await;
        put(&b, "copied-to-b.png", b"same", Some(2_000)).await;
        put(&a, "same-size-newer-on-b.png", b"aaa", Some(1_000)).await;
        put(&b, "same-size-newer-on-b.png", b"bbb", Some(2_000)).await;
        // Uploaded meanwhile, its local copy deleted since.
        let seen = dir.path().join("seen");
        std::fs::write(&seen, b"uploaded").unwrap();
        let uploaded = Record {
            provider: "a".into(),
            key: "pre/uploaded.png".into(),
            size: 8,
            etag: hex::encode(Md5::digest(b"uploaded")),
            uploaded_ms: 1,
            identity: FileIdentity::of(&std::fs::metadata(&seen).unwrap()),
            local: Local::Deleted,
        };
        let uploaded_key = ItemKey::from_rel(&RelPath::parse("uploaded.png").unwrap());
        queue
            .record_uploaded(&uploaded_key, &uploaded, AfterUpload::Finish)
            .unwrap();

        rebuild_from(&[&a, &b, &c], &root, &state, &queue).await;
        let record = |path| {
            let key = ItemKey::from_rel(&RelPath::parse(path).unwrap());
            queue.record(&key).unwrap().unwrap()
        };
        for (path, provider, modified_ms) in [
            ("newer-on-b.png", "b", 2_000),
            ("older-on-b.png", "a", 2_000),
            ("same-time.png", "a", 1_000),
            ("unknown-on-b.png", "a", 1_000),
            ("unknown-on-a.png", "a", 0),
            ("copied-to-b.png", "a", 1_000),
            ("same-size-newer-on-b.png", "b", 2_000),
            ("newest-on-c.png", "c", 3_000),
        ] {
            let r = record(path);
            assert_eq!(
                (r.provider.as_str(), r.uploaded_ms, r.local),
                (provider, modified_ms, Local::Deleted),
                "{path}"
            );
        }
        assert_eq!(
            record("newer-on-b.png").etag,
            hex::encode(Md5::digest(b"newer"))
        );
        assert_eq!(record("uploaded.png"), uploaded);
        assert_eq!(queue.uploaded().0, 9, "a record per path");
    }

    /// A file missing because the whole root is gone says nothing: the
    /// listing stops, restores no "deleted" record, and runs again later.
    #[tokio::test]
    async fn a_root_gone_during_the_listing_restores_nothing() {
        use crate::keys::ObjectKey;
        use crate::remote::object_options::Rules;
        let dir = tempfile::tempdir().unwrap();
        let (root, state) = (dir.path().join("root"), dir.path().join("state"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let guard = RootGuard::new(&root, &state).unwrap();
        let (queue, _) = Queue::open(&state).unwrap();
        let store = FakeStore::new();
        let body = bytes::Bytes::from_static(b"offloaded");
        let md5 = Md5::digest(&body).into();
        let rel = RelPath::parse("a.txt").unwrap();
        let options = Rules::default().options_for(&rel, None, None);
        store
            .put(
                &ObjectKey::from_raw("pre/a.txt".into()),
                body,
                md5,
                &options,
            )
            .await
            .unwrap();
        std::fs::remove_dir(&root).unwrap();
        let (_stop, mut shutdown) = crate::shutdown::Stop::new();
        let rules = rules(&root);
        let outcome = run(
            &store,
            &guard,
            &queue,
            Listing::Active(Deletion::Keep),
            &Managed {
                rules: &rules,
                mark_ns: 0,
            },
            8 << 20,
            &Progress::default(),
            &mut shutdown,
        )
        .await;
        assert_eq!(outcome, Outcome::Stopped);
        let key = ItemKey::from_rel(&rel);
        assert!(
            queue.record(&key).unwrap().is_none(),
            "no record says deleted"
        );
    }
}
