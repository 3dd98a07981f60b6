#!/usr/bin/env bash
# A throwaway PKI for the test node (openssl): a CA, the apiserver's serving cert, one client cert
# per component, the service-account key pair, and a kubeconfig per client in $ROOT/node.
set -euo pipefail
cd "${ROOT:?set ROOT to the node work directory}/node/pki"
NODE_IP=172.30.0.2
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -subj /CN=switchyard-node-ca -days 7 \
  -out ca.crt 2>/dev/null
sign() {  # sign NAME SUBJECT EXTENSIONS...
  local name=$1 subject=$2
  shift 2
  openssl req -new -newkey rsa:2048 -nodes -keyout "$name.key" -subj "$subject" -out "$name.csr" \
    2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 \
    -extfile <(printf '%s\n' 'keyUsage=critical,digitalSignature,keyEncipherment' "$@") \
    -out "$name.crt" 2>/dev/null
}
client() { sign "$1" "/CN=$2${3:+/O=$3}" extendedKeyUsage=clientAuth; }
sign apiserver /CN=kube-apiserver extendedKeyUsage=serverAuth "subjectAltName=$(printf '%s' \
  DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc, \
  DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1,IP:$NODE_IP)"
client admin node-admin system:masters
client kubelet system:node:node0 system:nodes
client kube-proxy system:kube-proxy
client scheduler system:kube-scheduler
client controller-manager system:kube-controller-manager
client apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
rm -f ./*.csr
chmod 600 ./*.key
for who in admin kubelet kube-proxy scheduler controller-manager; do
  cat > "../$who.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: node
  cluster: {server: "https://$NODE_IP:6443", certificate-authority: $PWD/ca.crt}
users:
- name: $who
  user: {client-certificate: $PWD/$who.crt, client-key: $PWD/$who.key}
contexts:
- name: node
  context: {cluster: node, user: $who}
current-context: node
KC
done
