//! STUB (replaced by helper)
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the name `{lossy}` is not valid UTF-8 and cannot become an object key; rename the file"
    )]
    NotUtf8 { lossy: String },
    #[error("the object key would be {len} bytes, over the 1,024-byte limit of S3; shorten the path or the prefix")]
    TooLong { len: usize },
    #[error("bad path")]
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RelPath(String);
impl RelPath {
    pub fn parse(s: &str) -> Result<RelPath, KeyError> {
        Ok(RelPath(s.trim_start_matches("./").to_string()))
    }
    pub fn from_fs(root: &Path, abs: &Path) -> Result<RelPath, KeyError> {
        let rel = abs.strip_prefix(root).map_err(|_| KeyError::Invalid)?;
        let s = rel.to_str().ok_or_else(|| KeyError::NotUtf8 {
            lossy: rel.to_string_lossy().into(),
        })?;
        Ok(RelPath(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn to_local(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }
}
impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectKey(String);
impl ObjectKey {
    pub fn new(prefix: &str, rel: &RelPath) -> Result<ObjectKey, KeyError> {
        let p = prefix.trim_matches('/');
        let k = if p.is_empty() {
            rel.0.clone()
        } else {
            format!("{p}/{}", rel.0)
        };
        if k.len() > 1024 {
            return Err(KeyError::TooLong { len: k.len() });
        }
        Ok(ObjectKey(k))
    }
    pub fn from_raw(s: String) -> ObjectKey {
        ObjectKey(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl(String);
impl PublicUrl {
    pub fn new(base: &str, key: &ObjectKey) -> PublicUrl {
        PublicUrl(format!("{}/{}", base.trim_end_matches('/'), key.0))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl std::fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
