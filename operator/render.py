"""Offline rendering: custom resources in, the manifests the operator would apply out.

``flowscope render -f CR.yaml`` serves GitOps pipelines and reviews: no cluster, no
state. FlowAggregators are rendered first so that FlowExporterConfigs referencing one in
the same input get its address, transport and client certificate. TLS material is
generated fresh on every run (it cannot be reused without a cluster); ``secrets=False``
leaves the Secrets out and keeps the output deterministic. Objects in the input that are
not flowscope resources (a Namespace, a Secret) pass through unchanged, so the output
applies on its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from flowscope.operator import manifests, tls
from flowscope.operator.spec import (
    API_VERSION, FlowAggregatorSpec, SpecError, parse_flow_aggregator, parse_flow_exporter_config,
)

__all__ = ["render_documents", "material_for"]


def material_for(spec: FlowAggregatorSpec, now: dt.datetime) -> tls.TLSMaterial:
    """Fresh TLS material for a FlowAggregator (nothing stored to reuse)."""
    names = (*spec.service_dns_names, spec.flow_aggregator_address)
    names = tuple(dict.fromkeys(names))  # keep order, drop duplicates
    return tls.ensure(
        {}, now=now, server_names=names, lifetime=spec.certificates.lifetime,
        ca_lifetime=spec.certificates.ca_lifetime, margin=spec.certificates.rotation_margin,
        ca_name=f"flowscope-ca {spec.namespace}/{spec.name}",
    )


def _label(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{body.get('kind')} {meta.get('namespace') or 'default'}/{meta.get('name')}"


def render_documents(
    documents: Iterable[Mapping[str, Any]], *, image: str, secrets: bool = True, now: dt.datetime | None = None,
    default_namespace: str = "default",
) -> list[dict[str, Any]]:
    """Render every flowscope resource in ``documents``; raise SpecError naming each bad one."""
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
            passthrough.append(doc)
            continue
        if doc.get("kind") == "FlowAggregator":
            try:
                spec = parse_flow_aggregator(doc)
            except SpecError as exc:
                problems += [f"{_label(doc)}: {p}" for p in exc.problems]
                continue
            material = material_for(spec, now) if spec.transport == "tls" else None
            aggregators[(spec.namespace, spec.name)] = (spec, material)
            out += manifests.build_aggregator(spec, image=image, tls=material, secrets=secrets)
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
                        "rendered files; pass its file with another -f"
                    ])
            collector, server_name = manifests.resolve_collector(fec, found[0] if found else None)
            agent_tls = manifests.AgentTLS.from_material(found[1]) if found and found[1] else None
            out += manifests.build_agent(
                fec, image=image, collector=collector, server_name=server_name, tls=agent_tls, secrets=secrets
            )
        except SpecError as exc:
            problems += [f"{_label(doc)}: {p}" for p in exc.problems]
    if problems:
        raise SpecError(problems)
    return passthrough + out
