"""The project installs as a package: the wheel holds both packages, every module of them, nothing else, and the
metadata (version, console scripts, dependencies) that pyproject.toml declares.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index`` with the running interpreter's
setuptools) from a copy of the checkout in tmp_path: setuptools writes ``build/`` and ``*.egg-info`` beside the
sources it builds, and the repository must stay as it is. The copy holds what a commit would: the tracked files
and the untracked ones git does not ignore. ``benchmarks/check_install.py`` goes further (a fresh venv, the
dependencies from the registry, the console scripts run): it takes minutes, so it is run by hand.
"""

from __future__ import annotations

import configparser
import email.parser
import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rankscope

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rankscope", "beamlora")
SUBPACKAGES = ("io", "maths", "tasks", "adapters", "telemetry", "views")
SCRIPTS = {"rankscope": "rankscope.cli:main", "beamlora": "beamlora.cli:main"}
# What a checkout holds besides the packages, none of which may ship.
NOT_SHIPPED = ("tests/", "benchmarks/", "notebooks/", "docs/", "runs/", "build/")
# Without git (a source archive): everything but these, which are build outputs, caches and environments.
_IGNORED_WITHOUT_GIT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", ".cache", "runs",
                                              "demo_runs", "__pycache__", "*.pyc", ".pytest_cache")


def _checkout_files() -> list[str] | None:
    """The checkout's files as git sees them (tracked, and untracked but not ignored), or None without git."""
    try:
        done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [name for name in done.stdout.decode().split("\0") if name]


def _copy_checkout(target: Path) -> None:
    files = _checkout_files()
    if files is None:
        shutil.copytree(REPO, target, ignore=_IGNORED_WITHOUT_GIT, symlinks=True)
        return
    for name in files:
        source = REPO / name
        if not source.is_file():  # tracked but deleted in the work tree, or a submodule
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel-build")
    before = set(os.listdir(REPO))
    source, out = root / "src", root / "dist"
    _copy_checkout(source)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    # Offline: no build isolation (the running venv's setuptools, checked against build-system.requires), no index.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "--check-build-dependencies", "--no-index", "--no-cache-dir", "-q", "-w", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {wheels}"
    # setuptools writes build/ and *.egg-info beside the sources it builds: here the copy's, never the checkout's.
    new = set(os.listdir(REPO)) - before
    assert not {n for n in new if n in ("build", "dist") or n.endswith(".egg-info")}, f"the build wrote {sorted(new)}"
    return wheels[0]


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def _dist_info(wheel: Path, names: set[str], file: str) -> str:
    info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert len(info) == 1, f"expected one .dist-info folder in {wheel.name}, found {sorted(info)}"
    with zipfile.ZipFile(wheel) as z:
        return z.read(f"{info.pop()}/{file}").decode()


def _metadata(wheel: Path, names: set[str]):
    return email.parser.Parser().parsestr(_dist_info(wheel, names, "METADATA"))


def test_wheel_holds_both_packages(names):
    expected = {"rankscope/__init__.py", "rankscope/io/atomic.py", "beamlora/__init__.py", "beamlora/train.py",
                *(f"rankscope/{sub}/__init__.py" for sub in SUBPACKAGES)}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert any(re.fullmatch(r"rankscope/maths/\w+\.py", n) and not n.endswith("__init__.py") for n in names)


def test_wheel_holds_every_module_of_the_source_tree(names):
    # A new subpackage that setuptools' package discovery misses (e.g. no __init__.py) fails here.
    source = {p.relative_to(REPO).as_posix() for package in PACKAGES for p in (REPO / package).rglob("*.py")
              if "__pycache__" not in p.parts}
    assert len(source) > 20, f"the source tree looks empty: {sorted(source)}"
    missing = source - names
    assert not missing, f"modules in the source tree but not in the wheel: {sorted(missing)}"
    shipped = {n for n in names if n.endswith(".py")}
    extra = shipped - source
    assert not extra, f"modules in the wheel but not in the source tree: {sorted(extra)}"


def test_wheel_holds_the_packages_data_files(names):
    # Files other than modules (templates, data) ship only when pyproject.toml says so (package-data).
    files = _checkout_files()
    if files is None:
        pytest.skip("no git checkout to list the packages' files")
    data = {n for n in files if n.startswith(tuple(f"{p}/" for p in PACKAGES)) and not n.endswith((".py", ".pyc"))}
    assert not data - names, f"package files not in the wheel: {sorted(data - names)}"


def test_wheel_holds_nothing_else(wheel, names):
    stray = sorted(n for n in names if n.startswith(NOT_SHIPPED) or "__pycache__" in n or n.endswith(".pyc"))
    assert not stray, f"files that must not ship: {stray}"
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == set(PACKAGES), f"top-level entries of {wheel.name}: {sorted(tops)}"


def test_metadata_names_the_version(wheel, names):
    meta = _metadata(wheel, names)
    assert meta["Name"] == "rankscope"
    assert meta["Version"] == rankscope.__version__
    assert wheel.name.startswith(f"rankscope-{rankscope.__version__}-")


def test_console_scripts(wheel, names):
    entry_points = configparser.ConfigParser()
    entry_points.optionxform = str  # keep the scripts' names as written
    entry_points.read_string(_dist_info(wheel, names, "entry_points.txt"))
    assert dict(entry_points["console_scripts"]) == SCRIPTS
    for target in SCRIPTS.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_metadata_declares_the_dependencies_of_pyproject(wheel, names):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    meta = _metadata(wheel, names)
    requires = meta.get_all("Requires-Dist") or []
    plain = {r.replace(" ", "") for r in requires if ";" not in r}
    assert plain == {d.replace(" ", "") for d in project["dependencies"]}
    # The dev extra stays an extra: its tools come only with `pip install rankscope[dev]`.
    declared = project.get("optional-dependencies", {})
    assert set(meta.get_all("Provides-Extra") or []) == set(declared)
    extras = [r for r in requires if ";" in r]
    assert len(extras) == sum(len(v) for v in declared.values())
    assert all(re.search(r"""extra\s*==""", r) for r in extras), extras
    assert meta["Requires-Python"] == project["requires-python"]
