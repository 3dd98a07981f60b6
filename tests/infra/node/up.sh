#!/usr/bin/env bash
# Bring up a single-node Kubernetes cluster inside a new network namespace, as root:
#   ROOT=/abs/work/dir NODE=<netns name> BIN=<dir of the k8s binaries> PAUSE_IMAGE=<ref> \
#   IMAGES="<docker-archive tars>" [COREDNS_IMAGE=<ref>] up.sh
# Everything the node writes goes under $ROOT/node; outside it only the netns $NODE, the cgroups
# /$NODE, /etc/netns/$NODE (the netns' resolv.conf: CoreDNS) and maybe an empty /var/lib/cni.
# stop.sh (same ROOT and NODE) removes all of them, also after a failed up.sh.
# On success: node Ready, the images imported, CoreDNS rolled out (when COREDNS_IMAGE is set),
# the default ServiceAccount made. Clients: ip netns exec $NODE ... with $ROOT/node/admin.kubeconfig.
set -euo pipefail
: "${ROOT:?}" "${NODE:?}" "${BIN:?}" "${PAUSE_IMAGE:?}"
case $ROOT in /*) ;; *) echo "ROOT must be an absolute path" >&2; exit 1 ;; esac
HERE=$(cd "$(dirname "$0")" && pwd)
N=$ROOT/node
log() { echo "$(date -u +%T) up: $*"; }
if [[ -e /run/netns/$NODE ]]; then echo "netns $NODE exists: run stop.sh first" >&2; exit 1; fi
for b in etcd kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler kube-proxy; do
  [[ -x $BIN/$b ]] || { echo "no $BIN/$b: run tests/infra/build_k8s.sh" >&2; exit 1; }
done

rm -rf "$N"
mkdir -p "$N"/{etcd,pki,logs,pids,pod-logs,run,varlog,kubelet,containerd,cni/net.d,cni/ipam,cni/cache}
render() { sed -e "s|@ROOT@|$ROOT|g" -e "s|@NODE@|$NODE|g" -e "s|@PAUSE_IMAGE@|$PAUSE_IMAGE|g" \
  -e "s|@COREDNS_IMAGE@|${COREDNS_IMAGE:-}|g" "$HERE/$1" > "$2"; }
render containerd.toml "$N/containerd/config.toml"
render 10-bridge.conflist "$N/cni/net.d/10-bridge.conflist"
render kubelet-config.yaml "$N/kubelet-config.yaml"
render kube-proxy-config.yaml "$N/kube-proxy-config.yaml"
: > "$N/resolv.conf"

# The network namespace: loopback plus a veth pair whose both ends stay inside (this kernel has
# no 'dummy' links) carrying the node IP, and a default route that leads nowhere but lets
# kube-proxy's rules catch ClusterIP traffic. Nothing in here can reach the host or beyond.
ip netns add "$NODE"
ip -n "$NODE" link set lo up
ip -n "$NODE" link add node0 type veth peer name node0-peer
ip -n "$NODE" link set node0-peer up
ip -n "$NODE" addr add 172.30.0.2/24 dev node0
ip -n "$NODE" link set node0 up
ip -n "$NODE" route add default via 172.30.0.1 dev node0 onlink
# Clients run in the netns (KubeNode.run) join this cgroup, so stop.sh ends them with the node.
mkdir -p "/sys/fs/cgroup/pids/$NODE/clients"
# `ip netns exec` bind-mounts /etc/netns/<name>/resolv.conf over /etc/resolv.conf: commands run
# in the netns (tests' clients) resolve Service names through CoreDNS, and nothing else.
[[ -d /etc/netns ]] || { mkdir /etc/netns && touch "$N/made-etc-netns"; }
mkdir -p "/etc/netns/$NODE"
printf 'nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n' \
  > "/etc/netns/$NODE/resolv.conf"
ROOT=$ROOT "$HERE/mkcerts.sh"
log "netns $NODE and certificates ready"

ROOT=$ROOT NODE=$NODE BIN=$BIN IMAGES=${IMAGES:-} ip netns exec "$NODE" "$HERE/start.sh"

k() { KUBECONFIG=$N/admin.kubeconfig ip netns exec "$NODE" "$BIN/kubectl" "$@"; }
if [[ -n ${COREDNS_IMAGE:-} ]]; then
  render coredns.yaml "$N/coredns.yaml"
  k apply -f "$N/coredns.yaml" >/dev/null
  k -n kube-system rollout status deploy/coredns --timeout=120s >/dev/null
  log "CoreDNS ready"
fi
# The controller-manager makes the default ServiceAccount a moment after it starts: a pod
# created before it exists is refused.
deadline=$((SECONDS + 60))
until k -n default get serviceaccount default >/dev/null 2>&1; do
  ((SECONDS < deadline)) || { log "no default ServiceAccount after 60s"; exit 1; }
  sleep 0.2
done
deadline=$((SECONDS + 600))
until [[ -e $N/imports.done ]]; do  # start.sh's background image imports
  [[ ! -e $N/imports.failed ]] || { cat "$N/logs/imports.log"; log "image import failed"; exit 1; }
  ((SECONDS < deadline)) || { log "images not imported after 600s"; exit 1; }
  sleep 0.2
done
cat "$N/logs/imports.log"
log "node ready"
