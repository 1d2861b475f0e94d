"""TLS material: verification against the CA, a real mutual-TLS handshake, rotation.

The handshake test runs a server with Python's ssl module configured the way the
aggregator's TLS listener must be (server certificate and key from the operator's
Secret, client certificates required and verified against the operator's CA) on a
loopback port, because flowscope.ipfix has no TLS collecting process yet at the time of
writing. A client with the agents' certificate is accepted; one with a certificate from
another CA is refused. Rotation uses an injected clock: no sleeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from flowscope.operator import tls
from flowscope.operator.render import material_for
from flowscope.operator.spec import parse_flow_aggregator

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
HOUR = 3600.0


def spec(**extra):
    return parse_flow_aggregator({"kind": "FlowAggregator", "metadata": {"name": "flow-aggregator",
                                  "namespace": "flow-aggregator"}, "spec": extra})


def test_server_certificate_verifies_for_every_service_name():
    s = spec(flowAggregatorAddress="10.96.0.10")
    m = material_for(s, NOW)
    verifier = PolicyBuilder().store(Store([m.ca.cert])).time(NOW).build_server_verifier
    for name in ("flow-aggregator.flow-aggregator.svc", "flow-aggregator.flow-aggregator.svc.cluster.local",
                 "flow-aggregator.flow-aggregator", "flow-aggregator"):
        chain = verifier(DNSName(name)).verify(m.server.cert, [])
        assert chain[-1] == m.ca.cert
    ip = x509.IPAddress(__import__("ipaddress").ip_address("10.96.0.10"))
    verifier(ip).verify(m.server.cert, [])
    with pytest.raises(VerificationError):
        verifier(DNSName("evil.example.com")).verify(m.server.cert, [])
    client = PolicyBuilder().store(Store([m.ca.cert])).time(NOW).build_client_verifier()
    assert client.verify(m.client.cert, []).subjects is not None


def write(tmp: Path, name: str, pair: tls.KeyPair) -> tuple[str, str]:
    (tmp / f"{name}.crt").write_bytes(pair.cert_pem)
    (tmp / f"{name}.key").write_bytes(pair.key_pem)
    return str(tmp / f"{name}.crt"), str(tmp / f"{name}.key")


async def test_mutual_tls_handshake_accepts_agents_and_refuses_another_ca(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    m = material_for(spec(), now)
    other = material_for(spec(), now)  # same names, a different CA
    (tmp_path / "ca.crt").write_bytes(m.ca.cert_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    server_ctx.load_cert_chain(*write(tmp_path, "server", m.server))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    received: list[bytes] = []

    async def handle(reader, writer):
        try:
            received.append(await reader.read(64))
            writer.write(b"ok")
            await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]

    async def connect(client_pair: tls.KeyPair, name: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        ctx.load_cert_chain(*write(tmp_path, name, client_pair))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="flow-aggregator.flow-aggregator.svc")
        writer.write(b"ipfix-hello")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(2), 5)
        writer.close()
        return answer

    async with server:
        assert await connect(m.client, "agent") == b"ok"
        assert received == [b"ipfix-hello"]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            answer = await connect(other.client, "stranger")
            if answer != b"ok":  # TLS 1.3: the refusal may only show on the first read
                raise ConnectionError("refused")
        assert received == [b"ipfix-hello"]  # nothing from the stranger got through
        # and the agent refuses a server of another CA (its serverName check passes, the chain does not)
        evil_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        evil_ctx.load_cert_chain(*write(tmp_path, "evil", other.server))
        evil = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=evil_ctx)
        async with evil:
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", evil.sockets[0].getsockname()[1], ssl=ctx,
                                              server_hostname="flow-aggregator.flow-aggregator.svc")


def ensure(stored, now, names=("fa.ns.svc",), lifetime=30 * 24 * HOUR, margin=7 * 24 * HOUR):
    return tls.ensure(stored, now=now, server_names=names, lifetime=lifetime, ca_lifetime=365 * 24 * HOUR,
                      margin=margin, ca_name="test-ca")


def stored(m: tls.TLSMaterial):
    return {"ca": m.ca, "server": m.server, "client": m.client}


def test_material_is_reused_while_fresh_and_rotated_within_the_margin():
    first = ensure({}, NOW)
    assert ensure(stored(first), NOW + dt.timedelta(days=10)) == first  # restarts change nothing
    # lifetime 30 days, margin 7 days: due from day 23 on
    assert ensure(stored(first), NOW + dt.timedelta(days=22, hours=23)) == first
    rotated = ensure(stored(first), NOW + dt.timedelta(days=23, minutes=1))
    assert rotated.ca == first.ca  # the CA (one year) is not due
    assert rotated.server != first.server and rotated.client != first.client
    assert rotated.server.not_after > first.server.not_after
    later = NOW + dt.timedelta(days=23, minutes=1)
    PolicyBuilder().store(Store([rotated.ca.cert])).time(later).build_server_verifier(
        DNSName("fa.ns.svc")).verify(rotated.server.cert, [])
    assert rotated.server.not_after - later > dt.timedelta(days=29)  # rotated *before* expiry, full lifetime


def test_a_due_ca_reissues_everything():
    first = ensure({}, NOW)
    later = NOW + dt.timedelta(days=360)
    fresh = ensure(stored(first), later)
    assert fresh.ca != first.ca
    fresh.server.cert.verify_directly_issued_by(fresh.ca.cert)
    fresh.client.cert.verify_directly_issued_by(fresh.ca.cert)


def test_changed_names_damaged_or_foreign_material_is_replaced():
    first = ensure({}, NOW)
    renamed = ensure(stored(first), NOW, names=("fa.ns.svc", "10.0.0.1"))
    assert renamed.ca == first.ca and renamed.server != first.server and renamed.client == first.client
    broken = {**stored(first), "server": tls.load(first.server.cert_pem, first.client.key_pem)}
    assert broken["server"] is None  # the key does not belong to the certificate
    assert tls.load(b"garbage", b"garbage") is None
    foreign = ensure({}, NOW)
    mixed = ensure({**stored(first), "client": foreign.client}, NOW)
    assert mixed.server == first.server and mixed.client != foreign.client
    mixed.client.cert.verify_directly_issued_by(first.ca.cert)
