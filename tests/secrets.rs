//! Proof that all four secret sources of DESIGN.md work end to end, through
//! `test-connection` against s3s-fs (which checks signatures: a wrong secret
//! fails, so passing proves the source was used): `secret_access_key_file`,
//! `$CREDENTIALS_DIRECTORY/<provider>.secret_access_key`,
//! `OFFLOADD_<PROVIDER>_SECRET_ACCESS_KEY`, inline `secret_access_key`. An
//! inline secret in a group/world-readable config warns. The harness checks
//! that no secret (right or wrong) appears in any output.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

const ENV_VAR: &str = "OFFLOADD_LOCAL_S3_SECRET_ACCESS_KEY";

fn wrong_secret_message() -> String {
    format!("offloadd: provider `{PROVIDER}` rejected the signature (SignatureDoesNotMatch): the secret access key is wrong; fix the secret of provider `{PROVIDER}`")
}

fn assert_passes(got: (i32, String, String)) {
    let (code, out, err) = got;
    assert_eq!(code, 0, "stdout={out} stderr={err}");
    assert!(out.contains("delete … ok"), "{out}");
}

fn assert_wrong_secret(got: (i32, String, String)) {
    let (code, out, err) = got;
    assert_eq!(code, 1, "stdout={out} stderr={err}");
    assert_eq!(err.trim(), wrong_secret_message());
}

fn no_file_config(env: &TestEnv, s3: &S3Server) {
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.with_secret_file = false;
    env.write_config(&cfg);
}

#[test]
fn secret_from_file() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let wrong = env.new_secret();
    env.set_secret_file(&wrong);
    assert_wrong_secret(env.cli(&["test-connection"]));
    env.set_secret_file(&env.secret);
    assert_passes(env.cli(&["test-connection"]));
}

#[test]
fn secret_from_systemd_credentials_directory() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    no_file_config(&env, &s3);
    let creds = env.dir.path().join("credentials");
    fs::create_dir_all(&creds).unwrap();
    let file = creds.join(format!("{PROVIDER}.secret_access_key"));
    let dir = creds.to_str().unwrap();
    let wrong = env.new_secret();
    fs::write(&file, &wrong).unwrap();
    assert_wrong_secret(env.cli_env(&["test-connection"], &[("CREDENTIALS_DIRECTORY", dir)]));
    // systemd credentials often end with a newline.
    fs::write(&file, format!("{}\n", env.secret)).unwrap();
    assert_passes(env.cli_env(&["test-connection"], &[("CREDENTIALS_DIRECTORY", dir)]));
}

#[test]
fn secret_from_environment_variable() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    no_file_config(&env, &s3);
    let wrong = env.new_secret();
    assert_wrong_secret(env.cli_env(&["test-connection"], &[(ENV_VAR, &wrong)]));
    assert_passes(env.cli_env(&["test-connection"], &[(ENV_VAR, &env.secret)]));
}

#[test]
fn secret_inline_in_the_config() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.with_secret_file = false;
    let wrong = env.new_secret();
    let inline = |s: &str| {
        with_provider_lines(
            &env.config_yaml(&cfg),
            &format!("      secret_access_key: \"{s}\"\n"),
        )
    };
    env.write_raw_config(&inline(&wrong));
    assert_wrong_secret(env.cli(&["test-connection"]));
    env.write_raw_config(&inline(&env.secret));
    assert_passes(env.cli(&["test-connection"]));
    // check-config masks it too (cli() asserts it is absent).
    let (_, out, _) = env.cli(&["check-config"]);
    assert!(out.contains(PROVIDER), "{out}");
}

#[test]
fn inline_secret_warns_only_when_the_config_is_readable_by_others() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.with_secret_file = false;
    env.write_raw_config(&with_provider_lines(
        &env.config_yaml(&cfg),
        &format!("      secret_access_key: \"{}\"\n", env.secret),
    ));
    let warning = format!(
        "offloadd: warning: {} contains an inline secret and is readable by group or others; move the secret to secret_access_key_file or a systemd credential, or let only the service's user read the file (chown it to that user, then chmod 600)",
        env.config_path.display()
    );
    let (code, out, err) = env.cli(&["check-config"]);
    assert_eq!(code, 0, "stdout={out} stderr={err}");
    assert!(
        !err.contains("inline secret"),
        "0600 config: no warning: {err}"
    );

    fs::set_permissions(&env.config_path, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = env.cli(&["check-config"]);
    assert_eq!(
        code, 0,
        "a warning is not an error: stdout={out} stderr={err}"
    );
    assert!(err.lines().any(|l| l == warning), "warning expected: {err}");

    fs::set_permissions(&env.config_path, fs::Permissions::from_mode(0o640)).unwrap();
    let (_, _, err) = env.cli(&["check-config"]);
    assert!(
        err.lines().any(|l| l == warning),
        "group-readable warns too: {err}"
    );
}

#[test]
fn a_secret_file_readable_by_others_warns_in_check_config_and_run() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let warning = format!(
        "offloadd: warning: the secret file {} of provider `{PROVIDER}` is readable by others (mode 0644); chmod 600 it (or 640 with group offloadd)",
        env.secret_file.display()
    );
    let (code, _, err) = env.cli(&["check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("readable by others"),
        "0600: no warning: {err}"
    );
    fs::set_permissions(&env.secret_file, fs::Permissions::from_mode(0o640)).unwrap();
    let (_, _, err) = env.cli(&["check-config"]);
    assert!(
        !err.contains("readable by others"),
        "0640 is the group recipe: {err}"
    );

    fs::set_permissions(&env.secret_file, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = env.cli(&["check-config"]);
    assert_eq!(code, 0, "a warning is not an error: {out} {err}");
    assert!(err.lines().any(|l| l == warning), "warning expected: {err}");
    let daemon = Daemon::start(&env, &[]);
    let log = daemon.stop();
    assert!(
        log.contains("is readable by others (mode 0644)"),
        "run logs it too: {log}"
    );
}

#[test]
fn secret_file_wins_over_the_other_sources() {
    // Precedence: file, credential, environment, inline.
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let wrong = env.new_secret();
    assert_passes(env.cli_env(&["test-connection"], &[(ENV_VAR, &wrong)]));
}
