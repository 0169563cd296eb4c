"""The data of fast style network training: random crops of the photos in a folder, and style images.

:class:`ImageFolders` scans a folder of content photos (recursively: JPEG, PNG, WebP) once in its ``setup``,
skips the files it cannot read or that are too small with one warning, holds some of them out for validation, and
yields random resized crops (``torchvision.transforms.v2``). With a ``styles`` folder (AdaIN) every crop comes with a
crop of a random style image; with one ``style`` image (Johnson et al.) the module reads it from here.

Every random choice of an item (its crop, its style image, the file that replaces one that fails to decode) is drawn
from a seed the sampler gives with its index, a function of ``seed``, the epoch and the position in the epoch only. So
the data do not depend on the number of workers or their random state, every DDP process draws the same plan, and a
run resumed from a checkpoint taken mid-epoch (the module's ``state_dict`` records how many batches the epoch had
consumed) continues with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import SAMPLES_DIR, SHIPPED_SAMPLES, check_source, read_image

__all__ = ["EXTENSIONS", "SHIPPED_FOLDER", "ImageFolders", "scan_images"]

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
"""File name endings (any case) of the images a folder is scanned for."""

SHIPPED_FOLDER = "sample:*"
"""A folder value naming the photos shipped in ``lightning_nst/samples`` (not its masks), for a first run."""

ATTEMPTS = 10
"""How many files in a row may fail to decode before an item gives up (a folder of broken files is an error)."""

_SCAN_THREADS = 8


def _listed(folder: str | os.PathLike[str], key: str) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted), or raise naming ``key`` if it is missing or empty."""
    if str(folder) == SHIPPED_FOLDER:
        return [SAMPLES_DIR / f"{name}.jpg" for name in SHIPPED_SAMPLES if not name.startswith("mask_")]
    root = Path(folder).expanduser()
    if not root.exists():
        raise NSTError(f"{key}: folder not found: {root}")
    if not root.is_dir():
        raise NSTError(f"{key}: {root} is not a folder (give a folder of images)")
    files = sorted(
        Path(parent) / name
        for parent, _, names in os.walk(root, followlinks=True)
        for name in names
        if name.lower().endswith(EXTENSIONS)
    )
    if not files:
        raise NSTError(f"{key}: no images in {root} (looked for {', '.join(EXTENSIONS)}, in subfolders too)")
    return files


def _problem(path: Path, min_side: int) -> str | None:
    """Why ``path`` cannot be used, from its header alone; ``None`` if it can."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"unreadable ({type(error).__name__})"
    if min(width, height) < min_side:
        return f"{width}x{height} px, smaller than {min_side} px"
    return None


def scan_images(folder: str | os.PathLike[str], min_side: int, key: str) -> tuple[list[Path], dict[Path, str]]:
    """The usable images under ``folder`` and ``{file: why}`` of those skipped, from each file's header.

    Raises:
        NSTError: Naming ``key``, if the folder is missing, holds no image, or no usable one.
    """
    files = _listed(folder, key)
    with ThreadPoolExecutor(min(_SCAN_THREADS, len(files))) as pool:
        problems = list(pool.map(lambda path: _problem(path, min_side), files))
    usable = [path for path, problem in zip(files, problems, strict=True) if problem is None]
    skipped = {path: problem for path, problem in zip(files, problems, strict=True) if problem is not None}
    if not usable:
        path, why = next(iter(skipped.items()))
        raise NSTError(f"{key}: none of the {len(files)} images in {folder} is usable (e.g. {path}: {why})")
    return usable, skipped


def _centre_crop(image: Tensor, size: int) -> Tensor:
    """The image's shorter side resized to ``size``, then its centre ``size`` x ``size``: validation's fixed view."""
    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size]).clamp(0, 1)


class _Crops(Dataset[dict[str, Any]]):
    """Items ``(index, seed)`` to crops: ``content`` and, with style files, ``style``; ``replaced`` counts failures.

    A file that fails to decode is replaced by another file drawn from the item's seed and counted (``replaced``, and
    the first such file in ``failed``); the result does not depend on which worker met the failure first.
    """

    def __init__(
        self, files: Sequence[Path], styles: Sequence[Path], size: int, scale: tuple[float, float], train: bool
    ) -> None:
        self.files, self.styles, self.size, self.train = list(files), list(styles), size, train
        self.crop = T.RandomResizedCrop(size, scale=scale, antialias=True)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, files: list[Path], first: int, generator: torch.Generator, key: str) -> tuple[Tensor, int, str]:
        index, failed, replaced = first, "", 0
        for _ in range(ATTEMPTS):
            try:
                image = read_image(files[index], key=key, max_side=2 * self.size)
            except NSTError:
                replaced += 1
                failed = failed or str(files[index])
                index = int(torch.randint(len(files), (1,), generator=generator))
                continue
            if self.train:
                # v2 transforms draw from torch's global generator: seeded here from the item's own generator.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                    return self.crop(image)[0].clamp(0, 1), replaced, failed
            return _centre_crop(image, self.size)[0], replaced, failed
        raise NSTError(f"{key}: {ATTEMPTS} images in a row failed to decode (the first: {failed}); check the folder")

    def __getitem__(self, item: tuple[int, int] | int) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        generator = torch.Generator().manual_seed(int(seed))
        content, replaced, failed = self._load(self.files, index, generator, "data.images")
        sample: dict[str, Any] = {"content": content}
        if self.styles:
            first = int(torch.randint(len(self.styles), (1,), generator=generator)) if self.train else index
            style, style_replaced, style_failed = self._load(self.styles, first % len(self.styles), generator,
                                                             "data.styles")  # fmt: skip
            sample["style"] = style
            replaced, failed = replaced + style_replaced, failed or style_failed
        sample["replaced"], sample["failed"] = replaced, failed
        return sample


class _EpochSampler(DistributedSampler):  # type: ignore[type-arg]
    """This process's share of a seeded permutation per epoch, as ``(index, seed)`` items; resumable mid-epoch.

    A ``DistributedSampler``, so Lightning does not wrap it in another (its ``use_distributed_sampler`` leaves one
    alone): rank and world size come from the trainer. Each file appears ``repeats`` times an epoch, each time with its
    own seed (another crop). ``skip`` items are left out of the start of epoch ``skip_epoch``'s pass, once: the items a
    resumed run had consumed before its checkpoint.
    """

    def __init__(self, dataset: _Crops, replicas: int, rank: int, seed: int, repeats: int, epoch: int) -> None:
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.repeats = repeats
        self.num_samples = math.ceil(len(dataset) * repeats / replicas)
        self.total_size = self.num_samples * replicas
        self.epoch = epoch
        self.skip_epoch, self.skip = epoch, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.cat([torch.randperm(len(self.dataset), generator=generator) for _ in range(self.repeats)])
        order = order.repeat(math.ceil(self.total_size / len(order)))[: self.total_size]  # padded as DDP needs
        seeds = torch.randint(2**62, (self.total_size,), generator=generator)
        items = list(zip(order.tolist(), seeds.tolist(), strict=True))[self.rank : self.total_size : self.num_replicas]
        skip = self.skip if self.epoch == self.skip_epoch else 0
        self.skip = 0 if self.epoch == self.skip_epoch else self.skip
        return iter(items[skip:])


class _CropLoader(DataLoader[dict[str, Any]]):
    """The train loader, resumable in Lightning's sense (``state_dict``/``load_state_dict``).

    The position in the epoch is the data module's state (:meth:`ImageFolders.state_dict`), which a resumed run
    restores before it builds this loader; without these methods Lightning would warn on every mid-epoch resume that
    the run may not be exact, although it is (``tests/nst/fast/test_training.py``).
    """

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the data module keeps the position."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore here: :meth:`ImageFolders.load_state_dict` did."""


class ImageFolders(L.LightningDataModule):
    """Random crops of a folder of photos, with one style image (Johnson et al.) or a folder of them (AdaIN).

    Args:
        images: The content photos: a folder, searched recursively for JPEG, PNG and WebP files (COCO 2014 ``train``
            for real training), or ``sample:*`` for the shipped sample photos.
        style: The style image of a Johnson network, a path or ``sample:NAME``; a list blends several (the module's
            ``style_weights``). The module takes it from here unless its own ``style`` is set.
        styles: The style images of AdaIN: a folder as ``images`` (WikiArt for real training); each content crop
            comes with a crop of a random one.
        size: Side of the square random resized crops (and of the validation images' centre crops), in pixels.
        crop_scale: The range of the crop's share of the image area (``RandomResizedCrop``'s ``scale``).
        batch_size: Crops per batch and process.
        num_workers: DataLoader worker processes per training process.
        val_count: How many content photos to hold out for validation (and the TensorBoard images); default: a
            fifth of them, at most 8 (none for a single photo).
        val_fraction: Instead of ``val_count``, this share of the content photos.
        repeats: Crops of each training photo per epoch, for small folders.
        seed: Seed of the held-out choice, the epochs' orders and every crop.

    Attributes:
        train_files: The training photos, after :meth:`setup`.
        val_files: The held-out photos.
        style_files: The AdaIN style images.
        skipped: ``{file: why}`` of the files the scan skipped (unreadable, or smaller than ``size / 2``).
        replaced: How many times, in this process, a file that failed to decode mid-epoch was replaced by another.
    """

    def __init__(
        self,
        images: str | os.PathLike[str] = SHIPPED_FOLDER,
        # The union in ImageTargets.style's order: jsonargparse reuses a union's parser for an equal union, and
        # unions are equal in any order, so another order here made a later ImageTargets parse a list as a string.
        style: list[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        styles: str | os.PathLike[str] | None = None,
        size: int = 256,
        crop_scale: tuple[float, float] = (0.25, 1.0),
        batch_size: int = 4,
        num_workers: int = 2,
        val_count: int | None = None,
        val_fraction: float | None = None,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (("data.size", size), ("data.batch_size", batch_size), ("data.repeats", repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NSTError(f"{key}: must be a whole number >= 1, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise NSTError(f"data.num_workers: must be a whole number >= 0, got {num_workers!r}")
        low, high = (float(value) for value in crop_scale)
        if not 0 < low <= high <= 1:
            raise NSTError(f"data.crop_scale: must be (low, high) with 0 < low <= high <= 1, got {list(crop_scale)}")
        if val_count is not None and val_fraction is not None:
            raise NSTError("data.val_count: give val_count or val_fraction, not both")
        if val_count is not None and (isinstance(val_count, bool) or val_count < 0):
            raise NSTError(f"data.val_count: must be a whole number >= 0, got {val_count!r}")
        if val_fraction is not None and not 0 <= val_fraction < 1:
            raise NSTError(f"data.val_fraction: must lie in [0, 1), got {val_fraction!r}")
        if style is not None and styles is not None:
            raise NSTError("data.style: give one style image (Johnson) or a styles folder (AdaIN), not both")
        # Cheap checks now, so a wrong path is named before any heavy work; the scan comes in setup.
        if str(images) != SHIPPED_FOLDER:
            _check_folder(images, "data.images")
        if styles is not None and str(styles) != SHIPPED_FOLDER:
            _check_folder(styles, "data.styles")
        sources = [style] if isinstance(style, str | os.PathLike) else list(style or [])
        for index, source in enumerate(sources):
            check_source(source, "data.style" if isinstance(style, str | os.PathLike) else f"data.style[{index}]")
        self.images, self.styles = str(images), None if styles is None else str(styles)
        self.style: list[str] | None = [str(source) for source in sources] or None
        self.size, self.crop_scale = int(size), (low, high)
        self.batch_size, self.num_workers, self.repeats, self.seed = batch_size, num_workers, repeats, int(seed)
        self.val_count, self.val_fraction = val_count, val_fraction
        self.train_files: list[Path] = []
        self.val_files: list[Path] = []
        self.style_files: list[Path] = []
        self.skipped: dict[Path, str] = {}
        self.replaced = 0
        self._warned_replaced = False
        self._epoch, self._consumed = 0, 0  # batches of the current epoch consumed by training steps
        self._resume: tuple[int, int] | None = None

    # -- files --------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Scan the folders (once): skip unusable files with one warning, hold out the validation photos."""
        if self.train_files:
            return
        min_side = max(1, math.ceil(self.size / 2))
        files, skipped = scan_images(self.images, min_side, "data.images")
        if self.styles is not None:
            self.style_files, style_skipped = scan_images(self.styles, min_side, "data.styles")
            skipped = {**skipped, **style_skipped}
        self.skipped = skipped
        if skipped:
            path, why = next(iter(skipped.items()))
            rank_zero_warn(
                f"data: skipped {len(skipped)} of the images (unreadable, or smaller than {min_side} px, half of "
                f"data.size), e.g. {path}: {why}",
                category=UserWarning,
            )
        held = self._held_out(len(files))
        if held >= len(files):
            raise NSTError(f"data.val_count: holding out {held} of {len(files)} usable photos leaves none to train on")
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_files = sorted(files[i] for i in order[:held])
        self.train_files = sorted(files[i] for i in order[held:])

    def _held_out(self, count: int) -> int:
        if self.val_count is not None:
            return self.val_count
        if self.val_fraction is not None:
            return round(self.val_fraction * count)
        return min(8, count // 5) if count > 1 else 0

    # -- loaders ------------------------------------------------------------------------------------------------

    def _world(self) -> tuple[int, int, int]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return 1, 0, 0
        return trainer.world_size, trainer.global_rank, trainer.current_epoch

    def _trainer_or_none(self) -> L.Trainer | None:
        return self.trainer if getattr(self, "trainer", None) is not None else None

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Random crops, each training photo ``repeats`` times an epoch, in a seeded order (see the module doc)."""
        dataset = _Crops(self.train_files, self.style_files, self.size, self.crop_scale, train=True)
        replicas, rank, epoch = self._world()
        sampler = _EpochSampler(dataset, replicas, rank, self.seed, self.repeats, epoch)
        if self._resume is not None:
            sampler.skip_epoch, consumed = self._resume
            sampler.skip = consumed * self.batch_size
            sampler.epoch = sampler.skip_epoch  # the iterator is made before Lightning sets the epoch on a resume
            self._resume = None
        return _CropLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=sampler.num_samples >= self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader[dict[str, Any]] | list[Any]:
        """The held-out photos' centre crops, each with a style image in turn (AdaIN); none held out: no loader."""
        if not self.val_files:
            return []
        dataset = _Crops(self.val_files, self.style_files, self.size, self.crop_scale, train=False)
        workers = min(self.num_workers, 1)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=workers, persistent_workers=workers > 0)

    def preview(self, count: int = 8) -> dict[str, Tensor]:
        """The first ``count`` validation items, collated (``content``, and ``style`` for AdaIN): the logged grid's."""
        if not self.val_files:
            return {}
        dataset = _Crops(self.val_files, self.style_files, self.size, self.crop_scale, train=False)
        items = [dataset[i] for i in range(min(count, len(dataset)))]
        return {key: torch.stack([item[key] for item in items]) for key in ("content", "style") if key in items[0]}

    # -- counting and resuming ------------------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the batches training consumes (for resuming) and the files replaced mid-epoch (one warning)."""
        trainer = self._trainer_or_none()
        if isinstance(batch, dict) and "replaced" in batch:
            replaced = int(batch.pop("replaced").sum())
            failed = [name for name in batch.pop("failed", []) if name]
            self.replaced += replaced
            if replaced and not self._warned_replaced:
                self._warned_replaced = True
                rank_zero_warn(
                    f"data: {failed[0] if failed else 'an image'} failed to decode and was replaced by another image; "
                    "later failures are counted (ImageFolders.replaced, logged as data/replaced)",
                    category=UserWarning,
                )
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self._epoch:
                self._epoch, self._consumed = trainer.current_epoch, 0
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the epoch and how many of its batches were consumed."""
        return {"epoch": self._epoch, "consumed": self._consumed, "replaced": self.replaced}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume mid-epoch: the next train loader leaves out the batches consumed before the checkpoint."""
        self._epoch, self._consumed = int(state_dict["epoch"]), int(state_dict["consumed"])
        self.replaced = int(state_dict.get("replaced", 0))
        self._resume = (self._epoch, self._consumed)


def _check_folder(folder: str | os.PathLike[str], key: str) -> None:
    root = Path(folder).expanduser()
    if not root.exists():
        raise NSTError(f"{key}: folder not found: {root}")
    if not root.is_dir():
        raise NSTError(f"{key}: {root} is not a folder (give a folder of images)")
