"""A report removes only the files it recorded as its own, and refuses folders it does not own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_nst.main import main

TOY = [
    "--size=32",
    "--steps=3",
    "--vgg.weights=random",
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
    err = error_of(capsys, out, "--seed=1", "--overwrite=true")
    assert "did not record as its own" in err and "mine.txt" in err
    assert mine.read_text() == "mine"


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
