"""The optimizers of an image optimisation: the default, the checks torch leaves to the first step, L-BFGS memory.

``model.optimizer`` is a factory (``OptimizerCallable``) called once per objective over that objective's image;
:func:`build_optimizers` calls it and refuses, in one line naming the key, the settings torch would only reject
mid-step (or never), and :func:`check_lbfgs_memory` an L-BFGS history larger than the memory available.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import LBFGS, Adam, Optimizer

from lightning_nst.core.errors import NSTError

__all__ = ["available_bytes", "build_optimizers", "check_lbfgs_memory", "default_optimizer"]

_FLOAT32_MAX = torch.finfo(torch.float32).max


def default_optimizer(params: Any) -> Optimizer:
    """Adam with learning rate 0.02, a good default for pixels in ``[0, 1]``."""
    return Adam(params, lr=0.02)


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or ``None`` where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def build_optimizers(
    factory: Callable[[Any], Optimizer], parameters: Sequence[Tensor], scaled: bool, precision: Any
) -> list[Optimizer]:
    """Call ``factory`` once per parameter; raise naming ``model.optimizer``'s key if a setting cannot work.

    Args:
        factory: ``model.optimizer``.
        parameters: One image parameter per objective.
        scaled: Whether the run scales the loss with a gradient scaler (``16-mixed``), which L-BFGS cannot use.
        precision: ``trainer.precision``, named when L-BFGS is refused for it.
    """
    optimizers = []
    for parameter in parameters:
        try:
            optimizer = factory([parameter])
        except (TypeError, ValueError) as error:  # torch's own checks, e.g. "Invalid learning rate: -1.0"
            key = "model.optimizer.init_args.lr" if "learning rate" in str(error) else "model.optimizer"
            raise NSTError(f"{key}: {error}") from None
        for group in optimizer.param_groups:
            # torch accepts lr=inf (and LBFGS any lr), which turns the image into NaN at the first step.
            lr = group.get("lr")
            if isinstance(lr, int | float) and not (math.isfinite(lr) and lr > 0):
                raise NSTError(f"model.optimizer.init_args.lr: must be a finite number > 0, got {lr}")
            # A setting beyond float32 (the image's dtype) makes torch's update raise an overflow RuntimeError.
            for name, value in group.items():
                if isinstance(value, float) and math.isfinite(value) and abs(value) > _FLOAT32_MAX:
                    raise NSTError(
                        f"model.optimizer.init_args.{name}: {value:g} is beyond float32, the image's precision "
                        f"(at most {_FLOAT32_MAX:.4g})"
                    )
            # torch only checks this inside the first step, after the setup, as a RuntimeError traceback.
            line_search = group.get("line_search_fn", None)
            if isinstance(optimizer, LBFGS) and line_search not in (None, "strong_wolfe"):
                raise NSTError(
                    f"model.optimizer.init_args.line_search_fn: must be strong_wolfe or null, got {line_search!r}"
                )
        if isinstance(optimizer, LBFGS) and scaled:
            # Lightning raises "AMP and the LBFGS optimizer are not compatible" only at the first step.
            raise NSTError(
                f"trainer.precision: {precision} scales the loss with a gradient scaler, which "
                "L-BFGS cannot use; choose bf16-mixed or 32-true, or model.optimizer Adam"
            )
        optimizers.append(optimizer)
    return optimizers


def check_lbfgs_memory(optimizers: Sequence[Optimizer], largest_numel: Callable[[Tensor], int]) -> None:
    """Refuse an L-BFGS history larger than the memory available, before the first step.

    The history holds whole images, tiled or not, at their largest size (``largest_numel`` of a parameter: the
    last scale's for a coarse-to-fine run, as L-BFGS restarts at each scale with a new history).
    """
    history = sum(
        2 * group["history_size"] * largest_numel(group["params"][0])
        for optimizer in optimizers
        if isinstance(optimizer, LBFGS)
        for group in optimizer.param_groups
    )
    available = available_bytes()
    if history and available is not None and 4 * history > available:
        sizes = sorted(
            {group["history_size"] for o in optimizers for group in o.param_groups if "history_size" in group}
        )
        raise NSTError(
            f"model.optimizer: L-BFGS with history_size {', '.join(map(str, sizes))} keeps 2 x history_size "
            f"image-sized tensors, {4 * history / 1e9:.3g} GB at the largest size, more than the "
            f"{available / 1e9:.3g} GB of memory available; use Adam (as configs/large_print.yaml does) or a "
            "smaller history_size"
        )
