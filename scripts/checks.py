"""Static checks that need to see flowscope the way an installed wheel lays it out.

Why this exists: the repository keeps each component in its own top-level folder and
pyproject.toml maps the folders onto one namespace (``ipfix/`` -> ``flowscope.ipfix``).
An editable install resolves that mapping with an import hook, and ``flowscope``'s
``__init__`` extends its ``__path__`` at run time. Static tools see neither: grimp
(under import-linter) and mypy look for ``flowscope/ipfix/`` on disk, do not find it,
and report that ``flowscope.ipfix`` does not exist.

So this script builds a *view*: a temporary directory laid out exactly like the wheel
(``flowscope/``, ``flowscope/ipfix/``, ... copied from the folders pyproject.toml maps),
runs the tool there, and rewrites the view's paths in the tool's output back to the
repository's paths, so that an error points at the file you edit.

In the view every mapped component folder is a regular package: ``operator/`` has no
``__init__.py`` in the repository (so that ``import operator`` from the repository root
keeps loading the standard library), and grimp ignores implicit namespace sub-packages,
which would make the "data plane never imports the operator" contract vacuous.

Usage::

    python scripts/checks.py imports   # import-linter contracts of pyproject.toml
    python scripts/checks.py types     # mypy --strict on flowscope.ipfix
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"


def package_dirs(pyproject: Path = PYPROJECT) -> dict[str, Path]:
    """The ``package-dir`` mapping of pyproject.toml: dotted package -> repository folder."""
    with pyproject.open("rb") as fh:
        config = tomllib.load(fh)
    try:
        mapping = config["tool"]["setuptools"]["package-dir"]
    except KeyError:
        raise SystemExit(f"{pyproject}: [tool.setuptools] package-dir is missing") from None
    return {package: pyproject.parent / folder for package, folder in mapping.items()}


def build_view(dest: Path, pyproject: Path = PYPROJECT) -> dict[Path, Path]:
    """Lay the mapped folders out under ``dest`` as the wheel would.

    Returns the view-folder -> repository-folder map, for rewriting paths in output.
    """
    mapping = package_dirs(pyproject)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    placed: dict[Path, Path] = {}
    # Parents before children: flowscope/ is copied before flowscope/ipfix/ lands in it.
    for package in sorted(mapping, key=lambda name: name.count(".")):
        source = mapping[package]
        target = dest.joinpath(*package.split("."))
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
        init = target / "__init__.py"
        if not init.exists():
            init.write_text("")
        placed[target] = source
    return placed


def _rewrite(text: str, placed: dict[Path, Path], view: Path) -> str:
    """Point paths in a tool's output at the repository instead of the view."""
    # Longest view paths first, so flowscope/ipfix/ wins over flowscope/.
    for view_dir in sorted(placed, key=lambda p: len(str(p)), reverse=True):
        repo_dir = placed[view_dir]
        try:
            shown = str(repo_dir.relative_to(Path.cwd()))
        except ValueError:
            shown = str(repo_dir)
        text = text.replace(str(view_dir) + os.sep, shown + os.sep)
        # Tools that run in the view print paths relative to it at the start of a line.
        relative = re.escape(str(view_dir.relative_to(view)) + os.sep)
        text = re.sub(rf"^{relative}", lambda _m, s=shown: s + os.sep, text, flags=re.M)
    return text


# import-linter opens with a logo drawn in box-drawing characters; the report follows.
_LOGO_LINE = re.compile(r"^.*[\u2500-\u257f\u25b2\u25b6\u25c0].*\n", re.M)


def _tool(name: str) -> str:
    """The console script installed beside this interpreter (the venv's), else PATH's."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed: run scripts/setup.sh")
    return found


def run_in_view(
    argv: list[str], view: Path, placed: dict[Path, Path], quiet_banner: bool = False
) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(view) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(argv, cwd=view, env=env, capture_output=True, text=True)
    out = _rewrite(proc.stdout, placed, view)
    if quiet_banner:
        out = _LOGO_LINE.sub("", out).lstrip("\n")
    sys.stdout.write(out)
    sys.stderr.write(_rewrite(proc.stderr, placed, view))
    return proc.returncode


def lint_imports(view: Path, placed: dict[Path, Path], extra: list[str]) -> int:
    argv = [_tool("lint-imports"), "--no-cache", str(PYPROJECT), *extra]
    return run_in_view(argv, view, placed, quiet_banner=True)


def mypy_strict(view: Path, placed: dict[Path, Path], extra: list[str]) -> int:
    argv = [
        _tool("mypy"),
        "--config-file", str(PYPROJECT),
        "--strict",
        "--cache-dir", str(view / ".mypy_cache"),
        "-p", "flowscope.ipfix",
        *extra,
    ]
    return run_in_view(argv, view, placed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("imports", "types"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="passed to the tool")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flowscope-view-") as tmp:
        view = Path(tmp)
        placed = build_view(view)
        if args.check == "imports":
            return lint_imports(view, placed, args.extra)
        return mypy_strict(view, placed, args.extra)


if __name__ == "__main__":
    sys.exit(main())
