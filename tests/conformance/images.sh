#!/usr/bin/env bash
# Provides the images the e2e tests run, in the local stack's Podman store, under the registry
# that tests/conformance/repo-list.yaml gives the suite (there is no registry to pull from):
#   agnhost:2.63.0   the static agnhost built by build.sh (also as /agnhost-2), with Debian's static
#                    busybox for a shell, the machine's bash and curl (with their libraries) and
#                    the upstream image's /localhost.crt and /localhost.key (porter's test pair)
#   busybox:1.37.0-1 Debian's static busybox (the stack's test image, re-tagged)
#   pause:3.10.2     agnhost's `pause` (waits for a signal, reaps children, as the pause image does)
#   agnhost:2.55     the same agnhost under the suite's previous tag (AgnhostPrev)
#   kitten:1.8       the agnhost image plus the upstream kitten image's own files (kitten.jpg and
#                    data.json from test/images/kitten of the pinned k8s.io/kubernetes module), and
#                    an /etc/os-release that says what it is (a stand-in; the upstream image is
#                    built on Alpine Linux, which this machine does not have)
# Usage: images.sh BIN_DIR (from build.sh). Prints the names it provided, one a line.
# Idempotent: an image whose content is unchanged stays.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/env/lib.sh
source "$here/../env/lib.sh"
bin=${1:?usage: images.sh BIN_DIR}
: "${FLEETLET_PODMAN_SOCKET:?source target/dev/env first}"
podman=(podman --url "unix://$FLEETLET_PODMAN_SOCKET")
registry=$(awk '$1 == "promoterE2eRegistry:" { print $2 }' "$here/repo-list.yaml")
gc_registry=$(awk '$1 == "gcRegistry:" { print $2 }' "$here/repo-list.yaml")
[ -n "$registry" ] && [ -n "$gc_registry" ] || die "no promoterE2eRegistry or gcRegistry in $here/repo-list.yaml"

busybox=/bin/busybox
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
  die "$busybox is not statically linked (apt-get install busybox-static)"

# rootfs DIR: busybox and its applet links.
rootfs() {
  local root=$1 applet
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev}
  chmod 1777 "$root/tmp"
  install -m 0755 "$busybox" "$root/bin/busybox"
  for applet in $("$busybox" --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done
  # The upstream busybox image has every applet in /bin too (tests run /bin/sysctl).
  for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' > "$root/etc/group"
}

# import NAME TAR CHANGES...: imports TAR as NAME unless NAME carries the same content label.
import() {
  local name=$1 tar=$2 sum have
  shift 2
  sum=$(sha256sum "$tar" | cut -c1-16)
  have=$("${podman[@]}" image inspect --format '{{index .Labels "io.fleetlet.e2e-content"}}' "$name" 2>/dev/null || true)
  if [ "$have" = "$sum" ]; then
    log "image $name is up to date"
    return
  fi
  local args=()
  for c in "$@"; do args+=(--change "$c"); done
  "${podman[@]}" import "${args[@]}" --change "LABEL io.fleetlet.e2e-content=$sum" "$tar" "$name" > /dev/null
  log "imported $name"
}
# provide NAME TAR CHANGES...: import, and name it on stdout.
provide() {
  import "$@"
  echo "$1"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rootfs "$work/agnhost"
install -m 0755 "$bin/agnhost" "$work/agnhost/agnhost"
# As the upstream image: the entrypoint tests override the command with /agnhost-2.
ln -s agnhost "$work/agnhost/agnhost-2"
# The upstream agnhost image has bash, and tests run `/bin/bash -c ...` in it: the machine's bash
# with the shared libraries it links (the image has no libc of its own).
with_libs() {
  local root=$1 exe=$2 lib
  install -D -m 0755 "$(readlink -f "$exe")" "$root$exe"
  for lib in $(ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}
rm -f "$work/agnhost/bin/bash"
with_libs "$work/agnhost" /bin/bash
# It has curl too: lifecycle hook tests call their handler pod with it.
with_libs "$work/agnhost" /usr/bin/curl
# And the porter's test certificate and key at / (HTTPS lifecycle hook tests serve with them).
install -m 0644 "$bin/localhost.crt" "$bin/localhost.key" "$work/agnhost/"
# Deterministic archives: same inputs, same checksum, no re-import.
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/agnhost" -cf "$work/agnhost.tar" .
provide "$registry/agnhost:2.63.0" "$work/agnhost.tar" 'ENTRYPOINT ["/agnhost"]' 'CMD ["pause"]'
provide "$gc_registry/pause:3.10.2" "$work/agnhost.tar" 'ENTRYPOINT ["/agnhost", "pause"]'
# The suite's "previous" agnhost (AgnhostPrev, 2.55): the Pod lifecycle test starts a pod on it
# and patches the image to the current one; it runs the default entrypoint only, so the same
# build under the older tag serves (a second image name is what the test needs).
provide "$registry/agnhost:2.55" "$work/agnhost.tar" 'ENTRYPOINT ["/agnhost"]' 'CMD ["pause"]'

# kitten (test/images/kitten: FROM agnhost, COPY html/kitten.jpg html/data.json, CMD
# test-webserver), its files from the k8s.io/kubernetes module build.sh built the suite from.
go=go
command -v go > /dev/null || go=/usr/local/go/bin/go
kdir=$(cd "$here" && GOTOOLCHAIN=local GOFLAGS=-mod=mod "$go" list -m -f '{{.Dir}}' k8s.io/kubernetes) ||
  die "cannot find the k8s.io/kubernetes module of $here/go.mod"
[ -f "$kdir/test/images/kitten/html/data.json" ] || die "no test/images/kitten in $kdir"
cp -a "$work/agnhost" "$work/kitten"
install -m 0644 "$kdir/test/images/kitten/html/kitten.jpg" "$kdir/test/images/kitten/html/data.json" "$work/kitten/"
# The upstream image's os-release is Alpine's (its base); this one says what it is, so the
# ImageVolume test, which looks for "Alpine Linux" in it, fails for the environment it is.
cat > "$work/kitten/etc/os-release" <<'OSR'
NAME="fleetlet e2e stand-in"
ID=fleetlet-e2e-stand-in
PRETTY_NAME="fleetlet's stand-in for the e2e kitten image (agnhost with Debian's static busybox)"
OSR
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/kitten" -cf "$work/kitten.tar" .
provide "$registry/kitten:1.8" "$work/kitten.tar" 'ENTRYPOINT ["/agnhost"]' 'CMD ["test-webserver"]'

rootfs "$work/busybox"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/busybox" -cf "$work/busybox.tar" .
provide "$registry/busybox:1.37.0-1" "$work/busybox.tar" 'CMD ["sh"]'
