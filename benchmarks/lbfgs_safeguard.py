"""The L-BFGS safeguard (``model.lbfgs_safeguard``) on and off: worst loss rise over the best so far, steps to a loss.

Each case is a real ``lightning-nst fit`` of a shipped config (in this process, through ``lightning_nst.cli.run``) at a
small size, once with ``--model.init_args.lbfgs_safeguard null`` (plain L-BFGS, as the PyTorch tutorial's) and once
with the safeguard's factor. Wrappers around :class:`lightning_nst.nst.results.Progress` and
:class:`lightning_nst.nst.safeguard.LBFGSSafeguard` record each step's loss (the loss of the image the step starts
from, known from its closure) and the rejections. Columns, per objective:

- ``worst kept``: the largest ratio of a step's loss to the best loss before it (at the same scale), over the images
  the run went on from. Without the safeguard every image is kept; with it, a rejected one is not.
- ``worst trial``: the same over every image evaluated, rejected ones included (what the safeguard caught).
- ``best``: the best loss of the last scale; ``to target``: the first step whose loss reaches the plain run's best
  (``-`` if never); ``rejected``: the safeguard's rejections.

    OMP_NUM_THREADS=1 python benchmarks/lbfgs_safeguard.py --weights ../shared/models/vgg19_imagenet_conv1_1-conv3_1.pth

``--factor auto`` compares the default (``auto``: the block-1 reconstructions guarded at 2, every other objective
plain, bit for bit) with plain L-BFGS. ``--extra="--model.init_args.parameterization laplacian"`` adds those
arguments to every fit (after the case's own): here, every case in the Laplacian pyramid.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_nst.cli.lightning import run
from lightning_nst.nst import results, safeguard

ROOT = Path(__file__).resolve().parent.parent
RECON = "[{name: conv1_2, content_layers: [conv1_2]}]"
TUTORIAL = (
    "[{name: tutorial, content_layers: [conv2_2], style_layers: [conv1_1, conv1_2, conv2_1, conv2_2, conv3_1], "
    "style_weight: 1.0e+6}]"
)


@dataclass
class Trace:
    """What one objective did: its loss per step, the steps the safeguard rejected, where each scale began."""

    losses: list[float] = field(default_factory=list)
    rejected: set[int] = field(default_factory=set)
    scale_starts: list[int] = field(default_factory=lambda: [0])


TRACES: dict[str, Trace] = {}
NAMES: dict[int, str] = {}


def _record() -> None:
    """Wrap Progress and the safeguard so that each step's loss, each rejection and each new scale is recorded."""
    observe, start_best = results.Progress.observe, results.Progress.start_best
    after_step = safeguard.LBFGSSafeguard.after_step

    def observe_(self: Any, index: int, name: str, step: int, terms: dict[str, Any]) -> dict[str, float]:
        start = observe(self, index, name, step, terms)
        NAMES[index] = name
        TRACES.setdefault(name, Trace()).losses.append(start["total"])
        return start

    def after_step_(self: Any, index: int, *args: Any) -> dict[str, float]:
        before = self.rejected[index]
        terms = after_step(self, index, *args)
        if self.rejected[index] > before:
            trace = TRACES[NAMES[index]]
            trace.rejected.add(len(trace.losses) - 1)
        return terms

    def start_best_(self: Any, image: Any) -> None:
        start_best(self, image)
        for trace in TRACES.values():
            if trace.losses and trace.scale_starts[-1] != len(trace.losses):
                trace.scale_starts.append(len(trace.losses))

    results.Progress.observe, results.Progress.start_best = observe_, start_best_
    safeguard.LBFGSSafeguard.after_step = after_step_


def rises(trace: Trace, kept_only: bool) -> float:
    """The worst ratio of a step's loss to the best before it at the same scale."""
    worst, best = 1.0, math.inf
    for step, loss in enumerate(trace.losses):
        if step in trace.scale_starts:
            best = math.inf
        if kept_only and step in trace.rejected:
            continue
        if math.isfinite(best) and best > 0:
            worst = max(worst, loss / best)
        best = min(best, loss)
    return worst


def fit(config: str, extra: list[str], guard: str, args: argparse.Namespace, folder: str) -> dict[str, Trace]:
    TRACES.clear()
    folder = tempfile.mkdtemp(dir=folder)  # a run folder each: the CLI saves its config.yaml there
    weights = ["--model.init_args.vgg.weights", args.weights]
    if args.weights != "random":
        weights += ["--model.init_args.vgg.fill_missing", "true"]
    run([
        "fit", "-c", str(ROOT / "configs" / config), "--seed_everything", "0", *weights,
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", folder,
        "--trainer.callbacks", "[{class_path: lightning_nst.ImageWriter, init_args: {output_dir: "
        f"{folder}, overwrite: true, snapshot_every: 0}}}}]", "--model.init_args.lbfgs_safeguard", guard, *extra,
        *shlex.split(args.extra),
    ])  # fmt: skip
    return dict(TRACES)


def cases(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    size = ["--data.init_args.size", str(args.size)]
    steps = ["--trainer.max_steps", str(args.steps)]
    rec = ["--model.objectives", RECON, "--trainer.max_steps", "300"]
    listed = [
        ("conv1_2 64 px", "content_reconstruction.yaml", [*rec, "--data.init_args.size", "64"]),
        ("conv1_2 128 px", "content_reconstruction.yaml", [*rec, "--data.init_args.size", "128"]),
        ("laplacian 192 px", "style_transfer_gram.yaml", [
            "--data.init_args.size", "192", "--model.init_args.parameterization", "laplacian", *steps]),
        ("scales 64,96,128", "style_transfer_gram.yaml", [
            "--data.init_args.size", "128", "--model.init_args.scales", "[64, 96, 128]", *steps]),
    ]  # fmt: skip
    starry = ROOT.parent / "shared" / "data" / "style" / "starry_night.jpg"
    if starry.is_file():  # the tutorial's images and loss, as benchmarks/time_to_quality.py
        tutorial = [
            "--model.objectives", TUTORIAL, "--data.init_args.content", "skimage:astronaut",
            "--data.init_args.style", f"[{starry}]", *steps,
        ]  # fmt: skip
        listed += [
            ("tutorial laplacian 192 px", "style_transfer_gram.yaml", [
                *tutorial, "--data.init_args.size", "192", "--model.init_args.parameterization", "laplacian"]),
            ("tutorial laplacian 96 px", "style_transfer_gram.yaml", [
                *tutorial, "--data.init_args.size", "96", "--model.init_args.parameterization", "laplacian"]),
            ("tutorial scales 32,64,128", "style_transfer_gram.yaml", [
                *tutorial, "--data.init_args.size", "128", "--model.init_args.scales", "[32, 64, 128]"]),
        ]  # fmt: skip
    for config in sorted(os.listdir(ROOT / "configs")):
        if "torch.optim.LBFGS" in (ROOT / "configs" / config).read_text():
            listed.append((config.removesuffix(".yaml"), config, [*size, *steps]))
    return [case for case in listed if not args.only or any(word in case[0] for word in args.only)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="size of the shipped configs' runs")
    parser.add_argument("--steps", type=int, default=100, help="steps of the shipped configs' runs")
    parser.add_argument("--factor", default="2.0", help="the safeguard's factor, or auto (the default's choice)")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--only", nargs="*", help="cases whose name contains one of these words")
    parser.add_argument("--extra", default="", help="arguments added to every fit, as one string")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning_nst"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _record()
    print(f"\nL-BFGS safeguard {args.factor} vs none, {torch.get_num_threads()} threads, weights {args.weights}")
    print(f"{'case':<28} {'objective':<14} {'guard':>5} {'worst kept':>11} {'worst trial':>12} {'best':>10} "
          f"{'to target':>9} {'steps':>5} {'rejected':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for label, config, extra in cases(args):
            off = fit(config, extra, "null", args, folder)
            on = fit(config, extra, args.factor, args, folder)
            for name in off:
                last = off[name].scale_starts[-1]
                target = min(off[name].losses[last:])
                for guard, trace in (("off", off[name]), ("on", on[name])):
                    tail = trace.losses[trace.scale_starts[-1] :]
                    reached = next((trace.scale_starts[-1] + i for i, x in enumerate(tail) if x <= target), None)
                    print(
                        f"{label:<28} {name:<14} {guard:>5} {rises(trace, True):>10.3g}x {rises(trace, False):>11.3g}x "
                        f"{min(tail):>10.4g} {'-' if reached is None else reached:>9} {len(trace.losses):>5} "
                        f"{len(trace.rejected):>8}"
                    )


if __name__ == "__main__":
    main()
