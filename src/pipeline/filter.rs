//! Which paths under the watch root are eligible: `watch.include` and
//! `watch.exclude` globs, matched against the path relative to the root.
//! offloadd's own hidden working files never are.

use crate::pipeline::delete::is_set_aside;
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which paths under the root are eligible, by their path relative to the root.
#[derive(Clone)]
pub struct Rules {
    pub root: PathBuf,
    include: GlobSet,
    exclude: GlobSet,
    pub settle: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid glob `{glob}`: {message}; fix it in watch.include or watch.exclude")]
pub struct GlobError {
    glob: String,
    message: String,
}

fn globset(patterns: &[String]) -> Result<GlobSet, GlobError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob = globset::GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .or_else(|_| Glob::new(p))
            .map_err(|e| GlobError {
                glob: p.clone(),
                message: e.to_string(),
            })?;
        b.add(glob);
    }
    b.build().map_err(|e| GlobError {
        glob: patterns.join(", "),
        message: e.to_string(),
    })
}

impl Rules {
    pub fn new(
        root: &Path,
        include: &[String],
        exclude: &[String],
        settle: Duration,
    ) -> Result<Rules, GlobError> {
        Ok(Rules {
            root: root.to_path_buf(),
            include: globset(include)?,
            exclude: globset(exclude)?,
            settle,
        })
    }

    /// True if the file at `abs` (under the root) is included and neither it
    /// nor a folder it is in is excluded (as a walk skips such a folder, so
    /// does an event in it).
    pub fn matches(&self, abs: &Path) -> bool {
        let Ok(rel) = abs.strip_prefix(&self.root) else {
            return false;
        };
        if rel.as_os_str().is_empty() || is_set_aside(abs) {
            return false;
        }
        self.include.is_match(rel)
            && !self.exclude.is_match(rel)
            && rel
                .ancestors()
                .skip(1)
                .take_while(|a| !a.as_os_str().is_empty())
                .all(|a| !self.exclude.is_match(a))
    }

    /// True if a directory should be walked: excluded directories (e.g. `.cache`
    /// under `**/.*`) are skipped with everything in them.
    pub fn walks(&self, abs: &Path) -> bool {
        match abs.strip_prefix(&self.root) {
            Ok(rel) if rel.as_os_str().is_empty() => true,
            Ok(rel) => !self.exclude.is_match(rel),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::new(
            Path::new("/r"),
            &["**".into()],
            &[
                "**/.*".into(),
                "**/*.tmp".into(),
                "**/*.part".into(),
                "**/*~".into(),
            ],
            Duration::from_secs(2),
        )
        .unwrap()
    }

    #[test]
    fn default_excludes() {
        let r = rules();
        assert!(r.matches(Path::new("/r/a.png")));
        assert!(r.matches(Path::new("/r/x/y/z.mp4")));
        assert!(!r.matches(Path::new("/r/.hidden")));
        assert!(!r.matches(Path::new("/r/x/.hidden")));
        assert!(!r.matches(Path::new("/r/a.tmp")));
        assert!(!r.matches(Path::new("/r/x/b.part")));
        assert!(!r.matches(Path::new("/r/c~")));
        assert!(!r.matches(Path::new("/other/a.png")));
        // in an excluded folder, whatever its own name
        assert!(!r.matches(Path::new("/r/.staging/a.png")));
        assert!(!r.matches(Path::new("/r/x/.cache/y/z.png")));
        assert!(!r.walks(Path::new("/r/.cache")));
        assert!(r.walks(Path::new("/r/images")));
    }

    #[test]
    fn include_narrows() {
        let r = Rules::new(Path::new("/r"), &["images/**".into()], &[], Duration::ZERO).unwrap();
        assert!(r.matches(Path::new("/r/images/a/b.png")));
        assert!(!r.matches(Path::new("/r/videos/a.mp4")));
    }

    #[test]
    fn own_working_files_never_match() {
        let r = Rules::new(Path::new("/r"), &["**".into()], &[], Duration::ZERO).unwrap();
        assert!(!r.matches(Path::new("/r/x/.offloadd-del-12-3")));
        assert!(r.matches(Path::new("/r/x/.hidden")));
    }
}
