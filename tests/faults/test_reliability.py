"""Interrupted runs resume exactly; diverging runs stop clearly and keep the last good image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_nst.main import main
from tests.conftest import CONFIGS, REPO

TOY = ["--data.init_args.size=32", "--trainer.max_steps=10", "--model.init_args.vgg.weights=random"]
CHECKPOINT_EVERY_5 = """
trainer:
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 5, save_top_k: 0, save_last: true}
"""


def test_killed_run_resumes_to_the_same_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ckpt.yaml").write_text(CHECKPOINT_EVERY_5)
    (tmp_path / "kill.yaml").write_text(
        CHECKPOINT_EVERY_5 + "    - {class_path: tests.helpers.KillAtStep, init_args: {step: 7}}\n"
    )
    base = ["fit", "-c", str(CONFIGS / "texture_gram.yaml"), *TOY]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "-m", "lightning_nst", *base, "-c", "kill.yaml"], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    interrupted = tmp_path / "logs/texture_gram/version_0"
    assert not (interrupted / "summary.json").exists()
    checkpoint = interrupted / "checkpoints/last.ckpt"
    assert checkpoint.is_file()

    loads: list[object] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    main([*base, "-c", "ckpt.yaml", f"--ckpt_path={checkpoint}"])
    monkeypatch.setattr(torch, "load", real_load)
    assert loads and all(value is True for value in loads), loads  # the checkpoint is loaded safely
    main([*base, "-c", "ckpt.yaml"])
    # The resumed run writes into the interrupted run's folder; version_1 holds its TensorBoard curves only.
    resumed = json.loads((interrupted / "summary.json").read_text())
    straight = json.loads((tmp_path / "logs/texture_gram/version_2/summary.json").read_text())
    assert resumed["resumed_at_step"] == 5 and resumed["steps"] == straight["steps"] == 10
    assert resumed["objectives"]["gram"]["initial_loss"] == straight["objectives"]["gram"]["initial_loss"]
    images = [np.asarray(Image.open(tmp_path / f"logs/texture_gram/version_{v}/gram.png")) for v in (0, 2)]
    np.testing.assert_array_equal(*images)


def test_divergence_names_step_and_term_and_keeps_last_good(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit", "-c", str(CONFIGS / "texture_gram.yaml"), *TOY,
                "--model.init_args.objectives=[{name: big, style_layers: [relu1_1], style_weight: 1.0e+39}]",
            ]
        )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "step 0: objective big, loss term style_gram_relu1_1 is inf" in err
    assert "lower the learning rate (model.optimizer) or the weights (model.objectives)" in err
    kept = tmp_path / "logs/texture_gram/version_0/big.last_good.png"
    assert kept.is_file() and Image.open(kept).size == (32, 32)
