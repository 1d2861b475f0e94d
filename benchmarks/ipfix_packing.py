"""What one template per set and one set per message costs (go-ipfix reads no more).

flowscope's exporting processes put every set in a message of its own (data sets were
already so) and, by default, every template record in a template set of its own, so
that go-ipfix - Antrea's agent, aggregator and collector - reads all of it. Each extra
template costs one IPFIX message header and one set header (16 + 4 octets) and, over
TCP, rides in the same write; over UDP it is one more datagram. This prints, for the
agent's 2 templates and the aggregator's 4:

- octets and messages of the templates, dense (several per set, ``dense_templates``)
  against one per set, and PyPI ``ipfix`` (the peer, in the same run: it packs every
  template into one set) for the same templates;
- the encode time of the templates (median over ``--repeat``);
- the overhead relative to what a session carries: a TCP session's templates plus
  ``--records`` data records, and an hour of UDP export (templates refreshed every
  600 s) at ``--rate`` records a second.

    .venv/bin/python benchmarks/ipfix_packing.py [--records 10000] [--rate 100] [--repeat 9]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from typing import Any

from flowscope.ipfix import ExportSession, Template
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS


def _aggregator_templates() -> list[Template]:
    from flowscope.aggregator.sinks import TEMPLATE_IDS, template_names

    return [Template.build(tid, template_names(v6, e6)) for (v6, e6), tid in TEMPLATE_IDS.items()]


def _pypi_octets(templates: list[Template]) -> int | None:
    try:
        import ipfix  # PyPI ipfix 0.9.7
        import ipfix.ie
        import ipfix.message
        import ipfix.template
    except ImportError:
        return None
    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    for t in templates:
        for f in t.fields:
            ie = f.ie
            kind = ie.data_type.name
            spec = f"{ie.name}({ie.pen}/{ie.element_id})<{kind}>[{f.length}]" if ie.pen else None
            if spec and ie.pen != 29305:
                ipfix.ie.for_spec(spec)
    msg = ipfix.message.MessageBuffer()
    msg.begin_export(1)
    for t in templates:
        names = [f.ie.name for f in t.fields]
        msg.add_template(ipfix.template.from_ielist(t.template_id, ipfix.ie.spec_list(names)))
    out = io.BytesIO()
    out.write(msg.to_bytes())
    return len(out.getvalue())


def _record_octets(t: Template) -> int:
    """The wire size of a typical record of ``t``: names of Pods, Nodes and policies ~16 characters."""
    rec: dict[str, Any] = {}
    for f in t.fields:
        kind = f.ie.data_type.name
        if kind == "string":
            rec[f.ie.name] = "x" * 16
        elif kind == "ipv4Address":
            rec[f.ie.name] = "10.0.0.1"
        elif kind == "ipv6Address":
            rec[f.ie.name] = "fd00::1"
        elif kind == "octetArray":
            rec[f.ie.name] = bytes(f.length if f.length != 65535 else 16)
        else:
            rec[f.ie.name] = 1
    return len(t.encode_record(rec))


def _median_us(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        times.append((time.perf_counter() - t0) / 100)
    return round(statistics.median(times) * 1e6, 2)


def case(templates: list[Template], records: int, rate: int, repeat: int, record_octets: int) -> dict[str, Any]:
    out: dict[str, Any] = {"templates": len(templates)}
    for name, dense in (("dense", True), ("one_per_set", False)):
        for mtu_name, size in (("tcp", 65535), ("udp_512", 512 - 28)):
            s = ExportSession(1, max_message_size=size, dense_templates=dense)
            for t in templates:
                s.add_template(t)
            msgs = s.encode_templates(0)
            out.setdefault(name, {})[mtu_name] = {"messages": len(msgs), "octets": sum(map(len, msgs))}
        s = ExportSession(1, dense_templates=dense)
        for t in templates:
            s.add_template(t)
        out[name]["encode_us"] = _median_us(lambda s=s: s.encode_templates(0), repeat)
    extra = out["one_per_set"]["tcp"]["octets"] - out["dense"]["tcp"]["octets"]
    session = out["dense"]["tcp"]["octets"] + records * record_octets
    hour_udp = 6 * out["dense"]["udp_512"]["octets"] + 3600 * rate * record_octets
    extra_udp = 6 * (out["one_per_set"]["udp_512"]["octets"] - out["dense"]["udp_512"]["octets"])
    out["extra_octets_per_session_tcp"] = extra
    out["overhead_tcp_session_percent"] = round(100 * extra / session, 4)
    out["overhead_udp_hour_percent"] = round(100 * extra_udp / hour_udp, 5)
    out["ipfix_pypi_octets"] = _pypi_octets(templates)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000, help="data records in the TCP session")
    ap.add_argument("--rate", type=int, default=100, help="UDP records per second")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args(argv)
    agent = [Template.build(256, AGENT_IPV4_FIELDS), Template.build(257, AGENT_IPV6_FIELDS)]
    aggregator = _aggregator_templates()
    out = {
        "benchmark": "ipfix_packing",
        "python": sys.version.split()[0],
        "records": args.records,
        "udp_rate_per_s": args.rate,
        "repeat": args.repeat,
        "statistic": "median",
        "targets": {"overhead_tcp_session_percent_max": 0.1, "overhead_udp_hour_percent_max": 0.01},
        "cases": {
            "agent": case(agent, args.records, args.rate, args.repeat, _record_octets(agent[0])),
            "aggregator": case(aggregator, args.records, args.rate, args.repeat, _record_octets(aggregator[0])),
        },
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
