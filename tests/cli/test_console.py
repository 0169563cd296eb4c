from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lightning_nst.cli import console
from lightning_nst.cli.console import NSTRichProgressBar, NSTTQDMProgressBar, PlainProgressBar, format_metric
from lightning_nst.cli.lightning import run
from lightning_nst.diffusion.guidance import guidance_line
from tests.conftest import CONFIGS, REPO, cli_error
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
    line = guidance_line({**settings, "vgg_dtype": "bfloat16"})
    assert line.endswith("VGG19 weights: random (seed 0); VGG pass in bfloat16 (vgg_precision auto)")
    line = guidance_line({**settings, "vgg_precision": "float32"})  # before the run has chosen
    assert line.endswith("; vgg_precision float32")


def test_cli_installs_its_progress_bar_unless_one_is_configured(
    one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under pytest standard output is no terminal: plain lines
    assert type(run([*TOY_FIT, "--trainer.max_steps=1"]).trainer.progress_bar_callback) is PlainProgressBar
    monkeypatch.setattr(console, "_is_terminal", lambda stream: stream is sys.stdout)
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


def test_a_plain_progress_interval_must_be_positive(capfd: pytest.CaptureFixture[str]) -> None:
    bar = "--trainer.callbacks+={class_path: lightning_nst.cli.console.PlainProgressBar, init_args: {interval: 0}}"
    line = cli_error(capfd, [*TOY_FIT, bar])
    assert line == "lightning-nst: error: PlainProgressBar.interval: must be a number of seconds > 0 (got 0.0)", line


def _console(args: list[str]) -> str:
    """What ``python -m lightning_nst ARGS`` prints (stdout and stderr), as a user's terminal would show it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_nst", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


PROGRESS = re.compile(
    r"^step (\d+)/12, loss \d\.\d\de[-+]\d\d, \d[\d.e+-]* s/step, (\d+:\d\d left|done in \d+:\d\d)$", re.MULTILINE
)


def test_fit_console_on_a_pipe_has_no_noise_and_plain_progress_lines() -> None:
    """Every second here (``interval: 1``; 15 s by default) a line with the step, the loss, s/step and time left."""
    bar = "--trainer.callbacks+={class_path: lightning_nst.cli.console.PlainProgressBar, init_args: {interval: 1}}"
    slow = "--trainer.callbacks+={class_path: tests.helpers.SlowSteps, init_args: {seconds: 0.3}}"
    output = _console([*TOY_FIT, "--trainer.max_steps=12", bar, slow])  # 12 steps of at least 0.3 s
    assert [word for word in NOISE if word in output] == []
    lines = PROGRESS.findall(output)
    assert len([step for step, end in lines if end.endswith("left")]) >= 2, output[-2000:]  # before it finished
    assert lines[-1][0] == "12" and lines[-1][1].startswith("done in"), output[-2000:]
    steps = [int(step) for step, _ in lines]
    assert steps == sorted(set(steps)) and steps[0] == 1  # one after the first step, none twice
    assert "Results: logs/style_transfer_gram/version_0" in output.split("step 12/12")[1]


def test_predict_console_has_no_noise_and_one_guidance_line(pipeline_dir: Path) -> None:
    import diffusers.utils

    assert diffusers.utils.is_accelerate_available()  # else diffusers warns on every load
    args = [arg for arg in tiny_args(pipeline_dir, "quiet", steps=2) if arg != "--trainer.enable_progress_bar=false"]
    output = _console(args)
    assert [word for word in NOISE if word in output] == []
    (line,) = [line for line in output.splitlines() if line.startswith("Style guidance: ")]
    # its output is a pipe: the default bar is plain lines, here the one at the end
    assert re.search(r"^item 1/1, \d[\d.e+-]* s/item, done in \d+:\d\d$", output, re.MULTILINE), output[-2000:]
    assert (
        line.startswith("Style guidance: scale 0.2 (RMS-normalised), every step; gram on relu1_1") and "{" not in line
    )
    assert "VGG19 weights: " in line


def test_the_command_leaves_its_objects_to_the_system_at_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run on its own command line, main freezes the collector: the exit does not free every object one by one."""
    import gc

    from lightning_nst.main import main

    frozen: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    main(["layers"])  # from Python: the caller's process goes on, its collector untouched
    assert frozen == []
    monkeypatch.setattr(sys, "argv", ["lightning-nst", "layers"])
    main()
    assert frozen == [True] and "conv1_1" in capsys.readouterr().out
