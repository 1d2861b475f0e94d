#!/usr/bin/env bash
# Set everything up and run the demo: the README's demo command.
#
#   bash scripts/demo.sh [--duration D] [--ui HOST:PORT] [--json]   # the whole pipeline, as root
#   bash scripts/demo.sh --replay    # only the IPFIX wire: collector + export on loopback
#
# The default runs `flowscope demo`: a two-Node lab of network namespaces with real
# conntrack, one Flow Exporter agent per Node, mutual TLS to a Flow Aggregator that
# correlates both halves of every inter-Node connection, a collector storing what the
# aggregator exports in chDB and serving the web dashboards (printed URL, 127.0.0.1:8080
# by default), and steady traffic of every kind until Ctrl-C or --duration (see
# flowscope/demo.py). It removes everything it made.
#
# --replay starts an IPFIX collector on loopback (`flowscope collector`), sends it the
# example Antrea agent flow records of scripts/demo-flows.jsonl as IPFIX over TCP
# (`flowscope export`), shows what the collector decoded, checks every field against
# what was sent, and stops the collector.
#
# Nothing leaves the machine: all traffic is on 127.0.0.1 or inside the demo's own
# network namespaces.
#
# Environment (--replay): FLOWSCOPE_DEMO_PORT (default 4739; a free port is used when it
# is taken), FLOWSCOPE_DEMO_FLOWS (default scripts/demo-flows.jsonl).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
FLOWS="${FLOWSCOPE_DEMO_FLOWS:-$REPO/scripts/demo-flows.jsonl}"
PY="$REPO/.venv/bin/python"
FLOWSCOPE="$REPO/.venv/bin/flowscope"
MODE=pipeline
if [[ ${1:-} == --replay ]]; then
    MODE=replay
    shift
fi

say() { printf 'demo: %s\n' "$*"; }
die() {
    printf 'demo: ERROR: %s\n' "$*" >&2
    exit 1
}

if [[ $MODE == replay ]] && (($#)); then
    die "--replay takes no other arguments"
fi
if [[ $MODE == pipeline && $EUID != 0 ]]; then
    die "run as root (sudo bash scripts/demo.sh): the demo builds network namespaces"
fi

bash scripts/setup.sh

if [[ $MODE == pipeline ]]; then
    echo
    exec "$FLOWSCOPE" demo "$@"
fi

[[ -s $FLOWS ]] || die "no flow records in $FLOWS"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/flowscope-demo.XXXXXX")"
COLLECTOR_PID=""

stop_collector() {
    [[ -n $COLLECTOR_PID ]] || return 0
    local pid=$COLLECTOR_PID
    COLLECTOR_PID=""
    kill -0 "$pid" 2>/dev/null || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    # SIGINT lets it finish writing what it decoded; escalate if it does not stop.
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; sleep 1; fi
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop_collector
    if ((rc != 0)) && [[ -s $TMP/collector.err ]]; then
        echo "demo: collector stderr:" >&2
        tail -n 20 "$TMP/collector.err" >&2
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_in_use() { [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]; }

port="${FLOWSCOPE_DEMO_PORT:-4739}"
if port_in_use "$port"; then
    port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    say "port ${FLOWSCOPE_DEMO_PORT:-4739} is taken on this machine; using $port"
fi
ADDR="127.0.0.1:$port:tcp"

say "starting the collector: flowscope collector --listen $ADDR"
"$FLOWSCOPE" collector --listen "$ADDR" >"$TMP/collector.out" 2>"$TMP/collector.err" &
COLLECTOR_PID=$!

for _ in $(seq 100); do
    port_in_use "$port" && break
    kill -0 "$COLLECTOR_PID" 2>/dev/null || die "the collector exited before listening on $ADDR"
    sleep 0.1
done
port_in_use "$port" || die "the collector is not listening on $ADDR after 10s"

count=$(grep -c . "$FLOWS")
say "exporting $count flow records: flowscope export --to $ADDR < ${FLOWS#"$REPO"/}"
"$FLOWSCOPE" export --to "$ADDR" <"$FLOWS" || die "flowscope export failed"

# Wait until the collector has printed every record sent (or 15s), then compare.
verdict=0
"$PY" - "$FLOWS" "$TMP/collector.out" >"$TMP/report.txt" <<'EOF' || verdict=$?
"""Wait for the collector's output to hold every record sent; compare field by field."""
import json
import sys
import time

flows_path, out_path = sys.argv[1], sys.argv[2]
sent = [json.loads(line) for line in open(flows_path) if line.strip()]


def records(obj):
    """Flow records in one line of output, wherever the collector nests them."""
    if isinstance(obj, dict):
        if "sourceTransportPort" in obj:
            yield obj
        else:
            for value in obj.values():
                yield from records(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from records(value)


def received():
    got = []
    with open(out_path, errors="replace") as fh:
        for line in fh:
            try:
                got.extend(records(json.loads(line)))
            except ValueError:
                continue
    return got


def key(r):
    src = r.get("sourceIPv4Address") or r.get("sourceIPv6Address")
    dst = r.get("destinationIPv4Address") or r.get("destinationIPv6Address")
    node = r.get("sourceNodeName") or r.get("destinationNodeName")
    return (src, dst, r.get("sourceTransportPort"), r.get("destinationTransportPort"), r.get("protocolIdentifier"), node)


deadline = time.monotonic() + 15
while True:
    got = {key(r): r for r in received()}
    if all(key(r) in got for r in sent) or time.monotonic() > deadline:
        break
    time.sleep(0.2)

print()
print(f"{'source':<38} {'destination':<42} {'proto':>5} {'bytes':>9} {'rev bytes':>9}  type")
kinds = {1: "intra-node", 2: "inter-node", 3: "to-external", 4: "from-external"}
missing, different = 0, []
for r in sent:
    g = got.get(key(r))
    if g is None:
        missing += 1
        continue
    for name, value in r.items():
        if g.get(name) != value:
            different.append(f"{name}: sent {value!r}, decoded {g.get(name)!r}")
    src = f"{g.get('sourcePodNamespace')}/{g.get('sourcePodName')}" if g.get("sourcePodName") else key(g)[0]
    if g.get("destinationServicePortName"):
        dst = f"svc {g['destinationServicePortName']}"
    elif g.get("destinationPodName"):
        dst = f"{g.get('destinationPodNamespace')}/{g['destinationPodName']}"
    else:
        dst = f"{key(g)[1]}:{g.get('destinationTransportPort')}"
    proto = {6: "tcp", 17: "udp"}.get(g.get("protocolIdentifier"), g.get("protocolIdentifier"))
    print(f"{src:<38} {dst:<42} {proto:>5} {g.get('octetTotalCount', 0):>9} "
          f"{g.get('reverseOctetTotalCount', 0):>9}  {kinds.get(g.get('flowType'), '?')}")
print()
if missing or different:
    print(f"demo: {len(sent) - missing}/{len(sent)} records received; {len(different)} fields differ")
    for line in different[:20]:
        print(f"demo:   {line}")
    sys.exit(1)
print(f"demo: {len(sent)}/{len(sent)} records received, every one of their "
      f"{sum(len(r) for r in sent)} fields equal to what was sent")
EOF

stop_collector
echo
say "the collector's decoded output (flowscope collector, stdout):"
cat "$TMP/collector.out"
cat "$TMP/report.txt"
if ((verdict != 0)); then
    die "the collector did not decode what was sent (see above)"
fi
say "done"
