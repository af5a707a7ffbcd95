# metrics-server (sourced by up.sh / down.sh after k8s.sh): built from its Go module, listening
# on the stack's veth address ($STACK_IP, see k8s.sh), registered as the v1beta1.metrics.k8s.io
# APIService through a Service without selector and an EndpointSlice naming that address (the API
# server routes to endpoints: --enable-aggregator-routing). It scrapes every Node's kubelet
# endpoint (for fleetlet Nodes: the hub's per-node port from daemonEndpoints), trusting the cluster
# CA, as system:metrics-server.
METRICS_SERVER_PORT=${FLEETLET_METRICS_SERVER_PORT:-16445}
METRICS_SERVER_DIR=$FLEETLET_DEV_DIR/metrics-server

metrics_server_healthy() {
  curl -sf --max-time 2 --cacert "$PKI_DIR/ca.crt" "https://$STACK_IP:$METRICS_SERVER_PORT/livez" | grep -q ok
}

metrics_api_available() {
  [ "$("$K8S_BIN/kubectl" --kubeconfig "$K8S_DIR/kubeconfig" get apiservice v1beta1.metrics.k8s.io \
    -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')" = True ]
}

metrics_server_manifest() {
  cat <<YAML
apiVersion: v1
kind: List
items:
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRole
  metadata: {name: "system:metrics-server"}
  rules:
  - apiGroups: [""]
    resources: [nodes/metrics]
    verbs: [get]
  - apiGroups: [""]
    resources: [pods, nodes]
    verbs: [get, list, watch]
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRoleBinding
  metadata: {name: "system:metrics-server"}
  roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:metrics-server"}
  subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:metrics-server"}]
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRoleBinding
  metadata: {name: "metrics-server:system:auth-delegator"}
  roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:auth-delegator"}
  subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:metrics-server"}]
- apiVersion: rbac.authorization.k8s.io/v1
  kind: RoleBinding
  metadata: {name: "metrics-server-auth-reader", namespace: kube-system}
  roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: extension-apiserver-authentication-reader}
  subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:metrics-server"}]
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRole
  metadata:
    name: "system:aggregated-metrics-reader"
    labels:
      rbac.authorization.k8s.io/aggregate-to-view: "true"
      rbac.authorization.k8s.io/aggregate-to-edit: "true"
      rbac.authorization.k8s.io/aggregate-to-admin: "true"
  rules:
  - apiGroups: [metrics.k8s.io]
    resources: [pods, nodes]
    verbs: [get, list, watch]
- apiVersion: v1
  kind: Service
  metadata: {name: metrics-server, namespace: kube-system}
  spec:
    ports: [{name: https, port: 443, protocol: TCP, targetPort: $METRICS_SERVER_PORT}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: metrics-server-fleetlet-dev
    namespace: kube-system
    labels:
      kubernetes.io/service-name: metrics-server
      endpointslice.kubernetes.io/managed-by: fleetlet-dev
  addressType: IPv4
  endpoints: [{addresses: ["$STACK_IP"], conditions: {ready: true}}]
  ports: [{name: https, port: $METRICS_SERVER_PORT, protocol: TCP}]
- apiVersion: apiregistration.k8s.io/v1
  kind: APIService
  metadata: {name: v1beta1.metrics.k8s.io}
  spec:
    group: metrics.k8s.io
    version: v1beta1
    groupPriorityMinimum: 100
    versionPriority: 100
    service: {name: metrics-server, namespace: kube-system, port: 443}
    caBundle: $(base64 -w0 < "$PKI_DIR/ca.crt")
YAML
}

up_metrics_server() {
  [ -n "${K8S_BIN:-}" ] || die "metrics-server needs the k8s component"
  local bin
  bin=$("$ENV_SRC_DIR/build-metrics-server.sh")
  stack_net_up
  mkdir -p "$METRICS_SERVER_DIR"
  chmod 0700 "$METRICS_SERVER_DIR"
  write_kubeconfig "$METRICS_SERVER_DIR/kubeconfig" metrics-server "$APISERVER_URL"
  metrics_server_manifest | "$K8S_BIN/kubectl" --kubeconfig "$K8S_DIR/kubeconfig" apply \
    --server-side --field-manager fleetlet-dev --force-conflicts -f - >/dev/null
  if ! { is_running metrics-server && metrics_server_healthy; }; then
    stop_daemon metrics-server
    # 10 s resolution (the least it takes; the kubelet request timeout must be shorter) so that
    # `kubectl top` and the HPA see a change soon.
    start_daemon metrics-server "$bin" \
      --kubeconfig "$METRICS_SERVER_DIR/kubeconfig" \
      --authentication-kubeconfig "$METRICS_SERVER_DIR/kubeconfig" \
      --authorization-kubeconfig "$METRICS_SERVER_DIR/kubeconfig" \
      --bind-address "$STACK_IP" --secure-port "$METRICS_SERVER_PORT" \
      --tls-cert-file "$PKI_DIR/metrics-server-serving.crt" \
      --tls-private-key-file "$PKI_DIR/metrics-server-serving.key" \
      --kubelet-certificate-authority "$PKI_DIR/ca.crt" \
      --kubelet-preferred-address-types InternalIP --kubelet-use-node-status-port \
      --metric-resolution 10s --kubelet-request-timeout 5s --v=1
    wait_until 60 metrics-server metrics_server_healthy || { tail_log metrics-server; die "metrics-server did not become healthy"; }
  fi
  wait_until 60 "the metrics.k8s.io APIService" metrics_api_available ||
    { tail_log metrics-server; die "v1beta1.metrics.k8s.io did not become Available"; }
}

down_metrics_server() {
  stop_daemon metrics-server
  stack_net_down
}
