"""bf16 by default: what a ``bf16-mixed`` fit gives up against ``32-true``, per shipped image-optimisation config.

    OMP_NUM_THREADS=2 python benchmarks/bf16_quality.py --size 128 --steps 100 --weights random
    OMP_NUM_THREADS=2 python benchmarks/bf16_quality.py --weights ../shared/models/vgg19_imagenet_conv1_1-conv3_1.pth

Every config in ``configs/`` whose model is ``ImageOptimization`` (the diffusion configs are skipped) runs twice
through ``lightning-nst fit`` in this process, with the same seed: ``--trainer.precision 32-true`` and
``bf16-mixed``, at ``--size`` px for ``--steps`` steps, with ``--weights`` (a weights file gets ``fill_missing``, so
the layers a partial file lacks get the same seeded random weights in both runs). A coarse-to-fine config
(``large_print``) runs its scales as ``[size/4, size/2, size]`` (those of at least 32 px) with the steps split evenly.

Each objective's result, the PNG the run wrote, is scored by one float32 definition: ``objective_loss`` of the
``32-true`` run's module outside autocast (its trunk, targets and statistics all float32), with the random
projections of ``sliced_w`` reset to the same state before each image, so both images are scored by the same
function. The table gives the loss at the start (the ``32-true`` run's step 0), both final scores, their ratio
(bf16 / fp32: above 1, bf16 ended worse) and each run's seconds per step after the first (``summary.json``'s
``seconds_per_step_after_first``). Not a test.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_nst.cli.lightning import run
from lightning_nst.core.hardware import auto_precision
from lightning_nst.core.images import load_image
from lightning_nst.outputs import FitSummary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRECISIONS = ("32-true", "bf16-mixed")


def image_optimization_configs() -> list[str]:
    """The shipped configs whose model is ImageOptimization, by name."""
    names = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        model = config.get("model") or {}
        if str(model.get("class_path", "")).endswith("ImageOptimization"):
            names.append(path.stem)
    return names


def fit(name: str, precision: str, args: argparse.Namespace, logs: Path) -> Any:
    """``lightning-nst fit -c configs/<name>.yaml`` at the benchmark's size, steps, weights and ``precision``."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))
    argv = ["fit", "-c", str(CONFIGS / f"{name}.yaml"), "--seed_everything", str(args.seed)]
    argv += ["--trainer.max_steps", str(args.steps), "--trainer.precision", precision]
    argv += ["--trainer.accelerator", args.accelerator, "--trainer.enable_progress_bar", "false"]
    argv += ["--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.name", precision]
    argv += ["--data.init_args.size", str(args.size), "--model.init_args.vgg.weights", args.weights]
    if args.weights not in ("random", "imagenet", "auto"):
        argv += ["--model.init_args.vgg.fill_missing", "true"]
    if config["model"]["init_args"].get("scales"):
        coarse = [side for side in (args.size // 4, args.size // 2) if side >= 32]
        argv += ["--model.init_args.scales", str([*coarse, args.size])]
        argv += ["--model.init_args.scale_steps", "null"]
    return run(argv)


@torch.no_grad()
def score(module: Any, index: int, image: torch.Tensor, generators: dict[str, torch.Tensor]) -> float:
    """The float32 loss of objective ``index`` at ``image``, with sliced_w's projections drawn from ``generators``."""
    module.evaluator.restore_generators(generators)
    return float(module.objective_loss(index, image.to(module.device).float())["total"])


def one_config(name: str, args: argparse.Namespace) -> list[list[str]]:
    """The table rows of config ``name``: one per objective."""
    with tempfile.TemporaryDirectory(prefix="nst-bf16-") as folder:
        runs = {}
        for precision in PRECISIONS:
            cli = fit(name, precision, args, Path(folder) / "logs")
            runs[precision] = (cli, FitSummary.read(cli.trainer.log_dir))
        scorer = runs["32-true"][0].model  # float32 everywhere: trunk, targets, statistics
        generators = {key: value.get_state() for key, value in scorer.evaluator.generators().items()}
        rows = []
        for index, objective in enumerate(scorer.objectives):
            scores, speeds = {}, {}
            for precision, (_, summary) in runs.items():
                record = summary.objectives[objective.name]
                image = load_image(str(Path(summary.output_dir) / record.output))
                scores[precision] = score(scorer, index, image, generators)
                speeds[precision] = summary.seconds_per_step_after_first or summary.seconds_per_step
            fp32, bf16 = scores["32-true"], scores["bf16-mixed"]
            ratio = bf16 / fp32 if fp32 > 0 else float("nan")
            initial = runs["32-true"][1].objectives[objective.name].initial_loss.get("total", float("nan"))
            rows.append([name, objective.name, f"{initial:.4g}", f"{fp32:.4g}", f"{bf16:.4g}", f"{ratio:.3f}",
                         f"{speeds['32-true']:.3f}", f"{speeds['bf16-mixed']:.3f}"])  # fmt: skip
            print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    warnings.filterwarnings("ignore")
    for logger in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_nst"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="data.size of every run (128)")
    parser.add_argument("--steps", type=int, default=100, help="trainer.max_steps of every run (100)")
    parser.add_argument("--weights", default="random", help="VGG19 weights: random, imagenet or a file (random)")
    parser.add_argument("--configs", nargs="+", help="config names (default: every ImageOptimization config)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = args.configs or image_optimization_configs()
    unknown = sorted(set(names) - set(image_optimization_configs()))
    if unknown:
        sys.exit(f"not ImageOptimization configs: {unknown}; known: {image_optimization_configs()}")
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(
        f"{args.size} px, {args.steps} steps, weights {args.weights}, seed {args.seed}, {torch.get_num_threads()} "
        f"threads, auto precision here: {auto_precision(args.accelerator)}; 1-minute load average {load}"
    )
    rows = []
    for name in names:
        rows += one_config(name, args)
    print("\n| config | objective | initial loss | fp32 loss | bf16 loss (float32-scored) | bf16 / fp32 | s/step fp32 "
          "| s/step bf16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    ratios = [float(row[5]) for row in rows if row[5] != "nan"]
    if ratios:
        print(f"\nratio bf16 / fp32: median {sorted(ratios)[len(ratios) // 2]:.3f}, worst {max(ratios):.3f}, "
              f"best {min(ratios):.3f} over {len(ratios)} objectives")  # fmt: skip


if __name__ == "__main__":
    main()
