#!/usr/bin/env bash
# Obtains, from the stack's real Flightctl, the client certificate a device's flightctl-agent
# would get for the fleetlet agent through the cert drop-in (signer flightctl.io/device-svc-client):
#   1. an enrollment (bootstrap) certificate through the user API (`flightctl certificate request`),
#   2. an EnrollmentRequest for DEVICE on the agent endpoint, approved as flightctl-admin,
#   3. the device's management certificate from the approved request,
#   4. a CSR with common name fleetlet-DEVICE, posted with the management certificate on the agent
#      endpoint (the signer auto-approves it), and its certificate.
#   usage: tests/env/flightctl/device-cert.sh DEVICE OUTDIR [LABELS]
#   (needs `make env-up`; DEVICE >= 16 chars; LABELS: k=v,k=v given to the device at approval)
# Writes OUTDIR/fleetlet.crt and OUTDIR/fleetlet.key (0600), plus the intermediate files. The
# certificate verifies against $FLIGHTCTL_SIGNER_CA_FILE.
set -euo pipefail
device=${1:?usage: device-cert.sh DEVICE OUTDIR}
out=${2:?usage: device-cert.sh DEVICE OUTDIR}
labels=${3:-}
[ ${#device} -ge 16 ] || { echo "device name must have at least 16 characters (a Flightctl fingerprint)" >&2; exit 64; }
env_file=${FLEETLET_DEV_DIR:-/var/tmp/fleetlet-dev}/env
# shellcheck disable=SC1090
source "$env_file"
mkdir -p "$out"
chmod 0700 "$out"
cd "$out"
cli=("$FLIGHTCTL_BIN_DIR/flightctl" --config-dir "$FLIGHTCTL_CLI_CONFIG_DIR")
api() { curl -sS --fail-with-body --max-time 30 --cacert "$FLIGHTCTL_CA_FILE" -H 'Content-Type: application/json' "$@"; }
json_field() { python3 -c 'import json,sys; d=json.load(sys.stdin)
for k in sys.argv[1].split("."): d=(d or {}).get(k)
print(d or "")' "$1"; }

umask 077
# 1. Enrollment certificate (the bootstrap identity baked into device images).
"${cli[@]}" certificate request -n "enroll-$device" -o reference -d "$out" >/dev/null
# 2. Enrollment request with the device's own key.
openssl ecparam -name prime256v1 -genkey -noout -out device.key
openssl req -new -key device.key -subj "/CN=$device" -out device.csr 2>/dev/null
python3 -c 'import json,sys; print(json.dumps({"apiVersion":"v1beta1","kind":"EnrollmentRequest",
  "metadata":{"name":sys.argv[1]},"spec":{"csr":open("device.csr").read()}}))' "$device" > er.json
api --cert "enroll-$device.crt" --key "enroll-$device.key" -X POST \
  "$FLIGHTCTL_AGENT_URL/api/v1/enrollmentrequests" -d @er.json >/dev/null
python3 -c 'import json,sys
labels={}
for kv in filter(None, sys.argv[1].split(",")):
    k, sep, v = kv.partition("=")
    if not sep or not k: sys.exit("label %r is not k=v" % kv)
    labels[k] = v
print(json.dumps({"approved": True, "labels": labels}))' "$labels" > approval.json
api -H "Authorization: Bearer $(cat "$FLIGHTCTL_ADMIN_TOKEN_FILE")" -X PUT \
  "$FLIGHTCTL_API_URL/api/v1/enrollmentrequests/$device/approval" -d @approval.json >/dev/null
# 3. The management certificate, once issued.
for _ in $(seq 1 50); do
  api --cert "enroll-$device.crt" --key "enroll-$device.key" \
    "$FLIGHTCTL_AGENT_URL/api/v1/enrollmentrequests/$device" | json_field status.certificate > management.crt
  [ -s management.crt ] && break
  sleep 0.2
done
[ -s management.crt ] || { echo "enrollment request $device was not issued a certificate" >&2; exit 1; }
# 4. The fleetlet client certificate from the device service signer.
openssl ecparam -name prime256v1 -genkey -noout -out fleetlet.key
openssl req -new -key fleetlet.key -subj "/CN=fleetlet-$device" -out fleetlet.csr 2>/dev/null
python3 -c 'import base64,json,sys; print(json.dumps({"apiVersion":"v1beta1","kind":"CertificateSigningRequest",
  "metadata":{"name":"fleetlet-"+sys.argv[1]},"spec":{"request":base64.b64encode(open("fleetlet.csr","rb").read()).decode(),
  "signerName":"flightctl.io/device-svc-client","usages":["clientAuth","CA:false"],"expirationSeconds":86400}}))' "$device" > csr.json
api --cert management.crt --key device.key -X POST "$FLIGHTCTL_AGENT_URL/api/v1/certificatesigningrequests" -d @csr.json >/dev/null
for _ in $(seq 1 50); do
  api --cert management.crt --key device.key "$FLIGHTCTL_AGENT_URL/api/v1/certificatesigningrequests/fleetlet-$device" |
    json_field status.certificate | base64 -d > fleetlet.crt 2>/dev/null || true
  [ -s fleetlet.crt ] && break
  sleep 0.2
done
[ -s fleetlet.crt ] || { echo "CSR fleetlet-$device was not signed" >&2; exit 1; }
openssl verify -CAfile "$FLIGHTCTL_SIGNER_CA_FILE" fleetlet.crt >/dev/null
echo "$out/fleetlet.crt"
