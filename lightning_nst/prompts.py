"""The DataModule of guided diffusion: every combination of prompt, seed and style image is one item."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_nst.errors import NSTError
from lightning_nst.images import SAMPLE_PREFIX, load_image


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
    """

    index: int
    prompt: str
    base_prompt: str
    negative_prompt: str
    seed: int
    style: str | None
    style_index: int
    style_prompt: str | None


class GenerationItems(Dataset[GenerationItem]):
    """A map-style dataset over a fixed list of items, so Lightning can split it across ranks by index."""

    def __init__(self, items: list[GenerationItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> GenerationItem:
        return self.items[index]


def collate_items(items: list[GenerationItem]) -> dict[str, Any]:
    """Batch items as ``{field: list}``; ``style_index`` becomes a tensor so it follows the batch to the device."""
    batch: dict[str, Any] = {key: [getattr(item, key) for item in items] for key in asdict(items[0])}
    batch["style_index"] = torch.tensor(batch["style_index"], dtype=torch.long)
    return batch


def _read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise NSTError(f"data.prompts_file: file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise NSTError(f"data.prompts_file: cannot read {file} as UTF-8 text: {error}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


class PromptGrid(L.LightningDataModule):
    """Prompts × style images × seeds for ``lightning-nst predict``, one item per image to generate.

    Items are ordered prompt-major, then style, then seed, and numbered from 0; the number names the output file.
    For ``predict`` Lightning splits the items across processes with its ``UnrepeatedDistributedSampler``, so each
    item is generated once in all even when their count is not a multiple of the number of processes.

    Args:
        prompts: Prompts as a YAML list.
        prompts_file: A UTF-8 text file with one prompt per line (blank lines are skipped); its prompts follow
            ``prompts``.
        seeds: One image per seed for every prompt and style.
        style: Style images, paths or ``skimage:NAME``; each is its own guidance target. Loaded at full size: the
            guidance resizes them.
        style_prompts: Text appended to the prompt for each style image (``"<prompt>, <style prompt>"``), e.g.
            ``"in the style of Van Gogh's Starry Night"`` for a prompt-only baseline. One entry per style image.
        negative_prompt: Negative prompt of every item.
        batch_size: Items per UNet batch.
        num_workers: DataLoader worker processes (items are only text, so 0 is usually right).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompts_file: str | os.PathLike[str] | None = None,
        seeds: list[int] | None = None,
        style: list[str | os.PathLike[str]] | None = None,
        style_prompts: list[str] | None = None,
        negative_prompt: str = "",
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
        if style is not None and not style:
            raise NSTError("data.style: the list of style images is empty")
        self.style_sources = [str(source) for source in style or []]
        for index, source in enumerate(self.style_sources):
            if not source.startswith(SAMPLE_PREFIX) and not Path(source).expanduser().is_file():
                raise NSTError(f"data.style[{index}]: image file not found: {Path(source).expanduser()}")
        if style_prompts is not None and len(style_prompts) != len(self.style_sources):
            raise NSTError(
                f"data.style_prompts: give one entry per style image ({len(self.style_sources)}), "
                f"got {len(style_prompts)}"
            )
        if batch_size < 1:
            raise NSTError(f"data.batch_size: must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise NSTError(f"data.num_workers: must be >= 0, got {num_workers}")
        self.prompts = list(prompts or [])
        self.prompts_file = prompts_file
        self.seeds = seeds
        self.style_prompts = list(style_prompts) if style_prompts is not None else None
        self.negative_prompt = negative_prompt
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.items: list[GenerationItem] = []
        self.style_images: list[Tensor] = []

    def expand(self) -> list[GenerationItem]:
        """All items, in order: prompts × styles × seeds."""
        prompts = self.prompts + (_read_prompts_file(self.prompts_file) if self.prompts_file is not None else [])
        if not prompts:
            raise NSTError(f"data.prompts_file: {self.prompts_file} holds no prompts")
        styles: list[tuple[int, str | None]] = list(enumerate(self.style_sources)) or [(-1, None)]
        items: list[GenerationItem] = []
        for prompt in prompts:
            for style_index, style in styles:
                style_prompt = self.style_prompts[style_index] if self.style_prompts and style is not None else None
                full = ", ".join(part for part in (prompt, style_prompt) if part)
                for seed in self.seeds:
                    items.append(
                        GenerationItem(
                            len(items), full, prompt, self.negative_prompt, seed, style, style_index, style_prompt
                        )
                    )
        return items

    def setup(self, stage: str) -> None:
        """Expand the items and load the style images (once)."""
        if not self.items:
            self.items = self.expand()
        if not self.style_images and self.style_sources:
            self.style_images = [
                load_image(source, key=f"data.style[{index}]") for index, source in enumerate(self.style_sources)
            ]

    def predict_dataloader(self) -> DataLoader[GenerationItem]:
        """Items in order, ``batch_size`` at a time; Lightning adds the split across processes."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if len(self.items) < world_size:
            raise NSTError(
                f"data: {len(self.items)} item(s) cannot be spread over {world_size} processes; "
                "use fewer trainer.devices or more prompts/seeds"
            )
        return DataLoader(
            GenerationItems(self.items),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_items,
        )
