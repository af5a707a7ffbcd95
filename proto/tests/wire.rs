//! The contract's wire behaviour: messages round-trip, and garbage is an error, not a panic.

use fleetlet_proto::v1::{
    AgentMessage, DesiredSnapshot, Hello, HubMessage, PodBundle, SecretData, agent_message,
    hub_message,
};
use prost::Message;

#[test]
fn snapshot_round_trips_with_its_bundles() {
    let snapshot = DesiredSnapshot {
        generation: 42,
        pods: vec![PodBundle {
            pod_json: br#"{"metadata":{"uid":"u1"}}"#.to_vec().into(),
            config_maps: vec![],
            secrets: vec![SecretData {
                name: "db".into(),
                data: [("password".to_string(), b"s3cret".to_vec().into())].into(),
                r#type: "Opaque".into(),
            }],
            service_env: [(
                "KUBERNETES_SERVICE_HOST".to_string(),
                "10.0.0.1".to_string(),
            )]
            .into(),
        }],
        termination_grace_seconds: [("u0".to_string(), 3)].into(),
    };
    let message = HubMessage {
        kind: Some(hub_message::Kind::Snapshot(snapshot.clone())),
    };
    let decoded = HubMessage::decode(message.encode_to_vec().as_slice()).unwrap();
    assert_eq!(
        decoded.kind,
        Some(hub_message::Kind::Snapshot(snapshot)),
        "snapshot must survive encode/decode unchanged"
    );
}

#[test]
fn hello_carries_the_held_generation() {
    let message = AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            device_name: "dev-1".into(),
            held_generation: 7,
            ..Default::default()
        })),
    };
    let decoded = AgentMessage::decode(message.encode_to_vec().as_slice()).unwrap();
    match decoded.kind {
        Some(agent_message::Kind::Hello(hello)) => {
            assert_eq!(hello.device_name, "dev-1");
            assert_eq!(hello.held_generation, 7);
        }
        other => panic!("expected hello, got {other:?}"),
    }
}

#[test]
fn malformed_bytes_are_a_decode_error() {
    // A field header announcing a length-delimited field far longer than the buffer.
    let garbage = [0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01];
    assert!(AgentMessage::decode(garbage.as_slice()).is_err());
    assert!(HubMessage::decode(&[0xff_u8; 3][..]).is_err());
}
