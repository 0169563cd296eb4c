"""GenerationWriter: the manifest's keys, fingerprints of earlier folders, reruns that find every item done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

from lightning_nst import VGGConfig
from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import FILES_RECORD, OutputFolder
from lightning_nst.diffusion.guidance import StyleGuidance
from lightning_nst.diffusion.module import GuidedDiffusion
from lightning_nst.diffusion.prompts import GenerationItem, PromptGrid
from lightning_nst.diffusion.writer import GenerationWriter
from lightning_nst.main import main
from lightning_nst.outputs import MANIFEST, GenerationRecord, preview_file, read_manifest
from tests.tiny_pipeline import REPO, batch_args, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

# The keys of a manifest line, in order, as written before the records were typed: readers of earlier folders rely
# on them.
MANIFEST_KEYS = [
    "index",
    "image",
    "sha256",
    "fingerprint",
    "prompt",
    "base_prompt",
    "style_prompt",
    "negative_prompt",
    "seed",
    "style",
    "style_digest",
    "model",
    "scheduler",
    "num_inference_steps",
    "cfg_scale",
    "eta",
    "size",
    "dtype",
    "guidance",
    "final_style_loss",
    "style_loss",
    "timesteps",
    "guided",
    "nsfw",
    "seconds_per_step",
    "rank",
]


def test_manifest_lines_keep_their_keys_and_previews_their_names(pipeline_dir: Path, tmp_path: Path) -> None:
    out, previews = tmp_path / "out", tmp_path / "previews"
    Path("callbacks.yaml").write_text(
        "trainer:\n  callbacks:\n"
        f"    - {{class_path: lightning_nst.TrajectoryLogger, init_args: {{preview_every: 1, save_dir: "
        f"{previews}}}}}\n"
        f"    - {{class_path: lightning_nst.GenerationWriter, init_args: {{output_dir: {out}}}}}\n"
    )
    main(tiny_args(pipeline_dir, "keys", "-c", "callbacks.yaml", "--model.num_inference_steps=2"))
    (line,) = (out / MANIFEST).read_text(encoding="utf-8").splitlines()
    assert list(json.loads(line)) == [*MANIFEST_KEYS, "format"]  # the version of the record comes last
    (record,) = read_manifest(out / MANIFEST)
    assert record.to_json() == line  # the typed record reads and writes the line as it is
    assert record.image == "00000_a-red-house-by-a-lake_0.png" and record.size == [64, 64]
    assert record.guidance is not None and record.guidance["layers"] == ["relu1_1", "relu2_1", "relu3_1"]
    assert sorted(path.name for path in previews.iterdir()) == [FILES_RECORD, preview_file(0, 0), preview_file(0, 1)]
    # The folder's record holds each preview with its bytes, so a rerun may replace them and nothing else.
    folder = OutputFolder(previews, "TrajectoryLogger.save_dir")
    assert folder.foreign([preview_file(0, 0), preview_file(0, 1)]) == []


def test_a_record_missing_a_key_is_named() -> None:
    with pytest.raises(KeyError, match="rank"):
        GenerationRecord.from_dict({key: None for key in MANIFEST_KEYS if key != "rank"})


ITEM = GenerationItem(7, "a cat, in oil", "a cat", "blurry", 3, "skimage:brick", 0, "in oil", "skimage:brick")


@pytest.mark.parametrize(
    ("model", "fingerprint"),
    [
        (lambda: GuidedDiffusion("some/model", None, height=64, width=64, num_inference_steps=6), "243dc9f823f0e4de"),
        (
            lambda: GuidedDiffusion(
                "some/model",
                StyleGuidance(scale=0.3, layers=["relu1_1", "relu2_1"], vgg=VGGConfig("random")),
                height=64,
                width=64,
                num_inference_steps=6,
            ),
            "86ef12a0e99b7cf1",
        ),
        (
            lambda: GuidedDiffusion(
                "some/model",
                StyleGuidance(
                    layers={"relu1_1": 2, "relu2_1": 1},
                    statistic="meanvar",
                    vgg=VGGConfig("random", pooling="avg"),
                ),
                dtype="bfloat16",
                scheduler="ddpm",
                eta=0.5,
                cfg_scale=3.0,
            ),
            "645592d0ead26239",
        ),
    ],
)
def test_fingerprints_of_earlier_folders_are_unchanged(model: object, fingerprint: str) -> None:
    # Hashes computed by the code before fingerprint_options() replaced spec(): a folder finished by an earlier version
    # must still be recognised as finished, not refused as made with other settings.
    module = model()  # type: ignore[operator]
    assert ITEM.fingerprint(module.fingerprint_options()) == fingerprint


def test_dpmpp_sde_items_made_before_their_noise_was_per_item_are_other_items() -> None:
    # Before, DPM-SDE's noise came from torch's global random state: such an item is another image than now.
    sde = GuidedDiffusion("some/model", None, scheduler="dpmpp_sde", height=64, width=64)
    assert sde.fingerprint_options()["sde_noise"] == "per item"
    before = {key: value for key, value in sde.fingerprint_options().items() if key != "sde_noise"}
    assert ITEM.fingerprint(sde.fingerprint_options()) != ITEM.fingerprint(before)
    assert "sde_noise" not in GuidedDiffusion("some/model", None, scheduler="euler_a").fingerprint_options()


def test_writer_refuses_a_module_it_cannot_describe(tmp_path: Path) -> None:
    grid = PromptGrid(prompts=["a"])
    grid.setup("predict")
    trainer = SimpleNamespace(log_dir=str(tmp_path), datamodule=grid)
    with pytest.raises(NSTError, match=r"^model: GenerationWriter needs a module that defines fingerprint_options"):
        GenerationWriter().setup(trainer, L.LightningModule(), "predict")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_rerun_with_every_item_finished_runs_no_step_and_warns_nothing(pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "batch"
    main(batch_args(pipeline_dir, out, 1))
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_nst", *batch_args(pipeline_dir, out, 1)]
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"All 1 items in {out} are finished; nothing to generate" in rerun.stderr
    # Lightning warns about an empty predict dataloader, which is what "nothing to generate" is here.
    assert "Please make sure this was your intention" not in rerun.stderr, rerun.stderr
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before
