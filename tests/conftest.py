"""Shared test plumbing.

Real-part tests need tools from Debian (tshark, nfacctd, softflowd, conntrack, nft,
kubectl, clickhouse-server, prometheus) and root for network namespaces.
Locally a missing tool skips the test with the install hint; in CI (CI=true) nothing is
skipped for a missing tool: the test fails, because a green run that skipped its
real-part tests would prove nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory: pytest.TempPathFactory):
    """What tests and their peers make with ``tempfile`` (a peer's output directory, a test
    PKI, a subprocess's config) goes under this run's pytest base directory, which pytest
    prunes to the last three runs, instead of being left loose in /tmp run after run."""
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = before


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI never skips for a missing tool: fix the setup script)")
    pytest.skip(reason)


def require_tool(*names: str) -> None:
    """Skip (locally) or fail (CI) unless every named executable is on PATH."""
    for name in names:
        if shutil.which(name) is None:
            _missing(f"{name} is not installed; scripts/setup.sh installs it")


def shared_tool(relative: str) -> str:
    """A tool from the project's shared folder (``shared/tools/...``): beside the clone in CI
    (``../shared``), or further up for a worktree; FLOWSCOPE_SHARED names it elsewhere.
    Missing: skip locally, fail in CI."""
    repo = Path(__file__).resolve().parent.parent
    roots = [os.environ.get("FLOWSCOPE_SHARED", ""), str(repo.parent / "shared"), str(repo.parent.parent / "shared")]
    for root in roots:
        if root and os.access(Path(root) / relative, os.X_OK):
            return str(Path(root) / relative)
    _missing(f"{relative} is not in ../shared (looked in {', '.join(r for r in roots if r)})")
    raise AssertionError("unreachable")


def require_root() -> None:
    """Network namespaces and conntrack need root."""
    if os.geteuid() != 0:
        _missing("needs root for network namespaces and conntrack")


@pytest.fixture
def tool():
    """``tool("tshark")`` inside a test: skip locally / fail in CI when missing."""
    return require_tool
