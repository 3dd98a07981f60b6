#!/usr/bin/env bash
# Run by up.sh INSIDE the node's netns (ip netns exec), with ROOT, NODE, BIN and IMAGES set.
# Every component starts from here so that they all share the one mount namespace `ip netns exec`
# made (the kubelet's tmpfs volumes must be visible to containerd), and all in the cgroup
# /$NODE/system of the pids hierarchy, so stop.sh finds every process the node ever started.
set -euo pipefail
: "${ROOT:?}" "${NODE:?}" "${BIN:?}"
N=$ROOT/node; P=$N/pki
SOCK=$N/containerd/containerd.sock
log() { echo "$(date -u +%T) start: $*"; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out waiting for $what (see $N/logs)"; return 1; }
    sleep 0.2
  done
}

# Private /run (shim sockets, xtables lock), /var/log (container log links) and libcni's result
# cache /var/lib/cni: backed by $N, invisible to the host (this mount namespace is rslave).
mount --bind "$N/run" /run
mount --bind "$N/varlog" /var/log
if [[ ! -d /var/lib/cni ]]; then mkdir /var/lib/cni && touch "$N/made-var-lib-cni"; fi
mount --bind "$N/cni/cache" /var/lib/cni
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 \
  net.bridge.bridge-nf-call-ip6tables=1   # per netns (this kernel): the host's stay as they are

# `ip netns exec` remounted /sys for the netns, which hides the cgroup mounts: mount the host's
# (hybrid v1) hierarchies again, then make the node's cgroup root /$NODE in each.
V1="cpu cpuacct cpuset memory devices freezer blkio pids"
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
for c in $V1; do mkdir -p "/sys/fs/cgroup/$c"; mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"; done
mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
for c in $V1 systemd; do mkdir -p "/sys/fs/cgroup/$c/$NODE"; done
for f in cpus mems; do  # a new cpuset is empty: copy the parent's
  cat "/sys/fs/cgroup/cpuset/cpuset.$f" > "/sys/fs/cgroup/cpuset/$NODE/cpuset.$f"
done
mkdir -p "/sys/fs/cgroup/pids/$NODE/system"
echo $$ > "/sys/fs/cgroup/pids/$NODE/system/cgroup.procs"   # inherited by everything below

bg() {  # bg NAME COMMAND...: start a component in the background, log and pid under $N
  local name=$1
  shift
  setsid "$@" > "$N/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$N/pids/$name"
}
bg etcd "$BIN/etcd" --name=node0 --data-dir="$N/etcd" --listen-client-urls=http://127.0.0.1:2379 \
  --advertise-client-urls=http://127.0.0.1:2379 --listen-peer-urls=http://127.0.0.1:2380 \
  --initial-advertise-peer-urls=http://127.0.0.1:2380 --initial-cluster=node0=http://127.0.0.1:2380 \
  --unsafe-no-fsync --log-level=warn
bg containerd containerd --config "$N/containerd/config.toml"
bg kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 --cert-dir="$P" \
  --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
  --client-ca-file="$P/ca.crt" --secure-port=6443 --bind-address=0.0.0.0 \
  --advertise-address=172.30.0.2 --service-cluster-ip-range=10.96.0.0/16 \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
  --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$P/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types=InternalIP --allow-privileged=true -v=0
log "etcd, containerd, kube-apiserver started"
wait_for 60 containerd ctr --address "$SOCK" version
# Images are imported, never pulled (there is no registry). The small ones (pause, CoreDNS,
# busybox: static binaries) before the kubelet starts; the big ones (Python, Envoy) in the
# background meanwhile, marking imports.done or imports.failed: up.sh waits for that.
import_image() { ctr --address "$SOCK" -n k8s.io images import "$1" > /dev/null && log "imported ${1##*/}"; }
big=()
for img in ${IMAGES:-}; do
  size=$(stat -c %s "$img")
  if ((size < 200 << 20)); then import_image "$img"; else big+=("$img"); fi
done
(
  for img in "${big[@]}"; do import_image "$img" || { touch "$N/imports.failed"; exit 1; }; done
  touch "$N/imports.done"
) > "$N/logs/imports.log" 2>&1 &
export KUBECONFIG=$N/admin.kubeconfig
wait_for 90 kube-apiserver "$BIN/kubectl" get --raw /readyz
log "kube-apiserver ready"
kc() { echo "--kubeconfig=$N/$1.kubeconfig --authentication-kubeconfig=$N/$1.kubeconfig
  --authorization-kubeconfig=$N/$1.kubeconfig --leader-elect=false --bind-address=127.0.0.1"; }
# shellcheck disable=SC2046  # kc's words
bg kube-controller-manager "$BIN/kube-controller-manager" $(kc controller-manager) \
  --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
  --use-service-account-credentials=true --cluster-signing-cert-file="$P/ca.crt" \
  --cluster-signing-key-file="$P/ca.key" -v=1
# shellcheck disable=SC2046
bg kube-scheduler "$BIN/kube-scheduler" $(kc scheduler) -v=1
bg kubelet "$BIN/kubelet" --config="$N/kubelet-config.yaml" --kubeconfig="$N/kubelet.kubeconfig" \
  --root-dir="$N/kubelet" --hostname-override=node0 --node-ip=172.30.0.2 -v=1
bg kube-proxy "$BIN/kube-proxy" --config="$N/kube-proxy-config.yaml" -v=1
log "controller-manager, scheduler, kubelet, kube-proxy started"
wait_for 90 "node registration" "$BIN/kubectl" get node node0
"$BIN/kubectl" wait --for=condition=Ready node/node0 --timeout=180s > /dev/null
log "node0 Ready"
