# Podman REST service and the local test image (sourced by up.sh / down.sh).
PODMAN_DIR=$FLEETLET_DEV_DIR/podman
PODMAN_SOCKET=$PODMAN_DIR/podman.sock
PODMAN_CONF=$PODMAN_DIR/containers.conf
TEST_IMAGE=${FLEETLET_TEST_IMAGE:-localhost/fleetlet-test/busybox:1}

podman_ping() { [ "$(curl -sf --max-time 2 --unix-socket "$PODMAN_SOCKET" http://d/_ping)" = OK ]; }

up_podman() {
  command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc)"
  mkdir -p "$PODMAN_DIR"
  chmod 0700 "$PODMAN_DIR"
  # The service reads the configuration from a copy in the dev dir, so a worktree may go away.
  if ! cmp -s "$ENV_SRC_DIR/containers.conf" "$PODMAN_CONF"; then
    install -m 0644 "$ENV_SRC_DIR/containers.conf" "$PODMAN_CONF"
    if is_running podman; then
      log "containers.conf changed: restarting the Podman service"
      stop_daemon podman
    fi
  fi
  export CONTAINERS_CONF=$PODMAN_CONF
  if is_running podman && podman_ping; then
    log "Podman service already running on $PODMAN_SOCKET"
  else
    stop_daemon podman
    rm -f "$PODMAN_SOCKET"
    start_daemon podman podman system service --time=0 "unix://$PODMAN_SOCKET"
    wait_until 30 "Podman service" podman_ping || { tail_log podman; die "Podman service did not start"; }
  fi
  sweep_stale_hostports
  build_test_image
}

# Netavark's hostPort DNAT matches the port on every local address, so a rule left behind by a
# container that is gone (a test killed mid-run, a teardown Podman skipped) captures whatever
# later listens on that port: a hub bound to port 0 that draws it answers "no route to host".
# Rules name their container (`dnat name: NET id: ID`); those whose container no longer
# exists are removed, with their per-network chain once it has no rule left pointing at it.
sweep_stale_hostports() {
  command -v iptables >/dev/null || return 0
  local rule id chain swept=0
  while IFS= read -r rule; do
    id=$(sed -n 's/.* id: \([0-9a-f]\{64\}\)".*/\1/p' <<<"$rule")
    [ -n "$id" ] || continue
    podman container exists "$id" 2>/dev/null && continue
    chain=${rule##* -j }
    # shellcheck disable=SC2086 # the rule's own words, as iptables -S printed them
    eval "iptables -t nat -D ${rule#-A }" && swept=$((swept + 1))
    if ! iptables -t nat -S | grep -q -- "-j $chain\$"; then
      iptables -t nat -F "$chain" 2>/dev/null && iptables -t nat -X "$chain" 2>/dev/null || true
    fi
  done < <(iptables -t nat -S NETAVARK-HOSTPORT-DNAT 2>/dev/null | grep -- '^-A .*dnat name: ')
  [ "$swept" -eq 0 ] || log "removed $swept stale Podman hostPort rule(s) of containers that are gone"
}

# The test image: a root filesystem holding Debian's statically linked busybox and its applet
# links, imported with `podman import` (there is no registry to pull from).
build_test_image() {
  if podman image exists "$TEST_IMAGE"; then
    return 0
  fi
  local busybox=/bin/busybox work
  [ -x "$busybox" ] || die "$busybox missing (apt-get install busybox-static)"
  file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
    die "$busybox is not statically linked (apt-get install busybox-static)"
  log "building test image $TEST_IMAGE from $busybox"
  work=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  mkdir -p "$work/root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev,root,var/www,run}
  chmod 1777 "$work/root/tmp"
  install -m 0755 "$busybox" "$work/root/bin/busybox"
  local applet
  for applet in $("$busybox" --list-full); do
    [ -e "$work/root/$applet" ] || ln -s /bin/busybox "$work/root/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$work/root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' > "$work/root/etc/group"
  tar -C "$work/root" --numeric-owner --owner=0 --group=0 -cf "$work/rootfs.tar" .
  podman import \
    --change 'CMD ["/bin/sh"]' \
    --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'LABEL io.fleetlet.test-image=busybox-static' \
    "$work/rootfs.tar" "$TEST_IMAGE" >/dev/null 2>"$work/import.err" ||
    { cat "$work/import.err" >&2; die "podman import of $TEST_IMAGE failed"; }
  log "imported $TEST_IMAGE"
}

down_podman() {
  stop_daemon podman
  rm -f "$PODMAN_SOCKET"
}
