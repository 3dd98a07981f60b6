"""Test certificates: a throw-away CA and the server and client certificates it signs
(for the test kube-apiservers and TLS model upstreams). Valid for two days, RSA 2048."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def x509_name(common: str, org: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if org:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attributes)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
    hosts: list[str] | None = None,
) -> x509.Certificate:
    """A certificate for ``subject`` signed by ``issuer``; a server certificate names
    ``hosts`` (default: localhost and 127.0.0.1) in its subject alternative names."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts or ["localhost", "127.0.0.1"]]),
            critical=False,
        )
        if not client:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
    if client:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class ThrowawayCA:
    """A throw-away CA that writes cert-manager-layout directories (tls.crt, tls.key, ca.crt)."""

    name: x509.Name
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls, common: str = "switchyard-test-ca") -> ThrowawayCA:
        key = new_key()
        name = x509_name(common)
        return cls(name, key, issue_cert(name, key, name, key, ca=True))

    def write_dir(
        self, directory: Path, common: str = "switchyard", hosts: list[str] | None = None
    ) -> Path:
        """A server-and-client certificate for ``hosts`` (default localhost, 127.0.0.1)."""
        key = new_key()
        cert = issue_cert(
            x509_name(common), key, self.name, self.key, server=True, client=True, hosts=hosts
        )
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tls.crt").write_bytes(cert_pem(cert))
        (directory / "tls.key").write_bytes(key_pem(key))
        (directory / "ca.crt").write_bytes(cert_pem(self.cert))
        return directory
