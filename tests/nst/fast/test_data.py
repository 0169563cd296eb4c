"""ImageFolders: scanning, skipping and replacing bad files, held-out photos, seeded crops, DDP shares, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_nst.core.errors import NSTError
from lightning_nst.nst.fast.data import SHIPPED_FOLDER, ImageFolders, _EpochSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def write_photos(folder: Path, count: int, size: int = 48, seed: int = 0) -> list[Path]:
    """``count`` seeded noise-and-gradient photos, half of them in a subfolder, alternately JPEG and PNG."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        target = folder / "sub" if index % 2 else folder
        target.mkdir(parents=True, exist_ok=True)
        ramp = np.linspace(0, 255, size + 8)[None, :, None]
        pixels = (0.5 * rng.random((size, size + 8, 3)) * 255 + 0.5 * ramp).astype(np.uint8)
        path = target / f"photo{index}.{'png' if index % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_missing_or_empty_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(NSTError, match="^data.images: folder not found: "):
        ImageFolders(images=str(tmp_path / "nowhere"), style="sample:brick")
    with pytest.raises(NSTError, match="^data.styles: folder not found: "):
        ImageFolders(images=str(tmp_path), styles=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    data = ImageFolders(images=str(tmp_path / "empty"), style="sample:brick", size=32, num_workers=0)
    with pytest.raises(NSTError, match=r"^data.images: no images in .*empty \(looked for .jpg, .jpeg, .png, .webp"):
        data.setup("fit")
    with pytest.raises(NSTError, match="^data.style: image file not found: "):
        ImageFolders(images=str(tmp_path), style=str(tmp_path / "painting.jpg"))


def test_scan_skips_unreadable_and_tiny_files_with_one_warning(tmp_path: Path) -> None:
    write_photos(tmp_path, 6)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (12, 40)).save(tmp_path / "tiny.png")  # shorter side 12 < size / 2 = 16
    data = ImageFolders(images=str(tmp_path), style="sample:brick", size=32, num_workers=0, val_count=2)
    with pytest.warns(UserWarning, match=r"data: skipped 2 of the images .* smaller than 16 px") as caught:
        data.setup("fit")
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    assert set(data.skipped) == {tmp_path / "broken.jpg", tmp_path / "tiny.png"}
    assert len(data.train_files) == 4 and len(data.val_files) == 2
    assert not set(data.train_files) & set(data.val_files)


def test_held_out_photos_depend_on_the_seed_only(tmp_path: Path) -> None:
    write_photos(tmp_path, 10)
    chosen = []
    for seed in (0, 0, 1):
        data = ImageFolders(images=str(tmp_path), style="sample:brick", size=32, num_workers=0, seed=seed)
        data.setup("fit")
        chosen.append(data.val_files)
    assert len(chosen[0]) == 2 and chosen[0] == chosen[1] and chosen[0] != chosen[2]  # default: a fifth
    data = ImageFolders(images=str(tmp_path), style="sample:brick", size=32, val_fraction=0.5)
    data.setup("fit")
    assert len(data.val_files) == 5
    with pytest.raises(NSTError, match="data.val_count: holding out 10 of 10 usable photos leaves none"):
        ImageFolders(images=str(tmp_path), style="sample:brick", size=32, val_count=10).setup("fit")


def test_grayscale_cmyk_and_16_bit_photos_become_rgb_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 50)) * 255).astype(np.uint8), "L").save(tmp_path / "gray.png")
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((rng.random((40, 50)) * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.webp")
    data = ImageFolders(images=str(tmp_path), style="sample:brick", size=32, batch_size=4, num_workers=0, val_count=0)
    data.setup("fit")
    assert len(data.train_files) == 4
    (batch,) = list(data.train_dataloader())
    crops = batch["content"]
    assert crops.shape == (4, 3, 32, 32) and crops.dtype == torch.float32
    assert 0 <= crops.min() and crops.max() <= 1 and crops.std() > 0.05  # the 16-bit file is not clipped to white


def test_a_file_that_fails_to_decode_mid_epoch_is_replaced_and_counted(tmp_path: Path) -> None:
    paths = write_photos(tmp_path, 4, size=64)
    whole = paths[0].read_bytes()
    paths[0].write_bytes(whole[: len(whole) // 3])  # the header reads, the pixels do not
    data = ImageFolders(images=str(tmp_path), style="sample:brick", size=32, batch_size=2, num_workers=0, val_count=0)
    data.setup("fit")
    assert len(data.train_files) == 4 and not data.skipped  # the scan reads headers only
    with pytest.warns(UserWarning, match=r"photo0.jpg failed to decode and was replaced") as caught:
        for _ in range(3):  # three epochs: the file comes up in each
            for batch in data.train_dataloader():
                batch = data.on_before_batch_transfer(batch, 0)
                assert batch["content"].shape == (2, 3, 32, 32) and torch.isfinite(batch["content"]).all()
    assert len([w for w in caught if "replaced" in str(w.message)]) == 1
    assert data.replaced >= 1


def test_items_are_seeded_not_drawn_from_global_state(tmp_path: Path) -> None:
    write_photos(tmp_path, 3)
    styles = tmp_path / "styles"
    write_photos(styles, 3, seed=1)
    data = ImageFolders(images=str(tmp_path / "sub"), styles=str(styles), size=32, num_workers=0, val_count=0)
    data.setup("fit")
    dataset = data.train_dataloader().dataset
    torch.manual_seed(0)
    first = dataset[(0, 1234)]
    torch.manual_seed(99)
    again = dataset[(0, 1234)]
    other = dataset[(0, 1235)]
    assert set(first) == {"content", "style", "replaced", "failed"}
    torch.testing.assert_close(first["content"], again["content"], rtol=0, atol=0)
    torch.testing.assert_close(first["style"], again["style"], rtol=0, atol=0)
    assert not torch.equal(first["content"], other["content"])


def test_processes_share_an_epoch_and_a_resume_skips_what_was_consumed(tmp_path: Path) -> None:
    write_photos(tmp_path, 10)
    data = ImageFolders(images=str(tmp_path), style="sample:brick", size=32, batch_size=2, num_workers=0, val_count=0)
    data.setup("fit")
    dataset = data.train_dataloader().dataset
    shares = [list(_EpochSampler(dataset, 2, rank, seed=0, repeats=2, epoch=3)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 10
    items = shares[0] + shares[1]
    assert sorted(index for index, _ in items) == sorted(list(range(10)) * 2)  # each photo twice an epoch
    assert len({seed for _, seed in items}) == 20  # each with its own crop
    assert shares[0] != list(_EpochSampler(dataset, 2, 0, seed=0, repeats=2, epoch=4))  # another order next epoch
    resumed = _EpochSampler(dataset, 2, 0, seed=0, repeats=2, epoch=3)
    resumed.skip = 4
    assert list(resumed) == shares[0][4:]
    assert list(resumed) == shares[0]  # the skip applies once
    data.load_state_dict({"epoch": 0, "consumed": 2})
    loader = data.train_dataloader()
    assert len(loader) == 5 and len(list(loader)) == 3  # 2 of the epoch's 5 batches of 2 were consumed


def test_shipped_sample_photos_are_a_folder() -> None:
    data = ImageFolders(images=SHIPPED_FOLDER, styles=SHIPPED_FOLDER, size=64, num_workers=0)
    data.setup("fit")
    names = {path.stem for path in data.train_files + data.val_files}
    assert names == {"astronaut", "brick", "coffee", "grass", "gravel", "immunohistochemistry"}
    assert len(data.val_files) == 1 and len(data.style_files) == 6
    preview = data.preview()
    assert preview["content"].shape == (1, 3, 64, 64) and preview["style"].shape == (1, 3, 64, 64)


def test_bad_options_are_named() -> None:
    with pytest.raises(NSTError, match="^data.size: must be a whole number >= 1"):
        ImageFolders(size=0)
    with pytest.raises(NSTError, match="^data.crop_scale: must be"):
        ImageFolders(crop_scale=(0.5, 2.0))
    with pytest.raises(NSTError, match="^data.style: give one style image .* not both"):
        ImageFolders(style="sample:brick", styles=SHIPPED_FOLDER)
    with pytest.raises(NSTError, match="^data.val_count: give val_count or val_fraction, not both"):
        ImageFolders(val_count=1, val_fraction=0.1)
