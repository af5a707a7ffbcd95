#!/usr/bin/env bash
# Checks the agent packages that `make package` built: metadata and contents, lintian and
# rpmlint with no errors, the unit with systemd-analyze, and a real install and removal of
# the .deb with dpkg on this machine. Prints what it checks; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/package

deb=$(ls -t "$out"/fleetlet-agent_*.deb | head -n1)
rpm=$(ls -t "$out"/fleetlet-agent-*.rpm | head -n1)
fail() { echo "package check FAILED: $*" >&2; exit 1; }
step() { echo "--- $*"; }

step "dpkg-deb -I $deb"
info=$(dpkg-deb -I "$deb")
echo "$info"
grep -q '^ Package: fleetlet-agent' <<<"$info" || fail "deb: wrong package name"
grep -q '^ Depends:.*podman' <<<"$info" || fail "deb: does not depend on podman"
for s in postinst prerm postrm conffiles; do
  grep -qw "$s" <<<"$info" || fail "deb: no $s"
done

step "dpkg-deb -c $deb"
contents=$(dpkg-deb -c "$deb")
echo "$contents"
for f in ./usr/bin/fleetlet-agent ./etc/fleetlet/agent.toml \
  ./usr/lib/systemd/system/fleetlet-agent.service ./usr/lib/tmpfiles.d/fleetlet-agent.conf; do
  grep -q " $f\$" <<<"$contents" || fail "deb: $f missing"
done
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/fleetlet/agent.toml \
  || fail "deb: agent.toml is not a conffile"
file_info=$(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/fleetlet-agent | file -)
grep -q 'stripped' <<<"$file_info" && ! grep -q 'not stripped' <<<"$file_info" \
  || fail "deb: binary is not stripped ($file_info)"

step "lintian $deb (errors fail the check)"
# Run as root here; lintian refuses nothing but warns about it.
lintian --no-tag-display-limit --allow-root "$deb" | tee "$out/lintian.txt" || true
if grep -q '^E:' "$out/lintian.txt"; then fail "lintian reported errors"; fi

step "rpm -qpil --scripts $rpm"
rinfo=$(rpm -qpil --scripts "$rpm")
echo "$rinfo"
grep -q '^Name *: fleetlet-agent' <<<"$rinfo" || fail "rpm: wrong name"
for f in /usr/bin/fleetlet-agent /etc/fleetlet/agent.toml \
  /usr/lib/systemd/system/fleetlet-agent.service /usr/lib/tmpfiles.d/fleetlet-agent.conf; do
  grep -qx "$f" <<<"$rinfo" || fail "rpm: $f missing"
done
for s in postinstall preuninstall postuninstall; do
  grep -q "^$s scriptlet" <<<"$rinfo" || fail "rpm: no $s scriptlet"
done
rpm -qp --configfiles "$rpm" | grep -qx /etc/fleetlet/agent.toml || fail "rpm: agent.toml is not %config"
rpm -qp --requires "$rpm" | grep -q '^podman' || fail "rpm: does not require podman"

step "rpmlint $rpm (errors fail the check)"
# The test key signed it (packaging/build.sh); a release imports its own key the same way.
if [ -s "$out/test-signing-key.pub" ]; then rpm --import "$out/test-signing-key.pub"; fi
rpm -K "$rpm"
rpmlint -c packaging/rpm/rpmlint.toml "$rpm" | tee "$out/rpmlint.txt" || true
if grep -qE '^[^ ]+: E: ' "$out/rpmlint.txt"; then fail "rpmlint reported errors"; fi

step "dpkg install / remove / purge on this machine"
if dpkg -s fleetlet-agent >/dev/null 2>&1; then dpkg --purge fleetlet-agent >/dev/null; fi
# Podman is installed by .ci/run; the package must install without forcing anything.
dpkg -i "$deb"
dpkg -s fleetlet-agent | grep -q '^Status: install ok installed' || fail "dpkg: not installed"
/usr/bin/fleetlet-agent --version
step "systemd-analyze verify (installed unit)"
systemd-analyze verify /usr/lib/systemd/system/fleetlet-agent.service
# A locally edited config survives an upgrade (reinstall of the same package here).
echo '# local edit' >> /etc/fleetlet/agent.toml
dpkg -i "$deb"
grep -q '^# local edit' /etc/fleetlet/agent.toml || fail "dpkg: upgrade overwrote agent.toml"
dpkg -r fleetlet-agent
[ ! -e /usr/bin/fleetlet-agent ] || fail "dpkg -r left the binary"
[ -e /etc/fleetlet/agent.toml ] || fail "dpkg -r removed the conffile (only purge may)"
dpkg --purge fleetlet-agent
[ ! -e /etc/fleetlet/agent.toml ] || fail "dpkg --purge left agent.toml"
echo "package check: ok"
