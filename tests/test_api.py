"""lightning_nst.stylize and lightning_nst.texture: a PIL image of the requested size, and no file written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lightning_nst
from lightning_nst.main import main

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
