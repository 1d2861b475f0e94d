"""TLS material between agents and the aggregator: a CA, a server and a client certificate.

The design secures the agent -> aggregator IPFIX stream with mutual TLS: the aggregator
presents a server certificate for its Service name (and ``flowAggregatorAddress``), the
agents present a client certificate, and both trust one CA. This module makes and keeps
that material; it does no I/O. ``ensure`` takes what is stored in the Secrets now and
the current time (an injected clock) and returns the material to store: the same bytes
when everything is valid and far from expiry (so a reconcile writes nothing and
operator restarts change nothing), fresh certificates when one is missing, damaged,
issued for other names, signed by another CA, or within the rotation margin of its
expiry. A new CA re-issues both leaves.

A CA rotation must not cut agents off while pods roll one by one, so it has two phases
(see ``ensure``): the next CA is first only trusted (``bundle``, what goes into every
``ca.crt``, holds it), and signs only later, when every pod has had time to roll; the
old CA stays trusted until it expires. Peers holding the old bundle or the new one, old
certificates or new ones, verify each other throughout.

Besides the agents' client certificate, a second client certificate (``api_client``) is
issued for whoever reads the aggregator's flow-records API (the operator, the UI): the API
is served with mutual TLS against the same CA.

Deterministic mode (``seed``, for ``flowscope render`` with a given CA): leaf keys are
derived from the seed and the leaf's name and validity start, serial numbers likewise, and
signatures are deterministic ECDSA (RFC 6979), so the same CA, names and clock window give
the same bytes on every run; GitOps diffs then only change when something should.

Keys are ECDSA P-256: fast to generate and supported by every TLS stack we talk to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["KeyPair", "TLSMaterial", "ensure", "new_ca", "issue", "load", "fingerprint"]

CLIENT_COMMON_NAME = "flowscope-agent"
API_CLIENT_COMMON_NAME = "flowscope-api-client"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between nodes


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    ca: KeyPair
    server: KeyPair
    client: KeyPair
    previous_ca: bytes | None = None  # the CA certificate before the last rotation, while still valid
    next_ca: KeyPair | None = None  # the CA that will sign after the rotation in progress
    api_client: KeyPair | None = None  # for readers of the aggregator's flow-records API

    @property
    def bundle(self) -> bytes:
        """The trusted CAs: the current one, plus the next and the previous during a rotation."""
        nxt = self.next_ca.cert_pem if self.next_ca else b""
        return self.ca.cert_pem + nxt + (self.previous_ca or b"")

    def fingerprint(self) -> str:
        """Changes whenever any certificate changes; goes into the pods' config hash."""
        h = hashlib.sha256()
        for pem in (self.bundle, self.server.cert_pem, self.client.cert_pem):
            h.update(pem)
        return h.hexdigest()


def fingerprint(pem: bytes) -> str:
    return hashlib.sha256(pem).hexdigest()


def _new_key(seed: bytes | None = None, label: str = "") -> ec.EllipticCurvePrivateKey:
    if seed is None:
        return ec.generate_private_key(ec.SECP256R1())
    digest = hmac.new(seed, b"key|" + label.encode(), hashlib.sha512).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def _serial(seed: bytes | None, label: str) -> int:
    if seed is None:
        return x509.random_serial_number()
    return int.from_bytes(hmac.new(seed, b"serial|" + label.encode(), hashlib.sha256).digest()[:19], "big") | 1


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_ca(now: dt.datetime, lifetime: float, common_name: str) -> KeyPair:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(seconds=lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _san(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def issue(
    ca: KeyPair, now: dt.datetime, lifetime: float, common_name: str, *, server_names: Sequence[str] = (),
    client: bool = False, seed: bytes | None = None,
) -> KeyPair:
    """A leaf certificate signed by ``ca``: a server one when ``server_names`` is given, else a
    client one; reproducible byte for byte when a ``seed`` is given."""
    ca_cert = ca.cert
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    label = f"{common_name}|{','.join(server_names)}|{client}|{now.isoformat()}|{lifetime}"
    key = _new_key(seed, label)
    not_after = min(now + dt.timedelta(seconds=lifetime), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial(seed, label))
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
                content_commitment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    # Client certificates name the agent in a SAN too: strict verifiers (RFC 5280 profiles) require one.
    sans = list(server_names) or [common_name]
    builder = builder.add_extension(x509.SubjectAlternativeName(_san(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256(), ecdsa_deterministic=seed is not None or None)
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def load(cert_pem: bytes | None, key_pem: bytes | None) -> KeyPair | None:
    """A stored pair, or None when missing, unparsable, or the key does not match the certificate."""
    if not cert_pem or not key_pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError):
        return None
    if key.public_key() != cert.public_key():
        return None
    return KeyPair(cert_pem, key_pem)


def _fresh(pair: KeyPair, now: dt.datetime, margin: float) -> bool:
    cert = pair.cert
    return cert.not_valid_before_utc <= now + _BACKDATE and now < cert.not_valid_after_utc - dt.timedelta(
        seconds=margin
    )


def _signed_by(pair: KeyPair, ca: KeyPair) -> bool:
    try:
        pair.cert.verify_directly_issued_by(ca.cert)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _names(pair: KeyPair) -> set[str]:
    try:
        ext = pair.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


def _still_valid(cert_pem: bytes | None, now: dt.datetime) -> bytes | None:
    if not cert_pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    return cert_pem if now < cert.not_valid_after_utc else None


def _leaf_due(leaf: KeyPair, ca: KeyPair, now: dt.datetime, margin: float) -> bool:
    """A leaf is renewed ``margin`` before it expires, unless its life was capped at the CA's
    end: renewing it under the same CA would not extend it, the CA switch will."""
    cert, ca_end = leaf.cert, ca.cert.not_valid_after_utc
    if cert.not_valid_before_utc > now + _BACKDATE:
        return True  # issued by a clock ahead of ours
    if cert.not_valid_after_utc >= ca_end - dt.timedelta(seconds=1):
        return now >= ca_end
    return now >= cert.not_valid_after_utc - dt.timedelta(seconds=margin)


def ensure(
    stored: Mapping[str, KeyPair | None],
    *,
    now: dt.datetime,
    server_names: Sequence[str],
    lifetime: float,
    ca_lifetime: float,
    margin: float,
    ca_name: str,
    previous_ca: bytes | None = None,
    seed: bytes | None = None,
) -> TLSMaterial:
    """Keep valid stored material, replace what is missing, wrong, or due for rotation.

    ``stored`` maps "ca", "next_ca", "server", "client" and "api_client" to what the
    Secrets hold (or None); ``previous_ca`` is the CA certificate kept from the last
    rotation (PEM); ``seed`` makes new leaves reproducible (see the module's docstring).

    Leaves are renewed ``margin`` before they expire. The CA rotates in two phases, so
    that no peer ever meets a certificate it does not trust yet:

    1. from ``margin`` before the CA expires: a next CA is made and joins the bundle,
       leaves are still signed by the current CA; pods roll and learn the next CA;
    2. from ``margin / 2`` before expiry: the next CA becomes the signing CA, leaves are
       re-issued by it, the old CA stays in the bundle (as previous) until it expires.
    """
    ca = stored.get("ca")
    nxt = stored.get("next_ca")
    previous = _still_valid(previous_ca, now)
    if ca is None or ca.cert.not_valid_before_utc > now + _BACKDATE:
        ca, nxt, previous = new_ca(now, ca_lifetime, ca_name), None, None
    else:
        end = ca.cert.not_valid_after_utc
        if now >= end - dt.timedelta(seconds=margin):
            if nxt is None or not _fresh(nxt, now, margin):
                nxt = new_ca(now, ca_lifetime, ca_name)  # phase 1
            if now >= end - dt.timedelta(seconds=margin / 2):
                previous, ca, nxt = _still_valid(ca.cert_pem, now), nxt, None  # phase 2
        elif nxt is not None and not _fresh(nxt, now, margin):
            nxt = None
    server = stored.get("server")
    if (
        server is None
        or not _signed_by(server, ca)
        or _leaf_due(server, ca, now, margin)
        or _names(server) != {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in server_names}
    ):
        server = issue(ca, now, lifetime, server_names[0], server_names=server_names, seed=seed)
    client = stored.get("client")
    if client is None or not _signed_by(client, ca) or _leaf_due(client, ca, now, margin):
        client = issue(ca, now, lifetime, CLIENT_COMMON_NAME, client=True, seed=seed)
    api_client = stored.get("api_client")
    if api_client is None or not _signed_by(api_client, ca) or _leaf_due(api_client, ca, now, margin):
        api_client = issue(ca, now, lifetime, API_CLIENT_COMMON_NAME, client=True, seed=seed)
    return TLSMaterial(ca, server, client, previous, nxt, api_client)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
