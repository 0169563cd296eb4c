"""A report removes only the files it recorded as its own, and refuses folders it does not own."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lightning_nst.cli import lightning as cli
from lightning_nst.core import vgg
from lightning_nst.core.errors import DivergenceError, NSTError
from lightning_nst.core.vgg import VGGConfig
from lightning_nst.main import main
from lightning_nst.report import Report, ReportSettings, configs, experiments
from lightning_nst.report.experiments import common
from tests.conftest import CONFIGS, REPO

TOY = [
    "--size=32",
    "--steps=3",
    "--vgg.weights=random",
    "--allow_random_weights=true",
    "--layers=[conv1_1]",
    "--accelerator=cpu",
    "--progress_bar=false",
]


def report(out: Path, *overrides: str) -> None:
    main(["report", "reconstruction", *TOY, f"--out={out}", *overrides])


def error_of(capsys: pytest.CaptureFixture[str], out: Path, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        report(out, *overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_overwrite_removes_only_the_reports_own_files(tmp_path: Path) -> None:
    out = tmp_path / "report"
    report(out)
    listed = json.loads((out / "report-files.json").read_text())["files"]
    assert {"report.md", "report.yaml", "reconstructions.png", "configs/conv1_1.yaml"} <= set(listed)
    assert "runs/conv1_1/conv1_1.png" in listed and "runs/conv1_1/summary.json" in listed
    for plot in ("psnr_by_layer", "ssim_by_layer"):  # each plot as PNG and SVG, both the report's own
        assert {f"{plot}.png", f"{plot}.svg"} <= set(listed)
        assert ElementTree.parse(out / f"{plot}.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
        with Image.open(out / f"{plot}.png") as image:
            assert image.format == "PNG"
        assert f"({plot}.png)" in (out / "report.md").read_text() and f"({plot}.svg)" in (out / "report.md").read_text()
    (out / "notes.txt").write_text("mine")
    (out / "configs" / "my_config.yaml").write_text("mine: 1\n")
    report(out, "--seed=1", "--overwrite=true")
    assert (out / "notes.txt").read_text() == "mine" and (out / "configs/my_config.yaml").read_text() == "mine: 1\n"
    assert "seed: 1" in (out / "report.yaml").read_text() and (out / "runs/conv1_1/conv1_1.png").is_file()


def test_overwrite_keeps_a_file_the_user_put_in_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    report(out)
    mine = out / "runs" / "conv1_1" / "mine.txt"
    mine.write_text("mine")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    err = error_of(capsys, out, "--seed=1", "--overwrite=true")
    assert err == (
        f"lightning-nst: error: out: {mine} is not one of the report's files, and --overwrite would have to stop at "
        "it after removing the report; move it away, then run again"
    )
    # Refused before anything was removed: the earlier report is whole, and the user's file is kept.
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    mine.unlink()
    report(out, "--seed=1", "--overwrite=true")
    assert "seed: 1" in (out / "report.yaml").read_text()


def test_an_out_that_yaml_reads_as_null_is_the_folder_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    # '~' is the home folder, which is no report: refused, instead of the report going to the default folder.
    with pytest.raises(SystemExit):
        main(["report", "reconstruction", *TOY, "--out", "~"])
    err = capsys.readouterr().err.strip()
    assert err == f"lightning-nst: error: out: {home} exists and is not a report folder; choose a new or empty folder"
    main(["report", "reconstruction", *TOY, "--out", "null"])
    assert Path("null/report.md").is_file() and not Path("reports").exists()


@pytest.mark.parametrize("where", ["cwd", "folder"])
def test_a_folder_that_is_not_a_report_is_refused_even_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture, where: str
) -> None:
    out = Path(".") if where == "cwd" else tmp_path / "photos"
    out.mkdir(exist_ok=True)
    (out / "holiday.jpg").write_bytes(b"not really a photo")
    err = error_of(capsys, out, "--overwrite=true")
    assert err == f"lightning-nst: error: out: {out} exists and is not a report folder; choose a new or empty folder"
    assert sorted(path.name for path in out.iterdir()) == ["holiday.jpg"]


def test_a_report_that_does_not_list_its_files_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "old"
    report(out)
    (out / "report-files.json").unlink()  # as made by a version that did not record its files
    before = sorted(path.relative_to(out) for path in out.rglob("*"))
    err = error_of(capsys, out, "--seed=1", "--overwrite=true")
    assert "report-files.json is missing" in err and "remove it by hand" in err
    assert sorted(path.relative_to(out) for path in out.rglob("*")) == before


def test_a_file_list_pointing_outside_the_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    report(out)
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    (out / "report-files.json").write_text(json.dumps({"files": ["report.md", "../outside.txt"]}))
    err = error_of(capsys, out, "--seed=1", "--overwrite=true")
    assert "is not a list of report files" in err
    assert outside.read_text() == "mine" and (out / "report.md").is_file()


def test_out_that_is_a_file_is_refused_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.txt"
    out.write_text("mine")
    err = error_of(capsys, out)
    assert err == f"lightning-nst: error: out: {out} is not a folder"
    assert out.read_text() == "mine" and not (tmp_path / "reports").exists()


def test_a_finished_run_whose_image_was_damaged_is_run_again(tmp_path: Path) -> None:
    out = tmp_path / "report"
    report(out)
    image = out / "runs" / "conv1_1" / "conv1_1.png"
    intact = image.read_bytes()
    image.write_bytes(intact[:100])  # truncated, e.g. by a full disk or a copy cut short
    report(out)
    assert image.read_bytes() == intact  # the same settings and seed make the same image again
    untouched = (out / "runs" / "conv1_1" / "summary.json").stat().st_mtime_ns
    report(out)  # intact now: read back, not run
    assert (out / "runs" / "conv1_1" / "summary.json").stat().st_mtime_ns == untouched


# -- a refused report leaves nothing behind ---------------------------------------------------------------------------


def test_a_report_refused_for_a_missing_image_leaves_nothing_so_the_corrected_one_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "new" / "report"
    err = error_of(capsys, out, "--content=photo.png")
    assert err == "lightning-nst: error: content: image file not found: photo.png"
    assert not (tmp_path / "new").exists()
    report(out, "--content=sample:astronaut")  # the corrected command, without --overwrite
    assert (out / "report.md").is_file()


def _refusing_run(monkeypatch: pytest.MonkeyPatch, error: NSTError, user_file: bool = False) -> None:
    """Make every run write a file into its run folder, as a started run does, and then raise ``error``."""

    def run(args: list[str]) -> None:
        config = Path(args[2])  # fit -c <folder>/configs/<run>.yaml
        folder = config.parents[1] / "runs" / config.stem
        folder.mkdir(parents=True)
        (folder / "events.out.tfevents.0").write_bytes(b"started")
        if user_file:  # a file of the user's, put into the report folder while the run was going
            (config.parents[1] / "notes.txt").write_text("mine")
        raise error

    monkeypatch.setattr(cli, "run", run)


@pytest.mark.parametrize("before", ["absent", "empty"])
def test_a_report_refused_inside_a_run_leaves_its_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, before: str
) -> None:
    out = tmp_path / "new" / "report"
    if before == "empty":
        out.mkdir(parents=True)
    _refusing_run(monkeypatch, NSTError("data.content: refused inside the run"))
    assert error_of(capsys, out) == "lightning-nst: error: data.content: refused inside the run"
    if before == "absent":
        assert not (tmp_path / "new").exists()
    else:
        assert out.is_dir() and not any(out.iterdir())


def test_a_refused_report_keeps_what_it_did_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "report"
    _refusing_run(monkeypatch, NSTError("data.content: refused inside the run"), user_file=True)
    error_of(capsys, out)
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*")) == ["notes.txt"]


def test_a_diverged_or_earlier_report_is_kept_when_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    diverged = tmp_path / "diverged"
    with monkeypatch.context() as patch:
        _refusing_run(patch, DivergenceError(2, "conv1_1", "content", math.nan))
        error_of(capsys, diverged)  # its message points at the run's folder, which keeps the last finite images
    assert (diverged / "report.yaml").is_file() and (diverged / "runs/conv1_1/events.out.tfevents.0").is_file()
    earlier = tmp_path / "earlier"
    report(earlier)
    (earlier / "runs/conv1_1/summary.json").unlink()  # as if killed: the rerun makes the run again
    _refusing_run(monkeypatch, NSTError("data.content: refused inside the run"))
    error_of(capsys, earlier)
    assert {"report.yaml", "report-files.json", "report.md", "reconstructions.png"} <= {
        path.name for path in earlier.iterdir()
    }


# -- the report as a client of the library --------------------------------------------------------------------------


def test_report_help_and_an_image_experiment_do_not_import_diffusers(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from lightning_nst.main import main\n"
        "try:\n"
        "    main(['report', '--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "assert 'diffusers' not in sys.modules, 'report --help imported diffusers'\n"
        f"main(['report', 'reconstruction', *{TOY!r}, '--steps=1', '--out=out'])\n"
        "assert 'diffusers' not in sys.modules, 'report reconstruction imported diffusers'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "report.md").is_file()


def _toy_settings(tmp_path: Path, pipeline: str = "tiny-sd") -> ReportSettings:
    return ReportSettings(
        out=str(tmp_path / "r"),
        size=32,
        steps=3,
        vgg=VGGConfig(weights="random"),
        allow_random_weights=True,
        model=pipeline,
    )


def test_run_configs_are_the_shipped_configs_with_the_reports_settings(tmp_path: Path) -> None:
    report = Report("toy", "Toy", _toy_settings(tmp_path), ["relu1_1"], runs=1)
    objective = [{"name": "x", "style_layers": ["relu1_1"]}]
    fit = common.fit_config(report, "x", "texture_gram", objective, {"style": ["skimage:brick"]})
    texture = yaml.safe_load((CONFIGS / "texture_gram.yaml").read_text())
    assert fit["model"]["init_args"]["optimizer"] == texture["model"]["init_args"]["optimizer"]
    assert fit["model"]["init_args"]["objectives"] == objective and fit["data"]["init_args"]["size"] == 32
    assert fit["trainer"]["logger"]["init_args"]["save_dir"] == str(report.folder / "runs")
    # The shipped ModelCheckpoint is the user's, not the report's: the report's run keeps only its writer.
    assert [callback["class_path"] for callback in fit["trainer"]["callbacks"]] == ["lightning_nst.ImageWriter"]
    for style_prompt, name in ((None, "guided_diffusion"), ("in oils", "prompt_only_diffusion")):
        generation = common.generation_config(report, "g", 0.5, style_prompt=style_prompt)["model"]["init_args"]
        model = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["init_args"]
        assert generation["scheduler"] == model["scheduler"]
        guidance, shipped_guidance = generation["guidance"]["init_args"], model["guidance"]["init_args"]
        assert all(
            guidance[key] == value
            for key, value in shipped_guidance.items()
            if key not in ("scale", "guidance_size", "layers", "vgg")
        )
        assert guidance["scale"] == 0.5 and generation["num_inference_steps"] == report.settings.sampling_steps


def test_run_configs_follow_an_edited_shipped_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edited = tmp_path / "configs"
    shutil.copytree(CONFIGS, edited)
    texture = edited / "texture_gram.yaml"
    texture.write_text(texture.read_text().replace("history_size: 50", "history_size: 20"))
    guided = edited / "guided_diffusion.yaml"
    guided.write_text(guided.read_text().replace("scheduler: ddim", "scheduler: euler"))
    monkeypatch.setattr(configs, "CONFIGS", edited)
    report = Report("toy", "Toy", _toy_settings(tmp_path), ["relu1_1"], runs=1)
    fit = common.fit_config(report, "x", "texture_gram", [{"name": "x"}], {"style": ["skimage:brick"]})
    assert fit["model"]["init_args"]["optimizer"]["init_args"]["history_size"] == 20
    assert common.generation_config(report, "g", 0.5)["model"]["init_args"]["scheduler"] == "euler"
    (edited / "texture_gram.yaml").unlink()
    with pytest.raises(NSTError, match="texture_gram.yaml: the report builds its runs from the shipped"):
        experiments.run("texture_layers", _toy_settings(tmp_path))
    assert not (tmp_path / "r" / "runs").exists()


def test_report_all_reports_a_failed_experiment_and_runs_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake(name: str, fails: BaseException | None = None) -> Callable[[ReportSettings], Path]:
        def experiment(settings: ReportSettings) -> Path:
            if fails is not None:
                raise fails
            path = Path(str(settings.out)) / "report.md"
            path.parent.mkdir(parents=True)
            path.write_text(name)
            return path

        return experiment

    failures = {"texture_layers": NSTError("texture: not an image file: in/t.png"), "guided_vs_nst": KeyError("bug")}
    for name in list(experiments.EXPERIMENTS):
        monkeypatch.setitem(experiments.EXPERIMENTS, name, fake(name, failures.get(name)))
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "all", f"--out={tmp_path / 'all'}", "--vgg.weights=random", "--allow_random_weights=true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lightning-nst: report texture_layers failed: texture: not an image file: in/t.png" in err
    assert "lightning-nst: report guided_vs_nst failed: KeyError('bug')" in err and "Traceback" in err  # a bug
    assert err.strip().splitlines()[-1] == (
        f"lightning-nst: error: experiment: texture_layers, guided_vs_nst failed (see above); the other reports "
        f"are in {tmp_path / 'all'}"
    )
    written = sorted(path.parent.name for path in (tmp_path / "all").glob("*/report.md"))
    assert written == [
        "fast_vs_optimisation",
        "gram_vs_meanvar",
        "guided_img2img_vs_nst",
        "guided_vs_prompt",
        "reconstruction",
        "style_controls",
    ]
    # index.md links each report that was written, and names those that failed and why.
    index = (tmp_path / "all" / "index.md").read_text().splitlines()
    links = [re.search(r"\[(.+?)\]\((.+?)\)", line) for line in index if line.startswith("- ")]
    assert [(m.group(1), m.group(2)) if m else None for m in links] == [
        ("reconstruction", "reconstruction/report.md"),
        None,
        ("gram_vs_meanvar", "gram_vs_meanvar/report.md"),
        None,
        ("guided_vs_prompt", "guided_vs_prompt/report.md"),
        ("guided_img2img_vs_nst", "guided_img2img_vs_nst/report.md"),
        ("style_controls", "style_controls/report.md"),
        ("fast_vs_optimisation", "fast_vs_optimisation/report.md"),
    ]
    assert "`texture_layers`" in index[3] and "**Failed**: texture: not an image file: in/t.png" in index[3]
    assert "`guided_vs_nst`" in index[5] and "**Failed**: KeyError('bug')" in index[5]


def test_report_all_index_links_every_report_md_with_its_title(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, experiment in list(experiments.EXPERIMENTS.items()):

        def fake(settings: ReportSettings, name: str = name) -> Path:
            path = Path(str(settings.out)) / "report.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# Title of {name}\n\ntext\n")
            return path

        fake.__doc__ = experiment.__doc__
        monkeypatch.setitem(experiments.EXPERIMENTS, name, fake)
    out = tmp_path / "all"
    main(["report", "all", f"--out={out}", "--vgg.weights=random", "--allow_random_weights=true"])
    index = (out / "index.md").read_text()
    for name, experiment in experiments.EXPERIMENTS.items():
        summary = experiment.__doc__.strip().splitlines()[0]
        assert f"- [Title of {name}]({name}/report.md) (`{name}`): {summary}" in index
        assert (out / name / "report.md").is_file()
    main(["report", "all", f"--out={out}", "--vgg.weights=random", "--allow_random_weights=true"])  # its own: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.md").write_text("# my notes\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "all", f"--out={mine}", "--vgg.weights=random", "--allow_random_weights=true"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"lightning-nst: error: out: {mine / 'index.md'} exists and was not written by lightning-nst report all; "
        "move it or choose --out"
    )
    assert (mine / "index.md").read_text() == "# my notes\n" and sorted(p.name for p in mine.iterdir()) == ["index.md"]


# -- random weights, progress and the weights line ------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["reconstruction", "all"])
def test_random_weights_are_refused_without_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], experiment: str
) -> None:
    out = tmp_path / "report"
    toy = [arg for arg in TOY if not arg.startswith("--allow_random_weights")]
    with pytest.raises(SystemExit) as exit_info:
        main(["report", experiment, *toy, f"--out={out}"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("lightning-nst: error: vgg.weights: 'random' gives random VGG19 weights") and "\n" not in err
    assert "--allow_random_weights=true" in err
    assert "run 1/" not in captured.out and not out.exists()


def test_a_report_shows_run_k_of_n_and_states_its_weights_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "report"
    with caplog.at_level(logging.INFO):
        report(out, "--layers=[conv1_1, relu1_1, pool1]")
    printed = capsys.readouterr()
    lines = [line for line in printed.out.splitlines() if " run " in line]
    assert re.fullmatch(r"\[reconstruction\] run 1/3: conv1_1 \(ETA --:--\): lightning-nst fit -c .*", lines[0])
    assert re.fullmatch(r"\[reconstruction\] run 2/3: relu1_1 \(ETA \d\d:\d\d\): lightning-nst fit .*", lines[1])
    assert re.fullmatch(r"\[reconstruction\] run 3/3: pool1 \(ETA \d\d:\d\d\): lightning-nst fit .*", lines[2])
    assert len(lines) == 3
    everything = printed.out + printed.err + "\n".join(caplog.messages)
    assert everything.count("VGG19 weights:") == 1
    assert "[reconstruction] VGG19 weights: random (seed 0) (allowed by --allow_random_weights)" in printed.out
    report(out, "--layers=[conv1_1, relu1_1, pool1]")  # read back: the count still runs to 3
    lines = [line for line in capsys.readouterr().out.splitlines() if " run " in line]
    assert lines[2].startswith("[reconstruction] run 3/3: pool1: finished earlier")


def test_auto_weights_that_fall_back_to_random_are_refused_or_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(key: str = "model.vgg.weights") -> None:
        raise NSTError(f"{key}: the ImageNet VGG19 weights cannot be downloaded (offline)")

    monkeypatch.setattr(vgg, "_imagenet_state", offline)
    auto = [arg.replace("--vgg.weights=random", "--vgg.weights=auto") for arg in TOY]
    out = tmp_path / "report"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the suite makes lightning_nst's warnings errors; here they are counted
        with pytest.raises(SystemExit):
            main(["report", "reconstruction", *auto, "--allow_random_weights=false", f"--out={out}"])
        err = capsys.readouterr().err.strip()
        assert err.startswith("lightning-nst: error: vgg.weights: 'auto' gives random VGG19 weights (random (seed 0")
        assert "\n" not in err and not out.exists()
        main(["report", "reconstruction", *auto, "--layers=[conv1_1, relu1_1]", f"--out={out}"])
    assert [str(w.message) for w in caught if "RANDOM" in str(w.message)] == []  # not once per run, nor at all
    assert "VGG19 weights: random (seed 0, chosen by auto: ImageNet unavailable)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="using RANDOM weights"):  # outside a report the warning is as before
        vgg.VGG19Features(["conv1_1"], weights="auto")
