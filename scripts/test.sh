#!/usr/bin/env bash
# Set everything up and run flowscope's whole test suite: the README's test command.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k netns -x     # extra arguments go to pytest
#
# Stages: setup (scripts/setup.sh), import-linter contracts, mypy --strict on the IPFIX
# library, pytest over tests/. Every stage runs even when an earlier one failed, so one
# run shows every problem; the exit status is non-zero if any stage failed, including a
# pytest run that collected no tests at all (exit 5), which proves nothing.
#
# Root is required: the real-part tests create network namespaces and read conntrack.
# With CI=true, tests/conftest.py turns every skip for a missing tool into a failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

if [[ $EUID != 0 ]]; then
    echo "test: ERROR: run as root (sudo bash scripts/test.sh): the netns and conntrack tests need it" >&2
    exit 1
fi

START=$SECONDS
failed=()

stage() {
    local name=$1
    shift
    local t=$SECONDS rc=0
    printf '\n== %s\n' "$name"
    "$@" || rc=$?
    if ((rc == 0)); then
        printf '== %s: ok (%ss)\n' "$name" "$((SECONDS - t))"
    else
        printf '== %s: FAILED (exit %s, %ss)\n' "$name" "$rc" "$((SECONDS - t))"
        failed+=("$name")
    fi
    return 0
}

pytest_stage() {
    local rc=0
    # Not `python -m pytest`: that puts the repository root on sys.path, where the ipfix/
    # folder would shadow the PyPI ipfix package the peer tests use.
    .venv/bin/pytest tests -q -ra --strict-markers --durations=15 "$@" || rc=$?
    if ((rc == 5)); then
        echo "test: pytest collected no tests: that is a failure, not a pass" >&2
    fi
    return "$rc"
}

printf '== setup\n'
bash scripts/setup.sh # without a working environment nothing else can run: fail here
# One line of versions, for reading a CI log later.
printf 'test: %s, kernel %s, kubectl %s, tshark %s, %s cores, CI=%s\n' \
    "$(.venv/bin/python -V 2>&1)" "$(uname -r)" \
    "$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -n1)" \
    "$(tshark -v 2>/dev/null | head -n1 | awk '{print $3}')" "$(nproc)" "${CI:-unset}"

stage "import-linter (pyproject.toml contracts)" .venv/bin/python scripts/checks.py imports
stage "mypy --strict flowscope.ipfix" .venv/bin/python scripts/checks.py types
stage "pytest" pytest_stage "$@"

echo
if ((${#failed[@]})); then
    printf 'test: FAILED after %ss: %s\n' "$((SECONDS - START))" "$(IFS=,; echo "${failed[*]}" | sed 's/,/, /g')"
    exit 1
fi
printf 'test: all stages passed in %ss\n' "$((SECONDS - START))"
