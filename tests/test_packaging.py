"""Packaging: the root folders install only as cellinspect.<folder>, from a wheel and editable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COPY_IGNORE = (
    ".venv",
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "cellinspect-home",
    ".*_cache",
)
PACKAGES = ("datasets", "models", "training", "serving")

PROBE = """
import importlib.util, json, sys
import cellinspect.datasets.preprocess, cellinspect.models.card, cellinspect.cli
bare = {n: (importlib.util.find_spec(n).origin if importlib.util.find_spec(n) else None)
        for n in ("datasets", "models", "training", "serving")}
print(json.dumps({"datasets": cellinspect.datasets.__file__, "bare": bare}))
"""


def _probe(env: dict[str, str], cwd: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    import json

    return json.loads(out.stdout)


def _assert_no_bare_names(result: dict) -> None:
    for name, origin in result["bare"].items():
        assert origin is None or not origin.startswith(str(ROOT)), (
            f"bare {name} importable: {origin}"
        )


def test_editable_install_maps_folders_under_cellinspect(tmp_path) -> None:
    result = _probe(dict(os.environ), cwd=tmp_path)
    assert Path(result["datasets"]).parent == ROOT / "datasets"
    _assert_no_bare_names(result)


@pytest.mark.timeout(300)
def test_built_wheel_installs_and_imports(tmp_path) -> None:
    dist = tmp_path / "dist"
    # Build from a copy: setuptools keeps a build/ folder in the source tree, and stale files
    # there (from modules since deleted) would end up in the wheel.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("cellinspect-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in PACKAGES:
        assert f"cellinspect/{package}/__init__.py" in names
        assert not any(n.startswith(f"{package}/") for n in names), f"bare {package}/ in wheel"
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = _probe(env, cwd=tmp_path)
    assert Path(result["datasets"]).is_relative_to(target), result["datasets"]
    _assert_no_bare_names(result)


def test_every_code_folder_is_a_listed_package() -> None:
    # A subpackage missing from `packages` works in the editable checkout and is absent
    # from the wheel and the Docker image (serving/routers once was).
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found - listed == set(), f"folders with __init__.py not packaged: {found - listed}"
