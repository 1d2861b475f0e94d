"""Offline rendering: custom resources in, the manifests the operator would apply out.

``flowscope render -f CR.yaml`` serves GitOps pipelines and reviews: no cluster, no
state. FlowAggregators are rendered first so that FlowExporterConfigs referencing one in
the same input get its address, transport and client certificate.

Deterministic output, three ways: ``secrets=False`` leaves every Secret out (the ones
rendered and the ones passed through from the input: no credential is ever printed in
plain text then); a given CA (``ca``) makes the certificates and the API token
reproducible from it (tls.py's deterministic mode, validity windows anchored on the CA's
start, so a re-render gives the same bytes until the rotation margin is reached); or
cert-manager (``spec.certificates.issuerRef``), whose Certificate objects replace the
Secrets. Without any of these, fresh TLS material is made on every run. Objects in the
input that are not flowscope resources (a Namespace) pass through unchanged, so the
output applies on its own. The pod templates carry the same ``flowscope.dev/config-hash``
as the operator writes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets as _secrets
from collections.abc import Iterable, Mapping
from typing import Any

from flowscope.operator import manifests, tls
from flowscope.operator.spec import (
    API_VERSION, MUTUAL_TLS, FlowAggregatorSpec, SpecError, parse_flow_aggregator, parse_flow_exporter_config,
)

__all__ = ["render_documents", "material_for"]


def material_for(spec: FlowAggregatorSpec, now: dt.datetime, ca: tls.KeyPair | None = None) -> tls.TLSMaterial:
    """TLS material for a FlowAggregator: fresh, or reproducible from a given CA."""
    names = (*spec.service_dns_names, spec.flow_aggregator_address)
    names = tuple(dict.fromkeys(names))  # keep order, drop duplicates
    c = spec.certificates
    if ca is None:
        return tls.ensure({}, now=now, server_names=names, lifetime=c.lifetime, ca_lifetime=c.ca_lifetime,
                          margin=c.rotation_margin, ca_name=f"flowscope-ca {spec.namespace}/{spec.name}")
    # the leaves' validity starts at the CA's start plus whole renewal periods: every render
    # within one period agrees, and the next period renews before the margin is reached
    start = ca.cert.not_valid_before_utc + tls._BACKDATE
    period = dt.timedelta(seconds=max(c.lifetime - c.rotation_margin, 3600))
    anchor = start + period * max(0, (now - start) // period)
    return tls.ensure({"ca": ca}, now=anchor, server_names=names, lifetime=c.lifetime, ca_lifetime=c.ca_lifetime,
                      margin=c.rotation_margin, ca_name="", seed=ca.key_pem)


def api_token_for(spec: FlowAggregatorSpec, ca: tls.KeyPair | None, purpose: str = "api-token") -> bytes:
    """A bearer token (the flow-records API's, or with ``purpose="ui-token"`` the deployed
    collector's): reproducible from a given CA, else random."""
    if ca is None:
        return _secrets.token_hex(32).encode()
    return hmac.new(ca.key_pem, f"{purpose}|{spec.namespace}/{spec.name}".encode(), hashlib.sha256).hexdigest().encode()


def _label(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{body.get('kind')} {meta.get('namespace') or 'default'}/{meta.get('name')}"


def render_documents(
    documents: Iterable[Mapping[str, Any]], *, image: str, secrets: bool = True, now: dt.datetime | None = None,
    default_namespace: str = "default", ca: tls.KeyPair | None = None, left_out: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Render every flowscope resource in ``documents``; raise SpecError naming each bad one.

    ``left_out`` collects the input Secrets dropped under ``secrets=False``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    docs = []
    for doc in documents:
        doc = dict(doc)
        meta = dict(doc.get("metadata") or {})
        if doc.get("apiVersion") == API_VERSION and not meta.get("namespace"):
            meta["namespace"] = default_namespace
            doc["metadata"] = meta
        docs.append(doc)
    problems: list[str] = []
    passthrough: list[dict[str, Any]] = []
    aggregators: dict[tuple[str, str], tuple[FlowAggregatorSpec, tls.TLSMaterial | None]] = {}
    out: list[dict[str, Any]] = []
    for doc in docs:
        if doc.get("apiVersion") != API_VERSION:
            if doc.get("kind") == "Secret" and not secrets:
                if left_out is not None:
                    left_out.append(_label(doc))
                continue
            passthrough.append(doc)
            continue
        if doc.get("kind") == "FlowAggregator":
            try:
                spec = parse_flow_aggregator(doc)
            except SpecError as exc:
                problems += [f"{_label(doc)}: {p}" for p in exc.problems]
                continue
            own_tls = spec.transport in MUTUAL_TLS and spec.certificates.issuer is None and secrets
            material = material_for(spec, now, ca) if own_tls else None
            aggregators[(spec.namespace, spec.name)] = (spec, material)
            token = api_token_for(spec, ca) if secrets and manifests.api_mode(spec) == "token" else None
            ui_token = api_token_for(spec, ca, "ui-token") if secrets and spec.collector.enabled else None
            out += manifests.build_aggregator(spec, image=image, tls=material, secrets=secrets, api_token=token,
                                              ui_token=ui_token)
        elif doc.get("kind") != "FlowExporterConfig":
            problems.append(f"{_label(doc)}: unknown kind; expected FlowAggregator or FlowExporterConfig")
    for doc in docs:
        if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "FlowExporterConfig":
            continue
        try:
            fec = parse_flow_exporter_config(doc)
            found = None
            if fec.aggregator_ref is not None:
                found = aggregators.get((fec.aggregator_ref.namespace, fec.aggregator_ref.name))
                if found is None:
                    ref = fec.aggregator_ref
                    raise SpecError([
                        f"spec.flowAggregatorRef: FlowAggregator {ref.namespace}/{ref.name} is not among the "
                        "rendered files; pass its file with another -f, or render these agents with an explicit "
                        "spec.flowCollectorAddr instead of the reference"
                    ])
            collector, server_name = manifests.resolve_collector(fec, found[0] if found else None)
            agent_tls = manifests.AgentTLS.from_material(found[1]) if found and found[1] else None
            cm = manifests.agent_cert_manager(fec, found[0] if found else None)
            out += manifests.build_agent(
                fec, image=image, collector=collector, server_name=server_name, tls=agent_tls, secrets=secrets,
                cert_manager=cm,
            )
        except SpecError as exc:
            problems += [f"{_label(doc)}: {p}" for p in exc.problems]
    if problems:
        raise SpecError(problems)
    return passthrough + out
