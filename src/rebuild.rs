//! Rebuilding the location records after the database was lost to corruption
//! (guarantee 8): the directory and the bucket are the truth.
//!
//! Lists the active provider's prefix and writes a record for every object whose
//! relative path either has no local file any more (it was offloaded and deleted)
//! or has a local file of the same size and, for single-part objects, the same
//! MD5. Files that do not match are left to the catch-up scan, which uploads them.

use crate::keys::RelPath;
use crate::state::{self, FileIdentity, Record, State};
use crate::storage::{Client, Listed};
use md5::{Digest, Md5};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// How much more start-up time each listed page asks systemd for.
const EXTEND_USEC: u64 = 90_000_000;

/// Progress shown by `status` as "rebuilding n/m".
#[derive(Default)]
pub struct Progress {
    pub listed: AtomicU64,
    pub matched: AtomicU64,
}

fn md5_of(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Md5::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The record to restore for one listed object, if it matches the directory.
fn restore(root: &Path, prefix: &str, provider: &str, o: &Listed) -> Option<(Vec<u8>, Record)> {
    let rel = match prefix.trim_matches('/') {
        "" => o.key.as_str(),
        p => o.key.strip_prefix(p)?.strip_prefix('/')?,
    };
    let rel = RelPath::parse(rel).ok()?;
    let local = rel.to_local(root);
    let (identity, local_deleted) = match std::fs::symlink_metadata(&local) {
        Ok(m) if m.is_file() => {
            if m.len() != o.size {
                return None;
            }
            let single_part = o.etag.as_deref().is_some_and(|e| !e.contains('-'));
            if single_part && md5_of(&local).ok()? != o.etag.clone().unwrap_or_default() {
                return None;
            }
            (FileIdentity::of(&m), false)
        }
        Ok(_) => return None,
        Err(_) => (
            FileIdentity {
                dev: 0,
                ino: 0,
                size: o.size,
                mtime_ns: 0,
                ctime_ns: 0,
            },
            true,
        ),
    };
    let record = Record {
        provider: provider.to_string(),
        key: o.key.clone(),
        size: o.size,
        etag: o.etag.clone().unwrap_or_default(),
        uploaded_ms: state::now_ms(),
        identity,
        local_deleted,
        local_kept: None,
    };
    Some((rel.as_str().as_bytes().to_vec(), record))
}

/// Lists the provider's prefix and restores matching records. Errors end the
/// rebuild early; the catch-up scan then re-uploads what is not recorded.
pub async fn run(client: &Client, root: &Path, state: &State, progress: &Progress) {
    let p = &client.provider;
    let prefix = match p.prefix.trim_matches('/') {
        "" => String::new(),
        x => format!("{x}/"),
    };
    tracing::warn!(provider = %p.name, prefix = %prefix, "rebuilding location records from the bucket listing");
    let mut token = None;
    loop {
        let (objects, next) = match client.list_page(&prefix, token).await {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(error = %e, "rebuild stopped: cannot list the bucket; unrecorded files will be uploaded again");
                return;
            }
        };
        progress
            .listed
            .fetch_add(objects.len() as u64, Ordering::Relaxed);
        // READY waits for the rebuild: keep systemd from timing out the start.
        crate::systemd::extend_timeout(EXTEND_USEC);
        let root = root.to_path_buf();
        let name = p.name.clone();
        let pre = p.prefix.clone();
        let restored = tokio::task::spawn_blocking(move || {
            objects
                .iter()
                .filter_map(|o| restore(&root, &pre, &name, o))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (key, record) in restored {
            if state.record(&key).ok().flatten().is_none()
                && state.record_uploaded(&key, &record, None).is_ok()
            {
                progress.matched.fetch_add(1, Ordering::Relaxed);
            }
        }
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    let _ = state.durable().await;
    tracing::info!(
        listed = progress.listed.load(Ordering::Relaxed),
        restored = progress.matched.load(Ordering::Relaxed),
        "rebuild finished"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(key: &str, size: u64, etag: Option<&str>) -> Listed {
        Listed {
            key: key.into(),
            size,
            etag: etag.map(str::to_string),
        }
    }

    #[test]
    fn restores_deleted_and_matching_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("same.txt"), b"hello").unwrap();
        std::fs::write(dir.path().join("other.txt"), b"hello!").unwrap();
        let md5 = hex::encode(Md5::digest(b"hello"));
        let r = restore(
            dir.path(),
            "/pre/",
            "p",
            &listed("pre/same.txt", 5, Some(&md5)),
        )
        .unwrap();
        assert_eq!(r.0, b"same.txt");
        assert!(!r.1.local_deleted);
        assert!(restore(
            dir.path(),
            "pre",
            "p",
            &listed("pre/same.txt", 5, Some("0000"))
        )
        .is_none());
        assert!(restore(dir.path(), "pre", "p", &listed("pre/other.txt", 5, None)).is_none());
        let gone = restore(dir.path(), "pre", "p", &listed("pre/gone/x.png", 9, None)).unwrap();
        assert!(gone.1.local_deleted);
        assert!(restore(dir.path(), "pre", "p", &listed("elsewhere/x.png", 9, None)).is_none());
        assert!(restore(dir.path(), "", "p", &listed("x.png", 9, None)).is_some());
    }
}
