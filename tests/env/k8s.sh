# The Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
# (sourced by up.sh / down.sh). All listen on 127.0.0.1 only.
source "$ENV_SRC_DIR/pki.sh"
K8S_DIR=$FLEETLET_DEV_DIR/k8s
ETCD_PORT=${FLEETLET_ETCD_PORT:-23790}
ETCD_PEER_PORT=${FLEETLET_ETCD_PEER_PORT:-23800}
APISERVER_PORT=${FLEETLET_APISERVER_PORT:-16443}
KCM_PORT=${FLEETLET_KCM_PORT:-20257}
SCHEDULER_PORT=${FLEETLET_SCHEDULER_PORT:-20259}
APISERVER_URL=https://127.0.0.1:$APISERVER_PORT
SA_ISSUER=https://kubernetes.default.svc.cluster.local
SERVICE_CIDR=10.0.0.0/24
# The address aggregated API servers (metrics-server) listen on: the root end of a veth whose
# other end is in the namespace fleetlet-stack, a /30 at the top of 198.18.0.0/15 (the
# benchmarking range; no real network). The API server accepts it as an endpoint address (it
# refuses loopback ones) and it never leaves this machine.
STACK_NETNS=fleetlet-stack
STACK_IF=flstack0
STACK_IP=198.19.255.253
STACK_PEER_IP=198.19.255.254

etcd_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
apiserver_ready() {
  [ "$(curl -sf --max-time 5 --cacert "$PKI_DIR/ca.crt" --cert "$PKI_DIR/admin.crt" \
    --key "$PKI_DIR/admin.key" "$APISERVER_URL/readyz")" = ok ]
}
# The components' own serving certificates are self-signed: only liveness is checked here.
component_healthy() { [ "$(curl -sfk --max-time 2 "https://127.0.0.1:$1/healthz")" = ok ]; }

# The stack's veth pair (idempotent; metrics-server listens on its root end).
stack_net_up() {
  ip netns list | grep -qw "$STACK_NETNS" || ip netns add "$STACK_NETNS"
  if ! ip link show "$STACK_IF" >/dev/null 2>&1; then
    ip link add "$STACK_IF" type veth peer name flstack1
    ip link set flstack1 netns "$STACK_NETNS"
    ip -n "$STACK_NETNS" addr add "$STACK_PEER_IP/30" dev flstack1
    ip -n "$STACK_NETNS" link set flstack1 up
    ip -n "$STACK_NETNS" link set lo up
  fi
  ip -4 addr show dev "$STACK_IF" | grep -q " $STACK_IP/" || ip addr add "$STACK_IP/30" dev "$STACK_IF"
  ip link set "$STACK_IF" up
}

stack_net_down() {
  ip link del "$STACK_IF" 2>/dev/null || true
  ip netns del "$STACK_NETNS" 2>/dev/null || true
}

up_k8s() {
  local bin
  bin=$("$ENV_SRC_DIR/build-k8s.sh")
  K8S_BIN=$bin
  make_pki
  make_aggregation_pki "$STACK_IP"
  mkdir -p "$K8S_DIR"
  chmod 0700 "$K8S_DIR"
  write_kubeconfig "$K8S_DIR/kubeconfig" admin "$APISERVER_URL"
  write_kubeconfig "$K8S_DIR/kube-controller-manager.kubeconfig" kube-controller-manager "$APISERVER_URL"
  write_kubeconfig "$K8S_DIR/kube-scheduler.kubeconfig" kube-scheduler "$APISERVER_URL"

  if ! { is_running etcd && etcd_healthy; }; then
    stop_daemon etcd
    start_daemon etcd "$bin/etcd" --name fleetlet-dev --data-dir "$K8S_DIR/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "fleetlet-dev=http://127.0.0.1:$ETCD_PEER_PORT" \
      --log-level warn
    wait_until 60 etcd etcd_healthy || { tail_log etcd; die "etcd did not become healthy"; }
  fi

  local apiserver_flags=(
      --etcd-servers "http://127.0.0.1:$ETCD_PORT"
      --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT"
      --tls-cert-file "$PKI_DIR/apiserver.crt" --tls-private-key-file "$PKI_DIR/apiserver.key"
      --client-ca-file "$PKI_DIR/ca.crt"
      --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction
      --service-account-issuer "$SA_ISSUER" --api-audiences "$SA_ISSUER"
      --service-account-key-file "$PKI_DIR/sa.pub"
      --service-account-signing-key-file "$PKI_DIR/sa.key"
      --service-cluster-ip-range "$SERVICE_CIDR" --endpoint-reconciler-type none
      --kubelet-client-certificate "$PKI_DIR/apiserver-kubelet-client.crt"
      --kubelet-client-key "$PKI_DIR/apiserver-kubelet-client.key"
      --kubelet-certificate-authority "$PKI_DIR/ca.crt"
      # The aggregation layer (metrics.k8s.io from metrics-server): front-proxy client
      # certificate, request-header authentication, and routing to the endpoint address (no
      # kube-proxy, so no Service IP is routable).
      --requestheader-client-ca-file "$PKI_DIR/front-proxy-ca.crt"
      --requestheader-allowed-names front-proxy-client
      --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group
      --requestheader-extra-headers-prefix X-Remote-Extra-
      --proxy-client-cert-file "$PKI_DIR/front-proxy-client.crt"
      --proxy-client-key-file "$PKI_DIR/front-proxy-client.key"
      --enable-aggregator-routing=true
      --allow-privileged=true --profiling=false --v=1
  )
  # A running API server started with other flags (an older checkout) is restarted.
  local flags_sum
  flags_sum=$(printf '%s\n' "$bin" "${apiserver_flags[@]}" | sha256sum | cut -c1-16)
  if ! { is_running kube-apiserver && apiserver_ready &&
    [ "$(cat "$K8S_DIR/kube-apiserver.flags" 2>/dev/null)" = "$flags_sum" ]; }; then
    stop_daemon kube-apiserver
    start_daemon kube-apiserver "$bin/kube-apiserver" "${apiserver_flags[@]}"
    echo "$flags_sum" > "$K8S_DIR/kube-apiserver.flags"
    wait_until 120 kube-apiserver apiserver_ready || { tail_log kube-apiserver; die "kube-apiserver did not become ready"; }
    # The API server calls the kubelet API (logs, exec) as kube-apiserver-kubelet-client.
    if ! "$bin/kubectl" --kubeconfig "$K8S_DIR/kubeconfig" get clusterrolebinding \
      fleetlet-dev:kube-apiserver-kubelet-client >/dev/null 2>&1; then
      "$bin/kubectl" --kubeconfig "$K8S_DIR/kubeconfig" create clusterrolebinding \
        fleetlet-dev:kube-apiserver-kubelet-client --clusterrole system:kubelet-api-admin \
        --user kube-apiserver-kubelet-client >/dev/null
    fi
  fi

  if ! { is_running kube-controller-manager && component_healthy "$KCM_PORT"; }; then
    stop_daemon kube-controller-manager
    mkdir -p "$K8S_DIR/kube-controller-manager"
    start_daemon kube-controller-manager "$bin/kube-controller-manager" \
      --kubeconfig "$K8S_DIR/kube-controller-manager.kubeconfig" \
      --authentication-kubeconfig "$K8S_DIR/kube-controller-manager.kubeconfig" \
      --authorization-kubeconfig "$K8S_DIR/kube-controller-manager.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --cert-dir "$K8S_DIR/kube-controller-manager" \
      --leader-elect=false --use-service-account-credentials \
      --root-ca-file "$PKI_DIR/ca.crt" --service-account-private-key-file "$PKI_DIR/sa.key" \
      --cluster-signing-cert-file "$PKI_DIR/ca.crt" --cluster-signing-key-file "$PKI_DIR/ca.key" \
      --cluster-name fleetlet-dev --profiling=false --v=1
  fi
  if ! { is_running kube-scheduler && component_healthy "$SCHEDULER_PORT"; }; then
    stop_daemon kube-scheduler
    mkdir -p "$K8S_DIR/kube-scheduler"
    start_daemon kube-scheduler "$bin/kube-scheduler" \
      --kubeconfig "$K8S_DIR/kube-scheduler.kubeconfig" \
      --authentication-kubeconfig "$K8S_DIR/kube-scheduler.kubeconfig" \
      --authorization-kubeconfig "$K8S_DIR/kube-scheduler.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --cert-dir "$K8S_DIR/kube-scheduler" \
      --leader-elect=false --profiling=false --v=1
  fi
  wait_until 60 kube-controller-manager component_healthy "$KCM_PORT" ||
    { tail_log kube-controller-manager; die "kube-controller-manager did not become healthy"; }
  wait_until 60 kube-scheduler component_healthy "$SCHEDULER_PORT" ||
    { tail_log kube-scheduler; die "kube-scheduler did not become healthy"; }
  # Pods need the default ServiceAccount, made by the controller-manager.
  wait_until 60 "default ServiceAccount" "$bin/kubectl" --kubeconfig "$K8S_DIR/kubeconfig" \
    -n default get serviceaccount default ||
    { tail_log kube-controller-manager; die "the default ServiceAccount did not appear"; }
}

down_k8s() {
  stop_daemon kube-scheduler
  stop_daemon kube-controller-manager
  stop_daemon kube-apiserver
  stop_daemon etcd
}

k8s_env_lines() {
  echo "export FLEETLET_KUBE_APISERVER=$APISERVER_URL"
  echo "export FLEETLET_K8S_BIN_DIR=$K8S_BIN"
  echo "export FLEETLET_KUBECTL=$K8S_BIN/kubectl"
  echo "export FLEETLET_CLUSTER_CA_CERT=$PKI_DIR/ca.crt"
  echo "export FLEETLET_CLUSTER_CA_KEY=$PKI_DIR/ca.key"
  echo "export FLEETLET_SA_ISSUER=$SA_ISSUER"
}
