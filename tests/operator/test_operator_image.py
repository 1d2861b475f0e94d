"""The image the operator deploys serves working dashboards (no docker daemon here).

What can be proven without building it: the Dockerfile's stages install only packages that
scripts/setup.sh's list (or its npm fallback) names, vendor the chart library with the very
``npm ci`` flags and file copies setup.sh uses, into the path the package data, the web
server and the start-up check read; the ui stage's own command, run with npm against the
lock file (offline, from the cache setup.sh's ``npm ci`` filled), yields byte for byte the
bundle setup.sh vendored; and a collector asked for dashboards without the bundle refuses
at start-up, naming the fix, instead of serving pages that draw nothing.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flowscope.collector.ui.app import ASSETS, STATIC
from flowscope.collector.ui.options import CHART_BUNDLE, add_ui_options, check_chart_bundle, ui_from_args

ROOT = Path(__file__).resolve().parents[2]
VENDOR = "collector/ui/static/vendor"


def _stages() -> dict[str, list[tuple[str, str]]]:
    """The Dockerfile's stages by name ("" for the last, unnamed one): (instruction, argument)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, arg = line.partition(" ")
        if op == "FROM":
            m = re.match(r"\S+(?:\s+AS\s+(\S+))?", arg)
            assert m
            current = stages.setdefault(m.group(1) or "", [])
        if current is not None:
            current.append((op, arg.strip()))
    return stages


def _apt_installs(stage: list[tuple[str, str]]) -> set[str]:
    out: set[str] = set()
    for op, arg in stage:
        for m in re.finditer(r"apt-get install ([^&]*)", arg):
            out |= {w for w in m.group(1).split() if not w.startswith("-")}
    return out


def _setup_sh() -> str:
    return (ROOT / "scripts/setup.sh").read_text()


def _setup_packages() -> set[str]:
    m = re.search(r"APT_PACKAGES=\((.*?)\n\)", _setup_sh(), re.S)
    assert m, "APT_PACKAGES not found in scripts/setup.sh"
    return {w for line in m.group(1).splitlines() for w in line.split("#")[0].split()}


def _npm_ci_flags(command: str) -> list[str]:
    words = shlex.split(command)
    words = words[words.index("ci") + 1:]
    flags = []
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w == "--prefix":
            skip = True  # setup.sh runs it from elsewhere; the image's WORKDIR is the project
        elif w.startswith("--"):
            flags.append(w)
        else:
            break
    return flags


def test_every_package_the_image_installs_is_one_setup_sh_installs():
    stages = _stages()
    assert set(stages) == {"ui", "build", ""}
    listed = _setup_packages()
    # setup.sh installs Debian's npm only where no npm is on PATH (its fallback for vendoring)
    assert "apt-get install npm" in _setup_sh()
    assert _apt_installs(stages["ui"]) == {"nodejs", "npm", "ca-certificates"}
    for name, stage in stages.items():
        assert _apt_installs(stage) <= listed | {"npm"}, (name, _apt_installs(stage) - listed)
    # node stays in the ui stage: neither later stage installs it
    assert not {"nodejs", "npm"} & (_apt_installs(stages["build"]) | _apt_installs(stages[""]))


def test_the_ui_stage_vendors_the_bundle_as_setup_sh_does():
    ui = _stages()["ui"]
    copied = [arg.split() for op, arg in ui if op == "COPY"]
    assert ["package.json", "package-lock.json", "./"] in copied
    run = " ".join(arg for op, arg in ui if op == "RUN" and "npm ci" in arg)
    setup = _setup_sh()
    setup_npm = re.search(r'run "npm ci" (npm ci [^\n]*)', setup)
    assert setup_npm
    assert _npm_ci_flags(run[run.index("npm ci"):]) == _npm_ci_flags(setup_npm.group(1))
    # the same two files, under the same names, as setup.sh's cp lines into $VENDOR
    setup_cp = re.findall(r'cp "\$REPO/(node_modules/\S+)" "\$VENDOR/(\S+)"', setup)
    image_cp = re.findall(r"cp (node_modules/\S+) /vendor/(\S+)", run)
    assert sorted(image_cp) == sorted(setup_cp) and ("node_modules/echarts/dist/echarts.min.js",
                                                      "echarts.min.js") in image_cp
    assert f'VENDOR="$REPO/{VENDOR}"' in setup
    build = _stages()["build"]
    assert ("COPY", f"--from=ui /vendor/ {VENDOR}/") in build
    # copied in before the install, so the wheel's package data carries it
    ops = [(op, arg) for op, arg in build]
    vendored = ops.index(("COPY", f"--from=ui /vendor/ {VENDOR}/"))
    install = next(i for i, (op, arg) in enumerate(ops) if op == "RUN" and "pip install" in arg)
    assert vendored < install and "check_chart_bundle()" in ops[install][1]
    # the path the web server serves and the start-up check reads is that one
    assert CHART_BUNDLE == ROOT / VENDOR / "echarts.min.js" == STATIC / ASSETS["/static/vendor/echarts.min.js"][0]
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "ui/static/vendor/*" in data["package-data"]["flowscope.collector"]
    # a checkout's stale copy never reaches the image
    assert {"node_modules", VENDOR} <= set((ROOT / ".dockerignore").read_text().split())


def test_the_build_stage_copies_every_component_and_the_build_hook():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {arg.split()[0].rstrip("/") for op, arg in _stages()["build"] if op == "COPY" and "--from" not in arg}
    copied |= {w for op, arg in _stages()["build"] if op == "COPY" for w in arg.split()[:-1]}
    assert set(data["package-dir"].values()) <= copied
    assert {"pyproject.toml", "setup.py", "README.md"} <= copied


def test_the_ui_stage_command_yields_the_bundle_setup_sh_vendored(tmp_path):
    """The ui stage's RUN line itself, with npm against the lock file; offline, so it reads
    the cache setup.sh's npm ci filled (nothing is fetched by the tests)."""
    npm = shutil.which("npm")
    assert npm, "npm is missing: scripts/setup.sh installs nodejs/npm to vendor ECharts"
    assert CHART_BUNDLE.is_file(), "run scripts/setup.sh first: it vendors ECharts"
    for name in ("package.json", "package-lock.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    run = next(arg for op, arg in _stages()["ui"] if op == "RUN" and "npm ci" in arg)
    command = run.replace("npm ci", "npm ci --offline", 1).replace("/vendor", str(tmp_path / "vendor"))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "vendor/echarts.min.js").read_bytes() == CHART_BUNDLE.read_bytes()
    assert (tmp_path / "vendor/echarts.LICENSE").read_bytes() == (CHART_BUNDLE.parent / "echarts.LICENSE").read_bytes()


def test_the_dashboards_refuse_to_start_without_the_chart_library(tmp_path):
    missing = tmp_path / "vendor" / "echarts.min.js"
    with pytest.raises(ValueError, match=r"--ui: the dashboards' chart library is missing .*scripts/setup.sh"):
        check_chart_bundle(missing)
    missing.parent.mkdir()
    missing.write_bytes(b"")  # an interrupted copy counts as missing
    with pytest.raises(ValueError, match="chart library is missing"):
        check_chart_bundle(missing)
    check_chart_bundle()  # the vendored one (setup.sh) passes
    p = argparse.ArgumentParser()
    add_ui_options(p)
    assert ui_from_args(p.parse_args([])) is None  # no dashboards asked for: no bundle needed


def test_the_collector_command_refuses_at_start_up_without_the_bundle(tmp_path):
    """`flowscope collector --ui` (the command the operator's collector Deployment runs) in a
    process whose installed package lacks the bundle: exit 2 and one line naming the fix,
    before it opens the store or listens. The package's copy is hidden by running from a
    copy of the ui package with no vendor folder, put first on the module path."""
    import flowscope.collector.ui as ui_pkg

    with socket.socket() as a, socket.socket() as b:  # free ports, in case it did not refuse
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ipfix, web = a.getsockname()[1], b.getsockname()[1]
    fake = tmp_path / "site" / "flowscope" / "collector" / "ui"
    shutil.copytree(Path(ui_pkg.__file__).parent, fake, ignore=shutil.ignore_patterns("vendor", "__pycache__"))
    probe = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('flowscope.collector.ui.options', {str(fake / 'options.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)\n"
        "from flowscope.cli import main\n"
        f"sys.exit(main(['collector', '--listen', '127.0.0.1:{ipfix}:tcp', '--store', 'chdb://{tmp_path}/store', "
        f"'--ui', '127.0.0.1:{web}']))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "the dashboards' chart library is missing" in done.stderr and "scripts/setup.sh" in done.stderr
    assert str(fake / "static" / "vendor" / "echarts.min.js") in done.stderr
    assert not (tmp_path / "store").exists()  # refused before opening the store
