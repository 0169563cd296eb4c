"""The L-BFGS safeguard: true curvature pairs after clipping, and a step that lands far above the best undone.

The configs' L-BFGS (Gatys et al.'s and the PyTorch tutorial's: learning rate 1, one iteration per step, no line
search) takes the full quasi-Newton step every time, and torch's L-BFGS knows nothing of the clipping to ``[0, 1]``
that follows it. Two things follow, and :class:`LBFGSSafeguard` with :func:`record_actual_step` mends both without
an extra VGG pass on a normal step (the loss it judges by is the one the step's closure computed anyway):

- **True pairs.** L-BFGS pairs the next gradient change with the step it believes it took; where clipping shortened
  that step, the pair claims a long step with little gradient change, i.e. almost no curvature, and the next
  directions become huge. That is where plain L-BFGS's jumps came from (a reconstruction rising to 1,950x its best,
  ``docs/benchmarks.md``). :func:`record_actual_step` makes the recorded step the one actually taken.
- **A rejected step.** When the image a step starts from has a loss above ``factor`` times the objective's best so
  far, the objective goes back to the last image it accepted; the curvature pair formed across the rejected step is
  dropped, so the next step goes the same way only shorter: a trust radius caps it at half the rejected step, and the
  radius doubles after each accepted step (a backtracking line search, paid only when a step fails).

A rejection costs the VGG pass that measured the rejected image and one more at the image gone back to. A rejected
step reports the loss of the image the objective went back to; the rejections are counted as ``<objective>/rejected``.
Only L-BFGS with one iteration per step and no line search is guarded: ``strong_wolfe`` already refuses a rise, and
the iterations inside one step cannot be told apart. torch's L-BFGS has no such option, hence this module.

``model.lbfgs_safeguard: auto`` (the default) guards, at factor :data:`AUTO_FACTOR`, the objectives that reconstruct
a block-1 layer (content terms only, every layer conv1_1..relu1_2), and leaves every other objective plain. Those
layers are matched almost exactly from an image inside ``[0, 1]``, and there the clipped false pairs only make plain
L-BFGS jump (437x its best on conv1_2 at 64 px, 2,000x on conv1_1) and end higher; on deeper layers, textures and
style transfer the false pairs push pixels onto the bounds, where those optima lie, and plain L-BFGS ended lower
(conv2_1 4x lower; ``docs/benchmarks.md``, "L-BFGS that keeps its progress"). Their default precision is float32
too (:mod:`lightning_nst.cli.precision`), which the safeguard needs there: under bf16 they stop at its rounding floor,
where guarded steps end no lower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import LBFGS, Optimizer

from lightning_nst.core.errors import NSTError
from lightning_nst.core.layers import shallow_reconstruction

__all__ = ["AUTO_FACTOR", "LBFGSSafeguard", "check_safeguard_factor", "guarded", "safeguard_factors"]

AUTO_FACTOR = 2.0


def check_safeguard_factor(factor: Any) -> None:
    """Refuse a ``model.lbfgs_safeguard`` that is neither ``"auto"``, ``None`` nor a finite number of at least 1."""
    if factor is None or factor == "auto":
        return
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not (math.isfinite(factor) and factor >= 1):
        raise NSTError(
            "model.lbfgs_safeguard: must be auto, a finite number >= 1 (the factor over an objective's best loss "
            f"above which an L-BFGS step is undone) or null for plain L-BFGS, got {factor!r}"
        )


def safeguard_factors(factor: float | str | None, objectives: Sequence[Any]) -> list[float | None]:
    """Each objective's factor (``None``: plain L-BFGS) for a ``model.lbfgs_safeguard`` setting.

    A number guards every objective, ``None`` none; ``"auto"`` guards the block-1 reconstructions
    (:func:`~lightning_nst.core.layers.shallow_reconstruction`) at :data:`AUTO_FACTOR`.
    """
    if factor == "auto":
        return [AUTO_FACTOR if shallow_reconstruction(objective) else None for objective in objectives]
    return [None if factor is None else float(factor)] * len(objectives)


def guarded(optimizer: Optimizer) -> bool:
    """Whether the safeguard applies: L-BFGS with one iteration per step and no line search."""
    if not isinstance(optimizer, LBFGS):
        return False
    group = optimizer.param_groups[0]
    return group["max_iter"] == 1 and group["line_search_fn"] is None


class LBFGSSafeguard:
    """Per objective: the last accepted parameter and its loss terms, the trust radius, the rejections.

    Args:
        factors: Per objective, the factor over its best loss so far above which a step's image is rejected, or
            ``None`` to leave that objective's L-BFGS plain.
    """

    def __init__(self, factors: Sequence[float | None]) -> None:
        self.factors = list(factors)
        count = len(self.factors)
        self.accepted: list[Tensor | None] = [None] * count
        self.accepted_terms: list[dict[str, float] | None] = [None] * count
        self.radius: list[float] = [math.inf] * count
        self.rejected: list[int] = [0] * count
        self._history: dict[str, Any] | None = None

    def guards(self, index: int) -> bool:
        """Whether objective ``index`` is guarded."""
        return self.factors[index] is not None

    def reset(self) -> None:
        """Forget the accepted images and radii (a new scale: new sizes, new L-BFGS); keep the counts."""
        count = len(self.rejected)
        self.accepted, self.accepted_terms, self.radius = [None] * count, [None] * count, [math.inf] * count

    def before_step(self, optimizer: LBFGS) -> None:
        """Note L-BFGS's history before a step (references, no copies), for :meth:`after_step` to restore."""
        state = optimizer.state[optimizer.param_groups[0]["params"][0]]
        keys = ("old_dirs", "old_stps", "ro")
        self._history = {key: list(state[key]) for key in keys} | {"H_diag": state["H_diag"]} if "ro" in state else None

    @torch.no_grad()
    def after_step(
        self,
        index: int,
        optimizer: LBFGS,
        parameter: Tensor,
        before: Tensor,
        terms: dict[str, float],
        best_loss: float,
    ) -> dict[str, float]:
        """Judge the image the step started from (``before``, with loss ``terms``); return the terms to report.

        ``parameter`` holds where L-BFGS stepped to. Accepted: the step is capped at the trust radius, and ``before``
        becomes the last accepted image. Rejected: ``parameter`` goes back to the last accepted image and the
        radius shrinks to half the rejected step; the returned terms are the accepted image's.
        """
        accepted = self.accepted[index]
        state = optimizer.state[optimizer.param_groups[0]["params"][0]]
        factor = self.factors[index]
        assert factor is not None, "after_step of an objective the safeguard does not guard"
        if accepted is not None and terms["total"] > factor * best_loss:
            self.rejected[index] += 1
            self.radius[index] = 0.5 * float(torch.linalg.vector_norm(before - accepted))
            parameter.copy_(accepted)
            # L-BFGS pairs its next gradient with the step it took from `before`; from the accepted image that pair
            # would be false, so the step is zeroed (torch then skips the pair: its y.s is 0).
            state["t"] = 0.0
            # The curvature pair L-BFGS just formed spans the rejected step: dropped, so that the next step from the
            # accepted image goes the same way as the rejected one, only shorter (a backtracking line search).
            if self._history is not None:
                state.update(self._history)
            assert self.accepted_terms[index] is not None
            return dict(self.accepted_terms[index])
        self.accepted[index] = before
        self.accepted_terms[index] = dict(terms)
        radius = self.radius[index]
        if math.isfinite(radius):
            step = parameter - before
            length = float(torch.linalg.vector_norm(step))
            if length > radius:
                shrink = radius / length
                parameter.copy_(before + shrink * step)
                state["t"] = state["t"] * shrink  # the pair L-BFGS forms next is then the step actually taken
            self.radius[index] = 2 * radius
        return terms

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps for an exact resume."""
        return {
            "factors": list(self.factors),
            "accepted": [None if a is None else a.detach().cpu() for a in self.accepted],
            "accepted_terms": list(self.accepted_terms),
            "radius": list(self.radius),
            "rejected": list(self.rejected),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state_dict`'s record (a checkpoint from before the safeguard has none: start fresh)."""
        self.accepted = [None if a is None else a.to(device) for a in state["accepted"]]
        self.accepted_terms = list(state["accepted_terms"])
        self.radius = list(state["radius"])
        self.rejected = list(state["rejected"])


@torch.no_grad()
def record_actual_step(optimizer: LBFGS, parameter: Tensor, start: Tensor) -> None:
    """Make L-BFGS's record of its last step the step actually taken from ``start`` (after a projection).

    L-BFGS pairs the next gradient change with the step it believes it took (its direction times its step length);
    where the image was then clipped to ``[0, 1]`` that pair is false, and false pairs are what make it jump.
    """
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    t = state.get("t")
    if t is None or float(t) == 0.0 or "d" not in state:
        return
    state["d"] = (parameter.detach() - start).reshape(-1).div(t)
