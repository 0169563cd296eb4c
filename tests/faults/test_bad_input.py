"""Bad input found before any heavy work: one line naming the key or file, exit status 2, no run folder left."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

import pytest
import torch

import lightning_nst.core.files
import lightning_nst.core.vgg
from lightning_nst.core.vgg import VGG19Features
from lightning_nst.main import main
from tests.conftest import CONFIGS, REPO

TEXTURE = str(CONFIGS / "texture_gram.yaml")
TRANSFER = str(CONFIGS / "style_transfer_gram.yaml")
DIFFUSION = str(CONFIGS / "guided_diffusion.yaml")
TOY = ["--model.init_args.vgg.weights=random", "--data.init_args.size=32", "--trainer.max_steps=2"]

LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9 if previous else ['lol'] * 9)}]\n"
    for previous, name in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)


@pytest.fixture
def no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a VGG trunk is built or a diffusion pipeline is loaded."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("heavy work started before the bad input was reported")

    monkeypatch.setattr(VGG19Features, "__init__", refuse)
    monkeypatch.setattr("lightning_nst.diffusion.loading._load", refuse)


def fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process; assert exit 2, one line, no traceback and no run folder; return the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-nst: error: ") and err.count("\n") == 0, err
    assert not [path for path in Path("logs").rglob("*") if path.is_file()], "a failed run left files behind"
    return err


# -- output folders ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize(
    ("flag", "key"),
    [
        ("--trainer.logger.init_args.save_dir", "trainer.logger.save_dir"),
        ("--trainer.default_root_dir", "trainer.default_root_dir"),
        ("--trainer.callbacks.init_args.output_dir", "ImageWriter.output_dir"),
    ],
)
def test_fit_output_folder_is_a_file(flag: str, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("taken").write_text("a file, not a folder")
    err = fails(["fit", "-c", TEXTURE, *TOY, f"{flag}=taken/run"], capsys)
    assert f"{key}: taken/run cannot be created: taken is not a folder" in err
    assert Path("taken").read_text() == "a file, not a folder"


@pytest.mark.usefixtures("no_heavy_work")
def test_read_only_output_folder_stops_root_too(capsys: pytest.CaptureFixture[str]) -> None:
    # sysfs refuses new files to every user, root included, unlike permission bits.
    place = Path("/sys/kernel")
    try:
        handle, probe = tempfile.mkstemp(dir=place)
    except OSError:
        pass
    else:
        os.close(handle)
        os.unlink(probe)
        pytest.skip(f"{place} is writable here")
    err = fails(["fit", "-c", TEXTURE, *TOY, f"--trainer.logger.init_args.save_dir={place}/nst"], capsys)
    assert "trainer.logger.save_dir: cannot write to /sys/kernel/nst (in /sys/kernel): it is read-only" in err


@pytest.mark.usefixtures("no_heavy_work")
def test_read_only_mount(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = tempfile.mkstemp

    def mkstemp(*args: object, dir: str | os.PathLike[str] | None = None, **kwargs: object) -> tuple[int, str]:
        if dir is not None and Path(dir).name == "mounted":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)  # type: ignore[arg-type]

    Path("mounted").mkdir()
    monkeypatch.setattr(lightning_nst.core.files.tempfile, "mkstemp", mkstemp)
    err = fails(["fit", "-c", TEXTURE, *TOY, "--trainer.callbacks.init_args.output_dir=mounted"], capsys)
    assert "ImageWriter.output_dir: cannot write to mounted: it is read-only" in err


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize("command", ["fit", "predict"])
def test_full_disk(command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=3 * 2**20))
    args = ["fit", "-c", TEXTURE, *TOY] if command == "fit" else ["predict", "-c", DIFFUSION]
    err = fails(args, capsys)
    assert "trainer.logger.save_dir: the disk holding logs has only 3.0 MiB free; a run needs at least 64 MiB" in err


@pytest.mark.usefixtures("no_heavy_work")
def test_predict_writer_folder_is_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    Path("taken").write_text("")
    err = fails(["predict", "-c", DIFFUSION, "--trainer.callbacks.init_args.output_dir=taken"], capsys)
    assert "GenerationWriter.output_dir: taken is not a folder" in err


@pytest.mark.usefixtures("no_heavy_work")
def test_predict_trajectory_folder_is_read_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("previews").mkdir()
    monkeypatch.setattr(lightning_nst.core.files.tempfile, "mkstemp", _refuse_in("previews"))
    Path("callbacks.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - {class_path: lightning_nst.TrajectoryLogger, init_args: {save_dir: previews}}\n"
        "    - {class_path: lightning_nst.GenerationWriter}\n"
    )
    err = fails(["predict", "-c", DIFFUSION, "-c", "callbacks.yaml"], capsys)
    assert "TrajectoryLogger.save_dir: cannot write to previews: it is read-only" in err


def _refuse_in(name: str):  # noqa: ANN202
    real = tempfile.mkstemp

    def mkstemp(*args: object, dir: str | os.PathLike[str] | None = None, **kwargs: object) -> tuple[int, str]:
        if dir is not None and Path(dir).name == name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*args, dir=dir, **kwargs)  # type: ignore[arg-type]

    return mkstemp


# -- VGG weights -----------------------------------------------------------------------------------------------------


def test_empty_weights_file(capsys: pytest.CaptureFixture[str]) -> None:
    Path("vgg.pth").write_bytes(b"")
    err = fails(["fit", "-c", TEXTURE, *TOY, "--model.init_args.vgg.weights=vgg.pth"], capsys)
    assert "model.vgg.weights: vgg.pth is empty (0 bytes)" in err


@pytest.mark.parametrize("damage", ["garbage", "garbage 2", "truncated"])
def test_corrupt_weights_file(damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(VGG19Features(["conv1_2"], weights="random").trunk.state_dict(), "good.pth")
    data = Path("good.pth").read_bytes()
    garbage = random.Random(damage).randbytes(5000)
    Path("vgg.pth").write_bytes(garbage if damage == "garbage" else data[: len(data) // 2])
    err = fails(["fit", "-c", TEXTURE, *TOY, "--model.init_args.vgg.weights=vgg.pth"], capsys)
    assert "model.vgg.weights: cannot load vgg.pth as a torch state_dict: the file is truncated or corrupt" in err
    assert "weights_only` set to `False`" not in err


def test_imagenet_weights_offline(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    # The host answers, but the download fails: the reason is named as well (unreachable hosts: test_vgg.py).
    monkeypatch.setattr(lightning_nst.core.vgg, "unreachable", lambda url: None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    err = fails(["fit", "-c", TEXTURE, *TOY, "--model.init_args.vgg.weights=imagenet"], capsys)
    assert "model.vgg.weights: the ImageNet VGG19 weights are not in the torch hub cache" in err
    assert "cannot be downloaded (no network); pass a weights file" in err


@pytest.fixture
def corrupt_hub_cache() -> Path:
    cached = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(os.urandom(4096))
    return cached


def test_corrupt_hub_cache(corrupt_hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(["fit", "-c", TEXTURE, *TOY, "--model.init_args.vgg.weights=imagenet"], capsys)
    assert f"model.vgg.weights: the cached ImageNet VGG19 weights {corrupt_hub_cache} cannot be loaded" in err
    assert "delete that file to download them again" in err
    assert corrupt_hub_cache.exists(), "the user's file must not be deleted"


def test_corrupt_hub_cache_with_auto_falls_back_with_a_warning(corrupt_hub_cache: Path) -> None:
    with pytest.warns(UserWarning, match=f"cached ImageNet VGG19 weights {corrupt_hub_cache} cannot be loaded"):
        vgg = VGG19Features(["relu1_1"], weights="auto")
    assert vgg.weights_used.startswith("random")


# -- ranges ------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_heavy_work")
def test_negative_max_steps(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(["fit", "-c", TEXTURE, *TOY, "--trainer.max_steps=-5"], capsys)
    assert "trainer.max_steps: set a positive number of optimisation steps, got -5" in err


@pytest.mark.usefixtures("no_heavy_work")
def test_size_beyond_memory(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(["fit", "-c", TEXTURE, *TOY, "--data.init_args.size=100000"], capsys)
    assert "data.size: a 100000x100000 px image cannot be optimised here" in err
    assert "GiB for activations, more than the" in err


@pytest.mark.usefixtures("no_heavy_work")
def test_gpu_accelerator_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = fails(["fit", "-c", TEXTURE, *TOY, "--trainer.accelerator=gpu"], capsys)
    assert "trainer.accelerator: 'gpu' is not available on this machine" in err


# -- YAML ------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize("command", ["fit", "report"])
def test_billion_laughs_config(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("laughs.yaml").write_text(LAUGHS)
    args = ["fit", "-c", TEXTURE, "-c", "laughs.yaml"] if command == "fit" else ["report", "all", "-c", "laughs.yaml"]
    started = time.perf_counter()
    err = fails(args, capsys)
    assert time.perf_counter() - started < 5
    assert "--config: laughs.yaml is refused: its aliases expand to over 100000 values" in err


@pytest.mark.usefixtures("no_heavy_work")
def test_billion_laughs_inline(capsys: pytest.CaptureFixture[str]) -> None:
    levels = [f"&l0 [{', '.join(['x'] * 9)}]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 7)]
    started = time.perf_counter()
    err = fails(["fit", "-c", TEXTURE, *TOY, f"--data.init_args.style=[{', '.join(levels)}]"], capsys)
    assert time.perf_counter() - started < 5
    assert "--data.init_args.style: the value is refused: its aliases expand to over 100000 values" in err


@pytest.mark.usefixtures("no_heavy_work")
def test_duplicate_yaml_key(capsys: pytest.CaptureFixture[str]) -> None:
    Path("dup.yaml").write_text("trainer:\n  max_steps: 3\n  logger: false\n  max_steps: 4\n")
    err = fails(["fit", "-c", TEXTURE, "-c", "dup.yaml"], capsys)
    assert "--config: dup.yaml is refused: duplicate key 'max_steps' at line 4 (first at line 2)" in err


@pytest.mark.usefixtures("no_heavy_work")
def test_recursive_alias(capsys: pytest.CaptureFixture[str]) -> None:
    Path("loop.yaml").write_text("data:\n  init_args:\n    style: &loop [*loop]\n")
    err = fails(["fit", "-c", TEXTURE, "-c", "loop.yaml"], capsys)
    assert "--config: loop.yaml is refused: the alias at line 3 refers to a value that contains it" in err


def test_merge_keys_and_shared_aliases_still_work() -> None:
    from lightning_nst.cli.yaml_checks import _check_yaml_text

    _check_yaml_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\nlist: [*b, *b]\n", "ok.yaml")


# -- folders and FIFOs as images ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize("flag", ["--data.init_args.content", "--data.init_args.style", "--model.init_args.init"])
@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_folder_or_fifo_as_image(flag: str, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    if kind == "folder":
        Path("picture").mkdir()
    else:
        os.mkfifo("picture")  # opening it would block: the check must only stat it
    value = "[picture]" if flag.endswith("style") else "picture"
    key = {"content": "data.content", "style": "data.style[0]", "init": "model.init"}[flag.rsplit(".", 1)[1]]
    err = fails(["fit", "-c", TRANSFER, *TOY, f"{flag}={value}"], capsys)
    expected = "is a folder, not a file" if kind == "folder" else "is a FIFO, not a regular file"
    assert f"{key}: picture {expected}" in err


# -- several processes on CPU -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [["--trainer.devices=2"], ["--trainer.devices=3", "--trainer.strategy=ddp_spawn"]])
def test_fit_on_several_cpu_processes_stops_at_once(options: list[str], tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lightning_nst", "fit", "-c", TEXTURE, *TOY, "--trainer.accelerator=cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *options], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("lightning-nst: error:")]
    assert len(lines) == 1 and "trainer.devices: image optimisation runs on one device" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "auto"])
def test_fit_with_any_multi_process_strategy_is_refused(strategy: str, capsys: pytest.CaptureFixture[str]) -> None:
    options = ["--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.strategy={strategy}"]
    err = fails(["fit", "-c", TEXTURE, *TOY, *options], capsys)
    assert "trainer.devices: image optimisation runs on one device, but this config asks for 2 processes" in err


def test_a_second_run_without_logger_into_the_same_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--trainer.logger=false", "--data.init_args.size=32",
        "--trainer.max_steps=2", "--model.init_args.vgg.weights=random", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    main(args)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lightning-nst: error: trainer.default_root_dir: "), err
    assert "config.yaml exists, so a run already wrote into" in err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_a_failed_run_removes_only_a_log_folder_it_made_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "logs" / "texture_gram" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    bad = [
        "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--data.init_args.size=32",
        "--model.init_args.vgg.weights=random", "--trainer.enable_progress_bar=false",
        "--model.init_args.objectives=[{name: x, content_layers: [relu1_1]}]",  # content layers, but no content
    ]  # fmt: skip
    for version in ("mine", "fresh"):
        with pytest.raises(SystemExit) as exit_info:
            main([*bad, f"--trainer.logger.init_args.version={version}"])
        assert exit_info.value.code == 2
        assert "has content layers: set data.content" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine"  # the folder was there before: kept, with what it held
    assert not (tmp_path / "logs" / "texture_gram" / "fresh").exists()  # made by the failed run: removed


# -- values a user may type ----------------------------------------------------------------------------------------

STYLIZE = ["stylize", "sample:astronaut", "sample:gravel", "-o", "out.png", "--weights", "random", "--size", "32"]
GENERATE = ["generate", "a cat", "--style", "sample:gravel", "-o", "out", "--weights", "random"]
FIT = ["fit", "-c", TEXTURE, *TOY]


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([*STYLIZE, "--seed", "-1"], "--seed: must be a whole number from 0 to 4294967295 (got -1)"),
        ([*STYLIZE, "--seed", "4294967296"], "--seed: must be a whole number from 0 to 4294967295 (got 4294967296)"),
        ([*STYLIZE, "--style-weight", "nan"], "--style-weight: must be a finite number >= 0 (got nan)"),
        ([*STYLIZE, "--style-weight", "inf"], "--style-weight: must be a finite number >= 0 (got inf)"),
        ([*STYLIZE, "--content-weight=-inf"], "--content-weight: must be a finite number >= 0 (got -inf)"),
        ([*STYLIZE, "--steps", "99999999999999999999"], "--steps: must be at most 9223372036854775807"),
        (
            [*GENERATE, "--seed", "99999999999999999999"],
            "--seed: must be a whole number from 0 to 9223372036854775807 (got 99999999999999999999)",
        ),
        ([*GENERATE, "--seeds", "0", "-2"], "--seeds: must be a whole number from 0 to 9223372036854775807 (got -2)"),
        (
            [*GENERATE, "--init-image", "sample:astronaut", "--strength", "nan"],
            "--strength: must be a finite number in (0, 1] (got nan)",
        ),
        ([*GENERATE, "--scale", "nan"], "--scale: must be a finite number (got nan)"),
        ([*GENERATE, "--cfg-scale", "inf"], "--cfg-scale: must be a finite number >= 0 (got inf)"),
        ([*GENERATE, "--size", "12"], "--size: must be a multiple of 8 pixels (got 12)"),
        (
            [*GENERATE, "--size", "8"],
            "--size: 8 px is too small for the style guidance, whose deepest layer relu5_1 needs images of at least "
            "16 px",
        ),
        (["fit", "-c", TEXTURE, *TOY, "--seed_everything=-1"], "seed_everything: must be a whole number from 0 to"),
        (["fit", "-c", TEXTURE, *TOY, "--model.init_args.init_seed=-3"], "model.init_seed: must be a whole number"),
        (
            ["fit", "-c", TEXTURE, *TOY, "--trainer.max_steps=99999999999999999999"],
            "trainer.max_steps: at most 9223372036854775807",
        ),
        (["fit", "-c", TEXTURE, *TOY, "--trainer.devices=-1"], "trainer.devices: '-1' cannot be used here"),
        (["fit", "-c", TEXTURE, *TOY, "--trainer.devices=0"], "trainer.devices: '0' cannot be used here"),
        (["fit", "-c", TEXTURE, *TOY, "--trainer.devices=[0, 1]"], "trainer.devices: [0, 1] cannot be used here"),
        (
            ["fit", "-c", TEXTURE, *TOY, "--model.init_args.objectives=[{name: grid, style_layers: [relu1_1]}]"],
            "model.objectives[0].name: 'grid' would write grid.png, a file the run writes itself",
        ),
        (
            [*FIT, "--model.init_args.objectives=[{name: a.interrupted, style_layers: [conv1_1]}]"],
            "model.objectives[0].name: 'a.interrupted' would write the interrupted image of objective 'a'",
        ),
        (
            [
                "fit", "-c", TEXTURE, *TOY,
                "--model.init_args.objectives=[{name: A, style_layers: [relu1_1]}, {name: a, style_layers: [relu1_1]}]",
            ],
            "model.objectives[1].name: 'a' is used twice (file names ignore case on some systems)",
        ),
        ([*FIT, "--trainer.precision=16-true"], "trainer.precision: 16-true would keep the image and its optimizer"),
        ([*FIT, "--trainer.precision=bf16-true"], "trainer.precision: bf16-true would keep the image"),
        ([*FIT, "--trainer.max_epochs=0"], "trainer.max_epochs: 0 stops the fit before its first step"),
        ([*FIT, "--trainer.limit_train_batches=0"], "trainer.limit_train_batches: 0 stops the fit"),
        ([*FIT, "--trainer.callbacks.init_args.output_dir="], "ImageWriter.output_dir: is empty; give a folder"),
        (
            ["predict", "-c", DIFFUSION, "--trainer.limit_predict_batches=0"],
            "trainer.limit_predict_batches: 0 generates nothing",
        ),
        (
            ["predict", "-c", TEXTURE],
            f"--config: {TEXTURE} configures ImageOptimization, which runs with `lightning-nst fit`, not predict",
        ),
        (
            ["fit", "-c", DIFFUSION],
            f"--config: {DIFFUSION} configures GuidedDiffusion, which runs with `lightning-nst predict`, not fit",
        ),
        ([*STYLIZE[:4], "", *STYLIZE[5:]], "-o: is empty; name the image file to write"),
        ([*GENERATE[:5], "", *GENERATE[6:]], "-o: is empty; name the folder to write the images into"),
        ([*GENERATE[:3], "a_folder", *GENERATE[4:]], "data.style[0]: a_folder is a folder, not a file"),
        ([*GENERATE, "--init-image", "a_folder"], "data.init_images[0]: a_folder is a folder, not a file"),
    ],
)  # fmt: skip
def test_values_a_user_may_type_get_one_line(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("a_folder").mkdir()
    assert fails(args, capsys).startswith(f"lightning-nst: error: {expected}")
    assert not Path("out").exists() and not Path("out.png").exists()


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize(("text", "holds"), [("", "no options (an empty config)"), ("- a\n", "a list, not a mapping")])
def test_a_config_that_is_no_mapping_is_named(text: str, holds: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("mine.yaml").write_text(text)
    assert fails(["fit", "-c", "mine.yaml"], capsys).startswith(
        f"lightning-nst: error: --config: mine.yaml is refused: it holds {holds}"
    )


def test_a_fit_that_ends_before_a_result_exits_2_and_leaves_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails([*FIT, "--trainer.max_time=00:00:00:00"], capsys)
    assert err == (
        "lightning-nst: error: trainer: the run ended at step 0 of 2 before it had a result to write "
        "(trainer.max_time, max_epochs or limit_train_batches stopped it); nothing was saved"
    )
    assert not Path("logs").exists()


def test_a_style_size_too_small_names_data_style_size(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails([*FIT, "--data.init_args.style_size=1"], capsys)
    assert err.endswith("but the deepest layer needs at least 16 px per side; use a larger image or data.style_size")


@pytest.mark.parametrize("command", ["stylize", "texture"])
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(Path(lightning_nst.core.files.__file__).parents[1] / "samples/gravel.jpg", "mine.jpg")
    before = Path("mine.jpg").read_bytes()
    inputs = ["mine.jpg", "sample:gravel"] if command == "stylize" else ["mine.jpg"]
    args = [command, *inputs, "-o", "./mine.jpg", "--overwrite", "--weights", "random", "--size", "32"]
    what = "content" if command == "stylize" else "style"
    assert (
        fails(args, capsys)
        == f"lightning-nst: error: -o: mine.jpg is the {what} image of this run; write the result to another file"
    )
    assert Path("mine.jpg").read_bytes() == before


def test_a_learning_rate_beyond_float32_is_refused_and_leaves_no_folder(capsys: pytest.CaptureFixture[str]) -> None:
    adam = ["--model.init_args.optimizer=torch.optim.Adam", "--model.init_args.optimizer.init_args.lr=1e300"]
    err = fails(["fit", "-c", TEXTURE, *TOY, *adam], capsys)
    assert err == (
        "lightning-nst: error: model.optimizer.init_args.lr: 1e+300 is beyond float32, the image's precision (at most "
        "3.403e+38)"
    )
    assert not Path("logs").exists()


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_as_ckpt_path_is_named_as_such(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path("resume.ckpt")
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    err = fails(["fit", "-c", TEXTURE, *TOY, f"--ckpt_path={path}"], capsys)
    what = "is a folder, not a file" if kind == "folder" else "is a FIFO, not a regular file"
    assert err == f"lightning-nst: error: ckpt_path: {path} {what}"


@pytest.mark.usefixtures("no_heavy_work")
def test_an_alias_bomb_is_refused_whatever_its_files_name(capsys: pytest.CaptureFixture[str]) -> None:
    Path("bomb.txt").write_text(LAUGHS)
    started = time.monotonic()
    err = fails(["fit", "-c", TEXTURE, *TOY, "--data", "bomb.txt"], capsys)
    assert err == "lightning-nst: error: --data: bomb.txt is refused: its aliases expand to over 100000 values"
    assert time.monotonic() - started < 5


def test_a_style_mask_of_null_is_all_of_the_style_image(capsys: pytest.CaptureFixture[str]) -> None:
    masks = str(CONFIGS / "style_masks.yaml")
    main(["fit", "-c", masks, *TOY, "--data.init_args.style_masks=[null, sample:mask_right]"])
    assert Path("logs/style_masks/version_0/masks.png").is_file()


@pytest.mark.parametrize("command", [["layers"], ["fit", "--help"]])  # each a fresh process: 5 s
def test_a_printing_command_with_its_output_closed_says_so(command: list[str]) -> None:
    # As `lightning-nst layers >&-` starts it: Python then sets sys.stdout to None.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "lightning_nst", *command]
    done = subprocess.run(argv, stderr=subprocess.PIPE, text=True, env=env, timeout=120, preexec_fn=lambda: os.close(1))
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr.strip()
        == "lightning-nst: error: standard output is closed, so there is nowhere to print the answer"
    )


TEXTURE_SHORTCUT = ["texture", "sample:gravel", "-o", "t.png"]


@pytest.mark.parametrize(
    ("command", "key"),
    [(STYLIZE, "model.vgg.weights"), (TEXTURE_SHORTCUT, "model.vgg.weights"), (GENERATE, "model.guidance.vgg.weights")],
)
def test_a_partial_weights_file_is_named_before_any_work_and_says_fill_missing(
    command: list[str], key: str, partial_random_weights: Path, no_heavy_work: None, capsys: pytest.CaptureFixture[str]
) -> None:  # the file is made first (its fixture builds a trunk), then building one is forbidden
    err = fails([*command, "--weights", str(partial_random_weights)], capsys)
    assert err.startswith(f"lightning-nst: error: {key}: {partial_random_weights} covers only layers conv1_1..relu3_1")
    assert "--fill-missing for stylize, texture and generate" in err


def test_fill_missing_lets_the_shortcuts_use_a_partial_weights_file(partial_random_weights: Path) -> None:
    main([*STYLIZE, "--steps", "2", "--weights", str(partial_random_weights), "--fill-missing"])
    summary = json.loads(Path("logs/out/version_0/summary.json").read_text())
    assert summary["vgg_weights"].endswith("covers conv1_1..relu3_1) + random beyond relu3_1 (seed 0)")
    assert Path("out.png").is_file()
