"""The DataModule of guided diffusion: every combination of prompt, seed and style image is one item."""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_input_file, source_digest
from lightning_nst.core.images import is_sample, load_image
from lightning_nst.core.losses import check_style_weights
from lightning_nst.diffusion.manifest import GenerationFolder

# An empty predict dataloader is how a rerun with every item finished runs no predict step; Lightning's warning about it
# ("Please make sure this was your intention") would only alarm the user.
warnings.filterwarnings("ignore", message=r"Total length of `DataLoader` across ranks is zero")


_INIT_FIELDS = ("init_image", "init_image_digest")


@dataclass(frozen=True)
class GenerationItem:
    """One image to generate.

    Attributes:
        index: Position in the full expansion; stable across runs and ranks, so it names the output.
        prompt: The text sent to the text encoder (the base prompt plus the style prompt, if any).
        base_prompt: The prompt as listed in the config or the prompts file.
        negative_prompt: The text classifier-free guidance steers away from.
        seed: Seed of the initial latents (and of DDPM's noise).
        style: The style image source, or ``None`` when no style images are given.
        style_index: Position of ``style`` in ``data.style``; ``-1`` without style images.
        style_prompt: Text appended to the prompt for this style image, or ``None``.
        style_digest: What identifies the style image's content (:func:`~lightning_nst.core.files.source_digest`), or
            ``None`` without style images.
        init_image: The image img2img starts from (``data.init_images``), or ``None`` for text-to-image.
        init_image_digest: What identifies the init image's content, or ``None`` without one.
    """

    index: int
    prompt: str
    base_prompt: str
    negative_prompt: str
    seed: int
    style: str | None
    style_index: int
    style_prompt: str | None
    style_digest: str | None = None
    init_image: str | None = None
    init_image_digest: str | None = None

    def fingerprint(self, sampler: Mapping[str, Any]) -> str:
        """A short hash of everything that defines this item's image but its index: texts, seed, style, sampler.

        The style and the init image enter by path and by content digest, so an image edited in place changes the
        fingerprint. Without an init image its fields and the sampler's ``strength`` are left out, so text-to-image
        fingerprints stay as they were.

        Args:
            sampler: The sampling options, e.g. :meth:`~lightning_nst.GuidedDiffusion.fingerprint_options`.
        """
        fields = {
            key: value
            for key, value in asdict(self).items()
            if key != "index" and not (key in _INIT_FIELDS and value is None)
        }
        if self.init_image is None:  # the strength shapes an image only from an init image
            sampler = {key: value for key, value in sampler.items() if key != "strength"}
        text = json.dumps({"item": fields, "sampler": sampler}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ItemDataset(Dataset[GenerationItem]):
    """The items to generate as a map-style dataset, so Lightning can split it across ranks by index."""

    def __init__(self, items: list[GenerationItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> GenerationItem:
        return self.items[index]


class ItemQueue(DistributedSampler[GenerationItem]):
    """The pending items handed to the processes of one run as each asks for its next batch: ``predict``'s split.

    A counter in the run's ``torch.distributed`` store, which every process met at, hands out ``batch_size``
    positions at a time, each to exactly one process: a slow process or node takes fewer batches instead of holding
    the grid, and every batch holds the same items as a one-process run's, so it makes the same images. Lightning's
    ``DistributedSampler`` splits statically (item ``rank``, ``rank + world_size``, ...), which leaves the faster
    processes idle at the end of a grid whose items or nodes differ in speed, and its batches mix items differently.

    Being a ``DistributedSampler``, it is kept as it is by Lightning. Its length is the number of pending items, a
    bound on this process's share; a process may get none.

    Args:
        dataset: The pending items.
        num_replicas: Processes in the run.
        rank: This process's global rank.
        batch_size: Positions handed out at a time (the DataLoader's batch size).
        key: The counter's name in the store, the same in every process of the run and new for every run.
        store: The run's store (``torch.distributed``'s default), where a counter is one atomic ``add``.
    """

    def __init__(
        self, dataset: ItemDataset, num_replicas: int, rank: int, batch_size: int, key: str, store: Any
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = self.num_samples = len(dataset)
        self.batch_size, self.key, self.store = batch_size, key, store

    def __iter__(self) -> Iterator[int]:
        while True:
            end = int(self.store.add(f"{self.key}/next", self.batch_size))
            start = end - self.batch_size
            if start >= self.total_size:
                return
            yield from range(start, min(end, self.total_size))

    def finished(self, count: int) -> None:
        """Count ``count`` more items as handled (written or failed) by this process."""
        self.store.add(f"{self.key}/done", count)

    def done(self) -> int:
        """Items handled so far by all processes of the run."""
        return int(self.store.add(f"{self.key}/done", 0))


def run_store() -> Any:
    """The ``torch.distributed`` store of this process's run, which its processes met at.

    torch has no public accessor for it; it is the one channel every process of a run (on every node) reaches
    without another port or any promise of a shared filesystem's atomicity.
    """
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def collate_items(items: list[GenerationItem], init_images: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """Batch items as ``{field: list}``; ``style_index`` becomes a tensor so it follows the batch to the device.

    ``init_pixels`` holds each item's init image ``(1, 3, H, W)`` from ``init_images`` (by source), or ``None``.
    """
    batch: dict[str, Any] = {key: [getattr(item, key) for item in items] for key in asdict(items[0])}
    batch["style_index"] = torch.tensor(batch["style_index"], dtype=torch.long)
    images = init_images or {}
    batch["init_pixels"] = [images.get(item.init_image) if item.init_image is not None else None for item in items]
    return batch


@dataclass(frozen=True)
class DataSummary:
    """What a model takes of a :class:`PromptGrid` when it is set up, besides the batches.

    Attributes:
        style_targets: The guidance targets, as :meth:`lightning_nst.StyleGuidance.set_styles` takes them; empty
            without style images.
        style_weights: Each target's blend weights (``data.style_blends``), or ``None``.
        init_images: The init images ``(1, 3, H, W)`` of img2img; empty for text-to-image.
        batch_size: Items per batch.
        negative_prompt: The items' negative prompt.
        finished: Whether nothing is left to generate: an earlier run finished every item.
    """

    style_targets: list[Tensor | list[Tensor]]
    style_weights: list[list[float]] | None
    init_images: list[Tensor]
    batch_size: int
    negative_prompt: str
    finished: bool


def _check_blends(blends: list[list[float]] | None, count: int) -> list[list[float]] | None:
    """``data.style_blends`` with each entry normalised to sum 1, or raise naming the entry."""
    if blends is None:
        return None
    if not count:
        raise NSTError("data.style_blends: give the style images to blend in data.style")
    if not blends:
        raise NSTError("data.style_blends: the list of blends is empty")
    normalised = []
    for index, blend in enumerate(blends):
        weights = check_style_weights(blend, count, f"data.style_blends[{index}]")
        normalised.append([weight / sum(weights) for weight in weights])
    return normalised


def _digest(source: str, key: str) -> str:
    try:
        return source_digest(source)
    except OSError as error:
        raise NSTError(f"{key}: cannot read {Path(source).expanduser()}: {error.strerror or error}") from None


def _read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; a BOM and any newline convention are accepted."""
    file = Path(path).expanduser()
    if not file.exists():
        raise NSTError(f"data.prompts_file: file not found: {file}")
    if not file.is_file():
        raise NSTError(f"data.prompts_file: {file} is not a file")
    try:
        data = file.read_bytes()
    except OSError as error:
        raise NSTError(f"data.prompts_file: cannot read {file}: {error.strerror or error}") from None
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise NSTError(
            f"data.prompts_file: {file} holds a NUL byte (line {line}): it is binary or UTF-16, not UTF-8 text with "
            "one prompt per line"
        )
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise NSTError(
            f"data.prompts_file: {file} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    # Only CR, LF and CRLF end a line: str.splitlines() would also split prompts at U+2028, form feeds and the like.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [line.strip() for line in lines if line.strip()]


class PromptGrid(L.LightningDataModule):
    """Prompts × style images × seeds for ``lightning-nst predict``, one item per image to generate.

    Items are ordered prompt-major, then style, then seed, and numbered from 0; the number names the output file.
    Under several processes each takes the next batch of pending items when it is ready for one (see
    :class:`ItemQueue`), so every item is generated once in all, and a slower process takes fewer. Items an earlier run
    finished (:meth:`resume`, reading the output folder's records) are left out before that, so the rest is spread
    over all processes. A model takes what it needs of the data at its setup from :meth:`summary`, and each batch's
    init images from the batch.

    Args:
        prompts: Prompts as a YAML list.
        prompts_file: A UTF-8 text file with one prompt per line; its prompts follow ``prompts``. Lines are
            stripped, blank ones skipped; a byte-order mark and CRLF line ends are fine.
        seeds: One image per seed for every prompt and style.
        style: Style images: paths, ``sample:NAME`` or ``skimage:NAME``; each is its own guidance target. Loaded at
            full size: the guidance resizes them.
        style_prompts: Text appended to the prompt for each style target (``"<prompt>, <style prompt>"``), e.g.
            ``"in the style of Van Gogh's Starry Night"`` for a prompt-only baseline. One entry per style image (per
            blend with ``style_blends``).
        style_blends: Guidance targets that blend the style images: each entry weighs every ``style`` image (one
            weight each, normalised to sum 1) and makes one target, which replaces the single images as the items'
            styles. E.g. ``[[1, 0], [0.5, 0.5], [0, 1]]`` generates each prompt and seed with three targets.
        negative_prompt: Negative prompt of every item.
        init_images: Images to start from (img2img, see ``model.strength``): one for every prompt, or one per prompt
            in the order of the prompts (the list's, then the file's); each prompt's style and seed items share it.
            Paths, ``sample:NAME`` or ``skimage:NAME``; ``None`` generates from text.
        batch_size: Items per UNet batch; with init images of different sizes it must be 1.
        num_workers: DataLoader worker processes (items are only text, so 0 is usually right; with workers, a
            process of several takes up to two batches per worker ahead of the one it generates).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompts_file: str | os.PathLike[str] | None = None,
        seeds: list[int] | None = None,
        style: list[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        style_prompts: list[str] | None = None,
        style_blends: list[list[float]] | None = None,
        negative_prompt: str = "",
        init_images: list[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if prompts is not None and not prompts and prompts_file is None:
            raise NSTError("data.prompts: the list of prompts is empty")
        if prompts is None and prompts_file is None:
            raise NSTError("data.prompts: give data.prompts (a list) or data.prompts_file (one prompt per line)")
        seeds = [0] if seeds is None else list(seeds)
        if not seeds:
            raise NSTError("data.seeds: the list of seeds is empty")
        for index, seed in enumerate(seeds):
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise NSTError(f"data.seeds[{index}]: must be an integer in [0, 2**63), got {seed!r}")
        style = [style] if isinstance(style, str | os.PathLike) else style
        if style is not None and not style:
            raise NSTError("data.style: the list of style images is empty")
        self.style_sources = [str(source) for source in style or []]
        for index, source in enumerate(self.style_sources):
            if not is_sample(source):
                check_input_file(source, f"data.style[{index}]", "image file")
        # Digested here, before any output exists, so results made from an image since edited are recognised.
        self.style_digests = [_digest(source, f"data.style[{i}]") for i, source in enumerate(self.style_sources)]
        self.style_blends = _check_blends(style_blends, len(self.style_sources))
        if self.style_blends is not None:
            # A blend is named by its weights and sources, and identified by its weights and the images' digests.
            self.blend_names = [
                " + ".join(f"{w:.4g}*{s}" for w, s in zip(blend, self.style_sources, strict=True) if w > 0)
                for blend in self.style_blends
            ]
            self.blend_digests = [
                hashlib.sha256(json.dumps([blend, self.style_digests]).encode()).hexdigest()
                for blend in self.style_blends
            ]
        targets = len(self.style_blends) if self.style_blends is not None else len(self.style_sources)
        if style_prompts is not None and len(style_prompts) != targets:
            what = "blend (data.style_blends)" if self.style_blends is not None else "style image"
            raise NSTError(f"data.style_prompts: give one entry per {what} ({targets}), got {len(style_prompts)}")
        if batch_size < 1:
            raise NSTError(f"data.batch_size: must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise NSTError(f"data.num_workers: must be >= 0, got {num_workers}")
        # Read here rather than in setup, so a bad file stops the run before any output folder exists.
        file_prompts = _read_prompts_file(prompts_file) if prompts_file is not None else []
        if prompts_file is not None and not file_prompts:
            raise NSTError(f"data.prompts_file: {Path(prompts_file).expanduser()} holds no prompts")
        self.prompts = list(prompts or []) + file_prompts
        init_images = [init_images] if isinstance(init_images, str | os.PathLike) else init_images
        if init_images is not None and len(init_images) not in (1, len(self.prompts)):
            raise NSTError(
                f"data.init_images: give one image for all prompts or one per prompt ({len(self.prompts)}), "
                f"got {len(init_images)}"
            )
        self.init_sources = [str(source) for source in init_images or []]
        for index, source in enumerate(self.init_sources):
            if not is_sample(source):
                check_input_file(source, f"data.init_images[{index}]", "image file")
        self.init_digests = [_digest(source, f"data.init_images[{i}]") for i, source in enumerate(self.init_sources)]
        self.seeds = seeds
        self.style_prompts = list(style_prompts) if style_prompts is not None else None
        self.negative_prompt = negative_prompt
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.items: list[GenerationItem] = []
        self.skipped: set[int] = set()
        self.style_images: list[Tensor] = []
        self.init_images: dict[str, Tensor] = {}
        self.queue: ItemQueue | None = None
        # With every item finished the dataloader is empty on every process, which runs no predict step.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def expand(self) -> list[GenerationItem]:
        """All items, in order: prompts (the list, then the file's) × styles × seeds."""
        names = self.blend_names if self.style_blends is not None else self.style_sources
        digests = self.blend_digests if self.style_blends is not None else self.style_digests
        styles: list[tuple[int, str | None]] = list(enumerate(names)) or [(-1, None)]
        items: list[GenerationItem] = []
        for prompt_index, prompt in enumerate(self.prompts):
            init = min(prompt_index, len(self.init_sources) - 1)
            init_image = self.init_sources[init] if self.init_sources else None
            init_digest = self.init_digests[init] if self.init_sources else None
            for style_index, style in styles:
                style_prompt = self.style_prompts[style_index] if self.style_prompts and style is not None else None
                full = ", ".join(part for part in (prompt, style_prompt) if part)
                for seed in self.seeds:
                    items.append(
                        GenerationItem(
                            len(items),
                            full,
                            prompt,
                            self.negative_prompt,
                            seed,
                            style,
                            style_index,
                            style_prompt,
                            digests[style_index] if style is not None else None,
                            init_image,
                            init_digest,
                        )
                    )
        return items

    def setup(self, stage: str) -> None:
        """Expand the items and load the style and init images (once)."""
        if not self.items:
            self.items = self.expand()
        if not self.style_images and self.style_sources:
            self.style_images = [
                load_image(source, key=f"data.style[{index}]") for index, source in enumerate(self.style_sources)
            ]
        if not self.init_images and self.init_sources:
            self.init_images = {
                source: load_image(source, key=f"data.init_images[{index}]")
                for index, source in enumerate(self.init_sources)
            }

    def style_targets(self) -> tuple[list[Tensor | list[Tensor]], list[list[float]] | None]:
        """The guidance targets, as :meth:`lightning_nst.StyleGuidance.set_styles` takes them: images and weights."""
        if self.style_blends is None:
            return list(self.style_images), None
        return [list(self.style_images) for _ in self.style_blends], self.style_blends

    def summary(self) -> DataSummary:
        """What a model takes of the data at its setup (after this module's, and the writer's)."""
        targets, weights = self.style_targets()
        return DataSummary(
            style_targets=targets,
            style_weights=weights,
            init_images=list(self.init_images.values()),
            batch_size=self.batch_size,
            negative_prompt=self.negative_prompt,
            finished=self.all_finished,
        )

    def resume(self, folder: GenerationFolder | None) -> dict[int, str]:
        """Read which items ``folder``'s records finished, and leave them out of the dataloader; ``None`` starts over.

        Returns the manifest line of each finished item, by index. Raises where the folder holds a file that is not
        its own (:meth:`~lightning_nst.diffusion.manifest.GenerationFolder.finished`).
        :class:`~lightning_nst.GenerationWriter` calls it in its ``setup``, after this module's, with its folder.
        """
        finished = folder.finished() if folder is not None else {}
        self.skip(finished)
        return finished

    def skip(self, indices: Iterable[int]) -> None:
        """Leave the items numbered ``indices`` out of the dataloader, e.g. those an earlier run finished."""
        self.skipped = set(indices)

    @property
    def pending(self) -> list[GenerationItem]:
        """The items to generate: all of them but the skipped ones, in order."""
        return [item for item in self.items if item.index not in self.skipped]

    @property
    def all_finished(self) -> bool:
        """Whether the items are expanded and every one of them is skipped: there is nothing to generate."""
        return bool(self.items) and not self.pending

    def predict_dataloader(self) -> DataLoader[GenerationItem]:
        """Pending items in order, ``batch_size`` at a time; under several processes, each batch to one of them.

        With nothing pending the dataloader is empty on every process alike, and Lightning skips the predict loop:
        no predict step runs and the module loads no pipeline.
        """
        dataset = ItemDataset(self.pending)
        trainer = self.trainer
        self.queue = None
        if trainer is not None and trainer.world_size > 1 and len(dataset):
            # Every process calls this at once (Lightning requests the dataloaders together), so they can agree on a
            # counter new to this run: a store outlives a run under an elastic agent that restarts its workers.
            token = trainer.strategy.broadcast(uuid.uuid4().hex if trainer.is_global_zero else None, src=0)
            self.queue = ItemQueue(
                dataset, trainer.world_size, trainer.global_rank, self.batch_size, f"lightning_nst/{token}", run_store()
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.queue,
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate_items, init_images=self.init_images),
        )

    def finished(self, count: int) -> None:
        """Count ``count`` more items as handled (written or failed) by this process, for the run's progress."""
        if self.queue is not None:
            self.queue.finished(count)

    def progress(self) -> tuple[int, int] | None:
        """Items handled by all processes of a run of several, and how many were pending; ``None`` in one process."""
        return (self.queue.done(), self.queue.total_size) if self.queue is not None else None
