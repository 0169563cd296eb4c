"""Final style loss, guided (scale 0.2) against unguided (scale 0), for every sampler at 10 and 25 steps.

Usage: python benchmarks/sampler_guidance.py [--steps 10 25] [--scale 0.2] [--seeds 2] [--threads 1]

Builds the tiny random Stable Diffusion pipeline of the tests (``tests/tiny_pipeline.py``) in a temporary folder and
runs ``lightning-nst predict -c configs/guided_diffusion.yaml`` on it with random VGG19 weights, once per sampler,
step count and scale. The final style loss is that of the written image, as ``predictions.jsonl`` records it, averaged
over the seeds. Prints a Markdown table: the ratio guided/unguided is what ``scale`` should make comparable across
samplers. Not a test.
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

from lightning_nst.diffusion import scheduler_class  # noqa: E402
from lightning_nst.errors import NSTError  # noqa: E402
from lightning_nst.hub import SCHEDULERS  # noqa: E402
from lightning_nst.main import main  # noqa: E402
from tests.tiny_pipeline import build_tiny_pipeline, records, tiny_args  # noqa: E402


def final_losses(pipeline: Path, name: str, alias: str, steps: int, scale: float, seeds: int) -> tuple[float, int]:
    """Mean final style loss over the seeds, and the model evaluations per item."""
    args = tiny_args(
        pipeline,
        name,
        f"--model.scheduler={alias}",
        f"--model.guidance.init_args.scale={scale}",
        "--model.guidance.init_args.vgg.weights=random",
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
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        os.environ["HF_HUB_OFFLINE"] = "1"
        pipeline = build_tiny_pipeline(Path(folder) / "tiny-sd")
        print(f"| sampler | class | steps | model evaluations | unguided | guided (scale {options.scale}) | ratio |")
        print("|---|---|---|---|---|---|---|")
        for alias in SCHEDULERS:
            try:
                cls = scheduler_class(alias)[0].__name__
            except NSTError as error:
                print(f"| {alias} | not available: {error} | | | | | |")
                continue
            for steps in options.steps:
                plain, evaluations = final_losses(pipeline, f"{alias}-{steps}-0", alias, steps, 0.0, options.seeds)
                guided, _ = final_losses(pipeline, f"{alias}-{steps}-g", alias, steps, options.scale, options.seeds)
                row = [alias, cls, steps, evaluations, f"{plain:.3e}", f"{guided:.3e}", f"{guided / plain:.3f}"]
                print(f"| {' | '.join(str(cell) for cell in row)} |", flush=True)


if __name__ == "__main__":
    main_()
