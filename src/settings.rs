//! The runtime settings, built once from a parsed [`Config`] (the file's
//! shape lives in `config`; what the daemon does with it lives here): the
//! pipeline's [`Plan`], the include/exclude [`Rules`], the upload resources
//! and what `/r/` and `status` need. A reload builds a new [`Settings`] and
//! swaps it in whole.

use crate::config::{Active, Config};
use crate::pipeline::backoff::Backoff;
use crate::pipeline::budget::Budget;
use crate::pipeline::filter::Rules;
use crate::pipeline::plan::{Deletion, Options, Plan, Target};
use crate::pipeline::queue::StateError;
use crate::pipeline::timetable::{Limit, Timetable};
use crate::pipeline::upload;
use crate::remote::client::Client;
use crate::statedir;
use std::collections::BTreeMap;
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
    bandwidth: BandwidthRule,
    /// The managed-since mark this first run with a provider starts, written
    /// by [`Settings::commit_mark`] once the settings are applied.
    unwritten_mark: Option<i128>,
    /// The mark these settings go by, read or started; `None` in local mode
    /// before any run with a provider.
    mark: Option<i128>,
}

/// Where the bandwidth limit comes from.
enum BandwidthRule {
    /// `upload.bandwidth_limit` (0: unlimited).
    Flat(u64),
    /// `upload.bandwidth_schedule`.
    Schedule(Timetable),
}

/// The bandwidth limit in force, for the pacer, `status` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bandwidth {
    pub limit: Limit,
    /// From the weekly schedule (else the flat limit).
    pub scheduled: bool,
    /// When the schedule changes the limit next.
    pub next_change: Option<std::time::Duration>,
}

impl std::fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scheduled {
            true => write!(f, "{} (bandwidth_schedule)", self.limit),
            false => write!(f, "{}", self.limit),
        }
    }
}

/// The settings in force, shared by the daemon's tasks.
pub type Shared = Arc<RwLock<Arc<Settings>>>;

pub fn current(shared: &Shared) -> Arc<Settings> {
    shared.read().expect("settings lock").clone()
}

impl Settings {
    /// Builds the settings; writes nothing. On the first run with an active
    /// provider the managed-since mark is now, written by
    /// [`Settings::commit_mark`]. A reload passes the mark in force as
    /// `earlier`: a mark file that cannot be read now (an I/O error, a
    /// permission) keeps it, instead of starting a new one at now (which
    /// would leave files written since the old one to `backfill`). Errors
    /// are one sentence for the operator.
    pub fn build(config: Config, earlier: Option<i128>) -> Result<Settings, String> {
        let target = match config.active() {
            Active::Provider(p) => match Client::new(&p) {
                Ok(c) => Target::Provider(Arc::new(c)),
                Err(e) => Target::Local {
                    reason: e.to_string(),
                },
            },
            Active::Local { reason } => Target::Local { reason },
        };
        // Retired providers (`enabled: false`) too: records still name them,
        // so a rebuild lists them, and an upload begun there is aborted there.
        let others: BTreeMap<String, Arc<dyn crate::remote::store::Store>> = config
            .storage
            .providers
            .iter()
            .filter(|(name, _)| name.as_str() != target.name())
            .filter_map(|(name, p)| {
                let client = config
                    .resolve_provider(name)
                    .map_err(|e| e.reason)
                    .and_then(|r| Client::new(&r).map_err(|e| e.to_string()));
                match client {
                    Ok(c) => Some((name.clone(), Arc::new(c) as Arc<dyn crate::remote::store::Store>)),
                    Err(why) if p.enabled => {
                        tracing::warn!(provider = %name, "provider `{name}` is enabled but cannot be used ({why}): uploads interrupted on it are left to its bucket's lifecycle rules, and a rebuild cannot list it");
                        None
                    }
                    // A retired section kept for its URLs often has no secret.
                    Err(why) => {
                        tracing::info!(provider = %name, "retired provider `{name}` cannot be reached ({why}): a rebuild cannot list it");
                        None
                    }
                }
            })
            .collect();
        if let Target::Provider(active) = &target {
            let active = active.provider();
            for other in others.values() {
                let other = other.provider();
                if active.shares_keys_with(other) {
                    let other_is = format!("provider `{}`", other.name);
                    tracing::warn!("{}", active.shared_keys_warning(other, &other_is));
                }
            }
        }
        let found = match statedir::mark::load(&config.state_dir) {
            Ok(found) => found,
            Err(why) if earlier.is_some() => {
                tracing::warn!("{why}; the managed-since mark read before stays in force");
                earlier
            }
            Err(_) => None,
        };
        let (mark_ns, unwritten_mark) = match (&target, found) {
            (_, Some(mark)) => (mark, None),
            (Target::Provider(_), None) => {
                let now = statedir::mark::now_ns();
                (now, Some(now))
            }
            (Target::Local { .. }, None) => (i128::MAX, None),
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
                // A single PUT holds its whole file, so no file larger than
                // memory_limit goes as one (guarantee 9); config validation
                // keeps part_size within memory_limit.
                multipart_threshold: up
                    .multipart_threshold
                    .min(upload::MAX_PART_SIZE)
                    .min(up.memory_limit),
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
        let schedule = Timetable::parse(&up.bandwidth_schedule).map_err(|e| e.to_string())?;
        let bandwidth = if schedule.is_empty() {
            BandwidthRule::Flat(up.bandwidth_limit)
        } else {
            BandwidthRule::Schedule(schedule)
        };
        Ok(Settings {
            bandwidth,
            plan: Arc::new(Plan {
                options,
                target,
                others,
            }),
            rules,
            local_reason,
            predictable,
            config,
            unwritten_mark,
            mark: found.or(unwritten_mark),
        })
    }

    /// Writes the managed-since mark of a first run with a provider, once
    /// nothing can refuse these settings any more: a refused reload or a
    /// failed start must not set it, or files written in local mode after it
    /// would later count as new instead of being left to `backfill`.
    pub fn commit_mark(&self) -> Result<(), StateError> {
        let Some(ns) = self.unwritten_mark else {
            return Ok(());
        };
        let dir = &self.config.state_dir;
        statedir::mark::set_once(dir, ns).map_err(|e| {
            StateError::of_io(dir, &e, format!("cannot write the managed-since mark: {e}"))
        })
    }

    /// The managed-since mark in force, if there is one (for a reload).
    pub fn mark(&self) -> Option<i128> {
        self.mark
    }

    /// The active provider's name, or `local`.
    pub fn active(&self) -> &str {
        self.plan.target.name()
    }

    /// The memory budget for buffered file bytes.
    pub fn budget(&self) -> Budget {
        Budget::new(self.config.upload.memory_limit)
    }

    /// The bandwidth limit in force now.
    pub fn bandwidth_now(&self) -> Bandwidth {
        match &self.bandwidth {
            BandwidthRule::Flat(bps) => Bandwidth {
                limit: Limit::from_bytes_per_sec(*bps),
                scheduled: false,
                next_change: None,
            },
            BandwidthRule::Schedule(t) => {
                let now = jiff::ZonedDateTime::now();
                Bandwidth {
                    limit: t.limit_at(&now),
                    scheduled: true,
                    next_change: t.next_change_after(&now).map(|z| {
                        let secs = z.timestamp().as_second() - now.timestamp().as_second();
                        std::time::Duration::from_secs(secs.max(0) as u64)
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload that cannot read the mark file keeps the mark in force; a
    /// start has none to keep.
    #[test]
    fn an_unreadable_mark_keeps_the_one_read_before() {
        let dir = tempfile::tempdir().unwrap();
        let config = || crate::config::in_temp_dir(dir.path());
        // A directory where the mark file should be: reading it fails.
        std::fs::create_dir_all(config().state_dir.join("managed-since")).unwrap();
        let reloaded = Settings::build(config(), Some(123)).unwrap();
        assert_eq!(reloaded.plan.options.mark_ns, 123);
        assert_eq!(reloaded.mark(), Some(123));
        let started = Settings::build(config(), None).unwrap();
        assert_eq!(started.mark(), None);
    }
}
