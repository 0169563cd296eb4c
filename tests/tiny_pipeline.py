"""The tests' tiny pipelines and helpers: the builders of :mod:`~lightning_nst.diffusion.tiny`, ``../shared``'s
vocabulary.

Run as a script, ``python tests/tiny_pipeline.py [--family F] DIR`` saves the pipeline the tests use (with
``../shared``'s CLIP vocabulary where it exists); users run ``python -m lightning_nst.diffusion.tiny`` instead, which
needs
neither pytest nor ``../shared``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from transformers import CLIPTokenizer

from lightning_nst.diffusion import tiny
from lightning_nst.diffusion.module import DenoisingCallback
from lightning_nst.diffusion.tiny import (  # noqa: F401 - the tests import them from here
    FAMILIES,
    LATENT_CHANNELS,
    PIPELINE_CLASSES,
    build_tiny_autoencoder,
    sd_scheduler,
    sdxl_scheduler,
    tiny_t5_tokenizer,
)

try:
    from tests.conftest import CLIP_TOKENIZER, PARTIAL_WEIGHTS, REAL_MODELS, REPO
except ModuleNotFoundError:  # run as a script, `python tests/tiny_pipeline.py FOLDER`: tests/ is on sys.path
    from conftest import CLIP_TOKENIZER, PARTIAL_WEIGHTS, REAL_MODELS, REPO  # type: ignore[no-redef]

GUIDED = REPO / "configs" / "guided_diffusion.yaml"
# The real ImageNet weights (up to relu3_1) and CLIP vocabulary where ../shared holds both (conftest.REAL_MODELS);
# seeded random weights and a byte-level vocabulary elsewhere.
VGG = str(PARTIAL_WEIGHTS) if REAL_MODELS else "random"
LAYERS = "[relu1_1, relu2_1, relu3_1]"
STEPS = 6


def tiny_args(
    pipeline: Path, name: str, *overrides: str, config: Path = GUIDED, size: int = 64, steps: int = STEPS
) -> list[str]:
    """``lightning-nst predict`` on a shipped config, shrunk to the tiny pipeline: 64 px, 6 steps, one item.

    Overrides come last, so they win over these settings (e.g. ``--data.seeds=[0, 1, 2]``).
    """
    return [
        "predict",
        "--config",
        str(config),
        "--model.model",
        str(pipeline),
        f"--model.height={size}",
        f"--model.width={size}",
        f"--model.num_inference_steps={steps}",
        f"--model.guidance.init_args.vgg.weights={VGG}",
        f"--model.guidance.init_args.layers={LAYERS}",
        f"--model.guidance.init_args.guidance_size={size}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--data.prompts=[a red house by a lake]",
        "--data.seeds=[0]",
        *overrides,
    ]


def batch_args(pipeline: Path, out: Path | None, seeds: int, *overrides: str) -> list[str]:
    """A fast batch of ``seeds`` items (2 steps, no guidance) into the fixed folder ``out``, or the log folder."""
    return tiny_args(
        pipeline,
        "batch",
        *([f"--trainer.callbacks.init_args.output_dir={out}"] if out is not None else []),
        f"--data.seeds=[{', '.join(str(seed) for seed in range(seeds))}]",
        "--model.num_inference_steps=2",
        "--model.guidance=null",
        *overrides,
    )


# The same prompt and seed without guidance, with scale 0 (measured, not guided) and guided: a guided run's baselines.
GUIDANCE_VARIANTS = {
    "plain": "--model.guidance=null",
    "scale0": "--model.guidance.init_args.scale=0",
    "guided": "--model.guidance.init_args.scale=0.3",
}


class BatchBound(NamedTuple):
    """How far a batched item's 8-bit image may be from the same item generated alone.

    At most ``levels`` of 255 in any value, in at most ``share`` of the values, by ``mean`` levels on average.
    """

    levels: int
    share: float
    mean: float


# The README's per-family bounds ("Batch generation"), tested at 64 px, 6 steps, guidance scale 0.3, 4 seeds, batch 4
# against 1, each family's shipped config and sampler (test_item_independence.py). Measured with real VGG weights and
# CLIP vocabulary / random ones, the worst of the 4 items (levels, share, mean): unguided every family 1, 0.02 %, 0.00
# (bound 50x the share). Guided, each step's rounding is fed back through the style gradient: SD 2, 9.7 %, 0.10 /
# 1, 0.2 %, 0.00; SDXL 4, 23 %, 0.24 / 1, 0.4 %, 0.00; Flux 12, 56 %, 0.98 / 19, 8.8 %, 0.10; SD3 64, 65 %, 1.98 /
# 65, 38 %, 0.78 (bounds about twice each, so that other CPUs' rounding has room). These are with the VGG pass in
# float32 (model.guidance.vgg_precision); in bfloat16 it rounds each batch's features to 8 bits of mantissa, and the
# guided differences grow: SD 5, 33 %, 0.37 / 3, 7.1 %, 0.07; SDXL 4, 33 %, 0.34 / 2, 3.9 %, 0.04; Flux 39, 85 %,
# 3.2 / 73, 69 %, 2.1; SD3 151, 90 %, 8.5 / 162, 74 %, 2.9 ("guided_bf16", bounds again about twice).
BATCH_BOUNDS: dict[str, dict[str, BatchBound]] = {
    family: {"plain": BatchBound(1, 0.01, 0.01), "guided": guided, "guided_bf16": guided_bf16}
    for family, guided, guided_bf16 in (
        ("sd", BatchBound(4, 0.2, 0.25), BatchBound(10, 0.66, 0.75)),
        ("sdxl", BatchBound(8, 0.45, 0.5), BatchBound(8, 0.66, 0.7)),
        ("sd3", BatchBound(128, 0.9, 4.0), BatchBound(255, 1.0, 17.0)),
        ("flux", BatchBound(40, 0.8, 2.0), BatchBound(150, 1.0, 6.5)),
    )
}


def within(difference: np.ndarray, bound: BatchBound) -> bool:
    """Whether the absolute differences of two 8-bit images (as ints) stay within ``bound``."""
    return bool(difference.max() <= bound.levels and (difference > 0).mean() <= bound.share) and (
        difference.mean() <= bound.mean
    )


def run_ddp(args: list[str], name: str) -> Path:
    """Run ``args`` (``predict`` arguments logging under ``name``) on two CPU processes with DDP; the run folder."""
    command = [sys.executable, "-m", "lightning_nst", *args, "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = Path("logs", name).glob("version_*")
    return run


def records(folder: Path, manifest: str = "predictions.jsonl") -> list[dict[str, Any]]:
    """The manifest's JSON lines."""
    return [json.loads(line) for line in (folder / manifest).read_text(encoding="utf-8").splitlines()]


# The real CLIP vocabulary where ../shared holds it with the real VGG weights (conftest.REAL_MODELS), else the
# package's byte-level one: the pipelines the tests have always built, byte for byte.
VOCABULARY = CLIP_TOKENIZER if REAL_MODELS else None


def tiny_tokenizer(directory: Path) -> CLIPTokenizer:
    """The CLIP tokenizer of the tests' pipelines (:data:`VOCABULARY`)."""
    return tiny.tiny_tokenizer(directory, VOCABULARY)


def build_tiny_pipeline(path: Path, prediction_type: str = "epsilon", family: str = "sd") -> Path:
    """:func:`lightning_nst.diffusion.tiny.build_tiny_pipeline` with the tests' vocabulary (:data:`VOCABULARY`)."""
    return tiny.build_tiny_pipeline(path, prediction_type, family, tokenizer=VOCABULARY)


class SignalAtDenoisingStep(DenoisingCallback):
    """Send SIGTERM to this process at denoising step ``step`` of the ``item``-th batch (counted from 0)."""

    def __init__(self, item: int, step: int) -> None:
        self.item = item
        self.step = step
        self.batches = 0

    def on_predict_batch_end(self, *args: Any) -> None:  # noqa: D102
        self.batches += 1

    def on_denoising_step(self, trainer: Any, pl_module: Any, step_index: int, *args: Any) -> None:  # noqa: D102
        if self.batches == self.item and step_index == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main(args: Sequence[str] | None = None) -> None:
    """The package's command with the tests' vocabulary: ``--tokenizer`` is ``../shared``'s where it exists."""
    args = list(sys.argv[1:] if args is None else args)
    tiny.main(args if VOCABULARY is None or "--tokenizer" in args else [*args, "--tokenizer", str(VOCABULARY)])


if __name__ == "__main__":
    main()
