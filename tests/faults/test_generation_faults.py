"""Batch generation under faults: killed runs finish on a rerun, hostile prompts and bad files are contained."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image

from lightning_nst.main import main
from lightning_nst.outputs import FORMAT, MANIFEST
from tests.conftest import cli_error
from tests.tiny_pipeline import REPO, batch_args, records

PROMPT = "a red house by a lake"


pytestmark = pytest.mark.usefixtures("one_thread")


class Stall(L.Callback):
    """Hang rank ``rank`` once it has saved ``batches`` batches, holding the next batch it took, until killed."""

    def __init__(self, rank: int = 0, batches: int = 1) -> None:
        self.rank = rank
        self.batches = batches

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if trainer.global_rank == self.rank and batch_idx >= self.batches:
            time.sleep(600)


class StallBeforePng(L.Callback):
    """Hang the writer just before it writes the PNG ``name``, whose record is on disk by then, until killed."""

    def __init__(self, name: str = "00001_a-red-house-by-a-lake_1.png") -> None:
        self.name = name

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import lightning_nst.diffusion.writer as writers

        write = writers.write_atomic

        def stalled(path: Path, data: bytes, **kwargs: Any) -> Path:
            if Path(path).name == self.name:
                time.sleep(600)
            return write(path, data, **kwargs)

        writers.write_atomic = stalled


def recorded(out: Path) -> list[str]:
    """The images recorded so far in the part files of ``out``."""
    names = []
    for part in out.glob(".*.part"):
        for line in part.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                names.append(json.loads(line)["image"])
    return names


def stalled_then_killed(command: list[str], out: Path, finished: int, log: Path) -> dict[str, tuple[int, int]]:
    """Start ``command`` in its own process group, SIGKILL the group once ``finished`` items are recorded.

    Returns:
        ``{png name: (inode, mtime_ns)}`` of the recorded items whose PNG was written at the time of the kill.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    names: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and len(names) < finished:
            time.sleep(0.1)
            names = recorded(out)
        assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert len(names) == finished, f"not {finished} records in time:\n{log.read_text()[-3000:]}"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    written = [name for name in names if (out / name).exists()]
    return {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in written}


def assert_complete(out: Path, count: int) -> list[dict[str, Any]]:
    """Exactly ``count`` items, each once, in index order, every PNG recorded, no part or temporary file left."""
    lines = records(out)
    assert [line["index"] for line in lines] == list(range(count))
    assert sorted(path.name for path in out.glob("*.png")) == sorted(line["image"] for line in lines)
    assert [path.name for path in out.iterdir() if path.name.startswith(".")] == []
    for line in lines:
        with Image.open(out / line["image"]) as image:
            assert image.format == "PNG" and image.size == (64, 64)
    return lines


# -- interrupted runs -----------------------------------------------------------------------------------------------


def test_killed_run_reruns_only_the_missing_items(
    pipeline_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, log = Path("logs/batch/version_0"), tmp_path / "killed.log"
    args = batch_args(pipeline_dir, None, 4)
    # Killed after item 0 is written and item 1 is recorded, before its PNG: records are flushed before the PNGs.
    stall = "--trainer.callbacks+=tests.faults.test_generation_faults.StallBeforePng"
    kept = stalled_then_killed([sys.executable, "-m", "lightning_nst", *args, stall], out, finished=2, log=log)
    assert list(kept) == ["00000_a-red-house-by-a-lake_0.png"]
    assert not (out / "00001_a-red-house-by-a-lake_1.png").exists()
    # The run said how to finish it.
    hint = f"to finish it if interrupted, rerun with --trainer.callbacks.init_args.output_dir {out}"
    assert hint in log.read_text()
    # What else a kill can leave: a record cut off mid-line, and a temporary file that was never renamed.
    (part,) = out.glob(".*.part")
    with part.open("a") as stream:
        stream.write('{"index": 3, "image": "00003_a-red-hou')
    (out / ".00001_a-red-house-by-a-lake_1.png.k2j4x9q1.tmp").write_bytes(b"half a png")

    with caplog.at_level(logging.INFO):
        main([*args, "--trainer.callbacks.init_args.output_dir", str(out)])
    lines = assert_complete(out, 4)
    assert f"Generating 3 of 4 items into {out}; 1 finished earlier are kept" in caplog.text
    assert [line["seed"] for line in lines] == [0, 1, 2, 3]
    for name, (inode, mtime) in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (inode, mtime)


# About 45 s: over the ~30 s at which tests are usually marked slow, but the issue asks for this case in the
# default suite, and the whole suite stays well within its 10-minute budget.
def test_killed_ddp_run_reruns_to_every_item_once(pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "batch"
    command = [
        sys.executable,
        "-m",
        "lightning_nst",
        *batch_args(pipeline_dir, out, 6, "--trainer.devices=2", "--trainer.strategy=ddp"),
    ]
    # Rank 0 saves one item, then hangs holding the next it took from the queue; rank 1 generates the other four and
    # waits at the merge. Rank 0 takes its second item once its first is saved, when rank 1 can have taken at most two
    # of the six (processes take an item as they are ready for one), so five records, whatever the timing.
    stall = (
        '--trainer.callbacks+={"class_path": "tests.faults.test_generation_faults.Stall", "init_args": {"batches": 1}}'
    )
    kept = stalled_then_killed([*command, stall], out, finished=5, log=tmp_path / "killed.log")
    assert len(kept) == 5 and not (out / "predictions.jsonl").exists()

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # One item left for two processes: one of them gets none and still takes part in the merge.
    assert "Generating 1 of 6 items" in rerun.stderr
    lines = assert_complete(out, 6)
    assert {line["rank"] for line in lines} == {0, 1}
    for name, (inode, mtime) in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (inode, mtime)


def test_finished_batch_is_not_redone_and_changed_settings_are_refused(
    pipeline_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "batch"
    main(batch_args(pipeline_dir, out, 2))
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the pipeline was loaded although every item was finished")

    with monkeypatch.context() as patch, caplog.at_level(logging.INFO):
        patch.setattr(StableDiffusionPipeline, "from_pretrained", no_loading)
        main(batch_args(pipeline_dir, out, 2))
    assert f"All 2 items in {out} are finished; nothing to generate" in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before

    message = cli_error(capfd, batch_args(pipeline_dir, out, 2, "--data.negative_prompt=grey"))
    assert message == (
        f"lightning-nst: error: GenerationWriter.output_dir: {out} holds item 0 (00000_a-red-house-by-a-lake_0.png) "
        "made from a different prompt, seed, style or sampler setting than now; choose another folder or set "
        "overwrite: true"
    )
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before

    main(
        batch_args(pipeline_dir, out, 3, "--data.negative_prompt=grey", "--trainer.callbacks.init_args.overwrite=true")
    )
    lines = assert_complete(out, 3)
    assert {line["negative_prompt"] for line in lines} == {"grey"}
    assert all((out / name).stat().st_mtime_ns != mtime for name, mtime in before.items() if name.endswith(".png"))


@pytest.fixture(scope="module")
def finished_batch(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a finished batch of 2 items."""
    folder = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("HF_HUB_OFFLINE", "1")
        main(batch_args(pipeline_dir, folder / "batch", 2))
    return folder / "batch"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("--model.num_inference_steps=3", "holds item 0 (00000_a-red-house-by-a-lake_0.png) made from a different"),
        ("--model.cfg_scale=5", "holds item 0 (00000_a-red-house-by-a-lake_0.png) made from a different"),
        ("--data.seeds=[1, 0]", "holds item 0 (00000_a-red-house-by-a-lake_0.png) made from a different"),
        ("--data.seeds=[0]", "holds item 1, but the data defines only 1 item"),
        ("manifest", "holds predictions.jsonl, whose line 2 is not a record of this writer"),
    ],
)
def test_folder_of_other_settings_is_refused_and_kept(
    pipeline_dir: Path,
    finished_batch: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    change: str,
    problem: str,
) -> None:
    out = shutil.copytree(finished_batch, tmp_path / "batch")
    manifest = out / "predictions.jsonl"
    if change == "manifest":
        manifest.write_text(manifest.read_text().splitlines()[0] + "\nnot a record\n")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    message = cli_error(capfd, batch_args(pipeline_dir, out, 2, *([change] if change != "manifest" else [])))
    assert message.startswith(f"lightning-nst: error: GenerationWriter.output_dir: {out} {problem}")
    assert message.endswith("; choose another folder or set overwrite: true")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert not list(Path("logs").glob("batch/version_*"))  # the refused run left no log folder either


# -- hostile and unusual prompts ------------------------------------------------------------------------------------

HOSTILE = [
    "../../etc/passwd",
    "/abs/path",
    "a\\b",
    "..",
    "",
    "🎨🖼️🌊",
    "x" * 10_000,
    PROMPT,
    "C:\\Windows\\system32\\drivers",
    "~/.ssh/authorized_keys",
    "\u202egnp.exe",
    PROMPT,
]
# One prompt per line as a user's editor might save them: a byte-order mark, CRLF line ends, a blank line.
PROMPTS_FILE = [
    "🦊 a fox in the snow 🌨️",
    "שלום עולם, مرحبا بالعالم",
    "say \"cheese\" and 'hello'",
    "back\\slash\\path",
    "../../../../tmp/escape",
    "  padded with spaces\t",
    "one prompt\u2028despite a Unicode line separator",
    "",
    "y" * 5_000,
]


def test_hostile_prompts_stay_inside_the_output_folder(pipeline_dir: Path, tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(PROMPTS_FILE).encode("utf-8") + b"\r\n")
    (tmp_path / "hostile.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"prompts": HOSTILE}}}))
    out = tmp_path / "out"
    main(
        batch_args(
            pipeline_dir, out, 1, "-c", "hostile.yaml", f"--data.prompts_file={prompts_file}", "--data.batch_size=4"
        )
    )
    expected = HOSTILE + [line.strip() for line in PROMPTS_FILE if line.strip()]
    lines = assert_complete(out, len(expected))
    assert [line["base_prompt"] for line in lines] == expected
    names = [line["image"] for line in lines]
    assert len(set(names)) == len(names)
    for name in names:
        assert (out / name).resolve().parent == out.resolve()
        assert len(name) <= 80 and "/" not in name and "\\" not in name and ".." not in name
    # Nothing was written anywhere but the output folder and the log folder.
    written = {path for path in tmp_path.rglob("*") if path.is_file()} - {prompts_file, tmp_path / "hostile.yaml"}
    assert all(out in path.parents or tmp_path / "logs" in path.parents for path in written)
    assert not Path("/abs/path").exists()
    # The same prompt and seed at positions 7 and 11: two files of one image.
    first, second = (np.asarray(Image.open(out / names[index])) for index in (7, 11))
    assert names[7] != names[11] and np.array_equal(first, second)
    assert lines[7]["fingerprint"] == lines[11]["fingerprint"] != lines[0]["fingerprint"]


NOT_TEXT = "it is binary or UTF-16, not UTF-8 text with one prompt per line"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("a cat\ncafé au lait\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
        (b"a cat\na \x00dog\n", f"holds a NUL byte (line 2): {NOT_TEXT}"),
        ("a cat\n".encode("utf-16"), f"holds a NUL byte (line 1): {NOT_TEXT}"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), f"holds a NUL byte (line 3): {NOT_TEXT}"),
        (b"\xef\xbb\xbf\r\n  \r\n\t\r\n", "holds no prompts"),
        (None, "is not a file"),
    ],
)
def test_bad_prompts_file_is_named_and_nothing_is_written(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], content: bytes | None, problem: str
) -> None:
    prompts_file = tmp_path / "prompts.txt"
    if content is None:
        prompts_file.mkdir()
    else:
        prompts_file.write_bytes(content)
    out = tmp_path / "out"
    message = cli_error(capfd, batch_args(pipeline_dir, out, 1, f"--data.prompts_file={prompts_file}"))
    assert message == f"lightning-nst: error: data.prompts_file: {prompts_file} {problem}"
    assert not out.exists() and not Path("logs").exists()


def test_empty_style_list_is_named(pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    message = cli_error(capfd, batch_args(pipeline_dir, tmp_path / "out", 1, "--data.style=[]"))
    assert message == "lightning-nst: error: data.style: the list of style images is empty"
    assert not (tmp_path / "out").exists() and not Path("logs").exists()


# -- weights --------------------------------------------------------------------------------------------------------


class Payload:
    """A pickle that creates ``marker`` when unpickled, as a malicious ``.bin`` checkpoint would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def test_pipeline_weights_load_from_safetensors_never_from_pickles(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    weights = sorted(
        path.relative_to(pipeline_dir).as_posix()
        for path in pipeline_dir.rglob("*.*")
        if path.suffix in (".safetensors", ".bin", ".pt", ".ckpt")
    )
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    pipeline = shutil.copytree(pipeline_dir, tmp_path / "pipeline")
    marker = tmp_path / "pickle-ran"
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))

    # Beside safetensors, the pickle is never opened.
    main(batch_args(pipeline, tmp_path / "out", 1, "--model.num_inference_steps=1"))
    assert len(records(tmp_path / "out")) == 1 and not marker.exists()

    # Alone, it is refused by torch.load(weights_only=True) and its code does not run.
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    message = cli_error(capfd, batch_args(pipeline, tmp_path / "out2", 1))
    assert message.startswith(f"lightning-nst: error: model.model: cannot load StableDiffusionPipeline from {pipeline}")
    assert "unet/diffusion_pytorch_model.bin" in message and not marker.exists()
    assert not (tmp_path / "out2").exists()


def test_a_shared_output_folder_keeps_everything_the_writer_did_not_write(pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    mine = {"notes.txt": b"mine", "holiday.png": b"not ours", ".backup.tmp": b"mine", "predictions.jsonl": b""}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    main(batch_args(pipeline_dir, out, 1))
    main(batch_args(pipeline_dir, out, 2))  # a rerun with one more item tidies the folder again
    assert {name: (out / name).read_bytes() for name in mine if name != "predictions.jsonl"} == {
        name: data for name, data in mine.items() if name != "predictions.jsonl"
    }
    assert [line["index"] for line in records(out)] == [0, 1]


# -- files the writer did not write -----------------------------------------------------------------------------------


def generate_args(pipeline_dir: Path, out: Path, style: str, *flags: str) -> list[str]:
    return [
        "generate", "a cat", "--style", style, "-o", str(out), "--model", str(pipeline_dir),
        "--steps", "2", "--size", "32", "--weights", "random", "--scale", "0", *flags,
    ]  # fmt: skip


def test_a_file_of_the_users_under_an_items_name_is_refused_and_kept(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000_a-cat_0.png").write_bytes(b"USERDATA\n")
    message = cli_error(capfd, generate_args(pipeline_dir, out, "sample:gravel"))
    assert message == (
        f"lightning-nst: error: GenerationWriter.output_dir: {out / '00000_a-cat_0.png'} has no record: "
        f"{out / 'predictions.jsonl'} is missing (deleted or moved?); put the manifest back, move the images away, "
        "or set overwrite: true to replace them"
    )
    assert [path.name for path in out.iterdir()] == ["00000_a-cat_0.png"]
    assert (out / "00000_a-cat_0.png").read_bytes() == b"USERDATA\n"
    assert not Path("logs").exists()  # refused before the run made its log folder
    # Beside a manifest of the folder's own items, such a file is named as one the manifest does not record.
    mine = out / "00001_a-cat_1.png"
    (out / "00000_a-cat_0.png").rename(mine)
    main(generate_args(pipeline_dir, out, "sample:gravel", "--seeds", "0"))
    message = cli_error(capfd, generate_args(pipeline_dir, out, "sample:gravel", "--seeds", "0", "1"))
    assert message == (
        f"lightning-nst: error: GenerationWriter.output_dir: {mine} is not a file predictions.jsonl records (a file "
        "of yours?); move it away, or set overwrite: true to replace it"
    )
    assert mine.read_bytes() == b"USERDATA\n"
    # --overwrite says replace: then it is.
    main(generate_args(pipeline_dir, out, "sample:gravel", "--seeds", "0", "1", "--overwrite"))
    with Image.open(mine) as image:
        assert image.format == "PNG" and image.size == (32, 32)


def test_a_finished_batch_whose_manifest_is_gone_is_refused_not_replaced(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    main(generate_args(pipeline_dir, out, "sample:gravel", "--seeds", "0", "1"))
    images = {path.name: path.read_bytes() for path in out.glob("*.png")}
    assert len(images) == 2
    (out / "predictions.jsonl").rename(tmp_path / "moved.jsonl")
    message = cli_error(capfd, generate_args(pipeline_dir, out, "sample:immunohistochemistry", "--seeds", "0", "1"))
    assert message == (
        f"lightning-nst: error: GenerationWriter.output_dir: {out / '00000_a-cat_0.png'} (and 1 more) has no record: "
        f"{out / 'predictions.jsonl'} is missing (deleted or moved?); put the manifest back, move the images away, "
        "or set overwrite: true to replace them"
    )
    assert {path.name: path.read_bytes() for path in out.glob("*.png")} == images
    # The manifest put back, the same command with the first style finds everything finished.
    (tmp_path / "moved.jsonl").rename(out / "predictions.jsonl")
    main(generate_args(pipeline_dir, out, "sample:gravel", "--seeds", "0", "1"))
    assert {path.name: path.read_bytes() for path in out.glob("*.png")} == images


def test_a_refused_run_does_not_say_it_is_generating(
    pipeline_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    args = batch_args(pipeline_dir, tmp_path / "out", 1, f"--model.model={tmp_path / 'no_such_model'}")
    with caplog.at_level(logging.INFO):
        message = cli_error(capfd, args)
    assert message.startswith("lightning-nst: error: model.model: ") and "no_such_model" in message
    assert "Generating" not in caplog.text


def test_a_folder_written_in_a_newer_format_is_refused_not_continued(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    main(batch_args(pipeline_dir, out, 1))
    manifest = out / MANIFEST
    (record,) = records(out)
    manifest.write_text(json.dumps({**record, "format": FORMAT + 1}) + "\n", encoding="utf-8")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    message = cli_error(capfd, batch_args(pipeline_dir, out, 2))
    assert message == (
        f"lightning-nst: error: {manifest} line 1: written in format {FORMAT + 1} by a newer lightning_nst; this one "
        f"reads format {FORMAT} and earlier (upgrade lightning_nst to read it)"
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
