"""A real single-node Kubernetes cluster for end-to-end tests: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubelet, kube-proxy, containerd + runc, a CNI bridge and
CoreDNS, all inside a network namespace of its own. Pods really run, Services work through
kube-proxy and names resolve through CoreDNS; nothing inside can reach the host's network or
beyond, and there is no registry: images are imported from tars (tests/infra/images.py).

The work is done by the scripts in tests/infra/node/ (up.sh, start.sh, stop.sh, mkcerts.sh;
they explain the host quirks they work around). Needs root, a cgroup v1 (hybrid) host and the
Debian packages of ``make node-tools``; the binaries come from tests/infra/build_k8s.sh.

    node = KubeNode(node_bin_dir(), pause_image=refs["pause"], coredns_image=refs["coredns"],
                    image_tars=[image.tar for image in built.values()])
    node.up()
    node.kubectl("get", "pods", "-A")
    node.run([".venv/bin/python", "client.py"])  # inside the netns: ClusterIPs and DNS work
    node.down()

No pytest in here: the fixtures are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from kube import BuildError, k8s_bin_dir

SCRIPTS = Path(__file__).resolve().with_name("node")
NODE_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kubectl",
    "helm",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "coredns",
)
# What the node needs from the host (make node-tools installs the Debian packages).
HOST_COMMANDS = (
    "ip",
    "iptables",
    "conntrack",
    "containerd",
    "ctr",
    "podman",
    "mmdebstrap",
    "gcc",
    "openssl",
    "go",
    "git",
    "setsid",
)
HOST_FILES = (
    "/usr/sbin/runc",
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/portmap",
    "/usr/lib/cni/loopback",
    "/bin/busybox",
    "/sys/fs/cgroup/pids",  # the scripts use the cgroup v1 (hybrid) hierarchies
)
WORKLOAD_KINDS = ("deployment", "deploy", "statefulset", "sts", "daemonset", "ds")
# netns (and cgroup) names: swy-node-<pid of the owning process>-<random>
NODE_NAME = re.compile(r"swy-node-(\d+)-[0-9a-f]+")

T = TypeVar("T")


class NodeError(RuntimeError):
    """The node failed to come up or stop, or a command run against it failed."""


def node_tools_missing() -> list[str]:
    """What this machine lacks to run the node (empty when it can): root, commands, files."""
    missing = [] if os.geteuid() == 0 else ["root (the node makes a netns, mounts, cgroups)"]
    missing += [c for c in HOST_COMMANDS if shutil.which(c) is None]
    missing += [f for f in HOST_FILES if not os.path.exists(f)]
    return missing


def node_bin_dir() -> Path:
    """Build (first time only) and return the directory of every binary the node runs."""
    bin_dir = k8s_bin_dir()
    for tool in NODE_BINARIES:
        if not os.access(bin_dir / tool, os.X_OK):
            raise BuildError(f"{bin_dir} has no {tool}: run tests/infra/build_k8s.sh")
    return bin_dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_root(name: str) -> Path | None:
    """The work directory of a running node, from its etcd's --data-dir (ROOT/node/etcd)."""
    procs = Path("/sys/fs/cgroup/pids", name, "system", "cgroup.procs")
    try:
        pids = procs.read_text().split()
    except OSError:
        return None
    for pid in pids:
        try:
            argv = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in argv:
            if arg.startswith(b"--data-dir=") and arg.endswith(b"/node/etcd"):
                return Path(os.fsdecode(arg.removeprefix(b"--data-dir="))).parents[1]
    return None


def reap_stale_nodes() -> list[str]:
    """Stop the nodes whose owning process died without stopping them (a killed pytest):
    their processes, cgroups and netns, and remove their temporary work directories. Returns
    their names."""
    names = {p.name for p in Path("/run/netns").glob("swy-node-*")}
    names |= {p.name for p in Path("/sys/fs/cgroup/pids").glob("swy-node-*")}
    reaped = []
    for name in sorted(names):
        match = NODE_NAME.fullmatch(name)
        if match is None or _alive(int(match[1])):
            continue
        root = _stale_root(name)
        result = subprocess.run(
            ["bash", str(SCRIPTS / "stop.sh")],
            env={**os.environ, "NODE": name, "ROOT": str(root or "")},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise NodeError(f"reaping stale node {name} failed:\n{result.stdout}{result.stderr}")
        if root is not None and root.name.startswith("swy-node-"):  # made by KubeNode
            shutil.rmtree(root, ignore_errors=True)
        reaped.append(name)
    return reaped


def poll(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call ``condition`` until it returns something other than None or False; return that.
    NodeError naming ``what`` (and the last exception ``condition`` raised) at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = condition()
            if result is not None and result is not False:
                return result
        except Exception as exc:  # reported at the deadline
            last_error = exc
        if time.monotonic() > deadline:
            detail = f": {last_error}" if last_error is not None else ""
            raise NodeError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)  # poll interval, bounded by the deadline above


class KubeNode:
    """One single-node cluster in its own network namespace ``netns``; everything it writes is
    under ``root`` (a new temporary directory unless given). ``up()`` returns once the node is
    Ready, the images are imported, CoreDNS runs (``coredns_image``) and the default
    ServiceAccount exists; ``down()`` leaves no process, mount, netns, cgroup or iptables rule.
    """

    def __init__(
        self,
        bin_dir: Path,
        *,
        pause_image: str,
        coredns_image: str | None = None,
        image_tars: Sequence[Path] = (),
        root: Path | None = None,
        netns: str | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        self.pause_image = pause_image
        self.coredns_image = coredns_image
        self.image_tars = [Path(t) for t in image_tars]
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="swy-node-"))
        # unique: the netns and cgroup names are machine-wide (other sessions may run a node)
        self.netns = netns or f"swy-node-{os.getpid()}-{secrets.token_hex(2)}"
        self.kubeconfig = self.root / "node" / "admin.kubeconfig"
        self.timings: dict[str, float] = {}
        self._up = False

    # -- lifecycle --------------------------------------------------------------------------------

    def _script_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ROOT": str(self.root),
            "NODE": self.netns,
            "BIN": str(self.bin_dir),
            "PAUSE_IMAGE": self.pause_image,
            "COREDNS_IMAGE": self.coredns_image or "",
            "IMAGES": " ".join(str(t) for t in self.image_tars),
        }

    def up(self, timeout: float = 600) -> KubeNode:
        """Start the node; on failure stop it again and raise NodeError with the logs' ends."""
        started = time.monotonic()
        self._up = True  # from here on down() has something to undo
        log = self.root / "up.log"
        try:
            with log.open("w") as out:
                result = subprocess.run(
                    ["bash", str(SCRIPTS / "up.sh")],
                    env=self._script_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                )
            failed = f"exit status {result.returncode}" if result.returncode else ""
        except subprocess.TimeoutExpired:
            failed = f"not up after {timeout}s"
        if failed:
            report = self.logs_tail()
            self.down(keep_root=True)
            for bulky in ("containerd", "kubelet", "etcd"):  # keep the logs and configs only
                shutil.rmtree(self.root / "node" / bulky, ignore_errors=True)
            raise NodeError(f"node {self.netns} did not come up ({failed}); {self.root}:\n{report}")
        self.timings["up"] = time.monotonic() - started
        return self

    def down(self, *, keep_root: bool | None = None) -> None:
        """Stop everything and remove what the node made; then remove ``root`` if the node made
        it (``keep_root``, or SWITCHYARD_KEEP_NODE=1, keeps it for its logs). Idempotent."""
        if self._up:
            started = time.monotonic()
            result = subprocess.run(
                ["bash", str(SCRIPTS / "stop.sh")],
                env=self._script_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                raise NodeError(f"stopping {self.netns} failed:\n{result.stdout}{result.stderr}")
            self._up = False
            self.timings["down"] = time.monotonic() - started
        if keep_root is None:
            keep_root = not self._owns_root or os.environ.get("SWITCHYARD_KEEP_NODE") == "1"
        if not keep_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> KubeNode:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def logs_tail(self, chars: int = 1500) -> str:
        """The end of up.log and of every component's log."""
        parts = []
        for path in [self.root / "up.log", *sorted((self.root / "node" / "logs").glob("*.log"))]:
            try:
                text = path.read_text(errors="replace")[-chars:]
            except OSError:
                continue
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    # -- commands in the netns --------------------------------------------------------------------

    def netns_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the node's netns and in the node's cgroup
        ``clients``, so that ``down()`` ends it too if it still runs (for subprocess.Popen)."""
        procs = f"/sys/fs/cgroup/pids/{self.netns}/clients/cgroup.procs"
        enter = 'echo $$ > "$0" && exec ip netns exec "$@"'  # the host's /sys, before the netns'
        return ["sh", "-c", enter, procs, self.netns, *map(str, argv)]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the node's netns (Service ClusterIPs reachable, names resolved by
        CoreDNS), as ``netns_argv``; ``kwargs`` go to subprocess.run (default: text, output
        captured, 300 s)."""
        kwargs.setdefault("text", True)
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("timeout", 300)
        result: subprocess.CompletedProcess[str] = subprocess.run(self.netns_argv(argv), **kwargs)
        return result

    def _checked(
        self, argv: list[str], env: dict[str, str], stdin: str | None, check: bool, timeout: float
    ) -> str:
        result = self.run(argv, input=stdin, env=env, timeout=timeout)
        if result.returncode != 0:
            if check:
                raise NodeError(
                    f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr.strip()}"
                )
            return result.stderr
        return result.stdout

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> str:
        """Run kubectl as cluster-admin; its stdout. A failure raises NodeError with stderr, or
        with ``check=False`` returns the stderr."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        argv = [str(self.bin_dir / "kubectl"), *args]
        return self._checked(argv, env, input, check, timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        """Run helm as cluster-admin, its state under ``root/helm``; as ``kubectl``."""
        home = self.root / "helm"
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        return self._checked([str(self.bin_dir / "helm"), *args], env, None, check, timeout)

    def import_image(self, tar: Path) -> None:
        """Import a docker-archive tar into the node's containerd (pods: imagePullPolicy Never
        or IfNotPresent with a ``localhost/`` name)."""
        sock = self.root / "node" / "containerd" / "containerd.sock"
        argv = ["ctr", "--address", str(sock), "-n", "k8s.io", "images", "import", str(tar)]
        self._checked(argv, dict(os.environ), None, True, 300)

    # -- waiting ----------------------------------------------------------------------------------

    def wait_ready(
        self, kind: str, name: str, namespace: str = "default", timeout: int = 120
    ) -> None:
        """Wait until a workload has rolled out (Deployment, StatefulSet, DaemonSet), a Job has
        completed, or anything else (a Pod, a Node) has condition Ready."""
        kind = kind.lower()
        target = f"{kind}/{name}"
        if kind in WORKLOAD_KINDS:
            argv = ["rollout", "status", target, f"--timeout={timeout}s"]
        elif kind in ("job", "jobs"):
            argv = ["wait", "--for=condition=Complete", target, f"--timeout={timeout}s"]
        else:
            argv = ["wait", "--for=condition=Ready", target, f"--timeout={timeout}s"]
        self.kubectl("-n", namespace, *argv, timeout=timeout + 30)

    def ready_endpoints(self, service: str, namespace: str = "default") -> list[str]:
        """The ready endpoint addresses of a Service (from its EndpointSlices)."""
        out = self.kubectl(
            "-n", namespace, "get", "endpointslice",
            f"-l=kubernetes.io/service-name={service}",
            "-o=jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}"
            "{.addresses[0]}{'\\n'}{end}",
        )  # fmt: skip
        return sorted(out.split())

    def wait_endpoints(
        self, service: str, count: int, namespace: str = "default", timeout: float = 120
    ) -> list[str]:
        """Wait until a Service has exactly ``count`` ready endpoints; their addresses."""

        def enough() -> list[str] | None:
            addresses = self.ready_endpoints(service, namespace)
            return addresses if len(addresses) == count else None

        return poll(enough, timeout, f"{count} ready endpoints of {namespace}/{service}")
