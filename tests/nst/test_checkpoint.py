"""The resume state's version: written by every checkpoint, a newer one refused in one line, none read as before."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.errors import NSTError
from lightning_nst.main import main
from lightning_nst.nst.checkpoint import RESUME_KEY, RESUME_VERSION, seal
from tests.faults.test_fit_faults import EVERY_5, QUIET, RUN, TEXTURE, TOY, fails


def with_version(source: Path, target: Path, version: int | None) -> Path:
    """A copy of the checkpoint ``source`` whose resume state has ``version`` (``None``: no version), resealed."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)  # this test's own file
    checkpoint[RESUME_KEY].pop("version")
    if version is not None:
        checkpoint[RESUME_KEY]["version"] = version
    seal(checkpoint)  # as the version that wrote it would have
    torch.save(checkpoint, target)
    return target


def test_the_cli_writes_the_version_refuses_a_newer_one_and_resumes_one_without(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main([*TEXTURE, *TOY, QUIET, EVERY_5])
    last = RUN / "version_0/checkpoints/last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)[RESUME_KEY]["version"] == RESUME_VERSION

    newer = with_version(last, Path("newer.ckpt"), RESUME_VERSION + 1)
    err = fails([*TEXTURE, *TOY, QUIET, "--trainer.max_steps=14", f"--ckpt_path={newer}"], capsys)
    assert err.startswith(f"lightning-nst: error: ckpt_path: {newer} was saved by a newer lightning_nst"), err
    assert f"resume state version {RESUME_VERSION + 1}" in err and len(err.splitlines()) == 1, err
    assert not (RUN / "version_1").exists()

    older = with_version(last, Path("older.ckpt"), None)  # as every checkpoint saved before versions were recorded
    main([*TEXTURE, *TOY, QUIET, "--trainer.max_steps=14", f"--ckpt_path={older}"])
    summary = json.loads((RUN / "version_1/summary.json").read_text())
    assert summary["resumed_at_step"] == 10 and summary["steps"] == 14


def fit(folder: Path, steps: int, ckpt_path: Path | None = None) -> L.Trainer:
    objective = Objective("gram", style_layers=["relu1_1", "relu2_1"], style_weight=1e6)
    model = ImageOptimization(
        [objective], vgg=VGGConfig(weights="random"), optimizer=partial(torch.optim.LBFGS, lr=1.0, max_iter=1)
    )
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ImageWriter(output_dir=str(folder), snapshot_every=0)],
    )  # fmt: skip
    # A module built in Python keeps its Objective instances in the hyperparameters: this test trusts its own files.
    trainer.fit(model, ImageTargets(style=["skimage:gravel"], size=32), ckpt_path=ckpt_path, weights_only=False)
    return trainer


def test_trainer_fit_refuses_a_newer_version_in_one_line_and_resumes_one_without(tmp_path: Path) -> None:
    trainer = fit(tmp_path / "first", steps=3)
    saved = tmp_path / "first.ckpt"
    trainer.save_checkpoint(saved)
    newer = with_version(saved, tmp_path / "newer.ckpt", RESUME_VERSION + 1)
    with pytest.raises(NSTError) as error:
        fit(tmp_path / "newer", steps=5, ckpt_path=newer)
    message = str(error.value)
    assert message.startswith(f"ckpt_path: {newer} was saved by a newer lightning_nst"), message
    assert "\n" not in message
    older = with_version(saved, tmp_path / "older.ckpt", None)
    fit(tmp_path / "older", steps=5, ckpt_path=older)
    summary = json.loads((tmp_path / "older/summary.json").read_text())
    assert summary["resumed_at_step"] == 3 and summary["steps"] == 5
