"""Coarse-to-fine optimisation: the schedule of scales, resizing an image and Adam's moments, and iterate averaging.

The scheme follows Katherine Crowson's ``style-transfer-pytorch`` (``style_transfer.py``: ``scale_adam``, ``EMA`` and
the loop over scales): each scale starts from the previous scale's image upsampled bicubically, Adam's moments are
resized to the new image (``exp_avg`` bicubic, ``exp_avg_sq`` bilinear and kept non-negative, ``step`` kept) and
L-BFGS restarts. Departures: the scales are given as a list of long edges (crowsonkb derives them from a start size and
a factor √2), the steps per scale are given or split evenly over ``trainer.max_steps`` (crowsonkb gives the first scale
its own count), a scale whose optimizers all stopped hands its remaining steps to the next one, Adam's moments are
also rescaled to the new size's gradients (:func:`resize_optimizer_state`), and state tensors of other optimizers
that have the image's shape (e.g. SGD's ``momentum_buffer``) are resized as ``exp_avg`` is.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import interpolate

from lightning_nst.core.errors import NSTError

__all__ = ["IterateAverage", "Scale", "check_schedule", "plan_scales", "resize_image", "resize_optimizer_state"]


@dataclass(frozen=True)
class Scale:
    """One scale of a coarse-to-fine run.

    Attributes:
        long_edge: The image's longer edge in pixels.
        height: The image's height.
        width: The image's width.
        start: Global step at which the scale starts (as planned).
        steps: Planned steps at this scale.
    """

    long_edge: int
    height: int
    width: int
    start: int
    steps: int

    def as_dict(self) -> dict[str, int]:
        """The scale as plain data (checkpoints, ``summary.json``)."""
        return asdict(self)


def check_schedule(scales: list[int] | None, scale_steps: list[int] | None, avg_decay: float | None) -> None:
    """Refuse, naming the key, values that are wrong whatever the data: before any image is loaded."""
    if scales is not None:
        if not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
            raise NSTError(
                f"model.scales: give a list of long-edge sizes in pixels, each a whole number >= 1, got {scales}"
            )
        if any(b <= a for a, b in zip(scales, scales[1:], strict=False)):
            raise NSTError(
                f"model.scales: sizes must increase from coarse to fine (the last is the output), got {scales}"
            )
    if scale_steps is not None:
        if scales is None:
            raise NSTError("model.scale_steps: needs model.scales (the sizes the steps are for)")
        if len(scale_steps) != len(scales):
            raise NSTError(f"model.scale_steps: {len(scale_steps)} step counts for {len(scales)} model.scales")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scale_steps):
            raise NSTError(f"model.scale_steps: each must be a whole number >= 1, got {scale_steps}")
    if avg_decay is not None and not (isinstance(avg_decay, int | float) and 0 < avg_decay < 1):
        raise NSTError(f"model.avg_decay: must be a number between 0 and 1 (exclusive), e.g. 0.99, got {avg_decay!r}")


def scale_shape(shape: tuple[int, int], long_edge: int) -> tuple[int, int]:
    """``(H, W)`` of an image of ``shape`` resized so its longer edge is ``long_edge`` (aspect kept, rounded)."""
    height, width = shape
    factor = long_edge / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def plan_scales(
    scales: list[int], scale_steps: list[int] | None, shape: tuple[int, int], max_steps: int, min_side: int
) -> list[Scale]:
    """The scales of a run whose output has ``shape``; raises naming the key if they do not fit the data or steps.

    Args:
        scales: Long edges, ascending; the last must be the output's long edge.
        scale_steps: Steps per scale (their sum must be ``max_steps``); ``None``: ``max_steps`` split evenly, the
            remainder going to the finest scales.
        shape: ``(H, W)`` of the output image.
        max_steps: ``trainer.max_steps``.
        min_side: Smallest side the deepest VGG layer accepts.
    """
    if scales[-1] != max(shape):
        raise NSTError(
            f"model.scales: the last size is the output's long edge, {max(shape)} px here (data.size or the image's "
            f"own size), got {scales[-1]}"
        )
    if scale_steps is None:
        if max_steps < len(scales):
            raise NSTError(f"trainer.max_steps: {max_steps} steps cannot cover the {len(scales)} model.scales")
        base, extra = divmod(max_steps, len(scales))
        scale_steps = [base + (1 if index >= len(scales) - extra else 0) for index in range(len(scales))]
    elif sum(scale_steps) != max_steps:
        raise NSTError(f"model.scale_steps: they sum to {sum(scale_steps)}, but trainer.max_steps is {max_steps}")
    plan: list[Scale] = []
    start = 0
    for long_edge, steps in zip(scales, scale_steps, strict=True):
        height, width = scale_shape(shape, long_edge) if long_edge != max(shape) else shape
        if min(height, width) < min_side:
            raise NSTError(
                f"model.scales: {long_edge} px makes a {width}x{height} image, but the deepest layer needs at least "
                f"{min_side} px per side; start at a larger size"
            )
        plan.append(Scale(long_edge, height, width, start, steps))
        start += steps
    return plan


def resize_image(image: Tensor, shape: tuple[int, int]) -> Tensor:
    """``image`` in ``[0, 1]`` resized to ``shape``: bicubic up (as crowsonkb), antialiased down; clamped."""
    if tuple(image.shape[-2:]) == tuple(shape):
        return image
    down = shape[0] < image.shape[-2]
    return interpolate(image, size=shape, mode="bicubic", antialias=down, align_corners=False).clamp(0, 1)


def resize_optimizer_state(state: dict[str, Any], old_shape: torch.Size, shape: tuple[int, int]) -> dict[str, Any]:
    """A copy of an optimizer's ``state_dict`` with every state tensor shaped like the image resized to ``shape``.

    As crowsonkb's ``scale_adam``: ``exp_avg`` bicubic; ``exp_avg_sq`` and ``max_exp_avg_sq`` bilinear, then clamped
    at 0 (a second moment cannot be negative); ``step`` and scalars kept, so the bias correction goes on.

    Unlike ``scale_adam``, the moments are also scaled to the new size's gradients: the losses are means over
    positions, so a pixel's gradient shrinks with the pixel count (``ratio`` = old / new count); ``exp_avg`` is
    multiplied by ``ratio`` and the second moments by ``ratio**2``, which keeps the step ``exp_avg / sqrt(exp_avg_sq)``
    the moments imply. Without it the carried second moment is ``1 / ratio**2`` times too large and, with torch's
    default ``beta2 = 0.999`` (crowsonkb uses 0.99), shrinks Adam's steps for hundreds of steps: at 128 px with the
    real weights, 45+45 Adam steps over 64 and 128 px ended at a loss of 99 unscaled and 64 scaled (restarting Adam
    at each scale instead: 53; one scale of 90 steps: 40).
    """
    state = copy.deepcopy(state)
    ratio = old_shape[-2] * old_shape[-1] / (shape[0] * shape[1])
    for slots in state["state"].values():
        for name, value in slots.items():
            if isinstance(value, Tensor) and value.dim() == 4 and value.shape == old_shape:
                if "sq" in name:
                    resized = interpolate(value, size=shape, mode="bilinear", align_corners=False).clamp_min(0)
                    slots[name] = resized * ratio**2
                else:
                    slots[name] = interpolate(value, size=shape, mode="bicubic", align_corners=False) * ratio
    return state


class IterateAverage:
    """A bias-corrected exponential moving average of iterates, as crowsonkb's ``EMA`` (Kingma and Ba's correction).

    Args:
        image: The first iterate.
        decay: Weight of the past, e.g. ``0.99``.
    """

    def __init__(self, image: Tensor, decay: float) -> None:
        self.decay = decay
        self.value = torch.zeros_like(image)
        self.accum = 1.0
        self.update(image)

    def update(self, image: Tensor) -> None:
        """Add an iterate."""
        self.accum *= self.decay
        self.value.mul_(self.decay).add_(image.detach(), alpha=1 - self.decay)

    def get(self) -> Tensor:
        """The average so far."""
        return self.value / (1 - self.accum)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps."""
        return {"value": self.value.detach().cpu(), "accum": self.accum, "decay": self.decay}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> IterateAverage:
        """The average a checkpoint kept."""
        average = cls.__new__(cls)
        average.decay, average.accum = float(state["decay"]), float(state["accum"])
        average.value = state["value"].to(device)
        if not math.isfinite(average.accum):
            raise NSTError("ckpt_path: the checkpoint's iterate average is damaged")
        return average
