//! Helpers shared by the hub's integration tests and benchmarks: the end-to-end harness lives in
//! the test-support crate (the fault suite uses it too); this module re-exports it.
#![allow(dead_code, unused_imports)]

pub mod flightctl;

pub use fleetlet_test_support::harness::*;
