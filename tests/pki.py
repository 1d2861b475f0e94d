"""Throwaway certificates for the TLS tests, made with ``cryptography`` in the test run.

One module for every component's tests: a :class:`CA` that writes its certificate and
the leaves it issues (server or client, with the SANs asked for) as PEM files, and
:func:`make_pki`, the usual set of an aggregator's server certificate and an agent's
client certificate. A second CA in a test is the impostor whose certificates must be
refused. (The operator's own certificate code is tested separately; these tests do not
lean on it.)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Issued(NamedTuple):
    cert: str  # path of the PEM certificate
    key: str  # path of the PEM private key


def _san(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


class CA:
    """A self-signed CA whose certificate is at :attr:`path`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.now = dt.datetime.now(dt.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.subject)
            .issuer_name(self.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(minutes=5))
            .not_valid_after(self.now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = str(directory / f"{name}-ca.crt")
        Path(self.path).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, stem: str, *, server: bool, names: Sequence[str] | None = None, cn: str | None = None
    ) -> Issued:
        """A leaf for ``names`` (default: ``stem``, localhost, 127.0.0.1 and ::1)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or stem)]))
            .issuer_name(self.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(minutes=5))
            .not_valid_after(self.now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(_san(names if names is not None else (stem, "localhost", "127.0.0.1", "::1"))),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.dir / f"{self.name}-{stem}.crt", self.dir / f"{self.name}-{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return Issued(str(cert_path), str(key_path))


def make_pki(
    directory: Path, server_names: Sequence[str] = ("127.0.0.1", "flow-aggregator.flow-aggregator.svc")
) -> dict[str, str]:
    """A CA, the aggregator's server certificate for ``server_names`` and an agent's client one."""
    ca = CA(directory, "flowscope")
    server = ca.issue("server", server=True, names=server_names, cn="flow-aggregator")
    client = ca.issue("client", server=False, names=("flowscope-agent",), cn="flowscope-agent")
    return {
        "ca": ca.path, "server_cert": server.cert, "server_key": server.key,
        "client_cert": client.cert, "client_key": client.key,
    }  # fmt: skip
