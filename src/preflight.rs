//! The probes `check-config` runs beyond parsing: can this user create, read and
//! delete files in the watch root, and write in state_dir?

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

/// Runs every probe.
pub fn run(root: &Path, state_dir: &Path) -> Vec<Probe> {
    vec![
        probe_dir(
            root,
            "the watch root",
            "give the offloadd user read and write access to it (shared group with setgid directories, or default ACLs; see README)",
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
        let probes = run(dir.path(), &dir.path().join("state"));
        assert!(probes.iter().all(|p| p.ok));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
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
