//! The local control API (a Unix socket, `control_socket`) and the commands that
//! act on the queue: status, locate, retry, delete-through, backfill and
//! test-connection.
//!
//! While the daemon runs, the CLI sends one JSON request line and prints the
//! one-line JSON [`Reply`]; the daemon owns the database, so every change goes
//! through its pipeline. When the daemon does not run, the same commands open the
//! state directly. The socket is mode 0660 and every caller is checked by peer
//! credentials: root, the daemon's user, or its group.

use crate::config::{Active, Config};
use crate::keys::RelPath;
use crate::pipeline::{Command as PipelineCommand, Live};
use crate::state::{self, FileIdentity, Lock, QueueItem, State};
use crate::status::{self, Location};
use crate::storage::Client;
use crate::watcher::Rules;
use serde::{Deserialize, Serialize};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

/// The largest request line the daemon reads (backfill sends paths in batches).
const MAX_REQUEST_BYTES: u64 = 16 * 1024 * 1024;

/// One request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status {
        json: bool,
    },
    Locate {
        path: String,
    },
    Retry {
        path: Option<String>,
        all: bool,
    },
    Delete {
        path: String,
    },
    /// Backfill: queue these paths (raw bytes, relative to the root) regardless
    /// of the managed-since mark.
    Enqueue {
        keys: Vec<Vec<u8>>,
        dry_run: bool,
    },
    TestConnection {
        provider: Option<String>,
    },
}

/// What the CLI prints and its exit code.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub exit: u8,
    pub out: String,
    pub err: String,
}

impl Reply {
    fn ok(out: String) -> Reply {
        Reply {
            exit: 0,
            out,
            err: String::new(),
        }
    }

    fn fail(exit: u8, err: String) -> Reply {
        Reply {
            exit,
            out: String::new(),
            err,
        }
    }

    /// Prints the reply and turns it into the process exit code.
    pub fn finish(self) -> ExitCode {
        if !self.out.is_empty() {
            print!("{}", self.out);
        }
        if !self.err.is_empty() {
            eprint!("{}", self.err);
        }
        ExitCode::from(self.exit)
    }
}

fn line(s: impl std::fmt::Display) -> String {
    format!("{s}\n")
}

fn err_line(s: impl std::fmt::Display) -> String {
    format!("offloadd: {s}\n")
}

// ---------------------------------------------------------------------------
// Daemon side

/// What the socket handlers need from the running daemon.
#[derive(Clone)]
pub struct Daemon {
    pub shared: crate::daemon::Shared,
    pub state: State,
    pub live: Arc<Live>,
    pub pipeline: mpsc::UnboundedSender<PipelineCommand>,
}

/// Binds the control socket (replacing a stale one) with mode 0660.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process answers on it",
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Accepts connections until `stop` flips.
pub async fn serve(listener: UnixListener, daemon: Daemon, mut stop: watch::Receiver<bool>) {
    let path = crate::daemon::current(&daemon.shared)
        .config
        .control_socket
        .clone();
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let d = daemon.clone();
                tokio::spawn(async move { handle(stream, d).await });
            }
            _ = stop.changed() => break,
        }
    }
    let _ = std::fs::remove_file(path);
}

fn allowed(stream: &UnixStream) -> bool {
    let Ok(cred) = stream.peer_cred() else {
        return false;
    };
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    cred.uid() == 0 || cred.uid() == uid || cred.gid() == gid
}

async fn handle(stream: UnixStream, d: Daemon) {
    let permitted = allowed(&stream);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES)).lines();
    let Ok(Some(request)) = lines.next_line().await else {
        return;
    };
    let reply = if !permitted {
        Reply::fail(
            1,
            err_line("the control socket only answers root and the offloadd user and group; run this as one of them"),
        )
    } else {
        match serde_json::from_str::<Request>(&request) {
            Ok(req) => answer(req, &d).await,
            Err(e) => Reply::fail(
                2,
                err_line(format!("bad request on the control socket: {e}")),
            ),
        }
    };
    let mut bytes = serde_json::to_vec(&reply).expect("reply serializes");
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
}

async fn ask<T>(d: &Daemon, make: impl FnOnce(oneshot::Sender<T>) -> PipelineCommand) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    d.pipeline.send(make(tx)).ok()?;
    rx.await.ok()
}

async fn answer(req: Request, d: &Daemon) -> Reply {
    let cur = crate::daemon::current(&d.shared);
    match req {
        Request::Status { json } => {
            let r = status::live(&d.state, &d.live, &cur.active, cur.local_reason.as_deref());
            Reply::ok(if json {
                line(serde_json::to_string(&r).expect("report serializes"))
            } else {
                status::render(&r)
            })
        }
        Request::Locate { path } => locate_reply(&cur.config, &d.state, &path),
        Request::Retry { path, all } => {
            let keys = match (path, all) {
                (Some(p), _) => match RelPath::parse(&p) {
                    Ok(r) => Some(vec![r.as_str().as_bytes().to_vec()]),
                    Err(e) => return Reply::fail(2, err_line(e)),
                },
                (None, true) => None,
                (None, false) => return Reply::fail(2, err_line("name a path or pass --all")),
            };
            match ask(d, |reply| PipelineCommand::Retry { keys, reply }).await {
                Some(n) => Reply::ok(line(format!("queued {n} failed item(s) again"))),
                None => Reply::fail(
                    1,
                    err_line("the daemon is stopping; try again after it restarts"),
                ),
            }
        }
        Request::Enqueue { keys, dry_run } => match ask(d, |reply| PipelineCommand::Enqueue {
            keys,
            dry_run,
            reply,
        })
        .await
        {
            Some(n) => Reply::ok(line(n)),
            None => Reply::fail(
                1,
                err_line("the daemon is stopping; try again after it restarts"),
            ),
        },
        Request::Delete { path } => {
            let rel = match RelPath::parse(&path) {
                Ok(r) => r,
                Err(e) => return Reply::fail(2, err_line(e)),
            };
            let key = rel.as_str().as_bytes().to_vec();
            match ask(d, |reply| PipelineCommand::Hold {
                key: key.clone(),
                reply,
            })
            .await
            {
                Some(Ok(())) => {}
                Some(Err(e)) => return Reply::fail(1, err_line(e)),
                None => {
                    return Reply::fail(
                        1,
                        err_line("the daemon is stopping; try again after it restarts"),
                    )
                }
            }
            let reply = delete_through(&cur.config, &d.state, &rel).await;
            let _ = ask(d, |reply| PipelineCommand::Release { key, reply }).await;
            reply
        }
        Request::TestConnection { provider } => {
            test_connection(&cur.config, provider.as_deref()).await
        }
    }
}

// ---------------------------------------------------------------------------
// Shared by the daemon and the offline CLI

fn locate_reply(config: &Config, state: &State, path: &str) -> Reply {
    match status::locate_in(config, state, path) {
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
        Err(e) => Reply::fail(2, err_line(e)),
    }
}

/// Removes the bucket object (if recorded), the local copy and the record.
async fn delete_through(config: &Config, state: &State, rel: &RelPath) -> Reply {
    let key = rel.as_str().as_bytes();
    let record = match state.record(key) {
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
    let local = rel.to_local(&config.watch.root);
    let had_local = match std::fs::remove_file(&local) {
        Ok(()) => {
            out.push_str(&line(format!("deleted local copy {}", local.display())));
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Reply::fail(
                1,
                format!(
                    "{out}{}",
                    err_line(format!(
                        "cannot delete {}: {e}; the record is kept",
                        local.display()
                    ))
                ),
            )
        }
    };
    if let Err(e) = state.forget(key) {
        return Reply::fail(
            1,
            format!(
                "{out}{}",
                err_line(format!("cannot remove the record: {e}"))
            ),
        );
    }
    let _ = state.durable().await;
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

async fn test_connection(config: &Config, provider: Option<&str>) -> Reply {
    let (exit, out, err) = crate::connection_test::outcome(config, provider).await;
    Reply { exit, out, err }
}

// ---------------------------------------------------------------------------
// CLI side

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
    let mut bytes = serde_json::to_vec(req).expect("request serializes");
    bytes.push(b'\n');
    stream
        .write_all(&bytes)
        .map_err(|e| format!("cannot talk to offloadd over {}: {e}", path.display()))?;
    let mut reply = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("cannot read offloadd's answer over {}: {e}", path.display()))?;
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

/// Opens the state of a stopped daemon.
fn open_offline(config: &Config) -> Result<(Lock, State), Reply> {
    let lock = Lock::acquire(&config.state_dir).map_err(|e| Reply::fail(1, err_line(e)))?;
    let (state, _) = State::open(&config.state_dir).map_err(|e| Reply::fail(1, err_line(e)))?;
    Ok((lock, state))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime always builds")
}

pub fn status(config: &Config, json: bool) -> ExitCode {
    live_or(config, Request::Status { json }, || {
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
            Ok((_lock, state)) => locate_reply(config, &state, rel),
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
        let (_lock, state) = match open_offline(config) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let wanted = match rel.map(RelPath::parse) {
            Some(Ok(r)) => Some(r.as_str().as_bytes().to_vec()),
            Some(Err(e)) => return Reply::fail(2, err_line(e)),
            None if all => None,
            None => return Reply::fail(2, err_line("name a path or pass --all")),
        };
        let mut n = 0;
        for (k, item) in state.queue_items() {
            if item.is_parked() && wanted.as_ref().is_none_or(|w| *w == k) {
                let _ = state.put_queue_item(&k, &QueueItem::upload_now());
                n += 1;
            }
        }
        let _ = state.flush();
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
            Ok((_lock, state)) => runtime().block_on(delete_through(config, &state, &rel)),
            Err(r) => r,
        }
    })
}

pub fn test_connection_cli(config: &Config, provider: Option<&str>) -> ExitCode {
    let req = Request::TestConnection {
        provider: provider.map(str::to_string),
    };
    live_or(config, req, || {
        runtime().block_on(test_connection(config, provider))
    })
}

/// Files under the root that backfill would queue: included, regular, changed
/// before the managed-since mark, and not recorded as they are now.
fn backfill_candidates(config: &Config, state: Option<&State>, mark: i128) -> Vec<Vec<u8>> {
    let Ok(rules) = Rules::new(
        &config.watch.root,
        &config.watch.include,
        &config.watch.exclude,
        config.watch.settle,
    ) else {
        return Vec::new();
    };
    let root = &config.watch.root;
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && rules.matches(e.path()))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let id = FileIdentity::of(&meta);
            if id.changed_ns() >= mark {
                return None;
            }
            let key = e
                .path()
                .strip_prefix(root)
                .ok()?
                .as_os_str()
                .as_bytes()
                .to_vec();
            if let Some(st) = state {
                if st
                    .record(&key)
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.identity == id)
                {
                    return None;
                }
            }
            Some(key)
        })
        .collect()
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
fn enqueue_live(config: &Config, keys: &[Vec<u8>], dry_run: bool) -> Result<usize, Reply> {
    let req = Request::Enqueue {
        keys: keys.to_vec(),
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
    let Some(mark) = state::mark::read(&config.state_dir) else {
        return Reply::ok(line(
            "nothing to backfill: offloadd has not run with an active provider yet, so every file will be handled as new when it does",
        ))
        .finish();
    };
    if let Active::Local { reason } = config.active() {
        return Reply::fail(
            78,
            err_line(format!("backfill needs an active provider: {reason}")),
        )
        .finish();
    }
    let probe = call(config, &Request::Status { json: true });
    let running = matches!(probe, Ok(Some(_)));
    if let Err(e) = probe {
        return Reply::fail(1, err_line(e)).finish();
    }
    let offline = if running {
        None
    } else {
        match open_offline(config) {
            Ok(x) => Some(x),
            Err(r) => return r.finish(),
        }
    };
    let keys = backfill_candidates(config, offline.as_ref().map(|(_, s)| s), mark);
    if dry_run {
        let mut would = keys.len();
        if running {
            would = 0;
            for chunk in keys.chunks(1000) {
                match enqueue_live(config, chunk, true) {
                    Ok(n) => would += n,
                    Err(r) => return r.finish(),
                }
            }
        }
        return Reply::ok(line(format!(
            "backfill (dry run): {would} file(s) would be queued"
        )))
        .finish();
    }
    let bar = progress(keys.len());
    let mut queued = 0usize;
    for chunk in keys.chunks(1000) {
        match &offline {
            Some((_, state)) => {
                for k in chunk {
                    if state.record(k).ok().flatten().is_none()
                        && state.queue_item(k).ok().flatten().is_none()
                    {
                        let _ = state.put_queue_item(k, &QueueItem::upload_now());
                        queued += 1;
                    }
                }
            }
            None => match enqueue_live(config, chunk, false) {
                Ok(n) => queued += n,
                Err(r) => return r.finish(),
            },
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if let Some((_, state)) = &offline {
        let _ = state.flush();
    }
    let when = if running { "now" } else { "when offloadd runs" };
    Reply::ok(line(format!(
        "backfill: {queued} of {} file(s) queued; they upload {when} (run it again to resume)",
        keys.len()
    )))
    .finish()
}
