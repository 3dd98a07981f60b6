#!/usr/bin/env bash
# Build the real Kubernetes binaries the tests run against, from the Go module proxy only (no
# release downloads, no Docker): kube-apiserver and kubectl (k8s.io/kubernetes), etcd
# (go.etcd.io/etcd/server/v3) and helm (helm.sh/helm/v3) for the control-plane tests; kubelet,
# kube-controller-manager, kube-scheduler, kube-proxy (k8s.io/kubernetes) and CoreDNS
# (github.com/coredns/coredns) for the single-node cluster of tests/infra/node/.
#
# Binaries are cached by version OUTSIDE the repository, under
#   ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/k8s/<K8S_VERSION>/bin
# so only the first run is slow. Each binary carries a stamp of the version it was built from
# (bin/.<name>.version); a binary whose stamp matches is never rebuilt. Safe to run
# concurrently (a lock serialises builders). Progress goes to stderr and to build.log in the
# cache; the LAST line on stdout is the bin directory.
#
# Knobs: K8S_VERSION, ETCD_VERSION, HELM_VERSION, COREDNS_VERSION, SWITCHYARD_CACHE,
# SWITCHYARD_BUILD_JOBS (go build -p; default: number of CPUs), GO (the go command).
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
ROOT="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/k8s/${K8S_VERSION}"
BIN="$ROOT/bin"
# Every binary of k8s.io/kubernetes built here (k8s.io/kubernetes/cmd/<name>), one wrapper module.
K8S_CMDS="kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler kube-proxy"
JOBS="${SWITCHYARD_BUILD_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"

GO="${GO:-$(command -v go || true)}"
[[ -n "$GO" ]] || GO=/usr/local/go/bin/go

# Reproducible, static, module-mode builds with the local toolchain only.
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local GO111MODULE=on

probe() {  # the version a binary reports about itself
  case $1 in
    kube-apiserver | kubelet | kube-controller-manager | kube-scheduler | kube-proxy)
      "$BIN/$1" --version ;;
    kubectl) "$BIN/$1" version --client -o yaml | grep -m1 gitVersion ;;
    etcd) "$BIN/$1" --version | sed -n 's/^etcd Version: /v/p' ;;
    helm) "$BIN/$1" version --short ;;
    coredns) "$BIN/$1" -version | sed -n 's/^CoreDNS-/v/p' ;;
  esac 2>/dev/null | grep -oE 'v[0-9]+\.[0-9]+\.[0-9]+' | head -1
}

fresh() {  # fresh NAME VERSION: the binary exists and was built from VERSION
  [[ -x "$BIN/$1" ]] || return 1
  [[ "$(cat "$BIN/.$1.version" 2>/dev/null)" == "$2" ]] && return 0
  # No stamp (older cache layout): trust the binary's own version, then stamp it.
  [[ "$(probe "$1")" == "$2" ]] && echo "$2" > "$BIN/.$1.version"
}

k8s_fresh() {  # every k8s.io/kubernetes binary is fresh
  local c
  for c in $K8S_CMDS; do fresh "$c" "$K8S_VERSION" || return 1; done
}

if k8s_fresh && fresh etcd "$ETCD_VERSION" && fresh helm "$HELM_VERSION" \
   && fresh coredns "$COREDNS_VERSION"; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN"
LOG="$ROOT/build.log"
exec 9>"$ROOT/.lock"
if ! flock -n 9; then
  echo "build_k8s: another build holds $ROOT/.lock; waiting" >&2
  flock 9
fi
# Everything below reports to stderr (and build.log); stdout carries only the bin directory.
exec 3>&1 1> >(tee -a "$LOG" >&2) 2>&1

log() { printf '%s build_k8s: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
command -v "$GO" >/dev/null || { log "no go toolchain (set GO=/path/to/go)"; exit 1; }
log "$("$GO" version); jobs=$JOBS; cache=$ROOT"
started=$SECONDS

# build_to NAME VERSION PACKAGE [go build args...]: build atomically, then stamp the version.
build_to() {
  local name=$1 version=$2 pkg=$3
  shift 3
  local t0=$SECONDS
  log "building $name $version ($pkg)"
  "$GO" build -p "$JOBS" -trimpath "$@" -o "$BIN/.$name.tmp" "$pkg"
  mv -f "$BIN/.$name.tmp" "$BIN/$name"
  echo "$version" > "$BIN/.$name.version"
  log "built $name in $((SECONDS - t0))s"
}

if ! k8s_fresh; then
  work="$ROOT/src-kubernetes"
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  "$GO" mod init switchyard.local/k8s-tools 2>/dev/null
  gomod=$("$GO" mod download -json "k8s.io/kubernetes@${K8S_VERSION}" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [[ -f "$gomod" ]] || { log "could not download k8s.io/kubernetes@${K8S_VERSION}"; exit 1; }
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  patch="${K8S_VERSION##*.}"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 (replaced by ./staging/... in its
  # own go.mod, which a dependent module ignores): pin every one to the matching v0.<minor>.<patch>.
  staging=$(awk '
    $1 == "require" && $2 == "(" { block = 1; next }
    block && $1 == ")" { block = 0; next }
    $1 == "require" && $2 ~ /^k8s\.io\// && $3 == "v0.0.0" { print $2 }
    block && $1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }
  ' "$gomod" | sort -u)
  [[ -n "$staging" ]] || { log "no v0.0.0 staging requirements found in $gomod"; exit 1; }
  for module in $staging; do
    "$GO" mod edit -replace "${module}=${module}@v0.${minor}.${patch}"
  done
  log "pinned $(wc -w <<<"$staging") staging modules to v0.${minor}.${patch}"
  # Carry kubernetes' godebug settings (single-line or block form).
  awk '
    $1 == "godebug" && $2 == "(" { block = 1; next }
    block && $1 == ")" { block = 0; next }
    $1 == "godebug" { print $2; next }
    block && NF { print $1 }
  ' "$gomod" | while read -r setting; do "$GO" mod edit -godebug "$setting"; done
  "$GO" mod edit -require "k8s.io/kubernetes@${K8S_VERSION}"
  # shellcheck disable=SC2046  # one word per command
  "$GO" get $(printf "k8s.io/kubernetes/cmd/%s@${K8S_VERSION} " $K8S_CMDS)
  v=k8s.io/component-base/version
  cv=k8s.io/client-go/pkg/version
  ldflags="-s -w -X $v.gitVersion=${K8S_VERSION} -X $v.gitMajor=1 -X $v.gitMinor=${minor}"
  ldflags+=" -X $v.gitTreeState=clean -X $cv.gitVersion=${K8S_VERSION}"
  ldflags+=" -X $cv.gitMajor=1 -X $cv.gitMinor=${minor}"
  for cmd in $K8S_CMDS; do
    fresh "$cmd" "$K8S_VERSION" \
      || build_to "$cmd" "$K8S_VERSION" "k8s.io/kubernetes/cmd/$cmd" -ldflags "$ldflags"
  done
fi

if ! fresh etcd "$ETCD_VERSION"; then
  work="$ROOT/src-etcd"
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  "$GO" mod init switchyard.local/etcd 2>/dev/null
  # The server module's main package is at its root.
  "$GO" get -tool "go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
  build_to etcd "$ETCD_VERSION" go.etcd.io/etcd/server/v3 -ldflags "-s -w"
fi

if ! fresh helm "$HELM_VERSION"; then
  t0=$SECONDS
  log "installing helm $HELM_VERSION"
  hv=helm.sh/helm/v3/internal/version
  GOBIN="$BIN" "$GO" install -p "$JOBS" -trimpath \
    -ldflags "-s -w -X $hv.version=${HELM_VERSION} -X $hv.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  echo "$HELM_VERSION" > "$BIN/.helm.version"
  log "built helm in $((SECONDS - t0))s"
fi

if ! fresh coredns "$COREDNS_VERSION"; then
  work="$ROOT/src-coredns"
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  "$GO" mod init switchyard.local/coredns 2>/dev/null
  # The main package is the module's root; -tool pins it (and its plugins' modules) in go.mod.
  "$GO" get -tool "github.com/coredns/coredns@${COREDNS_VERSION}"
  build_to coredns "$COREDNS_VERSION" github.com/coredns/coredns \
    -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}"
fi

"$BIN/kube-apiserver" --version >&2
log "done in $((SECONDS - started))s"
echo "$BIN" >&3
