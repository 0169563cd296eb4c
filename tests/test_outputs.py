"""lightning_nst.outputs: output folder checks that create nothing, input file checks that open nothing, digests."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import lightning_nst.core.files as files
from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_input_file, check_output_dir, file_digest, source_digest
from lightning_nst.outputs import (
    FORMAT,
    GRID,
    MANIFEST,
    SUMMARY,
    FitSummary,
    GenerationRecord,
    ObjectiveRecord,
    last_good_file,
    read_manifest,
    result_file,
    step_file,
)


def test_a_missing_folder_is_accepted_but_not_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert check_output_dir(target, "key") == target
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == [], "the write probe was left behind"


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(NSTError, match=r"^key: .*/f is not a folder$"):
        check_output_dir(tmp_path / "f", "key")
    with pytest.raises(NSTError, match=r"^key: .*/f/sub cannot be created: .*/f is not a folder$"):
        check_output_dir(tmp_path / "f" / "sub", "key")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_read_only(code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(NSTError, match=r"^key: cannot write to .*/out \(in .*\): it is read-only$"):
        check_output_dir(tmp_path / "out", "key")


def test_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10 * 2**20))
    with pytest.raises(NSTError, match=r"has only 10\.0 MiB free; a run needs at least 64 MiB"):
        check_output_dir(tmp_path, "key")
    assert check_output_dir(tmp_path, "key", min_free=2**20) == tmp_path


def test_input_file_kinds(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert check_input_file(tmp_path / "link", "k") == tmp_path / "link"
    with pytest.raises(NSTError, match=r"^k: image file not found: .*/missing$"):
        check_input_file(tmp_path / "missing", "k", "image file")
    with pytest.raises(NSTError, match=r"^k: weights file not found: .*/dangling$"):
        check_input_file(tmp_path / "dangling", "k", "weights file")
    with pytest.raises(NSTError, match=r"^k: .*/folder is a folder, not a file$"):
        check_input_file(tmp_path / "folder", "k")
    with pytest.raises(NSTError, match=r"^k: .*/fifo is a FIFO, not a regular file$"):
        check_input_file(tmp_path / "fifo", "k")  # returns at once: the FIFO is never opened
    with pytest.raises(NSTError, match="is a device, not a regular file"):
        check_input_file("/dev/null", "k")


def test_digests(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"pixels")
    assert file_digest(tmp_path / "f") == hashlib.sha256(b"pixels").hexdigest()
    assert source_digest(tmp_path / "f") == file_digest(tmp_path / "f")
    assert source_digest("skimage:astronaut") == "skimage:astronaut"


# -- image optimisation results ---------------------------------------------------------------------------------------

# The keys of summary.json, in order, as ImageOptimization wrote them before FitSummary existed (commit 57ab18d).
SUMMARY_KEYS = [
    "vgg_weights", "pooling", "image_size", "precision", "device", "steps", "resumed_at_step", "wall_time_s",
    "seconds_per_step", "seconds_per_step_after_first", "output_dir", "objectives", "grid", "grid_sha256", "inputs",
    "images", "scales", "result_file", "precision_source", "format",
]  # fmt: skip
OBJECTIVE_KEYS = [
    "sha256", "objective", "initial_loss", "final_loss", "best_step", "best_loss", "last_loss", "stopped_at_step",
    "metrics", "output",
]  # fmt: skip


def test_fit_file_names() -> None:
    assert (result_file("conv1-3"), GRID, SUMMARY) == ("conv1-3.png", "grid.png", "summary.json")
    assert step_file("gram", 12) == "steps/gram_00012.png"
    assert last_good_file("gram") == "gram.last_good.png"


def test_fit_summary_keeps_the_keys_and_reads_back(tmp_path: Path) -> None:
    record = ObjectiveRecord(
        sha256="ab", objective={"name": "gram"}, initial_loss={"total": 2.0}, final_loss={"total": 1.0}, best_step=3,
        best_loss=1.0, last_loss=1.5, stopped_at_step=None, metrics={"style_distance_gram": 0.5}, output="gram.png",
    )  # fmt: skip
    summary = FitSummary(
        vgg_weights="random (seed 0)", pooling="avg", image_size=[32, 32], precision="32-true", device="cpu",
        steps=4, resumed_at_step=None, wall_time_s=0.1, seconds_per_step=0.025, seconds_per_step_after_first=None,
        output_dir="/out", objectives={"gram": record}, grid="grid.png", grid_sha256="cd",
        inputs={"data.content": None, "data.style": ["skimage:gravel"]},
        images={"content": None, "style": [{"path": "skimage:gravel", "sha256": None}]},
    )  # fmt: skip
    text = summary.to_json()
    data = json.loads(text)
    assert list(data) == SUMMARY_KEYS and list(data["objectives"]["gram"]) == OBJECTIVE_KEYS
    assert text.startswith('{\n  "vgg_weights": "random (seed 0)",\n')  # indent 2, as before
    (tmp_path / SUMMARY).write_text(text)
    assert FitSummary.read(tmp_path) == summary and FitSummary.read(tmp_path).to_json() == text
    # A summary written before `images` (or `scales`, `result_file`, `precision_source`) existed still reads.
    del data["images"], data["scales"], data["result_file"], data["precision_source"]
    (tmp_path / SUMMARY).write_text(json.dumps(data))
    assert FitSummary.read(tmp_path).images is None and FitSummary.read(tmp_path).scales is None
    assert FitSummary.read(tmp_path).precision_source is None


RECORD = {
    "index": 0, "image": "00000_a_0.png", "sha256": "ab", "fingerprint": "cd", "prompt": "a", "base_prompt": "a",
    "style_prompt": None, "negative_prompt": "", "seed": 0, "style": None, "style_digest": None, "model": "tiny-sd",
    "scheduler": "DDIMScheduler", "num_inference_steps": 2, "cfg_scale": 7.5, "eta": 0.0, "size": [64, 64],
    "dtype": "float32", "guidance": None, "final_style_loss": None, "style_loss": None, "timesteps": [500, 0],
    "guided": [False, False], "nsfw": None, "seconds_per_step": 0.1, "rank": 0,
}  # fmt: skip


def test_records_carry_their_format_and_a_newer_one_is_refused_naming_the_file(tmp_path: Path) -> None:
    summary = {"format": FORMAT + 1, "objectives": {}}
    (tmp_path / SUMMARY).write_text(json.dumps(summary))
    with pytest.raises(NSTError, match=rf"^{re.escape(str(tmp_path / SUMMARY))}: written in format {FORMAT + 1} by a"):
        FitSummary.read(tmp_path)
    manifest = tmp_path / MANIFEST
    manifest.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "format": FORMAT + 1}) + "\n")
    with pytest.raises(NSTError, match=rf"^{re.escape(str(manifest))} line 2: written in format {FORMAT + 1} by a"):
        read_manifest(manifest)
    # A record from before the format was written reads as format 0 and is written back as the current one.
    line = json.loads(GenerationRecord.from_dict({**RECORD, "format": FORMAT}).to_json())
    assert line["format"] == FORMAT and list(line)[-1] == "format"
    del line["format"]
    assert GenerationRecord.from_dict(line).format == 0
