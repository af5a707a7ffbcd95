#!/usr/bin/env bash
# Environment shim for running Flightctl *compose* applications with the real flightctl-agent on
# this machine's Podman 4.3.1 (Debian bookworm), which has no `podman compose` (added in 4.7).
# Not part of fleetlet: only what the local stack needs for the agentless end-to-end test.
#
# Prints a directory to put first in the flightctl-agent's PATH, holding:
#   podman          `podman compose ARGS` -> podman-compose ARGS; anything else -> the real podman,
#                   as a client of $FLEETLET_PODMAN_SOCKET when that is set (the stack's Podman
#                   service, so that containers and their network namespaces are created in the
#                   host's mount namespace, not in the agent's private one: agentless-agent.sh)
#   podman-compose  podman-compose from PyPI (pinned), in a venv cached per machine
#   skopeo          the agent requires `skopeo` in PATH for compose applications but uses it only
#                   to auto-detect OCI artifact types; not installed here, so this one fails loudly
#
# Idempotent; cached in $FLEETLET_CACHE_DIR/podman-compose-<version> (default /var/cache/fleetlet).
set -euo pipefail
VERSION=1.6.0
CACHE=${FLEETLET_CACHE_DIR:-/var/cache/fleetlet}/podman-compose-$VERSION
mkdir -p "$CACHE"
exec 9>"$CACHE.lock"
flock 9
real_podman=$(command -v podman || true)
[ -n "$real_podman" ] || { echo "podman is not installed" >&2; exit 1; }
if [ ! -f "$CACHE/.complete" ]; then
  rm -rf "$CACHE/venv"
  python3 -m venv "$CACHE/venv" >&2
  "$CACHE/venv/bin/pip" install -q --disable-pip-version-check "podman-compose==$VERSION" >&2
  touch "$CACHE/.complete"
fi
# The wrappers are rewritten every time (cheap), so a change here needs no cache bump.
mkdir -p "$CACHE/shim"
cat >"$CACHE/shim/podman.tmp" <<SHIM
#!/bin/sh
# fleetlet test shim for Podman < 4.7: see tests/env/flightctl/agentless-shim.sh
if [ "\$1" = compose ]; then
  shift
  exec "$CACHE/venv/bin/podman-compose" "\$@"
fi
if [ -n "\$FLEETLET_PODMAN_SOCKET" ]; then
  exec "$real_podman" --url "unix://\$FLEETLET_PODMAN_SOCKET" "\$@"
fi
exec "$real_podman" "\$@"
SHIM
cat >"$CACHE/shim/skopeo.tmp" <<'SHIM'
#!/bin/sh
# fleetlet test shim: see tests/env/flightctl/agentless-shim.sh
echo "skopeo is not installed on this machine (fleetlet test shim): $*" >&2
exit 127
SHIM
chmod 0755 "$CACHE/shim/podman.tmp" "$CACHE/shim/skopeo.tmp"
mv -f "$CACHE/shim/podman.tmp" "$CACHE/shim/podman"
mv -f "$CACHE/shim/skopeo.tmp" "$CACHE/shim/skopeo"
ln -sfn "$CACHE/venv/bin/podman-compose" "$CACHE/shim/podman-compose"
echo "$CACHE/shim"
