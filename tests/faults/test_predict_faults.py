"""The predict path under bad settings and damaged outputs: no NaN image is a result, finished means intact."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import file_digest
from lightning_nst.diffusion.module import DenoisingCallback, GuidedDiffusion
from lightning_nst.main import main
from tests.conftest import cli_error
from tests.tiny_pipeline import batch_args, records, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def mtimes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.glob("*.png")}


# -- settings out of range are refused before any work ------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.eta=-5", "model.eta: must be in [0, 1] (0 is deterministic DDIM, 1 adds full noise), got -5.0"),
        ("--model.eta=1.5", "model.eta: must be in [0, 1]"),
        ("--model.cfg_scale=-2", "model.cfg_scale: must be a finite number >= 0 (<= 1 turns it off), got -2.0"),
        ("--model.height=100000", "model.height: must be a multiple of 8 pixels from 8 to 8192, got 100000"),
        (
            "--model.num_inference_steps=1001",
            "model.num_inference_steps: 1001 is more than the 1000 timesteps the scheduler of",
        ),
    ],
)
def test_out_of_range_settings_are_refused_before_loading(
    pipeline_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    override: str,
    expected: str,
) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the pipeline was loaded before the settings were checked")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_loading)
    out = tmp_path / "out"
    message = cli_error(
        capfd, tiny_args(pipeline_dir, "range", f"--trainer.callbacks.init_args.output_dir={out}", override)
    )
    assert message.startswith(f"lightning-nst: error: {expected}")
    assert not out.exists() and not list(Path("logs").glob("range/version_*"))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"cfg_scale": math.inf}, "model.cfg_scale: must be a finite number >= 0 (<= 1 turns it off), got inf"),
        ({"cfg_scale": math.nan}, "model.cfg_scale: must be a finite number >= 0 (<= 1 turns it off), got nan"),
        ({"eta": math.nan}, "model.eta: must be in [0, 1] (0 is deterministic DDIM, 1 adds full noise), got nan"),
    ],
)
def test_non_finite_settings_from_python_are_refused(kwargs: dict[str, float], expected: str) -> None:
    # The CLI's parser refuses inf and nan for floats itself; the Python API reaches these checks.
    with pytest.raises(NSTError) as error:
        GuidedDiffusion(guidance=None, **kwargs)
    assert str(error.value) == expected


# -- non-finite values never make a result --------------------------------------------------------------------------


def test_overflowing_cfg_scale_writes_no_image_and_exits_2(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        message = cli_error(capfd, batch_args(pipeline_dir, out, 2, "--model.cfg_scale=1e38"))
    assert message.startswith("lightning-nst: error: model.cfg_scale: 2 of 2 items failed with values that are not ")
    assert "first: item 0 (00000_a-red-house-by-a-lake_0.png): step " in message
    for index in (0, 1):
        assert f"model.cfg_scale: item {index} (0000{index}_a-red-house-by-a-lake_{index}.png): step " in caplog.text
    # Nothing is left: no PNG, manifest, hidden part or lock file, and the folder the run made is gone again.
    assert not out.exists()


class Poison(DenoisingCallback):
    """Turn item 1's latents into NaN at the last step, as an overflow in one item of a batch would."""

    def on_denoising_step(
        self, trainer: Any, pl_module: Any, step_index: int, timestep: int, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any] | None:
        latents = callback_kwargs["latents"].clone()
        for row, index in enumerate(callback_kwargs["index"]):
            if index == 1 and step_index == pl_module.num_timesteps - 1:
                latents[row] = float("nan")
        return {"latents": latents}


def test_a_failed_item_is_not_recorded_and_a_rerun_makes_only_it(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    args = batch_args(pipeline_dir, out, 3, "--data.batch_size=2")
    message = cli_error(capfd, [*args, "--trainer.callbacks+=tests.faults.test_predict_faults.Poison"])
    assert message == (
        "lightning-nst: error: trainer.callbacks: 1 of 3 items failed with values that are not finite and were not "
        "written (first: item 1 (00001_a-red-house-by-a-lake_1.png): step 1: the latents Poison returned is not "
        f"finite); the 2 finished are in {out}; a rerun into the same folder generates only what is missing"
    )
    assert [line["index"] for line in records(out)] == [0, 2]
    assert sorted(path.name for path in out.glob("*.png")) == [
        "00000_a-red-house-by-a-lake_0.png",
        "00002_a-red-house-by-a-lake_2.png",
    ]
    before = mtimes(out)
    with caplog.at_level(logging.INFO):
        main(args)
    assert f"Generating 1 of 3 items into {out}; 2 finished earlier are kept" in caplog.text
    assert [line["index"] for line in records(out)] == [0, 1, 2]
    assert all(mtimes(out)[name] == mtime for name, mtime in before.items())


# -- finished means intact, and a changed input is a changed item -------------------------------------------------


def test_a_png_changed_since_it_was_written_is_refused_and_kept(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = batch_args(pipeline_dir, out, 4)
    main(args)
    lines = records(out)
    assert all(line["sha256"] == file_digest(out / line["image"]) for line in lines)
    names = [line["image"] for line in lines]
    original = {name: (out / name).read_bytes() for name in names}
    (out / names[1]).write_bytes(original[names[1]][:100])  # damaged
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out / names[2])  # edited: the user's work now
    changed = {name: (out / name).read_bytes() for name in names}

    message = cli_error(capfd, args)
    assert message == (
        f"lightning-nst: error: GenerationWriter.output_dir: {out / names[1]} (and 1 more) is not the image "
        "predictions.jsonl recorded for it (edited, replaced or damaged since); move it away to generate it again, or "
        "set overwrite: true to replace it"
    )
    assert {name: (out / name).read_bytes() for name in names} == changed
    # Moved away, they are generated again from their seeds: the very bytes the first run wrote, with their digest.
    for name in names[1:3]:
        (out / name).rename(tmp_path / name)
    main(args)
    assert {name: (out / name).read_bytes() for name in names} == original
    assert [line["sha256"] for line in records(out)] == [line["sha256"] for line in lines]


def test_style_image_edited_in_place_is_a_changed_item(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    style, out = tmp_path / "style.png", tmp_path / "out"
    Image.new("RGB", (32, 32), (20, 40, 200)).save(style)
    args = batch_args(pipeline_dir, out, 1, f"--data.style=[{style}]")
    main(args)
    (line,) = records(out)
    assert line["style"] == str(style) and line["style_digest"] == file_digest(style)

    Image.new("RGB", (32, 32), (220, 180, 20)).save(style)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    message = cli_error(capfd, args)
    assert message == (
        f"lightning-nst: error: GenerationWriter.output_dir: {out} holds item 0 (00000_a-red-house-by-a-lake_0.png) "
        "made from a different prompt, seed, style or sampler setting than now; choose another folder or set "
        "overwrite: true"
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
