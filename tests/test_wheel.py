"""The wheel alone: built, installed into a fresh venv outside the repository, and run from a folder of its own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml
from PIL import Image

from lightning_nst import __version__
from lightning_nst.core.images import SHIPPED_SAMPLES
from tests.conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "lightning_nst", "configs")
# What a `pip install .` does not bring: the test dependencies and the samples extra. The venv sees every other
# package of this environment through a folder of links that leaves these (and the repository's own install) out.
LEFT_OUT = re.compile(
    r"^(_?pytest|py\.py|pluggy|iniconfig|skimage|scikit_image|lightning_nst|__editable__|__pycache__)"
)


def run(command: list[str], cwd: Path, env: dict[str, str], status: int = 0) -> str:
    """The command's stdout, after checking it exited with ``status`` (its stderr, if not 0)."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == status, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout if status == 0 else done.stderr


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
    with zipfile.ZipFile(wheel) as archive:  # the samples every default needs, and every module of every subpackage
        for name in SHIPPED_SAMPLES:
            sample = f"lightning_nst/samples/{name}.jpg"
            assert archive.read(sample) == (REPO / sample).read_bytes(), sample
        modules = {path.relative_to(REPO).as_posix() for path in (REPO / "lightning_nst").rglob("*.py")}
        assert modules <= set(archive.namelist()), sorted(modules - set(archive.namelist()))
        assert (
            archive.read("lightning_nst/diffusion/tiny.py") == (REPO / "lightning_nst/diffusion/tiny.py").read_bytes()
        )


class Installed(NamedTuple):
    """The wheel in a fresh venv: its ``bin`` folder and the environment to run it in (no ``PYTHONPATH``)."""

    bin: Path
    env: dict[str, str]


def install_wheel(tmp_path: Path) -> Installed:
    """The wheel, built and installed into a venv outside the repository that lacks pytest and scikit-image."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    wheel = build_wheel(tmp_path, env)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip()
    )
    # The dependencies (torch & co., gigabytes) come from this environment's site-packages, after the venv's own,
    # through links to all but what LEFT_OUT names; a path in a .pth file does not run that folder's .pth files.
    dependencies = tmp_path / "dependencies"
    dependencies.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not LEFT_OUT.match(entry.name) and entry.suffix != ".pth":
            (dependencies / entry.name).symlink_to(entry)
    (purelib / "dependencies.pth").write_text(f"{dependencies}\n")
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    for missing in ("pytest", "skimage"):
        run([str(python), "-c", f"import {missing}"], tmp_path, env, status=1)
    return Installed(venv / "bin", env)


@pytest.mark.slow  # 30-40 s on 2 busy cores: building, a venv, and two processes that import torch
def test_the_wheel_carries_the_configs_and_stylizes_outside_the_repository(tmp_path: Path) -> None:
    installed, env = install_wheel(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 80, 3)) * 255).astype(np.uint8)).save(work / "a.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(work / "b.png")
    command = installed / "lightning-nst"
    listed = run([str(command), "configs"], work, env).splitlines()
    assert str(installed.parent) in listed[0]  # the wheel's package, not the repository's
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


@pytest.mark.slow  # about a minute on 2 busy cores: the wheel, a report of 10 runs, a pipeline and a generation
def test_the_readmes_first_hour_runs_from_the_wheel_alone(tmp_path: Path) -> None:
    """From ``pip install .`` in an empty folder, offline, without pytest or scikit-image: the README's commands."""
    installed, env = install_wheel(tmp_path)
    command = str(installed / "lightning-nst")
    work = tmp_path / "work"
    work.mkdir()
    report = [command, "report", "gram_vs_meanvar", "--vgg.weights", "random", "--allow_random_weights", "true"]
    toy = ["--size", "32", "--steps", "2", "--seeds", "[0]", "--timing_repeats", "2", "--progress_bar", "false"]

    # A checkout's path to the config: one line naming the shipped one, and nothing written.
    error = run([*report, "-c", "configs/report_cpu.yaml", *toy], work, env, status=2).strip().splitlines()[-1]
    assert error.endswith("--config: file not found: configs/report_cpu.yaml; did you mean -c report_cpu, the "
                          "shipped config of that name?")  # fmt: skip
    assert not any(work.iterdir())
    # The shipped name, at the report's default images (gram_vs_meanvar's five textures): the shipped samples.
    run([*report, "-c", "report_cpu", *toy], work, env)
    folder = work / "reports" / "gram_vs_meanvar"
    recorded = yaml.safe_load((folder / "report.yaml").read_text())
    assert recorded["textures"] == [
        f"sample:{name}" for name in ("gravel", "brick", "grass", "immunohistochemistry", "coffee")
    ]
    assert len(list((folder / "configs").glob("*.yaml"))) == 10 and (folder / "report.md").is_file()

    # The tiny pipeline the README offers for trying `generate` offline, built without pytest, then used.
    printed = run([str(installed / "python"), "-m", "lightning_nst.diffusion.tiny", "tiny-sd"], work, env)
    assert printed.strip().splitlines()[-1] == "tiny-sd"
    assert json.loads((work / "tiny-sd" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    generate = [command, "generate", "a red house", "--style", "sample:gravel", "--model", "tiny-sd", "--size", "64"]
    run([*generate, "--steps", "2", "--weights", "random", "-o", "out"], work, env)
    (image,) = (work / "out").glob("*.png")
    with Image.open(image) as opened:
        assert opened.size == (64, 64)


@pytest.mark.parametrize("package", ["lightning", "diffusers"])
def test_the_fast_moving_dependencies_have_an_upper_bound_that_the_tested_version_meets(package: str) -> None:
    """Lightning's and diffusers' internals this package leans on change between minor releases: pin what was tested."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S)
    assert dependencies is not None
    requirements = [Requirement(line) for line in re.findall(r'^\s*"([^"]+)"', dependencies.group(1), re.M)]
    (requirement,) = [r for r in requirements if r.name == package]
    assert any(spec.operator in ("<", "<=") for spec in requirement.specifier), f"{requirement} has no upper bound"
    assert requirement.specifier.contains(version(package)), (
        f"installed {package} {version(package)} is not {requirement}"
    )
