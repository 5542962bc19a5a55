//! The pipeline, in the order a file goes through it:
//!
//! ```text
//! detect ──candidates──▶ schedule ──▶ worker: upload ─▶ verify ─▶ record ─▶ delete
//!   (watch root)          (admit into queue, lanes,       (each step checks its rule
//!                          provider health, pauses)        at the moment it acts)
//! ```
//!
//! - [`detect`]: inotify events and scans → finished candidates ([`filter`]
//!   says which paths are eligible).
//! - [`queue`]: the durable queue and the location records; the only code
//!   that reads or writes them, one method per transition.
//! - [`schedule`]: admits candidates, dispatches due items to workers, owns
//!   the provider's [`health`] and the pause of the whole pipeline.
//! - [`worker`]: one item along [`upload`] → [`verify`] → [`record`] →
//!   [`delete`], reading the [`plan`] in force.
//! - Rules it rests on: [`finished`] (the finished-file rule, checked again at
//!   every attempt), [`root`] (the watch root is present and the same),
//!   [`localfs`] (how a failure of the local file system counts).
//! - Around it: [`rebuild`] (records from the bucket after state loss),
//!   [`budget`] (memory and bandwidth), [`timetable`] (the weekly bandwidth
//!   schedule), [`backoff`], [`live`] (figures for `status`).
//!
//! The rules that hold on every path: nothing leaves the queue unless its file
//! is uploaded, verified and durably recorded, or proven gone while the root
//! was present; a local copy is deleted only with a
//! [`queue::DeletePermit`] (a durable record of this very file), with deletion
//! on in the running plan, the root present and no writer holding the file,
//! and only that inode goes; an upload attempt starts only when the
//! finished-file rule holds at that moment.

pub mod backoff;
pub mod budget;
pub mod delete;
pub mod detect;
pub mod filter;
pub mod finished;
pub mod health;
pub mod live;
pub mod localfs;
pub mod plan;
pub mod queue;
pub mod rebuild;
pub mod record;
pub mod root;
pub mod schedule;
pub mod timetable;
pub mod upload;
pub mod verify;
pub mod worker;
