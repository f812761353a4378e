"""An installed vlsi (a built wheel, not this source tree) carries its bundled model configs and recipes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_installed_wheel_plans_a_bundled_recipe_from_anywhere(tmp_path):
    # Built from a copy holding only what a build reads, so nothing outside the package can leak in and the
    # build leaves no files in the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    # No build isolation: setuptools comes from the running environment, so no index is needed.
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("vlsi-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True
    )
    shutil.rmtree(source)  # the installed copy must stand alone
    # A config assembled from named sources carries the note that names them.
    assert (site / "vlsi/configs/models/Qwen--Qwen2.5-VL-72B-Instruct/SOURCE.md").is_file()

    # torch, transformers ... come from the running environment; vlsi only from the installed folder.
    env = {**os.environ, "PYTHONPATH": str(site)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import vlsi; print(vlsi.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site)
    plan = subprocess.run(
        [sys.executable, "-m", "vlsi.run.cli", "plan", "qwen2vl-72b-to-2b", "--gpus", "8"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "(bundled configs/recipes/qwen2vl-72b-to-2b.yaml)" in plan.stdout
    assert "config: bundled configs/models/Qwen--Qwen2-VL-72B-Instruct" in plan.stdout
    assert "config: bundled configs/models/Qwen--Qwen2-VL-2B-Instruct" in plan.stdout
