"""A real Kubernetes control plane for tests: etcd + kube-apiserver on loopback, as envtest runs
them, with generated certificates and a kubeconfig for a `system:masters` client.

No controller-manager runs: there is no garbage collection, namespaces never finish deleting
and Services get no EndpointSlices; tests create what they need in a fresh namespace.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from switchyard.local.ports import free_port_block

BUILD_SCRIPT = Path(__file__).with_name("build_k8s.sh")


def k8s_bin_dir() -> Path:
    """Build (first time only, cached by version) and return the bin directory."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _name(common: str, org: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if org:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attributes)


class KubeControlPlane:
    """etcd + kube-apiserver; ``kubeconfig_path`` reaches it as cluster-admin."""

    def __init__(self, bin_dir: Path, name: str = "test") -> None:
        self.bin_dir = bin_dir
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"kube-{name}-"))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.port = 0
        self.kubeconfig_path = self.dir / "kubeconfig"

    def _write_certs(self) -> None:
        ca_key = _key()
        ca_name = _name("switchyard-test-ca")
        ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        server_key = _key()
        server = _cert(_name("kube-apiserver"), server_key, ca_name, ca_key, server=True)
        client_key = _key()
        client = _cert(_name("admin", "system:masters"), client_key, ca_name, ca_key)
        sa_key = _key()
        files = {
            "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
            "server.crt": server.public_bytes(serialization.Encoding.PEM),
            "server.key": _pem(server_key),
            "client.crt": client.public_bytes(serialization.Encoding.PEM),
            "client.key": _pem(client_key),
            "sa.key": _pem(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        for name, data in files.items():
            (self.dir / name).write_bytes(data)

    def _kubeconfig(self) -> None:
        def b64(name: str) -> str:
            return base64.b64encode((self.dir / name).read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64("ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64("client.crt"),
                        "client-key-data": b64("client.key"),
                    },
                }
            ],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": "admin"}}],
            "current-context": self.name,
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(config))

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> KubeControlPlane:
        self._write_certs()
        etcd_port = free_port_block(2)
        self.port = free_port_block()
        log = (self.dir / "control-plane.log").open("wb")
        etcd = [
            str(self.bin_dir / "etcd"),
            "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_port + 1}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_port + 1}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_port + 1}",
            "--unsafe-no-fsync", "--log-level", "error",
        ]  # fmt: skip
        self.processes.append(subprocess.Popen(etcd, stdout=log, stderr=log))
        apiserver = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--cert-dir={self.dir}",
            f"--tls-cert-file={self.dir / 'server.crt'}",
            f"--tls-private-key-file={self.dir / 'server.key'}",
            f"--client-ca-file={self.dir / 'ca.crt'}",
            f"--secure-port={self.port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.dir / 'sa.pub'}",
            f"--service-account-signing-key-file={self.dir / 'sa.key'}",
            "--allow-privileged=true",
            "-v=0",
        ]
        self.processes.append(subprocess.Popen(apiserver, stdout=log, stderr=log))
        self._kubeconfig()
        context = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        context.load_cert_chain(self.dir / "client.crt", self.dir / "client.key")
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.processes:
                if proc.poll() is not None:
                    log_tail = (self.dir / "control-plane.log").read_text()[-3000:]
                    raise RuntimeError(f"{proc.args[0]} exited: {log_tail}")
            try:
                with urllib.request.urlopen(
                    f"{self.server}/readyz", context=context, timeout=2
                ) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("kube-apiserver did not become ready")
            time.sleep(0.1)

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        """Run the built kubectl against this control plane; stdout (stderr on failure)."""
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig_path), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig_path)},
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, result.stdout, result.stderr
            )
        return result.stdout if result.returncode == 0 else result.stderr

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
