"""lightning_nst.stylize and lightning_nst.texture: a PIL image of the requested size, and no file written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lightning_nst
from lightning_nst.main import main
from tests.conftest import REPO, cli_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stylize_returns_the_image_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((rng.random((30, 60, 3)) * 255).astype(np.uint8)).save(inputs / "photo.png")
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(inputs / "painting.png")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    image = lightning_nst.stylize(
        inputs / "photo.png", str(inputs / "painting.png"), size=48, steps=3, weights="random"
    )
    assert isinstance(image, Image.Image) and image.size == (48, 24) and image.mode == "RGB"
    again = lightning_nst.stylize(inputs / "photo.png", [inputs / "painting.png"], size=48, steps=3, weights="random")
    assert np.array_equal(np.asarray(image), np.asarray(again))  # a notebook cell runs again, and alike
    main(["stylize", str(inputs / "photo.png"), str(inputs / "painting.png"), "-o", "../cli.png", "--size", "48",
          "--steps", "3", "--weights", "random", "--logs", "../logs"])  # fmt: skip
    with Image.open(tmp_path / "cli.png") as cli:
        assert np.array_equal(np.asarray(cli), np.asarray(image))  # the settings of `lightning-nst stylize`
    texture = lightning_nst.texture(inputs / "painting.png", size=32, steps=2, weights="random", statistic="meanvar")
    assert texture.size == (32, 32)
    assert list(work.iterdir()) == []
    assert sorted(path.name for path in inputs.iterdir()) == ["painting.png", "photo.png"]


def test_bad_statistic_is_named() -> None:
    with pytest.raises(
        lightning_nst.NSTError, match=r"--statistic: must be one of gram, meanvar, w2, sliced_w \(got grm\)"
    ):
        lightning_nst.texture("skimage:brick", statistic="grm")


def test_the_readme_python_snippet_runs_as_written_offline(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'weights="random"' in snippet  # the offline choice, named in the snippet itself
    exec(compile(snippet, "README.md", "exec"), {})  # runs in tmp_path (conftest's working folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.png"]  # the file the snippet saves, no other
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (128, 128)


QUIET = """
import logging
import warnings

import lightning_nst
from lightning.pytorch.utilities import rank_zero_info
from lightning_nst.nst.data import ImageTargets

setup = ImageTargets.setup


def warning_setup(self, stage):
    warnings.warn("a warning of its own, during the call", UserWarning)
    return setup(self, stage)


ImageTargets.setup = warning_setup
lightning_nst.stylize("sample:astronaut", "sample:gravel", size=32, steps=2, weights="random")
lightning_nst.texture("sample:gravel", size=32, steps=2, weights="random")
# After the calls the caller's own code gets every message again
warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, the caller's own", FutureWarning)
rank_zero_info("TPU available: False, using: 0 TPU cores")
"""


def test_the_api_prints_none_of_the_noise_the_cli_drops_and_every_other_warning(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", QUIET], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    noise = ("💡", "LeafSpec", "TPU available", "eval mode", "Seed set")
    during = lines[: next(i for i, line in enumerate(lines) if "the caller's own" in line)]
    assert [line for line in during if any(word in line for word in noise)] == [], "\n".join(during)
    assert any("a warning of its own, during the call" in line for line in during), "\n".join(during)
    after = lines[len(during) :]
    assert any("LeafSpec" in line for line in after) and any("TPU available" in line for line in after), after
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_the_one_line_of_the_cli(capfd: pytest.CaptureFixture[str]) -> None:
    """Checked before the run, as ``fit`` checks its config: no Lightning or torch error instead."""
    cases = [
        ({"size": 200000}, ["--size", "200000"]),  # activations beyond any machine's memory
        ({"accelerator": "nonsense"}, None),
    ]
    for kwargs, flags in cases:
        with pytest.raises(lightning_nst.NSTError) as raised:
            lightning_nst.texture("sample:gravel", steps=1, weights="random", **kwargs)
        if flags is None:  # the shortcut has no flag for it: fit's
            args = [
                "fit",
                "-c",
                "texture_gram",
                "--trainer.accelerator=nonsense",
                "--model.init_args.vgg.weights=random",
            ]
        else:
            args = ["texture", "sample:gravel", "-o", "out.png", "--steps", "1", "--weights", "random", *flags]
        assert cli_error(capfd, args) == f"lightning-nst: error: {raised.value}"
