"""Per-step overhead of a Lightning fit outside the VGG pass: the product against a bare loop, side by side.

The bare loop is the same ``VGG19Features`` trunk, the same ``LayerStyleLoss``/``ContentLoss`` modules and the same
``torch.optim.LBFGS`` (lr 1, max_iter 1, history 50) in a plain Python loop: one closure (forward, loss, backward)
and one ``step`` per iteration, the pixels clamped after it. "ours" is ``ImageOptimization`` fitted by a
``lightning.Trainer`` as ``lightning-nst fit`` builds it (TensorBoard logger, ``ImageWriter`` with snapshots every
50 steps, progress bar off: a terminal's bar redraw is not part of the loop). Both use the tutorial's layers of
``benchmarks/reference.py`` (style conv1_1..conv3_1, content conv2_2) and the real partial weights where
``../shared`` holds them. Per step is the median interval between consecutive step ends after the first; "fixed" is
the time from building the model to the first step's start plus from the last step's end to the results written.
"outside VGG" is a step's time minus its closure's (VGG forward, loss, backward): L-BFGS's own update, clamping,
logging, hooks and callbacks. Times are CPU time of this process (its threads included) unless ``--wall``: on a
shared machine other jobs inflate wall time per step by up to 3x between runs. The settings alternate in each of
``--repeats`` rounds; medians are printed. ``--price-logging`` adds the per-term curves through ``self.log_dict``
(the path before this benchmark) and no per-term curves.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --size 256 --steps 20 --repeats 3
    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --profile   # cProfile of one product fit, top entries
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.images import load_image
from lightning_nst.core.losses import ContentLoss, LayerStyleLoss
from lightning_nst.core.vgg import VGG19Features

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import PARTIAL_WEIGHTS  # noqa: E402

STYLE_LAYERS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"]
CONTENT_LAYER = "conv2_2"
CONTENT, STYLE = "skimage:astronaut", "skimage:gravel"
# CPU time of this process by default: on a shared machine other jobs' load inflates wall time per step by up to
# 3x from one run to the next, while the CPU time this process spends (its threads included) stays comparable.
CLOCK = time.process_time


def lbfgs(params: Any) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=50, line_search_fn=None)


def bare(args: argparse.Namespace) -> tuple[float, float, float]:
    started = CLOCK()
    vgg = VGG19Features([*STYLE_LAYERS, CONTENT_LAYER], weights=args.weights)
    content, style = load_image(CONTENT, args.size), load_image(STYLE, args.size)
    with torch.no_grad():
        targets, content_features = vgg(style), vgg(content)
    style_loss = LayerStyleLoss({k: targets[k] for k in STYLE_LAYERS}, "gram", dict.fromkeys(STYLE_LAYERS, 1.0))
    content_loss = ContentLoss(content_features[CONTENT_LAYER])
    image = torch.nn.Parameter(content.clone().contiguous())
    optimizer = lbfgs([image])

    inside: list[float] = []

    def closure() -> torch.Tensor:
        entered = CLOCK()
        optimizer.zero_grad()
        features = vgg(image.clamp(0, 1))
        loss = 1e6 * style_loss(features).sum() + content_loss(features[CONTENT_LAYER]).sum()
        loss.backward()
        inside.append(CLOCK() - entered)
        return loss.detach()

    ends = []
    first = CLOCK()
    for _ in range(args.steps):
        optimizer.step(closure)
        with torch.no_grad():
            image.clamp_(0, 1)
        ends.append(CLOCK())
    outside = [b - a - c for a, b, c in zip(ends, ends[1:], inside[1:], strict=False)]
    return (
        statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False)),
        first - started,
        statistics.median(outside),
    )


class Clock(L.Callback):
    def __init__(self) -> None:
        self.first: float | None = None
        self.ends: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        if self.first is None:
            self.first = CLOCK()

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(CLOCK())


class Timed(ImageOptimization):
    """Benchmark-only: accumulates the time spent in the closure (VGG forward, loss, backward)."""

    inside: list[float]

    def _closure(self, *args: Any) -> torch.Tensor:
        entered = CLOCK()
        try:
            return super()._closure(*args)
        finally:
            self.inside.append(CLOCK() - entered)


class NoTermLogging(Timed):
    """Benchmark-only: the per-term curves not logged, to price them; ``loss`` is still logged."""

    def _log_terms(self, step: int, total: float) -> None:
        pass


class LogDictTerms(Timed):
    """Benchmark-only: the per-term curves through ``self.log_dict`` every step, as before the overhead hunt."""

    def _log_terms(self, step: int, total: float) -> None:
        metrics = {f"{name}/{term}": value for name, row in self._current.items() for term, value in row.items()}
        metrics.update({f"{o.name}/best": loss for o, loss in zip(self.objectives, self.best_loss, strict=True)})
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


def ours(args: argparse.Namespace, folder: str, module: type[Timed] = Timed) -> tuple[float, float, float]:
    started = CLOCK()
    objective = Objective(
        "gram",
        content_layers={CONTENT_LAYER: 1.0},
        style_layers=dict.fromkeys(STYLE_LAYERS, 1.0),
        style_weight=1e6,
    )
    model = module([objective], vgg=VGGConfig(weights=args.weights), init="content", optimizer=lbfgs)
    model.inside = []
    clock = Clock()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=TensorBoardLogger(folder, name="bench", default_hp_metric=False),
        callbacks=[clock, ImageWriter(snapshot_every=50)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,  # as lightning-nst fit (cli.TRAINER_DEFAULTS): every step's terms in TensorBoard
    )
    trainer.fit(model, ImageTargets(content=CONTENT, style=[STYLE], size=args.size))
    ended = CLOCK()
    per_step = statistics.median(b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False))
    outside = [b - a - c for a, b, c in zip(clock.ends, clock.ends[1:], model.inside[1:], strict=False)]
    assert clock.first is not None
    return per_step, (clock.first - started) + (ended - clock.ends[-1]), statistics.median(outside)


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default=str(PARTIAL_WEIGHTS) if PARTIAL_WEIGHTS else "random")
    parser.add_argument("--price-logging", action="store_true", help="also a fit without the per-term curves")
    parser.add_argument("--profile", action="store_true", help="cProfile one product fit and print the top entries")
    parser.add_argument("--wall", action="store_true", help="time with the wall clock instead of CPU time")
    args = parser.parse_args()
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_nst").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(ours, args, folder)
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            return
        rows: dict[str, list[tuple[float, float, float]]] = {"bare loop": [], "ours (Lightning fit)": []}
        extra = {"ours, terms via log_dict (before)": LogDictTerms, "ours, terms not logged": NoTermLogging}
        extra = extra if args.price_logging else {}
        rows.update({name: [] for name in extra})
        for _ in range(args.repeats):
            rows["bare loop"].append(bare(args))
            rows["ours (Lightning fit)"].append(ours(args, folder))
            for name, module in extra.items():
                rows[name].append(ours(args, folder, module))
    base = statistics.median(step for step, _, _ in rows["bare loop"])
    clock = "wall" if args.wall else "CPU"
    print(f"\n{args.size} px, {args.steps} steps, {torch.get_num_threads()} threads, {clock} time, {args.weights}")
    print(f"{'setting':<36} {'s/step':>8} {'x bare':>7} {'outside VGG ms/step':>20} {'fixed s':>8}")
    for name, values in rows.items():
        step = statistics.median(s for s, _, _ in values)
        fixed = statistics.median(f for _, f, _ in values)
        outside = statistics.median(o for _, _, o in values)
        print(f"{name:<36} {step:>8.4f} {step / base:>7.3f} {1000 * outside:>20.1f} {fixed:>8.2f}")


if __name__ == "__main__":
    main()
