from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import numpy_to_pil
from PIL import Image, ImageDraw

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import write_atomic
from lightning_nst.core.images import (
    SAMPLES_DIR,
    SHIPPED_SAMPLES,
    check_source,
    labelled_grid,
    load_image,
    read_image,
    save_image,
    source_size,
    to_pil,
    to_uint8,
)


@pytest.mark.parametrize(
    ("mode", "array"),
    [
        ("L", np.full((12, 8), 128, np.uint8)),
        ("RGBA", np.dstack([np.full((12, 8, 3), 128, np.uint8), np.full((12, 8), 255, np.uint8)])),
        ("I;16", np.full((12, 8), 32896, np.uint16)),
    ],
)
def test_modes_convert_to_rgb(tmp_path: Path, mode: str, array: np.ndarray) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(array, mode=mode if mode != "I;16" else None).save(path)
    image = read_image(path)
    assert image.shape == (1, 3, 12, 8) and image.dtype == torch.float32
    torch.testing.assert_close(image, torch.full_like(image, 128 / 255), atol=1 / 255, rtol=0)


def test_palette_and_cmyk(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (9, 9), (255, 0, 0))
    rgb.convert("P").save(tmp_path / "p.png")
    rgb.convert("CMYK").save(tmp_path / "c.jpg")
    for name in ("p.png", "c.jpg"):
        image = read_image(tmp_path / name)
        assert image.shape == (1, 3, 9, 9)
        assert image[0, 0].mean() > 0.9 and image[0, 1:].mean() < 0.1, name


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
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
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    with pytest.raises(NSTError, match="refusing to overwrite"):
        save_image(torch.rand(3, 8, 8), path)
    save_image(torch.zeros(3, 8, 8), path, overwrite=True)
    assert np.asarray(Image.open(path)).max() == 0
    write_atomic(tmp_path / "out" / "b.json", b"{}")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.json"]


def test_saved_images_round_to_the_nearest_level(tmp_path: Path) -> None:
    # Each level k, just below k + 0.5 and just above it: truncation would give k, k, k; rounding gives k, k, k + 1.
    levels = torch.arange(0, 255, dtype=torch.float64)
    values = torch.stack([levels, levels + 0.4, levels + 0.6]).flatten() / 255
    image = values.float().view(1, 1, -1).expand(3, 1, -1)
    expected = (values * 255).round().to(torch.uint8).numpy()
    assert (np.asarray(to_pil(image))[0, :, 0] == expected).all()
    save_image(image, tmp_path / "levels.png")
    assert (np.asarray(Image.open(tmp_path / "levels.png"))[0, :, 1] == expected).all()
    # The same levels as diffusers' numpy_to_pil, on random values
    noise = torch.rand(3, 16, 16)
    assert (np.asarray(to_pil(noise)) == np.asarray(numpy_to_pil(noise.permute(1, 2, 0).numpy()[None])[0])).all()
    assert torch.equal(to_uint8(noise), torch.from_numpy(np.asarray(to_pil(noise))).permute(2, 0, 1))


def test_labelled_grid_puts_each_image_and_its_label_in_its_tile() -> None:
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels = ["x", "conv1_1", "pool5 avg"]
    grid = labelled_grid(colours.view(3, 3, 1, 1).expand(3, 3, 40, 60), labels, nrow=2)
    assert grid.size == (2 * 60 + 3 * 2, 2 * 40 + 3 * 2)
    font = ImageDraw.Draw(grid).getfont()
    pixels = np.asarray(grid).astype(int)
    for index, (colour, label) in enumerate(zip(colours, labels, strict=True)):
        x, y = 2 + (index % 2) * 62, 2 + (index // 2) * 42  # top-left corner of the tile after 2 px padding
        tile = pixels[y : y + 40, x : x + 60]
        assert (tile[30, 30] == colour.numpy() * 255).all()  # the image itself, at its place in the grid
        # The label: a black box in the tile's top-left corner as wide as this label's text, white text inside it.
        black, white = (tile == 0).all(axis=2), (tile > 200).all(axis=2)
        rows, columns = np.flatnonzero(black.any(axis=1)), np.flatnonzero(black.any(axis=0))
        assert rows[0] <= 8 and columns[0] <= 4 and rows[-1] < 20, label
        assert abs(columns[-1] + 1 - columns[0] - font.getlength(label)) <= 3, label
        text_rows, text_columns = np.flatnonzero(white.any(axis=1)), np.flatnonzero(white.any(axis=0))
        assert text_rows.size and rows[0] <= text_rows[0] and text_rows[-1] <= rows[-1], label
        assert columns[0] <= text_columns[0] and text_columns[-1] <= columns[-1], label
    assert (pixels[44:, 64:] == 255).all()  # the fourth place of the 2x2 grid is left blank


def test_tiny_image_is_refused(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(NSTError, match=r"data\.content: .*dot\.png is 1x1 px; images need at least 8 px per side"):
        read_image(tmp_path / "dot.png", key="data.content")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size but holds no pixel data, like a decompression bomb's first bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_20000_px_images(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    with pytest.raises(NSTError, match=r"data\.style\[0\]: .*bomb\.png is too large to decode safely.*downscale"):
        load_image(tmp_path / "bomb.png", 256, key="data.style[0]")
    Image.new("RGB", (20000, 1000), (0, 128, 255)).save(tmp_path / "wide.jpg", quality=90)
    image = load_image(tmp_path / "wide.jpg", 256)
    assert image.shape == (1, 3, 13, 256)
    torch.testing.assert_close(image[0, :, 6, 128], torch.tensor([0.0, 128 / 255, 1.0]), atol=0.03, rtol=0)


@pytest.fixture
def no_skimage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import skimage`` fail, as on an install without the ``samples`` extra."""
    for name in [name for name in sys.modules if name == "skimage" or name.startswith("skimage.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError):
        import skimage.data  # noqa: F401


def test_shipped_samples_load_without_scikit_image(no_skimage: None) -> None:
    for name in SHIPPED_SAMPLES:
        image = read_image(f"sample:{name}", key="data.style[0]")
        assert max(image.shape[-2:]) == 256 and image.std() > 0.05, name
        check_source(f"sample:{name}", "data.style[0]")
        assert source_size(f"sample:{name}") == tuple(image.shape[:-3:-1])
    assert source_size("sample:coffee") == (256, 171)  # scikit-image's 600 x 400, its aspect kept
    with pytest.raises(NSTError, match="unknown sample 'sample:camera'; the shipped ones are sample:astronaut"):
        check_source("sample:camera", "data.content")


def test_report_defaults_are_shipped_samples(no_skimage: None) -> None:
    from lightning_nst.report.experiments import EXPERIMENTS, check_images
    from lightning_nst.report.settings import ReportSettings

    settings = ReportSettings()
    sources = [settings.content, settings.texture, *settings.textures, settings.style, settings.second_style]
    assert all(source.startswith("sample:") for source in [*sources, *settings.masks]), sources
    assert len(set(settings.textures)) == 5  # gram_vs_meanvar's claims are counted over several textures
    for experiment in EXPERIMENTS:
        check_images(experiment, settings)  # each experiment's images, as a report checks them before anything
    for source in sources:
        assert read_image(source, key="report").std() > 0.05, source


def test_skimage_names_stay_scikit_images_originals() -> None:
    pytest.importorskip("skimage", reason="scikit-image (the samples extra) is not installed")
    # The shipped 256 px copies never stand in for scikit-image's full-size image of the same name.
    assert source_size("skimage:astronaut") == (512, 512) and source_size("sample:astronaut") == (256, 256)


def test_other_samples_without_scikit_image_say_how_to_install(no_skimage: None) -> None:
    for call in (read_image, check_source):
        with pytest.raises(NSTError) as error:
            call("skimage:coffee", key="data.style[0]")
        message = str(error.value)
        assert message.startswith("data.style[0]: ") and "\n" not in message
        assert "pip install lightning-nst[samples]" in message and "sample:astronaut" in message
    with pytest.raises(NSTError, match="unknown sample 'skimage:nope'"):
        check_source("skimage:nope", "data.content")


def test_shipped_samples_are_small_and_documented() -> None:
    files = sorted(SAMPLES_DIR.glob("*.jpg"))
    assert [path.stem for path in files] == sorted(SHIPPED_SAMPLES)
    assert sum(path.stat().st_size for path in files) < 300_000
    for path in files:
        with Image.open(path) as image:
            assert max(image.size) <= 256
    readme = (SAMPLES_DIR / "README.md").read_text()
    assert all(path.name in readme for path in files) and "public domain" in readme and "CC0" in readme


def test_fit_on_shipped_samples_without_scikit_image(no_skimage: None) -> None:
    from lightning_nst.main import main
    from tests.conftest import CONFIGS

    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "style_transfer_gram.yaml"),
            "--data.init_args.size=32",
            "--trainer.max_steps=2",
            "--model.init_args.vgg.weights=random",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (result,) = Path("logs").glob("style_transfer_gram/version_*/gram.png")
    with Image.open(result) as image:
        assert image.size == (32, 32) and np.asarray(image).std() > 2.0
    assert "skimage" not in {name.split(".")[0] for name, module in sys.modules.items() if module is not None}
