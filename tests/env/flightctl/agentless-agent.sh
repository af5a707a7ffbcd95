#!/usr/bin/env bash
# Runs the real flightctl-agent for agentless (compose) applications on this machine, without
# touching the host's /etc:  agentless-agent.sh DIR AGENT_BINARY SHIM_DIR
#
# DIR/root is the agent's FLIGHTCTL_TEST_ROOT_DIR (its config, identity and the files it writes).
# In test-root mode v1.2.0 still runs `podman compose` in the unrooted /etc/compose/manifests/<app>,
# so the agent runs in a private mount namespace where /etc is an overlay (lower: the host's /etc,
# upper and work: DIR/etc-upper, DIR/etc-work) and /etc/compose is bound to DIR/root/etc/compose.
# SHIM_DIR (agentless-shim.sh) comes first in PATH; with FLEETLET_PODMAN_SOCKET set, its podman
# is a client of the stack's Podman service, which creates the containers and their network
# namespaces in the host's mount namespace (a network namespace mounted below /run/netns inside
# this private namespace would be invisible to every other Podman on the host and break their
# `podman ps`).
set -euo pipefail
dir=$(cd "$1" && pwd)
agent=$2
shim=$3
mkdir -p "$dir/etc-upper" "$dir/etc-work" "$dir/root/etc/compose"
exec unshare --mount --propagation private -- /bin/sh -c '
  set -e
  mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1/etc-upper,workdir=$1/etc-work" /etc
  mkdir -p /etc/compose
  mount --bind "$1/root/etc/compose" /etc/compose
  PATH="$3:$PATH" FLIGHTCTL_TEST_ROOT_DIR="$1/root" exec "$2" --config /etc/flightctl/config.yaml
' agentless-agent "$dir" "$agent" "$shim"
