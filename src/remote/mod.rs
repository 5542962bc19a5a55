//! Talking to buckets: provider presets ([`provider`]), the seam the
//! pipeline uses ([`store::Store`]), its rust-s3 implementation ([`client`]),
//! what can go wrong ([`error`]) and through which proxy ([`proxy`]), the
//! headers each object gets ([`object_options`]), and `test-connection`
//! ([`connection_test`]).

pub mod client;
pub mod connection_test;
pub mod error;
pub mod object_options;
pub mod provider;
pub mod proxy;
pub mod store;

#[cfg(test)]
pub mod fake;
