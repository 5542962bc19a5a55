//! The daemon side of the control socket (`control_socket`): answers status,
//! locate, retry, delete-through, backfill and test-connection while the
//! daemon runs.
//!
//! The daemon owns the database, so every change goes through the scheduler
//! ([`Command`]); until the scheduler runs (a rebuild after state loss may
//! take hours), retry, delete and backfill are refused at once rather than
//! queued for later. A delete-through whose caller hangs up before it starts
//! is not carried out. The socket is mode 0660 and every caller is checked by peer
//! credentials: root, the daemon's user, or a process whose primary or
//! supplementary groups include the daemon's group (as `usermod -aG` gives).

use crate::control::commands;
use crate::control::protocol::{err_line, line, Envelope, Reply, Request, MAX_REQUEST_BYTES};
use crate::control::status;
use crate::keys::{ItemKey, RelPath};
use crate::pipeline::live::Live;
use crate::pipeline::queue::Queue;
use crate::pipeline::schedule::{BackfillMode, Command};
use crate::settings::{self, Shared};
use crate::shutdown::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// What the socket handlers need from the running daemon.
#[derive(Clone)]
pub struct Handle {
    pub shared: Shared,
    pub queue: Arc<Queue>,
    pub live: Arc<Live>,
    pub commands: Commands,
}

/// The scheduler's command channel, published by the daemon once the
/// scheduler runs; empty before (while records are rebuilt, say).
pub type Commands = Arc<OnceLock<mpsc::Sender<Command>>>;

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
    // A stale socket of ours is replaced; anything else at the path is left.
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is there (left as it is)",
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// After an accept error, the pause before the next accept.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Accepts connections until shutdown; every connection's task is joined.
pub async fn serve(listener: UnixListener, handle: Handle, mut shutdown: Shutdown) {
    let path = settings::current(&handle.shared)
        .config
        .control_socket
        .clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else {
                    // Out of descriptors, say: pause rather than spin while
                    // it lasts.
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                };
                let h = handle.clone();
                conns.spawn(async move { serve_one(stream, h).await });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.recv() => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(path);
    conns.shutdown().await;
}

/// The supplementary groups of the process at the other end of `stream`, as
/// the kernel recorded them at connect (`SO_PEERGROUPS`). Not read from
/// `/proc/PID/status`: the unit's `ProtectProc=invisible` hides other users'
/// processes from us.
fn peer_groups(stream: &UnixStream) -> Vec<libc::gid_t> {
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes we own; the fd is the stream's.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = len as usize / GID;
        if rc == 0 {
            groups.truncate(len);
            return groups;
        }
        // ERANGE: the kernel says how many there are; ask again with room.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
            && len > groups.len()
        {
            groups.resize(len, 0);
            continue;
        }
        return Vec::new();
    }
}

/// Root, our user, or a member (primary or supplementary) of our group.
fn allowed(stream: &UnixStream) -> bool {
    let Ok(cred) = stream.peer_cred() else {
        return false;
    };
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if cred.uid() == 0 || cred.uid() == uid || cred.gid() == gid {
        return true;
    }
    peer_groups(stream).contains(&gid)
}

async fn serve_one(stream: UnixStream, h: Handle) {
    let permitted = allowed(&stream);
    let (read, mut write) = stream.into_split();
    // A caller not allowed is answered before anything it sent is read.
    let max_request = if permitted { MAX_REQUEST_BYTES } else { 0 };
    let mut lines = BufReader::new(read.take(max_request)).lines();
    let request = lines.next_line().await;
    let mut caller = Caller {
        read: lines.into_inner().into_inner().into_inner(),
        gone: false,
    };
    let mut changes = None;
    let reply = if !permitted {
        Reply::fail(
            1,
            err_line("the control socket only answers root and the offloadd user and group; run this as one of them"),
        )
    } else if let Ok(Some(request)) = request {
        match serde_json::from_str::<Envelope>(&request) {
            Ok(env) => match other_instance(&env, &h) {
                Some(refusal) => refusal,
                None => {
                    changes = env.request.changes();
                    answer(env.request, &h, &mut caller).await
                }
            },
            Err(e) => Reply::fail(
                2,
                err_line(format!("bad request on the control socket: {e}")),
            ),
        }
    } else {
        return;
    };
    let mut bytes = serde_json::to_vec(&reply).expect("reply serializes");
    bytes.push(b'\n');
    if let (Err(_), Some(command)) = (write.write_all(&bytes).await, changes) {
        // The caller left (Ctrl-C, its timeout): what a command that
        // changes something did is not lost with the answer (a
        // delete-through runs to its end).
        let said = format!("{}{}", reply.out, reply.err);
        let said: String = said
            .trim_end()
            .replace('\n', "; ")
            .chars()
            .take(500)
            .collect();
        tracing::info!(
            "the caller of `offloadd {command}` left before its answer (exit {}): {said}",
            reply.exit,
        );
    }
}

/// The refusal of a request meant for another instance (its config names
/// another state_dir): two instances given one `control_socket` must never
/// act on each other's files.
fn other_instance(env: &Envelope, h: &Handle) -> Option<Reply> {
    let cur = settings::current(&h.shared);
    let ours = &cur.config.state_dir;
    let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if same(&env.state_dir) == same(ours) {
        return None;
    }
    Some(Reply::fail(
        78,
        err_line(format!(
            "the offloadd answering on {} runs with state_dir {}, not {}: two instances share this control_socket; give each its own `control_socket` and restart them",
            cur.config.control_socket.display(),
            ours.display(),
            env.state_dir.display()
        )),
    ))
}

/// The caller's end of the connection once its request is read. The CLI
/// sends nothing more, so a read returns only when it hangs up (it gave up
/// waiting, or was interrupted).
struct Caller {
    read: OwnedReadHalf,
    gone: bool,
}

impl Caller {
    /// Resolves once the caller has hung up; cancel-safe.
    async fn hung_up(&mut self) {
        let mut buf = [0u8; 256];
        while !self.gone {
            match self.read.read(&mut buf).await {
                Ok(0) | Err(_) => self.gone = true,
                Ok(_) => {}
            }
        }
    }

    /// Whether the caller has hung up by now, without waiting.
    async fn has_hung_up(&mut self) -> bool {
        tokio::select! {
            biased;
            () = self.hung_up() => true,
            () = std::future::ready(()) => false,
        }
    }
}

/// The scheduler's channel, or the refusal while it does not run yet: a
/// command queued meanwhile would be carried out long after its caller
/// gave up waiting.
fn scheduler(h: &Handle) -> Result<&mpsc::Sender<Command>, Reply> {
    if let Some(tx) = h.commands.get() {
        return Ok(tx);
    }
    let why = match h.live.shown().rebuild {
        Some(p) => format!(
            "offloadd is rebuilding its location records from the bucket ({}/{}); try again when `status` no longer says rebuilding",
            p.checked.load(Ordering::Relaxed),
            p.listed.load(Ordering::Relaxed)
        ),
        None => "offloadd is still starting; try again in a few seconds".into(),
    };
    Err(Reply::fail(1, err_line(why)))
}

async fn ask<T>(
    tx: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Option<T> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).await.ok()?;
    rx.await.ok()
}

/// A delete-through dropped because its caller hung up before it started.
fn not_carried_out(rel: &RelPath) -> Reply {
    tracing::info!(path = %rel, "delete-through of {rel} not carried out: its caller hung up before it started");
    Reply::fail(
        1,
        err_line(format!(
            "the delete-through of {rel} was not carried out since its caller hung up"
        )),
    )
}

fn stopping() -> Reply {
    Reply::fail(
        1,
        err_line("the daemon is stopping; try again after it restarts"),
    )
}

async fn answer(req: Request, h: &Handle, caller: &mut Caller) -> Reply {
    let cur = settings::current(&h.shared);
    match req {
        Request::Status { json } => {
            let r = status::live(&h.queue, &h.live, &cur);
            Reply::ok(if json {
                line(serde_json::to_string(&r).expect("report serializes"))
            } else {
                status::render(&r)
            })
        }
        Request::Locate { path } => commands::locate(&cur.config, &h.queue, &path),
        Request::Retry { path, all } => {
            let keys = match (&path, all) {
                (Some(p), _) => match RelPath::parse(p) {
                    Ok(r) => Some(vec![ItemKey::from_rel(&r)]),
                    Err(e) => return Reply::fail(2, err_line(e)),
                },
                (None, true) => None,
                (None, false) => return Reply::fail(2, err_line("name a path or pass --all")),
            };
            let tx = match scheduler(h) {
                Ok(tx) => tx,
                Err(refused) => return refused,
            };
            match ask(tx, |reply| Command::Retry { keys, reply }).await {
                Some(n) => match (n, &path) {
                    (0, Some(p)) => commands::not_failed(p),
                    _ => Reply::ok(line(format!("queued {n} failed item(s) again"))),
                },
                None => stopping(),
            }
        }
        Request::Enqueue { keys, dry_run } => {
            // Sent by our CLI from a walk of the root; anything else (`..`)
            // is refused whole, never parked or looked up.
            let keys = match keys.into_iter().map(ItemKey::from_request).collect() {
                Ok(keys) => keys,
                Err(e) => return Reply::fail(2, err_line(e)),
            };
            let tx = match scheduler(h) {
                Ok(tx) => tx,
                Err(refused) => return refused,
            };
            let mode = if dry_run {
                BackfillMode::Count
            } else {
                BackfillMode::Queue
            };
            match ask(tx, |reply| Command::Backfill { keys, mode, reply }).await {
                Some(n) => Reply::ok(line(n)),
                None => stopping(),
            }
        }
        Request::Delete { path } => {
            let rel = match RelPath::parse(&path) {
                Ok(r) => r,
                Err(e) => return Reply::fail(2, err_line(e)),
            };
            let tx = match scheduler(h) {
                Ok(tx) => tx,
                Err(refused) => return refused,
            };
            let key = ItemKey::from_rel(&rel);
            // A caller that hangs up before the delete starts (it gave up
            // waiting) must not have it carried out later: a hold it cannot
            // receive any more is undone by the scheduler, one already
            // granted is released here.
            let (reply, mut granted) = oneshot::channel();
            let hold = Command::Hold {
                key: key.clone(),
                reply,
            };
            if tx.send(hold).await.is_err() {
                return stopping();
            }
            let held = tokio::select! {
                held = &mut granted => held,
                () = caller.hung_up() => {
                    granted.close();
                    if let Ok(Ok(())) = granted.try_recv() {
                        let _ = ask(tx, |reply| Command::Release { key, reply }).await;
                    }
                    return not_carried_out(&rel);
                }
            };
            match held {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Reply::fail(1, err_line(e)),
                Err(_) => return stopping(),
            }
            // Once started, it runs to the end whatever the caller does.
            let reply = if caller.has_hung_up().await {
                not_carried_out(&rel)
            } else {
                commands::delete_through(&cur.config, &h.queue, &rel).await
            };
            let _ = ask(tx, |reply| Command::Release { key, reply }).await;
            reply
        }
        Request::TestConnection { provider } => {
            commands::test_connection(&cur.config, provider.as_deref()).await
        }
    }
}
