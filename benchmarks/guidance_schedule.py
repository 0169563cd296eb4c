"""Guidance schedule options: recurrence and x̂₀ descent steps against plain guidance, per sampler and step count.

Usage: python benchmarks/guidance_schedule.py [--samplers ddim euler_a dpmpp_2m] [--steps 10 25] [--scale 0.2]
       [--seeds 2] [--threads 1]

Builds the tiny random Stable Diffusion pipeline of the tests (``tests/tiny_pipeline.py``) in a temporary folder and
runs ``lightning-nst predict -c configs/guided_diffusion.yaml`` on it (VGG19 weights as the tests get them: the
partial real ones where ``../shared`` holds them, else random), once per sampler, step count and variant: unguided
(scale 0), guided, guided at 2 and 3 times the scale, guided with recurrence 1 and 2 in [0.3, 0.7), guided with 2 and
3 descent steps (which should beat 2 and 3 times the scale to be worth their VGG passes). Prints a Markdown
table: final style loss of the written image (mean over the seeds) over the unguided one, UNet calls per item and
seconds of the sampling loop per item. Not a test.
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

from lightning_nst.main import main  # noqa: E402
from tests.diffusion.test_recurrence import SolverState  # noqa: E402
from tests.tiny_pipeline import VGG, build_tiny_pipeline, records, tiny_args  # noqa: E402

OPTION = "--model.guidance.init_args."
# variant: (multiple of --scale, further overrides)
VARIANTS: dict[str, tuple[float, list[str]]] = {
    "unguided": (0.0, []),
    "guided": (1.0, []),
    "guided, 2 × scale": (2.0, []),
    "guided, 3 × scale": (3.0, []),
    "recurrence 1": (1.0, [f"{OPTION}recurrence=1"]),
    "recurrence 2": (1.0, [f"{OPTION}recurrence=2"]),
    "descent_steps 2": (1.0, [f"{OPTION}descent_steps=2"]),
    "descent_steps 3": (1.0, [f"{OPTION}descent_steps=3"]),
}


def measure(pipeline: Path, name: str, alias: str, steps: int, seeds: int, *overrides: str) -> tuple[float, int, float]:
    """Mean final style loss, UNet calls per item and sampling-loop seconds per item."""
    SolverState.evaluations.clear()
    args = tiny_args(
        pipeline,
        name,
        f"--model.scheduler={alias}",
        f"--data.seeds=[{', '.join(str(seed) for seed in range(seeds))}]",
        "--trainer.callbacks+=tests.diffusion.test_recurrence.SolverState",
        *overrides,
        steps=steps,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(args)
    (run,) = Path("logs", name).glob("version_*")
    lines = records(run)
    seconds = statistics.mean(line["seconds_per_step"] * len(line["timesteps"]) for line in lines)
    return statistics.mean(line["final_style_loss"] for line in lines), SolverState.evaluations[0], seconds


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", nargs="+", default=["ddim", "euler_a", "dpmpp_2m"])
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
        print(f"VGG19 weights: {Path(VGG).name if VGG != 'random' else 'random'}; scale {options.scale}")
        print("| sampler | steps | variant | UNet calls | final style loss | / unguided | seconds |")
        print("|---|---|---|---|---|---|---|")
        for alias in options.samplers:
            for steps in options.steps:
                plain = None
                for number, (variant, (factor, overrides)) in enumerate(VARIANTS.items()):
                    scale = f"{OPTION}scale={options.scale * factor}"
                    name = f"{alias}-{steps}-{number}"
                    loss, calls, seconds = measure(pipeline, name, alias, steps, options.seeds, scale, *overrides)
                    plain = loss if plain is None else plain
                    row = [alias, steps, variant, calls, f"{loss:.3e}", f"{loss / plain:.3f}", f"{seconds:.2f}"]
                    print(f"| {' | '.join(str(cell) for cell in row)} |", flush=True)


if __name__ == "__main__":
    main_()
