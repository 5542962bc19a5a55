//! What the pipeline runs with: the [`Plan`], built once from the
//! configuration (see `crate::settings`) and replaced as a whole by a reload.
//! Workers read the plan in force at the instant they act, so a reload that
//! turns deletion off stops deletes that are already pending.

use crate::pipeline::backoff::Backoff;
use crate::pipeline::upload;
use crate::remote::object_options::Rules as ObjectRules;
use crate::remote::store::Store;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What happens to local copies after a verified upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// They stay (`delete_local: false`).
    Keep,
    /// They are deleted once at least this old (`delete_after`).
    After(Duration),
}

/// Where uploads go: a provider, or nowhere (local mode) with the reason.
#[derive(Clone)]
pub enum Target {
    Local { reason: String },
    Provider(Arc<dyn Store>),
}

impl Target {
    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        match self {
            Target::Provider(s) => Some(s),
            Target::Local { .. } => None,
        }
    }

    /// The provider's name, or `local`.
    pub fn name(&self) -> &str {
        match self {
            Target::Provider(s) => &s.provider().name,
            Target::Local { .. } => "local",
        }
    }
}

/// Settings the pipeline reads when an item starts (and, for deletion, at the
/// instant of a delete).
#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    pub settle: Duration,
    pub deletion: Deletion,
    pub workers: usize,
    pub upload: upload::Settings,
    pub retry: Backoff,
    /// The managed-since mark (ns); files changed before it are left alone.
    pub mark_ns: i128,
    /// Per-pattern object options (`rules:`).
    pub object_rules: Arc<ObjectRules>,
}

/// The options and the target together.
#[derive(Clone)]
pub struct Plan {
    pub options: Options,
    pub target: Target,
    /// The other providers that can be reached (retired ones included), by
    /// name: where an upload started before a switch is aborted, and what a
    /// rebuild lists. Nothing is uploaded to them.
    pub others: BTreeMap<String, Arc<dyn Store>>,
}

impl Plan {
    /// The store of provider `name`: the target or one of the others.
    pub fn store_named(&self, name: &str) -> Option<&dyn Store> {
        match &self.target {
            Target::Provider(s) if s.provider().name == name => Some(s.as_ref()),
            _ => self.others.get(name).map(|s| s.as_ref()),
        }
    }

    /// Whether a local copy may be deleted now, and how old it must be.
    pub fn deletion(&self) -> Deletion {
        match self.target {
            Target::Local { .. } => Deletion::Keep,
            Target::Provider(_) => self.options.deletion,
        }
    }
}
