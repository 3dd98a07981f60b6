#!/usr/bin/env bash
# Stop the test node made by up.sh (same ROOT and NODE) and remove everything it left outside
# $ROOT: processes, cgroups, the netns, /etc/netns/$NODE, the /var/lib/cni mount point it made.
# Without ROOT (a node whose owner died and whose work dir is unknown) all but that mount point.
# Safe after a failed or partial up.sh, and when nothing is running. Nothing is shut down
# gracefully: the whole node goes, so there is no state to keep consistent. Mounts need no work:
# they all live in the node's own mount namespace, which goes with its last process.
set -uo pipefail
: "${NODE:?}"
N=${ROOT:-/nonexistent}/node
CG=/sys/fs/cgroup
log() { echo "$(date -u +%T) stop: $*"; }
procs() { find "$CG/pids/$NODE" -name cgroup.procs -exec cat {} + 2>/dev/null; }

# Every process the node started (components, containerd's shims, containers) and every client
# run through KubeNode.run is in a cgroup under pids:/$NODE. SIGKILL them all until none is left
# (kill races with forks: repeat).
deadline=$((SECONDS + 30))
while left=$(procs) && [[ -n $left ]]; do
  # shellcheck disable=SC2086  # one pid per word
  kill -9 $left 2>/dev/null
  ((SECONDS < deadline)) || { log "processes still in pids:/$NODE: $left"; break; }
  sleep 0.1
done
# The node's cgroups, deepest first (a cgroup whose last task just exited may stay busy a moment).
for h in "$CG"/*/; do
  [[ -d $h$NODE ]] || continue
  deadline=$((SECONDS + 10))
  until find "$h$NODE" -depth -type d -exec rmdir {} + 2>/dev/null && [[ ! -d $h$NODE ]]; do
    ((SECONDS < deadline)) || { log "cannot remove cgroup $h$NODE"; break; }
    sleep 0.1
  done
done
if [[ -e /run/netns/$NODE ]]; then ip netns del "$NODE" && log "deleted netns $NODE"; fi
rm -rf "/etc/netns/$NODE"
[[ -f $N/made-etc-netns ]] && rmdir /etc/netns 2>/dev/null && rm -f "$N/made-etc-netns"
# /var/lib/cni was only a mount point in the node's mount namespace; remove it when start.sh made
# it, unless another node (another mount namespace) has something mounted there now.
if [[ -f $N/made-var-lib-cni ]]; then
  if ! grep -qs ' /var/lib/cni ' /proc/[0-9]*/mountinfo; then rmdir /var/lib/cni 2>/dev/null; fi
  rm -f "$N/made-var-lib-cni"
fi
[[ -z $(procs) && ! -e /run/netns/$NODE ]]
