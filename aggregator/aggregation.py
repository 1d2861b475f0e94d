"""Correlation and aggregation of agent flow records: the heart of the Flow Aggregator.

Sans-IO: :class:`AggregationProcess` takes decoded agent records (plain dicts keyed by IE
name, as ``flowscope.ipfix`` decodes them) with the time passed in, and hands back the
aggregated records to export. It knows nothing of sockets, queues or sinks, so every
timeout is driven by the caller's clock and tested without sleeping.

Theory of operation
-------------------
*Store.* One :class:`Flow` per connection, in a dict keyed by the 5-tuple (source IP,
destination IP, source port, destination port, protocol). Past ``max_flows`` a record of a
new connection is dropped and counted (``stats.dropped_flow_cap``); memory stays flat.
``max_flow_bytes`` bounds what the flows hold in bytes too (an estimate: a fixed cost per
flow plus the length of its Kubernetes strings, which a peer chooses), so that a few
thousand flows with 60 KB names cannot take what 500k ordinary ones would; a new flow past
it is dropped and counted (``stats.dropped_flow_bytes``). A
record without a flow key, or with a value of a type no agent sends, is dropped and
counted (``stats.dropped_invalid``), never raised. ``ingest_many`` takes the records of
one IPFIX message in one call (the hot path); ``ingest`` takes one.

*Sides.* Each agent record comes from the source node (it has ``sourcePodName``, or
``sourceNodeName``) or the destination node (``destinationPodName`` /
``destinationNodeName``). A flow keeps the statistics of each side apart, 8 numbers per
side (4 totals, 4 accumulated deltas) among its 26 counters (``Flow.c``), and each side's
Kubernetes fields as one interned tuple (the same Pod talks on many connections, so the
tuples are shared), which is what keeps a flow small.

*Correlation.* flowType 1 (intra-node), 3 (to-external) and 4 (from-external) records are
complete on arrival: one node saw both ends. An inter-node flow (flowType 2) waits for
its twin from the other node; when both halves are there they are merged: each field is
taken from the node that owns it (source Pod, source node, Service and egress policy
from the source node; destination Pod, destination node and ingress policy from the
destination node), falling back to the other half when the owner left it empty. A half
that is still alone after ``correlation_timeout`` is exported alone, marked
``correlation="uncorrelated"`` (and its missing node's name stays empty in the record),
and counted. A half whose twin shows up later is merged then (``late_correlated``).
A denied flow (ingress or egress rule action 2 Drop or 3 Reject) is exported at the next
tick after its first record, without waiting for the twin. A flow the source node's
egress policy denied never reaches the destination node: it is complete with its one
half (``correlation="denied"``) and not counted as uncorrelated. So is a record that names
no Pod and no Node at all (host traffic): ``correlation="unattributed"``, exported with
flowType 0 as the agent sent it (unknown), not as an inter-node flow.

*Aggregation.* Totals take the newest value. Deltas are computed from the totals (robust
to a lost record: the next one carries the difference) and accumulate between exports;
an export resets them. The first record of a side contributes its own delta fields (the
agent's delta since its last export), so an aggregator restart does not re-count a
connection's history. A total that goes backwards means conntrack reused the 5-tuple for
a new connection: its totals are taken as the new connection's delta (never a wrapped
huge difference) and counted (``counter_resets``) - unless the record is also older than
the side's last report (its flowEndSeconds is earlier): then it is a report overtaken by a
newer one on the way (UDP reordering), dropped and counted (``dropped_stale``), never
counted twice. The flow's own counters
(packetTotalCount...) are the source node's when it reported, else the destination
node's (when the source node's first record comes after the flow was exported from the
destination node's, as for a connection denied at the destination, the flow's deltas do
not count again what they already counted: see ``_SWITCHED``); the 16 ``...FromSourceNode`` / ``...FromDestinationNode`` elements carry each
node's numbers (an intra-node flow's one node is both). flowStartSeconds,
flowEndSeconds, flowEndReason and tcpState come from the newest record.
originalExporterIPv4Address (or ...IPv6Address) and originalObservationDomainId name
the agent of the source side (else the destination side).

*Export.* ``tick(now)`` returns what is due: every ``export_interval`` each ready flow
that changed since its last export (nothing when nothing changed: new counts, new
Kubernetes fields, a new TCP state or an end are changes; an idle/active timeout flip of
flowEndReason alone is not); at once, lone halves
whose correlation wait is over, denied flows' first records, and flows that ended
(flowEndReason 3 end of flow, 4 forced end, 5 lack of resources; an inter-node flow ends
when both nodes said so, or ``correlation_timeout`` after the first did). A flow without
records for ``inactive_timeout`` is exported a last time (if it changed) and dropped.
Timers are a FIFO: every wait has the same length, so deadlines arrive in order and the
tick only looks at the head; the periodic scan is the one O(flows) step, once per
interval, and ``tick(now, max_scan=N)`` spreads it over several calls.

*Memory.* Where the C accelerator serves, a flow is an ``_aggr.Flow`` (aggregator/_aggr.c):
one object of 312 bytes, not tracked by the cycle collector, with its counters inline
(the four seconds among them in 32 bits, as IPFIX carries them), its ports, protocol,
flags, reason, type and observation domains as C integers, and no key tuple: the flows
dict is keyed by the Flow itself, which hashes and compares as its 5-tuple, so
``flows.get(key)`` finds it. About 376 bytes a held flow in all (dict entry and timer
included), against 576 for this module's :class:`Flow` (slots, an ``array('Q')``, a key
tuple). Both types read and write alike (``Flow.c`` indexes, slices and assigns as the
array does), so the twin's code runs on either; a value outside a C field's range (a
port past 65535, a second past 2^32: only a malformed record the twin takes brings one)
is kept exactly, as an object (``Flow.odd``), and the C loops leave such a flow to the twin.

*Accelerator.* aggregator/_aggr.c runs the per-record loops in C over these same objects:
``ingest_many`` (:meth:`AggregationProcess._ingest_py` is its twin), the export of a flow
(``_export``), its record (:func:`_build_record_py`) and the periodic scan's loop over the
flows it only exports or skips (``_scan`` takes over at a flow past its inactivity timeout). It takes the records an agent
sends and hands any other (a missing field, an odd type, a counter past 2^64) whole to the
twin, so both give the same results (tests/aggregator/test_aggregator_accel.py). Without a
compiler, or with ``FLOWSCOPE_AGGREGATOR_PURE=1``, the twin serves, and says so once.

*Records.* The C export's record is no dict: an ``_aggr.Record``, a snapshot of the flow
at export (its numbers copied as C integers, references to its address, TCP state and
exporter strings and to the merged Kubernetes tuple, all immutable), about 390 bytes
against some 2.5 KB for a dict of 71 values and their int objects. It is a read-only
Mapping of the same names in the same order (``dict(record)`` is the twin's dict,
``record == dict`` compares as it), for the flow log, the API and tests; the sinks read
its values without names: the ClickHouse sink's columns and the IPFIX sink's data sets
are written from them in C (aggregator/clickhouse_sink.py ``flows_columns``,
aggregator/sinks.py ``data_records``), exactly what collector.rows and the codec make of
the dicts (tests/aggregator/test_aggregator_snapshots.py). The twin's records stay dicts,
and so does the record of a flow the twin lays out (odd values), and the HTTP API's
(``snapshot``/``render``: build_record).
"""

from __future__ import annotations

import logging
from array import array
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from operator import itemgetter
from typing import Any

from flowscope.ipfix import antrea
from flowscope.ipfix.accel import optional_extension, say_once

__all__ = [
    "AggregationProcess", "ExportedFlow", "Flow", "FlowFilter", "AggregationStats",
    "KUBERNETES_FIELDS", "output_names", "accelerated", "PURE_ENV",
]

log = logging.getLogger("flowscope.aggregator")

# Antrea's vocabulary, defined once in flowscope.ipfix.antrea: flowType values, the rule
# actions that deny (Drop, Reject), the flowEndReasons that end a connection.
INTRA_NODE, INTER_NODE = antrea.FLOW_TYPE_INTRA_NODE, antrea.FLOW_TYPE_INTER_NODE
TO_EXTERNAL, FROM_EXTERNAL = antrea.FLOW_TYPE_TO_EXTERNAL, antrea.FLOW_TYPE_FROM_EXTERNAL
DENY_ACTIONS = antrea.DENY_ACTIONS
END_REASONS = antrea.ENDED_REASONS

SRC, DST = 0, 1



_SRC_OWNED_V = (
    "sourcePodNamespace", "sourcePodName", "sourceNodeName",
    "destinationClusterIP{fam}", "destinationServicePort", "destinationServicePortName",
    "egressNetworkPolicyName", "egressNetworkPolicyNamespace", "egressNetworkPolicyType",
    "egressNetworkPolicyRuleName", "egressNetworkPolicyRuleAction",
    "destinationServiceIP{fam}", "proxySnatIP{fam}", "proxySnatPort", "egressName", "egressIP", "egressNodeName",
)
_DST_OWNED = (
    "destinationPodNamespace", "destinationPodName", "destinationNodeName",
    "ingressNetworkPolicyName", "ingressNetworkPolicyNamespace", "ingressNetworkPolicyType",
    "ingressNetworkPolicyRuleName", "ingressNetworkPolicyRuleAction",
)
# The Pod labels, optional in agent records (Antrea's agents send them only when told to):
# read apart from the rest so that a record without them stays on the fast path.
LABEL_FIELDS = ("sourcePodLabels", "destinationPodLabels")


def _kubernetes_fields(fam: str) -> tuple[str, ...]:
    return tuple(n.format(fam=fam) for n in _SRC_OWNED_V) + _DST_OWNED


# The Kubernetes, policy, Service, SNAT and Egress fields of agent records, each owned by
# one side; addresses are the flow's family (a side keeps them as one tuple in this order,
# followed by the two label fields).
KUBERNETES_FIELDS: tuple[tuple[str, ...], tuple[str, ...]] = (_kubernetes_fields("v4"), _kubernetes_fields("v6"))
_META_NAMES = (KUBERNETES_FIELDS[0] + LABEL_FIELDS, KUBERNETES_FIELDS[1] + LABEL_FIELDS)
_N_SRC_OWNED = len(_SRC_OWNED_V)
_N_META = len(KUBERNETES_FIELDS[0])
# which side owns field i of a side's tuple: the source node (0) or the destination node (1)
_OWNER = tuple(0 if i < _N_SRC_OWNED else 1 for i in range(_N_META)) + (0, 1)
_idx = KUBERNETES_FIELDS[0].index
_I_SRC_POD, _I_SRC_NODE, _I_EGRESS_ACTION = _idx("sourcePodName"), _idx("sourceNodeName"), _idx("egressNetworkPolicyRuleAction")
_I_DST_POD, _I_DST_NODE, _I_INGRESS_ACTION = (
    _idx("destinationPodName"), _idx("destinationNodeName"), _idx("ingressNetworkPolicyRuleAction"))
_INT_FIELDS = frozenset((
    "destinationServicePort", "egressNetworkPolicyType", "egressNetworkPolicyRuleAction",
    "ingressNetworkPolicyType", "ingressNetworkPolicyRuleAction", "proxySnatPort",
))
_META_DEFAULTS: tuple[tuple[Any, ...], tuple[Any, ...]] = tuple(  # type: ignore[assignment]
    tuple(0 if n in _INT_FIELDS else "0.0.0.0" if n.endswith("IPv4") else "::" if n.endswith("IPv6") else ""
          for n in names)
    for names in _META_NAMES
)
_NO_LABELS = (None, None)
_FLOW_FIELDS = (
    "sourceTransportPort", "destinationTransportPort", "protocolIdentifier",
    "packetTotalCount", "octetTotalCount", "reversePacketTotalCount", "reverseOctetTotalCount",
    "flowStartSeconds", "flowEndSeconds", "flowEndReason", "flowType", "tcpState",
)
_GET_V4_NAMES = ("sourceIPv4Address", "destinationIPv4Address", *_FLOW_FIELDS)
_GET_V6_NAMES = ("sourceIPv6Address", "destinationIPv6Address", *_FLOW_FIELDS)
_GET_V4 = itemgetter(*_GET_V4_NAMES)
_GET_V6 = itemgetter(*_GET_V6_NAMES)
_GET_META = (itemgetter(*KUBERNETES_FIELDS[0]), itemgetter(*KUBERNETES_FIELDS[1]))


def _extract(rec: Mapping[str, Any], v6: bool) -> tuple[Any, ...]:
    """The slow path of ``ingest``: the same fields as ``_GET_V4/6``, with defaults."""
    g = rec.get
    fam = "IPv6" if v6 else "IPv4"
    src_ip, dst_ip, proto = g(f"source{fam}Address"), g(f"destination{fam}Address"), g("protocolIdentifier")
    if src_ip is None or dst_ip is None or proto is None:
        raise ValueError("a record without the flow key")
    pt = g("packetTotalCount")
    return (
        src_ip, dst_ip, g("sourceTransportPort") or 0, g("destinationTransportPort") or 0, proto,
        pt, g("octetTotalCount") or 0, g("reversePacketTotalCount") or 0, g("reverseOctetTotalCount") or 0,
        g("flowStartSeconds") or 0, g("flowEndSeconds") or 0, g("flowEndReason") or 0, g("flowType") or 0,
        g("tcpState"), tuple(map(g, _META_NAMES[v6])),
    )


# The aggregated record's layout is antrea.aggregator_fields (the one definition, which the
# IPFIX sink announces as its template): build_record lays its values out in the order
# that suits a Flow (_slot_names) and one C-level itemgetter per record shape puts them in
# template order. The flow's own counters, in Flow.c's order (totals, then deltas):
_C_ORDER = (0, 1, 4, 5, 2, 3, 6, 7)  # positions in antrea.FLOW_COUNTER_FIELDS
COUNTER_FIELDS: tuple[str, ...] = tuple(antrea.FLOW_COUNTER_FIELDS[i] for i in _C_ORDER)
# The same, per node: [source node's, destination node's], as a side's 8 slots in Flow.c.
NODE_COUNTER_FIELDS: tuple[tuple[str, ...], tuple[str, ...]] = (
    tuple(n + antrea.NODE_SUFFIXES[0] for n in COUNTER_FIELDS),
    tuple(n + antrea.NODE_SUFFIXES[1] for n in COUNTER_FIELDS),
)


def _slot_names(ipv6: bool, exporter_ipv6: bool) -> tuple[str, ...]:
    """What build_record's values are, in the order it lays them out."""
    fam = "IPv6" if ipv6 else "IPv4"
    return (
        "flowStartSeconds", "flowEndSeconds", "flowEndReason",
        f"source{fam}Address", f"destination{fam}Address",
        "sourceTransportPort", "destinationTransportPort", "protocolIdentifier",
        *COUNTER_FIELDS,
        *_META_NAMES[ipv6],
        "flowType", "tcpState",
        "originalExporterIPv6Address" if exporter_ipv6 else "originalExporterIPv4Address",
        "originalObservationDomainId",
        *NODE_COUNTER_FIELDS[SRC], *NODE_COUNTER_FIELDS[DST],
        *antrea.AGGREGATOR_TIME_FIELDS,
    )


def output_names(ipv6: bool, exporter_ipv6: bool) -> tuple[str, ...]:
    """The IE names of an aggregated record, in template order (4 shapes: flow and exporter
    family): :func:`flowscope.ipfix.antrea.aggregator_fields`."""
    return antrea.aggregator_fields(6 if ipv6 else 4, 6 if exporter_ipv6 else 4)


def _layout(ipv6: bool, exporter_ipv6: bool) -> tuple[tuple[str, ...], itemgetter[Any]]:
    names, slots = output_names(ipv6, exporter_ipv6), _slot_names(ipv6, exporter_ipv6)
    if sorted(names) != sorted(slots):  # antrea's list gained or lost a field this module does not fill
        raise ImportError(f"the aggregated record's fields and build_record's differ: {set(names) ^ set(slots)}")
    return names, itemgetter(*map(slots.index, names))


_LAYOUT = {(v6, e6): _layout(v6, e6) for v6 in (False, True) for e6 in (False, True)}


# Flow.flags bits. A steady flow's (seen from both sides, correlated, exported, changed or
# not) are all below 256, so its flags are one of CPython's cached small ints, not an int
# object of its own.
HAS_SRC, HAS_DST = 1, 2
SEEN = (HAS_SRC, HAS_DST)
READY = 4  # may be exported (complete, denied, or its correlation wait is over)
CORRELATED = 8  # both halves of an inter-node flow have arrived
DIRTY = 16  # changed since the last export
EXPORTED = 32
ENDED_SRC, ENDED_DST = 64, 128
ENDED = (ENDED_SRC, ENDED_DST)
LONE = 256  # exported alone after the correlation timeout
DENIED = 512
QUEUED = 1024  # in the urgent list
REMOVED = 2048
IPV6 = 4096
END_WAIT = 8192  # an end timer is pending
NO_TWIN = 16384  # no twin will come: denied by the source's egress policy, or no Pod/Node to correlate
SINGLE = LONE | NO_TWIN  # an inter-node flow that is complete with one half
UNTYPED = 32768  # its first record had flowType 0 (host traffic) or none: the type here is a guess

_CORRELATE_TIMER, _END_TIMER = 0, 1
FLOW_COST = 1024  # estimated bytes of a flow besides its strings (slots, counters, dict entry, timers)


# The caches keyed by a side's tuple (its string cost, its part of a merge) keep only
# tuples whose strings are this short in all: they may outlive the flows, and must not keep
# a hostile peer's 60 KB names alive (65536 entries of at most 1 KB each).
_CACHED_COST = 1024


def _meta_cost(meta: tuple[Any, ...] | None) -> int:
    return sum(len(v) for v in meta if type(v) is str) if meta else 0


_ZERO26 = array("Q", bytes(208))
_ZERO4 = array("Q", bytes(32))
_ZERO6 = array("Q", bytes(48))
# _SWITCHED: a flow exported with the destination node's counters (denied at the
# destination, or a lone half exported uncorrelated) takes the source node's once that
# node's first record comes. The source node's first delta is its whole history, part of
# which the flow already exported from the destination node's: the flow's own deltas
# subtract that part (Flow.sw, allocated only then) until it is used up, so the deltas a flow exports still
# sum to its total. Each node's own deltas (...FromSourceNode) are left as the node said.


# Flow.correlation's answers, in the order the C accelerator takes them.
_CORRELATIONS = ("intra-node", "external", "correlated", "denied", "unattributed", "uncorrelated", "pending")


class Flow:
    """The state of one connection. Slots only; counters in one flat unsigned array. The
    pure-Python twin's; where the C accelerator serves, flows are ``_aggr.Flow`` (the same
    attributes, held compactly: see *Memory* above)."""

    __slots__ = (
        "key", "flow_type", "flags", "c", "smeta", "dmeta", "sexp", "dexp", "sdom", "ddom",
        "reason", "tcp_state", "last_seen", "sw",
    )

    def __init__(self, key: tuple[Any, ...], flow_type: int, now: float) -> None:
        self.key = key
        self.flow_type = flow_type
        self.flags = 0
        # [src: pkt, oct, rpkt, roct totals, then the 4 deltas][dst: same][src, dst: last flowEndSeconds]
        # [src: throughput, reverse][dst: same][the newest record's: same]
        # [the newest record's flowStartSeconds, flowEndSeconds] (in the array, not int objects)
        self.c = _ZERO26[:]
        # What the flow's own deltas already counted from the destination node before the
        # source node's first record came: pkt, oct, rpkt, roct (see _SWITCHED); None when nothing.
        self.sw: array[int] | None = None
        # Each side's Kubernetes fields (a shared tuple), exporter address and observation domain.
        self.smeta: tuple[Any, ...] | None = None
        self.dmeta: tuple[Any, ...] | None = None
        self.sexp: str | None = None
        self.dexp: str | None = None
        self.sdom = 0
        self.ddom = 0
        self.reason = 0
        self.tcp_state = ""
        self.last_seen = now

    @property
    def correlation(self) -> str:
        """How complete the record is: intra-node, external, correlated, uncorrelated or pending."""
        ft, f = self.flow_type, self.flags
        if ft == INTRA_NODE or (f & HAS_SRC and f & HAS_DST and ft != INTER_NODE):
            return "intra-node"
        if ft in (TO_EXTERNAL, FROM_EXTERNAL):
            return "external"
        if f & CORRELATED:
            return "correlated"
        if f & NO_TWIN:
            return "denied" if f & DENIED else "unattributed"
        if f & LONE:
            return "uncorrelated"
        return "pending"


@dataclass(frozen=True, slots=True)
class ExportedFlow:
    """One aggregated record handed to the sinks.

    ``record`` is a Mapping of IE names in template order: a dict from the twin, an
    ``_aggr.Record`` (a read-only snapshot of the flow at export, ``dict(record)`` the
    twin's dict) from the C export; the sinks read a Record's values without names."""

    record: Mapping[str, Any]
    # intra-node | external | correlated | uncorrelated (the twin never came) | denied (dropped by the
    # source's egress policy: no twin exists) | unattributed (no Pod or Node on either end)
    # | pending (denied at the destination, source half not yet seen)
    correlation: str
    final: bool  # the flow ended or expired: no more records for it


@dataclass(slots=True)
class AggregationStats:
    records_received: int = 0
    records_exported: int = 0
    flows_created: int = 0
    flows_correlated: int = 0  # inter-node flows whose two halves met in time
    flows_late_correlated: int = 0  # ...that met only after the lone half was exported
    flows_uncorrelated: int = 0  # lone halves exported at the correlation timeout
    flows_expired: int = 0  # removed after inactive_timeout
    flows_ended: int = 0  # removed after their end
    counter_resets: int = 0
    dropped_flow_cap: int = 0
    dropped_flow_bytes: int = 0  # new flows refused: the flows held max_flow_bytes
    dropped_invalid: int = 0
    dropped_stale: int = 0  # a side's older report arriving after a newer one (UDP reordering)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """A partial 5-tuple: None matches anything."""

    src_ip: str | None = None
    dst_ip: str | None = None
    src_port: int | None = None
    dst_port: int | None = None
    protocol: int | None = None

    def matches(self, key: tuple[Any, ...]) -> bool:
        for want, have in zip((self.src_ip, self.dst_ip, self.src_port, self.dst_port, self.protocol), key):
            if want is not None and want != have:
                return False
        return True


# The C accelerator of the ingest loop (aggregator/_aggr.c), bound to this module's Flow,
# field names and constants; FLOWSCOPE_AGGREGATOR_PURE=1 forces the pure-Python twin.
PURE_ENV = "FLOWSCOPE_AGGREGATOR_PURE"
_aggr, _why_not = optional_extension(f"{__package__}._aggr", PURE_ENV)


def accelerated() -> bool:
    """Whether ingest_many runs the C accelerator's loop."""
    return _aggr is not None


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == 0 or v == "0.0.0.0" or v == "::"


class AggregationProcess:
    """Correlate and aggregate agent records; ``ingest`` them, ``tick`` for exports."""

    def __init__(
        self,
        *,
        export_interval: float = 60.0,
        correlation_timeout: float = 30.0,
        inactive_timeout: float = 90.0,
        max_flows: int = 500_000,
        max_flow_bytes: int = 1 << 30,
        start: float = 0.0,
    ) -> None:
        if export_interval <= 0 or correlation_timeout <= 0 or inactive_timeout <= 0 or max_flows < 1:
            raise ValueError("intervals must be positive and max_flows at least 1")
        self.export_interval = export_interval
        self.correlation_timeout = correlation_timeout
        self.inactive_timeout = inactive_timeout
        self.max_flows = max_flows
        self.max_flow_bytes = max_flow_bytes
        self.flow_bytes = 0  # estimated bytes the flows hold (Flow.cost summed)
        # Keyed by the 5-tuple. The C accelerator's Flows (_aggr.Flow) are their own keys: a
        # Flow hashes and compares as its key tuple, so ``flows.get(key)`` finds it and no
        # key tuple is held (see the Memory note in the module docstring).
        self.flows: dict[Any, Flow] = {}
        self.stats = AggregationStats()
        # Timers in groups (deadline, what, flows): every wait has the same length, so
        # deadlines arrive in order; the flows of one ingest call share one (no tuple per flow).
        self._timers: deque[tuple[float, int, list[Flow]]] = deque()
        self._urgent: list[Flow] = []
        self._next_scan = start + export_interval
        self._scan_list: list[Flow] | None = None  # the flows of the periodic export under way
        self._scan_pos = 0
        # Shared values (IP strings, Kubernetes field tuples, TCP states): one copy for many flows.
        # Bounded: cleared when full (live flows keep their references).
        self._shared: dict[Any, Any] = {}
        self._shared_limit = max(65536, max_flows)
        # What a side's Kubernetes fields cost (their strings' length), by tuple: computed
        # once per distinct tuple, not on every new flow and change. Bounded like _shared,
        # and by the bytes it keeps alive: a tuple of long strings is not cached.
        self._costs: dict[tuple[Any, ...], int] = {}
        # Both sides' Kubernetes fields merged, by (source, destination, v6): this process's own.
        self._merge_cache: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        # The C accelerator this process's loops use (aggregator/_aggr.c), None for the
        # pure-Python twin (no extension built, or FLOWSCOPE_AGGREGATOR_PURE=1).
        self._accel: Any = _aggr

    # ------------------------------------------------------------------ ingest
    def _cost(self, meta: tuple[Any, ...] | None) -> int:
        """The strings' bytes of a side's Kubernetes fields (cached by tuple)."""
        if meta is None:
            return 0
        costs = self._costs
        mc = costs.get(meta)
        if mc is None:
            mc = _meta_cost(meta)
            if mc <= _CACHED_COST:
                if len(costs) >= self._shared_limit:
                    costs.clear()
                costs[meta] = mc
        return mc

    def _push_timers(self, deadline: float, what: int, due: list[Flow]) -> None:
        """Add a group of timers: every flow of ``due`` waits until ``deadline``."""
        timers = self._timers
        if timers and timers[-1][0] == deadline and timers[-1][1] == what:
            timers[-1][2].extend(due)
        else:
            timers.append((deadline, what, due))

    def ingest(self, rec: Mapping[str, Any], exporter: str, domain: int, now: float) -> bool:
        """Take one agent record; False when it was dropped (counted in ``stats``)."""
        return self.ingest_many((rec,), exporter, domain, now) == 1

    def ingest_many(self, records: Iterable[Mapping[str, Any]], exporter: str, domain: int, now: float) -> int:
        """Take the records of one message (one exporter, one observation domain); returns how
        many were kept. The hot path: the C accelerator's loop (aggregator/_aggr.c) where it
        is built, else :meth:`_ingest_py`, its pure-Python twin; both do the same."""
        say_once(log, "aggregation", _aggr, _why_not, "C ingest loop", "pure-Python ingest loop")
        if self._accel is not None:
            return self._accel.ingest_many(self, records, exporter, domain, now, self._ingest_py)  # type: ignore[no-any-return]
        return self._ingest_py(records, exporter, domain, now)

    def _ingest_py(
        self, records: Iterable[Mapping[str, Any]], exporter: str, domain: int, now: float,
        due: tuple[list[Flow], list[Flow]] | None = None,
    ) -> int:
        """:meth:`ingest_many` in Python: everything it touches is bound to a local once per
        batch. ``due`` is the C loop's (corr_due, end_due) when it hands over one record it
        does not take: the timers then join its batch's groups, in record order."""
        stats = self.stats
        flows = self.flows
        shared = self._shared
        shared_limit = self._shared_limit
        costs = self._costs
        # flows that wait for their twin, correlated flows one node said ended: one timer group each per call
        corr_due: list[Flow]
        end_due: list[Flow]
        corr_due, end_due = due if due is not None else ([], [])
        urgent = self._urgent
        corr_timeout = self.correlation_timeout
        max_flows = self.max_flows
        get_v4, get_v6, get_meta = _GET_V4, _GET_V6, _GET_META
        # the accelerator's Flow type where it serves (the C loop hands this twin the records
        # it does not take, for flows of that type), else this module's
        native = self._accel is not None
        flow_class = self._accel.Flow if native else Flow
        taken = 0
        n = 0
        for rec in records:
            n += 1
            v6 = "sourceIPv4Address" not in rec
            try:  # one C-level call for every field an agent record has
                src_ip, dst_ip, sport, dport, proto, pt, ot, rpt, rot, start, end, reason, ft, tcp = (
                    get_v6 if v6 else get_v4)(rec)
                meta = get_meta[v6](rec)
                if "sourcePodLabels" in rec or "destinationPodLabels" in rec:
                    meta += (rec.get("sourcePodLabels"), rec.get("destinationPodLabels"))
                else:
                    meta += _NO_LABELS
            except KeyError:  # a record without some of them (a foreign or older exporter)
                try:
                    (src_ip, dst_ip, sport, dport, proto, pt, ot, rpt, rot, start, end, reason, ft, tcp,
                     meta) = _extract(rec, v6)
                except ValueError:
                    stats.dropped_invalid += 1
                    continue
            key = (src_ip, dst_ip, sport, dport, proto)
            flow = flows.get(key)
            if flow is None:
                if len(flows) >= max_flows:
                    stats.dropped_flow_cap += 1
                    continue
                mc = costs.get(meta)
                if mc is None:
                    mc = self._cost(meta)
                if self.flow_bytes + FLOW_COST + mc > self.max_flow_bytes:
                    stats.dropped_flow_bytes += 1
                    continue
                if len(shared) >= shared_limit:
                    shared.clear()
                # the addresses and the destination port are shared by many flows: one object each
                key = (shared.setdefault(src_ip, src_ip), shared.setdefault(dst_ip, dst_ip), sport,
                       shared.setdefault(dport, dport), proto)
                if not ft:  # flowType 0 (or none, a foreign exporter): guess from what the record knows
                    ft = INTRA_NODE if meta[_I_SRC_POD] and meta[_I_DST_POD] else INTER_NODE
                    flow = flow_class(key, ft, now)
                    flow.flags = UNTYPED | IPV6 if v6 else UNTYPED
                else:
                    flow = flow_class(key, ft, now)
                    if v6:
                        flow.flags = IPV6
                flows[flow if native else key] = flow
                self.flow_bytes += FLOW_COST
                stats.flows_created += 1
                new_flow = True
            else:
                new_flow = False
                if not ft:
                    ft = flow.flow_type
            try:  # a value of an unexpected type (a foreign exporter) drops the record, not the process
                flags = flow.flags
                g = rec.get

                # Which node sent it.
                if ft == INTER_NODE:
                    if meta[_I_SRC_POD] and meta[_I_DST_POD]:
                        side = SRC  # an agent that knows both Pods: the record is complete
                        ft = INTRA_NODE
                    elif meta[_I_SRC_POD]:
                        side = SRC
                    elif meta[_I_DST_POD]:
                        side = DST
                    elif meta[_I_DST_NODE] and not meta[_I_SRC_NODE]:
                        side = DST
                    else:
                        side = SRC
                        if not meta[_I_SRC_NODE] and new_flow:
                            # No Pod and no Node on either end (host traffic an agent reported): there is
                            # nothing to correlate, so no twin to wait for.
                            flags |= NO_TWIN
                elif ft == FROM_EXTERNAL:
                    side = DST
                else:
                    side = SRC
                if ft != flow.flow_type and ft == INTRA_NODE:
                    flow.flow_type = INTRA_NODE
                o = side * 8
                seen = SEEN[side]

                # Counters.
                c = flow.c
                first = not flags & seen
                prev_end = c[16 + side]
                if pt is None:  # an exporter that sends deltas only
                    dp, do, drp, dro = (g("packetDeltaCount") or 0, g("octetDeltaCount") or 0,
                                        g("reversePacketDeltaCount") or 0, g("reverseOctetDeltaCount") or 0)
                    pt, ot, rpt, rot = c[o] + dp, c[o + 1] + do, c[o + 2] + drp, c[o + 3] + dro
                elif not flags & seen:
                    dp = g("packetDeltaCount", pt)
                    do = g("octetDeltaCount", ot)
                    drp = g("reversePacketDeltaCount", rpt)
                    dro = g("reverseOctetDeltaCount", rot)
                else:
                    p0, o0, rp0, ro0 = c[o], c[o + 1], c[o + 2], c[o + 3]
                    if pt < p0 or ot < o0 or rpt < rp0 or rot < ro0:
                        if end < c[16 + side]:  # an older report overtaken by a newer one (UDP)
                            stats.dropped_stale += 1
                            continue
                        dp, do, drp, dro = pt, ot, rpt, rot  # the 5-tuple reused by a new connection
                        stats.counter_resets += 1
                    else:
                        dp, do, drp, dro = pt - p0, ot - o0, rpt - rp0, rot - ro0
                if first and side == SRC and flags & HAS_DST and flags & EXPORTED:
                    # The flow's own counters switch from the destination node's to the
                    # source node's now; what it exported from the destination node's is
                    # not counted again (_SWITCHED).
                    sw = flow.sw
                    if sw is None:
                        sw = flow.sw = _ZERO4[:]
                    for k in range(4):
                        sw[k] += c[8 + k] - c[12 + k]
                c[o] = pt
                c[o + 1] = ot
                c[o + 2] = rpt
                c[o + 3] = rot
                c[o + 4] += dp
                c[o + 5] += do
                c[o + 6] += drp
                c[o + 7] += dro
                if end > c[16 + side]:
                    c[16 + side] = int(end)
                changed = dp or do or drp or dro or not flags & seen

                # Throughput as Antrea's aggregator defines it: octets * 8 over the seconds since
                # the node's previous record (its first: since flowStartSeconds, with its totals).
                span = end - (start if first else prev_end)
                if span > 0:
                    th, rth = (ot if first else do) * 8 // span, (rot if first else dro) * 8 // span
                    c[18 + 2 * side] = th
                    c[19 + 2 * side] = rth
                    if end >= c[25]:
                        c[22] = th
                        c[23] = rth

                # Kubernetes fields: intern a side's tuple only when it changed.
                if side:
                    if flow.dmeta != meta:
                        delta = self._cost(meta) - self._cost(flow.dmeta)
                        flow.dmeta = shared.setdefault(meta, meta)
                        self.flow_bytes += delta
                        changed = True
                    flow.dexp = exporter
                    flow.ddom = domain
                else:
                    if flow.smeta != meta:
                        delta = self._cost(meta) - self._cost(flow.smeta)
                        flow.smeta = shared.setdefault(meta, meta)
                        self.flow_bytes += delta
                        changed = True
                    flow.sexp = exporter
                    flow.sdom = domain

                # Times and state from the newest record.
                if end >= c[25]:
                    c[25] = int(end)
                    if start:
                        c[24] = int(start)
                    if reason != flow.reason:
                        if reason in END_REASONS:  # idle (1) vs active (2) timeout alone is no news
                            changed = True
                        flow.reason = reason
                    if tcp is not None and tcp != flow.tcp_state:
                        flow.tcp_state = shared.setdefault(tcp, tcp)
                        changed = True
                flow.last_seen = now
                flags |= seen
                if changed:
                    flags |= DIRTY

                ft = flow.flow_type
                if ft == INTER_NODE and not flags & CORRELATED:
                    if flags & HAS_SRC and flags & HAS_DST:
                        flags |= CORRELATED | READY
                        if flags & LONE:
                            stats.flows_late_correlated += 1
                        else:
                            stats.flows_correlated += 1
                    elif new_flow and not flags & NO_TWIN:
                        corr_due.append(flow)
                elif not flags & READY:
                    flags |= READY
                if flags & NO_TWIN and not flags & READY:
                    flags |= READY
                if (meta[_I_EGRESS_ACTION] in DENY_ACTIONS or meta[_I_INGRESS_ACTION] in DENY_ACTIONS) and not flags & DENIED:
                    flags |= DENIED | READY
                    if side == SRC and meta[_I_EGRESS_ACTION] in DENY_ACTIONS and not flags & CORRELATED:
                        flags |= NO_TWIN
                    if not flags & EXPORTED and not flags & QUEUED:
                        flags |= QUEUED
                        urgent.append(flow)
                if reason in END_REASONS:
                    flags |= ENDED[side]
                    if ft != INTER_NODE or flags & SINGLE or (flags & ENDED_SRC and flags & ENDED_DST):
                        if not flags & QUEUED:
                            flags |= QUEUED
                            urgent.append(flow)
                    elif flags & CORRELATED and not flags & END_WAIT:
                        flags |= END_WAIT
                        end_due.append(flow)
                    # else: a lone half waits for its correlation timer, which exports it as final
                flow.flags = flags
                taken += 1
            except (TypeError, ValueError, OverflowError):
                stats.dropped_invalid += 1
                if new_flow:  # forget what this record started
                    flow.flags |= REMOVED
                    del flows[key]
                    stats.flows_created -= 1
                continue

        stats.records_received += n
        if due is None:
            if corr_due:
                self._push_timers(now + corr_timeout, _CORRELATE_TIMER, corr_due)
            if end_due:
                self._push_timers(now + corr_timeout, _END_TIMER, end_due)
        return taken

    # -------------------------------------------------------------------- tick
    def tick(self, now: float, max_scan: int | None = None) -> list[ExportedFlow]:
        """Everything due at ``now``: expired timers, urgent flows, and the periodic export.

        ``max_scan`` bounds how many flows this call visits for the periodic export, so a
        caller on an event loop can spread the scan of a large store over several calls
        (``scan_pending`` says whether to call again); None scans everything at once.
        """
        out: list[ExportedFlow] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, what, due = timers.popleft()
            for flow in due:
                f = flow.flags
                if f & REMOVED:
                    continue
                if what == _CORRELATE_TIMER:
                    if f & (CORRELATED | NO_TWIN) or flow.flow_type != INTER_NODE:
                        continue
                    flow.flags = f | LONE | READY
                    self.stats.flows_uncorrelated += 1
                    if f & (ENDED_SRC | ENDED_DST):
                        self._finish(flow, out, ended=True)
                    elif f & DIRTY or not f & EXPORTED:
                        out.append(self._export(flow, final=False))
                else:  # the other node never said the flow ended: end it now
                    self._finish(flow, out, ended=True)
        if self._urgent:
            urgent, self._urgent = self._urgent, []
            for flow in urgent:
                f = flow.flags
                flow.flags = f & ~QUEUED
                if f & REMOVED:
                    continue
                if f & (ENDED_SRC | ENDED_DST) and (
                    flow.flow_type != INTER_NODE or f & SINGLE or (f & ENDED_SRC and f & ENDED_DST)
                ):
                    self._finish(flow, out, ended=True)
                elif not f & EXPORTED:  # a denied flow's first record
                    out.append(self._export(flow, final=False))
        if self._scan_list is None and now >= self._next_scan:
            self._next_scan += self.export_interval
            if self._next_scan <= now:  # ticks came late: realign instead of bursting
                self._next_scan = now + self.export_interval
            self._scan_list = list(self.flows.values())
            self._scan_pos = 0
        if self._scan_list is not None:
            self._scan(now, max_scan, out)
        return out

    @property
    def scan_pending(self) -> bool:
        """A periodic scan started and is not finished (``tick(now, max_scan=...)`` continues it)."""
        return self._scan_list is not None

    def _scan(self, now: float, max_scan: int | None, out: list[ExportedFlow]) -> None:
        """The periodic export over the flows that existed when the interval came, in slices.

        A flow created since waits for the next interval; one removed since is skipped.
        """
        flows = self._scan_list
        assert flows is not None
        start = self._scan_pos
        stop = len(flows) if max_scan is None else min(len(flows), start + max_scan)
        horizon = now - self.inactive_timeout
        accel = self._accel
        i = start
        while i < stop:
            if accel is not None and type(horizon) is float:  # the C loop exports and skips; it stops where the twin must decide
                i, exported = accel.scan(flows, i, stop, horizon, self._merge_cache, out)
                self.stats.records_exported += exported
                if i >= stop:
                    break
            flow = flows[i]
            i += 1
            f = flow.flags
            if f & REMOVED:
                continue
            if flow.last_seen <= horizon:
                if f & DIRTY or not f & EXPORTED:
                    if flow.flow_type == INTER_NODE and not f & (CORRELATED | SINGLE):
                        flow.flags = f | LONE
                        self.stats.flows_uncorrelated += 1
                    out.append(self._export(flow, final=True))
                self._remove(flow, ended=False)
            elif f & READY and f & DIRTY:
                out.append(self._export(flow, final=False))
        if stop >= len(flows):
            self._scan_list = None
            self._scan_pos = 0
        else:
            self._scan_pos = stop

    def _finish(self, flow: Flow, out: list[ExportedFlow], *, ended: bool) -> None:
        if flow.flags & DIRTY or not flow.flags & EXPORTED:
            out.append(self._export(flow, final=True))
        self._remove(flow, ended=ended)

    def _remove(self, flow: Flow, *, ended: bool) -> None:
        flow.flags |= REMOVED
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            # its estimated bytes, as counted in: a fixed cost and its strings' (see _cost)
            self.flow_bytes -= FLOW_COST + self._cost(flow.smeta) + self._cost(flow.dmeta)
        if ended:
            self.stats.flows_ended += 1
        else:
            self.stats.flows_expired += 1

    def _export(self, flow: Flow, *, final: bool) -> ExportedFlow:
        if self._accel is not None:  # the C accelerator's, where the flow holds what it takes
            exported: ExportedFlow | None = self._accel.export(flow, self._merge_cache, final)
            if exported is not None:
                self.stats.records_exported += 1
                return exported
        record = build_record(flow, self._merge_cache, self._accel)
        c = flow.c
        sw = flow.sw
        if sw is not None:  # what the correction did not use up waits for the next delta
            for k in range(4):
                sw[k] -= min(sw[k], c[4 + k])
            if not any(sw):
                flow.sw = None
        c[4:8] = c[12:16] = _ZERO4  # the deltas, the throughputs
        c[18:24] = _ZERO6
        flow.flags = (flow.flags & ~DIRTY) | EXPORTED
        self.stats.records_exported += 1
        return ExportedFlow(record, flow.correlation, final)

    # -------------------------------------------------------------- inspection
    def __len__(self) -> int:
        return len(self.flows)

    def snapshot(self, flt: FlowFilter | None = None, limit: int | None = None) -> list[ExportedFlow]:
        """Current records without touching deltas (for the HTTP API)."""
        out = []
        for flow in self.flows.values():
            if flt is None or flt.matches(flow.key):
                out.append(ExportedFlow(build_record(flow, self._merge_cache, self._accel), flow.correlation, False))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def select(self, flt: FlowFilter | None = None, limit: int | None = None) -> list[Flow]:
        """The flows matching ``flt`` (at most ``limit``), by reference: what the HTTP API
        streams without building every record at once. Render them with :meth:`render`."""
        out = []
        for flow in self.flows.values():
            if flt is None or flt.matches(flow.key):
                out.append(flow)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def render(self, flows: Iterable[Flow]) -> list[ExportedFlow]:
        """Current records of ``flows`` (those still held), without touching deltas."""
        return [ExportedFlow(build_record(f, self._merge_cache, self._accel), f.correlation, False) for f in flows if not f.flags & REMOVED]

    def drain(self) -> list[ExportedFlow]:
        """Export every flow with unexported changes (shutdown), and forget them all."""
        out = [self._export(f, final=True) for f in self.flows.values() if f.flags & DIRTY]
        for flow in self.flows.values():
            flow.flags |= REMOVED
        self.flows.clear()
        self.flow_bytes = 0
        self._timers.clear()
        self._urgent.clear()
        self._scan_list = None
        return out


_ZERO8 = (0,) * 8
_NO_META = (None,) * len(_OWNER)


def _runs(owners: tuple[int, ...]) -> tuple[tuple[slice, int], ...]:
    """The runs of equal owners in ``owners``, as (slice, owner)."""
    out: list[tuple[slice, int]] = []
    start = 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] != owners[start]:
            out.append((slice(start, i), owners[start]))
            start = i
    return tuple(out)


_OWN_RUNS = _runs(_OWNER)
_EMPTY = frozenset((None, "", 0, "0.0.0.0", "::"))  # what _empty() calls empty, as a set


def _merged(
    smeta: tuple[Any, ...] | None, dmeta: tuple[Any, ...] | None, v6: bool, cache: dict[tuple[Any, ...], tuple[Any, ...]]
) -> tuple[Any, ...]:
    """Both sides' Kubernetes fields merged, each from its owner first (cached in ``cache``,
    the process's own: tuples are shared)."""
    ck = (smeta, dmeta, v6)
    got = cache.get(ck)
    if got is not None:
        return got
    if len(cache) >= 65536:
        cache.clear()
    # The usual case: neither side has a value in a field the other owns (an agent fills in
    # its own side's fields only). Then every field is its owner's (None: the default), and
    # the merge is slices of each side's own part, computed once per (shared) side tuple.
    pa, fa = _side(smeta, 0, v6, cache)
    pb, fb = _side(dmeta, 1, v6, cache)
    if not fa and not fb:
        merged: tuple[Any, ...] = ()
        for sl, owner in _OWN_RUNS:
            merged += (pb if owner else pa)[sl]
        cache[ck] = merged
        return merged
    # Each field from its owner, else from the other side when the owner's is empty, else
    # the default. A side's tuple is runs of fields of one owner (:data:`_OWN_RUNS`), so
    # "each from its owner" is a few slices, not a test per field.
    a = smeta or _NO_META
    b = dmeta or _NO_META
    own: tuple[Any, ...] = ()
    other: tuple[Any, ...] = ()
    for sl, owner in _OWN_RUNS:
        own += (b if owner else a)[sl]
        other += (a if owner else b)[sl]
    merged = tuple([
        y if x in _EMPTY and y not in _EMPTY else (d if x is None else x)
        for x, y, d in zip(own, other, _META_DEFAULTS[v6])
    ])  # fmt: skip
    cache[ck] = merged
    return merged


_NOT_OWNED = (
    tuple(i for i, o in enumerate(_OWNER) if o == 1),  # the fields the source side does not own
    tuple(i for i, o in enumerate(_OWNER) if o == 0),
)


def _side(meta: tuple[Any, ...] | None, owner: int, v6: bool, cache: dict[Any, Any]) -> tuple[tuple[Any, ...], bool]:
    """One side's part of a merge: its tuple with None as the default (what it gives the
    fields it owns when the other side has nothing for them), and whether it has a value in
    a field the other side owns. Cached in the merge cache by (tuple, owner, v6)."""
    if meta is None:
        return _META_DEFAULTS[v6], False
    k = (meta, owner, v6)  # never equal to a merge's key: its second item is a tuple or None
    got = cache.get(k)
    if got is None:
        part = tuple([d if x is None else x for x, d in zip(meta, _META_DEFAULTS[v6])])
        got = (part, any(meta[i] not in _EMPTY for i in _NOT_OWNED[owner]))
        if _meta_cost(meta) <= _CACHED_COST:
            cache[k] = got
    return got  # type: ignore[no-any-return]


def build_record(flow: Flow, merge_cache: dict[tuple[Any, ...], tuple[Any, ...]], accel: Any = None) -> dict[str, Any]:
    """The aggregated record of a flow: all agent IEs plus the aggregator's, in template order.
    ``merge_cache`` is the calling process's cache of merged Kubernetes fields. ``accel``
    (the process's C accelerator, None for the twin) lays the values out where the flow
    holds what an agent sends; :func:`_build_record_py` is its twin."""
    if accel is not None:
        rec: dict[str, Any] | None = accel.build_record(flow, merge_cache)
        if rec is not None:
            return rec
    return _build_record_py(flow, merge_cache)


def _build_record_py(flow: Flow, merge_cache: dict[tuple[Any, ...], tuple[Any, ...]]) -> dict[str, Any]:
    """:func:`build_record` in Python."""
    f = flow.flags
    cl = flow.c.tolist()
    has_src = bool(f & HAS_SRC)
    has_dst = bool(f & HAS_DST)
    v6 = bool(f & IPV6)
    own = cl[0:8] if has_src else cl[8:16]
    sw = flow.sw
    if has_src and sw is not None:  # _SWITCHED
        own = own[:4] + [max(0, d - x) for d, x in zip(cl[4:8], sw)]
    srcc = cl[0:8] if has_src else None
    dstc = cl[8:16] if has_dst else None
    ends = [cl[16] if has_src else 0, cl[17] if has_dst else 0]
    sth, dth = (cl[18:20] if has_src else [0, 0]), (cl[20:22] if has_dst else [0, 0])
    if flow.flow_type == INTRA_NODE:  # one node is both the source and the destination node
        srcc = srcc or dstc
        dstc = dstc or srcc
        ends = [max(ends)] * 2
        sth, dth = (sth, sth) if has_src else (dth, dth)
    exporter = (flow.sexp if has_src else flow.dexp) or "0.0.0.0"
    smeta, dmeta = flow.smeta, flow.dmeta
    # An unattributed flow (no Pod, no Node: the agent said flowType 0) stays 0, unknown,
    # not the inter-node type it is filed under here so as to wait for no twin.
    flow_type = 0 if f & UNTYPED and f & NO_TWIN and not f & DENIED else flow.flow_type
    names, order = _LAYOUT[(v6, ":" in exporter)]
    values = (
        cl[24], cl[25], flow.reason, *flow.key, *own,
        *_merged(smeta, dmeta, v6, merge_cache),
        flow_type, flow.tcp_state, exporter, flow.sdom if has_src else flow.ddom,
        *(srcc or _ZERO8), *(dstc or _ZERO8),
        *ends, cl[22], cl[23], *sth, *dth,
    )
    return dict(zip(names, order(values)))


# Bind the accelerator to this module (at the end: it takes the merge tables above).
if _aggr is not None:
    try:
        _aggr.configure(
            Flow, _GET_V4_NAMES, _GET_V6_NAMES, KUBERNETES_FIELDS[0], KUBERNETES_FIELDS[1], LABEL_FIELDS,
            ("packetDeltaCount", "octetDeltaCount", "reversePacketDeltaCount", "reverseOctetDeltaCount"),
            _ZERO4, END_REASONS, DENY_ACTIONS,
            (_I_SRC_POD, _I_SRC_NODE, _I_EGRESS_ACTION, _I_DST_POD, _I_DST_NODE, _I_INGRESS_ACTION),
            {name: value for name, value in globals().items() if name.isupper() and type(value) is int}
            | {"NC": len(_ZERO26)},
            tuple((output_names(v6, e6), tuple(map(_slot_names(v6, e6).index, output_names(v6, e6))))
                  for v6 in (False, True) for e6 in (False, True)),
            _EMPTY, _META_DEFAULTS, _OWNER, _ZERO26,
        )
        _aggr.configure_export(ExportedFlow, _CORRELATIONS)
        # export() then gives an _aggr.Record per flow: a read-only Mapping of the record's
        # names (dict(record) is build_record's dict) that the sinks read without names
        _aggr.configure_snapshots()
        Mapping.register(_aggr.Record)
    except ValueError as exc:  # built from another version of this module: the twin serves
        _aggr, _why_not = None, f"the C extension does not match this module ({exc})"
