//! Admission as the kubelet does it: the rule shared with the agent.

pub use fleetlet_resources::admission::*;
