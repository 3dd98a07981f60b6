"""A real Kubernetes control plane for tests: etcd + kube-apiserver on loopback, started the way
controller-runtime's envtest starts them, with generated certificates and a kubeconfig for a
`system:masters` client.

No controller-manager runs: there is no garbage collection, namespaces never finish deleting,
Deployments make no pods and Services get no EndpointSlices; tests create what they need in a
fresh namespace. Several control planes may run at once (each has its own etcd, ports, certs and
temporary directory), e.g. a second one playing a remote cluster.

No pytest in here: the fixtures live in tests/integration/kube_fixtures.py; benches use it too.
"""

from __future__ import annotations

import base64
import collections
import functools
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml
from certs import cert_pem, issue_cert, key_pem, new_key, x509_name
from cryptography.hazmat.primitives import serialization

BUILD_SCRIPT = Path(__file__).with_name("build_k8s.sh")


class BuildError(RuntimeError):
    """build_k8s.sh failed; the message carries the end of its log."""


@functools.cache
def k8s_bin_dir() -> Path:
    """Build kube-apiserver, kubectl, etcd and helm (first time only: cached by version outside
    the repository) and return their directory. Build progress is echoed to stderr as it
    happens (the first build takes many minutes)."""
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with subprocess.Popen(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            sys.stderr.write(line)
        stdout = proc.stdout.read()
    if proc.returncode != 0 or not stdout.strip():
        raise BuildError(f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{''.join(tail)}")
    bin_dir = Path(stdout.strip().splitlines()[-1])
    for tool in ("kube-apiserver", "kubectl", "etcd", "helm"):
        if not os.access(bin_dir / tool, os.X_OK):
            raise BuildError(f"{BUILD_SCRIPT} printed {bin_dir}, which has no {tool}")
    return bin_dir


# --- ports -------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports the kernel reports free right now (still a race: start()
    retries on 'address already in use')."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ControlPlaneError(RuntimeError):
    """etcd or kube-apiserver failed to start; the message carries the end of their log."""


class KubeControlPlane:
    """etcd + kube-apiserver on loopback; ``kubeconfig_path`` reaches it as cluster-admin
    (a client certificate in group ``system:masters``).

    >>> plane = KubeControlPlane(k8s_bin_dir(), "local").start()
    >>> plane.kubectl("get", "namespaces")
    >>> plane.stop()
    """

    def __init__(
        self,
        bin_dir: Path,
        name: str = "test",
        *,
        service_cluster_ip_range: str = "10.0.0.0/24",
        extra_apiserver_flags: tuple[str, ...] = (),
    ) -> None:
        self.bin_dir = Path(bin_dir)
        self.name = name
        self.service_cluster_ip_range = service_cluster_ip_range
        self.extra_apiserver_flags = extra_apiserver_flags
        self.dir = Path(tempfile.mkdtemp(prefix=f"kube-{name}-"))
        self.kubeconfig_path = self.dir / "kubeconfig"
        self.log_path = self.dir / "control-plane.log"
        self.ca_path = self.dir / "ca.crt"
        self.client_cert_path = self.dir / "client.crt"
        self.client_key_path = self.dir / "client.key"
        self.port = 0
        self.etcd_port = 0
        self.processes: list[subprocess.Popen[bytes]] = []
        self._log: IO[bytes] | None = None
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The API server's URL."""
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180, attempts: int = 3) -> KubeControlPlane:
        """Start etcd and kube-apiserver and wait until ``/readyz`` answers 200."""
        self._write_certs()
        self._log = self.log_path.open("ab")
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout)
                return self
            except ControlPlaneError as exc:
                self._terminate()
                # Free ports are picked before the processes bind them: another process may
                # have taken one meanwhile. Retry with fresh ports; anything else is fatal.
                if "address already in use" not in str(exc) or attempt == attempts:
                    self.stop(keep_dir=True)
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        assert self._log is not None
        self.etcd_port, peer_port, self.port = _free_ports(3)
        shutil.rmtree(self.dir / "etcd", ignore_errors=True)
        self._log.write(f"--- starting {self.name}: etcd :{self.etcd_port}, "
                        f"kube-apiserver :{self.port}\n".encode())  # fmt: skip
        self._log.flush()
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = [
            str(self.bin_dir / "etcd"),
            f"--name={self.name}",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.name}={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
        self.processes.append(subprocess.Popen(etcd, stdout=self._log, stderr=self._log))
        d = self.dir
        apiserver = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            f"--cert-dir={d}",
            f"--tls-cert-file={d / 'server.crt'}",
            f"--tls-private-key-file={d / 'server.key'}",
            f"--client-ca-file={self.ca_path}",
            f"--secure-port={self.port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--service-cluster-ip-range={self.service_cluster_ip_range}",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--allow-privileged=true",
            "-v=0",
            *self.extra_apiserver_flags,
        ]
        self.processes.append(subprocess.Popen(apiserver, stdout=self._log, stderr=self._log))
        self._write_kubeconfig()
        deadline = time.monotonic() + timeout
        while True:
            for proc, binary in zip(self.processes, ("etcd", "kube-apiserver"), strict=True):
                if proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{self.name}: {binary} exited with {proc.returncode}:\n{self.log_tail()}"
                    )
            try:
                status, _ = self.get("/readyz", timeout=2)
                if status == 200:
                    return
            except (OSError, ssl.SSLError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{self.name}: kube-apiserver not ready after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)  # poll interval, bounded by the deadline above

    def _terminate(self) -> None:
        # One at a time, apiserver first: on SIGTERM it still writes to etcd (its endpoint
        # lease), so stopping etcd at the same time makes its shutdown hang on etcd timeouts.
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()

    def stop(self, *, keep_dir: bool = False) -> None:
        """Terminate kube-apiserver, then etcd; remove the temporary directory. Idempotent."""
        self._terminate()
        if self._log is not None:
            self._log.close()
            self._log = None
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def __enter__(self) -> KubeControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- files ------------------------------------------------------------------------------

    def _write_certs(self) -> None:
        ca_key = new_key()
        ca_name = x509_name(f"switchyard-test-ca-{self.name}")
        ca = issue_cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        server_key = new_key()
        server = issue_cert(x509_name("kube-apiserver"), server_key, ca_name, ca_key, server=True)
        client_key = new_key()
        client = issue_cert(
            x509_name("switchyard-admin", "system:masters"),
            client_key,
            ca_name,
            ca_key,
            client=True,
        )
        sa_key = new_key()
        files = {
            "ca.crt": cert_pem(ca),
            "server.crt": cert_pem(server),
            "server.key": key_pem(server_key),
            "client.crt": cert_pem(client),
            "client.key": key_pem(client_key),
            "sa.key": key_pem(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        for name, data in files.items():
            path = self.dir / name
            path.write_bytes(data)
            path.chmod(0o600)

    def _write_kubeconfig(self) -> None:
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(self.ca_path),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(self.client_cert_path),
                        "client-key-data": b64(self.client_key_path),
                    },
                }
            ],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": "admin"}}],
            "current-context": self.name,
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(config))
        self.kubeconfig_path.chmod(0o600)

    # -- clients ----------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """TLS context trusting this plane's CA and presenting the admin client certificate."""
        if self._ssl is None:
            context = ssl.create_default_context(cafile=str(self.ca_path))
            context.load_cert_chain(self.client_cert_path, self.client_key_path)
            self._ssl = context
        return self._ssl

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        """GET ``path`` on the API server as admin: (status, body); HTTP errors are returned."""
        request = urllib.request.Request(f"{self.server}{path}")
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def version(self) -> dict[str, Any]:
        """The API server's ``/version`` document."""
        status, body = self.get("/version")
        if status != 200:
            raise ControlPlaneError(f"/version answered {status}: {body[:500]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> str:
        """Run the built kubectl against this control plane. Returns stdout; with
        ``check=False`` a failing command returns its stderr instead of raising."""
        result = self.kubectl_result(*args, stdin=stdin, timeout=timeout)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, result.stdout, result.stderr
            )
        return result.stdout if result.returncode == 0 else result.stderr

    def kubectl_result(
        self, *args: str, stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl; the whole CompletedProcess (returncode, stdout, stderr)."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig_path)}
        env.pop("KUBECTL_EXPLAIN_OPENAPIV3", None)
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig_path), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
