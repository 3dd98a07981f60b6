"""mTLS between Switchyard's own components (Envoy ↔ ext_proc, Envoy/ext_proc ↔ operator).

Certificates come from a directory in cert-manager's Secret layout (``tls.crt``, ``tls.key``,
``ca.crt``), which is what a mounted Secret gives. Every side presents its certificate and
verifies the peer's against ``ca.crt``; a peer without one is refused at the handshake.
Renewed files are picked up without a restart: the ext_proc's server context and the
operator's gRPC server reload them for new handshakes, and the ext_proc's config client reads
them on each reconnect (Envoy follows them through SDS, see operator/envoy_tls.py).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"
TLS_DIR_ENV = "SWITCHYARD_TLS_DIR"
"""The ext_proc's worker processes read their --tls-dir from here (spawned, they inherit it)."""

Signature = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TlsFiles:
    """This component's certificate chain, its key, and the CA that signs its peers'."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_dir(cls, directory: str | Path) -> TlsFiles:
        """The cert-manager layout: ``tls.crt``, ``tls.key``, ``ca.crt`` in ``directory``."""
        base = Path(directory)
        return cls(base / CERT_FILE, base / KEY_FILE, base / CA_FILE)

    @classmethod
    def from_environment(cls) -> TlsFiles | None:
        """``$SWITCHYARD_TLS_DIR`` as TlsFiles; None when unset (plaintext)."""
        directory = os.environ.get(TLS_DIR_ENV, "")
        return cls.from_dir(directory) if directory else None

    def check(self) -> None:
        """Raise FileNotFoundError naming the first file missing."""
        for path in (self.cert, self.key, self.ca):
            if not path.is_file():
                raise FileNotFoundError(f"TLS file {path} is missing")

    def signature(self) -> Signature:
        """What changes when any of the files is replaced (a Secret's symlinks are followed)."""
        stats = [p.stat() for p in (self.cert, self.key, self.ca)]
        return tuple((s.st_mtime_ns, s.st_size) for s in stats)

    def server_context(self) -> ssl.SSLContext:
        """An HTTP/2 (ALPN ``h2``) server context that requires a client certificate from
        the CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["h2"])
        self.load(context)
        return context

    def load(self, context: ssl.SSLContext) -> None:
        """(Re)load the files into ``context``; later handshakes use them."""
        context.load_cert_chain(self.cert, self.key)
        context.load_verify_locations(cafile=str(self.ca))

    def _pem(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials: this certificate, and the server verified against the CA."""
        cert, key, ca = self._pem()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate from the CA and reload the
        files for new handshakes once they change."""
        return ReloadingServerCredentials(self).credentials


class ReloadingServerCredentials:
    """gRPC's dynamic server credentials over TlsFiles: each new handshake checks the files'
    signature (three stats) and takes renewed files; an unreadable renewal keeps the last good
    certificate."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._seen = files.signature()
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            self._fetch,
            require_client_authentication=True,
        )

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self.files._pem()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                signature = self.files.signature()
                if signature == self._seen:
                    return None
                configuration = self._configuration()
            except OSError as error:
                log.warning("keeping the current TLS certificate: %s", error)
                return None
            self._seen = signature
            log.info("TLS certificate reloaded from %s", self.files.cert.parent)
            return configuration
