#!/usr/bin/env python3
"""Prints the JSON of one of the demo's Flightctl Fleets (used by tests/demo/demo.sh), from the
environment: FLEET, FLEET_LABEL (the selector's key), DEMO_LABEL and DEMO_NAME (the Fleet's own
label), and with WITH_CONFIG set, the template that configures fleetlet-agent on a device run by
the real flightctl-agent: FA_ROOT (its test root), HUB_CA (file), LINK_PORT, PODMAN_SOCKET."""
import json, os
e = os.environ
r = e["FA_ROOT"]
spec = {}
if e["WITH_CONFIG"]:
    agent_toml = f"""device_name = "DEVICE_NAME"
state_dir = "{r}/var/lib/fleetlet"
podman_socket = "{e["PODMAN_SOCKET"]}"
resync_secs = 5
node_ip = "127.0.0.1"

[hub]
endpoint = "https://127.0.0.1:{e["LINK_PORT"]}"
ca_file = "{r}/etc/fleetlet/hub-ca.crt"
cert_file = "{r}/etc/fleetlet/certs/device.crt"
key_file = "{r}/etc/fleetlet/certs/device.key"
reconnect_max_backoff_secs = 2

[policy]
allow_privileged = false
allow_host_network = false
""".replace("DEVICE_NAME", "{{ .metadata.name }}")
    dropin = """- name: fleetlet
  provisioner:
    type: csr
    config:
      signer: flightctl.io/device-svc-client
      common-name: "fleetlet-{{ .metadata.name }}"
      usages: ["clientAuth", "CA:false"]
  storage:
    type: filesystem
    config:
      cert-path: /etc/fleetlet/certs/device.crt
      key-path: /etc/fleetlet/certs/device.key
"""
    hooks = f"""- if:
  - path: /etc/flightctl/certs.d/
    op: [created, updated]
  run: /bin/sh -c 'kill -HUP ${{FLIGHTCTL_AGENT_PID}}'
- if:
  - path: /etc/fleetlet/agent.toml
    op: [updated]
  run: /bin/sh -c 'kill -TERM $(cat {r}/run/fleetlet-agent.pid)'
"""
    files = [("/etc/fleetlet/agent.toml", agent_toml),
             ("/etc/fleetlet/hub-ca.crt", open(e["HUB_CA"]).read()),
             ("/etc/flightctl/certs.d/fleetlet.yaml", dropin),
             ("/etc/flightctl/hooks.d/afterupdating/fleetlet.yaml", hooks)]
    spec = {"config": [{"name": "fleetlet-agent",
                        "inline": [{"path": p, "mode": 0o644, "content": c} for p, c in files]}]}
print(json.dumps({"apiVersion": "flightctl.io/v1beta1", "kind": "Fleet",
    "metadata": {"name": e["FLEET"], "labels": {e["DEMO_LABEL"]: e["DEMO_NAME"]}},
    "spec": {"selector": {"matchLabels": {e["FLEET_LABEL"]: e["FLEET"]}}, "template": {"spec": spec}}}))
