"""Packaging and structure: what a non-editable install ships, and the rules the layout keeps."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_list_names_every_package_on_disk() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = set(find_packages(str(ROOT), include=["harness*", "strategies*"]))
    # harness.conf is conf/ at the top of the repository, mapped into the wheel.
    assert listed == on_disk | {"harness.conf"}


def test_a_non_editable_install_finds_its_configs(tmp_path: Path) -> None:
    # From a copy of the sources: setuptools builds in the source tree and would leave build/ in the checkout.
    source = tmp_path / "src"
    for name in ("conf", "harness", "strategies"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*pip, str(target), str(source)], check=True, capture_output=True, text=True, timeout=300)
    assert (target / "harness" / "conf" / "config.yaml").is_file()
    assert (target / "harness" / "data" / "corpus.txt").is_file()
    # From elsewhere, with only the installed copy importable: conf/ must come from the install.
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-m", "harness", "--cfg", "job", "compression=4bit"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "name: 4bit" in done.stdout


def test_strategies_import_nothing_from_harness() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+harness\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "strategies").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_no_module_is_past_400_lines() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for package in ("harness", "strategies")
        for p in (ROOT / package).rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > 400} == {}


def test_composing_a_config_imports_no_heavy_library() -> None:
    """`--help` and `--cfg job` answer in about a second because nothing heavy loads before a job runs."""
    code = (
        "import sys, harness.compose, harness.sweep; harness.compose.register_configs(); "
        "heavy = ('torch', 'transformers', 'bitsandbytes', 'mlflow', 'matplotlib'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
