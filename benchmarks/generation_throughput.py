"""Batch-generation throughput of guided sampling, 1 process against 2 (DDP on CPU), through the real CLI.

Usage: python benchmarks/generation_throughput.py [--items 12] [--steps 10] [--size 64]

Builds the tiny test pipeline (``tests/tiny_pipeline.py``) and runs ``python -m lightning_nst predict -c
configs/guided_diffusion.yaml`` in a subprocess with ``--trainer.devices 1`` and ``--trainer.devices 2
--trainer.strategy ddp``, each once with N and once with 2N items. Throughput is N / (T(2N) - T(N)): the difference
cancels the start-up (imports, process launch, pipeline loading), which would otherwise dominate at this size.
Not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tiny_pipeline import build_tiny_pipeline, tiny_args  # noqa: E402


def wall_time(folder: Path, name: str, pipeline: Path, items: int, devices: int, args: argparse.Namespace) -> float:
    seeds = ", ".join(str(seed) for seed in range(items))
    overrides = [
        f"--trainer.logger.init_args.save_dir={folder}",
        f"--trainer.devices={devices}",
        *(["--trainer.strategy=ddp"] if devices > 1 else []),
        f"--data.seeds=[{seeds}]",
    ]
    command = [
        sys.executable,
        "-m",
        "lightning_nst",
        *tiny_args(pipeline, name, *overrides, size=args.size, steps=args.steps),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=folder)
    elapsed = time.perf_counter() - started
    (manifest,) = (folder / name).glob("version_*/predictions.jsonl")
    lines = manifest.read_text().splitlines()
    if len(lines) != items:
        raise RuntimeError(f"{name}: expected {items} manifest lines, got {len(lines)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=12, help="N; each setting also runs 2N")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        pipeline = build_tiny_pipeline(folder / "tiny-sd")
        rows = []
        for devices in (1, 2):
            small = wall_time(folder, f"d{devices}n1", pipeline, args.items, devices, args)
            large = wall_time(folder, f"d{devices}n2", pipeline, 2 * args.items, devices, args)
            rows.append((devices, small, large, args.items / (large - small)))
    print(f"guided sampling, tiny pipeline, {args.size} px, {args.steps} DDIM steps; N = {args.items} items")
    print(f"{'processes':>9} {'T(N) s':>8} {'T(2N) s':>8} {'items/s':>8} {'speed-up':>9}")
    for devices, small, large, throughput in rows:
        print(f"{devices:>9} {small:>8.1f} {large:>8.1f} {throughput:>8.2f} {throughput / rows[0][3]:>9.2f}")


if __name__ == "__main__":
    main()
