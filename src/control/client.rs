//! The CLI side of the control commands: each one asks the running daemon
//! over the control socket, or, when no daemon answers, opens the state
//! directory itself (taking the instance lock, so the two never meet), as
//! the state's owner when run as root ([`owner`]). An offline backfill
//! holds the lock only a moment at a time, so a daemon starting meanwhile
//! is not kept out.

use crate::config::Config;
use crate::control::commands;
use crate::control::owner;
use crate::control::protocol::{err_line, line, Envelope, Reply, Request};
use crate::control::status;
use crate::failpoint;
use crate::keys::{ItemKey, RelPath};
use crate::pipeline::filter::Rules;
use crate::pipeline::finished::FileIdentity;
use crate::pipeline::queue::{Admission, Admit, Queue, StateError};
use crate::statedir::{self, Holder, Lock};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Sends `req` to the running daemon. `Ok(None)` when no daemon answers (the
/// caller then works on the state directly).
pub fn call(config: &Config, req: &Request) -> Result<Option<Reply>, String> {
    use std::io::{BufRead, Write};
    let path = &config.control_socket;
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "permission denied on the control socket {}; run this as root or as a member of the offloadd group",
                path.display()
            ))
        }
        Err(_) => return Ok(None),
    };
    let envelope = Envelope {
        state_dir: config.state_dir.clone(),
        request: req,
    };
    // A daemon that accepts but never answers (stuck) must not hang the
    // caller (a monitoring script, say) for ever.
    let patience = req.patience();
    stream
        .set_read_timeout(Some(patience))
        .and_then(|()| stream.set_write_timeout(Some(patience)))
        .map_err(|e| format!("cannot talk to offloadd over {}: {e}", path.display()))?;
    let mut bytes = serde_json::to_vec(&envelope).expect("request serializes");
    bytes.push(b'\n');
    // A daemon that refuses this caller answers without reading the request
    // and closes: its answer is read all the same.
    match stream.write_all(&bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(format!(
                "cannot talk to offloadd over {}: {e}",
                path.display()
            ))
        }
        _ => {}
    }
    let mut reply = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "offloadd did not answer over {} within {} s; check its log (journalctl -u offloadd) and try again",
                path.display(),
                patience.as_secs()
            ),
            _ => format!("cannot read offloadd's answer over {}: {e}", path.display()),
        })?;
    if reply.is_empty() {
        return Err(format!(
            "offloadd closed {} without answering (it may be stopping); try again in a few seconds",
            path.display()
        ));
    }
    serde_json::from_str(&reply).map(Some).map_err(|e| {
        format!(
            "offloadd answered something unexpected over {}: {e}",
            path.display()
        )
    })
}

/// Runs `req` on the daemon if it runs, else `offline`.
fn live_or(config: &Config, req: Request, offline: impl FnOnce() -> Reply) -> ExitCode {
    match call(config, &req) {
        Ok(Some(reply)) => reply.finish(),
        Ok(None) => offline().finish(),
        Err(e) => Reply::fail(1, err_line(e)).finish(),
    }
}

/// Works as the state_dir's owner when run as root ([`owner`]): called
/// before a command touches the state of a stopped daemon.
fn as_state_owner(config: &Config) -> Result<(), Reply> {
    owner::become_state_owner(&config.state_dir).map_err(|e| Reply::fail(1, err_line(e)))
}

/// Opens the state of a stopped daemon, as its owner.
fn open_offline(config: &Config) -> Result<(Lock, Queue), Reply> {
    as_state_owner(config)?;
    open_state(config).map_err(|e| Reply::fail(1, err_line(e.for_command())))
}

/// Takes the lock and opens the database (the caller is the state's owner
/// already).
fn open_state(config: &Config) -> Result<(Lock, Queue), StateError> {
    let lock = Lock::acquire(&config.state_dir, Holder::Command)?;
    let (queue, _) = Queue::open(&config.state_dir)?;
    Ok((lock, queue))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime always builds")
}

pub fn status(config: &Config, json: bool) -> ExitCode {
    live_or(config, Request::Status { json }, || {
        if let Err(r) = as_state_owner(config) {
            return r;
        }
        match status::report(config) {
            Ok(r) if json => Reply::ok(line(serde_json::to_string(&r).expect("report serializes"))),
            Ok(r) => Reply::ok(status::render(&r)),
            Err(e) => Reply::fail(1, err_line(e)),
        }
    })
}

pub fn locate(config: &Config, rel: &str) -> ExitCode {
    live_or(
        config,
        Request::Locate { path: rel.into() },
        || match open_offline(config) {
            Ok((_lock, queue)) => commands::locate(config, &queue, rel),
            Err(r) => r,
        },
    )
}

pub fn retry(config: &Config, rel: Option<&str>, all: bool) -> ExitCode {
    let req = Request::Retry {
        path: rel.map(str::to_string),
        all,
    };
    live_or(config, req, || {
        let (_lock, queue) = match open_offline(config) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let wanted = match rel.map(RelPath::parse) {
            Some(Ok(r)) => Some(ItemKey::from_rel(&r)),
            Some(Err(e)) => return Reply::fail(2, err_line(e)),
            None if all => None,
            None => return Reply::fail(2, err_line("name a path or pass --all")),
        };
        let items = match queue.items() {
            Ok(i) => i,
            Err(e) => return Reply::fail(1, err_line(e)),
        };
        let mut n = 0;
        for (k, item) in items {
            if item.is_parked() && wanted.as_ref().is_none_or(|w| *w == k) {
                match queue.unpark(&k) {
                    Ok(true) => n += 1,
                    Ok(false) => {}
                    Err(e) => return Reply::fail(1, err_line(e)),
                }
            }
        }
        if let Err(e) = queue.flush() {
            return Reply::fail(1, err_line(e));
        }
        if let (0, Some(p)) = (n, rel) {
            return commands::not_failed(p);
        }
        Reply::ok(line(format!(
            "queued {n} failed item(s) again; they upload when offloadd runs"
        )))
    })
}

pub fn delete(config: &Config, rel: &str) -> ExitCode {
    live_or(config, Request::Delete { path: rel.into() }, || {
        let rel = match RelPath::parse(rel) {
            Ok(r) => r,
            Err(e) => return Reply::fail(2, err_line(e)),
        };
        match open_offline(config) {
            Ok((_lock, queue)) => {
                runtime().block_on(commands::delete_through(config, &queue, &rel))
            }
            Err(r) => r,
        }
    })
}

pub fn test_connection_cli(config: &Config, provider: Option<&str>) -> ExitCode {
    let req = Request::TestConnection {
        provider: provider.map(str::to_string),
    };
    live_or(config, req, || {
        runtime().block_on(commands::test_connection(config, provider))
    })
}

/// Paths a backfill walk could not read, so could not queue.
#[derive(Default)]
struct Unread {
    count: usize,
    first: Option<String>,
}

impl Unread {
    fn add(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(what());
        }
    }

    /// What to add to the summary line, if anything was left out.
    fn sentence(&self) -> Option<String> {
        let first = self.first.as_deref()?;
        Some(format!(
            "{} path(s) could not be read and were left out (the first: {first}); let offloadd read them and run backfill again",
            self.count
        ))
    }
}

/// Files under the root that backfill may queue: included, regular and
/// changed before the managed-since mark; and what could not be read on the
/// way. Read without the state: which are recorded as they are now is the
/// queue's to say (the daemon's, or [`backfill_offline`]'s).
fn backfill_candidates(
    config: &Config,
    mark: i128,
) -> Result<(Vec<(ItemKey, FileIdentity)>, Unread), String> {
    let rules = Rules::new(
        &config.watch.root,
        &config.watch.include,
        &config.watch.exclude,
        config.watch.settle,
    )
    .map_err(|e| e.to_string())?;
    let root = &config.watch.root;
    let mut unread = Unread::default();
    // Gone meanwhile (deleted after its upload, say): nothing to queue,
    // nothing unread.
    let mut cannot_read = |err: walkdir::Error| {
        if err.io_error().map(std::io::Error::kind) != Some(std::io::ErrorKind::NotFound) {
            unread.add(|| err.to_string());
        }
    };
    let mut keys = Vec::new();
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let e = match entry {
            Ok(e) => e,
            Err(err) => {
                cannot_read(err);
                continue;
            }
        };
        if !(e.file_type().is_file() && rules.matches(e.path())) {
            continue;
        }
        let meta = match e.metadata() {
            Ok(meta) => meta,
            Err(err) => {
                cannot_read(err);
                continue;
            }
        };
        let id = FileIdentity::of(&meta);
        if id.changed_ns() >= mark {
            continue;
        }
        let Some(key) = ItemKey::of(root, e.path()) else {
            continue;
        };
        keys.push((key, id));
    }
    Ok((keys, unread))
}

fn progress(total: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "backfill {bar:40} {pos}/{len} files queued ({eta})",
            )
            .expect("template is valid"),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// Sends one batch of backfill paths to the running daemon; returns how many it
/// queued (or, with `dry_run`, would queue).
fn enqueue_live(
    config: &Config,
    keys: &[(ItemKey, FileIdentity)],
    dry_run: bool,
) -> Result<usize, Reply> {
    let req = Request::Enqueue {
        keys: keys.iter().map(|(k, _)| k.as_bytes().to_vec()).collect(),
        dry_run,
    };
    match call(config, &req) {
        Ok(Some(r)) if r.exit == 0 => Ok(r.out.trim().parse().unwrap_or(0)),
        Ok(Some(r)) => Err(r),
        Ok(None) => Err(Reply::fail(
            1,
            err_line("offloadd stopped during backfill; run backfill again to resume"),
        )),
        Err(e) => Err(Reply::fail(1, err_line(e))),
    }
}

pub fn backfill(config: &Config, dry_run: bool) -> ExitCode {
    let mark = match statedir::mark::load(&config.state_dir) {
        Ok(Some(mark)) => mark,
        Ok(None) => {
            return Reply::ok(line(
                "nothing to backfill: offloadd has not run with an active provider yet, so every file will be handled as new when it does",
            ))
            .finish()
        }
        Err(e) => {
            return Reply::fail(
                1,
                err_line(format!(
                    "{e}; run backfill as root or as a member of the service's group"
                )),
            )
            .finish()
        }
    };
    // Asked of the daemon when it runs: only it knows whether it can read
    // its secret.
    let probe = call(config, &Request::Status { json: true });
    let local = match &probe {
        Ok(Some(status)) if status.exit != 0 => {
            return Reply::fail(status.exit, status.err.clone()).finish()
        }
        Ok(Some(status)) => serde_json::from_str::<serde_json::Value>(&status.out)
            .ok()
            .and_then(|s| s["local_mode_reason"].as_str().map(str::to_string)),
        Ok(None) => config.local_whatever_the_secret(),
        Err(e) => return Reply::fail(1, err_line(e)).finish(),
    };
    if let Some(reason) = local {
        return Reply::fail(
            78,
            err_line(format!("backfill needs an active provider: {reason}")),
        )
        .finish();
    }
    let running = matches!(probe, Ok(Some(_)));
    // The walk needs no state, and goes with the caller's rights: root may
    // read what the service reads through groups its unit adds
    // (`SupplementaryGroups=`), which the state's owner alone lacks. A file
    // the service cannot read is parked by it with the reason.
    let (keys, unread) = match backfill_candidates(config, mark) {
        Ok(found) => found,
        Err(e) => return Reply::fail(78, err_line(e)).finish(),
    };
    if !running {
        if let Err(r) = as_state_owner(config) {
            return r.finish();
        }
    }
    // The summary, and exit 1 when something could not be read.
    let summary = |text: String| match unread.sentence() {
        None => Reply::ok(line(text)),
        Some(left_out) => Reply::fail(1, err_line(format!("{text}; {left_out}"))),
    };
    if !running {
        return match backfill_offline(config, &keys, dry_run) {
            Ok(Offline::Done { queued, .. }) if dry_run => summary(format!(
                "backfill (dry run): {queued} file(s) would be queued"
            )),
            Ok(Offline::Done { queued, considered }) => summary(format!(
                "backfill: {queued} of {considered} file(s) queued; they upload when offloadd runs (run it again to resume)"
            )),
            Ok(Offline::DaemonStarted { queued }) if dry_run => Reply::fail(
                1,
                err_line(format!(
                    "offloadd started while the dry run ran ({queued} file(s) would have been queued by then); run backfill --dry-run again to ask the daemon"
                )),
            ),
            Ok(Offline::DaemonStarted { queued }) => Reply::fail(
                1,
                err_line(format!(
                    "offloadd started while backfill ran ({queued} file(s) queued by then); run backfill again to let the daemon queue the rest"
                )),
            ),
            Err(r) => r,
        }
        .finish();
    }
    if dry_run {
        let mut would = 0;
        for chunk in keys.chunks(1000) {
            match enqueue_live(config, chunk, true) {
                Ok(n) => would += n,
                Err(r) => return r.finish(),
            }
        }
        return summary(format!(
            "backfill (dry run): {would} file(s) would be queued"
        ))
        .finish();
    }
    let bar = progress(keys.len());
    let mut queued = 0usize;
    for chunk in keys.chunks(1000) {
        match enqueue_live(config, chunk, false) {
            Ok(n) => queued += n,
            Err(r) => return r.finish(),
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    summary(format!(
        "backfill: {queued} of {} file(s) queued; they upload now (run it again to resume)",
        keys.len()
    ))
    .finish()
}

/// How long an offline backfill holds a stopped daemon's state at a time.
/// Between two holds it lets go for [`LET_GO`], so that a daemon starting
/// meanwhile takes the lock well within [`statedir::COMMAND_PATIENCE`]
/// instead of giving up (and systemd after it).
const HOLD: Duration = Duration::from_secs(1);

/// The least work an offline backfill does in a hold after the database
/// opened.
const MIN_BATCH: Duration = Duration::from_millis(250);

/// Longer than a waiting daemon's poll of the lock (50 ms).
const LET_GO: Duration = Duration::from_millis(200);

/// How an offline backfill ended.
enum Offline {
    /// Every file was seen: `queued` (or, in a dry run, would be) of the
    /// `considered` not recorded as they are now.
    Done { queued: usize, considered: usize },
    /// offloadd started and holds the state now; `queued` were queued (and
    /// flushed) before.
    DaemonStarted { queued: usize },
}

/// Queues `keys` into a stopped daemon's state (`dry_run`: counts them), a
/// [`HOLD`] at a time. Each hold ends with a flush, so what was counted
/// queued stays queued; a daemon that took the lock meanwhile ends it, and
/// a backfill run again through the daemon skips what is queued already.
fn backfill_offline(
    config: &Config,
    keys: &[(ItemKey, FileIdentity)],
    dry_run: bool,
) -> Result<Offline, Reply> {
    let failed = |e: StateError| Reply::fail(1, err_line(e));
    let bar = if dry_run {
        indicatif::ProgressBar::hidden()
    } else {
        progress(keys.len())
    };
    let (mut queued, mut recorded, mut next) = (0usize, 0usize, 0usize);
    while next < keys.len() {
        if next > 0 {
            std::thread::sleep(LET_GO);
        }
        // The hold counts from before the open (a large database takes a
        // while to open, and a daemon waiting meanwhile waits that too),
        // but leaves at least `MIN_BATCH` of work after it, however slow
        // the open.
        let began = Instant::now();
        let (lock, queue) = match open_state(config) {
            Ok(x) => x,
            Err(StateError::AlreadyRunning { .. }) => {
                bar.finish_and_clear();
                return Ok(Offline::DaemonStarted { queued });
            }
            Err(e) => return Err(Reply::fail(1, err_line(e.for_command()))),
        };
        let until = (began + HOLD).max(Instant::now() + MIN_BATCH);
        while next < keys.len() && Instant::now() < until {
            let (k, id) = &keys[next];
            next += 1;
            bar.inc(1);
            if queue
                .record(k)
                .map_err(failed)?
                .is_some_and(|r| r.identity == *id)
            {
                recorded += 1;
                continue;
            }
            let already = queue.item(k).map_err(failed)?.is_some();
            if dry_run {
                queued += usize::from(!already);
                continue;
            }
            if failpoint::fails(failpoint::BACKFILL_ADMITS_SLOWLY) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Admission::Queued(_) = queue.admit(k, id, Admit::Event).map_err(failed)? {
                queued += usize::from(!already);
            }
        }
        if !dry_run {
            queue.flush().map_err(failed)?;
        }
        // The database closed before the lock goes.
        drop(queue);
        drop(lock);
    }
    bar.finish_and_clear();
    Ok(Offline::Done {
        queued,
        considered: keys.len() - recorded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, RootCheck};
    use std::os::unix::fs::PermissionsExt;

    /// A folder backfill cannot read is counted and named, not skipped in
    /// silence: the summary said "N of N queued" and exited 0.
    #[test]
    fn backfill_names_what_it_could_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("results");
        std::fs::create_dir_all(root.join("open")).unwrap();
        std::fs::create_dir_all(root.join("locked")).unwrap();
        std::fs::write(root.join("open/a.png"), b"a").unwrap();
        std::fs::write(root.join("locked/b.png"), b"b").unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, format!("watch:\n  root: {}\n", root.display())).unwrap();
        let config = load(&config, RootCheck::MustExist).unwrap().config;
        // Each mode set, whatever the umask (another test sets 0077 for a
        // moment).
        for (path, mode) in [
            (dir.path(), 0o755),
            (&root, 0o755),
            (&root.join("open"), 0o755),
            (&root.join("locked"), 0o000),
        ] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let mark = statedir::mark::now_ns() + 1_000_000_000;
        // As `nobody`, on a thread of its own: root reads any folder, but the
        // file system user id (per thread) decides, and a non-zero one drops
        // the capabilities that would override the mode.
        let (keys, unread) = std::thread::spawn(move || {
            // SAFETY: setfsuid only changes this thread's file system uid.
            unsafe { libc::setfsuid(65534) };
            backfill_candidates(&config, mark)
        })
        .join()
        .unwrap()
        .unwrap();
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let names: Vec<_> = keys.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(names, ["open/a.png"]);
        let sentence = unread.sentence().expect("the locked folder is named");
        assert!(
            sentence.starts_with("1 path(s) could not be read and were left out (the first: ")
                && sentence.contains("locked")
                && sentence.ends_with("let offloadd read them and run backfill again"),
            "{sentence}"
        );
    }
}
