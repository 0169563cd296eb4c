"""The wheel alone: built, installed into a fresh venv outside the repository, and run from a folder of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_nst import __version__
from tests.conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "lightning_nst", "configs")


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """The wheel of a copy of the sources (so the build leaves no build/ or egg-info in the repository)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    pytest.importorskip("setuptools", reason="building the wheel offline (--no-build-isolation) needs setuptools")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob(f"lightning_nst-{__version__}-*.whl")  # --version says what pip installs
    return wheel


def test_the_wheel_holds_the_shipped_configs(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, dict(os.environ))
    with zipfile.ZipFile(wheel) as archive:
        configs = {name for name in archive.namelist() if name.startswith("lightning_nst/configs/")}
        assert (
            archive.read("lightning_nst/configs/style_transfer_gram.yaml")
            == (REPO / "configs" / "style_transfer_gram.yaml").read_bytes()
        )
    assert configs == {f"lightning_nst/configs/{path.name}" for path in (REPO / "configs").glob("*.yaml")}


@pytest.mark.slow  # 30-40 s on 2 busy cores: building, a venv, and two processes that import torch
def test_the_wheel_carries_the_configs_and_stylizes_outside_the_repository(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    wheel = build_wheel(tmp_path, env)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip()
    )
    # The dependencies (torch & co., gigabytes) come from this environment's site-packages, after the venv's own;
    # a path in a .pth file does not run that folder's .pth files, so the editable install of the repository stays out.
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp_path, env)

    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 80, 3)) * 255).astype(np.uint8)).save(work / "a.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(work / "b.png")
    command = venv / "bin" / "lightning-nst"
    listed = run([str(command), "configs"], work, env).splitlines()
    assert str(venv) in listed[0]  # the wheel's package, not the repository's
    assert {line.split()[0] for line in listed[1:]} == {path.stem for path in (REPO / "configs").glob("*.yaml")}

    run(
        [
            str(command),
            "stylize",
            "a.png",
            "b.png",
            "-o",
            "out.png",
            "--size",
            "64",
            "--steps",
            "3",
            "--weights",
            "random",
        ],
        work,
        env,
    )  # noqa: E501
    with Image.open(work / "out.png") as image:
        assert image.format == "PNG" and image.size == (64, 38)
