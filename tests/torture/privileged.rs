//! Trouble only root can stage: a full state_dir (a small tmpfs), a watch
//! root unmounted and mounted again (a bind mount; a file system of its own
//! remounted at once, a loop-mounted ext4; an XFS root whose device was
//! renumbered between runs), an inotify queue that
//! overflows (a tiny `fs.inotify.max_queued_events`), and an operator who is
//! in the service's group only as a supplementary group. Each test fails
//! under CI when it cannot run as root (`require`).

use crate::common::*;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image file of `size` in the env's folder holding a new file system of
/// type `fs`; `None` (a failure under CI) without root or `mkfs.{fs}`.
fn formatted_image(env: &TestEnv, fs: &str, size: &str) -> Option<std::path::PathBuf> {
    let mkfs = format!("mkfs.{fs}");
    let have_mkfs = Command::new(&mkfs).arg("-V").output().is_ok();
    if !require(
        is_root() && have_mkfs,
        &format!("root and {mkfs} (a loop-mounted {fs}; xfsprogs has mkfs.xfs)"),
    ) {
        return None;
    }
    let image = env.dir.path().join(format!("disk.{fs}"));
    sh(&format!(
        "truncate -s {size} {0} && {mkfs} -q {0}",
        image.display()
    ));
    Some(image)
}

/// Attaches `image` to the first free loop device and returns its path.
fn attach(image: &Path) -> String {
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Unmounts on drop, so a failed test leaves no mount behind.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Detaches a loop device on drop (after the [`Mount`] on it, declared later).
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with a file until it is full.
fn fill(dir: &Path) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    let small = vec![0u8; 512];
    while std::io::Write::write_all(&mut f, &small).is_ok() {}
    let _ = f.sync_all();
    filler
}

/// Defect 3: with state_dir full, no local file is deleted without a durable
/// record; status blames the disk, not the provider; offloadd recovers by
/// itself once space returns.
#[test]
fn a_full_state_dir_pauses_without_deleting_and_recovers() {
    if !require(is_root(), "root (mount a tmpfs)") {
        return;
    }
    let env = TestEnv::new();
    sh(&format!(
        "mount -t tmpfs -o size=8m tmpfs {}",
        env.state_dir.display()
    ));
    let _m = Mount(env.state_dir.clone());
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let watch = DeleteWatch::start(&env, &s3);
    write_and_wait(&env, &s3, "warm.png", b"before the disk filled");
    let filler = fill(&env.state_dir);

    let mut files: Expected = Vec::new();
    for i in 0..30 {
        let rel = format!("full/{i:02}.png");
        let bytes = file_content(&rel, 100, 20_000);
        write_file(&env.path(&rel), &bytes);
        watch.add(&rel, &bytes);
        files.push((rel, bytes));
    }
    wait_until(LONG, "status names the state_dir", || {
        let st = env.status();
        st["pipeline_paused"].as_str().is_some_and(|p| {
            p.contains("state_dir") && p.contains(&*env.state_dir.to_string_lossy())
        })
    });
    let st = env.status();
    assert!(
        json_array(&st, "paused").is_empty(),
        "the provider is not blamed: {st}"
    );
    sleep(Duration::from_secs(3));
    let kept = files.iter().filter(|(r, _)| env.path(r).exists()).count();
    watch.assert_clean();
    let log = daemon.stderr();
    assert!(!log.contains("provider local-s3 paused"), "{log}");

    fs::remove_file(&filler).unwrap();
    if !poll_until(LONG, || all_uploaded(&s3, &files)) {
        panic!(
            "not drained after space returned: {:?}\n{}",
            missing_objects(&s3, &files),
            daemon.stderr()
        );
    }
    wait_until(LONG, "deleted once records are durable", || {
        files.iter().all(|(r, _)| !env.path(r).exists())
    });
    assert!(watch.finish().is_empty());
    let st = env.status();
    assert!(
        st["pipeline_paused"].is_null(),
        "recovered without a restart: {st}"
    );
    crate::figures(
        "state_dir_full",
        &[
            ("files", files.len().to_string()),
            ("kept_while_full", kept.to_string()),
        ],
    );
    daemon.stop();
}

/// A state_dir already full at the first start (the lock's pid, the root's
/// identity cannot be written) exits 1, which systemd retries, and says to
/// free space; not 78, which would end the retries for good.
#[test]
fn a_state_dir_full_at_the_first_start_exits_1() {
    if !require(is_root(), "root (mount a tmpfs)") {
        return;
    }
    let env = TestEnv::new();
    sh(&format!(
        "mount -t tmpfs -o size=1m tmpfs {}",
        env.state_dir.display()
    ));
    let _m = Mount(env.state_dir.clone());
    fill(&env.state_dir);
    env.write_config(&Cfg::new("http://127.0.0.1:9"));
    let (code, _, err) = output_of(
        Command::new(bin_path())
            .arg("--config")
            .arg(&env.config_path)
            .arg("run"),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot write to state_dir {}",
            env.state_dir.display()
        )) && err.contains("free space there"),
        "{err}"
    );
}

/// Defect 5: the root unmounted and mounted again: queued work stays queued,
/// no record is marked "local deleted", the watches come back.
#[test]
fn an_unmounted_root_pauses_and_resumes_when_mounted_again() {
    if !require(is_root(), "root (bind mounts)") {
        return;
    }
    let env = TestEnv::new();
    let source = env.dir.path().join("disk");
    fs::create_dir_all(&source).unwrap();
    sh(&format!(
        "mount --bind {} {}",
        source.display(),
        env.root.display()
    ));
    let mut mount = Some(Mount(env.root.clone()));
    let s3 = S3Server::start_for(&env);
    let proxy = Proxy::start(s3.addr());
    let mut cfg = Cfg::new(&proxy.endpoint());
    cfg.delete_local = true;
    cfg.delete_after = Some("4s".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let watch = DeleteWatch::start(&env, &s3);
    // Uploaded, waiting for their delete.
    let mut uploaded: Expected = Vec::new();
    for i in 0..5 {
        let rel = format!("up/{i}.png");
        let bytes = file_content(&rel, 10, 2000);
        write_file(&env.path(&rel), &bytes);
        uploaded.push((rel, bytes));
    }
    wait_all_uploaded(&s3, &uploaded, LONG);
    // Queued: the bucket is unreachable.
    proxy.set_enabled(false);
    let mut queued: Expected = Vec::new();
    for i in 0..5 {
        let rel = format!("queued/{i}.png");
        let bytes = file_content(&rel, 10, 2000);
        write_file(&env.path(&rel), &bytes);
        queued.push((rel, bytes));
    }
    sleep(Duration::from_secs(2));
    let depth = json_u64(&env.status(), "queue_depth");
    assert!(depth >= 10, "uploads and deletes queued: {depth}");

    drop(mount.take());
    wait_until(LONG, "paused on the root", || {
        env.status()["pipeline_paused"]
            .as_str()
            .is_some_and(|p| p.contains("watch root"))
    });
    proxy.set_enabled(true);
    sleep(Duration::from_secs(6));
    let st = env.status();
    assert_eq!(
        json_u64(&st, "queue_depth"),
        depth,
        "nothing left the queue: {st}"
    );
    assert!(queued.iter().all(|(r, _)| !s3.has(r)));

    sh(&format!(
        "mount --bind {} {}",
        source.display(),
        env.root.display()
    ));
    let _mount = Mount(env.root.clone());
    wait_all_uploaded(&s3, &queued, LONG);
    wait_until(
        LONG,
        "every local copy deleted after the root returned",
        || {
            uploaded
                .iter()
                .chain(&queued)
                .all(|(r, _)| !env.path(r).exists())
        },
    );
    // Watches are back: a new file is seen at once (no periodic rescan).
    write_and_wait(&env, &s3, "after/new.png", b"after the remount");
    assert!(watch.finish().is_empty());
    daemon.stop();
}

/// A root that is a file system of its own, unmounted and mounted again at
/// once: the same device and inode, so the root guard may see no change,
/// but the kernel dropped every watch. They come back, with no periodic
/// rescan to help.
#[test]
fn a_root_remounted_at_once_is_watched_again() {
    let env = TestEnv::new();
    let Some(image) = formatted_image(&env, "ext4", "32M") else {
        return;
    };
    let device = attach(&image);
    let _loop = Loop(device.clone());
    let root = env.root.display();
    sh(&format!("mount {device} {root}"));
    let _mount = Mount(env.root.clone());
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "before/a.png", b"before the remount");
    let id = || {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&env.root).unwrap();
        (m.dev(), m.ino())
    };
    let before = id();
    sh(&format!("umount {root} && mount {device} {root}"));
    assert_eq!(id(), before, "the same file system again");
    write_and_wait(&env, &s3, "after/b.png", b"after the remount");
    write_and_wait(&env, &s3, "before/c.png", b"in an old folder");
    daemon.stop();
}

/// An XFS root whose device number changed between two runs, as a reboot
/// may do (LVM, NVMe ordering): XFS derives `f_fsid` from the device, so only
/// the filesystem's UUID says it is the same root. The second run uploads;
/// it does not pause as "replaced". Before that, a run on the same device
/// upgrades a `root-id` in the format written before the UUID was kept.
#[test]
fn an_xfs_root_on_a_renumbered_device_is_still_the_root() {
    let env = TestEnv::new();
    // 300 MB is the smallest XFS that mkfs.xfs makes; the file is sparse.
    let Some(image) = formatted_image(&env, "xfs", "320M") else {
        return;
    };
    let first = attach(&image);
    let first_loop = Loop(first.clone());
    let root = env.root.display();
    sh(&format!("mount {first} {root}"));
    let mut mount = Some(Mount(env.root.clone()));
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "first/a.png", b"first boot");
    daemon.stop();

    // root-id as the previous version wrote it ("{fsid} {ino}", no UUID):
    // a run on the same device upgrades it.
    let root_id = env.state_dir.join("root-id");
    let fields = || {
        let text = fs::read_to_string(&root_id).unwrap();
        let (head, path) = text.split_once('\n').unwrap();
        let fields: Vec<String> = head.split(' ').map(String::from).collect();
        (fields, path.to_string())
    };
    let (written, path) = fields();
    assert_eq!(written.len(), 3, "fsid, inode and UUID: {written:?}");
    fs::write(&root_id, format!("{} {}\n{path}", written[0], written[1])).unwrap();
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "upgraded/a.png", b"after the upgrade");
    daemon.stop();
    assert_eq!(fields().0, written, "root-id gained the UUID back");

    // "Reboot": the same image on another loop device.
    let dev = || {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&env.root).unwrap().dev()
    };
    let before = dev();
    drop(mount.take());
    let second = attach(&image);
    let _second_loop = Loop(second.clone());
    drop(first_loop);
    sh(&format!("mount {second} {root}"));
    let _mount = Mount(env.root.clone());
    assert_ne!(dev(), before, "{first} and then {second}");

    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "second/b.png", b"after the reboot");
    let (_, status, _) = env.cli(&["status"]);
    assert!(!status.contains("replaced"), "{status}");
    daemon.stop();
}

/// Defect 14: after an inotify overflow, files written at that moment are
/// still uploaded, with no periodic rescan to help.
#[test]
fn an_inotify_overflow_loses_nothing() {
    if !require(is_root(), "root (sysctl fs.inotify.max_queued_events)") {
        return;
    }
    let (n_files, n_dirs) = (crate::scale(2_000, 20_000), crate::scale(50, 200));
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.workers = 32;
    env.write_config(&cfg);
    let key = "/proc/sys/fs/inotify/max_queued_events";
    let old = fs::read_to_string(key).unwrap();
    fs::write(key, "64\n").unwrap();
    // Only inotify instances created meanwhile get the small queue.
    let daemon = Daemon::start(&env, &[]);
    fs::write(key, &old).unwrap();
    let t = Instant::now();
    let mut files: Expected = Vec::new();
    for d in 0..n_dirs {
        fs::create_dir_all(env.path(&format!("burst/{d:03}"))).unwrap();
    }
    sleep(Duration::from_millis(500));
    // The daemon is stopped while the burst is written, so the kernel's
    // queue of 64 events overflows whatever the machine's speed.
    daemon.signal(libc::SIGSTOP);
    for i in 0..n_files {
        let rel = format!("burst/{:03}/{i:05}.png", i % n_dirs);
        let bytes = format!("{rel}\n{}", random_hex(8)).into_bytes();
        write_file(&env.path(&rel), &bytes);
        files.push((rel, bytes));
    }
    daemon.signal(libc::SIGCONT);
    wait_all_uploaded(&s3, &files, Duration::from_secs(900));
    let log = daemon.stop();
    assert!(
        log.contains("overflowed") || log.contains("dropped"),
        "the overflow happened and was logged"
    );
    crate::figures(
        "inotify_overflow",
        &[
            ("files", n_files.to_string()),
            ("dirs", n_dirs.to_string()),
            ("seconds", t.elapsed().as_secs().to_string()),
        ],
    );
}

/// Defect 11: an operator in the service's group only as a supplementary
/// group (`usermod -aG offloadd alice`) is answered on the control socket;
/// one outside the group is refused by the socket's mode.
#[test]
fn a_supplementary_group_member_may_use_the_control_socket() {
    use std::os::unix::fs::PermissionsExt;
    if !require(is_root(), "root (run the CLI as another user)") {
        return;
    }
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    // The other user must reach the config and the socket.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&env.config_path, fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = Daemon::start(&env, &[]);
    // SAFETY: getegid has no preconditions.
    let service_gid = unsafe { libc::getegid() };
    let as_nobody = |groups: Vec<libc::gid_t>| {
        let mut cmd = Command::new(bin_path());
        cmd.arg("--config")
            .arg(&env.config_path)
            .args(["status", "--json"]);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.output().unwrap()
    };
    let member = as_nobody(vec![service_gid]);
    assert!(
        member.status.success(),
        "a supplementary member is answered: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    assert!(String::from_utf8_lossy(&member.stdout).contains("\"running\":true"));
    let outsider = as_nobody(vec![65534]);
    assert_eq!(outsider.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&outsider.stderr)
            .contains("permission denied on the control socket"),
        "{}",
        String::from_utf8_lossy(&outsider.stderr)
    );
    daemon.stop();
}
