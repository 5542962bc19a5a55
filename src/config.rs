//! STUB (replaced by helper)
use crate::provider::{Addressing, Kind, Resolved, Secret};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
impl ConfigError {
    pub fn exit_code(&self) -> i32 {
        78
    }
}
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Incomplete(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Journald,
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub watch: Watch,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub storage: Storage,
    pub upload: Upload,
    pub http: Http,
    pub log: Log,
}
#[derive(Debug, Clone)]
pub struct Watch {
    pub root: PathBuf,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub settle: Duration,
    pub rescan_interval: Option<Duration>,
}
#[derive(Debug, Clone)]
pub struct Storage {
    pub active: String,
    pub delete_local: bool,
    pub delete_after: Duration,
    pub providers: BTreeMap<String, ProviderSection>,
}
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderSection {
    pub kind: Kind,
    pub bucket: Option<String>,
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
    pub public_url: Option<String>,
    pub prefix: Option<String>,
}
#[derive(Debug, Clone)]
pub struct Upload {
    pub workers: usize,
    pub multipart_threshold: u64,
    pub part_size: u64,
    pub part_concurrency: usize,
    pub memory_limit: u64,
    pub bandwidth_limit: u64,
    pub retry: Retry,
}
#[derive(Debug, Clone)]
pub struct Retry {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}
#[derive(Debug, Clone)]
pub struct Http {
    pub listen: Option<SocketAddr>,
    pub allow_remote: bool,
}
#[derive(Debug, Clone)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}
pub enum Active {
    Local { reason: String },
    Provider(Resolved),
}

#[derive(Deserialize)]
struct RawW {
    root: PathBuf,
    settle: Option<u64>,
    delete_local: Option<bool>,
    active: String,
    state_dir: PathBuf,
    providers: BTreeMap<String, ProviderSection>,
    multipart_threshold: Option<u64>,
    part_size: Option<u64>,
    memory_limit: Option<u64>,
}

pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError(e.to_string()))?;
    let r: RawW = serde_yaml::from_str(&text).map_err(|e| ConfigError(e.to_string()))?;
    let config = Config {
        source: path.into(),
        watch: Watch {
            root: r
                .root
                .canonicalize()
                .map_err(|e| ConfigError(e.to_string()))?,
            include: vec!["**".into()],
            exclude: vec![
                "**/.*".into(),
                "**/*.tmp".into(),
                "**/*.part".into(),
                "**/*~".into(),
            ],
            settle: Duration::from_millis(r.settle.unwrap_or(300)),
            rescan_interval: None,
        },
        state_dir: r.state_dir.clone(),
        control_socket: r.state_dir.join("control.sock"),
        storage: Storage {
            active: r.active,
            delete_local: r.delete_local.unwrap_or(false),
            delete_after: Duration::ZERO,
            providers: r.providers,
        },
        upload: Upload {
            workers: 4,
            multipart_threshold: r.multipart_threshold.unwrap_or(16 << 20),
            part_size: r.part_size.unwrap_or(8 << 20),
            part_concurrency: 4,
            memory_limit: r.memory_limit.unwrap_or(64 << 20),
            bandwidth_limit: 0,
            retry: Retry {
                initial_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(2),
            },
        },
        http: Http {
            listen: None,
            allow_remote: false,
        },
        log: Log {
            format: LogFormat::Text,
            level: "info".into(),
        },
    };
    Ok(Loaded {
        config,
        warnings: vec![],
    })
}

impl Config {
    pub fn resolve_provider(&self, name: &str) -> Result<Resolved, Incomplete> {
        let p = self
            .storage
            .providers
            .get(name)
            .ok_or_else(|| Incomplete(format!("no provider {name}")))?;
        let secret = std::fs::read_to_string(
            p.secret_access_key_file
                .as_ref()
                .ok_or_else(|| Incomplete("no secret".into()))?,
        )
        .map_err(|e| Incomplete(e.to_string()))?;
        Ok(Resolved {
            name: name.into(),
            kind: p.kind,
            bucket: p.bucket.clone().unwrap(),
            endpoint: p.endpoint.clone().unwrap(),
            region: "us-east-1".into(),
            addressing: Addressing::Path,
            access_key_id: p.access_key_id.clone().unwrap(),
            secret: Secret::new(secret.trim_end().to_string()),
            prefix: p.prefix.clone().unwrap_or_default(),
            public_url_base: p.public_url.clone(),
            storage_class: None,
            server_side_encryption: None,
            cache_control: None,
            ca_file: None,
            allow_insecure: true,
            etag_is_md5: true,
        })
    }
    pub fn active(&self) -> Active {
        if self.storage.active == "local" {
            return Active::Local {
                reason: "`storage.active` is `local`".into(),
            };
        }
        match self.resolve_provider(&self.storage.active) {
            Ok(r) => Active::Provider(r),
            Err(e) => Active::Local { reason: e.0 },
        }
    }
    pub fn report(&self) -> String {
        String::new()
    }
}
