"""``model.lbfgs_safeguard``: true L-BFGS pairs after clipping, a jump undone, the steps after it shortened."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.errors import NSTError
from lightning_nst.nst.safeguard import (
    AUTO_FACTOR,
    LBFGSSafeguard,
    check_safeguard_factor,
    guarded,
    record_actual_step,
    safeguard_factors,
)
from tests.conftest import PARTIAL_WEIGHTS_FILE, require_shared

OBJECTIVE = Objective("conv1_2", content_layers=["conv1_2"])
LBFGS = partial(torch.optim.LBFGS, lr=1.0, max_iter=1, history_size=20, line_search_fn=None)
JUMP = 6  # the step at whose end Perturb throws the image away; the image step JUMP + 1 starts from is noise


class Perturb(L.Callback):
    """Replace the image parameter by seeded noise at the end of step ``at``: a deterministic jump of the loss."""

    def __init__(self, at: int | None = JUMP) -> None:
        self.at = at

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step - 1 == self.at:  # global_step already counts the step that ended
            parameter = pl_module.images[0]
            noise = torch.rand(pl_module.decode(parameter).shape, generator=torch.Generator().manual_seed(1)) > 0.5
            parameter.copy_(pl_module.encode(noise.float()))


class Record(L.Callback):
    """Each step's reported loss and, after each step, the parameter."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.after: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.losses.append(pl_module._current[OBJECTIVE.name]["total"])
        self.after.append(pl_module.images[0].detach().clone())


def fit(
    folder: Path, factor: float | str | None, steps: int = 12, at: int | None = JUMP, size: int = 32, **kwargs: Any
) -> tuple[Record, ImageOptimization]:
    model = ImageOptimization([OBJECTIVE], optimizer=LBFGS, lbfgs_safeguard=factor, **kwargs)
    record = Record()
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(folder), precision="32-true",
        callbacks=[Perturb(at), record, ImageWriter(output_dir=str(folder), snapshot_every=0, overwrite=True)],
    )  # fmt: skip
    trainer.fit(model, ImageTargets(content="skimage:astronaut", size=size))
    return record, model


def worst_rise(losses: list[float]) -> float:
    """The largest ratio of a step's loss to the best loss before it."""
    best, worst = math.inf, 1.0
    for loss in losses:
        if math.isfinite(best):
            worst = max(worst, loss / best)
        best = min(best, loss)
    return worst


@pytest.mark.parametrize("parameterization", ["pixels", "laplacian"])
def test_a_jump_is_undone_and_the_next_step_is_shorter(parameterization: str, tmp_path: Path) -> None:
    vgg = VGGConfig(weights="random")
    off, _ = fit(tmp_path / "off", None, vgg=vgg, parameterization=parameterization, at=JUMP)
    on, model = fit(tmp_path / "on", 2.0, vgg=vgg, parameterization=parameterization, at=JUMP)
    # The perturbation is a jump for plain L-BFGS (measured: 3.5x the best on random weights with the laplacian).
    assert off.losses[JUMP + 1] > 3 * min(off.losses[: JUMP + 1])
    assert model.safeguard is not None and model.safeguard.rejected == [1]
    # The rejected step reports the image it went back to, which is the one step JUMP started from...
    assert on.losses[JUMP + 1] == on.losses[JUMP]
    assert torch.equal(on.after[JUMP + 1], on.after[JUMP - 1])
    assert worst_rise(on.losses) < 2.0
    # ... and the step taken from it again is at most half as long as the rejected one.
    rejected = torch.linalg.vector_norm(on.after[JUMP] - on.after[JUMP - 1])
    retaken = torch.linalg.vector_norm(on.after[JUMP + 2] - on.after[JUMP + 1])
    assert 0 < retaken <= 0.5 * rejected * (1 + 1e-5)


def test_lbfgs_records_the_step_actually_taken_after_clipping() -> None:
    image = torch.nn.Parameter(torch.full((1, 3, 4, 4), 0.5))
    optimizer = torch.optim.LBFGS([image], lr=1.0, max_iter=1)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((image - 3.0) ** 2).sum()  # pulls every pixel far beyond 1
        loss.backward()
        return loss

    for _ in range(3):
        start = image.detach().clone()
        optimizer.step(closure)
        with torch.no_grad():
            image.clamp_(0, 1)
        record_actual_step(optimizer, image, start)
        state = optimizer.state[image]
        assert torch.allclose(state["d"] * state["t"], (image.detach() - start).reshape(-1))


def test_plain_lbfgs_jumps_where_the_default_does_not(tmp_path: Path) -> None:
    """The conv1_2 reconstruction of docs/benchmarks.md, shortened: plain L-BFGS rises far above its best, the
    default (``auto``, which guards this objective) does not."""
    weights = require_shared(PARTIAL_WEIGHTS_FILE)
    vgg = VGGConfig(weights=str(weights), fill_missing=True)
    off, plain = fit(tmp_path / "off", None, steps=120, at=None, size=64, vgg=vgg)
    on, safe = fit(tmp_path / "on", "auto", steps=120, at=None, size=64, vgg=vgg)
    # Measured: plain 72.6x its best so far and best 7.5e-4; safeguarded 1.61x and 4.8e-4.
    assert worst_rise(off.losses) > 10
    assert worst_rise(on.losses) < 2
    assert safe.best_loss[0] < plain.best_loss[0]


def test_auto_guards_the_block_1_reconstructions_only() -> None:
    objectives = [
        Objective("conv1_1", content_layers=["conv1_1"]),
        Objective("relu1_2", content_layers={"relu1_2": 1.0}),
        Objective("both", content_layers=["conv1_1", "conv1_2"]),
        Objective("conv2_1", content_layers=["conv2_1"]),
        Objective("pool1", content_layers=["pool1"]),
        Objective("shallow_and_deep", content_layers=["conv1_1", "conv2_1"]),
        Objective("with_style", content_layers=["conv1_2"], style_layers=["conv1_1"]),
        Objective("with_tv", content_layers=["conv1_2"], tv_weight=1e-3),
        Objective("texture", style_layers=["conv1_1"]),
    ]
    guarded_ones = [AUTO_FACTOR] * 3 + [None] * 6
    assert safeguard_factors("auto", objectives) == guarded_ones
    assert safeguard_factors(3.0, objectives) == [3.0] * 9
    assert safeguard_factors(None, objectives) == [None] * 9
    model = ImageOptimization(objectives)  # the default is auto
    assert model.safeguard is not None and model.safeguard.factors == guarded_ones
    assert ImageOptimization(objectives[3:]).safeguard is None, "nothing to guard: plain L-BFGS, no safeguard"
    assert ImageOptimization(objectives, lbfgs_safeguard=None).safeguard is None


def test_a_safeguarded_fit_resumes_exactly(tmp_path: Path) -> None:
    """The safeguard's record (accepted image, radius) is in the checkpoint: a resumed run equals a straight one."""
    vgg = VGGConfig(weights="random")
    straight, _ = fit(tmp_path / "straight", 2.0, steps=12, vgg=vgg)
    model = ImageOptimization([OBJECTIVE], optimizer=LBFGS, lbfgs_safeguard=2.0, vgg=vgg)
    saved = model.safeguard.state_dict()  # type: ignore[union-attr]
    fresh = LBFGSSafeguard([2.0])
    fresh.load_state_dict(saved, torch.device("cpu"))
    assert fresh.state_dict() == saved
    first = ImageOptimization([OBJECTIVE], optimizer=LBFGS, lbfgs_safeguard=2.0, vgg=vgg)
    checkpoints = tmp_path / "ckpt"
    trainer = L.Trainer(
        max_steps=JUMP + 2, max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path / "a"), precision="32-true",
        callbacks=[Perturb(), L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoints, save_last=True),
                   ImageWriter(output_dir=str(tmp_path / "a"), snapshot_every=0, overwrite=True)],
    )  # fmt: skip
    trainer.fit(first, ImageTargets(content="skimage:astronaut", size=32))
    assert first.safeguard is not None and first.safeguard.rejected == [1]  # the checkpoint is taken after a rejection
    resumed = ImageOptimization([OBJECTIVE], optimizer=LBFGS, lbfgs_safeguard=2.0, vgg=vgg)
    record = Record()
    trainer = L.Trainer(
        max_steps=12, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path / "b"), precision="32-true",
        callbacks=[record, ImageWriter(output_dir=str(tmp_path / "b"), snapshot_every=0, overwrite=True)],
    )  # fmt: skip
    last = str(checkpoints / "last.ckpt")  # this test's own file, whose hyperparameters hold Objective dataclasses
    trainer.fit(resumed, ImageTargets(content="skimage:astronaut", size=32), ckpt_path=last, weights_only=False)
    assert record.losses == straight.losses[JUMP + 2 :]
    assert torch.equal(record.after[-1], straight.after[-1])


def test_only_single_iteration_lbfgs_without_line_search_is_guarded() -> None:
    image = [torch.nn.Parameter(torch.zeros(1))]
    assert guarded(torch.optim.LBFGS(image, max_iter=1))
    assert not guarded(torch.optim.LBFGS(image, max_iter=1, line_search_fn="strong_wolfe"))
    assert not guarded(torch.optim.LBFGS(image, max_iter=20))
    assert not guarded(torch.optim.Adam(image))


@pytest.mark.parametrize("factor", [0.5, 0, -2, math.inf, math.nan, True, "2", "Auto"])
def test_an_invalid_factor_is_refused_naming_the_key(factor: Any) -> None:
    with pytest.raises(NSTError, match=r"^model\.lbfgs_safeguard: must be auto, a finite number >= 1"):
        check_safeguard_factor(factor)
    with pytest.raises(NSTError, match=r"^model\.lbfgs_safeguard"):
        ImageOptimization([OBJECTIVE], lbfgs_safeguard=factor)
