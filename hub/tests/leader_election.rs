//! Leader election on a real coordination Lease: a second replica waits while the first renews
//! and takes over once the first stops.

use std::time::Duration;

use fleetlet_hub::leader::LeaderElector;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::DeleteParams;
use tokio_util::sync::CancellationToken;

mod common;
use common::{client, unique};

#[tokio::test]
async fn a_standby_waits_while_the_leader_renews_and_takes_over_when_it_stops() {
    let client = client().await;
    let name = unique("it-leader");
    let duration = Duration::from_secs(4);
    let retry = Duration::from_millis(500);
    let mut a = LeaderElector::new(
        client.clone(),
        "default",
        &name,
        "replica-a",
        duration,
        retry,
    );
    let mut b = LeaderElector::new(
        client.clone(),
        "default",
        &name,
        "replica-b",
        duration,
        retry,
    );
    assert!(
        a.try_acquire_or_renew().await.expect("a"),
        "first replica takes the free lease"
    );

    // A keeps renewing in the background; B must not get in for several lease durations.
    let stop_a = CancellationToken::new();
    let a_task = {
        let stop = stop_a.clone();
        tokio::spawn(async move {
            a.keep(&stop).await;
            a
        })
    };
    for _ in 0..20 {
        assert!(
            !b.try_acquire_or_renew().await.expect("b"),
            "standby must wait while the leader renews"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A dies (stops renewing): B takes over once A's record has been stale for a lease duration.
    stop_a.cancel();
    let mut a = a_task.await.expect("a task");
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        if b.try_acquire_or_renew().await.unwrap_or(false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "standby did not take over within 30 s"
        );
        tokio::time::sleep(retry).await;
    }
    println!(
        "takeover after the leader stopped: {:?} (lease duration {duration:?})",
        started.elapsed()
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease = leases.get(&name).await.expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    // The old leader sees it lost.
    assert!(
        !a.try_acquire_or_renew().await.expect("a"),
        "the old leader must not take it back"
    );
    let _ = leases.delete(&name, &DeleteParams::default()).await;
}
