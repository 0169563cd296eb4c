"""DataModules: the images an optimisation targets."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torchvision.transforms.v2.functional as TF
from jsonargparse.typing import PositiveInt
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_nst.core.color import luminance
from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import source_digest
from lightning_nst.core.images import load_image, read_image
from lightning_nst.core.losses import check_style_weights

ASPECT_TOLERANCE = 0.02
"""Largest relative difference of aspect ratio between a mask and the image it masks."""


class _Steps(Dataset[Tensor]):
    """One dummy item per optimisation step: the images live in the module, the loop only counts."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> Tensor:
        return torch.tensor(index)


class _StepLoader(DataLoader[Tensor]):
    """The loader of :class:`_Steps`, resumable in Lightning's sense (``state_dict``/``load_state_dict``).

    Its items carry nothing (the module counts with ``global_step``), so a resumed run may iterate it from the start
    and there is no position to keep; Lightning would otherwise warn on every resume that the run may not be exact.
    """

    def state_dict(self) -> dict[str, Any]:
        """Nothing: every item is the same."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore."""


class ImageTargets(L.LightningDataModule):
    """Content and style images for reconstruction, texture synthesis and style transfer.

    Images are loaded once in :meth:`setup`. The train loader yields one dummy item per step, ``trainer.max_steps``
    in all, so the progress bar knows the total.

    Args:
        content: Content image: a path, ``sample:NAME`` or ``skimage:NAME``. Needed by objectives with content layers.
        style: Style or texture images (one may be given alone); several are blended (``style_weights``) or, with
            ``masks``, each applies to its own region.
        size: Longer edge of the content image in pixels; ``None`` keeps the file's size.
        style_size: Longer edge of the style images; defaults to ``size``. Controls the scale of the style.
        style_weights: Blend weight of each style image (normalised to sum 1; ``None``: equal), see
            :class:`lightning_nst.core.losses.StyleLoss` for how each statistic is blended.
        masks: One mask image per style image, the region of the result that style applies to (white = this style),
            read as greyscale in ``[0, 1]`` and resized to the result's size. Where masks overlap (sum above 1) they
            are divided by their sum; pixels no mask covers get no style loss (a warning says how many).
        style_masks: Optional region of each style image to take its statistics from (``null`` entries: all of it).

    Attributes:
        masks: The loaded masks, each ``(1, 1, H, W)`` at the result's size, normalised as above.
        style_masks: The loaded style masks, each ``(1, 1, h, w)`` at its style image's size, or ``None``.
    """

    def __init__(
        self,
        content: str | os.PathLike[str] | None = None,
        style: list[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        size: PositiveInt | None = 256,
        style_size: PositiveInt | None = None,
        style_weights: list[float] | None = None,
        masks: list[str | os.PathLike[str]] | None = None,
        # Not `str | os.PathLike[str] | None`: jsonargparse would read a YAML null in the list as the path "None".
        style_masks: list[str | None] | None = None,
    ) -> None:
        super().__init__()
        style = [style] if isinstance(style, str | os.PathLike) else style
        if style is not None and len(style) == 0:
            raise NSTError("data.style: the list of style images is empty")
        count = len(style or [])
        if style_weights is not None:
            style_weights = check_style_weights(style_weights, count, "data.style_weights")
        for key, given in (("data.masks", masks), ("data.style_masks", style_masks)):
            if given is not None and len(given) != count:
                raise NSTError(f"{key}: {len(given)} masks for {count} data.style images; give one per style image")
        if masks is not None and style_weights is not None:
            raise NSTError("data.style_weights: cannot be combined with data.masks (each region has its one style)")
        if style_masks is not None and masks is None and count > 1:
            raise NSTError("data.style_masks: with several style images, give data.masks too (which style goes where)")
        self.content_source = content
        self.style_sources = list(style or [])
        # Plain ints: jsonargparse passes PositiveInt instances, which checkpoints could not load with weights_only.
        self.size = int(size) if size is not None else None
        self.style_size = int(style_size) if style_size is not None else self.size
        self.style_size_fixed = style_size is not None  # coarse-to-fine keeps it, else scales the style
        self.style_weights = style_weights
        self.mask_sources = list(masks) if masks is not None else None
        self.style_mask_sources = list(style_masks) if style_masks is not None else None
        self.content: Tensor | None = None
        self.style: list[Tensor] = []
        self.masks: list[Tensor] | None = None
        self.style_masks: list[Tensor | None] | None = None

    def setup(self, stage: str) -> None:
        """Load the images and masks (once)."""
        if self.content is None and self.content_source is not None:
            self.content = load_image(self.content_source, self.size, key="data.content")
        if not self.style and self.style_sources:
            self.style = [
                load_image(source, self.style_size, key=f"data.style[{index}]")
                for index, source in enumerate(self.style_sources)
            ]
        if self.masks is None and self.mask_sources is not None:
            shape = self.output_shape
            masks = [load_mask(s, shape, f"data.masks[{i}]") for i, s in enumerate(self.mask_sources)]
            self.masks = _normalise_masks(masks)
        if self.style_masks is None and self.style_mask_sources is not None:
            self.style_masks = [
                None if source is None else load_mask(source, image.shape[-2:], f"data.style_masks[{index}]")
                for index, (source, image) in enumerate(zip(self.style_mask_sources, self.style, strict=True))
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
                size = "data.style_size" if self.style_size_fixed and key != "data.content" else "data.size"
                raise NSTError(
                    f"{key}: {source} is {width}x{height} px after resizing, but the deepest layer needs at least "
                    f"{min_side} px per side; use a larger image or {size}"
                )

    def check_objectives(self, objectives: Sequence[Any]) -> None:
        """Raise naming ``model.objectives[i]`` if an objective needs an image this data module was not given."""
        for index, objective in enumerate(objectives):
            if objective.content_layers and self.content_source is None:
                raise NSTError(f"model.objectives[{index}] ({objective.name}) has content layers: set data.content")
            if objective.style_layers and not self.style_sources:
                raise NSTError(f"model.objectives[{index}] ({objective.name}) has style layers: set data.style")
            if objective.color != "keep" and self.content_source is None:
                raise NSTError(f"model.objectives[{index}].color: {objective.color!r} needs data.content")

    def digests(self) -> dict[str, Any]:
        """Content digests of the content, style and mask images, and the blend weights, by config key.

        What the optimised image depends on besides the model's options: checkpoints and ``summary.json`` record
        it, and a resumed run refuses to continue if it changed (:func:`lightning_nst.core.files.source_digest`).
        """
        inputs: dict[str, Any] = {
            "data.content": source_digest(self.content_source) if self.content_source is not None else None,
            "data.style": [source_digest(source) for source in self.style_sources],
        }
        for key, sources in (("data.masks", self.mask_sources), ("data.style_masks", self.style_mask_sources)):
            if sources is not None:
                inputs[key] = [source_digest(source) if source is not None else None for source in sources]
        if self.style_weights is not None:
            inputs["data.style_weights"] = list(self.style_weights)
        return inputs

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
        return _StepLoader(_Steps(steps), batch_size=None)


def initial_image(init: str, seed: int, shape: tuple[int, int], content: Tensor | None) -> Tensor:
    """The image an optimisation starts from (``model.init``): seeded noise, the content image, or an image file.

    Args:
        init: ``"noise"``, ``"content"`` or an image path/sample, resized to ``shape``.
        seed: ``model.init_seed``, the noise's.
        shape: ``(H, W)`` of the optimised image.
        content: The content image, for ``"content"``.
    """
    height, width = shape
    if init == "noise":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(1, 3, height, width, generator=generator)
    if init == "content":
        if content is None:
            raise NSTError("model.init: 'content' needs data.content")
        return content
    start = load_image(init, max(height, width), key="model.init")
    return torch.nn.functional.interpolate(start, size=(height, width), mode="bilinear", antialias=True)


def load_mask(source: str | os.PathLike[str], shape: tuple[int, int] | torch.Size, key: str) -> Tensor:
    """A mask image as ``(1, 1, H, W)`` greyscale in ``[0, 1]`` at ``shape``; refused if its aspect ratio differs."""
    image = read_image(source, key=key, max_side=max(shape))
    height, width = int(shape[0]), int(shape[1])
    aspect, expected = image.shape[-1] / image.shape[-2], width / height
    if abs(aspect / expected - 1) > ASPECT_TOLERANCE:
        raise NSTError(
            f"{key}: {source} is {image.shape[-1]}x{image.shape[-2]} px, another aspect ratio than the "
            f"{width}x{height} image it masks; give a mask of that shape"
        )
    mask = TF.resize(luminance(image), [height, width], antialias=True).clamp(0, 1)
    if float(mask.max()) <= 0:
        raise NSTError(f"{key}: {source} is all black, so that style would apply nowhere")
    return mask


def _normalise_masks(masks: list[Tensor]) -> list[Tensor]:
    """Divide overlapping masks by their sum; warn about pixels no mask covers (they get no style loss)."""
    total = torch.stack(masks).sum(dim=0)
    masks = [mask / total.clamp_min(1.0) for mask in masks]
    uncovered = int((total <= 1e-3).sum())
    if uncovered:
        warnings.warn(
            f"data.masks: {uncovered} of {total.numel()} pixels are in no mask and get no style loss", stacklevel=2
        )
    return masks
