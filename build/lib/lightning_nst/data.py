"""DataModules: the images an optimisation targets."""

from __future__ import annotations

import os

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_nst.errors import NSTError
from lightning_nst.images import load_image


class _Steps(Dataset[Tensor]):
    """One dummy item per optimisation step: the images live in the module, the loop only counts."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> Tensor:
        return torch.tensor(index)


class ImageTargets(L.LightningDataModule):
    """Content and style images for reconstruction, texture synthesis and style transfer.

    Images are loaded once in :meth:`setup`. The train loader yields one dummy item per step, ``trainer.max_steps``
    in all, so the progress bar knows the total.

    Args:
        content: Content image: a path, ``sample:NAME`` or ``skimage:NAME``. Needed by objectives with content layers.
        style: Style or texture images (one may be given alone); several are blended by averaging their statistics.
        size: Longer edge of the content image in pixels; ``None`` keeps the file's size.
        style_size: Longer edge of the style images; defaults to ``size``. Controls the scale of the style.
    """

    def __init__(
        self,
        content: str | os.PathLike[str] | None = None,
        style: list[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        size: PositiveInt | None = 256,
        style_size: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        style = [style] if isinstance(style, str | os.PathLike) else style
        if style is not None and len(style) == 0:
            raise NSTError("data.style: the list of style images is empty")
        self.content_source = content
        self.style_sources = list(style or [])
        # Plain ints: jsonargparse passes PositiveInt instances, which checkpoints could not load with weights_only.
        self.size = int(size) if size is not None else None
        self.style_size = int(style_size) if style_size is not None else self.size
        self.content: Tensor | None = None
        self.style: list[Tensor] = []

    def setup(self, stage: str) -> None:
        """Load the images (once)."""
        if self.content is None and self.content_source is not None:
            self.content = load_image(self.content_source, self.size, key="data.content")
        if not self.style and self.style_sources:
            self.style = [
                load_image(source, self.style_size, key=f"data.style[{index}]")
                for index, source in enumerate(self.style_sources)
            ]

    def check_min_size(self, min_side: int) -> None:
        """Raise naming the first image smaller than ``min_side`` pixels on a side."""
        named = [("data.content", self.content_source, self.content)]
        named += [
            (f"data.style[{i}]", s, t) for i, (s, t) in enumerate(zip(self.style_sources, self.style, strict=True))
        ]
        for key, source, image in named:
            if image is not None and min(image.shape[-2:]) < min_side:
                height, width = image.shape[-2:]
                raise NSTError(
                    f"{key}: {source} is {width}x{height} px after resizing, but the deepest layer needs at least "
                    f"{min_side} px per side; use a larger image or data.size"
                )

    @property
    def output_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the optimised image: the content's, else the first style image's."""
        reference = self.content if self.content is not None else (self.style[0] if self.style else None)
        if reference is None:
            raise NSTError("data: give data.content or data.style")
        return int(reference.shape[-2]), int(reference.shape[-1])

    def train_dataloader(self) -> DataLoader[Tensor]:
        """One item per step for ``trainer.max_steps`` steps."""
        steps = self.trainer.max_steps if self.trainer is not None else -1
        if steps is None or steps < 1:
            raise NSTError(f"trainer.max_steps: set a positive number of optimisation steps, got {steps}")
        return DataLoader(_Steps(steps), batch_size=None)
