"""TLS material: verification against the CA, a real mutual-TLS handshake, rotation.

The handshake test runs flowscope's IPFIX TLS collecting process (what the aggregator
listens with) on loopback with the server certificate, key and CA exactly as the operator
stores them, and exporting processes with the agents' client certificate: records from
the agent arrive; a certificate from another CA is refused in the handshake and counted.
Rotation uses an injected clock: no sleeping.
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


async def until(pred, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


async def test_aggregator_listener_accepts_the_agents_certificate_and_refuses_another_ca(tmp_path):
    """flowscope's own IPFIX TLS collecting process (what the aggregator listens with),
    loaded with the files exactly as the operator mounts them (ca.crt, tls.crt, tls.key of
    the server Secret), and exporting processes loaded like the agents' Secret."""
    from flowscope.ipfix import Address, Template
    from flowscope.ipfix.collecting import CollectingProcess
    from flowscope.ipfix.exporting import ExportingProcess
    from flowscope.ipfix.transport import TLSConfig

    now = dt.datetime.now(dt.timezone.utc)
    m = material_for(spec(), now)
    other = material_for(spec(), now)  # same names, another CA
    (tmp_path / "ca.crt").write_bytes(m.ca.cert_pem)
    server_cert, server_key = write(tmp_path, "server", m.server)
    template = Template.build(256, ["sourceIPv4Address", "destinationIPv4Address", "octetDeltaCount"])
    received: list[dict] = []

    def on_message(peer, message) -> None:
        received.extend(r for _, r in message.data_records())

    server_tls = TLSConfig(server_cert, server_key, str(tmp_path / "ca.crt"))
    async with CollectingProcess(Address("127.0.0.1", 0, "tls"), tls=server_tls, on_message=on_message) as collector:
        addr = Address("127.0.0.1", collector.port, "tls")
        # the agent checks the name the operator puts in agent.yaml's tls.serverName
        agent_tls = TLSConfig(*write(tmp_path, "agent", m.client), str(tmp_path / "ca.crt"),
                              server_name="flow-aggregator.flow-aggregator.svc")
        sent = [{"sourceIPv4Address": "10.0.0.1", "destinationIPv4Address": f"10.0.1.{i}", "octetDeltaCount": 1000 + i}
                for i in range(1, 6)]
        agent = ExportingProcess(addr, tls=agent_tls, templates=[template])
        await agent.start()
        assert agent.submit(256, sent)
        await until(lambda: len(received) == len(sent))
        assert sorted(r["octetDeltaCount"] for r in received) == [r["octetDeltaCount"] for r in sent]
        await agent.close()

        stranger_tls = TLSConfig(*write(tmp_path, "stranger", other.client), str(tmp_path / "ca.crt"),
                                 server_name="flow-aggregator.flow-aggregator.svc")
        stranger = ExportingProcess(addr, tls=stranger_tls, templates=[template], backoff_initial=0.05,
                                    backoff_max=0.05)
        await stranger.start()
        stranger.submit(256, [{"sourceIPv4Address": "10.9.9.9", "destinationIPv4Address": "10.9.9.8",
                               "octetDeltaCount": 666}])
        await until(lambda: collector.stats.tls_refused >= 1)
        await stranger.close()
        assert len(received) == len(sent)  # nothing from the stranger got through

    # and an agent refuses a listener whose certificate another CA signed
    evil_tls = TLSConfig(*write(tmp_path, "evil", other.server), str(tmp_path / "ca.crt"))
    # (the evil listener trusts our agents' CA so that only the agent's check can refuse)
    async with CollectingProcess(Address("127.0.0.1", 0, "tls"), tls=evil_tls, on_message=on_message) as evil:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        ctx.load_cert_chain(*write(tmp_path, "agent2", m.client))
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", evil.port, ssl=ctx,
                                          server_hostname="flow-aggregator.flow-aggregator.svc")


def ensure(stored, now, names=("fa.ns.svc",), lifetime=30 * 24 * HOUR, margin=7 * 24 * HOUR):
    return tls.ensure(stored, now=now, server_names=names, lifetime=lifetime, ca_lifetime=365 * 24 * HOUR,
                      margin=margin, ca_name="test-ca")


def stored(m: tls.TLSMaterial):
    return {"ca": m.ca, "server": m.server, "client": m.client, "api_client": m.api_client}


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


def certs_in(bundle: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle)


def verifies(leaf: tls.KeyPair, bundle: bytes, at: dt.datetime, server: bool) -> bool:
    builder = PolicyBuilder().store(Store(certs_in(bundle))).time(at)
    try:
        if server:
            builder.build_server_verifier(DNSName("fa.ns.svc")).verify(leaf.cert, [])
        else:
            builder.build_client_verifier().verify(leaf.cert, [])
        return True
    except VerificationError:
        return False


def test_the_ca_rotates_in_two_phases_without_breaking_trust():
    day = dt.timedelta(days=1)

    def at(m, days):  # CA 365 days, leaves 30, margin 7: phase 1 from day 358, phase 2 from day 361.5
        return tls.ensure({"ca": m.ca, "next_ca": m.next_ca, "server": m.server, "client": m.client,
                           "api_client": m.api_client},
                          now=NOW + days * day, server_names=("fa.ns.svc",), lifetime=30 * 24 * HOUR,
                          ca_lifetime=365 * 24 * HOUR, margin=7 * 24 * HOUR, ca_name="test-ca",
                          previous_ca=m.previous_ca)

    m0 = ensure({}, NOW)
    m = m0
    for d in range(23, 358, 20):  # leaf renewals under the same CA, no CA change
        m = at(m, d)
    assert m.ca == m0.ca and m.next_ca is None and len(certs_in(m.bundle)) == 1
    before = m
    phase1 = at(before, 358.5)
    assert phase1.ca == before.ca and phase1.next_ca is not None  # the next CA is only trusted
    assert (phase1.server, phase1.client) == (before.server, before.client)
    assert len(certs_in(phase1.bundle)) == 2
    assert at(phase1, 359) == phase1  # stable: no churn while pods roll
    phase2 = at(phase1, 362)
    assert phase2.ca == phase1.next_ca and phase2.next_ca is None
    assert phase2.previous_ca == before.ca.cert_pem
    t = NOW + 362 * day
    # every mix of old and new peers still verifies: old bundle (phase 1) trusts new leaves,
    # new bundle trusts old leaves
    assert verifies(phase2.server, phase1.bundle, t, server=True)
    assert verifies(phase2.client, phase1.bundle, t, server=False)
    assert verifies(phase1.server, phase2.bundle, t, server=True)
    assert verifies(phase1.client, phase2.bundle, t, server=False)
    # while a bundle of the old CA alone (no two phases) would not have trusted the new leaves
    assert not verifies(phase2.server, before.bundle, t, server=True)
    after = at(phase2, 366)  # the old CA expired: no longer trusted
    assert after.previous_ca is None and len(certs_in(after.bundle)) == 1


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
