//! Kubernetes resource quantities: the implementation shared with the agent.

pub use fleetlet_resources::quantity::*;
