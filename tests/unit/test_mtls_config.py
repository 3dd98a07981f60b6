"""The mTLS config builders: Envoy's transport sockets and SDS files, the operator's settings,
the CLI's checks, and the Python servers' reload of renewed files."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from google.protobuf import json_format

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))

from certs import ThrowawayCA

from switchyard import cli
from switchyard.extproc import server
from switchyard.local.runner import envoy_binary
from switchyard.operator.envoy_config import GatewaySettings, extproc_cluster
from switchyard.operator.envoy_tls import (
    CA_SECRET,
    CERT_SECRET,
    SDS_CA_FILE,
    SDS_CERT_FILE,
    EnvoyMtls,
    sds_documents,
    upstream_mtls,
    write_sds_files,
)
from switchyard.operator.k8s import OperatorSettings
from switchyard.operator.xds_server import ads_bootstrap, ads_bootstrap_message
from switchyard.tls import TlsFiles

MTLS = EnvoyMtls(sds_dir="/etc/envoy", server_name="switchyard-extproc.prod.svc")


def _as_dict(message: object) -> dict[str, object]:
    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))  # type: ignore[arg-type]


def test_the_upstream_context_checks_the_dns_san_and_takes_files_over_sds() -> None:
    socket = _as_dict(upstream_mtls(MTLS))["typed_config"]
    assert isinstance(socket, dict)
    assert socket["sni"] == "switchyard-extproc.prod.svc"
    common = socket["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    (cert,) = common["tls_certificate_sds_secret_configs"]
    assert cert["name"] == CERT_SECRET
    assert cert["sds_config"]["path_config_source"] == {
        "path": f"/etc/envoy/{SDS_CERT_FILE}",
        "watched_directory": {"path": "/etc/envoy"},
    }
    combined = common["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"]["name"] == CA_SECRET
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "switchyard-extproc.prod.svc"}}
    ]


def test_the_sds_files_point_at_the_secret_layout_and_watch_it() -> None:
    docs = sds_documents("/etc/switchyard/tls")
    (cert,) = docs[SDS_CERT_FILE]["resources"]
    assert cert["name"] == CERT_SECRET
    assert cert["tls_certificate"] == {
        "certificate_chain": {"filename": "/etc/switchyard/tls/tls.crt"},
        "private_key": {"filename": "/etc/switchyard/tls/tls.key"},
        "watched_directory": {"path": "/etc/switchyard/tls"},
    }
    (ca,) = docs[SDS_CA_FILE]["resources"]
    assert ca["validation_context"]["trusted_ca"] == {"filename": "/etc/switchyard/tls/ca.crt"}


def test_the_extproc_cluster_and_the_xds_cluster_use_mtls_only_when_set() -> None:
    assert not extproc_cluster(GatewaySettings()).HasField("transport_socket")
    for settings in (GatewaySettings(extproc_tls=MTLS, extproc_eds=True),
                     GatewaySettings(extproc_tls=MTLS)):  # fmt: skip
        assert extproc_cluster(settings).transport_socket == upstream_mtls(MTLS)
    plain = ads_bootstrap_message("n", 0, "127.0.0.1", 18000)
    assert not plain.static_resources.clusters[0].HasField("transport_socket")
    xds = EnvoyMtls("/etc/envoy", "switchyard-xds.prod.svc")
    secure = ads_bootstrap_message("n", 0, "switchyard-xds.prod.svc", 18000, xds)
    assert secure.static_resources.clusters[0].transport_socket == upstream_mtls(xds)


def test_envoy_accepts_the_mtls_clusters(tmp_path: Path) -> None:
    tls = ThrowawayCA.new().write_dir(tmp_path / "tls")
    write_sds_files(tmp_path / "sds", str(tls))
    mtls = EnvoyMtls(str(tmp_path / "sds"), "localhost")
    bootstrap = ads_bootstrap("validate", 0, "127.0.0.1", 18000)
    cluster = _as_dict(extproc_cluster(GatewaySettings(extproc_tls=mtls)))
    bootstrap["static_resources"]["clusters"].append(cluster)
    bootstrap["static_resources"]["clusters"][0]["transport_socket"] = _as_dict(upstream_mtls(mtls))
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        (OperatorSettings(), None),
        (OperatorSettings(tls_dir="/tls"), "localhost"),
        (
            OperatorSettings(tls_dir="/tls", extproc_service="sy-ep", data_plane_namespace="p"),
            "sy-ep.p.svc",
        ),
        (OperatorSettings(tls_dir="/tls", extproc_server_name="x.example"), "x.example"),
    ],
)
def test_the_operator_names_the_extproc_it_expects(
    settings: OperatorSettings, name: str | None
) -> None:
    mtls = settings.extproc_tls()
    assert (mtls.server_name if mtls else None) == name
    if mtls is not None:
        assert mtls.sds_dir == "/etc/envoy"


def test_the_extproc_refuses_a_tls_dir_without_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tls.crt").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["extproc", "--config", "c.pb", "--listen", "127.0.0.1:1", "--tls-dir",
                  str(tmp_path)])  # fmt: skip
    assert f"{tmp_path}/tls.key is missing" in capsys.readouterr().err


def _serial(port: int, files: TlsFiles) -> int:
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(files.cert, files.key)

    async def fetch() -> int:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return int(x509.load_der_x509_certificate(der).serial_number)

    return asyncio.run(fetch())


def test_a_worker_takes_a_renewed_certificate_for_new_handshakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "TLS_POLL_SECONDS", 0.05)
    ca = ThrowawayCA.new()
    files = TlsFiles.from_dir(ca.write_dir(tmp_path / "tls"))
    first = x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number

    async def main() -> tuple[int, int]:
        context = files.server_context()
        reloading = asyncio.create_task(server._reload_tls(files, context))
        listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
        port = listener.sockets[0].getsockname()[1]
        before = await asyncio.to_thread(_serial, port, files)
        ca.write_dir(tmp_path / "tls")  # renewed in place
        renewed = x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
        for _ in range(200):
            if await asyncio.to_thread(_serial, port, files) == renewed:
                break
            await asyncio.sleep(0.05)
        after = await asyncio.to_thread(_serial, port, files)
        reloading.cancel()
        listener.close()
        return before, after - renewed

    before, difference = asyncio.run(main())
    assert before == first
    assert difference == 0


def test_the_grpc_credentials_reload_only_changed_files(tmp_path: Path) -> None:
    from switchyard.tls import ReloadingServerCredentials

    ca = ThrowawayCA.new()
    files = TlsFiles.from_dir(ca.write_dir(tmp_path / "tls"))
    reloading = ReloadingServerCredentials(files)
    assert reloading._fetch() is None
    ca.write_dir(tmp_path / "tls")
    assert reloading._fetch() is not None
    assert reloading._fetch() is None
    files.key.unlink()  # mid-rotation: keep the last good certificate
    ca.write_dir(tmp_path / "other")
    assert reloading._fetch() is None
