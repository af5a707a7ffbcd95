# Flightctl settings shared by build.sh and ../flightctl.sh (sourced after ../lib.sh).

# The pinned release, read from the Go module that pins it.
flightctl_version() { awk '$1 == "require" && $2 == "github.com/flightctl/flightctl" { print $3; exit }' "$ENV_SRC_DIR/flightctl/go.mod"; }

# Binaries are cached per machine under a key naming the version plus a hash of the pins.
flightctl_bin_dir() {
  local hash
  hash=$(cat "$ENV_SRC_DIR/flightctl/go.mod" "$ENV_SRC_DIR/flightctl/go.sum" | sha256sum | cut -c1-10)
  echo "$FLEETLET_CACHE_DIR/flightctl-$(flightctl_version)-$hash/bin"
}
