"""The project's ground: packaging, layering, the CLI shell, the scripts and the README.

These tests guard what every component relies on and nobody owns alone: that the
component folders import as ``flowscope.<component>`` while ``import operator`` from the
repository root still loads the standard library; that the import-linter contracts hold
and actually bite; that every module says why it exists; that ``flowscope --help`` is
fast and every subcommand has a handler; that the setup, test and demo scripts are valid
and the README shows exactly the two commands a newcomer runs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

with (REPO / "pyproject.toml").open("rb") as _fh:
    PYPROJECT = tomllib.load(_fh)
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]
CONTRACTS: list[dict[str, object]] = PYPROJECT["tool"]["importlinter"]["contracts"]


def run(*argv: str | Path, cwd: Path = REPO, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw
    )


def load_checks() -> ModuleType:
    """scripts/checks.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("flowscope_checks_script", REPO / "scripts" / "checks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- packaging ---------------------------------------------------------------------


def test_import_operator_from_the_repository_root_loads_the_standard_library() -> None:
    # `python -c` puts the current directory first on sys.path: the repository's
    # operator/ folder must not shadow the stdlib module, which is why it has no __init__.py.
    assert not (REPO / "operator" / "__init__.py").exists(), "operator/ must never get an __init__.py"
    proc = run(PY, "-c", "import operator; print(operator.__file__); print(operator.itemgetter(1)('ab'))")
    assert proc.returncode == 0, proc.stderr
    path, probe = proc.stdout.split()
    assert Path(path).resolve() == (Path(sysconfig.get_paths()["stdlib"]) / "operator.py").resolve()
    assert probe == "b"


def test_the_pypi_ipfix_peer_is_not_shadowed_by_the_ipfix_folder() -> None:
    # The peer tests decode with PyPI's `ipfix` package; the repository's ipfix/ folder
    # would shadow it if the repository root were on sys.path (as `python -m pytest`
    # from the root puts it): scripts/test.sh runs the pytest script instead.
    import ipfix

    assert Path(ipfix.__file__).resolve().parent != (REPO / "ipfix").resolve(), (
        "the repository root is on sys.path: run .venv/bin/pytest, not python -m pytest"
    )
    assert hasattr(ipfix, "ie")


@pytest.mark.parametrize("package", sorted(PACKAGE_DIR))
def test_each_component_folder_imports_as_its_flowscope_package(package: str) -> None:
    folder = (REPO / PACKAGE_DIR[package]).resolve()
    assert folder.is_dir(), f"pyproject.toml maps {package} to {folder}, which does not exist"
    code = f"import json, {package} as m; print(json.dumps([str(p) for p in m.__path__]))"
    # From the repository root (where operator/ sits on sys.path) and from elsewhere.
    for cwd in (REPO, Path("/")):
        proc = run(PY, "-c", code, cwd=cwd)
        assert proc.returncode == 0, f"import {package} from {cwd}: {proc.stderr}"
        paths = {Path(p).resolve() for p in json.loads(proc.stdout)}
        assert folder in paths, f"{package} resolved to {paths}, expected {folder}"


def test_every_package_folder_is_listed_in_pyproject_packages() -> None:
    # setuptools only ships what `packages` lists: a forgotten sub-package works from
    # the checkout and is silently missing from the wheel and the image.
    unlisted = []
    for package, folder in PACKAGE_DIR.items():
        assert package in PACKAGES, f"{package} is in package-dir but not in packages"
        root = REPO / folder
        for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            if "__pycache__" in directory.parts or not any(directory.glob("*.py")):
                continue
            dotted = ".".join([package, *directory.relative_to(root).parts])
            if dotted not in PACKAGES:
                unlisted.append(f"{directory.relative_to(REPO)} ({dotted})")
    assert not unlisted, f"add to [tool.setuptools] packages in pyproject.toml: {unlisted}"


def _modules() -> list[Path]:
    files = []
    for folder in PACKAGE_DIR.values():
        files += [p for p in sorted((REPO / folder).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def test_every_module_opens_with_a_docstring_saying_why_it_exists() -> None:
    modules = _modules()
    assert len(modules) >= len(PACKAGE_DIR)
    missing = []
    for path in modules:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        doc = ast.get_docstring(tree)
        if not doc or len(doc.split()) < 3:
            missing.append(str(path.relative_to(REPO)))
    assert not missing, f"modules without a docstring at the top: {missing}"


def _clean_copy(dest: Path) -> Path:
    """The files a fresh clone would have (tracked and new, not ignored): no stale build/."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


@pytest.mark.slow
def test_the_wheel_lays_out_every_module_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    # Editable installs hide packaging mistakes (the import hook finds any file in the
    # folders); the image the operator deploys installs the wheel. Build it from a clean
    # copy, install it into a private directory, and use it from elsewhere.
    import zipfile

    source = _clean_copy(tmp_path / "src")
    built = run(PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("flowscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for package, folder in PACKAGE_DIR.items():
        root = source / folder
        prefix = package.replace(".", "/")
        expected |= {f"{prefix}/{p.relative_to(root)}" for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    for package, globs in PYPROJECT["tool"]["setuptools"].get("package-data", {}).items():
        root = source / PACKAGE_DIR[package]
        prefix = package.replace(".", "/")
        for pattern in globs:
            expected |= {f"{prefix}/{p.relative_to(root)}" for p in root.glob(pattern)}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    stray = sorted(n for n in names if n.endswith(".py") and n not in expected)
    assert not stray, f"in the wheel but not in the source: {stray}"

    site = tmp_path / "site"
    installed = run(PY, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import json, operator, importlib, flowscope\n"
        f"mods = {sorted(PACKAGE_DIR)!r}\n"
        "paths = {m: list(importlib.import_module(m).__path__) for m in mods}\n"
        "print(json.dumps({'operator': operator.__file__, 'paths': paths}))\n"
    )
    proc = run(PY, "-c", code, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    for package, paths in found["paths"].items():
        assert paths == [str(site.joinpath(*package.split(".")))], (package, paths)
    assert Path(found["operator"]).resolve() == (Path(sysconfig.get_paths()["stdlib"]) / "operator.py").resolve()
    helped = run(PY, "-m", "flowscope", "--help", cwd=tmp_path, env=env)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: flowscope"), helped.stderr


# --- layering (import-linter) ----------------------------------------------------------


def test_import_contracts_are_kept() -> None:
    proc = run(PY, REPO / "scripts" / "checks.py", "imports")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"Contracts: (\d+) kept, (\d+) broken", proc.stdout)
    assert match, proc.stdout
    assert (int(match[1]), int(match[2])) == (len(CONTRACTS), 0)


def test_import_contracts_catch_a_violation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A contract that cannot fail proves nothing: plant one forbidden import per
    # contract in a copy of the code and expect each contract to report it.
    checks = load_checks()
    placed = checks.build_view(tmp_path)
    (tmp_path / "flowscope" / "ipfix" / "zz_planted.py").write_text('"""planted"""\nimport flowscope.agent\n')
    (tmp_path / "flowscope" / "operator" / "zz_target.py").write_text('"""planted"""\n')
    (tmp_path / "flowscope" / "aggregator" / "zz_planted.py").write_text(
        '"""planted"""\nfrom flowscope.operator import zz_target\n'
    )
    (tmp_path / "flowscope" / "collector" / "zz_planted.py").write_text('"""planted"""\nimport flowscope.aggregator\n')
    with (tmp_path / "flowscope" / "durations.py").open("a") as fh:
        fh.write("import flowscope.cli\nimport flowscope.agent\n")
    rc = checks.lint_imports(tmp_path, placed, [])
    out = capsys.readouterr().out
    assert rc != 0
    assert f"Contracts: 0 kept, {len(CONTRACTS)} broken" in out, out
    assert "flowscope.ipfix.zz_planted -> flowscope.agent" in out
    assert "flowscope.aggregator.zz_planted -> flowscope.operator.zz_target" in out
    assert "flowscope.durations -> flowscope.cli" in out
    assert "flowscope.durations -> flowscope.agent" in out
    assert "flowscope.collector.zz_planted -> flowscope.aggregator" in out


# --- the command line ------------------------------------------------------------------


def _leaf_parsers(parser, path=()):  # type: ignore[no-untyped-def]
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*path, name))


def test_flowscope_help_lists_every_command_and_each_has_a_handler() -> None:
    from flowscope.cli import build_parser

    leaves = list(_leaf_parsers(build_parser()))
    script = Path(PY).parent / "flowscope"
    argv = [script] if script.exists() else [PY, "-m", "flowscope"]
    proc = run(*argv, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: flowscope")
    without_handler = []
    for path, parser in leaves:
        if not path:
            continue  # no component registered commands yet: only the top level
        assert path[0] in proc.stdout, f"`flowscope --help` does not list {path[0]}"
        if not callable(parser.get_default("func")):
            without_handler.append(" ".join(path))
    assert not without_handler, f"subcommands without set_defaults(func=...): {without_handler}"
    # Every leaf command answers --help by itself.
    for path, _ in leaves:
        if path:
            sub = run(*argv, *path, "--help")
            assert sub.returncode == 0 and "usage:" in sub.stdout, (path, sub.stderr)


def test_flowscope_help_does_not_import_heavy_dependencies() -> None:
    # Component CLI modules keep pyroute2, kopf, the kubernetes client and ClickHouse
    # imports inside their command functions: `--help` stays fast, and a missing
    # optional dependency only breaks the command that needs it.
    heavy = ["kopf", "pyroute2", "kubernetes", "chdb", "clickhouse_driver", "pandas", "pyarrow"]
    code = (
        "import json, sys, flowscope.cli\n"
        "flowscope.cli.build_parser()\n"
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))\n"
    )
    proc = run(PY, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# --- scripts, CI and README --------------------------------------------------------------


SHELL_SCRIPTS = sorted((REPO / "scripts").glob("*.sh")) + [REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_scripts_are_valid_strict_bash(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), f"{script.name}: wrong shebang"
    assert "set -euo pipefail" in text, f"{script.name}: must fail on errors"
    proc = run("bash", "-n", script)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_readme_test_command_from_the_repository_root() -> None:
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    text = ci.read_text()
    assert re.search(r'^cd "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)/\.\."', text, re.M)
    # The README's test command, as written there (its second ```sh block), is the
    # command CI runs: one source of truth, no forwarded arguments.
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```sh\n(.*?)\n```", readme, re.M | re.S)
    assert len(blocks) == 2, "the README has exactly two commands"
    test_command = blocks[1].strip()
    assert test_command == "bash scripts/test.sh"
    lines = [line.strip() for line in text.splitlines()]
    assert test_command in lines or f"exec {test_command}" in lines, text


def test_setup_check_reports_this_machine_ready() -> None:
    # --check installs nothing: it says what is missing. After scripts/test.sh ran
    # setup.sh (as CI does) a second look must find nothing to do.
    proc = run("bash", REPO / "scripts" / "setup.sh", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "system packages: all" in proc.stdout
    assert "flowscope: installed, pyproject.toml unchanged" in proc.stdout


def test_setup_provides_every_tool_the_tests_require() -> None:
    # CI on a machine of this kind may have a tool preinstalled that a fresh machine
    # lacks: every name a test passes to require_tool() must be one setup.sh verifies.
    setup = (REPO / "scripts" / "setup.sh").read_text()
    loop = re.search(r"^for tool in (.*?); do$", setup, re.M | re.S)
    assert loop, "setup.sh lost its `for tool in ...; do` check"
    provided = set(loop[1].replace("\\", " ").split())
    required = set()
    for path in (REPO / "tests").rglob("*.py"):
        for call in re.findall(r"\b(?:require_tool|tool)\(([^)]*)\)", path.read_text(encoding="utf-8")):
            required |= set(re.findall(r"[\"']([\w.+-]+)[\"']", call))
    assert {"tshark", "conntrack", "kubectl"} <= required  # the scan itself works
    assert required <= provided, f"tests require tools setup.sh does not provide: {sorted(required - provided)}"


def test_readme_shows_exactly_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```([\w-]*)\n(.*?)^```", readme, re.M | re.S)
    commands = []
    for lang, body in blocks:
        lines = [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if lang in ("sh", "bash", "shell", "console"):
            commands += [ln.removeprefix("$ ").removeprefix("# ") for ln in lines]
        else:
            # Pictures and listings only: nothing that looks like a prompt to type at.
            assert not any(ln.startswith("$ ") for ln in lines), f"a command hides in a {lang or 'plain'} block"
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for link in re.findall(r"\]\(((?:docs|scripts|config|crds|benchmarks)/[^)#]+)\)", readme):
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_demo_flows_are_antrea_agent_records_the_registry_knows() -> None:
    from flowscope.ipfix import DataType, default_registry

    registry = default_registry()
    lines = (REPO / "scripts" / "demo-flows.jsonl").read_text().splitlines()
    assert len(lines) >= 5
    kinds = set()
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        v4 = "sourceIPv4Address" in record
        assert v4 != ("sourceIPv6Address" in record), f"line {number}: exactly one address family"
        for name, value in record.items():
            ie = registry.get(name)  # raises for a name the registry does not know
            if ie.data_type in (DataType.string, DataType.ipv4Address, DataType.ipv6Address):
                assert isinstance(value, str), f"line {number}: {name} = {value!r}"
            else:
                assert isinstance(value, int) and value >= 0, f"line {number}: {name} = {value!r}"
        kinds.add((record["flowType"], v4, bool(record["destinationServicePortName"])))
    # The demo shows intra-node, inter-node, to-external, service and IPv6 flows.
    assert {k[0] for k in kinds} >= {1, 2, 3}
    assert any(k[2] for k in kinds) and any(not k[1] for k in kinds)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_demo_replay_delivers_every_record_field_for_field() -> None:
    # demo.sh --replay: collector and exporter over TCP on loopback; the script itself
    # compares every decoded field with what was sent.
    sent = [json.loads(line) for line in (REPO / "scripts" / "demo-flows.jsonl").read_text().splitlines()]
    env = {**os.environ, "FLOWSCOPE_DEMO_PORT": str(_free_port())}
    proc = run("bash", REPO / "scripts" / "demo.sh", "--replay", env=env, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fields = sum(len(r) for r in sent)
    assert f"demo: {len(sent)}/{len(sent)} records received, every one of their {fields} fields equal" in proc.stdout
    for record in sent:  # the summary table names every source pod that was sent
        if record["sourcePodName"]:
            assert record["sourcePodName"] in proc.stdout
