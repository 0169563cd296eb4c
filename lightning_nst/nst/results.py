"""What each objective ends with: the best image seen, its losses and metrics (:class:`ObjectiveResult`).

:class:`Progress` follows each objective through a fit: the loss terms of its first and latest steps, the best image
so far (lowest total loss) and the step it was seen at, its last finite image and the step its optimizer stopped.
At the end, :meth:`Progress.results` lets the last image (or the iterate average) compete with the best one and
applies the ``histogram`` colour mode's matching, which :class:`~lightning_nst.nst.writer.ImageWriter` then saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_nst.core.color import match_histograms
from lightning_nst.core.errors import NSTError
from lightning_nst.nst.objective import Objective

__all__ = ["ObjectiveResult", "Progress", "check_finite", "finite_rows"]


@dataclass
class ObjectiveResult:
    """What an objective ended with: the image to save and the numbers ``summary.json`` records about it.

    Attributes:
        image: The best image seen, ``(1, 3, H, W)`` in ``[0, 1]``.
        initial_loss: Loss terms at step 0 (empty if unknown).
        final_loss: Loss terms of ``image``.
        best_step: Step of ``image``.
        best_loss: Total loss of ``image``.
        last_loss: Total loss of the last step's image.
        stopped_at_step: Step at which the optimizer stopped moving the image, if it did.
        metrics: PSNR and SSIM against the content image, style distance against the style image(s).
    """

    image: Tensor
    initial_loss: dict[str, float]
    final_loss: dict[str, float]
    best_step: int
    best_loss: float
    last_loss: float
    stopped_at_step: int | None
    metrics: dict[str, float]


def finite_rows(images: Tensor) -> Tensor:
    """Whether each image of a ``(N, ...)`` batch holds only finite values."""
    return torch.isfinite(images.detach()).flatten(1).all(1)


def check_finite(image: Tensor, objectives: Sequence[Objective], step: int, what: str) -> None:
    """Raise instead of letting a NaN or infinite image be saved (a PNG would show it as black).

    Args:
        image: The objectives' images, ``(objectives, 3, H, W)``.
        objectives: Their objectives, named in the message.
        step: The global step, named in the message.
        what: What therefore did not happen, e.g. ``"no result was saved"``; the message says it.
    """
    finite = finite_rows(image).tolist()
    if not all(finite):
        names = ", ".join(o.name for o, ok in zip(objectives, finite, strict=True) if not ok)
        raise NSTError(
            f"step {step}: the image of objective {names} holds non-finite values, so {what}; "
            f"lower the learning rate (model.optimizer) or the weights (model.objectives)"
        )


Loss = Callable[[int, Tensor], dict[str, Tensor]]


class Progress:
    """Each objective's losses, best image and stop so far; what a checkpoint keeps of them.

    Attributes:
        best_images: The best image of each objective, ``(objectives, 3, H, W)``, once training started.
        best_loss: Each objective's best total loss.
        best_step: The step of each best image.
        stopped_at: The step each objective's optimizer stopped moving its image, or ``None``.
        last_good: The last finite image of each objective, ``(objectives, 3, H, W)``, once training started.
        has_good: Whether each objective's image was ever finite.
        initial: Each objective's loss terms at step 0, by name.
        current: Each objective's loss terms at the latest step, by name.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.best_images: Tensor | None = None
        self.best_loss: list[float] = []
        self.best_step: list[int] = []
        self.stopped_at: list[int | None] = []
        self.last_good: Tensor | None = None
        self.has_good: list[bool] = []
        self.initial: dict[str, dict[str, float]] | None = None
        self.current: dict[str, dict[str, float]] = {}

    def start_best(self, image: Tensor) -> None:
        """No best image yet: every objective's best is ``image``, at an infinite loss, and none has stopped."""
        self.best_images = image.clone()
        self.best_loss = [math.inf] * self.count
        self.best_step = [0] * self.count
        self.stopped_at = [None] * self.count

    def start(self, image: Tensor) -> None:
        """Training starts (or resumes) at ``image``: it is the last good one; the best so far unless restored."""
        self.last_good = image.clone()
        self.has_good = finite_rows(image).tolist()
        if self.best_images is None:
            self.start_best(image)
        assert self.best_images is not None
        self.best_images = self.best_images.to(image.device)

    def observe(self, index: int, name: str, step: int, terms: dict[str, Tensor]) -> dict[str, float]:
        """Record the terms of objective ``index``'s image at the start of ``step``; return them as floats."""
        start = {term: value.item() for term, value in terms.items()}
        self.current[name] = start
        if step == 0:
            self.initial = {**(self.initial or {}), name: start}
        return start

    def keep_best(self, index: int, step: int, loss: float, image: Callable[[], Tensor]) -> None:
        """Make ``image()`` objective ``index``'s best if ``loss`` is below its best so far."""
        if loss < self.best_loss[index]:
            assert self.best_images is not None
            self.best_loss[index] = loss
            self.best_step[index] = step
            self.best_images[index] = image()

    def keep_good(self, index: int, image: Tensor) -> None:
        """Keep ``image`` as objective ``index``'s last finite image."""
        assert self.last_good is not None
        self.last_good[index] = image
        self.has_good[index] = True

    def stop(self, index: int, name: str, step: int) -> None:
        """Objective ``index``'s optimizer no longer moves its image (L-BFGS converged): it stops at ``step``."""
        self.stopped_at[index] = step
        rank_zero_info(
            f"step {step}: objective {name} stopped, its optimizer no longer moves the image "
            f"(loss {self.current[name]['total']:.4g})"
        )

    def curves(self, objectives: Sequence[Objective]) -> dict[str, float]:
        """The latest loss terms and the best loss of each objective as ``<objective>/<term>`` and ``/best``."""
        metrics = {f"{name}/{term}": value for name, row in self.current.items() for term, value in row.items()}
        metrics.update({f"{o.name}/best": loss for o, loss in zip(objectives, self.best_loss, strict=True)})
        return metrics

    @property
    def all_stopped(self) -> bool:
        """Whether every objective's optimizer has stopped (``False`` before training)."""
        return bool(self.stopped_at) and all(at is not None for at in self.stopped_at)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run ends exactly as an uninterrupted one."""
        return {
            "initial_loss": self.initial,
            "best_images": self.best_images.detach().cpu() if self.best_images is not None else None,
            "best_loss": list(self.best_loss),
            "best_step": list(self.best_step),
            "stopped_at": list(self.stopped_at),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` kept; checkpoints without best images keep none."""
        self.initial = state.get("initial_loss")
        if state.get("best_images") is not None:
            self.best_images = state["best_images"]
            self.best_loss = list(state["best_loss"])
            self.best_step = list(state["best_step"])
            self.stopped_at = list(state["stopped_at"])

    @torch.no_grad()
    def results(
        self,
        objectives: Sequence[Objective],
        image: Tensor,
        steps: int,
        loss: Loss,
        average: Callable[[int], Tensor] | None,
        content: Tensor | None,
        metrics: Callable[[int, Tensor], dict[str, float]],
    ) -> list[ObjectiveResult]:
        """Each objective's best image, its loss terms and metrics.

        The last step's image competes with the best ones seen during training (and becomes the best state when it
        wins): ``best_step``/``best_loss`` are those of the image returned, ``last_loss`` is the last image's. With
        ``average`` (the iterate average of objective ``index``, rendered), the average is the output instead.

        Args:
            objectives: The run's objectives.
            image: The last step's images, ``(objectives, 3, H, W)``.
            steps: The global step.
            loss: The loss terms of objective ``index`` at an image.
            average: The iterate average of objective ``index`` as a rendered ``(1, 3, H, W)`` image, if kept.
            content: The content image, which the ``histogram`` colour mode matches.
            metrics: The metrics of objective ``index`` at an image.
        """
        if self.best_images is None:  # a run that never trained
            self.start_best(image)
        assert self.best_images is not None
        best = self.best_images.to(image.device)
        last: list[float] = []
        # Terms of a result image already evaluated here: a large (tiled) image's loss is a pass over all its tiles.
        known: dict[int, dict[str, float]] = {}
        for index in range(len(objectives)):
            terms = {term: value.item() for term, value in loss(index, image[index : index + 1]).items()}
            total = terms["total"]
            last.append(total)
            if average is not None:  # the average is the output (crowsonkb's avg_decay), not the best iterate
                averaged = average(index)
                known[index] = {term: value.item() for term, value in loss(index, averaged).items()}
                self.best_loss[index] = known[index]["total"]
                self.best_step[index] = steps
                best[index] = averaged[0]
            elif total < self.best_loss[index]:
                self.best_loss[index], self.best_step[index] = total, steps
                best[index] = image[index]
                known[index] = terms
        self.best_images = best
        results = []
        for index, objective in enumerate(objectives):
            result = best[index : index + 1].float()
            final_loss = known.get(index) if best.dtype == torch.float32 else None
            if final_loss is None:
                final_loss = {term: value.item() for term, value in loss(index, result).items()}
            if objective.color == "histogram" and content is not None:
                # A post-step: the losses are those of the optimised image, the metrics those of the image returned.
                result = match_histograms(result, content.to(result.device).float())
            results.append(
                ObjectiveResult(
                    image=result,
                    initial_loss=(self.initial or {}).get(objective.name, {}),
                    final_loss=final_loss,
                    best_step=self.best_step[index],
                    best_loss=self.best_loss[index],
                    last_loss=last[index],
                    stopped_at_step=self.stopped_at[index],
                    metrics=metrics(index, result),
                )
            )
        return results
