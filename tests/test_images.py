from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_nst.errors import NSTError
from lightning_nst.images import labelled_grid, load_image, read_image, save_image, write_atomic


@pytest.mark.parametrize(
    ("mode", "array"),
    [
        ("L", np.full((6, 4), 128, np.uint8)),
        ("RGBA", np.dstack([np.full((6, 4, 3), 128, np.uint8), np.full((6, 4), 255, np.uint8)])),
        ("I;16", np.full((6, 4), 32896, np.uint16)),
    ],
)
def test_modes_convert_to_rgb(tmp_path: Path, mode: str, array: np.ndarray) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(array, mode=mode if mode != "I;16" else None).save(path)
    image = read_image(path)
    assert image.shape == (1, 3, 6, 4) and image.dtype == torch.float32
    torch.testing.assert_close(image, torch.full_like(image, 128 / 255), atol=1 / 255, rtol=0)


def test_palette_and_cmyk(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (5, 5), (255, 0, 0))
    rgb.convert("P").save(tmp_path / "p.png")
    rgb.convert("CMYK").save(tmp_path / "c.jpg")
    for name in ("p.png", "c.jpg"):
        image = read_image(tmp_path / name)
        assert image.shape == (1, 3, 5, 5)
        assert image[0, 0].mean() > 0.9 and image[0, 1:].mean() < 0.1, name


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    Image.new("RGBA", (3, 3), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert read_image(tmp_path / "clear.png").min() == 1.0


def test_load_resizes_long_edge() -> None:
    image = load_image("skimage:coffee", 60)  # 400 x 600
    assert image.shape == (1, 3, 40, 60) and 0 <= image.min() and image.max() <= 1


def test_errors_name_key_and_file(tmp_path: Path) -> None:
    with pytest.raises(NSTError, match=r"^data\.content: image file not found: .*nope\.png$"):
        read_image(tmp_path / "nope.png", key="data.content")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(NSTError, match=r"data\.style\[0\]: not an image file PIL can read: .*text\.png"):
        read_image(tmp_path / "text.png", key="data.style[0]")
    with pytest.raises(NSTError, match="unknown sample 'skimage:nope'"):
        read_image("skimage:nope")


def test_truncated_file(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(NSTError, match=r"cannot decode image .*cut\.png"):
        read_image(tmp_path / "cut.png")


def test_save_is_atomic_and_never_overwrites(tmp_path: Path) -> None:
    path = save_image(torch.rand(1, 3, 8, 8), tmp_path / "out" / "a.png")
    assert Image.open(path).size == (8, 8)
    with pytest.raises(NSTError, match="refusing to overwrite"):
        save_image(torch.rand(3, 8, 8), path)
    save_image(torch.zeros(3, 8, 8), path, overwrite=True)
    assert np.asarray(Image.open(path)).max() == 0
    write_atomic(tmp_path / "out" / "b.json", b"{}")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.json"]


def test_labelled_grid() -> None:
    grid = labelled_grid(torch.zeros(3, 3, 20, 30), ["a", "b", "c"], nrow=2)
    assert grid.size == (2 * 30 + 3 * 2, 2 * 20 + 3 * 2)
    assert np.asarray(grid).max() == 255  # labels and padding drawn
