"""mTLS between the gateway's own parts: the real local gateway (`switchyard up` with tlsDir:
real Envoy, real ext_proc workers, the real control plane) serves the official openai client
with every internal link over mTLS; a peer without a certificate from the CA is refused at the
handshake by the workers and by the control plane, and the workers keep serving; a renewed
certificate (a Kubernetes Secret's atomic swap) is picked up without a restart."""

from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from certs import ThrowawayCA
from cryptography import x509
from gateway_harness import Gateway, descendants, start_gateway

from switchyard.local.runner import wait_until
from switchyard.tls import TlsFiles

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
SETTINGS_FRAME_TYPE = 4
BAD_HANDSHAKES = 300
MODELS = ("light", "standard", "capable")  # examples/policy.yaml


def secret_layout(directory: Path, ca: ThrowawayCA, version: str) -> Path:
    """Write a certificate the way a mounted Secret shows it: files in a versioned folder,
    ``..data`` pointing at it (swapped atomically), and each key a link through ``..data``."""
    ca.write_dir(directory / version)
    staged = directory / "..data_tmp"
    staged.symlink_to(version)
    os.replace(staged, directory / "..data")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    return directory


@pytest.fixture(scope="module")
def ca() -> ThrowawayCA:
    return ThrowawayCA.new()


@pytest.fixture(scope="module")
def mtls_gateway(tmp_path_factory: pytest.TempPathFactory, ca: ThrowawayCA) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("mtls")
    tls = secret_layout(directory / "tls", ca, "..v1")
    running = start_gateway(directory, tlsDir=str(tls), extprocTransport="tcp")
    yield running
    assert running.stop() == 0, "".join(running.output)


def admin(gateway: Gateway, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.admin_port}{path}", timeout=5) as r:
        return str(r.read().decode())


def stat(gateway: Gateway, name: str) -> int:
    line = admin(gateway, f"/stats?filter=^{name}$").strip()
    return int(line.rsplit(":", 1)[1]) if line else 0


def worker_ports(gateway: Gateway) -> list[int]:
    spec = yaml.safe_load((gateway.directory / "gateway.yaml").read_text())["spec"]
    return [spec["extprocPort"] + i for i in range(spec["extprocWorkers"])]


def xds_port(gateway: Gateway) -> int:
    bootstrap = json.loads((gateway.directory / "state" / "bootstrap.json").read_text())
    cluster = bootstrap["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    return int(endpoint["address"]["socket_address"]["port_value"])


def h2_handshake(port: int, ca: Path | None, client: TlsFiles | None) -> str:
    """Connect like an HTTP/2 client and say what came back: ``settings`` (served),
    ``refused`` (a TLS alert or the connection closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if ca is None:  # no TLS at all
            raw.sendall(H2_PREFACE)
            data = raw.recv(64)
            assert not data or data[0] == 0x15, data  # nothing, or a TLS alert record
            return "refused"
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(H2_PREFACE)
                header = conn.recv(9)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return "refused"
        if len(header) == 9 and header[3] == SETTINGS_FRAME_TYPE:
            return "settings"
        assert header == b"", header
        return "refused"


def chat(gateway: Gateway) -> str:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="not-needed", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello over mTLS"}]
    )
    answer = raw.parse()
    assert answer.choices[0].message.content
    return str(raw.headers["x-switchyard-model"])


def test_requests_flow_with_every_internal_link_on_mtls(mtls_gateway: Gateway) -> None:
    for _ in range(4):  # both workers get streams (round robin)
        assert chat(mtls_gateway) in MODELS
    assert stat(mtls_gateway, "cluster.switchyard_extproc.ssl.handshake") >= 1
    assert stat(mtls_gateway, "cluster.switchyard_xds.ssl.handshake") >= 1
    assert stat(mtls_gateway, "cluster.switchyard_extproc.ssl.connection_error") == 0
    # The ext_proc reached the control plane over mTLS too: it serves only with a config.
    assert "routing config" in "".join(mtls_gateway.output)


def _ext_proc_usage(gateway: Gateway) -> tuple[int, int]:
    """(open file descriptors, resident KiB) of the ext_proc workers together."""
    fds = rss = 0
    for pid in descendants(gateway.process.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"multiprocessing" not in cmdline:
            continue
        fds += len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text()
        rss += int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1])
    return fds, rss


def test_peers_without_a_certificate_from_the_ca_are_refused(
    mtls_gateway: Gateway, ca: ThrowawayCA, tmp_path: Path
) -> None:
    good = TlsFiles.from_dir(mtls_gateway.directory / "tls")
    stranger = TlsFiles.from_dir(ThrowawayCA.new("stranger-ca").write_dir(tmp_path / "stranger"))
    ports = [*worker_ports(mtls_gateway), xds_port(mtls_gateway)]
    for port in ports:
        assert h2_handshake(port, good.ca, good) == "settings", port
        assert h2_handshake(port, good.ca, None) == "refused", port  # no client certificate
        assert h2_handshake(port, good.ca, stranger) == "refused", port  # another CA's
        assert h2_handshake(port, None, None) == "refused", port  # plaintext HTTP/2
    chat(mtls_gateway)
    fds_before, rss_before = _ext_proc_usage(mtls_gateway)
    for i in range(BAD_HANDSHAKES):
        h2_handshake(ports[i % 2], good.ca, stranger if i % 3 else None)
    # The workers are still up and serving, holding no more sockets and barely more memory.
    for _ in range(4):
        chat(mtls_gateway)
    wait_until(lambda: _ext_proc_usage(mtls_gateway)[0] <= fds_before, 10, "refused sockets closed")
    fds_after, rss_after = _ext_proc_usage(mtls_gateway)
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after)
    assert fds_after <= fds_before
    assert mtls_gateway.process.poll() is None


def _serial(port: int, files: TlsFiles) -> int:
    context = ssl.create_default_context(cafile=str(files.ca))
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(files.cert, files.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_a_renewed_certificate_is_used_without_a_restart(
    mtls_gateway: Gateway, ca: ThrowawayCA
) -> None:
    tls = mtls_gateway.directory / "tls"
    files = TlsFiles.from_dir(tls)
    secret_layout(tls, ca, "..v2")  # what the kubelet does when cert-manager renews
    renewed = x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
    # Envoy (SDS from files) presents the new certificate...
    wait_until(lambda: format(renewed, "x") in admin(mtls_gateway, "/certs"), 20, "Envoy reload")
    # ...the control plane serves it at the next handshake...
    assert _serial(xds_port(mtls_gateway), files) == renewed
    # ...and requests keep flowing on the connections made with either.
    assert chat(mtls_gateway) in MODELS
