//! What the pipeline runs with: the [`Plan`], built once from the
//! configuration (see `crate::settings`) and replaced as a whole by a reload.
//! Workers read the plan in force at the instant they act, so a reload that
//! turns deletion off stops deletes that are already pending.

use crate::pipeline::backoff::Backoff;
use crate::pipeline::upload;
use crate::remote::object_options::Rules as ObjectRules;
use crate::remote::store::Store;
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
}

impl Plan {
    /// Whether a local copy may be deleted now, and how old it must be.
    pub fn deletion(&self) -> Deletion {
        match self.target {
            Target::Local { .. } => Deletion::Keep,
            Target::Provider(_) => self.options.deletion,
        }
    }
}
