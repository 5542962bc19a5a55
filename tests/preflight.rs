//! Proof: `check-config` probes that the service can read (and, with
//! `delete_local`, delete) the files the application wrote in the root, and
//! says what to fix when it cannot.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

fn check_config_as_nobody(env: &TestEnv) -> (Option<i32>, String, String) {
    let out = offloadd_as_nobody(env)
        .arg("check-config")
        .env_remove("OFFLOADD_CONFIG")
        .output()
        .expect("run setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    env.assert_no_secret("check-config stdout", &stdout);
    env.assert_no_secret("check-config stderr", &stderr);
    (out.status.code(), stdout, stderr)
}

#[test]
fn check_config_finds_unreadable_and_undeletable_application_files() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    // `nobody` may read the config and reach the root; the secret file stays
    // 0600, so the provider counts as incomplete for `nobody`: that is not
    // what this test is about, so only the probe lines are asserted.
    env.write_config(&cfg);
    for (p, mode) in [
        (env.dir.path().to_path_buf(), 0o755),
        (env.config_path.clone(), 0o644),
        (env.root.clone(), 0o755),
        (env.state_dir.clone(), 0o777),
    ] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    let app_dir = env.root.join("app");
    fs::create_dir_all(&app_dir).unwrap();
    fs::set_permissions(&app_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let secret_file = app_dir.join("private.png");
    fs::write(&secret_file, b"only the app may read this").unwrap();
    fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o600)).unwrap();

    let (code, _out, err) = check_config_as_nobody(&env);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains(&format!("cannot read {}", secret_file.display())),
        "{err}"
    );
    assert!(err.contains("shared group"), "names the fix: {err}");

    // Readable but in a directory nobody may write: delete_local would fail.
    fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _out, err) = check_config_as_nobody(&env);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains(&format!("cannot delete files in {}", app_dir.display())),
        "{err}"
    );
}
