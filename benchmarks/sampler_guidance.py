"""Final style loss, guided (scale 0.2) against unguided (scale 0), for every sampler at 10 and 25 steps.

Usage: python benchmarks/sampler_guidance.py [--steps 10 25] [--scale 0.2] [--seeds 2] [--threads 1] [--weights W]

Builds the tiny random Stable Diffusion pipeline of the tests (``tests/tiny_pipeline.py``) in a temporary folder and
runs ``lightning-nst predict -c configs/guided_diffusion.yaml`` on it with the VGG19 weights ``--weights`` (random by
default, or a weights file covering relu1_1..relu3_1), once per sampler, step count and scale. The flow-matching
samplers, which an SD pipeline refuses, get a row saying so. The final style loss is that of the written image, as
``predictions.jsonl`` records it, averaged over the seeds. Prints a Markdown table: the ratio guided/unguided is what
``scale`` should make comparable across samplers. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lightning_nst.core.errors import NSTError  # noqa: E402
from lightning_nst.diffusion.catalog import SCHEDULERS  # noqa: E402
from lightning_nst.diffusion.samplers import scheduler_class  # noqa: E402
from lightning_nst.main import main  # noqa: E402
from tests.tiny_pipeline import build_tiny_pipeline, records, tiny_args  # noqa: E402


def final_losses(
    pipeline: Path, name: str, alias: str, steps: int, scale: float, seeds: int, weights: str
) -> tuple[float, int]:
    """Mean final style loss over the seeds, and the model evaluations per item."""
    args = tiny_args(
        pipeline,
        name,
        f"--model.scheduler={alias}",
        f"--model.guidance.init_args.scale={scale}",
        f"--model.guidance.init_args.vgg.weights={weights}",
        f"--data.seeds=[{', '.join(str(seed) for seed in range(seeds))}]",
        steps=steps,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(args)
    (run,) = Path("logs", name).glob("version_*")
    lines = records(run)
    return statistics.mean(line["final_style_loss"] for line in lines), len(lines[0]["timesteps"])


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default="random", help="VGG19 weights: random or a file (relu1_1..relu3_1)")
    options = parser.parse_args(argv)
    if options.weights != "random":
        options.weights = str(Path(options.weights).resolve())  # the runs happen in a temporary folder
    torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        os.environ["HF_HUB_OFFLINE"] = "1"
        pipeline = build_tiny_pipeline(Path(folder) / "tiny-sd")
        print(f"VGG19 weights: {options.weights}")
        print(f"| sampler | class | steps | model evaluations | unguided | guided (scale {options.scale}) | ratio |")
        print("|---|---|---|---|---|---|---|")
        for alias in SCHEDULERS:
            try:
                cls = scheduler_class(alias)[0].__name__
            except NSTError as error:
                print(f"| {alias} | not available: {error} | | | | | |")
                continue
            for steps in options.steps:
                run = (alias, steps)
                try:
                    plain, evaluations = final_losses(
                        pipeline, f"{alias}-{steps}-0", *run, 0.0, options.seeds, options.weights
                    )
                except (
                    SystemExit
                ):  # the CLI refused it (one line, status 2): a flow-matching sampler on this SD pipeline
                    print(f"| {alias} | {cls} | refused on an SD pipeline (a flow-matching sampler) | | | | |")
                    break
                guided, _ = final_losses(
                    pipeline, f"{alias}-{steps}-g", *run, options.scale, options.seeds, options.weights
                )
                row = [alias, cls, steps, evaluations, f"{plain:.3e}", f"{guided:.3e}", f"{guided / plain:.3f}"]
                print(f"| {' | '.join(str(cell) for cell in row)} |", flush=True)


if __name__ == "__main__":
    main_()
