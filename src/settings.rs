//! The runtime settings, built once from a parsed [`Config`] (the file's
//! shape lives in `config`; what the daemon does with it lives here): the
//! pipeline's [`Plan`], the include/exclude [`Rules`], the upload resources
//! and what `/r/` and `status` need. A reload builds a new [`Settings`] and
//! swaps it in whole.

use crate::config::{Active, Config};
use crate::pipeline::backoff::Backoff;
use crate::pipeline::budget::{Budget, Pacer};
use crate::pipeline::filter::Rules;
use crate::pipeline::plan::{Deletion, Options, Plan, Target};
use crate::pipeline::upload;
use crate::remote::client::Client;
use crate::statedir;
use std::sync::{Arc, RwLock};

/// See the module docs.
pub struct Settings {
    pub config: Config,
    pub plan: Arc<Plan>,
    pub rules: Rules,
    /// Why nothing is offloaded, in local mode.
    pub local_reason: Option<String>,
    /// Public URL base and prefix of the active provider, for `/r/` of paths
    /// without a record.
    pub predictable: Option<(String, String)>,
}

/// The settings in force, shared by the daemon's tasks.
pub type Shared = Arc<RwLock<Arc<Settings>>>;

pub fn current(shared: &Shared) -> Arc<Settings> {
    shared.read().expect("settings lock").clone()
}

impl Settings {
    /// Builds the settings; sets the managed-since mark on the first run with
    /// an active provider. Errors are one sentence for the operator.
    pub fn build(config: Config) -> Result<Settings, String> {
        let target = match config.active() {
            Active::Provider(p) => match Client::new(&p) {
                Ok(c) => Target::Provider(Arc::new(c)),
                Err(e) => Target::Local {
                    reason: e.to_string(),
                },
            },
            Active::Local { reason } => Target::Local { reason },
        };
        let dir = &config.state_dir;
        let mark_ns = match &target {
            Target::Provider(_) => statedir::mark::ensure(dir).map_err(|e| {
                format!(
                    "cannot write the managed-since mark in {}: {e}; make state_dir writable",
                    dir.display()
                )
            })?,
            Target::Local { .. } => statedir::mark::read(dir).unwrap_or(i128::MAX),
        };
        let w = &config.watch;
        let rules =
            Rules::new(&w.root, &w.include, &w.exclude, w.settle).map_err(|e| e.to_string())?;
        let up = &config.upload;
        let options = Options {
            root: w.root.clone(),
            settle: w.settle,
            deletion: if config.storage.delete_local {
                Deletion::After(config.storage.delete_after)
            } else {
                Deletion::Keep
            },
            workers: up.workers.max(1),
            upload: upload::Settings {
                multipart_threshold: up.multipart_threshold.min(upload::MAX_PART_SIZE),
                part_size: up.part_size,
                part_concurrency: up.part_concurrency,
            },
            retry: Backoff::new(up.retry.initial_backoff, up.retry.max_backoff),
            mark_ns,
            object_rules: Arc::new(
                crate::remote::object_options::Rules::new(&config.rules)
                    .map_err(|e| e.to_string())?,
            ),
        };
        let (local_reason, predictable) = match &target {
            Target::Provider(s) => {
                let p = s.provider();
                (
                    None,
                    p.public_url_base
                        .clone()
                        .map(|base| (base, p.prefix.clone())),
                )
            }
            Target::Local { reason } => (Some(reason.clone()), None),
        };
        Ok(Settings {
            plan: Arc::new(Plan { options, target }),
            rules,
            local_reason,
            predictable,
            config,
        })
    }

    /// The active provider's name, or `local`.
    pub fn active(&self) -> &str {
        self.plan.target.name()
    }

    pub fn resources(&self) -> (Budget, Pacer) {
        let up = &self.config.upload;
        (Budget::new(up.memory_limit), Pacer::new(up.bandwidth_limit))
    }
}
