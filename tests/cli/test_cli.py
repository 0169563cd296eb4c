"""End-to-end runs through the real ``lightning-nst`` entry point, at toy sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nst.main import main
from tests.conftest import CONFIGS, require_shared

SHIPPED = [
    "content_reconstruction",
    "texture_gram",
    "texture_meanvar",
    "style_transfer_gram",
    "style_transfer_meanvar",
    "reconstruction_sweep",
    "texture_sweep",
]
ADAM = "{class_path: torch.optim.Adam, init_args: {lr: 0.05}}"


def fit(config: str, *overrides: str, size: int = 32, steps: int = 10, weights: str = "random") -> dict[str, Any]:
    """Run ``lightning-nst fit`` on a shipped config at toy size and return its summary.json."""
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{config}.yaml"),
            f"--data.init_args.size={size}",
            f"--trainer.max_steps={steps}",
            f"--model.init_args.vgg.weights={weights}",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            *overrides,
        ]
    )
    (summary,) = Path("logs").glob(f"{config}/version_*/summary.json")
    return json.loads(summary.read_text())


def assert_real_image(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size and image.mode == "RGB"
        assert np.asarray(image).std() > 2.0  # not a blank image


def event_tags(run_dir: Path, kind: str = "scalars") -> set[str]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()[kind])


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_runs(config: str) -> None:
    summary = fit(config, steps=3)
    out = Path(summary["output_dir"])
    assert out.parent.parent == (Path("logs") / config).resolve().parent and out.name == "version_0"
    for name, objective in summary["objectives"].items():
        assert_real_image(out / objective["output"], (32, 32))
        assert np.isfinite(objective["final_loss"]["total"]), name
    assert (out / "grid.png").is_file() and (out / "config.yaml").is_file()
    assert summary["steps"] == 3 and summary["vgg_weights"] == "random (seed 0)"
    assert "loss" in event_tags(out)


def test_texture_gram_lbfgs_loss_falls_and_logs() -> None:
    summary = fit("texture_gram", size=48, steps=20)
    (objective,) = summary["objectives"].values()
    assert objective["final_loss"]["total"] < objective["initial_loss"]["total"] / 1000  # measured ~1e5
    out = Path(summary["output_dir"])
    tags = event_tags(out)
    assert {"gram/total", "gram/style_gram_relu1_1", "gram/style_gram_relu5_1", "loss"} <= tags
    assert {"result", "vgg_weights/text_summary"} <= event_tags(out, "images") | event_tags(out, "tensors")
    assert summary["seconds_per_step"] > 0 and summary["wall_time_s"] > 0
    assert objective["metrics"]["style_distance_gram"] > 0


def test_texture_meanvar_adam_loss_falls() -> None:
    summary = fit("texture_meanvar", f"--model.init_args.optimizer={ADAM}", size=48, steps=30)
    (objective,) = summary["objectives"].values()
    assert objective["final_loss"]["total"] < objective["initial_loss"]["total"] / 100  # measured ~580


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_content_reconstruction_loss_falls(optimizer: str) -> None:
    overrides = [f"--model.init_args.optimizer={ADAM}"] if optimizer == "adam" else []
    summary = fit("content_reconstruction", *overrides, steps=15)
    (objective,) = summary["objectives"].values()
    assert objective["final_loss"]["total"] < objective["initial_loss"]["total"] / 5  # measured 12-18
    assert {"psnr", "ssim"} <= set(objective["metrics"])


@pytest.mark.parametrize("config", ["style_transfer_gram", "style_transfer_meanvar"])
def test_style_transfer_lowers_style_loss(config: str) -> None:
    summary = fit(config, f"--model.init_args.optimizer={ADAM}", size=48, steps=20)
    (objective,) = summary["objectives"].values()
    initial, final = objective["initial_loss"], objective["final_loss"]
    # Starts from the content image: 0 in float32; 1.1e-6 under bf16-mixed (the default where the CPU has bfloat16
    # units), the bf16 VGG pass's rounding against the float32 target; noise's is ~1e-2 here.
    assert initial["content_relu4_2"] == pytest.approx(0, abs=1e-5)
    style = [term for term in final if term.startswith("style_")]
    assert len(style) == 5
    assert sum(final[t] for t in style) < sum(initial[t] for t in style) / 10  # measured 37-59


def test_sweep_gives_one_image_and_curve_per_objective() -> None:
    summary = fit("reconstruction_sweep", steps=2)
    assert len(summary["objectives"]) == 16
    out = Path(summary["output_dir"])
    assert len(list(out.glob("conv*.png"))) == 16
    tags = event_tags(out)
    assert {f"conv{b}_{i}/total" for b, i in [(1, 1), (3, 4), (5, 4)]} <= tags
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 4 * 32 and grid.size[1] > 4 * 32


def test_bf16_mixed_precision_stays_finite() -> None:
    summary = fit("style_transfer_gram", "--trainer.precision=bf16-mixed", f"--model.init_args.optimizer={ADAM}")
    (objective,) = summary["objectives"].values()
    assert all(np.isfinite(value) for value in objective["final_loss"].values())
    assert summary["precision"] == "bf16-mixed"


def run_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_missing_image_is_one_line_and_leaves_no_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = run_error(
        capsys, "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--data.init_args.style=[missing.png]",
        "--model.init_args.vgg.weights=random",
    )  # fmt: skip
    assert err.count("\n") == 0
    assert err.startswith("lightning-nst: error: data.style[0]: image file not found:") and "missing.png" in err
    assert not list(Path("logs").glob("texture_gram/version_*"))


def test_unknown_layer_names_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    err = run_error(
        capsys, "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--model.init_args.vgg.weights=random",
        "--model.init_args.objectives=[{name: x, style_layers: [relu1_1, rleu2_1]}]",
    )  # fmt: skip
    assert "model.objectives[0].style_layers: unknown VGG19 layer 'rleu2_1'" in err and "relu2_1" in err


def test_layer_deeper_than_weights_file(capsys: pytest.CaptureFixture[str], partial_random_weights: Path) -> None:
    err = run_error(
        capsys, "fit", "-c", str(CONFIGS / "texture_gram.yaml"),
        f"--model.init_args.vgg.weights={partial_random_weights}",
    )  # fmt: skip
    assert "model.vgg.weights:" in err and "relu5_1 was requested" in err and "available layers: conv1_1" in err


def test_negative_weight_and_small_image(capsys: pytest.CaptureFixture[str]) -> None:
    err = run_error(
        capsys, "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--model.init_args.vgg.weights=random",
        "--model.init_args.objectives=[{name: x, style_layers: [relu1_1], style_weight: -1}]",
    )  # fmt: skip
    assert "model.objectives[0].style_weight: must be a finite number >= 0, got -1" in err
    err = run_error(
        capsys, "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--model.init_args.vgg.weights=random",
        "--data.init_args.size=8",
    )  # fmt: skip
    assert "data.style[0]" in err and "8x8 px" in err and "at least 16 px" in err


def test_layers_command(capsys: pytest.CaptureFixture[str]) -> None:
    main(["layers"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 38 and lines[1].split()[:2] == ["0", "conv1_1"] and lines[-1].split()[:2] == ["36", "pool5"]


def test_conv1_1_reconstruction_with_real_weights_reaches_25db(partial_weights: Path) -> None:
    summary = fit(
        "content_reconstruction",
        f"--data.init_args.content={require_shared('data/content/chelsea.png')}",
        "--model.init_args.objectives=[{name: conv1_1, content_layers: [conv1_1]}]",
        size=64,
        steps=100,
        weights=str(partial_weights),
    )
    assert summary["objectives"]["conv1_1"]["metrics"]["psnr"] >= 25.0
    assert "covers conv1_1..relu3_1" in summary["vgg_weights"]


def test_gram_texture_with_real_weights_falls_100x(partial_weights: Path) -> None:
    summary = fit(
        "texture_gram",
        f"--data.init_args.style=[{require_shared('data/style/starry_night.jpg')}]",
        "--model.init_args.objectives=[{name: t, style_layers: [relu1_1, relu2_1, relu3_1], style_weight: 1e6}]",
        size=64,
        steps=100,
        weights=str(partial_weights),
    )
    loss = summary["objectives"]["t"]
    assert loss["final_loss"]["total"] <= loss["initial_loss"]["total"] / 100


def test_existing_results_are_not_overwritten(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["--trainer.max_steps=2", "--data.init_args.size=32", f"--trainer.callbacks.init_args.output_dir={out}"]
    base = ["fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--model.init_args.vgg.weights=random", *args]
    main(base)
    first = (out / "summary.json").read_bytes()
    err = run_error(capsys, *base)
    assert "ImageWriter.output_dir:" in err and "exists" in err and "callbacks.init_args.overwrite true" in err
    assert (out / "summary.json").read_bytes() == first
    main([*base, "--trainer.callbacks.init_args.overwrite=true"])
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_init_from_an_image_file_is_resized_to_the_content() -> None:
    summary = fit("style_transfer_gram", "--model.init_args.init=skimage:coffee", f"--model.init_args.optimizer={ADAM}")
    (objective,) = summary["objectives"].values()
    assert objective["initial_loss"]["content_relu4_2"] > 0  # starts from coffee, not from the astronaut
    assert summary["image_size"] == [32, 32]
    assert_real_image(Path(summary["output_dir"]) / "gram.png", (32, 32))


def test_save_every_keeps_the_image_of_every_nth_step() -> None:
    summary = fit("style_transfer_meanvar", "--trainer.callbacks.init_args.save_every=4", steps=8)
    steps = Path(summary["output_dir"]) / "steps"
    assert sorted(path.name for path in steps.iterdir()) == [f"meanvar_{n:05d}.png" for n in (0, 4, 8)]
    for path in steps.iterdir():
        assert_real_image(path, (32, 32))
    with Image.open(steps / "meanvar_00008.png") as last, Image.open(steps.parent / "meanvar.png") as final:
        assert np.array_equal(np.asarray(last), np.asarray(final))


def test_library_run_returns_the_cli_and_raises_on_a_signal() -> None:
    """``cli.run`` is the library's entry point: it returns the CLI, and a signal is an exception, not an exit."""
    import signal
    import warnings

    from lightning_nst.cli.lightning import NSTCLI, run
    from lightning_nst.core.errors import StoppedBySignal

    args = ["fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--data.init_args.size=32", "--trainer.max_steps=5"]
    args += ["--model.init_args.vgg.weights=random", "--trainer.enable_progress_bar=false"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # LightningCLI's warning about args beside sys.argv
        warnings.filterwarnings("ignore", message=".*(LeafSpec|litlogger|eval mode)")
        cli = run(args)
    assert isinstance(cli, NSTCLI) and cli.trainer.global_step == 5
    before = signal.getsignal(signal.SIGTERM)
    sender = "--trainer.callbacks+={class_path: tests.helpers.SignalAtStep, init_args: {step: 2, signum: 15}}"
    with pytest.raises(StoppedBySignal) as stopped:
        run([*args, sender])
    assert stopped.value.exit_code == 143 and "stopped by SIGTERM at step 2" in stopped.value.message
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are the caller's again
