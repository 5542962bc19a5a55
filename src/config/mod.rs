//! The YAML configuration file: its schema with every default ([`Config`]),
//! loading and validation ([`load`]), secret lookup and provider resolution
//! ([`Config::resolve_provider`], [`Config::active`]), and the `check-config`
//! text ([`Config::report`]).
//!
//! Guarantees: [`load`] either returns a config the daemon can run with or a
//! [`ConfigError`] (exit 78) naming file, line, column and key in one
//! sentence that says what to do. A provider that is merely incomplete is
//! not an error: [`Config::active`] falls back to local mode with a reason.
//! Secret values never appear in any error, warning or report.

use crate::pipeline::root;
use crate::remote::provider::{self, Resolved, Secret};

pub mod preflight;
pub mod units;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::remote::object_options::RuleSection;
pub use crate::remote::provider::{Incomplete, ProviderSection};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file this config was read from.
    #[serde(skip)]
    pub source: PathBuf,
    pub watch: Watch,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub upload: Upload,
    #[serde(default)]
    pub http: Http,
    #[serde(default)]
    pub log: Log,
    /// Per-pattern object options, first match wins.
    #[serde(default)]
    pub rules: Vec<RuleSection>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// Absolute and canonical once loaded (as written while it is away, see
    /// [`RootCheck::MayBeAway`]).
    pub root: PathBuf,
    /// The root as the file gives it, before symbolic links are resolved.
    #[serde(skip)]
    pub root_as_written: PathBuf,
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    #[serde(default = "default_exclude")]
    pub exclude: Vec<String>,
    #[serde(
        default = "default_settle",
        with = "crate::config::units::serde_duration"
    )]
    pub settle: Duration,
    /// `None` when written as 0 (no periodic rescan).
    #[serde(default = "default_rescan", deserialize_with = "rescan_interval")]
    pub rescan_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    pub active: String,
    pub delete_local: bool,
    #[serde(with = "crate::config::units::serde_duration")]
    pub delete_after: Duration,
    #[serde(deserialize_with = "providers")]
    pub providers: BTreeMap<String, ProviderSection>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upload {
    pub workers: usize,
    #[serde(with = "crate::config::units::serde_size")]
    pub multipart_threshold: u64,
    #[serde(with = "crate::config::units::serde_size")]
    pub part_size: u64,
    pub part_concurrency: usize,
    #[serde(with = "crate::config::units::serde_size")]
    pub memory_limit: u64,
    /// Bytes per second; 0 is unlimited.
    #[serde(with = "crate::config::units::serde_size")]
    pub bandwidth_limit: u64,
    /// A weekly timetable of limits (`"Mon-Fri 08:00 10MiB"`, `"19:00 off"`);
    /// when set, it replaces `bandwidth_limit`.
    pub bandwidth_schedule: Vec<String>,
    pub retry: Retry,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    #[serde(with = "crate::config::units::serde_duration")]
    pub initial_backoff: Duration,
    #[serde(with = "crate::config::units::serde_duration")]
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// `None` when written as `""` (no listener).
    #[serde(deserialize_with = "listen")]
    pub listen: Option<SocketAddr>,
    pub allow_remote: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald under systemd, else text.
    Auto,
    Journald,
    Text,
    Json,
}

fn default_state_dir() -> PathBuf {
    "/var/lib/offloadd".into()
}

fn default_control_socket() -> PathBuf {
    "/run/offloadd/control.sock".into()
}

fn default_include() -> Vec<String> {
    vec!["**".into()]
}

fn default_exclude() -> Vec<String> {
    ["**/.*", "**/*.tmp", "**/*.part", "**/*~"]
        .map(String::from)
        .to_vec()
}

fn default_settle() -> Duration {
    Duration::from_secs(2)
}

fn default_rescan() -> Option<Duration> {
    Some(Duration::from_secs(3600))
}

fn rescan_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    crate::config::units::serde_duration::deserialize(d).map(|v| Some(v).filter(|v| !v.is_zero()))
}

fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    struct Listen;
    impl serde::de::Visitor<'_> for Listen {
        type Value = Option<SocketAddr>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an IP address and port such as 127.0.0.1:9187, or \"\"")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            if text.trim().is_empty() {
                return Ok(None);
            }
            text.trim().parse().map(Some).map_err(|_| {
                E::custom(format!(
                    "`{text}` is not an IP address and port; write one such as 127.0.0.1:9187, or \"\" to disable"
                ))
            })
        }
    }
    d.deserialize_any(Listen)
}

/// `storage.providers`, refusing a name written twice, which a map would
/// take silently with the last section winning.
fn providers<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, ProviderSection>, D::Error> {
    struct Providers;
    impl<'de> serde::de::Visitor<'de> for Providers {
        type Value = BTreeMap<String, ProviderSection>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut providers = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                if providers.contains_key(&name) {
                    // Worded as serde words a key written twice in a section.
                    return Err(serde::de::Error::custom(format_args!(
                        "duplicate field `{name}`"
                    )));
                }
                let section = map.next_value()?;
                providers.insert(name, section);
            }
            Ok(providers)
        }
    }
    d.deserialize_map(Providers)
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            active: "local".into(),
            delete_local: false,
            delete_after: Duration::ZERO,
            providers: BTreeMap::new(),
        }
    }
}

impl Default for Upload {
    fn default() -> Self {
        Upload {
            // Small files are latency-bound (a PUT, and a HEAD before a
            // delete, each 20-100 ms away): 128 in flight keep up with
            // s5cmd at 80 ms (bench/RESULTS.md). A file in flight costs
            // little beyond its buffer, which memory_limit bounds.
            workers: 128,
            multipart_threshold: 16 * MIB,
            part_size: 8 * MIB,
            part_concurrency: 4,
            // Keeps the whole process within 64 MiB RSS.
            memory_limit: 32 * MIB,
            bandwidth_limit: 0,
            bandwidth_schedule: Vec::new(),
            retry: Retry::default(),
        }
    }
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9187))),
            allow_remote: false,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

/// A configuration the daemon cannot run with: exit code 78, but for a root
/// that does not answer (1, which systemd retries).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `watch.root` did not answer within [`root::ANSWER_WITHIN`] (a hung
    /// network mount): not the configuration's fault, and it may clear.
    #[error("{}: `watch.root` {} does not answer within {} s (a hung network mount?); offloadd cannot start until it does", .file.display(), .root.display(), root::ANSWER_WITHIN.as_secs())]
    RootHung { file: PathBuf, root: PathBuf },
    #[error("{}: cannot read the configuration file ({source}); check the path and its permissions, or pass --config", .file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {}{}", .file.display(), at(.position), .message)]
    Invalid {
        file: PathBuf,
        /// 1-based line and column, when known.
        position: Option<(usize, usize)>,
        /// Dotted key path such as `watch.root`; empty when unknown.
        key: String,
        message: String,
    },
}

fn at(position: &Option<(usize, usize)>) -> String {
    position.map_or(String::new(), |(l, c)| format!("line {l}, column {c}: "))
}

impl ConfigError {
    /// EX_CONFIG, but 1 for a root that does not answer.
    pub fn exit_code(&self) -> u8 {
        match self {
            ConfigError::RootHung { .. } => crate::exit::NEGATIVE,
            ConfigError::Read { .. } | ConfigError::Invalid { .. } => crate::exit::CONFIG,
        }
    }
}

/// A loaded configuration and the warnings worth logging once.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// What gets uploaded to, or why nothing is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Active {
    Local { reason: String },
    Provider(Resolved),
}

/// Whether `watch.root` must be there for this use of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootCheck {
    /// `run`, `check-config` and the commands that read or delete files in
    /// the root: a root that cannot be resolved is a configuration error.
    MustExist,
    /// `status` and the other commands, and a reload, which the daemon must
    /// answer while it is paused for a root that is away (unmounted, say):
    /// such a root keeps its path as written.
    MayBeAway,
}

/// Reads, parses and validates the configuration file at `path`.
pub fn load(path: &Path, root: RootCheck) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.into(),
        source,
    })?;
    let mut config: Config = serde_yaml::from_str(&text).map_err(|e| yaml_error(path, &text, e))?;
    config.source = path.into();
    let invalid = |key: &[&str], message: String| ConfigError::Invalid {
        file: path.into(),
        position: locate_nearest(&text, key),
        key: key.join("."),
        message,
    };
    config.validate().map_err(|(key, message)| {
        invalid(&key.iter().map(String::as_str).collect::<Vec<_>>(), message)
    })?;
    config.watch.root_as_written = config.watch.root.clone();
    // Off this thread and bounded: a root on a hung mount never answers.
    let resolved = {
        let at = config.watch.root.clone();
        root::within(root::ANSWER_WITHIN, move || canonical_root(&at))
    };
    config.watch.root = match (resolved, root) {
        (Some(Ok(resolved)), _) => resolved,
        (Some(Err(_)) | None, RootCheck::MayBeAway) => config.watch.root,
        (Some(Err(m)), RootCheck::MustExist) => return Err(invalid(&["watch", "root"], m)),
        (None, RootCheck::MustExist) => {
            return Err(ConfigError::RootHung {
                file: path.into(),
                root: config.watch.root,
            })
        }
    };
    // The state's own files would be watched, uploaded and (with
    // `delete_local`) deleted: the mark, the root's identity, the database.
    let state_dir = resolve_what_exists(&config.state_dir);
    if state_dir.starts_with(&config.watch.root) {
        return Err(invalid(
            &["state_dir"],
            format!(
                "`state_dir` {} is inside `watch.root` {}; put it outside the results directory, such as /var/lib/offloadd",
                config.state_dir.display(),
                config.watch.root.display()
            ),
        ));
    }

    let mut warnings = Vec::new();
    let inline = config
        .storage
        .providers
        .values()
        .any(|p| p.secret_access_key.is_some());
    let shared = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0);
    if inline && shared {
        warnings.push(format!(
            "{} contains an inline secret and is readable by group or others; move the secret to secret_access_key_file or a systemd credential, or let only the service's user read the file (chown it to that user, then chmod 600)",
            path.display()
        ));
    }
    for (name, section) in &config.storage.providers {
        let Some(file) = &section.secret_access_key_file else {
            continue;
        };
        if let Ok(meta) = std::fs::metadata(file) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                warnings.push(format!(
                    "the secret file {} of provider `{name}` is readable by others (mode {mode:04o}); chmod 600 it (or 640 with group offloadd)",
                    file.display()
                ));
            }
        }
    }
    // `r2-media` and `R2_media` read one secret variable, where no secret
    // file comes first.
    let by_variable = |name: &String, section: &ProviderSection| {
        section
            .secret_access_key_file
            .is_none()
            .then(|| provider::secret_env_var(name))
    };
    for (name, section) in &config.storage.providers {
        let Some(var) = by_variable(name, section) else {
            continue;
        };
        if let Some((other, _)) = config
            .storage
            .providers
            .iter()
            .take_while(|(other, _)| *other != name)
            .find(|(other, s)| by_variable(other, s).as_ref() == Some(&var))
        {
            warnings.push(format!(
                "providers `{other}` and `{name}` both read their secret from {var} when it is set; rename one of them, or give each a secret_access_key_file"
            ));
        }
    }
    if config.watch.include.is_empty() {
        warnings.push(
            "`watch.include` is empty, so no file will be uploaded; add a pattern such as \"**\""
                .into(),
        );
    }
    Ok(Loaded { config, warnings })
}

/// `path` with its longest existing ancestor resolved (symbolic links,
/// `..`), the rest as written: where it is, or will be once created.
fn resolve_what_exists(path: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = path;
    loop {
        if let Ok(resolved) = std::fs::canonicalize(at) {
            return missing.iter().rev().fold(resolved, |p, c| p.join(c));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                at = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// `log.level` as the tracing filter reads it: its comma-separated
/// directives with the blanks around each removed (tracing would take
/// ` warn` in `offloadd=debug, warn` for a target name).
pub fn log_filter(level: &str) -> String {
    level
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(",")
}

/// A level, or `target=level` directives. tracing reads a bare word that is
/// no level (`warning`, `inof`) as a target to log at every level, and an
/// empty filter as none: either would silence every other line, errors
/// included.
fn check_log_level(level: &str) -> Result<(), String> {
    let levels = "write one of error, warn, info, debug, trace or off, optionally with target=level directives such as offloadd=debug,warn";
    if level.trim().is_empty() {
        return Err(format!("`log.level` is empty; {levels}"));
    }
    let filter = log_filter(level);
    let bare = filter.split(',').find(|d| {
        !d.is_empty() && !d.contains('=') && !LOG_LEVELS.iter().any(|l| d.eq_ignore_ascii_case(l))
    });
    if let Some(word) = bare {
        return Err(if word == level.trim() {
            format!("`log.level` `{word}` is not a level; {levels}")
        } else {
            format!("`log.level` `{level}`: `{word}` is not a level; {levels}")
        });
    }
    tracing_subscriber::EnvFilter::try_new(&filter)
        .map(|_| ())
        .map_err(|e| format!("`log.level` `{level}` is not a level ({e}); {levels}"))
}

fn canonical_root(root: &Path) -> Result<PathBuf, String> {
    let shown = root.display();
    let canonical = std::fs::canonicalize(root).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("`watch.root` {shown} does not exist; create it or fix the path")
        }
        kind => format!(
            "`watch.root` {shown} cannot be resolved ({kind}); check the path and its permissions"
        ),
    })?;
    if !canonical.is_dir() {
        return Err(format!(
            "`watch.root` {shown} is not a directory; give the results directory"
        ));
    }
    Ok(canonical)
}

type KeyPath = Vec<String>;

fn key(parts: &[&str]) -> KeyPath {
    parts.iter().map(|p| p.to_string()).collect()
}

impl Config {
    /// Checks everything after parsing except the root's existence.
    fn validate(&self) -> Result<(), (KeyPath, String)> {
        for (k, p, example) in [
            ("watch.root", &self.watch.root, "/srv/app/storage/results"),
            ("state_dir", &self.state_dir, "/var/lib/offloadd"),
            (
                "control_socket",
                &self.control_socket,
                "/run/offloadd/control.sock",
            ),
        ] {
            if p.is_relative() {
                return Err((
                    k.split('.').map(String::from).collect(),
                    format!(
                        "`{k}` {} is relative; give an absolute path such as {example}",
                        p.display()
                    ),
                ));
            }
        }
        for (k, patterns) in [
            ("include", &self.watch.include),
            ("exclude", &self.watch.exclude),
        ] {
            for pattern in patterns {
                if let Err(e) = globset::Glob::new(pattern) {
                    return Err((
                        key(&["watch", k]),
                        format!("`watch.{k}` pattern `{pattern}` is not a valid glob ({}); fix the pattern", e.kind()),
                    ));
                }
            }
        }
        self.validate_upload()?;
        if let Some(addr) = self.http.listen {
            if !addr.ip().is_loopback() && !self.http.allow_remote {
                return Err((
                    key(&["http", "listen"]),
                    format!("`http.listen` {addr} is not a loopback address; listen on 127.0.0.1 or set `http.allow_remote: true`"),
                ));
            }
        }
        check_log_level(&self.log.level).map_err(|m| (key(&["log", "level"]), m))?;
        self.validate_rules()?;
        self.validate_storage()
    }

    fn validate_rules(&self) -> Result<(), (KeyPath, String)> {
        crate::remote::object_options::Rules::new(&self.rules)
            .map_err(|e| (key(&["rules"]), format!("{e}")))?;
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.storage_class.is_none() {
                continue;
            }
            let active = &self.storage.active;
            if let Some((name, p)) = self.storage.providers.get_key_value(active) {
                if !p.kind.supports_storage_class() {
                    return Err((
                        key(&["rules"]),
                        format!(
                            "`rules[{index}]` sets `storage_class`, which provider `{name}` (kind {}) does not support; remove it or limit the rule to providers that have storage classes",
                            p.kind
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_upload(&self) -> Result<(), (KeyPath, String)> {
        let u = &self.upload;
        let fail = |k: &str, message: String| Err((key(&["upload", k]), message));
        if u.workers == 0 {
            return fail("workers", "`upload.workers` is 0; give at least 1".into());
        }
        if u.part_concurrency == 0 {
            return fail(
                "part_concurrency",
                "`upload.part_concurrency` is 0; give at least 1".into(),
            );
        }
        if !(5 * MIB..=5 * GIB).contains(&u.part_size) {
            return fail(
                "part_size",
                format!("`upload.part_size` is {} bytes, outside what S3 accepts; give a size from 5MiB to 5GiB", u.part_size),
            );
        }
        if u.multipart_threshold > 5 * GIB {
            return fail(
                "multipart_threshold",
                format!("`upload.multipart_threshold` is {} bytes, over the 5GiB limit of a single upload; give at most 5GiB", u.multipart_threshold),
            );
        }
        if u.memory_limit < u.part_size {
            return fail(
                "memory_limit",
                format!(
                    "`upload.memory_limit` ({} bytes) is smaller than `upload.part_size` ({} bytes), and the uploader needs room for at least one part; raise memory_limit to at least {} bytes or lower part_size",
                    u.memory_limit, u.part_size, u.part_size
                ),
            );
        }
        let retry = |k: &str| key(&["upload", "retry", k]);
        if u.retry.initial_backoff.is_zero() {
            return Err((
                retry("initial_backoff"),
                "`upload.retry.initial_backoff` is 0; give a pause such as 1s".into(),
            ));
        }
        if u.retry.max_backoff < u.retry.initial_backoff {
            return Err((
                retry("max_backoff"),
                "`upload.retry.max_backoff` is shorter than `initial_backoff`; make it at least as long".into(),
            ));
        }
        if let Err(e) = crate::pipeline::timetable::Timetable::parse(&u.bandwidth_schedule) {
            return fail("bandwidth_schedule", format!("upload.{e}"));
        }
        Ok(())
    }

    fn validate_storage(&self) -> Result<(), (KeyPath, String)> {
        let providers = &self.storage.providers;
        for (name, section) in providers {
            let path = |k: &str| key(&["storage", "providers", name, k]);
            let valid_name = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && name != "local";
            if !valid_name {
                return Err((
                    key(&["storage", "providers", name]),
                    format!("provider name `{name}` is not usable; rename it with letters, digits, `-`, `_` or `.` (and not `local`)"),
                ));
            }
            provider::validate(section)
                .map_err(|e| (path(e.key), format!("provider `{name}`: {}", e.message)))?;
        }
        let active = self.storage.active.as_str();
        if active == "local" {
            return Ok(());
        }
        let Some(section) = providers.get(active) else {
            let names: Vec<&str> = providers.keys().map(String::as_str).collect();
            let fix = if names.is_empty() {
                "write `local` or add that provider under `storage.providers`".to_owned()
            } else {
                format!("write `local` or one of {}", names.join(", "))
            };
            return Err((
                key(&["storage", "active"]),
                format!("`storage.active` names `{active}`, but there is no such provider; {fix}"),
            ));
        };
        if self.storage.delete_local && !section.has_public_url() {
            return Err((
                key(&["storage", "delete_local"]),
                format!("`storage.delete_local` is true but provider `{active}` has no public URL, so deleted files would become unreachable; set its `public_url` or set delete_local to false"),
            ));
        }
        Ok(())
    }

    /// The provider `name`, complete with its secret, or why it is not usable.
    pub fn resolve_provider(&self, name: &str) -> Result<Resolved, Incomplete> {
        self.resolve_with(name, &|var| std::env::var_os(var))
    }

    fn resolve_with(
        &self,
        name: &str,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<Resolved, Incomplete> {
        let section = self.section(name)?;
        let (_, secret) = find_secret(name, section, env)?;
        // Outside systemd (no INVOCATION_ID): check-config from a shell.
        let unseen = env("CREDENTIALS_DIRECTORY").is_none() && env("INVOCATION_ID").is_none();
        provider::resolve(name, section, secret).map_err(|e| {
            if !unseen || e != provider::missing_secret(name) {
                return e;
            }
            // check-config from a shell: the unit's credential is not here.
            Incomplete {
                reason: format!("{}; a systemd credential is seen only inside the service ($CREDENTIALS_DIRECTORY is not set here), so if the unit loads one, check it with `offloadd test-connection` while the service runs", e.reason),
            }
        })
    }

    /// The public URL base of provider `name` (`public_url` or its kind's
    /// own address); needs no secret, so the CLI can answer `locate`. A
    /// given `public_url` needs nothing else either: a retired section kept
    /// for its URLs may lack the bucket, region or account id an upload
    /// would need.
    pub fn public_url_base(&self, name: &str) -> Option<String> {
        let section = self.storage.providers.get(name)?;
        match &section.public_url {
            Some(url) => Some(url.trim_end_matches('/').to_owned()),
            None => provider::place(name, section).ok()?.public_url_base,
        }
    }

    /// The provider uploads go to, or local mode with the reason.
    pub fn active(&self) -> Active {
        self.active_with(&|var| std::env::var_os(var))
    }

    fn active_with(&self, env: &dyn Fn(&str) -> Option<OsString>) -> Active {
        let name = &self.storage.active;
        if let Some(reason) = self.off_by_choice() {
            return Active::Local { reason };
        }
        match self.resolve_with(name, env) {
            Ok(resolved) => Active::Provider(resolved),
            Err(Incomplete { reason }) => Active::Local { reason },
        }
    }

    /// Why nothing is offloaded by the operator's choice: `active: local`, or
    /// an active provider that is disabled.
    fn off_by_choice(&self) -> Option<String> {
        let name = &self.storage.active;
        if name == "local" {
            return Some("`storage.active` is `local`".into());
        }
        self.storage
            .providers
            .get(name)
            .is_some_and(|p| !p.enabled)
            .then(|| format!("provider `{name}` is disabled (`enabled: false`)"))
    }

    /// Why the daemon would run in local mode whatever its secret: the CLI,
    /// when the daemon is down, cannot tell whether the service can read a
    /// secret that it cannot (a systemd credential, say).
    pub fn local_whatever_the_secret(&self) -> Option<String> {
        let name = &self.storage.active;
        if let Some(reason) = self.off_by_choice() {
            return Some(reason);
        }
        let placeholder = Some(Secret::new(String::new()));
        self.section(name)
            .and_then(|section| provider::resolve(name, section, placeholder))
            .err()
            .map(|e| e.reason)
    }

    /// Provider `name`'s section, or why there is none.
    fn section(&self, name: &str) -> Result<&ProviderSection, Incomplete> {
        self.storage.providers.get(name).ok_or_else(|| Incomplete {
            reason: format!("there is no provider `{name}`; add it under `storage.providers`"),
        })
    }

    /// The `check-config` text: every provider's effective settings, secrets masked.
    pub fn report(&self) -> String {
        self.report_with(&|var| std::env::var_os(var))
    }

    fn report_with(&self, env: &dyn Fn(&str) -> Option<OsString>) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "config:     {}", self.source.display());
        let _ = writeln!(out, "watch root: {}", self.watch.root.display());
        let _ = writeln!(out, "state dir:  {}", self.state_dir.display());
        let mode = match self.active_with(env) {
            Active::Provider(p) => format!("provider {}", p.name),
            Active::Local { reason } => format!("local ({reason})"),
        };
        let _ = writeln!(out, "uploads go to: {mode}");
        if self.storage.providers.is_empty() {
            let _ = writeln!(out, "\nno providers configured");
        }
        for (name, section) in &self.storage.providers {
            let is_active = *name == self.storage.active;
            let found = find_secret(name, section, env);
            let (source, state) = match &found {
                Ok((source, _)) => (source.to_string(), self.resolve_with(name, env).map(|_| ())),
                // The state line says why (a secret file missing or blank, say).
                Err(e) => ("unusable".to_owned(), Err(e.clone())),
            };
            // Where it would go needs no key or CA: shown for an incomplete
            // section too, whatever else it lacks.
            let shown = provider::place(name, section).ok();
            let derived =
                |f: fn(&provider::Place) -> String| shown.as_ref().map_or("-".to_owned(), f);
            let public_url = match (self.public_url_base(name), &shown) {
                (Some(url), _) => url,
                (None, Some(_)) => "none".to_owned(),
                (None, None) => "-".to_owned(),
            };
            let _ = writeln!(
                out,
                "\nprovider {name}{}",
                if is_active { " (active)" } else { "" }
            );
            let rows = [
                ("kind", section.kind.to_string()),
                (
                    "enabled",
                    if section.enabled { "yes" } else { "no" }.to_owned(),
                ),
                (
                    "bucket",
                    section.bucket.clone().unwrap_or_else(|| "-".into()),
                ),
                ("endpoint", derived(|r| r.endpoint.clone())),
                ("region", derived(|r| r.region.clone())),
                ("addressing", derived(|r| r.addressing.to_string())),
                (
                    "prefix",
                    Some(section.prefix.as_deref().unwrap_or("").trim_matches('/'))
                        .filter(|p| !p.is_empty())
                        .unwrap_or("none")
                        .to_owned(),
                ),
                ("public URL", public_url),
                (
                    "access key",
                    section.access_key_id.as_deref().map_or("-".into(), mask),
                ),
                ("secret", source),
                (
                    "state",
                    state.map_or_else(|e| format!("incomplete: {e}"), |()| "complete".into()),
                ),
            ];
            for (label, value) in rows {
                let _ = writeln!(out, "  {:<11} {value}", format!("{label}:"));
            }
        }
        out
    }
}

fn mask(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    match chars.len() {
        0..=4 => "****".into(),
        n => format!("****{}", chars[n - 4..].iter().collect::<String>()),
    }
}

/// Where a provider's secret came from, for `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SecretSource {
    File(PathBuf),
    Credential,
    Env(String),
    Inline,
    Missing,
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "from file {}", p.display()),
            SecretSource::Credential => f.write_str("from systemd credential"),
            SecretSource::Env(var) => write!(f, "from environment {var}"),
            SecretSource::Inline => f.write_str("inline"),
            SecretSource::Missing => f.write_str("missing"),
        }
    }
}

/// The secret by precedence: `secret_access_key_file`, the systemd
/// credential, the environment, the inline value.
fn find_secret(
    name: &str,
    section: &ProviderSection,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<(SecretSource, Option<Secret>), Incomplete> {
    let incomplete = |what: String| Incomplete {
        reason: format!("provider `{name}` is incomplete: {what}"),
    };
    let read = |path: &Path| -> Result<Option<Secret>, Incomplete> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let secret = text.trim_end_matches(['\n', '\r']);
                if secret.trim().is_empty() {
                    return Err(incomplete(format!(
                        "the secret file {} is empty or holds only blanks; write the secret access key into it",
                        path.display()
                    )));
                }
                Ok(Some(Secret::new(secret.to_owned())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(incomplete(format!(
                "cannot read the secret file {} ({}); make it readable by the service user",
                path.display(),
                e.kind()
            ))),
        }
    };
    if let Some(path) = &section.secret_access_key_file {
        return match read(path)? {
            Some(secret) => Ok((SecretSource::File(path.clone()), Some(secret))),
            None => Err(incomplete(format!(
                "the secret file {} does not exist; create it or fix `secret_access_key_file`",
                path.display()
            ))),
        };
    }
    if let Some(dir) = env("CREDENTIALS_DIRECTORY") {
        if let Some(secret) = read(&Path::new(&dir).join(format!("{name}.secret_access_key")))? {
            return Ok((SecretSource::Credential, Some(secret)));
        }
    }
    let var = provider::secret_env_var(name);
    if let Some(value) = env(&var).filter(|v| !v.to_string_lossy().trim().is_empty()) {
        let value = value.into_string().map_err(|_| {
            incomplete(format!(
                "{var} is not valid UTF-8; set it to the secret access key"
            ))
        })?;
        return Ok((SecretSource::Env(var), Some(Secret::new(value))));
    }
    match &section.secret_access_key {
        Some(secret) if secret.expose().trim().is_empty() => Err(incomplete(
            "`secret_access_key` is empty or holds only blanks; write the secret access key there, or remove it and use another source".into(),
        )),
        Some(secret) => Ok((SecretSource::Inline, Some(secret.clone()))),
        None => Ok((SecretSource::Missing, None)),
    }
}

/// Rewrites a serde_yaml error into `{file}: line L, column C: …; fix`.
fn yaml_error(file: &Path, source: &str, e: serde_yaml::Error) -> ConfigError {
    let mut position = e.location().map(|l| (l.line(), l.column()));
    let mut text = e.to_string();
    if let Some((l, c)) = position {
        text = text.replacen(&format!(" at line {l} column {c}"), "", 1);
    }
    let split = split_path(&text);
    let (key, message) = match split {
        Some((path, msg)) => describe(path, msg),
        None => (String::new(), format!("the YAML is malformed ({text}); fix the syntax there, checking indentation and quotes")),
    };
    if split.is_some_and(|(_, msg)| msg.starts_with("duplicate field")) {
        // serde_yaml points at the start of the block: show the second key.
        let parts: Vec<&str> = key.split('.').collect();
        position = locate_nth(source, &parts, 1).or(position);
    }
    ConfigError::Invalid {
        file: file.into(),
        position,
        key,
        message,
    }
}

const SERDE_PHRASES: &[&str] = &[
    "unknown field",
    "missing field",
    "invalid type",
    "invalid value",
    "invalid length",
    "unknown variant",
    "duplicate field",
    "`",
];

/// Splits `watch.settle: invalid type: …` into path and message; `None` for syntax errors.
fn split_path(text: &str) -> Option<(&str, &str)> {
    let is_serde = |s: &str| SERDE_PHRASES.iter().any(|p| s.starts_with(p));
    if is_serde(text) {
        return Some(("", text));
    }
    text.match_indices(": ")
        .map(|(i, _)| (&text[..i], &text[i + 2..]))
        .find(|(_, rest)| is_serde(rest))
}

/// The backticked words of a serde message, in order.
fn ticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// Turns serde's message at `path` into `(key, sentence with a fix)`.
fn describe(path: &str, msg: &str) -> (String, String) {
    let join = |field: &str| {
        if path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        }
    };
    let words = ticked(msg);
    if let (Some(field), true) = (words.first(), msg.starts_with("unknown field")) {
        let place = if path.is_empty() {
            "at the top level".to_owned()
        } else {
            format!("in `{path}`")
        };
        let valid = if words.len() > 1 {
            words[1..].join(", ")
        } else {
            "none".into()
        };
        return (
            join(field),
            format!("unknown key `{field}` {place}; valid keys are {valid}"),
        );
    }
    if let (Some(field), true) = (words.first(), msg.starts_with("missing field")) {
        return (join(field), format!("`{}` is missing; add it", join(field)));
    }
    if let (Some(field), true) = (words.first(), msg.starts_with("duplicate field")) {
        return (
            join(field),
            format!("`{}` appears twice; keep one", join(field)),
        );
    }
    if let (Some(value), true) = (words.first(), msg.starts_with("unknown variant")) {
        return (
            path.into(),
            format!(
                "`{path}` is `{value}`; write one of {}",
                words[1..].join(", ")
            ),
        );
    }
    let invalid_value = msg.starts_with("invalid value: ");
    if let Some(rest) = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "))
    {
        let (found, expected) = rest
            .rsplit_once(", expected ")
            .unwrap_or((rest, "another value"));
        let expected = match expected {
            "usize" | "u64" | "u32" | "u16" | "u8" | "i64" | "i32" => "a whole number",
            "a boolean" => "true or false",
            "a sequence" => "a list such as [\"**\"]",
            e if e.starts_with("struct ") || e.starts_with("a map") => {
                "a block of `key: value` lines"
            }
            e => e,
        };
        let what = if invalid_value {
            "is out of range".to_string()
        } else {
            format!("has the wrong type ({})", kind_of(found))
        };
        return (path.into(), format!("`{path}` {what}; write {expected}"));
    }
    (path.into(), format!("`{path}`: {msg}"))
}

/// What serde found, without the value itself: a value in the wrong place
/// may be a secret (`secret_access_key` indented one level too shallow).
fn kind_of(found: &str) -> &'static str {
    let word = found.split(['"', '`']).next().unwrap_or("").trim();
    match word {
        "string" | "char" => "a string",
        "integer" | "floating point" => "a number",
        "boolean" => "true or false",
        "map" => "a block of `key: value` lines",
        "sequence" => "a list",
        "unit value" | "unit" => "an empty value",
        _ => "another type",
    }
}

/// Like [`locate`], falling back to the nearest enclosing key that is written.
fn locate_nearest(text: &str, path: &[&str]) -> Option<(usize, usize)> {
    (1..=path.len())
        .rev()
        .find_map(|n| locate(text, &path[..n]))
}

/// 1-based line and column of the key at `path` in block-style YAML.
fn locate(text: &str, path: &[&str]) -> Option<(usize, usize)> {
    locate_nth(text, path, 0)
}

/// Like [`locate`], for the key written for the `nth` time (from 0) in its block.
fn locate_nth(text: &str, path: &[&str], nth: usize) -> Option<(usize, usize)> {
    let mut seen = 0;
    let mut depth = 0;
    let mut parent_indent: Option<usize> = None;
    let mut child_indent: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let content = line.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') || content.starts_with("---") {
            continue;
        }
        let indent = line.len() - content.len();
        if parent_indent.is_some_and(|p| indent <= p) {
            return None;
        }
        if indent != *child_indent.get_or_insert(indent) {
            continue;
        }
        let Some((key, rest)) = split_key(content) else {
            continue;
        };
        if key != path[depth] {
            continue;
        }
        if depth + 1 == path.len() {
            if seen == nth {
                return Some((n + 1, indent + 1));
            }
            seen += 1;
            continue;
        }
        if rest.trim_start().starts_with('{') {
            let want = format!("{}:", path[depth + 1]);
            let offset = line.len() - rest.len();
            let found = rest
                .match_indices(&want)
                .find(|(i, _)| rest[..*i].ends_with(['{', ',', ' ']))
                .map(|(i, _)| line[..offset + i].chars().count() + 1);
            return Some((n + 1, found.unwrap_or(indent + 1)));
        }
        depth += 1;
        parent_indent = Some(indent);
        child_indent = None;
    }
    None
}

/// `key: rest` → `(key, rest)`, unquoting a quoted key.
fn split_key(content: &str) -> Option<(&str, &str)> {
    for q in ['"', '\''] {
        if let Some(quoted) = content.strip_prefix(q) {
            let (key, rest) = quoted.split_once(q)?;
            return Some((key, rest.strip_prefix(':')?));
        }
    }
    let colon = content
        .match_indices(':')
        .map(|(i, _)| i)
        .find(|&i| content[i + 1..].is_empty() || content[i + 1..].starts_with([' ', '\t']))?;
    Some((&content[..colon], &content[colon + 1..]))
}

/// For other modules' tests: a config in `dir` whose `watch.root` is
/// `dir/results` and `state_dir` is `dir/state` (both created), with
/// nothing else set.
#[cfg(test)]
pub fn in_temp_dir(dir: &Path) -> Config {
    let (root, state) = (dir.join("results"), dir.join("state"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let file = dir.join("config.yaml");
    let yaml = format!(
        "watch:\n  root: {}\nstate_dir: {}\n",
        root.display(),
        state.display()
    );
    std::fs::write(&file, yaml).unwrap();
    load(&file, RootCheck::MustExist).unwrap().config
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("results")).unwrap();
            Fixture { dir }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("results")
        }

        fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            let path = self.dir.path().join(name);
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(text.as_bytes()).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        }

        /// Writes a config whose `watch.root` is the fixture's results dir, then `rest`.
        fn config(&self, rest: &str) -> PathBuf {
            let text = format!("watch:\n  root: {}\n{rest}", self.root().display());
            self.write("config.yaml", &text, 0o600)
        }

        fn load(&self, rest: &str) -> Result<Loaded, ConfigError> {
            load(&self.config(rest), RootCheck::MustExist)
        }

        fn error(&self, rest: &str) -> String {
            self.load(rest).unwrap_err().to_string()
        }
    }

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    /// A root on a hung mount may answer later: exit 1, so systemd tries
    /// again, where a configuration error (78) would make it give up.
    #[test]
    fn a_root_that_does_not_answer_exits_1() {
        let e = ConfigError::RootHung {
            file: "/etc/offloadd/config.yaml".into(),
            root: "/data/results".into(),
        };
        assert_eq!(e.exit_code(), crate::exit::NEGATIVE);
        assert_eq!(
            e.to_string(),
            "/etc/offloadd/config.yaml: `watch.root` /data/results does not answer within 5 s (a hung network mount?); offloadd cannot start until it does"
        );
    }

    #[test]
    fn defaults() {
        let fx = Fixture::new();
        let Loaded {
            config: c,
            warnings,
        } = fx.load("").unwrap();
        assert!(warnings.is_empty());
        assert_eq!(c.watch.root, fx.root().canonicalize().unwrap());
        assert_eq!(c.watch.include, ["**"]);
        assert_eq!(c.watch.exclude, ["**/.*", "**/*.tmp", "**/*.part", "**/*~"]);
        assert_eq!(c.watch.settle, Duration::from_secs(2));
        assert_eq!(c.watch.rescan_interval, Some(Duration::from_secs(3600)));
        assert_eq!(c.state_dir, Path::new("/var/lib/offloadd"));
        assert_eq!(c.control_socket, Path::new("/run/offloadd/control.sock"));
        assert_eq!(c.storage, Storage::default());
        assert_eq!(c.storage.active, "local");
        assert_eq!(c.upload, Upload::default());
        assert_eq!((c.upload.workers, c.upload.part_concurrency), (128, 4));
        assert_eq!(
            (
                c.upload.multipart_threshold,
                c.upload.part_size,
                c.upload.memory_limit
            ),
            (16 * MIB, 8 * MIB, 32 * MIB)
        );
        assert_eq!(c.upload.retry.max_backoff, Duration::from_secs(300));
        assert_eq!(c.http.listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(
            (c.log.format, c.log.level.as_str()),
            (LogFormat::Auto, "info")
        );
        assert_eq!(
            c.active(),
            Active::Local {
                reason: "`storage.active` is `local`".into()
            }
        );
    }

    #[test]
    fn sizes_durations_and_switches() {
        let fx = Fixture::new();
        let c = fx
            .load("  settle: 500ms\n  rescan_interval: 0\nupload:\n  part_size: 5MiB\n  multipart_threshold: 5GiB\n  memory_limit: 10485760\n  bandwidth_limit: 1MB\n  retry: { initial_backoff: 2s, max_backoff: 1h }\nhttp:\n  listen: \"\"\nlog:\n  format: json\n  level: offloadd=debug,warn\n")
            .unwrap()
            .config;
        assert_eq!(c.watch.settle, Duration::from_millis(500));
        assert_eq!(c.watch.rescan_interval, None);
        assert_eq!(
            (c.upload.part_size, c.upload.multipart_threshold),
            (5 * MIB, 5 * GIB)
        );
        assert_eq!(
            (c.upload.memory_limit, c.upload.bandwidth_limit),
            (10 * MIB, 1_000_000)
        );
        assert_eq!(c.upload.retry.initial_backoff, Duration::from_secs(2));
        assert_eq!(c.http.listen, None);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_key_names_line_column_and_valid_keys() {
        let fx = Fixture::new();
        let path = fx.write("c.yaml", "# offloadd\nwatch:\n  rootz: /x\n", 0o600);
        assert_eq!(
            load(&path, RootCheck::MustExist).unwrap_err().to_string(),
            format!("{}: line 3, column 3: unknown key `rootz` in `watch`; valid keys are root, include, exclude, settle, rescan_interval", path.display())
        );
        let err =
            fx.error("storage:\n  providers:\n    r2-media:\n      kind: r2\n      bukket: b\n");
        assert!(err.contains(": line 7, column 7: unknown key `bukket` in `storage.providers.r2-media`; valid keys are kind, enabled, bucket,"), "{err}");
        assert!(fx.error("wtach: 1\n").contains("line 3, column 1: unknown key `wtach` at the top level; valid keys are watch, state_dir,"));
    }

    #[test]
    fn wrong_type_and_bad_values_name_line_column() {
        let fx = Fixture::new();
        let err = fx.error("upload:\n  workers: many\n");
        assert!(err.ends_with(": line 4, column 12: `upload.workers` has the wrong type (a string); write a whole number"), "{err}");
        let err = fx.error("upload:\n  workers: -4\n");
        assert!(
            err.ends_with("`upload.workers` has the wrong type (a number); write a whole number"),
            "{err}"
        );
        let err = fx.error("upload:\n  part_size: 64MB2\n");
        assert!(err.ends_with(": line 4, column 14: `upload.part_size`: `64MB2` is not a size; write bytes or a number with KiB, MiB, GiB (e.g. 64MiB)"), "{err}");
        let err = fx.error("storage:\n  providers:\n    a:\n      kind: azure\n");
        assert!(err.contains("line 6, column 13: `storage.providers.a.kind` is `azure`; write one of s3, r2, wasabi, spaces, gcs, minio, custom"), "{err}");
        let err = fx.error("http:\n  listen: localhost\n");
        assert!(
            err.contains(
                "line 4, column 11: `http.listen`: `localhost` is not an IP address and port;"
            ),
            "{err}"
        );
    }

    #[test]
    fn yaml_syntax_error_position() {
        let fx = Fixture::new();
        let path = fx.write("c.yaml", "watch:\n  root: /x\n bad: [\n", 0o600);
        let err = load(&path, RootCheck::MustExist).unwrap_err();
        assert_eq!(err.exit_code(), 78);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "{}: line 3, column 2: the YAML is malformed (",
                path.display()
            )),
            "{text}"
        );
        assert!(
            text.ends_with("; fix the syntax there, checking indentation and quotes"),
            "{text}"
        );
    }

    /// The state's own files would be uploaded and, with `delete_local`,
    /// deleted: refused however the path reaches into the root.
    #[test]
    fn state_dir_inside_the_root_is_refused() {
        let fx = Fixture::new();
        std::fs::create_dir_all(fx.root().join("existing")).unwrap();
        let link = fx.dir.path().join("link");
        std::os::unix::fs::symlink(fx.root(), &link).unwrap();
        std::fs::create_dir(fx.dir.path().join("elsewhere")).unwrap();
        for state_dir in [
            fx.root().join("existing"),
            fx.root().join("not/yet/made"),
            fx.root(),
            link.join("state"),
            fx.dir.path().join("elsewhere/../results/state"),
        ] {
            let err = fx.error(&format!("state_dir: {}\n", state_dir.display()));
            assert!(
                err.contains("line 3, column 1: `state_dir` ")
                    && err.ends_with(
                        "; put it outside the results directory, such as /var/lib/offloadd"
                    ),
                "{}: {err}",
                state_dir.display()
            );
        }
        // Beside the root, its name a prefix of the root's: fine.
        fx.load(&format!("state_dir: {}-state\n", fx.root().display()))
            .unwrap();
    }

    #[test]
    fn paths_must_be_absolute_and_root_must_exist() {
        let fx = Fixture::new();
        let path = fx.write("c.yaml", "watch:\n  root: results\n", 0o600);
        assert_eq!(
            load(&path, RootCheck::MustExist).unwrap_err().to_string(),
            format!("{}: line 2, column 3: `watch.root` results is relative; give an absolute path such as /srv/app/storage/results", path.display())
        );
        let err = fx.error("state_dir: var/lib\n");
        assert!(
            err.contains("line 3, column 1: `state_dir` var/lib is relative"),
            "{err}"
        );
        let missing = fx.write("c.yaml", "watch:\n  root: /nonexistent/offloadd\n", 0o600);
        assert!(load(&missing, RootCheck::MustExist).unwrap_err().to_string().contains("line 2, column 3: `watch.root` /nonexistent/offloadd does not exist; create it or fix the path"));
        let file = fx.write("f", "", 0o600);
        let not_dir = fx.write(
            "c.yaml",
            &format!("watch:\n  root: {}\n", file.display()),
            0o600,
        );
        assert!(load(&not_dir, RootCheck::MustExist)
            .unwrap_err()
            .to_string()
            .contains("is not a directory"));
        let err = load(&fx.dir.path().join("absent.yaml"), RootCheck::MustExist).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err
            .to_string()
            .contains("cannot read the configuration file"));
    }

    #[test]
    fn a_root_that_is_away_keeps_its_path_where_it_may_be() {
        let fx = Fixture::new();
        let away = fx.dir.path().join("unmounted");
        let path = fx.write(
            "c.yaml",
            &format!("watch:\n  root: {}\n", away.display()),
            0o600,
        );
        let err = load(&path, RootCheck::MustExist).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        let loaded = load(&path, RootCheck::MayBeAway).unwrap();
        assert_eq!(loaded.config.watch.root, away);
    }

    #[test]
    fn symlinked_root_is_resolved_once() {
        let fx = Fixture::new();
        let link = fx.dir.path().join("link");
        std::os::unix::fs::symlink(fx.root(), &link).unwrap();
        let path = fx.write(
            "c.yaml",
            &format!("watch:\n  root: {}\n", link.display()),
            0o600,
        );
        assert_eq!(
            load(&path, RootCheck::MustExist).unwrap().config.watch.root,
            fx.root().canonicalize().unwrap()
        );
    }

    #[test]
    fn semantic_errors() {
        let fx = Fixture::new();
        let cases = [
            ("  include: [\"a/[b\"]\n", "line 3, column 3: `watch.include` pattern `a/[b` is not a valid glob"),
            ("upload:\n  part_size: 4MiB\n", "line 4, column 3: `upload.part_size` is 4194304 bytes, outside what S3 accepts; give a size from 5MiB to 5GiB"),
            ("upload:\n  multipart_threshold: 6GiB\n", "`upload.multipart_threshold` is 6442450944 bytes, over the 5GiB limit"),
            ("upload:\n  workers: 0\n", "line 4, column 3: `upload.workers` is 0; give at least 1"),
            ("upload:\n  part_concurrency: 0\n", "`upload.part_concurrency` is 0"),
            ("upload:\n  part_size: 40MiB\n", "line 3, column 1: `upload.memory_limit` (33554432 bytes) is smaller than `upload.part_size` (41943040 bytes), and the uploader needs room for at least one part;"),
            ("upload:\n  retry: { initial_backoff: 10s, max_backoff: 5s }\n", "line 4, column 34: `upload.retry.max_backoff` is shorter"),
            ("http:\n  listen: 0.0.0.0:9187\n", "line 4, column 3: `http.listen` 0.0.0.0:9187 is not a loopback address; listen on 127.0.0.1 or set `http.allow_remote: true`"),
            ("log:\n  level: \"[\"\n", "`log.level` `[` is not a level"),
            ("storage:\n  active: r3\n  providers:\n    r2: { kind: r2 }\n    s3: { kind: s3 }\n", "line 4, column 3: `storage.active` names `r3`, but there is no such provider; write `local` or one of r2, s3"),
            ("storage:\n  active: r3\n", "there is no such provider; write `local` or add that provider under `storage.providers`"),
            ("storage:\n  providers:\n    \"a b\":\n      kind: s3\n", "line 5, column 5: provider name `a b` is not usable"),
        ];
        for (rest, want) in cases {
            let err = fx.error(rest);
            assert!(err.contains(want), "{rest}\n{err}");
        }
        fx.load("http:\n  listen: 0.0.0.0:9187\n  allow_remote: true\n")
            .unwrap();
        fx.load("http:\n  listen: \"[::1]:9187\"\n").unwrap();
    }

    #[test]
    fn log_level_must_be_a_level_or_target_directives() {
        let fx = Fixture::new();
        let levels = "write one of error, warn, info, debug, trace or off, optionally with target=level directives such as offloadd=debug,warn";
        // tracing reads each of these as a target name (or no directive at
        // all), which would silence every line, errors included.
        for (level, want) in [
            (
                "warning",
                "line 4, column 3: `log.level` `warning` is not a level; ",
            ),
            ("notice", "`log.level` `notice` is not a level; "),
            ("inof", "`log.level` `inof` is not a level; "),
            ("\"3\"", "`log.level` `3` is not a level; "),
            ("offloadd", "`log.level` `offloadd` is not a level; "),
            (
                "offloadd=debug,warning",
                "`log.level` `offloadd=debug,warning`: `warning` is not a level; ",
            ),
            ("\"\"", "line 4, column 3: `log.level` is empty; "),
            ("\" \"", "`log.level` is empty; "),
            (
                "offloadd=loud",
                "`log.level` `offloadd=loud` is not a level (",
            ),
        ] {
            let err = fx.error(&format!("log:\n  level: {level}\n"));
            assert!(err.contains(want), "{level}: {err}");
            assert!(err.ends_with(levels), "{level}: {err}");
        }
        for level in [
            "info",
            "WARN",
            "Error",
            "off",
            "trace",
            "offloadd=debug,warn",
            "offloadd=debug, warn",
            "offloadd::remote=trace,info,",
        ] {
            let c = fx
                .load(&format!("log:\n  level: \"{level}\"\n"))
                .unwrap()
                .config;
            assert_eq!(c.log.level, level);
        }
        // The blank after the comma is not part of the directive.
        assert_eq!(log_filter(" offloadd=debug, warn "), "offloadd=debug,warn");
        let filter =
            tracing_subscriber::EnvFilter::try_new(log_filter("offloadd=debug, warn")).unwrap();
        assert_eq!(
            filter.max_level_hint(),
            Some(tracing::level_filters::LevelFilter::DEBUG)
        );
        assert!(
            filter.to_string().split(',').any(|d| d == "warn"),
            "{filter}"
        );
    }

    #[test]
    fn unsupported_option_names_the_key_and_position() {
        let fx = Fixture::new();
        let err = fx.error("storage:\n  providers:\n    r2-media:\n      kind: r2\n      server_side_encryption: aws:kms\n");
        assert!(err.ends_with(": line 7, column 7: provider `r2-media`: `server_side_encryption: aws:kms` is not supported by kind r2; remove it"), "{err}");
        match fx.load("storage:\n  providers:\n    p:\n      kind: r2\n      kms_key_id: k\n") {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "storage.providers.p.kms_key_id")
            }
            other => panic!("{other:?}"),
        }
        let err = fx.error(
            "storage:\n  providers:\n    p:\n      kind: minio\n      endpoint: http://minio.lan\n",
        );
        assert!(
            err.contains(
                "line 7, column 7: provider `p`: endpoint `http://minio.lan` uses plain http"
            ),
            "{err}"
        );
        let err = fx.error("storage:\n  providers:\n    p:\n      kind: s3\n      secret_access_key: hunter2\n      secret_access_key_file: /x\n");
        assert!(
            err.contains("both `secret_access_key` and `secret_access_key_file` are set"),
            "{err}"
        );
        assert!(!err.contains("hunter2"));
    }

    #[test]
    fn a_secret_in_the_wrong_place_or_of_the_wrong_type_is_never_quoted() {
        let fx = Fixture::new();
        // indented one level too shallow: YAML reads it as a provider
        let err = fx.error("storage:\n  providers:\n    secret_access_key: wJalrXUtnFEMIK7MDENG\n");
        assert!(err.contains("`storage.providers.secret_access_key` has the wrong type (a string); write a block of `key: value` lines"), "{err}");
        assert!(!err.contains("wJalr"), "{err}");
        // a number where a block belongs
        let err = fx.error("storage:\n  providers:\n    m: 98765432\n");
        assert!(
            err.contains("`storage.providers.m` has the wrong type (a number)"),
            "{err}"
        );
        assert!(!err.contains("98765432"), "{err}");
    }

    #[test]
    fn delete_local_needs_a_public_url() {
        let fx = Fixture::new();
        let r2 =
            "storage:\n  active: m\n  delete_local: true\n  providers:\n    m:\n      kind: r2\n";
        let err = fx.error(r2);
        assert!(err.contains("line 5, column 3: `storage.delete_local` is true but provider `m` has no public URL, so deleted files would become unreachable;"), "{err}");
        fx.load(&format!("{r2}      public_url: https://pub.r2.dev\n"))
            .unwrap();
        fx.load(
            "storage:\n  active: m\n  delete_local: true\n  providers:\n    m:\n      kind: gcs\n",
        )
        .unwrap();
        // The kind's own address is not where its endpoint points elsewhere.
        let b2 = "storage:\n  active: m\n  delete_local: true\n  providers:\n    m:\n      kind: s3\n      bucket: media\n      region: us-west-004\n      endpoint: https://s3.us-west-004.backblazeb2.com\n";
        let err = fx.error(b2);
        assert!(err.contains("provider `m` has no public URL"), "{err}");
    }

    const PROVIDER: &str = "storage:\n  active: PNAME\n  providers:\n    PNAME:\n      kind: s3\n      region: eu-west-1\n      bucket: media\n      access_key_id: AKIAEXAMPLE1234\n";

    fn with_provider(name: &str, extra: &str) -> String {
        format!("{}{extra}", PROVIDER.replace("PNAME", name))
    }

    #[test]
    fn secret_precedence() {
        let fx = Fixture::new();
        let creds = fx.dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        let file = fx.write("p.secret", "from-file\n", 0o600);
        std::fs::write(creds.join("p.secret_access_key"), "from-cred\n").unwrap();
        let env = |var: &str| match var {
            "CREDENTIALS_DIRECTORY" => Some(creds.clone().into_os_string()),
            "OFFLOADD_P_SECRET_ACCESS_KEY" => Some("from-env".into()),
            _ => None,
        };
        let secret = |extra: &str, env: &dyn Fn(&str) -> Option<OsString>| {
            let c = fx.load(&with_provider("p", extra)).unwrap().config;
            c.resolve_with("p", env)
                .map(|r| r.secret.expose().to_owned())
        };
        let file_key = format!("      secret_access_key_file: {}\n", file.display());
        assert_eq!(secret(&file_key, &env).unwrap(), "from-file");
        assert_eq!(
            secret("      secret_access_key: inline\n", &env).unwrap(),
            "from-cred"
        );
        let no_creds = |v: &str| {
            if v == "CREDENTIALS_DIRECTORY" {
                None
            } else {
                env(v)
            }
        };
        assert_eq!(
            secret("      secret_access_key: inline\n", &no_creds).unwrap(),
            "from-env"
        );
        assert_eq!(
            secret("      secret_access_key: inline\n", &no_env).unwrap(),
            "inline"
        );
        let err = secret("", &no_env).unwrap_err();
        assert_eq!(err.reason, "provider `p` is incomplete: no secret access key; set `secret_access_key_file`, the systemd credential `p.secret_access_key`, or OFFLOADD_P_SECRET_ACCESS_KEY; a systemd credential is seen only inside the service ($CREDENTIALS_DIRECTORY is not set here), so if the unit loads one, check it with `offloadd test-connection` while the service runs");
        // Inside the service, with no credential for this provider: the
        // hint would be wrong there.
        let empty_creds = fx.dir.path().join("no-creds");
        std::fs::create_dir(&empty_creds).unwrap();
        let service = |v: &str| -> Option<OsString> {
            (v == "CREDENTIALS_DIRECTORY").then(|| empty_creds.clone().into())
        };
        let err = secret("", &service).unwrap_err();
        assert_eq!(err.reason, "provider `p` is incomplete: no secret access key; set `secret_access_key_file`, the systemd credential `p.secret_access_key`, or OFFLOADD_P_SECRET_ACCESS_KEY");
        // Another reason to be incomplete gets no hint.
        let c = fx
            .load(
                &PROVIDER
                    .replace("PNAME", "p")
                    .replace("      bucket: media\n", ""),
            )
            .unwrap()
            .config;
        assert_eq!(
            c.resolve_with("p", &no_env).unwrap_err().reason,
            "provider `p` is incomplete: no bucket; set `bucket`"
        );
        let missing = format!(
            "      secret_access_key_file: {}/nope\n",
            fx.dir.path().display()
        );
        assert!(secret(&missing, &env)
            .unwrap_err()
            .reason
            .contains("does not exist"));
    }

    #[test]
    fn a_blank_secret_is_no_secret() {
        let fx = Fixture::new();
        let resolve = |extra: &str, env: &dyn Fn(&str) -> Option<OsString>| {
            let c = fx.load(&with_provider("b", extra)).unwrap().config;
            c.resolve_with("b", env)
                .map(|r| r.secret.expose().to_owned())
        };
        for inline in ["\"\"", "\"  \"", "\"\\t\""] {
            let err =
                resolve(&format!("      secret_access_key: {inline}\n"), &no_env).unwrap_err();
            assert_eq!(err.reason, "provider `b` is incomplete: `secret_access_key` is empty or holds only blanks; write the secret access key there, or remove it and use another source");
        }
        for (n, text) in ["", "\n", "   \n", " \t \r\n\n"].iter().enumerate() {
            let file = fx.write(&format!("blank{n}.secret"), text, 0o600);
            let extra = format!("      secret_access_key_file: {}\n", file.display());
            let err = resolve(&extra, &no_env).unwrap_err();
            assert_eq!(err.reason, format!("provider `b` is incomplete: the secret file {} is empty or holds only blanks; write the secret access key into it", file.display()));
        }
        // The same for a systemd credential.
        let creds = fx.dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("b.secret_access_key"), "  \n").unwrap();
        let in_service = |v: &str| -> Option<OsString> {
            (v == "CREDENTIALS_DIRECTORY").then(|| creds.clone().into())
        };
        let err = resolve("", &in_service).unwrap_err();
        assert!(
            err.reason
                .contains("b.secret_access_key is empty or holds only blanks"),
            "{}",
            err.reason
        );
        // A blank environment variable is not set, as an empty one.
        let blank_env = |v: &str| -> Option<OsString> {
            (v == "OFFLOADD_B_SECRET_ACCESS_KEY").then(|| " ".into())
        };
        assert_eq!(
            resolve("      secret_access_key: inline\n", &blank_env).unwrap(),
            "inline"
        );
        assert!(resolve("", &blank_env)
            .unwrap_err()
            .reason
            .contains("no secret access key"));
        let c = fx
            .load(&with_provider("b", "      secret_access_key: \"\"\n"))
            .unwrap()
            .config;
        let report = c.report_with(&no_env);
        assert!(report.contains("  secret:     unusable\n"), "{report}");
        assert!(report.contains("  state:      incomplete: provider `b` is incomplete: `secret_access_key` is empty"), "{report}");
        assert!(
            report.contains("uploads go to: local (provider `b` is incomplete: "),
            "{report}"
        );
    }

    #[test]
    fn provider_names_that_share_a_secret_variable_are_warned_about() {
        let fx = Fixture::new();
        let warnings = |yaml: &str| fx.load(yaml).unwrap().warnings;
        let shared = warnings("storage:\n  active: local\n  providers:\n    r2-media:\n      kind: gcs\n    r2_media:\n      kind: gcs\n");
        assert!(
            shared.iter().any(|w| w.contains("providers `r2-media` and `r2_media` both read their secret from OFFLOADD_R2_MEDIA_SECRET_ACCESS_KEY when it is set")),
            "{shared:?}"
        );
        // A secret file comes first: the variable is not read.
        let file = fx.write("s", "secret\n", 0o600);
        let apart = warnings(&format!("storage:\n  active: local\n  providers:\n    r2-media:\n      kind: gcs\n      secret_access_key_file: {}\n    r2_media:\n      kind: gcs\n", file.display()));
        assert!(!apart.iter().any(|w| w.contains("both read")), "{apart:?}");
    }

    #[test]
    fn a_provider_name_written_twice_is_an_error() {
        let fx = Fixture::new();
        let err = fx.error("storage:\n  active: a\n  providers:\n    a:\n      kind: gcs\n    b:\n      kind: gcs\n    a:\n      kind: s3\n");
        assert!(
            err.contains("line 10, column 5: `storage.providers.a` appears twice; keep one"),
            "{err}"
        );
        // A key written twice in a section is shown where it is written again.
        let err = fx.error(
            "storage:\n  providers:\n    a:\n      kind: gcs\n      bucket: x\n      bucket: y\n",
        );
        assert!(
            err.contains("line 8, column 7: `storage.providers.a.bucket` appears twice; keep one"),
            "{err}"
        );
        match fx.load("storage:\n  providers:\n    a: { kind: gcs }\n    \"a\": { kind: s3 }\n") {
            Err(ConfigError::Invalid { key, position, .. }) => {
                assert_eq!(key, "storage.providers.a");
                assert!(position.is_some());
            }
            other => panic!("{other:?}"),
        }
        // Names that differ still load, and a wrong section still names itself.
        let c = fx
            .load("storage:\n  providers:\n    a: { kind: gcs }\n    a2: { kind: s3 }\n")
            .unwrap()
            .config;
        assert_eq!(c.storage.providers.len(), 2);
        let err = fx.error("storage:\n  providers:\n    a: { kind: gcs }\n    b: 7\n");
        assert!(
            err.contains("`storage.providers.b` has the wrong type (a number)"),
            "{err}"
        );
        let err = fx.error("storage:\n  providers: [a]\n");
        assert!(err.contains("`storage.providers` has the wrong type (a list); write a block of `key: value` lines"), "{err}");
    }

    #[test]
    fn account_id_and_region_must_be_names() {
        let fx = Fixture::new();
        let r2 = |account: &str| {
            format!("storage:\n  providers:\n    r:\n      kind: r2\n      bucket: media\n      account_id: {account}\n")
        };
        let pasted = "https://0123abc.r2.cloudflarestorage.com";
        let err = fx.error(&r2(pasted));
        assert!(err.ends_with(": line 8, column 7: provider `r`: `account_id` holds a URL or host name; give only the account id, the 32 hex characters before .r2.cloudflarestorage.com"), "{err}");
        let long = "f".repeat(64);
        for bad in [
            "0123abc.r2.cloudflarestorage.com",
            "\"0123 abc\"",
            "-0123abc",
            "0123abc/",
            long.as_str(),
        ] {
            let err = fx.error(&r2(bad));
            assert!(err.contains("provider `r`: `account_id` "), "{bad}: {err}");
            assert!(
                !err.contains(bad.trim_matches('"')),
                "the value is not quoted back: {err}"
            );
        }
        let c = fx
            .load(&r2("0123456789abcdef0123456789abcdef"))
            .unwrap()
            .config;
        assert_eq!(c.public_url_base("r"), None);
        fx.load(&r2("\"\"")).unwrap();

        let with_region = |kind: &str, region: &str| {
            format!("storage:\n  providers:\n    p:\n      kind: {kind}\n      region: {region}\n")
        };
        let err = fx.error(&with_region("s3", "https://s3.eu-west-1.amazonaws.com"));
        assert!(err.ends_with(": line 7, column 7: provider `p`: `region` holds a URL or host name; give only the region name, such as eu-west-1 (and the host in `endpoint` if it is not the kind's own)"), "{err}");
        for (kind, bad) in [
            ("s3", "eu west 1"),
            ("wasabi", "us_east_1"),
            ("spaces", "fra1/"),
            ("minio", "\"a b\""),
        ] {
            let err = fx.error(&with_region(kind, bad));
            assert!(
                err.contains(
                    "provider `p`: `region` is not a region name; give one such as eu-west-1"
                ),
                "{kind} {bad}: {err}"
            );
        }
        for (kind, good) in [
            ("s3", "eu-west-1"),
            ("wasabi", "us-east-2"),
            ("spaces", "fra1"),
            ("gcs", "auto"),
            ("custom", "garage_1"),
            ("s3", "\"\""),
        ] {
            fx.load(&with_region(kind, good)).unwrap();
        }
        // A region only used to sign (its own endpoint) may hold `_`.
        fx.load("storage:\n  providers:\n    p:\n      kind: s3\n      endpoint: https://ceph.lan\n      region: zone_a\n").unwrap();
    }

    #[test]
    fn unreadable_secret_file_names_the_file_not_the_content() {
        let fx = Fixture::new();
        let dir = fx.dir.path().join("secret-dir");
        std::fs::create_dir(&dir).unwrap();
        let c = fx
            .load(&with_provider(
                "q",
                &format!("      secret_access_key_file: {}\n", dir.display()),
            ))
            .unwrap()
            .config;
        let reason = c.resolve_with("q", &no_env).unwrap_err().reason;
        assert!(
            reason.contains(&format!("cannot read the secret file {} (", dir.display())),
            "{reason}"
        );
        assert!(matches!(c.active(), Active::Local { reason: r } if r == reason));
    }

    #[test]
    fn real_environment_variable_is_used() {
        let fx = Fixture::new();
        std::env::set_var(
            "OFFLOADD_ENV_TEST_7F3_SECRET_ACCESS_KEY",
            "env-secret-value",
        );
        let c = fx.load(&with_provider("env.test-7f3", "")).unwrap().config;
        let Active::Provider(p) = c.active() else {
            panic!()
        };
        assert_eq!(p.secret.expose(), "env-secret-value");
        let report = c.report();
        assert!(
            report.contains("from environment OFFLOADD_ENV_TEST_7F3_SECRET_ACCESS_KEY"),
            "{report}"
        );
        assert!(!report.contains("env-secret-value"));
    }

    /// Where an incomplete section would upload is shown all the same, so
    /// that its report helps to complete it.
    #[test]
    fn report_shows_where_an_incomplete_provider_goes() {
        let fx = Fixture::new();
        let c = fx
            .load("storage:\n  active: m\n  providers:\n    m:\n      kind: minio\n      endpoint: https://minio.lan:9000\n      bucket: media\n")
            .unwrap()
            .config;
        let report = c.report_with(&no_env);
        for want in [
            "  endpoint:   https://minio.lan:9000",
            "  region:     us-east-1",
            "  addressing: path",
            "  public URL: https://minio.lan:9000/media",
            "  state:      incomplete:",
        ] {
            assert!(report.contains(want), "missing {want:?} in\n{report}");
        }
    }

    #[test]
    fn report_masks_secrets() {
        let fx = Fixture::new();
        let text = format!(
            "{}      secret_access_key: hunter2-inline\n    other:\n      kind: r2\n      enabled: false\n",
            PROVIDER.replace("PNAME", "rep")
        );
        let c = fx.load(&text).unwrap().config;
        let report = c.report_with(&no_env);
        assert!(!report.contains("hunter2"), "{report}");
        assert!(!format!("{c:?}").contains("hunter2"));
        for want in [
            "uploads go to: provider rep",
            "provider rep (active)",
            "  endpoint:   https://s3.eu-west-1.amazonaws.com",
            "  addressing: virtual-host",
            "  public URL: https://media.s3.eu-west-1.amazonaws.com",
            "  access key: ****1234",
            "  secret:     inline",
            "  state:      complete",
            "provider other\n",
            "  enabled:    no",
            "  public URL: -",
            "  secret:     missing",
            "  state:      incomplete: provider `other` is incomplete: no bucket; set `bucket`",
        ] {
            assert!(report.contains(want), "missing {want:?} in\n{report}");
        }
        assert!(!report.contains("AKIAEXAMPLE1234"));
        assert_eq!(
            c.public_url_base("rep").as_deref(),
            Some("https://media.s3.eu-west-1.amazonaws.com")
        );
        assert_eq!(c.public_url_base("other"), None);
    }

    #[test]
    fn a_records_url_needs_no_credentials_nor_ca() {
        let fx = Fixture::new();
        // The provider records were made with, after its key was removed and
        // its CA file went missing: its URLs stay known.
        let c = fx
            .load("storage:\n  active: local\n  providers:\n    old:\n      kind: minio\n      endpoint: https://minio.lan\n      bucket: media\n      public_url: https://cdn.example.com/\n      ca_file: /nonexistent/ca.pem\n")
            .unwrap()
            .config;
        assert_eq!(
            c.public_url_base("old").as_deref(),
            Some("https://cdn.example.com")
        );
        // Retired and kept only for its URLs: no account id, no bucket.
        let c = fx
            .load("storage:\n  active: local\n  providers:\n    old:\n      kind: r2\n      enabled: false\n      public_url: https://pub-1.r2.dev\n")
            .unwrap()
            .config;
        assert_eq!(
            c.public_url_base("old").as_deref(),
            Some("https://pub-1.r2.dev")
        );
    }

    #[test]
    fn inline_secret_warns_when_file_is_shared() {
        let fx = Fixture::new();
        let text = format!(
            "watch:\n  root: {}\n{}      secret_access_key: s3cr3t\n",
            fx.root().display(),
            with_provider("w", "")
        );
        let open = fx.write("open.yaml", &text, 0o644);
        let warnings = load(&open, RootCheck::MustExist).unwrap().warnings;
        assert_eq!(warnings, [format!("{} contains an inline secret and is readable by group or others; move the secret to secret_access_key_file or a systemd credential, or let only the service's user read the file (chown it to that user, then chmod 600)", open.display())]);
        let closed = fx.write("closed.yaml", &text, 0o600);
        assert!(load(&closed, RootCheck::MustExist)
            .unwrap()
            .warnings
            .is_empty());
        let no_secret = fx.write(
            "plain.yaml",
            &format!("watch:\n  root: {}\n", fx.root().display()),
            0o644,
        );
        assert!(load(&no_secret, RootCheck::MustExist)
            .unwrap()
            .warnings
            .is_empty());
    }

    #[test]
    fn secrets_never_appear_in_errors() {
        let fx = Fixture::new();
        for extra in [
            "      secret_access_key: [hunter2]\n",
            "      secret_access_key: hunter2\n      bogus: 1\n",
            "      secret_access_key: hunter2\n      secret_access_key: hunter3\n",
        ] {
            let err = fx.error(&with_provider("x", extra));
            assert!(!err.contains("hunter"), "{err}");
        }
    }

    #[test]
    fn disabled_and_incomplete_providers_run_local() {
        let fx = Fixture::new();
        let c = fx
            .load(&with_provider("d", "      enabled: false\n"))
            .unwrap()
            .config;
        assert_eq!(
            c.active(),
            Active::Local {
                reason: "provider `d` is disabled (`enabled: false`)".into()
            }
        );
        let c = fx.load("storage:\n  active: m\n  providers:\n    m:\n      kind: minio\n      bucket: b\n      access_key_id: a\n      secret_access_key: s\n").unwrap().config;
        assert_eq!(
            c.active(),
            Active::Local { reason: "provider `m` is incomplete: no endpoint; set `endpoint` (e.g. https://minio.example.com:9000)".into() }
        );
        assert!(c
            .resolve_provider("zz")
            .unwrap_err()
            .reason
            .contains("there is no provider `zz`"));
    }

    #[test]
    fn locate_walks_block_yaml() {
        let text = "# c\nwatch:\n  root: /x\n\nstorage:\n  providers:\n    \"r2-media\":\n      # note\n      kind: r2\n  active: x\nupload:\n  retry: { initial_backoff: 1s, max_backoff: 5m }\n";
        assert_eq!(locate(text, &["watch", "root"]), Some((3, 3)));
        assert_eq!(
            locate(text, &["storage", "providers", "r2-media", "kind"]),
            Some((9, 7))
        );
        assert_eq!(locate(text, &["storage", "active"]), Some((10, 3)));
        assert_eq!(
            locate(text, &["upload", "retry", "max_backoff"]),
            Some((12, 33))
        );
        assert_eq!(locate(text, &["watch", "settle"]), None);
        assert_eq!(locate_nearest(text, &["watch", "settle"]), Some((2, 1)));
    }
}
