//! The probes `check-config` runs beyond parsing: can this user create, read and
//! delete files in the watch root, read (and, with `delete_local`, delete) the
//! files the application already wrote there, and write in state_dir?

use std::io::{Read, Write};
use std::path::Path;

/// One probe's outcome, as a line for the operator.
pub struct Probe {
    pub ok: bool,
    pub line: String,
}

/// Writes, reads back and deletes a hidden probe file in `dir` (hidden names are
/// excluded by default, so the running daemon ignores it).
fn probe_dir(dir: &Path, what: &str, fix: &str) -> Probe {
    let path = dir.join(format!(".offloadd-probe-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        std::fs::File::create(&path)?.write_all(b"offloadd probe")?;
        let mut back = String::new();
        std::fs::File::open(&path)?.read_to_string(&mut back)?;
        std::fs::remove_file(&path)?;
        Ok(())
    })();
    match result {
        Ok(()) => Probe {
            ok: true,
            line: format!(
                "ok: can create, read and delete files in {what} {}",
                dir.display()
            ),
        },
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Probe {
                ok: false,
                line: format!(
                    "cannot create, read and delete files in {what} {}: {e}; {fix}",
                    dir.display()
                ),
            }
        }
    }
}

/// How many existing files the probe samples.
const SAMPLE: usize = 50;

/// Up to `n` files under `root`, as paths relative to it (a sample for
/// check-config).
pub fn sample_files(root: &Path, n: usize) -> Vec<crate::keys::RelPath> {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| crate::keys::RelPath::from_fs(root, e.path()).ok())
        .take(n)
        .collect()
}

/// What the object rules give each sample path, one line each.
pub fn rule_lines(config: &crate::config::Config, samples: &[crate::keys::RelPath]) -> Vec<String> {
    let Ok(rules) = crate::remote::object_options::Rules::new(&config.rules) else {
        return Vec::new();
    };
    let provider = config.storage.providers.get(&config.storage.active);
    let cache = provider.and_then(|p| p.cache_control.as_deref());
    let class = provider.and_then(|p| p.storage_class.as_deref());
    samples
        .iter()
        .map(|rel| {
            let o = rules.options_for(rel, cache, class);
            let which = match o.rule {
                Some(i) => format!("rules[{i}] (`{}`)", config.rules[i].pattern),
                None => "no rule (provider defaults)".to_string(),
            };
            let mut line = format!("rule: {rel} -> {which}: content_type={}", o.content_type);
            for (name, v) in [
                ("cache_control", &o.cache_control),
                ("storage_class", &o.storage_class),
                ("content_disposition", &o.content_disposition),
            ] {
                if let Some(v) = v {
                    line.push_str(&format!(", {name}={v}"));
                }
            }
            line
        })
        .collect()
}

/// Opens up to [`SAMPLE`] files the application wrote, and checks their
/// directories are writable (deleting a file needs that) when `delete_local`.
fn probe_existing(root: &Path, delete_local: bool) -> Probe {
    let fix = "give the offloadd user access through a shared group with setgid directories or default ACLs (see /usr/share/doc/offloadd/README.md, packaging/README.md in the source)";
    let mut checked = 0;
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .take(SAMPLE)
    {
        checked += 1;
        if let Err(e) = std::fs::File::open(entry.path()) {
            return Probe {
                ok: false,
                line: format!("cannot read {}: {e}; {fix}", entry.path().display()),
            };
        }
        let dir = entry.path().parent().unwrap_or(root);
        let writable = crate::pipeline::localfs::may_write_in(dir).is_ok();
        if delete_local && !writable {
            return Probe {
                ok: false,
                line: format!(
                    "cannot delete files in {} (delete_local needs write access to the directory); {fix}",
                    dir.display()
                ),
            };
        }
    }
    Probe {
        ok: true,
        line: format!(
            "ok: can read{} the {checked} existing file(s) sampled in the watch root",
            if delete_local { " and delete" } else { "" }
        ),
    }
}

/// Runs every probe.
pub fn run(root: &Path, state_dir: &Path, delete_local: bool) -> Vec<Probe> {
    vec![
        probe_existing(root, delete_local),
        probe_dir(
            root,
            "the watch root",
            "give the offloadd user read and write access to it (shared group with setgid directories, or default ACLs; see /usr/share/doc/offloadd/README.md, packaging/README.md in the source)",
        ),
        if state_dir.is_dir() {
            probe_dir(state_dir, "state_dir", "make it writable by the offloadd user")
        } else {
            Probe {
                ok: true,
                line: format!("ok: state_dir {} will be created at the first start", state_dir.display()),
            }
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_dir_passes_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.png"), b"x").unwrap();
        let probes = run(dir.path(), &dir.path().join("state"), true);
        assert!(probes.iter().all(|p| p.ok));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(
            probes[0].line.contains("1 existing file"),
            "{}",
            probes[0].line
        );
    }

    #[test]
    fn missing_dir_fails_with_a_fix() {
        let p = probe_dir(
            Path::new("/nonexistent/offloadd"),
            "the watch root",
            "fix it",
        );
        assert!(!p.ok);
        assert!(p.line.contains("fix it"), "{}", p.line);
    }
}
