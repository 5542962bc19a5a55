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
