//! Resource arithmetic both halves of fleetlet must agree on to the unit: Kubernetes quantities
//! parsed exactly (integers, no floating point) and the kubelet's admission rule (a pod's
//! effective requests, `OutOfcpu`/`OutOfmemory`/`OutOfpods` with the kubelet's wording). The hub
//! admits pods against a device's allocatable before relaying them and the agent admits them
//! again on the device; with one implementation they cannot disagree.
#![forbid(unsafe_code)]

pub mod admission;
pub mod quantity;
