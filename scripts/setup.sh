#!/usr/bin/env bash
# Set up everything flowscope's demo and test suite need, on Debian bookworm, as root.
#
# Idempotent: system packages are installed only when one is missing, and the Python
# environment (.venv) is reinstalled only when pyproject.toml changed since the last run,
# so scripts/test.sh and scripts/demo.sh can call this every time.
#
# It never leaves a daemon running: Debian's clickhouse-server, prometheus, nfdump,
# pmacct and softflowd packages ship services that would take ports (9000, 9090, 2055,
# ...). Tests start their own instances on ports they choose, so during installation a
# policy-rc.d forbids service starts, and on a systemd host the services this run
# installed are disabled.
#
#   bash scripts/setup.sh            # install what is missing
#   bash scripts/setup.sh --check    # only report; exit 1 if anything is missing
#
# Environment: FLOWSCOPE_SETUP_FORCE=1 reinstalls the Python packages even if unchanged.
set -euo pipefail

CHECK=0
case "${1:-}" in
    "") ;;
    --check) CHECK=1 ;;
    *)
        echo "usage: bash scripts/setup.sh [--check]" >&2
        exit 2
        ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
EXTRAS="agent,operator,collector,test"
START=$SECONDS

# Debian packages used by the demo and the tests (real parts), one per purpose.
APT_PACKAGES=(
    python3 python3-venv python3-dev gcc   # the venv; gcc for any sdist with C code
    ca-certificates curl git procps        # fetching, process tools (pgrep, sysctl)
    iproute2 nftables conntrack            # network namespaces, conntrack in them
    iputils-ping openssl                   # traffic in test namespaces; TLS material
    tshark pmacct softflowd nfdump         # independent IPFIX peers
    clickhouse-server clickhouse-client    # the ClickHouse sink against a real server
    prometheus                             # scraping the /metrics endpoints
    chromium nodejs                        # the dashboards' browser tests; npm for ECharts
)
# Packages whose services must not be left running (see the header).
DAEMON_PACKAGES=(clickhouse-server prometheus nfdump pmacct softflowd)

LOG="$(mktemp "${TMPDIR:-/tmp}/flowscope-setup.XXXXXX.log")"
POLICY_RC=/usr/sbin/policy-rc.d
OWN_POLICY_RC=0

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: ERROR: %s\n' "$*" >&2
    exit 1
}
drop_policy_rc() {
    if [[ $OWN_POLICY_RC == 1 ]]; then
        rm -f "$POLICY_RC"
        OWN_POLICY_RC=0
    fi
}
cleanup() {
    local rc=$?
    drop_policy_rc
    if [[ $rc != 0 ]]; then
        if [[ -s $LOG ]]; then
            printf 'setup: FAILED (exit %s); last lines of %s:\n' "$rc" "$LOG" >&2
            tail -n 40 "$LOG" >&2
        else
            printf 'setup: FAILED (exit %s)\n' "$rc" >&2
        fi
    else
        rm -f "$LOG"
    fi
}
trap cleanup EXIT

# run DESCRIPTION CMD...: run quietly into the log; on failure the trap shows the log.
run() {
    local what=$1
    shift
    printf '%s\n--- %s: %s\n' "" "$what" "$*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        die "$what failed: $*"
    fi
}

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# --- 1. system packages -----------------------------------------------------------
wanted=("${APT_PACKAGES[@]}")
# kubectl: the tests drive an in-memory API server with the real kubectl. Machines of this
# project's kind come with one (google-cloud-cli's, 1.32); without any, Debian's
# kubernetes-client (kubectl 1.20) is installed. It owns /usr/bin/kubectl too, so it is
# only installed when there is no kubectl at all. The tests pass with both.
NEED_KUBECTL=0
APT_UPDATED=0
command -v kubectl >/dev/null 2>&1 || NEED_KUBECTL=1

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${wanted[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
else
    die "dpkg-query not found: this script sets up Debian bookworm (apt); install the packages listed in APT_PACKAGES of $0 by hand"
fi

if ((${#missing[@]} == 0 && NEED_KUBECTL == 0)); then
    say "[1/3] system packages: all ${#wanted[@]} present"
elif ((${#missing[@]} == 0)); then
    ((CHECK == 0)) || die "kubectl is missing (run: bash scripts/setup.sh)"
    [[ $EUID == 0 ]] || die "kubectl is missing; run as root so apt-get can install it"
    say "[1/3] system packages: all ${#wanted[@]} present, kubectl missing"
else
    ((CHECK == 0)) || die "${#missing[@]} system packages missing: ${missing[*]} (run: bash scripts/setup.sh)"
    [[ $EUID == 0 ]] || die "${#missing[@]} system packages missing (${missing[*]}); run as root so apt-get can install them"
    say "[1/3] system packages: installing ${#missing[@]} (${missing[*]}) ..."
    export DEBIAN_FRONTEND=noninteractive
    # tshark asks whether non-root users may capture; answer it before it is asked.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\n# flowscope setup.sh: no service starts while installing\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        OWN_POLICY_RC=1
    fi
    # A fresh cloud machine often runs unattended-upgrades at first boot: wait for its lock.
    lock=(-o DPkg::Lock::Timeout=600)
    run "apt-get update" apt-get "${lock[@]}" update -q
    APT_UPDATED=1
    run "apt-get install" apt-get "${lock[@]}" install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}"
    drop_policy_rc
    # On a systemd host, services of packages installed just now would start at the next
    # boot and hold their ports: disable those (only those: a daemon the operator of
    # this machine installed before is theirs).
    if [[ -d /run/systemd/system ]]; then
        for pkg in "${DAEMON_PACKAGES[@]}"; do
            [[ " ${missing[*]} " == *" $pkg "* ]] || continue
            for unit in $(dpkg -L "$pkg" | sed -n 's#^/lib/systemd/system/\([^@]*\.service\)$#\1#p'); do
                run "disable $unit" systemctl disable --now "$unit"
            done
        done
    fi
    say "      installed in $((SECONDS - START))s"
fi

if ((NEED_KUBECTL)); then
    ((CHECK == 0)) || die "kubectl is missing (run: bash scripts/setup.sh)"
    export DEBIAN_FRONTEND=noninteractive
    lock=(-o DPkg::Lock::Timeout=600)
    say "      kubectl: Debian's kubernetes-client"
    ((APT_UPDATED)) || run "apt-get update" apt-get "${lock[@]}" update -q
    run "apt-get install kubernetes-client" apt-get "${lock[@]}" install -y -q --no-install-recommends kubernetes-client
fi

# Every executable the tests ask for with require_tool() (tests/test_project_ground.py
# checks that this list covers them).
for tool in python3 ip ss ping nft conntrack tshark dumpcap nfacctd softflowd softflowctl \
    nfcapd nfdump clickhouse-server clickhouse-client prometheus promtool kubectl \
    openssl curl git chromium; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is still not on PATH after installing packages"
done
for daemon in prometheus clickhouse-server nfcapd nfacctd softflowd; do
    if pgrep -x "$daemon" >/dev/null 2>&1; then
        say "      note: a $daemon process is running on this machine; the tests use their own ports"
    fi
done

# --- 1b. the dashboards' chart library (npm registry, package-lock.json) ---------------
# ECharts comes from the npm registry, pinned by package-lock.json, and is copied into the
# collector's package data (collector/ui/static/vendor/), so the dashboards never reach a
# CDN at run time. `npm ci` runs only when the lock file changed since the last copy.
VENDOR="$REPO/collector/ui/static/vendor"
NPM_STAMP="$VENDOR/.package-lock.sha256"
want_npm="$(sha256sum "$REPO/package-lock.json" | cut -d' ' -f1)"
if [[ -f $VENDOR/echarts.min.js && -f $NPM_STAMP && "$(cat "$NPM_STAMP")" == "$want_npm" ]]; then
    say "      echarts: vendored, package-lock.json unchanged"
else
    ((CHECK == 0)) || die "ECharts is not vendored into $VENDOR (run: bash scripts/setup.sh)"
    # Debian ships npm apart from nodejs; a NodeSource nodejs carries its own (and conflicts
    # with Debian's npm), so the package is only installed when there is no npm at all.
    if ! command -v npm >/dev/null 2>&1; then
        ((CHECK == 0)) || die "npm is missing (run: bash scripts/setup.sh)"
        [[ $EUID == 0 ]] || die "npm is missing; run as root so apt-get can install it"
        ((APT_UPDATED)) || run "apt-get update" apt-get -o DPkg::Lock::Timeout=600 update -q
        run "apt-get install npm" apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends npm
    fi
    run "npm ci" npm ci --prefix "$REPO" --ignore-scripts --no-audit --no-fund
    mkdir -p "$VENDOR"
    cp "$REPO/node_modules/echarts/dist/echarts.min.js" "$VENDOR/echarts.min.js"
    cp "$REPO/node_modules/echarts/LICENSE" "$VENDOR/echarts.LICENSE"
    printf '%s\n' "$want_npm" >"$NPM_STAMP"
    say "      echarts: $(sed -n 's/.*"version": "\([^"]*\)".*/\1/p' "$REPO/node_modules/echarts/package.json" | head -n1) vendored from the npm registry"
fi

# --- 2. Python environment --------------------------------------------------------
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "python3 is $(python3 -V 2>&1); flowscope needs 3.11 or newer (Debian bookworm has 3.11)"

if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    ((CHECK == 0)) || die "no working $VENV (run: bash scripts/setup.sh)"
    say "[2/3] python: creating $VENV"
    rm -rf "$VENV"
    run "python3 -m venv" python3 -m venv "$VENV"
else
    say "[2/3] python: $VENV exists"
fi

# --- 3. flowscope and its Python dependencies ----------------------------------------
STAMP="$VENV/.flowscope-setup"
# The C accelerators (setup.py: ipfix/*.c and the header they share with aggregator/_aggr.c, agent/_ctparse.c,
# aggregator/_aggr.c, collector/_rowcols.c) are compiled by the editable install, so a change to them reinstalls too.
want_stamp="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO"/ipfix/*.c "$REPO"/ipfix/*.h "$REPO"/agent/*.c "$REPO"/aggregator/*.c "$REPO"/collector/*.c "$REPO"/collector/*.h <("$VENV/bin/python" -V 2>&1) |
    sha256sum | cut -d' ' -f1) $EXTRAS"
if [[ ${FLOWSCOPE_SETUP_FORCE:-0} != 1 && -f $STAMP && "$(cat "$STAMP")" == "$want_stamp" ]] &&
    "$VENV/bin/python" -c 'import flowscope.cli' >/dev/null 2>&1; then
    say "[3/3] flowscope: installed, pyproject.toml unchanged"
else
    ((CHECK == 0)) || die "flowscope is not installed in $VENV or pyproject.toml changed since (run: bash scripts/setup.sh)"
    say "[3/3] flowscope: pip install -e '.[$EXTRAS]' (first run downloads ~600 MB) ..."
    t=$SECONDS
    rm -f "$STAMP"
    # The accelerators are optional extensions: one that fails to compile is skipped with a
    # warning, and an older build beside its source would go on being imported. Removed first,
    # a failed build shows as a missing module below.
    rm -f "$REPO"/ipfix/_*.so "$REPO"/agent/_*.so "$REPO"/aggregator/_*.so "$REPO"/collector/_*.so
    run "pip install" "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        -e "$REPO[$EXTRAS]"
    "$VENV/bin/flowscope" --help >/dev/null 2>>"$LOG" || die "flowscope was installed but 'flowscope --help' fails"
    if "$VENV/bin/python" -c 'import flowscope.ipfix._speedups, flowscope.ipfix._columnar, flowscope.agent._ctparse, flowscope.aggregator._aggr, flowscope.collector._rowcols' >/dev/null 2>&1; then
        say "      C accelerators built (IPFIX codec, columnar decode, conntrack parser, aggregation core, store columns)"
    elif command -v cc >/dev/null 2>&1; then
        die "a C accelerator failed to compile (a compiler is here, so this is a defect); see the compiler's errors with: $VENV/bin/python -m pip install --no-deps -v -e $REPO"
    else
        say "      note: C accelerators not built (no compiler): the pure-Python twins serve"
    fi
    printf '%s\n' "$want_stamp" >"$STAMP"
    say "      installed in $((SECONDS - t))s"
fi

say "ready in $((SECONDS - START))s ($VENV/bin/flowscope)"
