"""NST seconds per step against the floor, and peak memory.

The floor is one forward+backward through the VGG19 trunk truncated at the deepest layer the objective uses, on a
tensor of the same shape. "ours" is a real Lightning fit of ImageOptimization (TensorBoard logging on, progress bar
off), timed per step after the first. Both are measured alternately in this one process, and the medians of
``--repeats`` rounds are printed.

    python benchmarks/nst_step.py --size 256 --steps 6 --repeats 3
    python benchmarks/nst_step.py --memory --sizes 256 512
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.vgg import VGG19Features, layer_index

STYLE = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
WEIGHTS = {"gram": 1e6, "meanvar": 1e3}


def objective(task: str, statistic: str) -> Objective:
    content = ["relu4_2"] if task == "transfer" else []
    return Objective(
        "o", content_layers=content, style_layers=STYLE, style_weight=WEIGHTS[statistic], statistic=statistic
    )


def floor_seconds(layers: list[str], size: int, steps: int) -> float:
    vgg = VGG19Features(layers, weights="random")
    deepest = max(layers, key=layer_index)
    image = torch.rand(1, 3, size, size, requires_grad=True)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        vgg(image)[deepest].sum().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def fit_seconds(task: str, statistic: str, size: int, steps: int, folder: str) -> dict:
    model = ImageOptimization(
        [objective(task, statistic)],
        vgg=VGGConfig(weights="random"),
        init="content" if task == "transfer" else "noise",
        optimizer=lambda params: torch.optim.Adam(params, lr=0.02),
    )
    data = ImageTargets(
        content="skimage:astronaut" if task == "transfer" else None, style=["skimage:gravel"], size=size
    )
    trainer = L.Trainer(
        max_steps=steps + 1,
        max_epochs=-1,
        logger=TensorBoardLogger(folder, name="bench"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ImageWriter(snapshot_every=0)],
    )
    trainer.fit(model, data)
    return json.loads((Path(trainer.log_dir) / "summary.json").read_text())


def speed(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for task in ("texture", "transfer"):
            for statistic in ("gram", "meanvar"):
                layers = sorted({*STYLE, *(["relu4_2"] if task == "transfer" else [])}, key=layer_index)
                floors, ours = [], []
                for _ in range(args.repeats):
                    floors.append(floor_seconds(layers, args.size, args.steps))
                    ours.append(
                        fit_seconds(task, statistic, args.size, args.steps, folder)["seconds_per_step_after_first"]
                    )
                rows.append((f"{task} {statistic}", statistics.median(floors), statistics.median(ours)))
    threads = torch.get_num_threads()
    print(f"\nNST step at {args.size} px, {threads} threads, medians of {args.repeats} rounds x {args.steps} steps")
    print(f"{'setting':<18} {'floor s':>9} {'ours s':>9} {'ratio':>7}")
    for name, floor, ours in rows:
        print(f"{name:<18} {floor:>9.4f} {ours:>9.4f} {ours / floor:>7.3f}")


def one_step(task: str, statistic: str, size: int) -> None:
    """Child process of --memory: one fit of 2 steps, then print the peak resident set size."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as folder:
        fit_seconds(task, statistic, size, 1, folder)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"baseline_mb": baseline / 1024, "peak_mb": peak / 1024, "cuda_peak_mb": cuda / 2**20}))


def memory(args: argparse.Namespace) -> None:
    print("\nPeak memory of a 2-step NST fit, each in a fresh process (CPU: resident set; CUDA: max allocated)")
    print(f"{'setting':<18} {'size':>5} {'peak MB':>9} {'over imports MB':>16} {'cuda MB':>8}")
    for size in args.sizes:
        for task, statistic in (("texture", "gram"), ("transfer", "gram"), ("transfer", "meanvar")):
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--child", task, statistic, str(size)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            result = json.loads(out)
            print(
                f"{task + ' ' + statistic:<18} {size:>5} {result['peak_mb']:>9.0f} "
                f"{result['peak_mb'] - result['baseline_mb']:>16.0f} {result['cuda_peak_mb']:>8.0f}"
            )


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of speed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, statistic, size = args.child
        one_step(task, statistic, int(size))
    elif args.memory:
        memory(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
