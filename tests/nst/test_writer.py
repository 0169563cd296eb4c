"""Writers: the module computes, a callback writes (fit: ImageWriter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, StyleDistance, VGGConfig
from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import file_digest
from lightning_nst.core.losses import StyleLoss
from lightning_nst.core.vgg import layer_weights
from lightning_nst.main import main
from lightning_nst.outputs import FitSummary
from tests.conftest import CONFIGS
from tests.test_outputs import OBJECTIVE_KEYS, SUMMARY_KEYS
from tests.tiny_pipeline import REPO

# -- fit: ImageWriter ---------------------------------------------------------------------------------------------

TRANSFER = Objective("t", content_layers=["relu2_1"], style_layers={"relu1_1": 0.3, "relu2_1": 0.7}, style_weight=1e3)
TOY = ["--data.init_args.size=32", "--trainer.max_steps=3", "--model.init_args.vgg.weights=random"]
QUIET = "--trainer.enable_progress_bar=false"


def trainer(folder: Path, steps: int = 3, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(folder), **kwargs,
    )  # fmt: skip


def targets() -> ImageTargets:
    return ImageTargets(content="skimage:astronaut", style=["skimage:gravel"], size=32)


def test_a_trainer_without_a_writer_gets_the_default_one(tmp_path: Path) -> None:
    # The CLI, through the module's configure_callbacks, adds the default writer to a config that lists none.
    main(["fit", "-c", str(CONFIGS / "texture_gram.yaml"), *TOY, "--trainer.callbacks=[]", "--trainer.logger=false",
          f"--trainer.default_root_dir={tmp_path / 'cli'}", "--trainer.max_steps=2"])  # fmt: skip
    assert FitSummary.read(tmp_path / "cli").objectives["gram"].output == "gram.png"

    # A trainer built in Python writes into its logger's run folder, and a second fit (a new version folder) runs.
    for version in (0, 1):
        model = ImageOptimization([TRANSFER], vgg=VGGConfig(weights="random"))
        fit = L.Trainer(max_steps=2, max_epochs=-1, logger=TensorBoardLogger(tmp_path / "tb", name="notebook"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        fit.fit(model, targets())
        run = tmp_path / f"tb/notebook/version_{version}"
        assert FitSummary.read(run).output_dir == str(run.resolve()) and Image.open(run / "t.png").size == (32, 32)
    (result,) = model.results()
    assert result.image.shape[:2] == (1, 3) and bool(result.image.isfinite().all())

    # Without a logger there is no run folder: no default writer, nothing written, the results are the module's.
    bare = ImageOptimization([TRANSFER], vgg=VGGConfig(weights="random"))
    trainer(tmp_path / "root", steps=2).fit(bare, targets())
    assert not (tmp_path / "root").exists() and bare.results()[0].image.shape[-2:] == (32, 32)

    # A trainer's own writer is used as given, not joined by a second one.
    writer = ImageWriter(output_dir=str(tmp_path / "mine"), snapshot_every=0)
    fit = trainer(tmp_path / "other", callbacks=[writer])
    fit.fit(ImageOptimization([TRANSFER], vgg=VGGConfig(weights="random")), targets())
    assert [callback for callback in fit.callbacks if isinstance(callback, ImageWriter)] == [writer]
    assert (tmp_path / "mine/t.png").is_file() and not (tmp_path / "other").exists()


def test_a_diverged_run_without_a_listed_writer_keeps_its_folder(capsys: pytest.CaptureFixture[str]) -> None:
    # The default writer comes after the CLI's clean-up callback; a divergence is no refused run to remove.
    nan_at_2 = "--trainer.callbacks=[{class_path: tests.helpers.NaNGradientAtStep, init_args: {step: 2}}]"
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(CONFIGS / "texture_gram.yaml"), *TOY, QUIET, "--trainer.max_steps=5", nan_at_2])
    assert "as *.last_good.png" in capsys.readouterr().err
    run = Path("logs/texture_gram/version_0")
    assert (run / "gram.last_good.png").is_file() and (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))


def test_the_grid_of_one_objective_shows_content_style_and_result(tmp_path: Path) -> None:
    content = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(content)
    data = ImageTargets(content=str(content), style=["skimage:gravel"], size=32)
    fit = trainer(tmp_path / "with", steps=1, callbacks=[ImageWriter()])
    fit.fit(ImageOptimization([TRANSFER], vgg=VGGConfig(weights="random")), data)
    summary = FitSummary.read(tmp_path / "with")
    assert summary.images == {
        "content": {"path": str(content.resolve()), "sha256": file_digest(content)},
        "style": [{"path": "skimage:gravel", "sha256": None}],
    }
    height, width = Image.open(tmp_path / "with/t.png").size[::-1]
    with Image.open(tmp_path / "with/grid.png") as grid:
        assert grid.size == (3 * width + 4 * 2, height + 2 * 2)  # content | style | result, make_grid's padding 2
        tiles = np.asarray(grid.convert("RGB"))
    with Image.open(tmp_path / "with/t.png") as result:
        last = tiles[2 + 16 : 2 + height, 2 + 2 * (width + 2) : 2 + 2 * (width + 2) + width]  # below the label
        assert np.array_equal(last, np.asarray(result)[16:])

    writer = ImageWriter(grid_inputs=False)
    trainer(tmp_path / "without", steps=1, callbacks=[writer]).fit(
        ImageOptimization([TRANSFER], vgg=VGGConfig(weights="random")), data
    )
    assert Image.open(tmp_path / "without/grid.png").size == (width, height)  # make_grid: one image, no padding
    # Sweeps keep the grid of results.
    sweep = ImageOptimization([TRANSFER, Objective("c", content_layers=["relu1_1"])], vgg=VGGConfig(weights="random"))
    trainer(tmp_path / "sweep", steps=1, callbacks=[ImageWriter()]).fit(sweep, data)
    assert Image.open(tmp_path / "sweep/grid.png").size == (2 * width + 6, height + 4)


def test_results_line_comes_after_the_progress_bar(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = ["fit", "-c", str(CONFIGS / "texture_gram.yaml"), *TOY, "--trainer.max_steps=2"]
    done = subprocess.run([sys.executable, "-m", "lightning_nst", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout
    tail = done.stdout[done.stdout.index("Results: ") :]
    assert "Epoch" not in tail and "it/s" not in tail, done.stdout[-600:]


def test_the_reported_style_distance_is_the_metrics_from_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    init = StyleLoss.__init__

    def counted(self: StyleLoss, target_features: object, statistic: str, **options: object) -> None:
        built.append(statistic)
        init(self, target_features, statistic, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(StyleLoss, "__init__", counted)
    model = ImageOptimization([TRANSFER], vgg=VGGConfig(weights="random"))
    data = targets()
    trainer(tmp_path, callbacks=[ImageWriter(output_dir=str(tmp_path))]).fit(model, data)
    assert built == ["gram", "gram"]  # relu1_1 and relu2_1 once, in on_fit_start; the metric reuses them
    monkeypatch.undo()
    record = FitSummary.read(tmp_path).objectives["t"]
    with Image.open(tmp_path / "t.png") as saved:
        image = torch.from_numpy(np.asarray(saved).copy()).permute(2, 0, 1)[None].float() / 255
    # The summary measures the float image, the PNG holds it in 8 bits: recompute on what was measured.
    result = model.best_images[:1].float()
    assert torch.allclose(result, image, atol=1 / 255 + 1e-6)
    weights = layer_weights(TRANSFER.style_layers, "style_layers")
    scratch = StyleDistance(model.vgg, data.style, "gram", list(weights), weights)
    scratch.update(result)
    assert record.metrics["style_distance_gram"] == pytest.approx(scratch.compute().item(), rel=1e-6)


def test_the_vgg_trunk_is_built_in_configure_model_not_in_init(tmp_path: Path) -> None:
    missing = VGGConfig(weights=str(tmp_path / "nowhere.pth"))
    model = ImageOptimization([TRANSFER], vgg=missing)  # cheap: nothing is loaded yet
    assert model.vgg is None
    with pytest.raises(NSTError, match=r"^model\.vgg\.weights: .*nowhere\.pth"):
        model.configure_model()
    with pytest.raises(NSTError, match=r"^model\.objectives\[0\]\.style_layers: unknown VGG19 layer 'relu9_1'"):
        ImageOptimization([Objective("x", style_layers=["relu9_1"])], vgg=missing)  # layer names: still at once

    # A library user need not call configure_model before objective_loss: the trunk is built on first use.
    model = ImageOptimization([Objective("x", style_layers=["relu1_1"])], vgg=VGGConfig(weights="random"))
    model.style_losses["gram_relu1_1"] = StyleLoss(torch.rand(1, 64, 8, 8), "gram")
    assert model.vgg is None
    terms = model.objective_loss(0, torch.rand(1, 3, 16, 16))
    assert model.vgg is not None and model.vgg.layers == ["relu1_1"] and terms["total"] > 0


def test_the_data_module_is_set_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    setup = ImageTargets.setup

    def counted(self: ImageTargets, stage: str) -> None:
        calls.append(stage)
        setup(self, stage)

    monkeypatch.setattr(ImageTargets, "setup", counted)
    trainer(tmp_path, steps=1).fit(ImageOptimization([TRANSFER], vgg=VGGConfig(weights="random")), targets())
    assert calls == ["fit"]


def test_the_writer_flag_of_predict_sets_the_fit_folder(tmp_path: Path) -> None:
    out = tmp_path / "results"
    main(
        [
            "fit",
            "-c",
            str(CONFIGS / "texture_gram.yaml"),
            *TOY,
            QUIET,
            "--trainer.callbacks.init_args.output_dir",
            str(out),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == SUMMARY_KEYS and list(summary["objectives"]["gram"]) == OBJECTIVE_KEYS
    assert summary["output_dir"] == str(out.resolve()) and summary["grid_sha256"] == file_digest(out / "grid.png")
    assert not list(Path("logs").rglob("*.png"))  # nothing in the run's log folder


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--data.init_args.size=0", "data.size: must be an integer > 0"),
        ("--data.init_args.style_size=-3", "data.style_size: must be an integer > 0 (got -3)"),
        (
            "--trainer.callbacks.init_args.save_every=-1",
            "trainer.callbacks.save_every: must be an integer >= 0 (got -1)",
        ),
        (
            "--trainer.callbacks.init_args.snapshot_every=-1",
            "trainer.callbacks.snapshot_every: must be an integer >= 0 (got -1)",
        ),
    ],
)
def test_restricted_types_are_refused_naming_the_key(flag: str, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONFIGS / "texture_gram.yaml"), *TOY, flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lightning-nst: error: {message}"), err
    assert not Path("logs").exists()
