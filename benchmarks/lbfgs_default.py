"""Which default L-BFGS: time to a given loss, and loss spikes, for four ways to keep pixels in [0, 1].

- ``clamp, no line search``: the old default (lr 1, max_iter 1, no line search), pixels clamped after each step.
- ``clamp, strong_wolfe``: the same with torch's strong-Wolfe line search, pixels clamped after each step.
- ``clamp inside, strong_wolfe``: an unconstrained parameter; only what VGG sees and what is saved is clamped, so
  the line search sees one consistent function.
- ``sigmoid, strong_wolfe``: an unconstrained parameter decoded by a sigmoid, so VGG and the saved file always see
  an image in range and nothing is clamped.

Each is a real Lightning fit of one objective; a callback records (seconds, loss) each step. "to target" is the time
until the loss first reaches the largest of the final best losses (a level all reach); "spikes" counts steps
whose loss exceeds 2x the best loss seen before. Random VGG weights by default; ``--weights FILE --fill-missing``
for the real partial weights (objectives up to relu3_1 then).

    OMP_NUM_THREADS=1 python benchmarks/lbfgs_default.py --size 128 --steps 150
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig


class Sigmoid(ImageOptimization):
    """Unconstrained pixels: the image is ``sigmoid(parameter)``."""

    def _encode(self, image: Tensor) -> Tensor:
        return torch.logit(image.clamp(1e-3, 1 - 1e-3))

    def decode(self, parameter: Tensor) -> Tensor:
        return torch.sigmoid(parameter)

    def _project_(self, parameter: Tensor) -> None:
        pass


class ClampInside(ImageOptimization):
    """Unconstrained pixels: VGG and the saved file see ``parameter.clamp(0, 1)``; the parameter is never clamped."""

    def _project_(self, parameter: Tensor) -> None:
        pass


class Curve(L.Callback):
    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []
        self.started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        loss = next(iter(pl_module._current.values()))["total"]
        self.points.append((time.perf_counter() - self.started, loss))


def lbfgs(params: Any, line_search_fn: str | None) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=50, line_search_fn=line_search_fn)


def run(kind: str, objective: Objective, args: argparse.Namespace, folder: str) -> list[tuple[float, float]]:
    module = {"sigmoid": Sigmoid, "clamp inside": ClampInside}.get(kind.split(",")[0], ImageOptimization)
    line_search = "strong_wolfe" if "wolfe" in kind else None
    vgg = VGGConfig(weights=args.weights, fill_missing=args.fill_missing)
    model = module(
        [objective], vgg=vgg, optimizer=partial(lbfgs, line_search_fn=line_search),
    )  # fmt: skip
    content = "skimage:astronaut" if objective.content_layers else None
    data = ImageTargets(content=content, style=["skimage:gravel"] if objective.style_layers else None, size=args.size)
    curve = Curve()
    trainer = L.Trainer(
        max_steps=args.steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
        callbacks=[curve, ImageWriter(output_dir=folder, overwrite=True, snapshot_every=0)],
    )  # fmt: skip
    trainer.fit(model, data)
    return curve.points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--fill-missing", action="store_true")
    parser.add_argument("--only", nargs="*", help="variants to run, e.g. 'clamp inside, strong_wolfe'")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_nst").setLevel(logging.ERROR)
    deep = "relu3_1" if args.weights != "random" else "relu5_1"
    style = [layer for layer in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1") if layer <= deep]
    objectives = [
        Objective("texture", style_layers=style, style_weight=1e6),
        Objective("reconstruction", content_layers=[deep.replace("relu", "conv")]),
    ]
    kinds = ["clamp, no line search", "clamp, strong_wolfe", "clamp inside, strong_wolfe", "sigmoid, strong_wolfe"]
    kinds = [kind for kind in kinds if not args.only or kind in args.only]
    print(f"\nL-BFGS defaults at {args.size} px, {args.steps} steps, {torch.get_num_threads()} threads, {args.weights}")
    header = f"{'best':>10} {'to target s':>12} {'steps':>6} {'spikes':>7} {'s/step':>7} {'ran':>5}"
    print(f"{'objective':<15} {'variant':<28} {header}")
    with tempfile.TemporaryDirectory() as folder:
        for objective in objectives:
            curves = {kind: run(kind, objective, args, folder) for kind in kinds}
            target = max(min(loss for _, loss in points) for points in curves.values())
            for kind, points in curves.items():
                best, spikes, reached = float("inf"), 0, None
                for step, (seconds, loss) in enumerate(points):
                    spikes += loss > 2 * best
                    best = min(best, loss)
                    if reached is None and loss <= target:
                        reached = (seconds, step)
                when = f"{reached[0]:>12.2f} {reached[1]:>6d}" if reached else f"{'-':>12} {'-':>6}"
                per_step = points[-1][0] / len(points)
                row = f"{best:>10.3e} {when} {spikes:>7d} {per_step:>7.3f} {len(points):>5d}"
                print(f"{objective.name:<15} {kind:<28} {row}")


if __name__ == "__main__":
    main()
