"""Envoy's side of Switchyard's mTLS: its client certificate and the CA come over SDS from two
files (``path_config_source``), which point at the cert-manager-layout directory, so a renewed
Secret is picked up without a restart; the peer is verified by a DNS SAN (with SNI), never by
IP (EDS hands Envoy pod IPs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import json_format

from switchyard.operator.xds_types import packed
from switchyard.tls import CA_FILE, CERT_FILE, KEY_FILE

CERT_SECRET = "switchyard_certificate"
CA_SECRET = "switchyard_ca"
SDS_CERT_FILE = "sds-certificate.json"
SDS_CA_FILE = "sds-ca.json"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True)
class EnvoyMtls:
    """Where Envoy finds its SDS files (``sds_dir``, on Envoy's filesystem) and the DNS name
    the server it connects to must have in its certificate (also sent as SNI)."""

    sds_dir: str
    server_name: str


def _sds(directory: str, filename: str, name: str) -> secret_pb2.SdsSecretConfig:
    source = config_source_pb2.ConfigSource(
        resource_api_version=config_source_pb2.V3,
        path_config_source=config_source_pb2.PathConfigSource(
            path=f"{directory}/{filename}",
            # A ConfigMap's files change by a swap of its ..data link: watch the directory.
            watched_directory=base_pb2.WatchedDirectory(path=directory),
        ),
    )
    return secret_pb2.SdsSecretConfig(name=name, sds_config=source)


def upstream_mtls(mtls: EnvoyMtls, alpn: list[str] | None = None) -> base_pb2.TransportSocket:
    """The transport socket of a cluster to a Switchyard component: Envoy's certificate, and
    the server's verified against the CA and ``server_name``."""
    san = tls_common.SubjectAltNameMatcher
    context = tls_pb2.UpstreamTlsContext(
        sni=mtls.server_name,
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=alpn or ["h2"],
            tls_certificate_sds_secret_configs=[_sds(mtls.sds_dir, SDS_CERT_FILE, CERT_SECRET)],
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=tls_common.CertificateValidationContext(
                    match_typed_subject_alt_names=[
                        san(
                            san_type=san.DNS,
                            matcher=string_pb2.StringMatcher(exact=mtls.server_name),
                        )
                    ]
                ),
                validation_context_sds_secret_config=_sds(mtls.sds_dir, SDS_CA_FILE, CA_SECRET),
            ),
        ),
    )
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.tls", typed_config=packed(context)
    )


def sds_documents(tls_dir: str) -> dict[str, dict[str, Any]]:
    """The two SDS files (name → JSON document) for certificates in ``tls_dir`` (the
    cert-manager layout): Envoy rereads the files when the directory's contents are swapped."""
    watched = base_pb2.WatchedDirectory(path=tls_dir)
    certificate = secret_pb2.Secret(
        name=CERT_SECRET,
        tls_certificate=tls_common.TlsCertificate(
            certificate_chain=base_pb2.DataSource(filename=f"{tls_dir}/{CERT_FILE}"),
            private_key=base_pb2.DataSource(filename=f"{tls_dir}/{KEY_FILE}"),
            watched_directory=watched,
        ),
    )
    ca = secret_pb2.Secret(
        name=CA_SECRET,
        validation_context=tls_common.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(filename=f"{tls_dir}/{CA_FILE}"),
            watched_directory=watched,
        ),
    )
    return {SDS_CERT_FILE: _discovery(certificate), SDS_CA_FILE: _discovery(ca)}


def _discovery(secret: secret_pb2.Secret) -> dict[str, Any]:
    body = json_format.MessageToDict(secret, preserving_proto_field_name=True)
    return {"resources": [{"@type": SECRET_TYPE, **body}]}


def write_sds_files(sds_dir: Path, tls_dir: str) -> None:
    """Write the SDS files into ``sds_dir`` (local mode; Helm renders them into a ConfigMap)."""
    sds_dir.mkdir(parents=True, exist_ok=True)
    for name, document in sds_documents(tls_dir).items():
        (sds_dir / name).write_text(json.dumps(document, indent=1))
