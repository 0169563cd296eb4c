"""The everyday commands: stylize, texture and generate shortcuts, --help, --version, configs, -c NAME, layers."""

from __future__ import annotations

import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nst.core.images import load_image, to_pil
from lightning_nst.main import COMMANDS, main
from tests.conftest import REPO, cli_error

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = ["--size", "32", "--steps", "3", "--weights", "random"]
SHIPPED = {path.stem for path in (REPO / "configs").glob("*.yaml")}


def write_images(folder: Path) -> tuple[str, str]:
    """A 48x64 content and a 40x40 style image of seeded noise with a gradient."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64)[None, :, None]
    content = (0.5 * rng.random((48, 64, 3)) * 255 + 0.5 * ramp).astype(np.uint8)
    Image.fromarray(content).save(folder / "photo.png")
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / "painting.png")
    return "photo.png", "painting.png"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_stylize_writes_exactly_the_output_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, style = write_images(tmp_path)
    main(["stylize", content, style, "-o", "out/result.png", *TOY])
    out = tmp_path / "out" / "result.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 24)  # long edge = --size, aspect kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.png"]
    printed = capsys.readouterr().out
    run = tmp_path / "logs" / "result" / "version_0"  # the run is named after -o
    assert f"Wrote {Path('out/result.png')}" in printed and str(Path("logs/result/version_0")) in printed
    assert any(path.name.startswith("events.out.tfevents") for path in run.iterdir())
    before = out.read_bytes()

    line = cli_error(capsys, ["stylize", content, style, "-o", "out/result.png", *TOY])
    assert line == "lightning-nst: error: -o: out/result.png exists; pass --overwrite to replace it"
    assert out.read_bytes() == before and not (tmp_path / "logs" / "result" / "version_1").exists()

    main(["stylize", content, style, "-o", "out/result.png", *TOY, "--overwrite", "--style-weight", "1e9"])
    assert out.read_bytes() != before


def test_print_config_is_a_fit_config_that_gives_the_same_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, style = write_images(tmp_path)
    flags = ["--statistic", "meanvar", "--optimizer", "adam", "--seed", "3", "--content-weight", "2"]
    flags += ["--parameterization", "laplacian"]
    main(["stylize", content, style, "-o", "a.png", *TOY, *flags])
    capsys.readouterr()
    main(["stylize", content, style, "-o", "b.png", *TOY, *flags, "--print-config"])
    config = capsys.readouterr().out
    assert not (tmp_path / "b.png").exists()
    assert "name: b" in config and "output: b.png" in config and "torch.optim.Adam" in config
    assert "parameterization: laplacian" in config
    (tmp_path / "run.yaml").write_text(config)
    main(["fit", "-c", "run.yaml"])  # writes b.png, as the stylize command would have
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(tmp_path / "a.png"))
    fit = tmp_path / "logs" / "b" / "version_0" / "meanvar.png"
    assert np.array_equal(pixels(fit), pixels(tmp_path / "a.png"))


def test_texture_writes_the_output(tmp_path: Path) -> None:
    write_images(tmp_path)
    main(["texture", "painting.png", "-o", "texture.jpg", *TOY])
    with Image.open(tmp_path / "texture.jpg") as image:
        assert image.format == "JPEG" and image.size == (32, 32)


def test_bad_shortcut_flags_are_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, style = write_images(tmp_path)
    assert "stylize: the following arguments are required: -o/--output" in cli_error(
        capsys, ["stylize", content, style]
    )
    assert "--size: must be an integer > 0 (got 0)" in cli_error(
        capsys, ["stylize", content, style, "-o", "x.png", "--size", "0"]
    )
    assert "-o: x.tiff2: unknown image file extension" in cli_error(
        capsys, ["stylize", content, style, "-o", "x.tiff2"]
    )
    assert "data.style[0]: image file not found: missing.png" in cli_error(
        capsys, ["stylize", content, "missing.png", "-o", "x.png", *TOY]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["painting.png", "photo.png"]


def test_generate_writes_into_the_folder(
    tmp_path: Path, pipeline_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path)
    args = ["generate", "a red house", "--style", "painting.png", "-o", "gen", "--model", str(pipeline_dir)]
    toy = ["--size", "64", "--steps", "2", "--weights", "random", "--seeds", "0", "1", "--sampler", "ddpm"]
    main([*args, *toy, "--print-config"])
    config = capsys.readouterr().out
    assert "scheduler: ddpm" in config and "output_dir: gen" in config and not (tmp_path / "gen").exists()
    main([*args, *toy])
    images = sorted(path.name for path in (tmp_path / "gen").glob("*.png"))
    assert len(images) == 2 and (tmp_path / "gen" / "predictions.jsonl").is_file()
    with Image.open(tmp_path / "gen" / images[0]) as image:
        assert image.size == (64, 64)


def test_help_lists_exactly_the_commands_that_work(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    listed = [line.split()[0] for line in capsys.readouterr().out.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == ["fit", "predict", "stylize", "texture", "generate", "export", "report", "layers", "configs"]
    assert listed == list(COMMANDS)
    for command in ("validate", "test"):
        line = cli_error(capsys, [command])
        assert line.startswith(
            f"lightning-nst: error: {command}: not a command of lightning-nst; the commands are fit,"
        )
    assert cli_error(capsys, ["-c", "texture_gram", "fit"]).endswith(
        "-c: unknown option; options go after the command (`lightning-nst COMMAND --help`)"
    )
    from lightning_nst.cli.lightning import run

    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])  # LightningCLI's own parser offers only these two
    assert exit_info.value.code == 0
    assert "{fit,predict}" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_nst import __version__

    main(["--version"])
    assert capsys.readouterr().out == f"lightning-nst {__version__}\n"


def test_configs_are_listed_and_found_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    main(["configs"])
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed == SHIPPED
    with pytest.raises(SystemExit):
        main(["fit", "-c", "texture_gram.yaml", "--print_config"])
    assert "name: texture_gram" in capsys.readouterr().out
    line = cli_error(capsys, ["fit", "-c", "texture_gramm"])
    assert line.startswith("lightning-nst: error: --config: file not found: texture_gramm, and no shipped config")
    assert "texture_gram, texture_meanvar" in line


def test_a_missing_path_to_a_shipped_config_suggests_its_name(capsys: pytest.CaptureFixture[str]) -> None:
    # A checkout's `-c configs/NAME.yaml`, typed where there is no configs/ folder (after `pip install .`).
    for args, name in (
        (["report", "reconstruction", "-c", "configs/report_cpu.yaml"], "report_cpu"),
        (["fit", "--config=configs/texture_gram.yaml"], "texture_gram"),
    ):
        assert cli_error(capsys, args) == (
            f"lightning-nst: error: --config: file not found: configs/{name}.yaml; did you mean -c {name}, the "
            "shipped config of that name?"
        )
    assert not any(Path().iterdir())  # nothing written


def test_a_real_file_takes_precedence_over_a_shipped_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "texture_gram.yaml").write_text("trainer:\n  max_steps: 7\n")
    with pytest.raises(SystemExit):
        main(["fit", "-c", "texture_gram.yaml", "--print_config"])
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "name: texture_gram" not in out


def test_a_single_style_image_is_a_plain_string(tmp_path: Path) -> None:
    _, style = write_images(tmp_path)
    main(["fit", "-c", "texture_gram", "--data.style", style, "--data.size", "32", "--trainer.max_steps", "2",
          "--model.vgg.weights", "random"])  # fmt: skip
    assert (tmp_path / "logs" / "texture_gram" / "version_0" / "gram.png").is_file()


def test_layers_help_and_a_closed_pipe(capsys: pytest.CaptureFixture[str]) -> None:
    main(["layers", "--help"])
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: lightning-nst layers") and "conv1_1" not in help_text
    # `lightning-nst layers | head -1`, the reader gone before the first line is written: every write fails.
    command = [sys.executable, "-m", "lightning_nst", "layers"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 1 and stderr == ""


def test_prompt_grid_takes_a_single_style_image(tmp_path: Path) -> None:
    from lightning_nst.diffusion.prompts import PromptGrid

    _, style = write_images(tmp_path)
    assert PromptGrid(prompts=["a house"], style=style).style_sources == [style]
    assert PromptGrid(prompts=["a house"], style=[style, style]).style_sources == [style, style]


@pytest.mark.parametrize("statistic", ["w2", "sliced_w"])
def test_every_statistic_has_a_stylize_and_a_texture_config(statistic: str, capsys: pytest.CaptureFixture[str]) -> None:
    main(["stylize", "sample:astronaut", "sample:gravel", "-o", "x.png", "--statistic", statistic, "--print-config"])
    main(["texture", "sample:gravel", "-o", "y.png", "--statistic", statistic, "--print-config"])
    out = capsys.readouterr().out
    assert "name: x\n" in out and "name: y\n" in out  # runs are named after -o
    assert out.count(f"statistic: {statistic}") == 2


def test_stylize_colour_and_blend_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, style = write_images(tmp_path)
    flags = ["--color", "luminance", "--style-weights", "3", "1"]
    main(["stylize", content, style, style, "-o", "a.png", *TOY, *flags, "--print-config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["objectives"][0]["color"] == "luminance"
    assert config["data"]["init_args"]["style_weights"] == [3.0, 1.0]
    main(["stylize", content, style, style, "-o", "a.png", *TOY, *flags])
    with Image.open(tmp_path / "a.png") as image:
        # luminance mode: the result keeps the chroma (YCbCr, 0-255) of the content as the run resized it
        original = to_pil(load_image(content, max(image.size), key="content"))
        result, source = (np.asarray(i.convert("YCbCr"), dtype=float)[..., 1:] for i in (image, original))
        assert np.abs(result - source).mean() < 1.0
    line = cli_error(capsys, ["stylize", content, style, "-o", "b.png", "--style-weights", "1", "1"])
    assert line == "lightning-nst: error: --style-weights: 2 weights for 1 style images"
    line = cli_error(capsys, ["stylize", content, style, "-o", "b.png", "--color", "sepia"])
    assert line.startswith("lightning-nst: error: stylize: argument --color: invalid choice: 'sepia'")
    assert not (tmp_path / "b.png").exists()


@pytest.fixture
def stop_at_step_3(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Ctrl-C as it lands at step 3 of the next run: what StopOnSignal's handler records, at the step's end."""
    import signal

    from lightning_nst.cli.signals import StopOnSignal

    original = StopOnSignal.on_train_batch_end
    armed = {"on": True}

    def interrupted(self: StopOnSignal, trainer: object, *args: object) -> None:
        if armed["on"] and getattr(trainer, "global_step", 0) == 3:
            self.signum = signal.SIGINT
            armed["on"] = False
        original(self, trainer, *args)

    monkeypatch.setattr(StopOnSignal, "on_train_batch_end", interrupted)
    return armed


@pytest.mark.parametrize("keep", [False, True])
def test_an_interrupted_stylize_says_how_to_finish_into_the_same_output(
    keep: bool, stop_at_step_3: dict[str, bool], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, style = write_images(tmp_path)
    flags = ["--size", "32", "--steps", "6", "--weights", "random", *(["--keep-partial"] if keep else [])]
    with pytest.raises(SystemExit) as stopped:
        main(["stylize", content, style, "-o", "sig.png", *flags])
    assert stopped.value.code == 130
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-nst: stopped")]
    checkpoint = Path("logs/sig/version_0/checkpoints/last.ckpt")  # the run is named after -o
    # The user's own command, with --resume: a command to read and copy, not a config.
    assert line.endswith(f"resume with: lightning-nst stylize {content} {style} -o sig.png {' '.join(flags)} "
                         f"--resume {checkpoint}")  # fmt: skip
    assert "{" not in line
    # The -o file is written only when asked: then the best image so far, said so.
    assert (tmp_path / "sig.png").exists() == keep and ("the best image so far is in sig.png" in line) == keep
    # The stopped run has its hyperparameters and best loss so far in TensorBoard's HParams.
    events = EventAccumulator(str(checkpoint.parent.parent))
    events.Reload()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert "final/gram/best_loss" in events.Tags()["scalars"]
    # The printed command finishes the run into the same -o: the image of a run never stopped, and Lightning does not
    # warn that it may not be (its loader is resumable).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(shlex.split(line.split("resume with: ", 1)[1])[1:])
    assert [str(w.message) for w in caught if "not resumable" in str(w.message)] == []
    main(["stylize", content, style, "-o", "straight.png", *flags])
    assert np.array_equal(pixels(tmp_path / "sig.png"), pixels(tmp_path / "straight.png"))


def test_resume_refuses_an_output_that_is_not_the_stopped_runs(
    stop_at_step_3: dict[str, bool], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, style = write_images(tmp_path)
    flags = ["--size", "32", "--steps", "6", "--weights", "random"]
    with pytest.raises(SystemExit):
        main(["stylize", content, style, "-o", "sig.png", *flags])
    (tmp_path / "sig.png").write_bytes(b"mine")
    line = cli_error(capsys, ["stylize", content, style, "-o", "sig.png", *flags, "--resume",
                              "logs/sig/version_0/checkpoints/last.ckpt"])  # fmt: skip
    assert line == (
        "lightning-nst: error: -o: sig.png exists and is not the partial result of the run --resume finishes; pass "
        "--overwrite to replace it"
    )
    assert (tmp_path / "sig.png").read_bytes() == b"mine"
