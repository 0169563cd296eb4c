"""Seconds per step of the 16-objective reconstruction sweep: one batched optimizer (before) against one per objective.

"batched" is the design before per-objective optimizers, rebuilt here: one parameter holding all 16 images, one
L-BFGS over it, and each step one VGG pass of the whole batch up to conv5_4. "per objective" is a real Lightning fit of
:class:`~lightning_nst.ImageOptimization` (16 parameters, 16 L-BFGS, each step one VGG pass per objective that stops
at its layer), timed per step after the first. Both use the sweep configs' optimizer settings (lr 1, max_iter 1,
history 20, no line search); the last row adds a strong-Wolfe line search, whose step costs more evaluations.

    OMP_NUM_THREADS=1 python benchmarks/sweep_step.py --size 128 --steps 5
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.vgg import LAYER_NAMES

CONVS = [name for name in LAYER_NAMES if name.startswith("conv")]


def lbfgs(params: object, line_search_fn: str | None = None) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=20, line_search_fn=line_search_fn)


def per_objective(size: int, steps: int, folder: str, line_search_fn: str | None) -> tuple[float, ImageOptimization]:
    model = ImageOptimization(
        [Objective(name, content_layers=[name]) for name in CONVS],
        vgg=VGGConfig(weights="random"),
        optimizer=partial(lbfgs, line_search_fn=line_search_fn),
    )
    data = ImageTargets(content="skimage:astronaut", size=size)
    trainer = L.Trainer(
        max_steps=steps + 1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        callbacks=[ImageWriter(output_dir=folder, overwrite=True, snapshot_every=0)],
    )
    trainer.fit(model, data)
    summary = json.loads((Path(folder) / "summary.json").read_text())
    return summary["seconds_per_step_after_first"], model


def batched(model: ImageOptimization, steps: int) -> float:
    """The old step: all images in one parameter, one optimizer, one VGG pass over the batch."""
    count = len(CONVS)
    shape = model.images[0].shape[-2:]
    image = nn.Parameter(torch.rand(count, 3, *shape, generator=torch.Generator().manual_seed(0)))
    onehot = torch.eye(count)
    optimizer = lbfgs([image])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        features = model.vgg(image)
        loss = sum(onehot[i] @ model.content_losses[layer](features[layer]) for i, layer in enumerate(CONVS))
        loss.backward()
        return loss

    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer.step(closure)
        with torch.no_grad():
            image.clamp_(0, 1)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_nst").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        after, model = per_objective(args.size, args.steps, folder, None)
        before = batched(model, args.steps)
        wolfe, _ = per_objective(args.size, args.steps, folder, "strong_wolfe")
    threads = torch.get_num_threads()
    print(f"\n16-objective reconstruction sweep at {args.size} px, {threads} threads, {args.steps} steps")
    print(f"{'design':<40} {'s/step':>8}")
    print(f"{'batched, one L-BFGS (before)':<40} {before:>8.3f}")
    print(f"{'per objective, 16 L-BFGS (after)':<40} {after:>8.3f}")
    print(f"{'per objective, strong_wolfe':<40} {wolfe:>8.3f}")


if __name__ == "__main__":
    main()
