//! The names a file has: its raw path relative to the watch root
//! ([`ItemKey`], the key of its queue item and record), the same path checked
//! for use as a name ([`RelPath`]), its object key in the bucket
//! ([`ObjectKey`]) and its public address ([`PublicUrl`]).
//!
//! Guarantees: a `RelPath` is non-empty, valid UTF-8, `/`-separated, with no
//! leading `/` and no empty, `.` or `..` component, so it never leaves the
//! root. An `ObjectKey` is `{prefix}/{rel}` (prefix trimmed of `/`), at most
//! 1,024 bytes, with names kept byte for byte (no Unicode normalisation). A
//! `PublicUrl` percent-encodes every key segment, keeping only RFC 3986
//! unreserved characters.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Longest object key S3 accepts, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Everything but RFC 3986 unreserved characters is encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the name `{lossy}` is not valid UTF-8 and cannot become an object key; rename the file"
    )]
    NotUtf8 { lossy: String },
    #[error("the object key would be {len} bytes, over the 1,024-byte limit of S3; shorten the path or the prefix")]
    TooLong { len: usize },
    #[error("the relative path is empty; give a file under the watch root, e.g. images/a.png")]
    Empty,
    #[error(
        "the path `{path}` starts with `/`; give it relative to the watch root, e.g. images/a.png"
    )]
    Absolute { path: String },
    #[error("the path `{path}` has an empty, `.` or `..` component; give a plain relative path, e.g. images/a.png")]
    BadComponent { path: String },
    #[error("the path `{path}` is not under the watch root `{root}`; give a file inside the root")]
    OutsideRoot { path: String, root: String },
}

/// A file's path relative to the watch root as raw bytes, exactly as the
/// filesystem spells it: the key of its queue item and location record. It may
/// hold names that are not UTF-8 (those are parked with a reason); it is never
/// empty and never starts with `/`. Clones share the bytes: the scheduler
/// indexes every queued item several ways.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemKey(std::sync::Arc<[u8]>);

impl ItemKey {
    /// Raw bytes as stored; `None` for an empty or absolute path.
    pub fn from_bytes(bytes: Vec<u8>) -> Option<ItemKey> {
        (!bytes.is_empty() && bytes[0] != b'/').then(|| ItemKey(bytes.into()))
    }

    /// The key of `abs`, which must lie under `root` (and not be the root).
    pub fn of(root: &Path, abs: &Path) -> Option<ItemKey> {
        use std::os::unix::ffi::OsStrExt;
        let rel = abs.strip_prefix(root).ok()?;
        ItemKey::from_bytes(rel.as_os_str().as_bytes().to_vec())
    }

    /// A path a client sent (backfill's walk of the root), held to
    /// [`RelPath`]'s rules but in raw bytes, since a name that is not UTF-8
    /// is queued all the same (and parked with its reason).
    pub fn from_request(bytes: Vec<u8>) -> Result<ItemKey, KeyError> {
        let lossy = || String::from_utf8_lossy(&bytes).into_owned();
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        if bytes[0] == b'/' {
            return Err(KeyError::Absolute { path: lossy() });
        }
        if !plain_components(&bytes) {
            return Err(KeyError::BadComponent { path: lossy() });
        }
        Ok(ItemKey(bytes.into()))
    }

    pub fn from_rel(rel: &RelPath) -> ItemKey {
        ItemKey(rel.0.as_bytes().into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The file's absolute path under `root`.
    pub fn to_local(&self, root: &Path) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        root.join(std::ffi::OsStr::from_bytes(&self.0))
    }

    /// The path checked for use as a name (UTF-8, plain components).
    pub fn rel(&self, root: &Path) -> Result<RelPath, KeyError> {
        RelPath::from_fs(root, &self.to_local(root))
    }
}

impl fmt::Display for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ItemKey({self})")
    }
}

/// The outermost folder between `root` and `abs` (a path under it) that is
/// a symlink: offloadd does not follow symlinks inside the root, and reading
/// or deleting through one would reach a file outside the tree it manages.
pub fn symlinked_folder(root: &Path, abs: &Path) -> Option<PathBuf> {
    abs.ancestors()
        .skip(1)
        .take_while(|p| *p != root && p.starts_with(root))
        .filter(|f| std::fs::symlink_metadata(f).is_ok_and(|m| m.file_type().is_symlink()))
        .last()
        .map(Path::to_path_buf)
}

/// Whether no `/`-separated component is empty, `.` or `..`, or holds a NUL.
fn plain_components(path: &[u8]) -> bool {
    !path
        .split(|b| *b == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b".." || c.contains(&0))
}

/// A file's path relative to the watch root, `/`-separated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    /// Parses user input such as `images/a.png` or `./images/a.png`.
    pub fn parse(s: &str) -> Result<RelPath, KeyError> {
        let mut rest = s;
        while let Some(stripped) = rest.strip_prefix("./") {
            rest = stripped;
        }
        if rest.is_empty() {
            return Err(KeyError::Empty);
        }
        if rest.starts_with('/') {
            return Err(KeyError::Absolute { path: s.into() });
        }
        if !plain_components(rest.as_bytes()) {
            return Err(KeyError::BadComponent { path: s.into() });
        }
        Ok(RelPath(rest.into()))
    }

    /// The outermost folder between `root` and this path that is a symlink
    /// ([`symlinked_folder`]).
    pub fn symlinked_folder(&self, root: &Path) -> Option<PathBuf> {
        symlinked_folder(root, &self.to_local(root))
    }

    /// The path of `abs` relative to `root`; `abs` must lie under `root`.
    pub fn from_fs(root: &Path, abs: &Path) -> Result<RelPath, KeyError> {
        let outside = || KeyError::OutsideRoot {
            path: abs.to_string_lossy().into_owned(),
            root: root.to_string_lossy().into_owned(),
        };
        let rel = abs.strip_prefix(root).map_err(|_| outside())?;
        let mut parts = Vec::new();
        for component in rel.components() {
            let Component::Normal(name) = component else {
                return Err(outside());
            };
            let name = name.to_str().ok_or_else(|| KeyError::NotUtf8 {
                lossy: rel.to_string_lossy().into_owned(),
            })?;
            if name.contains('\0') {
                return Err(KeyError::BadComponent {
                    path: rel.to_string_lossy().into_owned(),
                });
            }
            parts.push(name);
        }
        if parts.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(RelPath(parts.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file's absolute path under `root`.
    pub fn to_local(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for RelPath {
    type Error = KeyError;

    fn try_from(s: String) -> Result<Self, KeyError> {
        RelPath::parse(&s)
    }
}

impl From<RelPath> for String {
    fn from(r: RelPath) -> String {
        r.0
    }
}

/// An object key in a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// `{prefix}/{rel}`, or `rel` alone when the prefix is empty.
    pub fn new(prefix: &str, rel: &RelPath) -> Result<ObjectKey, KeyError> {
        let prefix = prefix.trim_matches('/');
        let key = if prefix.is_empty() {
            rel.0.clone()
        } else {
            format!("{prefix}/{rel}")
        };
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: key.len() });
        }
        Ok(ObjectKey(key))
    }

    /// A key read back from the state database, trusted as stored.
    pub fn from_raw(key: String) -> ObjectKey {
        ObjectKey(key)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The public address of an object: `{base}/{encoded key}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicUrl(String);

impl PublicUrl {
    pub fn new(base: &str, key: &ObjectKey) -> PublicUrl {
        let mut url = base.trim_end_matches('/').to_owned();
        for segment in key.0.split('/') {
            url.push('/');
            url.extend(utf8_percent_encode(segment, SEGMENT));
        }
        PublicUrl(url)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn relpath_parse() {
        assert_eq!(rel("images/a.png").as_str(), "images/a.png");
        assert_eq!(rel("./images/a.png").as_str(), "images/a.png");
        assert_eq!(RelPath::parse(""), Err(KeyError::Empty));
        assert_eq!(RelPath::parse("./"), Err(KeyError::Empty));
        assert!(matches!(
            RelPath::parse("/a"),
            Err(KeyError::Absolute { .. })
        ));
        for bad in ["a//b", "a/./b", "../a", "a/..", "a/", "a\0b"] {
            assert!(
                matches!(RelPath::parse(bad), Err(KeyError::BadComponent { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn item_key_from_request_keeps_to_relpath_rules_in_bytes() {
        let key = |b: &[u8]| ItemKey::from_request(b.to_vec());
        assert_eq!(key(b"a/b\xffc.png").unwrap().as_bytes(), b"a/b\xffc.png");
        assert_eq!(key(b""), Err(KeyError::Empty));
        assert!(matches!(key(b"/etc/x"), Err(KeyError::Absolute { .. })));
        for bad in [&b"../x"[..], b"a/../../x", b"a//b", b"./a", b"a/", b"a\0b"] {
            assert!(
                matches!(key(bad), Err(KeyError::BadComponent { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn relpath_from_fs() {
        let root = Path::new("/srv/results");
        let r = RelPath::from_fs(root, Path::new("/srv/results/img/a b.png")).unwrap();
        assert_eq!(r.as_str(), "img/a b.png");
        assert_eq!(r.to_local(root), Path::new("/srv/results/img/a b.png"));
        assert!(matches!(
            RelPath::from_fs(root, Path::new("/srv/other/a")),
            Err(KeyError::OutsideRoot { .. })
        ));
        assert_eq!(RelPath::from_fs(root, root), Err(KeyError::Empty));
    }

    #[test]
    fn relpath_from_fs_not_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let abs = Path::new("/r").join(std::ffi::OsStr::from_bytes(b"a\xffb.png"));
        let err = RelPath::from_fs(Path::new("/r"), &abs).unwrap_err();
        assert_eq!(
            err,
            KeyError::NotUtf8 {
                lossy: "a\u{fffd}b.png".into()
            }
        );
        assert!(err.to_string().contains("rename the file"));
    }

    #[test]
    fn relpath_serde_is_a_validated_string() {
        let r: RelPath = serde_json::from_str("\"a/b.png\"").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"a/b.png\"");
        assert!(serde_json::from_str::<RelPath>("\"../x\"").is_err());
    }

    #[test]
    fn key_prefix_trimming() {
        let r = rel("x");
        assert_eq!(
            ObjectKey::new("/magicads/", &r).unwrap().as_str(),
            "magicads/x"
        );
        assert_eq!(ObjectKey::new("a/b", &r).unwrap().as_str(), "a/b/x");
        assert_eq!(ObjectKey::new("", &r).unwrap().as_str(), "x");
        assert_eq!(ObjectKey::new("/", &r).unwrap().as_str(), "x");
    }

    #[test]
    fn key_length_limit() {
        let r = rel(&"a".repeat(1020));
        assert_eq!(ObjectKey::new("abc", &r).unwrap().as_str().len(), 1024);
        let err = ObjectKey::new("abcd", &r).unwrap_err();
        assert_eq!(err, KeyError::TooLong { len: 1025 });
        assert!(err.to_string().contains("1025 bytes"));
    }

    #[test]
    fn key_keeps_nfc_and_nfd_distinct() {
        let nfc = ObjectKey::new("", &rel("caf\u{e9}.png")).unwrap();
        let nfd = ObjectKey::new("", &rel("cafe\u{301}.png")).unwrap();
        assert_ne!(nfc, nfd);
        assert_eq!(nfd.as_str().as_bytes(), "cafe\u{301}.png".as_bytes());
    }

    #[test]
    fn public_url_encoding() {
        let key = ObjectKey::new("p", &rel("dir a/x+y%z#1?q=é~-_.png")).unwrap();
        assert_eq!(
            PublicUrl::new("https://cdn.example/", &key).as_str(),
            "https://cdn.example/p/dir%20a/x%2By%25z%231%3Fq%3D%C3%A9~-_.png"
        );
        let nfd = ObjectKey::new("", &rel("cafe\u{301}")).unwrap();
        assert_eq!(
            PublicUrl::new("https://h", &nfd).to_string(),
            "https://h/cafe%CC%81"
        );
    }
}
