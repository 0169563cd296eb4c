"""Faults around `lightning-nst fit`: resuming, non-finite values, changed inputs, signals, bad checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.models.vgg import cfgs, make_layers

from lightning_nst.core.files import file_digest
from lightning_nst.main import main
from lightning_nst.nst.checkpoint import seal
from lightning_nst.outputs import FitSummary
from tests.conftest import CONFIGS, REPO
from tests.tiny_pipeline import build_tiny_pipeline, records, tiny_args

TEXTURE = ["fit", "-c", str(CONFIGS / "texture_gram.yaml")]
TOY = ["--data.init_args.size=32", "--trainer.max_steps=10", "--model.init_args.vgg.weights=random"]
QUIET = "--trainer.enable_progress_bar=false"
EVERY_5 = "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {every_n_train_steps: 5, save_top_k: 0, save_last: true}}]"  # noqa: E501
RUN = Path("logs/texture_gram")


def fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, expect status 2 and return its one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-nst:")]
    assert len(lines) == 1 and lines[0].startswith("lightning-nst: error: "), lines
    return lines[0]


@contextlib.contextmanager
def info_lines(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture Lightning's info lines (its logger does not propagate to the root logger that caplog watches)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def summary(version: int) -> dict:
    return json.loads((RUN / f"version_{version}/summary.json").read_text())


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture
def finished() -> Path:
    """A 10-step run whose last checkpoint, at max_steps, says finished (logs/texture_gram/version_0)."""
    main([*TEXTURE, *TOY, QUIET, EVERY_5])
    checkpoint = RUN / "version_0/checkpoints/last.ckpt"
    assert checkpoint.is_file()
    return checkpoint


# -- 1. results after the last checkpoint ------------------------------------------------------------------------


def test_resuming_a_finished_run_writes_results_and_a_larger_max_steps_continues(
    finished: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = file_digest(RUN / "version_0/gram.png")
    with info_lines(caplog):
        main([*TEXTURE, *TOY, QUIET, EVERY_5, f"--ckpt_path={finished}"])
    assert f"Resuming the finished run {RUN / 'version_0'}: results go to this run's folder" in caplog.text
    assert file_digest(RUN / "version_0/gram.png") == before  # a finished run's results are never replaced
    assert (RUN / "version_1/gram.png").is_file() and summary(1)["steps"] == 10
    np.testing.assert_array_equal(pixels(RUN / "version_1/gram.png"), pixels(RUN / "version_0/gram.png"))

    main([*TEXTURE, *TOY, QUIET, EVERY_5, "--trainer.max_steps=14", f"--ckpt_path={finished}"])
    main([*TEXTURE, *TOY, QUIET, "--trainer.max_steps=14"])
    assert summary(2)["steps"] == 14 and summary(2)["resumed_at_step"] == 10
    np.testing.assert_array_equal(pixels(RUN / "version_2/gram.png"), pixels(RUN / "version_3/gram.png"))


# -- 2. non-finite images are never results ----------------------------------------------------------------------


def test_last_good_image_is_finite(capsys: pytest.CaptureFixture[str]) -> None:
    nan_at_2 = "--trainer.callbacks+={class_path: tests.helpers.NaNGradientAtStep, init_args: {step: 2}}"
    err = fails([*TEXTURE, *TOY, QUIET, nan_at_2], capsys)
    assert "step 3: objective gram" in err, err
    assert err.endswith(f"; the last finite images are in {RUN / 'version_0'} as *.last_good.png"), err
    kept = pixels(RUN / "version_0/gram.last_good.png")
    assert kept.std() > 10  # the noise image of step 2, not the black of NaN


@pytest.mark.parametrize("save_every", [0, 1])
def test_non_finite_image_is_never_saved(save_every: int, capsys: pytest.CaptureFixture[str]) -> None:
    nan_at_last = "--trainer.callbacks+={class_path: tests.helpers.NaNGradientAtStep, init_args: {step: 2}}"
    args = [*TEXTURE, *TOY, QUIET, "--trainer.max_steps=3", f"--trainer.callbacks.init_args.save_every={save_every}"]
    args.append(nan_at_last)
    err = fails(args, capsys)
    assert "the image of objective gram holds non-finite values" in err, err
    out = RUN / "version_0"
    assert not (out / "gram.png").exists() and not (out / "grid.png").exists()
    assert not (out / "summary.json").exists()
    if save_every:
        assert (out / "steps/gram_00002.png").is_file() and not (out / "steps/gram_00003.png").exists()


@pytest.mark.parametrize(
    ("lr", "problem"),
    [(".inf", "must be a finite number > 0, got inf"), ("0", "must be a finite number > 0, got 0.0")],
)  # fmt: skip  # a negative one: test_cli_errors.py::test_bad_input
def test_non_finite_or_non_positive_learning_rate_is_refused(
    lr: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails([*TEXTURE, *TOY, f"--model.init_args.optimizer.init_args.lr={lr}"], capsys)
    assert f"model.optimizer.init_args.lr: {problem}" in err, err
    assert not any(RUN.glob("version_*/*.png"))


def test_weights_file_with_nan_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {k: v for k, v in make_layers(cfgs["E"]).state_dict().items() if k.startswith("0.")}
    state["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    args = [*TEXTURE, *TOY, f"--model.init_args.vgg.weights={tmp_path / 'nan.pth'}"]
    err = fails([*args, "--model.init_args.objectives=[{name: x, style_layers: [relu1_1]}]"], capsys)
    assert "model.vgg.weights: the weights file holds non-finite values" in err and "'0.weight'" in err, err
    assert "nan.pth" in err and "learning rate" not in err


# -- 3. finished means intact; a changed input is a changed item --------------------------------------------------


def test_summary_records_output_and_input_digests(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save("style.png")
    main([*TEXTURE, *TOY, QUIET, "--data.init_args.style=[style.png]"])
    result = summary(0)
    assert result["objectives"]["gram"]["sha256"] == file_digest(RUN / "version_0/gram.png")
    assert result["grid_sha256"] == file_digest(RUN / "version_0/grid.png")
    assert result["inputs"]["data.style"] == [file_digest("style.png")]


def test_resume_refuses_a_changed_style_image(capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save("style.png")
    args = [*TEXTURE, *TOY, QUIET, EVERY_5, "--data.init_args.style=[style.png]"]
    main(args)
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save("style.png")
    err = fails([*args, f"--ckpt_path={RUN / 'version_0/checkpoints/last.ckpt'}"], capsys)
    assert "data.style[0]: style.png changed since the checkpoint" in err, err
    assert not (RUN / "version_1").exists()


def test_resume_refuses_changed_blend_weights_or_masks(capsys: pytest.CaptureFixture[str]) -> None:
    styles = [*TEXTURE, *TOY, QUIET, EVERY_5, "--data.init_args.style=[sample:gravel, sample:immunohistochemistry]"]
    blended = [*styles, "--data.init_args.style_weights=[0.7, 0.3]"]
    main(blended)
    last = f"--ckpt_path={RUN / 'version_0/checkpoints/last.ckpt'}"
    err = fails([*styles, "--data.init_args.style_weights=[0.3, 0.7]", last], capsys)
    assert err.startswith("lightning-nst: error: data.style_weights: differs from the checkpoint"), err

    half = np.zeros((32, 32), dtype=np.uint8)
    half[:, :16] = 255
    Image.fromarray(half).save("left.png")
    Image.fromarray(255 - half).save("right.png")
    masked = [*styles, "--data.init_args.masks=[left.png, right.png]", "--trainer.logger.init_args.name=masked"]
    main(masked)
    last = f"--ckpt_path={Path('logs/masked/version_0/checkpoints/last.ckpt')}"
    err = fails([*styles, "--trainer.logger.init_args.name=masked", last], capsys)
    assert err.startswith("lightning-nst: error: data.masks: differs from the checkpoint"), err
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save("left.png")
    err = fails([*masked, last], capsys)
    assert "data.masks[0]: left.png changed since the checkpoint" in err, err
    assert not Path("logs/masked/version_1").exists()


# -- 4. signals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_fit_keeps_the_images_and_prints_the_command_that_resumes(
    signum: int, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    sender = (
        f"--trainer.callbacks+={{class_path: tests.helpers.SignalAtStep, init_args: {{step: 3, signum: {signum}}}}}"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lightning_nst", *TEXTURE, *TOY, QUIET, sender]
    stopped = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == status, stopped.stderr[-2000:]
    run = RUN / "version_0"
    checkpoint = run / "checkpoints/last.ckpt"
    assert checkpoint.is_file() and not (run / "summary.json").exists()
    interrupted = pixels(run / "gram.interrupted.png")
    assert interrupted.shape == (32, 32, 3) and interrupted.std() > 10  # the image of step 3, not a blank
    (line,) = [line for line in stopped.stderr.splitlines() if line.startswith("lightning-nst: stopped by")]
    assert f"the current images are in {run} as *.interrupted.png; resume with: lightning-nst fit -c" in line
    assert "weights_only" not in stopped.stderr  # the stop saves the whole state on purpose, without a word
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[0] == "lightning-nst" and resume[-2:] == ["--ckpt_path", str(checkpoint)]

    with info_lines(caplog):
        main(resume[1:])  # the printed command, as a shell would split it (the sender does not fire again)
    assert f"Resuming {run}: results go there, TensorBoard logs to {RUN / 'version_1'}" in caplog.text
    main([*TEXTURE, *TOY, QUIET])
    resumed = FitSummary.read(run)  # the interrupted run's folder; the logger's new one has only the curves
    assert resumed.resumed_at_step == 3 and resumed.steps == 10 and not (RUN / "version_1/gram.png").exists()
    np.testing.assert_array_equal(pixels(run / "gram.png"), pixels(RUN / "version_2/gram.png"))


def test_a_second_stop_keeps_the_chain_in_the_first_runs_folder(capsys: pytest.CaptureFixture[str]) -> None:
    def sender(step: int) -> str:
        return (
            f"--trainer.callbacks+={{class_path: tests.helpers.SignalAtStep, init_args: {{step: {step}, signum: 2}}}}"  # noqa: E501
        )

    with pytest.raises(SystemExit) as first:
        main([*TEXTURE, *TOY, QUIET, sender(3)])
    assert first.value.code == 130
    checkpoint = RUN / "version_0/checkpoints/last.ckpt"
    with pytest.raises(SystemExit):
        main([*TEXTURE, *TOY, QUIET, sender(6), f"--ckpt_path={checkpoint}"])
    line = capsys.readouterr().err.splitlines()[-1]
    assert "stopped by SIGINT at step 6" in line and line.endswith(f"--ckpt_path {checkpoint}"), line
    main(shlex.split(line.split("resume with: ", 1)[1])[1:])
    assert FitSummary.read(RUN / "version_0").steps == 10
    assert not any(RUN.glob("version_[12]/*.png"))


def test_sigterm_during_predict_keeps_finished_items(tmp_path: Path) -> None:
    pipeline = build_tiny_pipeline(tmp_path / "tiny-sd")
    out = tmp_path / "batch"
    args = tiny_args(pipeline, "batch", "--data.seeds=[0, 1, 2]", "--model.num_inference_steps=3")
    args += ["--trainer.callbacks.init_args.output_dir", str(out)]
    sender = (
        "--trainer.callbacks+={class_path: tests.tiny_pipeline.SignalAtDenoisingStep, init_args: {item: 1, step: 1}}"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_nst", *args, sender]
    stopped = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert f"finished items are kept in {out}: rerun the same command to generate the rest" in stopped.stderr
    assert [record["seed"] for record in records(out)] == [0, 1]  # the item under way when the signal came finished

    main(args)
    assert [record["seed"] for record in records(out)] == [0, 1, 2]
    assert sorted(path.name for path in out.glob("*.png")) == [
        f"0000{i}_a-red-house-by-a-lake_{i}.png" for i in range(3)
    ]


# -- 5. resume respects the command line --------------------------------------------------------------------------


def test_resume_applies_safe_overrides(finished: Path) -> None:
    main(
        [
            *TEXTURE,
            *TOY,
            QUIET,
            EVERY_5,
            "--trainer.max_steps=12",
            "--trainer.callbacks+={class_path: lightning_nst.ImageWriter, init_args: {save_every: 1}}",
            f"--ckpt_path={finished}",
        ]
    )  # noqa: E501
    assert sorted(path.name for path in (RUN / "version_1/steps").iterdir()) == ["gram_00011.png", "gram_00012.png"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--model.init_args.objectives=[{name: gram, style_layers: [relu1_1]}]", "model.objectives"),
        ("--model.init_args.vgg.pooling=max", "model.vgg"),
        ("--model.init_args.init_seed=3", "model.init_seed"),
        ("--model.init_args.optimizer=torch.optim.Adam", "model.optimizer"),
    ],
)
def test_resume_refuses_unsafe_overrides(
    finished: Path, override: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails([*TEXTURE, *TOY, QUIET, override, f"--ckpt_path={finished}"], capsys)
    assert f"ckpt_path: {finished} was saved with other {named}" in err, err
    assert not (RUN / "version_1").exists()


def test_resume_refuses_another_image_size_in_one_line(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = fails([*TEXTURE, *TOY, QUIET, "--data.init_args.size=40", f"--ckpt_path={finished}"], capsys)
    assert f"ckpt_path: {finished} holds a 32x32 image (data.size 32), this command's data makes 40x40" in err, err
    assert not (RUN / "version_1").exists()

    # A checkpoint that does not record data.size (older ones): the shape still decides, before any heavy work.
    checkpoint = torch.load(finished, weights_only=True)
    del checkpoint["lightning_nst"]["size"], checkpoint["lightning_nst_sha256"]  # older ones had no digest either
    torch.save(checkpoint, "old.ckpt")
    err = fails([*TEXTURE, *TOY, QUIET, "--data.init_args.size=40", "--ckpt_path=old.ckpt"], capsys)
    assert "ckpt_path: old.ckpt holds a 32x32 image, this command's data makes 40x40 (data.size 40)" in err, err
    assert not (RUN / "version_1").exists()


def _weights_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save({k: v for k, v in make_layers(cfgs["E"]).state_dict().items() if k.startswith("0.")}, path)
    return path


ONE_LAYER = "--model.init_args.objectives=[{name: gram, style_layers: [relu1_1], style_weight: 1e6}]"


def test_resume_refuses_a_changed_weights_file(capsys: pytest.CaptureFixture[str]) -> None:
    weights = _weights_file(Path("vgg.pth"), 0)
    args = [*TEXTURE, *TOY, QUIET, EVERY_5, ONE_LAYER, f"--model.init_args.vgg.weights={weights}"]
    main(args)
    recorded = torch.load(RUN / "version_0/checkpoints/last.ckpt", weights_only=True)["lightning_nst"]["vgg_weights"]
    assert f"sha256 {file_digest(weights)[:12]}" in recorded
    _weights_file(weights, 1)  # the same path, other weights
    err = fails([*args, f"--ckpt_path={RUN / 'version_0/checkpoints/last.ckpt'}"], capsys)
    assert f"was made with VGG weights {recorded}, but this command's model.vgg.weights gives file" in err, err
    assert f"sha256 {file_digest(weights)[:12]}" in err and not (RUN / "version_1").exists()


def test_resume_refuses_other_weights_chosen_by_auto(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("lightning_nst.core.vgg._imagenet_state", _offline)  # no download attempt in a test
    monkeypatch.setenv("LIGHTNING_NST_VGG_WEIGHTS", str(_weights_file(Path("a.pth"), 0)))
    args = [*TEXTURE, *TOY, QUIET, EVERY_5, ONE_LAYER, "--model.init_args.vgg.weights=auto"]
    main(args)
    monkeypatch.setenv("LIGHTNING_NST_VGG_WEIGHTS", str(_weights_file(Path("b.pth"), 1)))
    err = fails([*args, f"--ckpt_path={RUN / 'version_0/checkpoints/last.ckpt'}"], capsys)
    assert f"{Path('a.pth').resolve()} (sha256 {file_digest('a.pth')[:12]}" in err, err
    assert f"but this run's model.vgg.weights gives file {Path('b.pth').resolve()}" in err, err
    assert not (RUN / "version_1").exists()


def _offline(key: str) -> dict:
    from lightning_nst.core.errors import NSTError

    raise NSTError(f"{key}: offline")


def test_command_line_objectives_replace_the_configs() -> None:
    main(
        [
            *TEXTURE,
            *TOY,
            QUIET,
            "--trainer.max_steps=1",
            "--model.init_args.objectives=[{name: x, style_layers: [relu1_1]}]",
        ]
    )  # noqa: E501
    (objective,) = [entry["objective"] for entry in summary(0)["objectives"].values()]
    assert objective["name"] == "x" and objective["style_weight"] == 1.0  # the config's gram objective has 1e6


# -- 6. a ckpt_path that is not a checkpoint of this task ---------------------------------------------------------


def _text(path: Path) -> None:
    path.write_text("hello\n")


def _png(path: Path) -> None:
    Image.new("RGB", (8, 8)).save(path, format="PNG")


def _tensors(path: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, path)


def _other_lightning(path: Path) -> None:
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "loops": {}, "hyper_parameters": {}}, path)


@pytest.mark.parametrize("make", [None, _text, _png, _tensors, _other_lightning])
def test_ckpt_path_that_is_not_a_checkpoint_is_refused(make: object, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path("not.ckpt")
    if make is not None:
        make(path)
    err = fails([*TEXTURE, *TOY, f"--ckpt_path={path}"], capsys)
    assert f"ckpt_path: {'checkpoint not found: ' if make is None else ''}{path}" in err, err
    assert not Path("logs").exists()


def test_loading_a_checkpoint_of_another_shape_or_weights_is_one_error_in_python_too() -> None:
    """A trainer built in Python has no CLI check before it: the module's own hook refuses, naming both."""
    from lightning_nst import ImageOptimization
    from lightning_nst.core.errors import NSTError
    from lightning_nst.core.vgg import VGGConfig
    from lightning_nst.nst.objective import Objective

    module = ImageOptimization([Objective("gram", style_layers=["relu1_1"])], vgg=VGGConfig(weights="random"))
    module.images.append(torch.nn.Parameter(torch.zeros(1, 3, 40, 40)))
    module.configure_model()
    with pytest.raises(NSTError, match=r"^checkpoint holds a 32x32 image, this run's data makes 40x40"):
        module.on_load_checkpoint({"state_dict": {"images.0": torch.zeros(1, 3, 32, 32)}, "lightning_nst": {}})
    other = {"state_dict": {"images.0": torch.zeros(1, 3, 40, 40)}, "lightning_nst": {"vgg_weights": "imagenet"}}
    with pytest.raises(NSTError, match=r"made with VGG weights imagenet, but this run's .* gives random \(seed 0\)"):
        module.on_load_checkpoint(other)
    module.on_load_checkpoint({**other, "lightning_nst": {"vgg_weights": "random (seed 0, chosen by auto: ...)"}})
    module.on_load_checkpoint({**other, "lightning_nst": {}})  # saved before the weights were recorded: loads


def test_resume_of_a_run_given_one_style_image_as_a_string(tmp_path: Path) -> None:
    style = tmp_path / "b.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(style)
    args = [*TEXTURE, *TOY, QUIET, EVERY_5, f"--data.style={style}"]  # a plain string, not a list
    main([*args, "--trainer.max_steps=5"])
    main([*args, "--trainer.max_steps=7", f"--ckpt_path={RUN / 'version_0/checkpoints/last.ckpt'}"])
    assert FitSummary.read(RUN / "version_1").steps == 7


# -- files the writer did not write -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gram.interrupted.png", "gram.last_good.png", "steps/gram_00004.png", "grid.png"])
def test_a_file_of_the_users_named_like_an_output_is_refused_before_the_fit(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_bytes(b"USERDATA")
    writer = [f"--trainer.callbacks.init_args.output_dir={out}", "--trainer.callbacks.init_args.save_every=2"]
    err = fails([*TEXTURE, *TOY, QUIET, *writer], capsys)
    assert err == (
        f"lightning-nst: error: ImageWriter.output_dir: {out / name} is not a file lightning-nst wrote there; choose "
        "another folder or set --trainer.callbacks.init_args.overwrite true"
    )
    assert (out / name).read_bytes() == b"USERDATA"
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()) == [name]
    # overwrite: true lets the run go on, replacing the file if it writes one of that name.
    main([*TEXTURE, *TOY, QUIET, *writer, "--trainer.callbacks.init_args.overwrite=true"])
    written = name in ("steps/gram_00004.png", "grid.png")  # the others are written on a stop or a divergence
    assert (out / "gram.png").is_file() and ((out / name).read_bytes() != b"USERDATA") == written


def test_a_resumed_run_replaces_only_the_files_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    writer = [f"--trainer.callbacks.init_args.output_dir={out}", "--trainer.callbacks.init_args.save_every=2"]
    stop = "--trainer.callbacks+={class_path: tests.helpers.SignalAtStep, init_args: {step: 5, signum: 2}}"
    with pytest.raises(SystemExit):
        main([*TEXTURE, *TOY, QUIET, *writer, stop])
    assert sorted(path.name for path in (out / "steps").iterdir()) == [f"gram_{s:05d}.png" for s in (0, 2, 4)]
    (checkpoint,) = Path("logs").rglob("last.ckpt")
    resume = [*TEXTURE, *TOY, QUIET, *writer, f"--ckpt_path={checkpoint}"]
    capsys.readouterr()
    # The user edits a snapshot: the resume is refused rather than risk replacing it.
    Image.new("RGB", (32, 32), (10, 200, 10)).save(out / "steps/gram_00004.png")
    err = fails(resume, capsys)
    assert err.startswith(f"lightning-nst: error: ImageWriter.output_dir: {out / 'steps/gram_00004.png'} is not a file")
    assert pixels(out / "steps/gram_00004.png")[0, 0].tolist() == [10, 200, 10]
    # Moved away, the resume replaces the run's own interrupted image and writes the rest.
    (out / "steps/gram_00004.png").rename(tmp_path / "mine.png")
    before = pixels(out / "gram.interrupted.png")
    main(resume)
    assert sorted(path.name for path in (out / "steps").iterdir()) == [f"gram_{s:05d}.png" for s in (0, 2, 6, 8, 10)]
    assert (out / "gram.png").is_file() and pixels(out / "gram.interrupted.png").shape == before.shape


# -- a resume applies the optimizer settings it is given, or refuses them ----------------------------------------


def resaved(checkpoint: Path, to: Path, edit: Any) -> Path:
    """``checkpoint`` read, changed by ``edit`` and sealed again, saved as ``to``: a checkpoint saved that way."""
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    seal(state)
    torch.save(state, to)
    return to


def test_resume_applies_a_new_learning_rate_and_records_what_ran(
    finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    longer = [*TEXTURE, *TOY, QUIET, "--trainer.max_steps=14"]
    with info_lines(caplog):
        main([*longer, "--model.init_args.optimizer.init_args.lr=0.5", f"--ckpt_path={finished}"])
    assert "Resuming with model.optimizer.init_args.lr 0.5 (the checkpoint's 1.0)" in caplog.text
    config = yaml.safe_load((RUN / "version_1/config.yaml").read_text())
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.5
    main([*longer, f"--ckpt_path={finished}"])  # the checkpoint's own lr, 1.0

    def half_lr(state: dict) -> None:
        for group in state["optimizer_states"][0]["param_groups"]:
            group["lr"] = 0.5

    # The same image as a resume of a checkpoint that had lr 0.5 itself (nothing to override), not the plain one's.
    caplog.clear()
    with info_lines(caplog):
        main(
            [
                *longer,
                "--model.init_args.optimizer.init_args.lr=0.5",
                f"--ckpt_path={resaved(finished, tmp_path / 'half.ckpt', half_lr)}",
            ]
        )
    assert "Resuming with" not in caplog.text
    overridden, plain, edited = (pixels(RUN / f"version_{v}/gram.png") for v in (1, 2, 3))
    np.testing.assert_array_equal(overridden, edited)
    assert np.abs(overridden.astype(int) - plain).max() > 0


def test_resume_applies_a_shorter_lbfgs_history(finished: Path) -> None:
    longer = [*TEXTURE, *TOY, QUIET, EVERY_5, "--trainer.max_steps=14"]
    assert len(torch.load(finished, weights_only=True)["optimizer_states"][0]["state"][0]["old_dirs"]) > 3
    main([*longer, "--model.init_args.optimizer.init_args.history_size=3", f"--ckpt_path={finished}"])
    resumed = torch.load(RUN / "version_1/checkpoints/last.ckpt", weights_only=True)["optimizer_states"][0]
    assert resumed["param_groups"][0]["history_size"] == 3 and len(resumed["state"][0]["old_dirs"]) == 3


def test_resume_refuses_an_optimizer_setting_its_state_cannot_take(capsys: pytest.CaptureFixture[str]) -> None:
    adam = [*TEXTURE, *TOY, QUIET, EVERY_5, "--model.init_args.optimizer=torch.optim.Adam"]
    main(adam)
    checkpoint = RUN / "version_0/checkpoints/last.ckpt"
    err = fails([*adam, "--model.init_args.optimizer.init_args.amsgrad=true", f"--ckpt_path={checkpoint}"], capsys)
    assert err == (
        f"lightning-nst: error: ckpt_path: {checkpoint} was saved with model.optimizer.init_args.amsgrad False, this "
        "command gives True; the restored optimizer state cannot take that change (start a new run without "
        "--ckpt_path, or give the checkpoint's value)"
    )
    assert not (RUN / "version_1").exists()
    # betas and weight decay are taken
    main([*adam, "--model.init_args.optimizer.init_args.betas=[0.8, 0.9]", f"--ckpt_path={checkpoint}"])


# -- a damaged checkpoint is refused --------------------------------------------------------------------------------


def tensor_data(path: Path) -> range:
    """The byte range of the largest tensor's data inside a checkpoint (a zip archive, tensors stored uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("rb") as stream:
        stream.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(stream.read(2), "little"), int.from_bytes(stream.read(2), "little")
    start = info.header_offset + 30 + name_length + extra_length
    return range(start, start + info.file_size)


@pytest.mark.parametrize("damage", ["tensor bytes", "truncated", "archive structure"])
def test_a_damaged_checkpoint_is_refused_in_one_line(damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    adam = [*TEXTURE, *TOY, QUIET, EVERY_5, "--model.init_args.optimizer=torch.optim.Adam"]
    main(adam)
    checkpoint = RUN / "version_0/checkpoints/last.ckpt"
    data = bytearray(checkpoint.read_bytes())
    if damage == "tensor bytes":
        middle = tensor_data(checkpoint)[len(tensor_data(checkpoint)) // 2]
        data[middle : middle + 2] = bytes(255 - byte for byte in data[middle : middle + 2])
    elif damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # the signature of a tensor's record in the zip archive
        start = tensor_data(checkpoint).start
        with zipfile.ZipFile(checkpoint) as archive:
            (header,) = [i.header_offset for i in archive.infolist() if i.header_offset < start][-1:]
        data[header : header + 2] = b"\xff\xff"
    checkpoint.write_bytes(bytes(data))
    err = fails([*adam, "--trainer.max_steps=12", f"--ckpt_path={checkpoint}"], capsys)
    if damage == "tensor bytes":
        assert err == (
            f"lightning-nst: error: ckpt_path: {checkpoint} is damaged: its content does not match the SHA-256 it was "
            "saved with; resume from another checkpoint, or start a new run without --ckpt_path"
        )
    else:
        assert err.startswith(f"lightning-nst: error: ckpt_path: {checkpoint} is not a readable Lightning checkpoint")
    assert not (RUN / "version_1").exists()
    main(adam)  # a new run starts fresh
    assert (RUN / "version_1/gram.png").is_file()


def test_a_damaged_checkpoint_is_refused_from_python_too(finished: Path, tmp_path: Path) -> None:
    from lightning_nst.core.errors import NSTError
    from lightning_nst.nst.checkpoint import content_digest, verify

    state = torch.load(finished, weights_only=True)
    verify(state, "checkpoint")  # as saved
    assert state["lightning_nst_sha256"] == content_digest(state)
    state["optimizer_states"][0]["state"][0]["d"][0] += 1e-6
    with pytest.raises(NSTError, match="checkpoint is damaged"):
        verify(state, "checkpoint")
    # One saved before digests were kept is read as it is.
    del state["lightning_nst_sha256"]
    verify(state, "checkpoint")


def test_a_resumed_sliced_w_run_ends_as_an_uninterrupted_one() -> None:
    # sliced_w draws new random projections at every evaluation; a resume draws the ones the run would have drawn.
    sliced = ["fit", "-c", str(CONFIGS / "texture_sliced_w.yaml"), *TOY, QUIET]
    every_3 = EVERY_5.replace("every_n_train_steps: 5", "every_n_train_steps: 3")
    main([*sliced, "--trainer.max_steps=6"])
    main([*sliced, "--trainer.max_steps=3", every_3])
    main(
        [
            *sliced,
            "--trainer.max_steps=6",
            f"--ckpt_path={Path('logs/texture_sliced_w/version_1/checkpoints/last.ckpt')}",
        ]
    )
    straight, resumed = (pixels(Path(f"logs/texture_sliced_w/version_{v}/sliced_w.png")) for v in (0, 2))
    np.testing.assert_array_equal(straight, resumed)
