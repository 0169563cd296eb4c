"""Mixed precision and the CUDA layout of the VGG trunk; the `gpu` tests are skipped without CUDA (see conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_nst import ImageOptimization, ImageTargets, NSTError, Objective, VGGConfig
from lightning_nst.core.losses import gram_matrix
from lightning_nst.core.vgg import VGG19Features


def _fit(
    tmp_path: Path, optimizer: Any, steps: int, accelerator: str = "cpu", **trainer: Any
) -> tuple[L.Trainer, ImageOptimization]:
    model = ImageOptimization(
        [Objective("t", style_layers=["relu1_1", "relu2_1"], style_weight=1e6)],
        vgg=VGGConfig(weights="random"),
        optimizer=optimizer,
    )
    fit = L.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer,
    )
    fit.fit(model, ImageTargets(style=["sample:immunohistochemistry"], size=32))
    return fit, model


def _fp16_cpu() -> MixedPrecision:
    # Lightning turns precision="16-mixed" on CPU into bf16-mixed; built by hand, the plugin has a gradient scaler.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**120))


def test_lbfgs_with_a_gradient_scaler_is_refused_naming_the_precision(tmp_path: Path) -> None:
    with pytest.raises(NSTError, match=r"^trainer\.precision: 16-mixed .* L-BFGS"):
        _fit(tmp_path, lambda params: torch.optim.LBFGS(params, max_iter=1), 2, plugins=[_fp16_cpu()])


def test_a_step_the_gradient_scaler_skips_does_not_stop_the_objective(tmp_path: Path) -> None:
    # The huge initial scale overflows the first steps' gradients: the scaler skips them and lowers its scale.
    trainer, model = _fit(tmp_path, lambda params: torch.optim.Adam(params, lr=0.02), 3, plugins=[_fp16_cpu()])
    assert model.stopped_at == [None]
    assert trainer.global_step == 3


def test_the_trunk_runs_channels_last_on_cpu_too_and_its_features_equal_an_nchw_pass() -> None:
    vgg = VGG19Features(["relu2_1"], weights="random")
    image = torch.rand(1, 3, 32, 32)
    features = vgg(image)["relu2_1"]
    assert features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in vgg.trunk.parameters() if p.dim() == 4)
    expected = VGG19Features(["relu2_1"], weights="random", channels_last=False)(image)["relu2_1"]
    assert expected.is_contiguous()
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_a_trunk_channels_last_on_cuda_only_stays_nchw_on_cpu() -> None:
    # The guidance's trunk (diffusion/guidance.py): its batched items' rounding was measured in NCHW on the CPU.
    vgg = VGG19Features(["relu2_1"], weights="random", channels_last="cuda")
    features = vgg(torch.rand(1, 3, 32, 32))["relu2_1"]
    assert features.is_contiguous()
    assert all(p.is_contiguous() for p in vgg.parameters())


@pytest.mark.gpu
def test_trunk_runs_channels_last_and_reduced_precision_on_cuda_statistics_stay_float32() -> None:
    vgg = VGG19Features(["relu2_1"], weights="random").cuda()
    image = torch.rand(1, 3, 64, 64, device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            features = vgg(image)["relu2_1"]
            gram = gram_matrix(features)
        assert features.dtype == dtype
        assert gram.dtype == torch.float32 and torch.isfinite(gram).all()
    assert vgg.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fits_stay_finite_on_cuda(tmp_path: Path, precision: str) -> None:
    trainer, model = _fit(
        tmp_path, lambda params: torch.optim.Adam(params, lr=0.02), 6, accelerator="cuda", precision=precision
    )
    assert trainer.global_step == 6
    assert torch.isfinite(model.image).all()
    losses = [value for row in model._current.values() for value in row.values()]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert model.best_loss[0] < model._initial["t"]["total"]
