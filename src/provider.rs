//! STUB (replaced by helper)
use crate::keys::{KeyError, ObjectKey, PublicUrl, RelPath};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    S3,
    R2,
    Wasabi,
    Spaces,
    Gcs,
    Minio,
    Custom,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    VirtualHost,
    Path,
}
#[derive(Clone)]
pub struct Secret(String);
impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("********")
    }
}
#[derive(Debug, Clone)]
pub enum Sse {
    Aes256,
    AwsKms { key_id: Option<String> },
}
#[derive(Debug, Clone)]
pub struct Resolved {
    pub name: String,
    pub kind: Kind,
    pub bucket: String,
    pub endpoint: String,
    pub region: String,
    pub addressing: Addressing,
    pub access_key_id: String,
    pub secret: Secret,
    pub prefix: String,
    pub public_url_base: Option<String>,
    pub storage_class: Option<String>,
    pub server_side_encryption: Option<Sse>,
    pub cache_control: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub allow_insecure: bool,
    pub etag_is_md5: bool,
}
impl Resolved {
    pub fn object_key(&self, rel: &RelPath) -> Result<ObjectKey, KeyError> {
        ObjectKey::new(&self.prefix, rel)
    }
    pub fn public_url(&self, key: &ObjectKey) -> Option<PublicUrl> {
        self.public_url_base
            .as_deref()
            .map(|b| PublicUrl::new(b, key))
    }
}
