"""Coarse-to-fine (model.scales, model.scale_steps, model.avg_decay): one fit over several sizes."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.main import main
from lightning_nst.nst.scales import IterateAverage, resize_optimizer_state
from lightning_nst.nst.tiling import tiled_terms
from tests.conftest import CONFIGS

TRANSFER = Objective("t", content_layers=["relu2_1"], style_layers=["relu1_1", "relu2_1"], style_weight=1e4)
ADAM = partial(torch.optim.Adam, lr=0.02)
LBFGS = partial(torch.optim.LBFGS, lr=1.0, max_iter=1, history_size=10)


class FirstLosses(L.Callback):
    """The total loss each step starts from, with the scale it ran at."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.rows.append((trainer.global_step, pl_module.coarse.scale, pl_module._current["t"]["total"]))


def fit(folder: Path, steps: int = 6, optimizer: Any = ADAM, **options: Any) -> tuple[ImageOptimization, L.Trainer]:
    model = ImageOptimization([TRANSFER], vgg=VGGConfig(weights="random"), optimizer=optimizer, **options)
    data = ImageTargets(content="skimage:astronaut", style=["skimage:gravel"], size=64)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ImageWriter(output_dir=str(folder), snapshot_every=0), FirstLosses()],
    )  # fmt: skip
    trainer.fit(model, data)
    return model, trainer


def first_losses(trainer: L.Trainer) -> list[tuple[int, int, float]]:
    return next(c for c in trainer.callbacks if isinstance(c, FirstLosses)).rows


def test_two_scales_run_in_one_fit_and_the_second_starts_from_the_first(tmp_path: Path) -> None:
    model, trainer = fit(tmp_path / "c2f", scales=[32, 64], scale_steps=[4, 2])
    assert trainer.global_step == 6
    with Image.open(tmp_path / "c2f/t.png") as image:
        assert image.size == (64, 64)
    scales = json.loads((tmp_path / "c2f/summary.json").read_text())["scales"]
    assert [(s["long_edge"], s["size"], s["steps"]) for s in scales] == [(32, [32, 32], 4), (64, [64, 64], 2)]
    assert all(s["seconds"] > 0 for s in scales)
    rows = first_losses(trainer)
    assert [scale for _, scale, _ in rows] == [0, 0, 0, 0, 1, 1]
    upsampled_start = rows[4][2]
    _, fresh = fit(tmp_path / "fresh", steps=1)  # the same objective started from noise at 64 px
    fresh_start = first_losses(fresh)[0][2]
    # measured 0.57 (random weights, Adam, 4 steps at 32 px)
    assert upsampled_start < 0.8 * fresh_start, (upsampled_start, fresh_start)


@pytest.mark.parametrize("parameterization", ["laplacian", "fourier"])
def test_other_parameterizations_run_coarse_to_fine_with_adam_restarted(tmp_path: Path, parameterization: str) -> None:
    model, trainer = fit(tmp_path, scales=[32, 64], scale_steps=[3, 3], parameterization=parameterization)
    (parameter,) = model.images
    assert int(trainer.optimizers[0].state[parameter]["step"]) == 3  # a pyramid's or spectrum's moments restart
    with Image.open(tmp_path / "t.png") as image:
        assert image.size == (64, 64)
    rows = first_losses(trainer)
    assert [scale for _, scale, _ in rows] == [0, 0, 0, 1, 1, 1] and all(
        torch.isfinite(torch.tensor(r[2])) for r in rows
    )


def test_adam_moments_are_resized_and_its_step_count_carried(tmp_path: Path) -> None:
    model, trainer = fit(tmp_path, scales=[32, 64], scale_steps=[3, 3])
    (parameter,) = model.images
    state = trainer.optimizers[0].state[parameter]
    assert parameter.shape == (1, 3, 64, 64)
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == parameter.shape
    assert int(state["step"]) == 6  # bias correction goes on from the first scale

    adam = torch.optim.Adam([small := torch.nn.Parameter(torch.rand(1, 3, 8, 8))], lr=0.1)
    small.grad = torch.rand_like(small) + 0.5  # positive: interpolation keeps the mean
    adam.step()
    resized = resize_optimizer_state(adam.state_dict(), small.shape, (16, 12))["state"][0]
    assert resized["exp_avg"].shape == resized["exp_avg_sq"].shape == (1, 3, 16, 12)
    assert float(resized["exp_avg_sq"].min()) >= 0 and float(resized["step"]) == 1
    ratio = 8 * 8 / (16 * 12)  # a mean loss's pixel gradients shrink with the pixel count
    before = adam.state[small]
    assert float(resized["exp_avg"].abs().mean()) == pytest.approx(
        ratio * float(before["exp_avg"].abs().mean()), rel=0.1
    )
    assert float(resized["exp_avg_sq"].mean()) == pytest.approx(ratio**2 * float(before["exp_avg_sq"].mean()), rel=0.1)
    assert adam.state[small]["exp_avg"].shape == (1, 3, 8, 8)  # the optimizer's own state is left alone


def test_lbfgs_restarts_at_each_scale(tmp_path: Path) -> None:
    model, trainer = fit(tmp_path, optimizer=LBFGS, scales=[32, 48, 64])
    assert model.images[0].shape == (1, 3, 64, 64) and trainer.global_step == 6
    assert trainer.optimizers[0].state[model.images[0]]["n_iter"] == 2  # the last scale's two steps only
    scales = json.loads((tmp_path / "summary.json").read_text())["scales"]
    assert [(s["long_edge"], s["size"], s["steps"]) for s in scales] == [(32, [32, 32], 2), (48, [48, 48], 2),
                                                                         (64, [64, 64], 2)]  # fmt: skip


def test_avg_decay_output_is_the_finite_average_not_the_last_iterate(tmp_path: Path) -> None:
    model, _ = fit(tmp_path, scales=[32, 64], avg_decay=0.9)
    (result,) = model.results()
    last = model.image
    assert result.image.shape == last.shape == (1, 3, 64, 64)
    assert bool(torch.isfinite(result.image).all())
    assert float((result.image - last).abs().max()) > 1e-3
    with Image.open(tmp_path / "t.png") as written:
        png = torch.from_numpy(np.asarray(written)).permute(2, 0, 1).float() / 255
    assert float((png - result.image[0]).abs().max()) <= 1 / 255 + 1e-6  # the PNG is the average


@pytest.mark.parametrize("color", ["luminance", "match", "histogram"])
def test_colour_modes_run_coarse_to_fine(color: str, tmp_path: Path) -> None:
    objective = Objective("t", content_layers=["relu2_1"], style_layers=["relu1_1"], style_weight=1e4, color=color)
    model = ImageOptimization([objective], vgg=VGGConfig(weights="random"), optimizer=ADAM, scales=[32, 64])
    data = ImageTargets(content="skimage:astronaut", style=["skimage:gravel"], size=64)
    trainer = L.Trainer(
        max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ImageWriter(output_dir=str(tmp_path), snapshot_every=0)],
    )  # fmt: skip
    trainer.fit(model, data)  # the content's chroma and colour statistics follow the scale's size
    with Image.open(tmp_path / "t.png") as image:
        assert image.size == (64, 64)


def test_iterate_average_is_bias_corrected() -> None:
    average = IterateAverage(torch.full((1, 3, 2, 2), 0.4), 0.9)
    torch.testing.assert_close(average.get(), torch.full((1, 3, 2, 2), 0.4))  # no pull toward zero
    average.update(torch.full((1, 3, 2, 2), 1.0))
    torch.testing.assert_close(average.get(), torch.full((1, 3, 2, 2), (0.09 * 0.4 + 0.1 * 1.0) / 0.19))


def test_tensorboard_steps_continue_over_scales(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(
        [
            "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--data.init_args.size=64", "--trainer.max_steps=6",
            "--model.init_args.vgg.weights=random", "--model.init_args.scales=[32,64]",
            "--trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    events = EventAccumulator(str(tmp_path / "logs/texture_gram/version_0")).Reload()
    loss = events.Scalars("loss")
    assert [event.step for event in loss] == [0, 1, 2, 3, 4, 5]
    assert [event.value for event in events.Scalars("scale")] == [32, 32, 32, 64, 64, 64]


BAD = [
    ("--model.init_args.scales=[64,32]", "model.scales: sizes must increase"),
    ("--model.init_args.scales=[16,48]", "model.scales: the last size is the output's long edge, 64 px"),
    ("--model.init_args.scales=[0,64]", "model.scales: give a list of long-edge sizes"),
    ("--model.init_args.scales=[8,64]", "model.scales: 8 px makes a 8x8 image, but the deepest layer needs"),
    ("--model.init_args.scale_steps=[3,3]", "model.scale_steps: needs model.scales"),
    ("--model.init_args.scales=[32,64] --model.init_args.scale_steps=[6]", "model.scale_steps: 1 step counts for 2"),
    ("--model.init_args.scales=[32,64] --model.init_args.scale_steps=[2,2]", "model.scale_steps: they sum to 4, but"),
    ("--model.init_args.avg_decay=1.5", "model.avg_decay: must be a number between 0 and 1"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_scales_are_refused_in_one_line(
    args: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--data.init_args.size=64", "--trainer.max_steps=6",
                "--model.init_args.vgg.weights=random", *args.split(),
            ]
        )  # fmt: skip
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-nst:")]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "logs/texture_gram/version_0").exists()  # no half-written run folder


RESUMABLE = [
    "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--data.init_args.size=64", "--trainer.max_steps=6",
    "--model.init_args.vgg.weights=random", "--model.init_args.scales=[32,64]", "--model.init_args.avg_decay=0.9",
    "--model.init_args.optimizer=torch.optim.Adam", "--model.init_args.optimizer.init_args.lr=0.02",
    "--trainer.enable_progress_bar=false",
    "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {every_n_train_steps: 2,"
    " save_top_k: -1}}]",
]  # fmt: skip
RUN = Path("logs/texture_gram")


def test_resume_across_a_scale_boundary_ends_as_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(RESUMABLE)
    at_2 = RUN / "version_0/checkpoints/epoch=0-step=2.ckpt"  # inside the first scale (32 px, steps 0-2)
    assert torch.load(at_2, weights_only=True)["state_dict"]["images.0"].shape == (1, 3, 32, 32)
    main([*RESUMABLE, f"--ckpt_path={at_2}"])
    whole, resumed = (json.loads((RUN / f"version_{v}/summary.json").read_text()) for v in (0, 1))
    assert resumed["resumed_at_step"] == 2 and [s["long_edge"] for s in resumed["scales"]] == [32, 64]
    assert [s["steps"] for s in resumed["scales"]] == [3, 3]
    np.testing.assert_array_equal(
        np.asarray(Image.open(RUN / "version_0/gram.png")), np.asarray(Image.open(RUN / "version_1/gram.png"))
    )
    assert whole["objectives"]["gram"]["best_loss"] == pytest.approx(resumed["objectives"]["gram"]["best_loss"])
    at_4 = RUN / "version_0/checkpoints/epoch=0-step=4.ckpt"  # inside the second scale: resumes at 64 px
    assert torch.load(at_4, weights_only=True)["state_dict"]["images.0"].shape == (1, 3, 64, 64)
    main([*RESUMABLE, f"--ckpt_path={at_4}"])
    np.testing.assert_array_equal(
        np.asarray(Image.open(RUN / "version_0/gram.png")), np.asarray(Image.open(RUN / "version_2/gram.png"))
    )

    with pytest.raises(SystemExit) as exit_info:
        main([*RESUMABLE, "--model.init_args.scales=[48,64]", f"--ckpt_path={at_2}"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-nst:")]
    assert len(lines) == 1 and "model.scales" in lines[0] and "cannot change" in lines[0], lines
    with pytest.raises(SystemExit) as exit_info:
        main([*RESUMABLE, "--trainer.max_steps=8", f"--ckpt_path={at_2}"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-nst:")]
    assert len(lines) == 1 and "trainer.max_steps" in lines[0] and "cannot change" in lines[0], lines
    assert sorted(path.name for path in RUN.iterdir()) == ["version_0", "version_1", "version_2"]  # none half-written


def test_large_print_config_runs_at_toy_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its tiling at toy size: only the last scale (64 px) exceeds the 48 px tiles.
    tiled: list[tuple[int, ...]] = []

    def counting(vgg: Any, image: Tensor, *args: Any, **kwargs: Any) -> Any:
        tiled.append(tuple(image.shape[-2:]))
        return tiled_terms(vgg, image, *args, **kwargs)

    monkeypatch.setattr("lightning_nst.nst.evaluator.tiled_terms", counting)
    # A toy tile cannot hold relu5_1's exact overlap (160 px), so this one warns.
    with pytest.warns(UserWarning, match="^model.tile_overlap: 16 px is below 160 px"):
        main(
            [
                "fit", "-c", str(CONFIGS / "large_print.yaml"), "--data.init_args.size=64", "--trainer.max_steps=4",
                "--model.init_args.vgg.weights=random", "--model.init_args.scales=[32,45,64]",
                "--model.init_args.scale_steps=null", "--trainer.enable_progress_bar=false",
                "--model.init_args.tile_size=48", "--model.init_args.tile_overlap=16",
            ]
        )  # fmt: skip
    assert tiled and set(tiled) == {(64, 64)}
    run = tmp_path / "logs/large_print/version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert [s["long_edge"] for s in summary["scales"]] == [32, 45, 64]
    assert [s["steps"] for s in summary["scales"]] == [1, 1, 2]
    with Image.open(run / "gram.png") as image:
        assert image.size == (64, 64)
