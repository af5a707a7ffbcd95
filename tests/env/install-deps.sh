#!/usr/bin/env bash
# Installs what the local stack needs on a fresh machine of this kind (Debian bookworm, root):
# Podman with its recommends (catatonit for pod infra containers) and runc (crun fails on cgroup
# v1 hybrid), busybox-static for the test image, systemd for a standalone journald, iproute2
# for network namespaces, iptables for half-open partitions (fault suite), redis-server for
# Flightctl, docker-registry (distribution 2.8) and apache2-utils (htpasswd) for the private
# registry of the pull-secret tests, jq for tests/env/pod-fields-fixture.sh, and the tools the
# scripts use. Checks Go (>= 1.26, for the control plane build). Does nothing when all is there.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

apt_packages=(podman runc busybox-static iproute2 iptables systemd curl file openssl util-linux procps ca-certificates redis-server docker-registry apache2-utils jq)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}; install them as root"
  log "installing ${missing[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

if ! command -v go >/dev/null; then
  die "Go >= 1.26 is needed to build the control plane (put /usr/local/go/bin on PATH)"
fi
