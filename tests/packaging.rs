//! Packaging checks on the host: the units' sandbox score and the .deb's
//! contents, conffiles and maintainer scripts.
//!
//! The .deb is built with `scripts/package.sh` (cargo-deb) unless
//! `OFFLOADD_DEB` points at one already built.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Exposure of a unit file as systemd-analyze prints it (0.0..10.0), and
/// whether `--threshold=12` (1.2) passed.
fn exposure(unit: &Path) -> Option<(f64, bool)> {
    if !common::require(
        have("systemd-analyze"),
        "systemd-analyze (apt-get install systemd)",
    ) {
        return None;
    }
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=12", "--no-pager"])
        .arg(unit)
        .output()
        .expect("run systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line in:\n{text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    Some((score, out.status.success()))
}

#[test]
fn service_exposure_at_most_1_2() {
    let Some((score, ok)) = exposure(&crate_dir().join("systemd/offloadd.service")) else {
        return;
    };
    println!("offloadd.service exposure {score}");
    assert!(
        ok && score <= 1.2,
        "offloadd.service exposure {score} > 1.2"
    );
}

#[test]
fn template_exposure_at_most_1_2() {
    // systemd-analyze needs a concrete instance name for a template.
    let dir = tempfile::tempdir().unwrap();
    let inst = dir.path().join("offloadd@test.service");
    std::fs::copy(crate_dir().join("systemd/offloadd@.service"), &inst).unwrap();
    let Some((score, ok)) = exposure(&inst) else {
        return;
    };
    println!("offloadd@.service exposure {score}");
    assert!(
        ok && score <= 1.2,
        "offloadd@.service exposure {score} > 1.2"
    );
}

#[test]
fn units_have_the_operations_settings() {
    for name in ["offloadd.service", "offloadd@.service"] {
        let unit = std::fs::read_to_string(crate_dir().join("systemd").join(name)).unwrap();
        for want in [
            "Type=notify",
            "NotifyAccess=main",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "RestartPreventExitStatus=78",
            // Exit 1 (a full disk, a listen address in use) is retried for
            // as long as it lasts: a start limit would give up after a few.
            "StartLimitIntervalSec=0",
            "TimeoutStopSec=45s",
            "WatchdogSec=",
            "StateDirectory=offloadd",
            "RuntimeDirectory=offloadd",
            "RequiresMountsFor=",
            "LogRateLimitIntervalSec=",
            "LogRateLimitBurst=",
            "User=offloadd",
            "Group=offloadd",
            "LoadCredentialEncrypted=",
            "ReadWritePaths=",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "IPAddressDeny=any",
            "IPAddressAllow=localhost",
        ] {
            assert!(unit.contains(want), "{name} lacks {want}");
        }
        assert!(
            !unit.contains("StartLimitBurst="),
            "{name} must not give up restarting"
        );
        // Every unicast address but link-local (instance metadata).
        let allowed: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("IPAddressAllow="))
            .flat_map(|l| l.split_whitespace())
            .collect();
        for net in [
            "0.0.0.0/1",
            "128.0.0.0/3",
            "192.0.0.0/3",
            "::/1",
            "fc00::/7",
        ] {
            assert!(allowed.contains(&net), "{name} must allow {net}");
        }
        assert!(
            !allowed
                .iter()
                .any(|n| n.starts_with("169.254.") || n.starts_with("fe80:")),
            "{name} must not allow link-local"
        );
    }
    let tpl = std::fs::read_to_string(crate_dir().join("systemd/offloadd@.service")).unwrap();
    assert!(tpl.contains("--config /etc/offloadd/%i.yaml run"));
    assert!(tpl.contains("StateDirectory=offloadd/%i"));
}

/// Builds the .deb once per test binary (or takes `OFFLOADD_DEB`).
pub fn deb_path() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        if let Ok(p) = std::env::var("OFFLOADD_DEB") {
            return PathBuf::from(p);
        }
        let out = Command::new(crate_dir().join("scripts/package.sh"))
            .env("CARGO_BUILD_JOBS", "1")
            .output()
            .expect("run scripts/package.sh");
        assert!(
            out.status.success(),
            "package.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = crate_dir().join("target/debian");
        let mut debs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("offloadd_") && n.ends_with(".deb"))
            })
            .collect();
        debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        debs.pop().expect("no .deb in target/debian")
    })
    .clone()
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .expect("dpkg-deb");
    assert!(out.status.success(), "dpkg-deb {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn deb_contents_and_conffiles() {
    if !have("dpkg-deb") {
        println!("SKIP: dpkg-deb not installed");
        return;
    }
    let deb = deb_path();
    let listing = dpkg_deb(&["-c"], &deb);
    let entry = |path: &str| -> &str {
        listing
            .lines()
            .find(|l| l.ends_with(path) || l.contains(&format!("{path} ->")))
            .unwrap_or_else(|| panic!("{path} missing from the .deb:\n{listing}"))
    };
    assert!(entry("./usr/bin/offloadd").starts_with("-rwxr-xr-x"));
    let conf = entry("./etc/offloadd/config.yaml");
    assert!(conf.starts_with("-rw-r-----"), "config mode: {conf}");
    entry("./usr/lib/systemd/system/offloadd.service");
    entry("./usr/lib/systemd/system/offloadd@.service");
    entry("./usr/lib/sysusers.d/offloadd.conf");
    assert!(
        listing.contains("./usr/share/man/man1/offloadd.1"),
        "man page missing:\n{listing}"
    );
    // The state directory belongs to systemd (StateDirectory=), never to dpkg:
    // a package that shipped it could remove it.
    assert!(!listing.contains("./var/lib/offloadd"), "{listing}");

    let info = dpkg_deb(&["-I"], &deb);
    for want in ["Package: offloadd", "Depends:", "systemd", "procps"] {
        assert!(info.contains(want), "control lacks {want}:\n{info}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let ctl = tmp.path().join("control");
    let out = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&ctl)
        .output()
        .unwrap();
    assert!(out.status.success());
    let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap();
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        vec!["/etc/offloadd/config.yaml"],
        "conffiles"
    );
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers"), "{postinst}");
    assert!(postinst.contains("chown root:offloadd /etc/offloadd/config.yaml"));
    assert!(postinst.contains("deb-systemd-helper"), "{postinst}");
    assert!(!postinst.contains("#DEBHELPER#"));
    // Not started on first install; only try-restart on upgrade.
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
    for script in ["postinst", "postrm", "prerm"] {
        if let Ok(s) = std::fs::read_to_string(ctl.join(script)) {
            assert!(
                !s.lines()
                    .any(|l| l.contains("rm ") && l.contains("/var/lib/offloadd")),
                "{script} must not touch the state:\n{s}"
            );
        }
    }
    // The packaged default config offloads nothing.
    let data = tmp.path().join("data");
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let cfg = std::fs::read_to_string(data.join("etc/offloadd/config.yaml")).unwrap();
    assert!(
        cfg.contains("\n  active: local\n"),
        "default config not local"
    );
}

/// The test build dies at a failpoint; the packaged binary, built without the
/// `failpoints` feature, ignores `OFFLOADD_FAILPOINTS` entirely.
#[test]
fn failpoints_exist_only_in_test_builds() {
    use common::*;
    let deb = deb_path();
    let unpacked = tempfile::tempdir().unwrap();
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(unpacked.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let packaged = unpacked.path().join("usr/bin/offloadd");
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let failpoint = [("OFFLOADD_FAILPOINTS", "after_upload_before_record")];

    let mut test_build = Daemon::start(&env, &failpoint);
    write_file(&env.path("first.png"), b"the test build dies here");
    let st = test_build
        .wait_exit(LONG)
        .expect("the test build reaches its failpoint");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
    drop(test_build);

    let mut shipped = Daemon::spawn_bin(&packaged, &env, &failpoint);
    shipped.wait_ready();
    write_and_wait(&env, &s3, "second.png", b"the package ignores it");
    wait_until(LONG, "first.png too", || s3.has("first.png"));
    assert!(shipped.alive(), "the packaged binary ignored the failpoint");
    shipped.stop();
}
