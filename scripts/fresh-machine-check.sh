#!/usr/bin/env bash
# Prove the README's commands on a fresh Debian bookworm machine (not part of CI).
#
# A "fresh machine" here is a podman container made from a debootstrap'ed minbase
# bookworm root filesystem: no Python venv, no tshark, no apt lists, nothing of ours.
# The repository is git-cloned from HEAD (committed files only, as a fresh clone would
# see them) into the container, which then runs `bash scripts/setup.sh` and a smoke test,
# or with --full the whole `bash scripts/test.sh`.
#
#   bash scripts/fresh-machine-check.sh          # setup + smoke (flowscope --help, imports)
#   bash scripts/fresh-machine-check.sh --full   # setup + the whole test suite (CI=true)
#   ... --host-kubectl   # lend the host's kubectl binary, as machines of this project's
#                        # kind come with one (google-cloud-cli's 1.32); without it the
#                        # container has no kubectl and setup.sh must install one
#
# Needs root, podman, runc and debootstrap on the host (Debian: apt-get install podman
# runc debootstrap). The root filesystem tarball is kept in $FRESH_DIR (default
# /tmp/flowscope-fresh) and reused; the container, the image, the private podman store
# and the clone are removed afterwards, also on failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FRESH_DIR="${FRESH_DIR:-/tmp/flowscope-fresh}"
ROOTFS_TAR="$FRESH_DIR/bookworm-minbase.tar"
RUN_ID="$(date +%s)-$$-$RANDOM"
WORK="$(mktemp -d /tmp/ffc.XXXXXX)"   # short: podman refuses a runroot over 50 characters
IMAGE="localhost/flowscope-fresh-base:$RUN_ID"
CONTAINER="flowscope-fresh-$RUN_ID"
FULL=0
HOST_KUBECTL=0
for arg in "$@"; do
    case "$arg" in
        --full) FULL=1 ;;
        --host-kubectl) HOST_KUBECTL=1 ;;
        *)
            echo "usage: bash scripts/fresh-machine-check.sh [--full] [--host-kubectl]" >&2
            exit 2
            ;;
    esac
done

say() { printf 'fresh-machine: %s\n' "$*"; }
die() {
    printf 'fresh-machine: ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $EUID == 0 ]] || die "run as root (debootstrap and privileged podman need it)"
for tool in podman runc debootstrap git; do
    command -v "$tool" >/dev/null || die "$tool missing: apt-get install podman runc debootstrap git"
done

# A private store keeps this away from any other podman user of the machine. runc:
# crun refuses the cgroup layout of this kind of machine; ulimits must stay below the
# host's hard limits.
PODMAN=(podman --root "$WORK/store" --runroot "$WORK/runroot" --runtime runc)

cleanup() {
    local rc=$?
    "${PODMAN[@]}" rm -f "$CONTAINER" >/dev/null 2>&1 || true
    "${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
    # The store holds overlay mounts until podman lets go of them.
    umount -R "$WORK/store/overlay" >/dev/null 2>&1 || true
    rm -rf "$WORK"
    rm -rf "$FRESH_DIR/rootfs.partial"
    ((rc == 0)) || say "FAILED (exit $rc)"
}
trap cleanup EXIT
mkdir -p "$FRESH_DIR"

# The Debian mirror apt already uses on this host (a fresh machine uses its own default).
mirror="$(grep -rhoE '^(URIs:|deb)[[:space:]]+[a-z]+://[^[:space:]]+/debian/?([[:space:]]|$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
    grep -oE '[a-z]+://[^[:space:]]+' | head -n1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
mirror="${mirror%/}"

if [[ ! -s $ROOTFS_TAR ]]; then
    say "debootstrap minbase bookworm from $mirror ..."
    t=$SECONDS
    rootfs="$FRESH_DIR/rootfs.partial"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
        {
            tail -n 30 "$WORK/debootstrap.log" >&2
            die "debootstrap failed"
        }
    # The sources a Debian bookworm image comes with: release, updates, security.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Like a published image: no package lists, no cached .debs.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -cf "$ROOTFS_TAR.tmp" . && mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$rootfs"
    say "root filesystem ready in $((SECONDS - t))s: $ROOTFS_TAR ($(du -h "$ROOTFS_TAR" | cut -f1))"
else
    say "reusing $ROOTFS_TAR"
fi

"${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$ROOTFS_TAR" "$IMAGE" >/dev/null 2>"$WORK/import.log" ||
    { cat "$WORK/import.log" >&2; die "podman import failed"; }
say "image $IMAGE imported"

# As CI lays it out: a fresh clone, with a read-only copy of shared/ beside it.
mkdir -p "$WORK/ci"
git clone -q "$REPO" "$WORK/ci/flowscope"
say "cloned $(git -C "$WORK/ci/flowscope" rev-parse --short HEAD) ($(git -C "$WORK/ci/flowscope" log -1 --format=%s | cut -c1-60))"
if [[ -d $REPO/../shared ]]; then
    cp -r "$REPO/../shared" "$WORK/ci/shared"
    chmod -R a-w "$WORK/ci/shared"
fi

# This machine reaches PyPI through a TLS-intercepting proxy: hand pip the host's CA
# bundle (a real fresh machine does not need this).
extra=()
host_ca="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
if [[ -s $host_ca ]]; then
    extra+=(-v "$host_ca:/run/host-ca.crt:ro" -e PIP_CERT=/run/host-ca.crt)
fi

if ((HOST_KUBECTL)); then
    # google-cloud-cli's kubectl is a dispatcher beside versioned static binaries: lend
    # the 1.32 one if it is there, else whatever kubectl resolves to.
    kubectl_bin="$(readlink -f "$(command -v kubectl)")" || die "--host-kubectl: no kubectl on this host"
    [[ -x ${kubectl_bin}.1.32 ]] && kubectl_bin="${kubectl_bin}.1.32"
    extra+=(-v "$kubectl_bin:/usr/local/bin/kubectl:ro")
    say "lending the host's $kubectl_bin as /usr/local/bin/kubectl"
fi

inner='set -euo pipefail
cd /ci/flowscope
t0=$SECONDS
bash scripts/setup.sh
echo "fresh-machine: SETUP_SECONDS=$((SECONDS - t0))"
.venv/bin/flowscope --help
.venv/bin/python -c "import flowscope.ipfix, flowscope.agent, flowscope.aggregator, flowscope.collector; print(\"imports ok\")"
t0=$SECONDS
bash scripts/setup.sh   # a second run must be a quick no-op
echo "fresh-machine: SECOND_SETUP_SECONDS=$((SECONDS - t0))"
'
if ((FULL)); then
    inner+='t1=$SECONDS
bash scripts/test.sh
echo "fresh-machine: TEST_SECONDS=$((SECONDS - t1))"
'
fi
# Trust the exit status and also this last line: only a run that got to the end passed.
inner+='echo "fresh-machine: INNER-DONE"
'

say "running in a fresh bookworm container (privileged, host network) ..."
t=$SECONDS
set +e
"${PODMAN[@]}" run --name "$CONTAINER" --privileged --network host \
    --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
    -e CI=true -v "$WORK/ci:/ci" "${extra[@]}" \
    "$IMAGE" bash -c "$inner" </dev/null 2>&1 | tee "$WORK/container.log"
rc=${PIPESTATUS[0]}
set -e
((rc == 0)) || die "the container run failed (exit $rc)"
grep -q '^fresh-machine: INNER-DONE' "$WORK/container.log" ||
    die "the container run stopped before its end, although podman reported exit 0"
say "PASSED in $((SECONDS - t))s: $(grep -o 'SETUP_SECONDS=[0-9]*' "$WORK/container.log" | head -n1)"
