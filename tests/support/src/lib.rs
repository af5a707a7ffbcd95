//! Test support for fleetlet's integration tests: access to the real local stack
//! (Kubernetes control plane, Podman, journald) brought up by `make env-up`.
#![forbid(unsafe_code)]
