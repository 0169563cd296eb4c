"""Training the fast style networks: losses fall, held-out photos move toward the style, checkpoints, resume, DDP.

Every run here uses 64 px crops of the shipped sample photos, narrow networks and VGG19 weights that exist on every
machine: seeded random weights, or the real partial ImageNet weights (relu1_1..relu3_1) where ``../shared`` has
them. The figures each threshold was set from are stated beside it, for both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import load_image
from lightning_nst.core.metrics import StyleDistance
from lightning_nst.core.vgg import VGGConfig
from lightning_nst.main import main
from lightning_nst.nst.fast.data import SHIPPED_FOLDER, ImageFolders
from lightning_nst.nst.fast.networks import RECORD_KEY, FastNetworkRecord, build_network
from lightning_nst.nst.fast.training import AdaINTraining, FastStyleTraining
from tests.conftest import CONFIGS, PARTIAL_WEIGHTS, REPO

pytestmark = pytest.mark.usefixtures("one_thread")

STYLE = "sample:immunohistochemistry"
WEIGHTS = str(PARTIAL_WEIGHTS) if PARTIAL_WEIGHTS is not None else "random"
LAYERS = ["relu1_1", "relu2_1", "relu3_1"]  # within the partial weights file
# Random weights give features (and Gram matrices) far smaller than ImageNet's: these balance content and style.
STYLE_WEIGHT = 1e4 if PARTIAL_WEIGHTS is not None else 1e5


class LossRecorder(L.Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:  # noqa: D102
        self.losses.append(float(outputs["loss"]))


def folders(**overrides: Any) -> ImageFolders:
    """The shipped sample photos as 64 px crops, 8 of each of the 5 training photos an epoch: 10 batches of 4."""
    options: dict[str, Any] = {
        "images": SHIPPED_FOLDER,
        "style": STYLE,
        "size": 64,
        "batch_size": 4,
        "num_workers": 0,
        "val_count": 1,
        "repeats": 8,
    }
    return ImageFolders(**{**options, **overrides})


def johnson(**overrides: Any) -> FastStyleTraining:
    options: dict[str, Any] = {
        "width": 8,
        "residual_blocks": 1,
        "content_layers": ["relu2_1"],
        "style_layers": LAYERS,
        "style_weight": STYLE_WEIGHT,
        "vgg": VGGConfig(weights=WEIGHTS),
        "log_images_every_n_steps": 0,
    }
    return FastStyleTraining(**{**options, **overrides})


def trainer(root: Path, steps: int, *callbacks: L.Callback, **overrides: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "max_steps": steps,
        "max_epochs": -1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "log_every_n_steps": 1,
        "default_root_dir": str(root),
    }
    return L.Trainer(callbacks=list(callbacks), **{**options, **overrides})


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_johnson_training_lowers_the_loss_and_moves_a_held_out_photo_toward_the_style(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data, module, recorder = folders(), johnson(optimizer=lambda p: torch.optim.Adam(p, lr=3e-3)), LossRecorder()
    trainer(tmp_path, 150, recorder).fit(module, datamodule=data)
    first, last = mean(recorder.losses[:10]), mean(recorder.losses[-10:])
    assert last < first / 2, (first, last)  # measured: random weights 3.6x, partial ImageNet weights 2.4x
    (photo,) = data.val_files  # held out: never a training crop
    image = load_image(photo, 64)
    metric = StyleDistance(VGGConfig(weights=WEIGHTS).build(LAYERS), [load_image(STYLE, 64)], "gram", LAYERS)
    before = float(metric(image))
    metric.reset()
    module.network.eval()
    with torch.no_grad():
        after = float(metric(module.network(image)))
    assert after < before / 4, (before, after)  # measured: random weights 43x closer, partial ImageNet weights 9x


def test_adain_training_lowers_the_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = AdaINTraining(
        encoder_layer="relu2_1",
        vgg=VGGConfig(weights=WEIGHTS),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        log_images_every_n_steps=0,
    )
    recorder = LossRecorder()
    trainer(tmp_path, 60, recorder).fit(module, datamodule=folders(style=None, styles=SHIPPED_FOLDER))
    first, last = mean(recorder.losses[:5]), mean(recorder.losses[-5:])
    assert last < first / 3, (first, last)  # measured: random weights 12.7x, partial ImageNet weights 6.0x


def test_the_checkpoint_holds_the_record_and_the_network_alone(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    module = johnson(log_images_every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=2)
    run = trainer(tmp_path, 4, checkpoint, logger=logger, limit_val_batches=1, val_check_interval=4,
                  check_val_every_n_epoch=None)  # fmt: skip
    run.fit(module, datamodule=folders())
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4
    assert all(key.startswith("network.") for key in saved["state_dict"]), list(saved["state_dict"])
    assert set(saved["state_dict"]) == {f"network.{key}" for key in module.network.state_dict()}
    record = FastNetworkRecord.from_dict(saved[RECORD_KEY], "last.ckpt")
    assert record.kind == "johnson" and record.config == {"width": 8, "residual_blocks": 1}
    assert record.style == STYLE and record.vgg_weights == module.loss_network().vgg.weights_used
    network = build_network(record)
    network.load_state_dict({k.removeprefix("network."): v for k, v in saved["state_dict"].items()})
    photo = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        torch.testing.assert_close(network(photo), module.network.cpu()(photo), rtol=0, atol=0)
    events = EventAccumulator(str(Path(logger.log_dir)))
    events.Reload()
    assert {"train/total", "train/content", "train/style", "train/tv", "val/total"} <= set(events.Tags()["scalars"])
    assert "train/images_per_s" in events.Tags()["scalars"]
    assert "val/stylized" in events.Tags()["images"]
    grid = events.Images("val/stylized")[-1]
    assert grid.width == 2 * 64 + 3 * 2  # input | stylized, padded


def test_the_adain_checkpoint_rebuilds_the_network_exactly(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    module = AdaINTraining(encoder_layer="relu2_1", vgg=VGGConfig(weights="random"), log_images_every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    run = trainer(tmp_path, 2, checkpoint, logger=logger)
    run.fit(module, datamodule=folders(style=None, styles=SHIPPED_FOLDER))
    events = EventAccumulator(str(Path(logger.log_dir)))
    events.Reload()
    assert events.Images("val/stylized")[-1].width == 3 * 64 + 4 * 2  # content | style | output
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    record = FastNetworkRecord.from_dict(saved[RECORD_KEY], "last.ckpt")
    assert record.kind == "adain" and record.config == {"encoder_layer": "relu2_1"}
    assert record.vgg_weights == "random (seed 0)"
    assert any(key.startswith("network.encoder.") for key in saved["state_dict"])
    network = build_network(record)
    network.load_state_dict({k.removeprefix("network."): v for k, v in saved["state_dict"].items()})
    content, style = torch.rand(1, 3, 37, 50), torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(network(content, style), module.network.cpu()(content, style), rtol=0, atol=0)


def test_resume_from_last_ckpt_is_exact(tmp_path: Path) -> None:
    # sliced_w draws random projections every step: the resumed run must draw the ones the whole run drew.
    torch.manual_seed(0)
    whole = johnson(statistic="sliced_w")
    trainer(tmp_path / "whole", 14).fit(whole, datamodule=folders())
    first = ModelCheckpoint(dirpath=tmp_path / "part", save_last=True, every_n_train_steps=7)
    torch.manual_seed(0)  # the same initial network
    trainer(tmp_path / "part", 7, first).fit(johnson(statistic="sliced_w"), datamodule=folders())
    torch.manual_seed(123)  # neither the data nor the module may depend on the global generator
    resumed = johnson(statistic="sliced_w")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "part", 14).fit(resumed, datamodule=folders(), ckpt_path=tmp_path / "part" / "last.ckpt")
    assert not [str(w.message) for w in caught if "not resumable" in str(w.message)]  # it is, as checked below
    # Step 7 is mid-epoch (10 batches an epoch) and step 10 ends one, so the data's position and epochs are checked.
    assert resumed.global_step == whole.global_step == 14
    for (name, value), expected in zip(resumed.network.state_dict().items(), whole.network.state_dict().values(),
                                       strict=True):  # fmt: skip
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("kind", ["johnson", "adain"])
def test_bf16_mixed_training_stays_finite(tmp_path: Path, kind: str) -> None:
    recorder = LossRecorder()
    if kind == "johnson":
        module: L.LightningModule = johnson(statistic="meanvar")
        data = folders()
    else:
        module = AdaINTraining(encoder_layer="relu2_1", vgg=VGGConfig(weights="random"), log_images_every_n_steps=0)
        data = folders(style=None, styles=SHIPPED_FOLDER)
    trainer(tmp_path, 3, recorder, precision="bf16-mixed").fit(module, datamodule=data)
    assert len(recorder.losses) == 3 and all(torch.isfinite(torch.tensor(recorder.losses)))


def test_a_blend_weighing_one_style_zero_is_that_style_alone() -> None:
    crops = {"content": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(0)
    single = johnson(style="sample:brick", style_size=32)
    torch.manual_seed(0)
    blend = johnson(style=["sample:brick", "sample:gravel"], style_weights=[1.0, 0.0], style_size=32)
    with torch.no_grad():
        alone, mixed = single.losses(crops), blend.losses(crops)
    torch.testing.assert_close(mixed["style"], alone["style"], rtol=1e-6, atol=0)  # random weights: ~1e-8
    with torch.no_grad():
        even = johnson(style=["sample:brick", "sample:gravel"], style_size=32).losses(crops)
    assert not torch.allclose(even["style"], alone["style"], rtol=0.01, atol=0)


def test_a_missing_style_is_named(tmp_path: Path) -> None:
    with pytest.raises(NSTError, match="^data.style: no style image"):
        trainer(tmp_path, 1).fit(johnson(), datamodule=folders(style=None))
    with pytest.raises(NSTError, match="^model.statistic: must be one of"):
        johnson(statistic="histogram")
    with pytest.raises(NSTError, match="^model.encoder_layer: must be a ReLU layer"):
        AdaINTraining(encoder_layer="pool2", vgg=VGGConfig(weights="random"))


def test_fit_with_the_shipped_config_through_the_command(tmp_path: Path) -> None:
    main([
        "fit", "-c", str(CONFIGS / "fast_style_train.yaml"), "--trainer.max_steps=3", "--data.init_args.size=64",
        "--data.init_args.num_workers=0", "--model.init_args.width=8", "--model.init_args.vgg.weights=random",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    (last,) = Path("logs").glob("fast_style_train/version_0/checkpoints/last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and saved[RECORD_KEY]["style"] == STYLE


@pytest.mark.slow
def test_two_cpu_processes_train_under_ddp(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "lightning_nst", "fit", "-c", str(CONFIGS / "fast_style_train.yaml"),
        "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=4",
        "--trainer.enable_progress_bar=false", "--data.init_args.size=64", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2", "--model.init_args.width=8", "--model.init_args.vgg.weights=random",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stdout + done.stderr
    (last,) = tmp_path.glob("logs/fast_style_train/version_0/checkpoints/last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and saved[RECORD_KEY]["kind"] == "johnson"
