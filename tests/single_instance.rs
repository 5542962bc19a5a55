//! Proof: a second `run` on the same state_dir is refused with the pid of the
//! first; the first keeps running.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn second_run_is_refused_and_first_keeps_running() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let mut first = Daemon::start(&env, &[]);

    let mut second = Daemon::spawn(&env, &[]);
    let st = second
        .wait_exit(Duration::from_secs(60))
        .expect("the second instance must exit, not run alongside the first");
    let err = second.stderr() + &second.stdout();
    second.check_no_secret();
    assert!(
        !st.success(),
        "the second instance exits non-zero: {st:?}\n{err}"
    );
    assert!(
        err.contains(&format!("already running (pid {})", first.pid)),
        "the refusal names the first instance's pid {}:\n{err}",
        first.pid
    );

    assert!(
        first.alive(),
        "the first instance keeps running:\n{}",
        first.stderr()
    );
    write_and_wait(
        &env,
        &s3,
        "still-works.jpg",
        b"first instance still uploads",
    );
    first.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 1, "status: {st}");
}

/// Two instances, each with its own root and state_dir, given one
/// control_socket (as configs copied from the example are): the second
/// refuses to start, naming `control_socket`, and a command run with the
/// second's config while only the first runs is refused instead of acting on
/// the first's files. Before, the second ran without a socket, and
/// `delete same.png` with its config deleted the first instance's file.
#[test]
fn instances_sharing_a_control_socket_never_act_on_each_other() {
    let a = TestEnv::new();
    let s3 = S3Server::start_for(&a);
    a.write_config(&Cfg::new(&s3.endpoint()));
    let first = Daemon::start(&a, &[]);
    write_and_wait(&a, &s3, "same.png", b"the first instance's");

    let b = TestEnv::new();
    let own_socket = format!("control_socket: {}\n", b.socket.display());
    let yaml = b.config_yaml(&Cfg::new(&s3.endpoint()));
    assert!(yaml.contains(&own_socket));
    b.write_raw_config(&yaml.replace(
        &own_socket,
        &format!("control_socket: {}\n", a.socket.display()),
    ));
    write_file(&b.path("same.png"), b"the second instance's");

    let mut second = Daemon::spawn(&b, &[]);
    let st = second
        .wait_exit(Duration::from_secs(60))
        .expect("the second instance must not run without its socket");
    let err = second.stderr();
    assert_eq!(st.code(), Some(78), "{err}");
    assert!(
        err.contains("give each instance its own `control_socket`"),
        "{err}"
    );

    for args in [["delete", "same.png"], ["locate", "same.png"]] {
        let (code, out, err) = b.cli(&args);
        assert_eq!(code, 78, "{args:?}: {out}{err}");
        assert!(
            err.contains(&format!("runs with state_dir {}", a.state_dir.display())),
            "{err}"
        );
    }
    // A start that failed sets no managed-since mark, and without one
    // backfill has nothing to do; with one (an earlier good run) it asks the
    // socket.
    std::fs::write(b.state_dir.join("managed-since"), "1\n").unwrap();
    let (code, out, err) = b.cli(&["backfill"]);
    assert_eq!(code, 78, "backfill: {out}{err}");
    assert!(err.contains("two instances share"), "{err}");
    assert_eq!(
        std::fs::read(a.path("same.png")).unwrap(),
        b"the first instance's"
    );
    assert!(s3.has("same.png"));
    assert!(b.path("same.png").exists());
    first.stop();
}

/// A command that has the state of a stopped daemon open (a monitoring
/// `offloadd status` while systemd restarts offloadd) holds the lock for a
/// moment: the daemon starting meanwhile waits for it and starts. It used to
/// exit at once with "already running" and the command's pid, and a status
/// poll during restarts could use up systemd's start limit.
#[test]
fn a_daemon_starting_while_a_command_reads_the_state_waits_for_it() {
    use offloadd::statedir::{Holder, Lock};
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let command = Lock::acquire(&env.state_dir, Holder::Command).unwrap();
    let mut daemon = Daemon::spawn(&env, &[]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(daemon.alive(), "exited: {}", daemon.stderr());
    drop(command);
    daemon.wait_ready();
    write_and_wait(&env, &s3, "after.png", b"started once the command let go");
    let log = daemon.stop();
    assert!(!log.contains("already running"), "{log}");
}
