//! What each command does against an open state, the same whether the daemon
//! answers it over the socket or the CLI runs it on a stopped daemon's state.

use crate::config::Config;
use crate::control::protocol::{err_line, line, Reply};
use crate::control::status::{self, Location};
use crate::keys::{ItemKey, RelPath};
use crate::pipeline::queue::Queue;
use crate::remote::client::Client;
use std::path::Path;

/// `locate`: the public URL, the bucket and key, or the local path.
pub fn locate(config: &Config, queue: &Queue, path: &str) -> Reply {
    let rel = match RelPath::parse(path) {
        Ok(rel) => rel,
        Err(e) => return Reply::fail(2, err_line(e)),
    };
    match status::locate_in(config, queue, &rel) {
        Ok(Some(Location::Remote(url))) => Reply::ok(line(url)),
        Ok(Some(Location::RemoteKey { provider, key })) => {
            Reply::ok(line(format!("{provider}:{key}")))
        }
        Ok(Some(Location::Local(p))) => Reply::ok(line(p.display())),
        Ok(None) => Reply::fail(
            1,
            err_line(format!(
                "{path} is unknown: not offloaded and not in the watch root"
            )),
        ),
        Err(e) => Reply::fail(1, err_line(format!("cannot read the state: {e}"))),
    }
}

/// `retry PATH` when PATH is not parked (or is being worked on right now).
pub fn not_failed(path: &str) -> Reply {
    Reply::fail(
        1,
        err_line(format!(
            "{path} is not a failed item, so nothing was queued again; `status` lists the failed ones"
        )),
    )
}

/// `delete`: removes the bucket object (if recorded), the local copy and the
/// record, in that order. What can be known to stop the local removal (not a
/// file, a folder we may not write) is checked before the bucket is touched;
/// a failure stops before anything later is touched, except that a local
/// copy that cannot be removed once its object is gone loses its record too
/// (a record must never name a missing object).
pub async fn delete_through(config: &Config, queue: &Queue, rel: &RelPath) -> Reply {
    if let Some(link) = rel.symlinked_folder(&config.watch.root) {
        return Reply::fail(
            1,
            err_line(format!(
                "{rel} is below {}, a symlink, and offloadd does not follow symlinks inside the root; nothing was deleted",
                link.display()
            )),
        );
    }
    let local = rel.to_local(&config.watch.root);
    if let Err(why) = removable(&local) {
        return Reply::fail(
            1,
            err_line(format!(
                "cannot delete {}: {why}; nothing was deleted",
                local.display()
            )),
        );
    }
    // The record cannot be removed while the state cannot be written: the
    // object and the local copy stay, rather than a record naming neither.
    if let Some(e) = queue.failed_state() {
        return Reply::fail(
            1,
            err_line(format!("cannot delete {rel}: {e}; nothing was deleted")),
        );
    }
    let key = ItemKey::from_rel(rel);
    let record = match queue.record(&key) {
        Ok(r) => r,
        Err(e) => return Reply::fail(1, err_line(format!("cannot read the state: {e}"))),
    };
    let mut out = String::new();
    if let Some(rec) = &record {
        let client = match config
            .resolve_provider(&rec.provider)
            .map_err(|e| e.to_string())
            .and_then(|p| Client::new(&p).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                return Reply::fail(
                    1,
                    err_line(format!(
                        "cannot delete {rel} from provider `{}`: {e}; nothing was deleted",
                        rec.provider
                    )),
                )
            }
        };
        let object = crate::keys::ObjectKey::from_raw(rec.key.clone());
        if let Err(e) = client.delete(&object).await {
            return Reply::fail(
                1,
                err_line(format!(
                    "cannot delete object `{}` at provider `{}`: {e}; nothing was deleted",
                    rec.key, rec.provider
                )),
            );
        }
        out.push_str(&line(format!(
            "deleted object {} at provider {}",
            rec.key, rec.provider
        )));
    }
    let (had_local, kept) = match std::fs::remove_file(&local) {
        Ok(()) => {
            out.push_str(&line(format!("deleted local copy {}", local.display())));
            (true, None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (false, None),
        Err(e) if record.is_none() => {
            return Reply::fail(
                1,
                err_line(format!("cannot delete {}: {e}", local.display())),
            )
        }
        // The object is gone: the record goes too, below.
        Err(e) => (true, Some(e)),
    };
    if let Err(e) = queue.forget(&key) {
        return Reply::fail(
            1,
            format!(
                "{out}{}",
                err_line(format!("cannot remove the record: {e}"))
            ),
        );
    }
    if let Err(e) = queue.durable().await {
        return Reply::fail(1, format!("{out}{}", err_line(e)));
    }
    if let Some(e) = kept {
        return Reply::fail(
            1,
            format!(
                "{out}{}",
                err_line(format!(
                    "cannot delete {}: {e}; its object is gone, so its record was removed too and offloadd treats the file as never offloaded (a scan may upload it again): delete it by hand",
                    local.display()
                ))
            ),
        );
    }
    if record.is_none() && !had_local {
        return Reply::fail(
            1,
            err_line(format!(
                "{rel} is unknown: not offloaded and not in the watch root"
            )),
        );
    }
    Reply::ok(out)
}

/// Whether `remove_file` may succeed on `local`, as far as can be known
/// beforehand: absent, or a regular file in a folder this process may write.
fn removable(local: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(local) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_symlink() {
            "a symlink"
        } else {
            "not a regular file"
        };
        return Err(format!("it is {what}, and offloadd deletes only files"));
    }
    let Some(folder) = local.parent() else {
        return Ok(());
    };
    crate::pipeline::localfs::may_write_in(folder).map_err(|e| {
        format!(
            "offloadd may not remove files from {} ({e})",
            folder.display()
        )
    })
}

/// `test-connection`: put, read back, compare, delete.
pub async fn test_connection(config: &Config, provider: Option<&str>) -> Reply {
    let (exit, out, err) = crate::remote::connection_test::outcome(config, provider).await;
    Reply { exit, out, err }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the state unwritable (a full disk), a delete-through touches
    /// nothing: the record could not go, and would name a missing object or
    /// file.
    #[tokio::test]
    async fn a_delete_while_the_state_cannot_be_written_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::in_temp_dir(dir.path());
        let (queue, _) = Queue::open(&config.state_dir).unwrap();
        let root = &config.watch.root;
        std::fs::write(root.join("a.png"), b"kept").unwrap();
        queue.inject_failure("No space left on device");

        let reply = delete_through(&config, &queue, &RelPath::parse("a.png").unwrap()).await;
        assert_eq!(reply.exit, 1);
        assert!(
            reply.err.contains("cannot write to state_dir")
                && reply.err.contains("nothing was deleted"),
            "{}",
            reply.err
        );
        assert!(root.join("a.png").exists(), "the local copy was deleted");
    }
}
