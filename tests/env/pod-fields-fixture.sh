#!/usr/bin/env bash
# Regenerates agent/tests/fixtures/k8s-pod-fields.json: the property names of every core/v1 type a
# pod author sets (PodSpec, Container, Volume and what they nest), read from the OpenAPI v3
# document of the local stack's kube-apiserver (`make env-up`). The agent's unit test
# `pod::field_table` checks that docs/agent.md has a row for each of them; the integration test
# `agent/tests/pod_fields_fixture.rs` checks the fixture against the running API server.
#
# Usage: tests/env/pod-fields-fixture.sh [FIXTURE]   (after a Kubernetes upgrade of the stack)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/agent/tests/fixtures/k8s-pod-fields.json}
env_file=${FLEETLET_ENV_FILE:-$root/target/dev/env}
[ -f "$env_file" ] || { echo "local stack not up ($env_file missing): run make env-up" >&2; exit 1; }
# shellcheck disable=SC1090
source "$env_file"
command -v jq >/dev/null || { echo "jq is missing (apt-get install jq)" >&2; exit 1; }

# The types, in the order docs/agent.md lists them. Keep in step with POD_FIELD_TYPES in
# agent/tests/pod_fields_fixture.rs.
types=(
  PodSpec PodSecurityContext SecurityContext Capabilities SeccompProfile AppArmorProfile
  SELinuxOptions Sysctl LocalObjectReference
  Container EphemeralContainer VolumeMount ContainerPort EnvVar EnvVarSource ConfigMapKeySelector SecretKeySelector
  ObjectFieldSelector ResourceFieldSelector FileKeySelector EnvFromSource ConfigMapEnvSource
  SecretEnvSource ResourceRequirements Probe ExecAction HTTPGetAction HTTPHeader TCPSocketAction
  GRPCAction Lifecycle LifecycleHandler SleepAction
  Volume ConfigMapVolumeSource SecretVolumeSource KeyToPath EmptyDirVolumeSource
  HostPathVolumeSource DownwardAPIVolumeSource DownwardAPIVolumeFile ProjectedVolumeSource
  VolumeProjection ConfigMapProjection SecretProjection DownwardAPIProjection ImageVolumeSource
)

version=$(kubectl version -o json | jq -r .serverVersion.gitVersion)
kubectl get --raw /openapi/v3/api/v1 |
  jq --arg version "$version" --args '
    .components.schemas as $s
    | {kubernetesVersion: $version,
       source: "kube-apiserver /openapi/v3/api/v1, components.schemas[io.k8s.api.core.v1.<type>].properties",
       types: ([$ARGS.positional[] | {key: ., value: ($s["io.k8s.api.core.v1." + .].properties // error("no schema for " + .) | keys)}] | from_entries)}
  ' "${types[@]}" > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($version, $(jq '[.types[] | length] | add' "$out") fields of ${#types[@]} types)"
