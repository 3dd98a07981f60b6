#!/usr/bin/env bash
# Build the real control-plane binaries the operator tests run against, from the Go module
# proxy: kube-apiserver and kubectl (k8s.io/kubernetes), etcd, and helm. Cached by version
# under ${SWITCHYARD_CACHE:-~/.cache/switchyard}/k8s/<k8s version>/bin, so only the first run is
# slow. Idempotent; prints the bin directory on its last line.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
CACHE="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/k8s/${K8S_VERSION}"
BIN="$CACHE/bin"
mkdir -p "$BIN"
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
patch="${K8S_VERSION##*.}"

if [[ ! -x "$BIN/kube-apiserver" || ! -x "$BIN/kubectl" ]]; then
  work="$CACHE/src-kubernetes"
  mkdir -p "$work" && cd "$work"
  [[ -f go.mod ]] || go mod init switchyard.local/k8s-tools >/dev/null 2>&1
  go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" > mod.json
  gomod=$(python3 -c 'import json,sys; print(json.load(open("mod.json"))["GoMod"])')
  # k8s.io/kubernetes requires its staging modules at v0.0.0: pin each to the matching release.
  for staging in $(awk '$1 ~ /^k8s.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u); do
    go mod edit -replace "${staging}=${staging}@v0.${minor}.${patch}"
  done
  go mod edit -require "k8s.io/kubernetes@${K8S_VERSION}"
  # Carry the godebug settings kubernetes builds with.
  grep -E '^godebug' "$gomod" | while read -r _ setting; do go mod edit -godebug "$setting"; done || true
  go get "k8s.io/kubernetes/cmd/kube-apiserver@${K8S_VERSION}" "k8s.io/kubernetes/cmd/kubectl@${K8S_VERSION}" >/dev/null 2>&1 || true
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${K8S_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor} -X k8s.io/client-go/pkg/version.gitVersion=${K8S_VERSION}"
  go build -trimpath -ldflags "$ldflags" -o "$BIN/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  go build -trimpath -ldflags "$ldflags" -o "$BIN/kubectl" k8s.io/kubernetes/cmd/kubectl
fi

if [[ ! -x "$BIN/etcd" ]]; then
  work="$CACHE/src-etcd"
  mkdir -p "$work" && cd "$work"
  [[ -f go.mod ]] || go mod init switchyard.local/etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}" >/dev/null
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
fi

if [[ ! -x "$BIN/helm" ]]; then
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
fi

echo "$BIN"
