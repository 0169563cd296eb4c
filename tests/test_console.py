from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lightning_nst import console
from lightning_nst.cli import run
from lightning_nst.console import NSTRichProgressBar, NSTTQDMProgressBar, format_metric, guidance_line
from tests.conftest import CONFIGS, REPO
from tests.tiny_pipeline import tiny_args

TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://x) to enable it"
LEAF = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()`"
NOISE = ("💡", "LeafSpec", "TPU available", "accelerate", "v_num", "Downloading")
TOY_FIT = [
    "fit",
    "--config",
    str(CONFIGS / "style_transfer_gram.yaml"),
    "--config",
    str(CONFIGS / "cpu.yaml"),
    "--data.init_args.size=32",
    "--trainer.max_steps=3",
    "--model.init_args.vgg.weights=random",
]


def test_format_metric_is_scientific() -> None:
    assert format_metric(1.234e-6) == "1.23e-06"
    assert format_metric(torch.tensor(0.5)) == "5.00e-01"
    assert format_metric(3) == 3 and format_metric("x") == "x" and format_metric(float("nan")) == "nan"


def test_known_warnings_and_lines_are_filtered_and_no_others() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet()
        warnings.warn(LEAF, FutureWarning, stacklevel=1)
        warnings.warn("`isinstance(x, Other)` is deprecated", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["`isinstance(x, Other)` is deprecated"]

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        rank_zero_info(TIP)
        rank_zero_info("TPU available: False, using: 0 TPU cores")
        rank_zero_info("TPU available: True, using: 8 TPU cores")
        rank_zero_info("Tip: something else")
    finally:
        logger.removeHandler(handler)
    assert lines == ["TPU available: True, using: 8 TPU cores", "Tip: something else"]


def test_guidance_line_is_one_readable_line() -> None:
    settings = {
        "scale": 0.2,
        "window": [0.0, 0.8],
        "every_k": 2,
        "normalize": True,
        "decoder": "vae",
        "guidance_size": 256,
        "style_size": 512,
        "layers": {"relu1_1": 0.5, "relu2_1": 0.5},
        "statistic": "gram",
        "vgg_weights": "random (seed 0)",
        "pooling": "max",
    }
    line = guidance_line(settings)
    assert "\n" not in line and "{" not in line and "'" not in line
    assert line.startswith("scale 0.2 (RMS-normalised), every 2 steps from 0% to 80% of the steps; gram on relu1_1")
    assert "(0.5)" in line and "style images at 512 px" in line and line.endswith("VGG19 weights: random (seed 0)")
    line = guidance_line({**settings, "recurrence": 2, "recurrence_window": [0.3, 0.7], "descent_steps": 3})
    assert "guided steps from 30% to 70% redone 2 more time(s) (recurrence), 3 descent steps each;" in line


def test_cli_installs_its_progress_bar_unless_one_is_configured(one_thread: None) -> None:
    assert type(run([*TOY_FIT, "--trainer.max_steps=1"]).trainer.progress_bar_callback) in (
        NSTRichProgressBar,
        NSTTQDMProgressBar,
    )
    own = run([*TOY_FIT, "--trainer.max_steps=1", "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"])
    assert type(own.trainer.progress_bar_callback) is TQDMProgressBar
    assert (
        run([*TOY_FIT, "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"]).trainer.progress_bar_callback
        is None
    )


def _console(args: list[str]) -> str:
    """What ``python -m lightning_nst ARGS`` prints (stdout and stderr), as a user's terminal would show it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_nst", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_fit_console_has_no_noise_and_a_scientific_loss() -> None:
    output = _console(TOY_FIT)
    assert [word for word in NOISE if word in output] == []
    assert re.search(r"loss: \d\.\d\de-\d\d", output), output[-2000:]
    assert "Results: logs/style_transfer_gram/version_0" in output


def test_predict_console_has_no_noise_and_one_guidance_line(pipeline_dir: Path) -> None:
    import diffusers.utils

    assert diffusers.utils.is_accelerate_available()  # else diffusers warns on every load
    args = [arg for arg in tiny_args(pipeline_dir, "quiet", steps=2) if arg != "--trainer.enable_progress_bar=false"]
    output = _console(args)
    assert [word for word in NOISE if word in output] == []
    (line,) = [line for line in output.splitlines() if line.startswith("Style guidance: ")]
    assert (
        line.startswith("Style guidance: scale 0.2 (RMS-normalised), every step; gram on relu1_1") and "{" not in line
    )
    assert "VGG19 weights: " in line
