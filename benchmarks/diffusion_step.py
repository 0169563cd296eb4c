"""Seconds per sampling step of the tiny test pipeline, unguided against guided, through the real CLI.

Usage: python benchmarks/diffusion_step.py [--steps 10] [--size 64] [--items 4] [--threads N]

Builds the tiny random Stable Diffusion pipeline of the tests (``tests/tiny_pipeline.py``) in a temporary folder and
runs ``lightning-nst predict -c configs/guided_diffusion.yaml`` on it once per setting. Each item's
``seconds_per_step`` (the denoising loop's wall time over its steps, measured by the module) comes from the manifest;
the first item is dropped as warm-up and the median of the rest is reported. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lightning_nst.main import main  # noqa: E402
from tests.tiny_pipeline import build_tiny_autoencoder, build_tiny_pipeline, tiny_args  # noqa: E402

SETTINGS: dict[str, list[str]] = {
    "unguided (no guidance object)": ["--model.guidance=null"],
    "measure only (scale 0)": ["--model.guidance.init_args.scale=0"],
    "guided, VAE decoder": ["--model.guidance.init_args.scale=0.3", "--model.guidance.init_args.decoder=vae"],
    "guided, tiny decoder": [
        "--model.guidance.init_args.scale=0.3",
        "--model.guidance.init_args.decoder=tiny",
        "--model.tiny_vae={tiny}",
    ],
    "guided every 2nd step": ["--model.guidance.init_args.scale=0.3", "--model.guidance.init_args.every_k=2"],
}


def run(folder: Path, name: str, args: argparse.Namespace, pipeline: Path, extra: list[str]) -> list[dict]:
    seeds = ", ".join(str(seed) for seed in range(args.items))
    command = tiny_args(
        pipeline,
        name,
        f"--trainer.logger.init_args.save_dir={folder}",
        f"--data.seeds=[{seeds}]",
        *extra,
        size=args.size,
        steps=args.steps,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(command)
    (manifest,) = (folder / name).glob("version_*/predictions.jsonl")
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--items", type=int, default=4, help="items per setting (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        pipeline = build_tiny_pipeline(folder / "tiny-sd")
        tiny = build_tiny_autoencoder(folder / "tiny-taesd")
        rows = []
        for index, (label, extra) in enumerate(SETTINGS.items()):
            extra = [arg.format(tiny=tiny) for arg in extra]
            records = run(folder, f"run{index}", args, pipeline, extra)
            timings = [record["seconds_per_step"] for record in records[1:]] or [records[0]["seconds_per_step"]]
            final = [record["final_style_loss"] for record in records if record["final_style_loss"] is not None]
            rows.append((label, statistics.median(timings), statistics.mean(final) if final else None))
    base = rows[0][1]
    print(f"tiny pipeline, {args.size} px, {args.steps} DDIM steps, CFG on, torch threads {torch.get_num_threads()}")
    print(f"{'setting':<32} {'s/step':>9} {'x unguided':>11} {'final style loss':>17}")
    for label, seconds, final in rows:
        loss = f"{final:.3e}" if final is not None else "-"
        print(f"{label:<32} {seconds:>9.4f} {seconds / base:>11.2f} {loss:>17}")


if __name__ == "__main__":
    main_()
