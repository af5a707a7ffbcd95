# Per-stack PKI made with openssl (sourced by k8s.sh). Everything lands in $PKI_DIR (0700);
# keys are 0600. Made once; env-reset removes it.
PKI_DIR=$FLEETLET_DEV_DIR/pki

# new_key FILE: an EC P-256 private key.
new_key() { (umask 077 && openssl ecparam -name prime256v1 -genkey -noout -out "$1"); }

# sign NAME SUBJECT EXTENSIONS: NAME.key plus NAME.crt signed by the stack's CA.
sign() {
  local name=$1 subj=$2 ext=$3
  new_key "$PKI_DIR/$name.key"
  openssl req -new -key "$PKI_DIR/$name.key" -subj "$subj" -out "$PKI_DIR/$name.csr"
  printf '%b\n' "$ext" > "$PKI_DIR/$name.ext"
  openssl x509 -req -in "$PKI_DIR/$name.csr" -CA "$PKI_DIR/ca.crt" -CAkey "$PKI_DIR/ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$PKI_DIR/$name.ext" -out "$PKI_DIR/$name.crt" 2>/dev/null
  rm -f "$PKI_DIR/$name.csr" "$PKI_DIR/$name.ext"
}

client_ext='basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'

make_pki() {
  if [ -f "$PKI_DIR/complete" ]; then return 0; fi
  log "creating the stack's PKI in $PKI_DIR"
  rm -rf "$PKI_DIR"
  mkdir -p "$PKI_DIR"
  chmod 0700 "$PKI_DIR"
  new_key "$PKI_DIR/ca.key"
  openssl req -x509 -new -key "$PKI_DIR/ca.key" -subj "/CN=fleetlet-dev-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$PKI_DIR/ca.crt"
  sign apiserver "/CN=kube-apiserver" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:::1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign admin "/O=system:masters/CN=fleetlet-dev-admin" "$client_ext"
  sign kube-controller-manager "/CN=system:kube-controller-manager" "$client_ext"
  sign kube-scheduler "/CN=system:kube-scheduler" "$client_ext"
  # The API server's client certificate towards kubelets (the hub serves the kubelet API).
  sign apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client" "$client_ext"
  # ServiceAccount token signing key.
  (umask 077 && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI_DIR/sa.key" 2>/dev/null)
  openssl pkey -in "$PKI_DIR/sa.key" -pubout -out "$PKI_DIR/sa.pub"
  rm -f "$PKI_DIR/ca.srl"
  touch "$PKI_DIR/complete"
}

# kubeconfig FILE USER SERVER: a kubeconfig with the user's certificate embedded.
write_kubeconfig() {
  local file=$1 user=$2 server=$3 tmp
  tmp=$(umask 077 && mktemp "$file.XXXXXX")
  cat > "$tmp" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: fleetlet-dev
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 < "$PKI_DIR/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$PKI_DIR/$user.crt")
    client-key-data: $(base64 -w0 < "$PKI_DIR/$user.key")
contexts:
- name: $user@fleetlet-dev
  context:
    cluster: fleetlet-dev
    user: $user
current-context: $user@fleetlet-dev
KUBECONFIG
  mv -f "$tmp" "$file"
}

# The aggregation layer's PKI (made once, also on a stack whose PKI predates it): a front-proxy
# CA and the API server's client certificate towards aggregated API servers (metrics-server),
# and metrics-server's own serving and client certificates from the cluster CA.
make_aggregation_pki() {
  local ip=$1
  if [ -f "$PKI_DIR/aggregation-complete-$ip" ]; then return 0; fi
  log "creating the aggregation layer's PKI in $PKI_DIR"
  new_key "$PKI_DIR/front-proxy-ca.key"
  openssl req -x509 -new -key "$PKI_DIR/front-proxy-ca.key" -subj "/CN=fleetlet-dev-front-proxy-ca" \
    -days 3650 -sha256 -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$PKI_DIR/front-proxy-ca.crt"
  new_key "$PKI_DIR/front-proxy-client.key"
  openssl req -new -key "$PKI_DIR/front-proxy-client.key" -subj "/CN=front-proxy-client" \
    -out "$PKI_DIR/front-proxy-client.csr"
  printf '%b\n' "$client_ext" > "$PKI_DIR/front-proxy-client.ext"
  openssl x509 -req -in "$PKI_DIR/front-proxy-client.csr" -CA "$PKI_DIR/front-proxy-ca.crt" \
    -CAkey "$PKI_DIR/front-proxy-ca.key" -CAcreateserial -days 3650 -sha256 \
    -extfile "$PKI_DIR/front-proxy-client.ext" -out "$PKI_DIR/front-proxy-client.crt" 2>/dev/null
  rm -f "$PKI_DIR/front-proxy-client.csr" "$PKI_DIR/front-proxy-client.ext" "$PKI_DIR/front-proxy-ca.srl"
  sign metrics-server-serving "/CN=metrics-server" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:$ip,DNS:metrics-server.kube-system.svc"
  # metrics-server's identity towards the API server and the kubelets (the hub).
  sign metrics-server "/CN=system:metrics-server" "$client_ext"
  rm -f "$PKI_DIR/ca.srl" "$PKI_DIR"/aggregation-complete-*
  touch "$PKI_DIR/aggregation-complete-$ip"
}
