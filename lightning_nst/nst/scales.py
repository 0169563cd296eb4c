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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import interpolate
from torch.optim import LBFGS, Optimizer

from lightning_nst.core.errors import NSTError

__all__ = [
    "CoarseToFine",
    "IterateAverage",
    "carry_optimizer_states",
    "Scale",
    "check_schedule",
    "plan_scales",
    "resize_image",
    "resize_optimizer_state",
]


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


ScaleInputs = tuple[Tensor | None, list[Tensor], list[Tensor] | None, list[Tensor | None] | None]
"""The target images of a scale: content, style images, masks and style masks (``None`` where not given)."""


class CoarseToFine:
    """The driver of a run's scales (``model.scales``, ``model.scale_steps``) and its iterate average (``avg_decay``).

    It plans the scales once the output's shape is known (:meth:`plan`), gives each scale's target images
    (:meth:`inputs`), says when the next scale is due (:meth:`due`), moves the images, optimizer states and average
    to a new scale (:meth:`resize`), and records each scale's steps and seconds (:meth:`records`) for
    ``summary.json``. Without ``scales`` the run has one scale and an empty :attr:`schedule`; without ``avg_decay``
    no :attr:`average`.

    Args:
        scales: ``model.scales``, checked by :func:`check_schedule`.
        scale_steps: ``model.scale_steps``.
        avg_decay: ``model.avg_decay``.

    Attributes:
        average: The iterate average of each objective's decoded image, once training started, with ``avg_decay``.
    """

    def __init__(self, scales: list[int] | None, scale_steps: list[int] | None, avg_decay: float | None) -> None:
        self.scales, self.scale_steps, self.avg_decay = scales, scale_steps, avg_decay
        self.average: list[IterateAverage] | None = None
        self.schedule: list[Scale] = []
        self.scale = 0  # index of the current scale
        self._full: ScaleInputs | None = None  # the target images at the output size
        self._style_size_fixed = False
        self._style_sources: list[str] = []
        self._min_side = 1
        self._records: list[dict[str, Any]] = []
        self._clock = 0.0
        self._carried = 0.0  # seconds a resumed scale had already run

    def plan(
        self,
        shape: tuple[int, int],
        max_steps: int,
        min_side: int,
        inputs: ScaleInputs,
        style_size_fixed: bool,
        style_sources: list[str],
    ) -> None:
        """Plan the scales for an output of ``shape`` whose target images at that size are ``inputs``."""
        self.schedule = plan_scales(self.scales or [], self.scale_steps, shape, max_steps, min_side)
        self._full, self._min_side = inputs, min_side
        self._style_size_fixed, self._style_sources = style_size_fixed, style_sources

    def first_image(self, start: Tensor, noise_seed: int | None) -> Tensor:
        """The start image at the first scale's size: new seeded noise (``noise_seed``), or ``start`` resized."""
        first = self.schedule[0]
        if noise_seed is not None:
            generator = torch.Generator().manual_seed(noise_seed)
            return torch.rand(1, 3, first.height, first.width, generator=generator)
        return resize_image(start, (first.height, first.width))

    def inputs(self, index: int) -> ScaleInputs:
        """Content, style images and masks at scale ``index``'s size (style in proportion unless its size is fixed)."""
        assert self._full is not None
        content, styles, masks, style_masks = self._full
        scale = self.schedule[index]
        shape = (scale.height, scale.width)
        factor = scale.long_edge / self.schedule[-1].long_edge
        content = resize_image(content, shape) if content is not None else None
        masks = [resize_image(mask, shape) for mask in masks] if masks is not None else None
        if not self._style_size_fixed:
            shapes = [(max(1, round(s.shape[-2] * factor)), max(1, round(s.shape[-1] * factor))) for s in styles]
            for (height, width), source in zip(shapes, self._style_sources, strict=True):
                if min(height, width) < self._min_side:
                    raise NSTError(
                        f"model.scales: at {scale.long_edge} px the style image {source} shrinks to {width}x{height}, "
                        f"below the {self._min_side} px the deepest layer needs; start larger or set data.style_size"
                    )
            styles = [resize_image(style, shape) for style, shape in zip(styles, shapes, strict=True)]
            if style_masks is not None:
                style_masks = [
                    resize_image(mask, shape) if mask is not None else None
                    for mask, shape in zip(style_masks, shapes, strict=True)
                ]
        return content, list(styles), masks, style_masks

    def start_average(self, images: Sequence[Tensor]) -> None:
        """Start averaging at the decoded ``images`` (one per objective), with ``avg_decay``."""
        self.average = None if self.avg_decay is None else [IterateAverage(image, self.avg_decay) for image in images]

    def update_average(self, images: Sequence[Tensor]) -> None:
        """Add the decoded ``images`` of a step to the average, if one is kept."""
        for average, image in zip(self.average or [], images, strict=False):
            average.update(image)

    def resize(self, images: Any, parameterization: Any, trainer: Any) -> None:
        """Move a run to the current scale: its images resized, optimizers rebuilt with resized moments, new average.

        Each image starts from the previous scale's image upsampled (its average, with ``avg_decay``). The trainer's
        strategy rebuilds the optimizers from the module's ``configure_optimizers`` (``Strategy.setup_optimizers``).
        Adam's moments are carried (resized) for ``parameterization: pixels`` only; otherwise every optimizer
        restarts (:func:`carry_optimizer_states`).

        Args:
            images: The module's ``nn.ParameterList`` of raw parameters, replaced in place.
            parameterization: Decodes and encodes them (:mod:`lightning_nst.nst.parameterization`).
            trainer: The Lightning trainer.
        """
        scale = self.schedule[self.scale]
        shape = (scale.height, scale.width)
        states = [optimizer.state_dict() for optimizer in trainer.optimizers]
        old_shape = images[0].shape
        for i, parameter in enumerate(images):
            source = self.average[i].get() if self.average is not None else parameterization.decode(parameter.detach())
            images[i] = torch.nn.Parameter(parameterization.encode(resize_image(source, shape)).contiguous())
        trainer.strategy.setup_optimizers(trainer)
        if parameterization.name == "pixels":
            carry_optimizer_states(trainer.optimizers, states, old_shape, shape)
        self.start_average([parameterization.decode(parameter.detach()) for parameter in images])

    def largest_numel(self, parameter: Tensor, image_size: Any) -> int:
        """Elements of ``parameter`` at the last scale's size (``image_size``: its image's ``(H, W)`` by its shape)."""
        if not self.schedule:
            return parameter.numel()
        height, width = image_size(parameter.shape)
        last = self.schedule[-1]
        return math.ceil(parameter.numel() * last.height * last.width / (height * width))

    def due(self, step: int, all_stopped: bool) -> int | None:
        """The next scale's index when it is due at ``step``: its planned start, or all objectives stopped."""
        following = self.scale + 1
        if self.scales is None or following >= len(self.schedule):
            return None
        return following if step >= self.schedule[following].start or all_stopped else None

    def start_clock(self) -> None:
        """The current scale's seconds count from now (plus those a resumed scale had already run)."""
        self._clock = time.perf_counter()

    def enter(self, index: int, step: int) -> Scale:
        """Record the scale that ends at ``step`` and make scale ``index`` the current one."""
        self._records.append(self._record(step))
        self._carried = 0.0
        self.scale = index
        return self.schedule[index]

    def _record(self, step: int) -> dict[str, Any]:
        scale = self.schedule[self.scale]
        started = self._records[-1]["end_step"] if self._records else 0
        return {
            "long_edge": scale.long_edge,
            "size": [scale.height, scale.width],
            "steps": step - started,
            "end_step": step,
            "seconds": round(time.perf_counter() - self._clock + self._carried, 4),
        }

    def records(self, step: int) -> list[dict[str, Any]] | None:
        """Each scale run so far: ``long_edge``, ``size`` ``[H, W]``, ``steps``, ``end_step`` and ``seconds``."""
        if self.scales is None or not self.schedule:
            return None
        return [*self._records, self._record(step)]

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the schedule and the iterate average, or ``None`` with one scale."""
        if not self.schedule:
            return None
        return {
            "plan": [scale.as_dict() for scale in self.schedule],
            "scale": self.scale,
            "records": self._records,
            "carried_s": time.perf_counter() - self._clock + self._carried,
            "average": [item.state_dict() for item in self.average] if self.average is not None else None,
        }

    def restore(self, saved: dict[str, Any] | None, where: str, images: Any) -> bool:
        """Continue at the checkpoint's scale; return whether there is one. Refuses another schedule's checkpoint.

        The module's ``images`` (an ``nn.ParameterList``) get that scale's shape, for Lightning to load them.
        """
        if saved is None and not self.schedule:
            return False
        if saved is None or not self.schedule:
            made = "without" if saved is None else "with"
            raise NSTError(
                f"{where} was made {made} model.scales, this run is not; a resumed run cannot change the scales "
                "(start a new run without --ckpt_path, or give the checkpoint's model.scales)"
            )
        plan = [scale.as_dict() for scale in self.schedule]
        if saved["plan"] != plan:
            describe = ", ".join(f"{s['long_edge']} px x {s['steps']}" for s in saved["plan"])
            raise NSTError(
                f"{where} was made with the scales {describe} (model.scales, model.scale_steps, trainer.max_steps), "
                "this run plans others; a resumed run cannot change them (give the checkpoint's values)"
            )
        self.scale = int(saved["scale"])
        self._records = list(saved["records"])
        self._carried = float(saved["carried_s"])
        scale = self.schedule[self.scale]
        for i, parameter in enumerate(images):
            images[i] = torch.nn.Parameter(parameter.new_zeros(1, 3, scale.height, scale.width))
        if saved.get("average") is not None:
            self.average = [IterateAverage.from_state(average, images[0].device) for average in saved["average"]]
        return True


def carry_optimizer_states(
    optimizers: Sequence[Optimizer], states: Sequence[dict[str, Any]], old_shape: torch.Size, shape: tuple[int, int]
) -> None:
    """Load each optimizer's previous state resized to the new scale's ``shape``; L-BFGS restarts instead.

    L-BFGS's curvature pairs belong to the old size. Only for ``parameterization: pixels``: a Laplacian pyramid's
    or a spectrum's moments resized as images would mean nothing, so those restart too (the caller's choice).
    """
    for optimizer, state in zip(optimizers, states, strict=True):
        if not isinstance(optimizer, LBFGS):
            optimizer.load_state_dict(resize_optimizer_state(state, old_shape, shape))
