"""Style-guided Stable Diffusion end to end, on a tiny random pipeline saved to disk and run through the real CLI.

The parts have their own modules: test_guidance.py, test_prompts.py and test_writers.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nst.core.hardware import fast_bf16
from lightning_nst.diffusion.module import DenoisingCallback
from lightning_nst.main import main
from tests.conftest import CONFIGS, MODELS, REPO, cli_error
from tests.tiny_pipeline import (
    GUIDED,
    STEPS,
    build_tiny_autoencoder,
    records,
    run_ddp,
    tiny_args,
)

PROMPT_ONLY = CONFIGS / "prompt_only_diffusion.yaml"
# Guided (scale 0.3, 6 steps) over unguided final style loss, and the guided trajectory's last over first value, for
# the models the tiny pipeline gets (conftest.MODELS). Measured: real VGG weights and CLIP vocabulary 0.174 and
# 0.173 (threshold 0.5, ~3x margin); random weights and byte vocabulary 0.690 and 0.691 (threshold 0.8, 14% margin:
# a random VGG19's gradient guides less, and its style loss is ~1e-7 against ~4e-4).
GUIDED_RATIO = {"real": 0.5, "random": 0.8}[MODELS]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_autoencoder(tmp_path_factory.mktemp("pipelines") / "tiny-taesd")


def predict(pipeline: Path, name: str, *overrides: str, config: Path = GUIDED) -> Path:
    """Run the CLI in this process and return the run folder."""
    main(tiny_args(pipeline, name, *overrides, config=config))
    (run,) = Path("logs", name).glob("version_*")
    return run


def pixels(run: Path, record: dict[str, Any]) -> np.ndarray:
    with Image.open(run / record["image"]) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image).copy()


@pytest.fixture(scope="module")
def runs(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The same prompt and seed sampled without guidance, with scale 0, and guided; shared by several tests."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TORCH_HOME", str(folder / "torch_home"))
        yield {
            "plain": folder / predict(pipeline_dir, "plain", "--model.guidance=null"),
            "scale0": folder / predict(pipeline_dir, "scale0", "--model.guidance.init_args.scale=0"),
            "guided": folder / predict(pipeline_dir, "guided", "--model.guidance.init_args.scale=0.3"),
        }


# -- the guided loop ------------------------------------------------------------------------------------------------


def test_guidance_lowers_style_loss_and_scale_zero_is_unguided(runs: dict[str, Path]) -> None:
    (plain,), (unguided,), (guided,) = (records(runs[name]) for name in ("plain", "scale0", "guided"))
    assert np.array_equal(pixels(runs["plain"], plain), pixels(runs["scale0"], unguided))
    assert plain["final_style_loss"] is None and plain["style_loss"] is None
    assert not any(unguided["guided"]) and all(guided["guided"])
    assert guided["final_style_loss"] <= unguided["final_style_loss"] * GUIDED_RATIO
    trajectory = guided["style_loss"]
    assert len(trajectory) == STEPS and trajectory[-1] < trajectory[0] * GUIDED_RATIO
    assert sum(b < a for a, b in zip(trajectory, trajectory[1:], strict=False)) >= STEPS - 2  # falls overall
    image = pixels(runs["guided"], guided)
    assert image.shape == (64, 64, 3) and not np.array_equal(image, pixels(runs["scale0"], unguided))


def test_manifest_records_what_was_generated(runs: dict[str, Path]) -> None:
    (record,) = records(runs["guided"])
    assert record["image"] == "00000_a-red-house-by-a-lake_0.png" and (runs["guided"] / record["image"]).is_file()
    assert record["prompt"] == "a red house by a lake" and record["negative_prompt"] == "blurry, low quality"
    assert record["seed"] == 0 and record["style"] == "sample:immunohistochemistry"
    assert record["scheduler"] == "DDIMScheduler" and record["num_inference_steps"] == STEPS
    assert record["size"] == [64, 64] and record["dtype"] == "float32"
    settings = record["guidance"]
    assert settings["scale"] == 0.3 and settings["normalize"] is True and settings["decoder"] == "auto"
    assert settings["layers"] == ["relu1_1", "relu2_1", "relu3_1"] and settings["statistic"] == "gram"
    # vgg_precision auto: the VGG pass in bf16 where this CPU computes it natively; what ran is recorded
    assert settings["vgg_dtype"] == ("bfloat16" if fast_bf16("cpu") else "float32")
    assert "vgg_precision" not in settings
    assert len(record["timesteps"]) == STEPS and record["timesteps"] == sorted(record["timesteps"], reverse=True)
    assert record["seconds_per_step"] > 0 and np.isfinite(record["final_style_loss"])
    assert not list(runs["guided"].glob(".*.part"))  # per-rank parts are merged away


def test_tensorboard_holds_style_loss_scalars_and_previews(runs: dict[str, Path]) -> None:
    events = EventAccumulator(str(runs["guided"]), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"style_loss/00000", "timestep/00000", "final_style_loss/00000"} <= set(tags["scalars"])
    assert {"x0/00000", "x0_table/00000", "image/00000"} <= set(tags["images"])
    losses = events.Scalars("style_loss/00000")
    assert [event.step for event in losses] == list(range(STEPS))
    (record,) = records(runs["guided"])
    assert [event.value for event in losses] == pytest.approx(record["style_loss"], rel=1e-5)
    assert [int(event.value) for event in events.Scalars("timestep/00000")] == record["timesteps"]
    # previews every 10 steps and at the last one: steps 0 and 5 of 6
    assert [event.step for event in events.Images("x0/00000")] == [0, STEPS - 1]


def test_an_explicit_vgg_precision_is_honoured_and_recorded(
    runs: dict[str, Path], pipeline_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The value auto does not choose on this machine, so both dtypes are exercised wherever the tests run.
    explicit = "float32" if fast_bf16("cpu") else "bfloat16"
    with caplog.at_level("INFO"):
        run = predict(
            pipeline_dir, "explicit", "--model.guidance.init_args.scale=0.3",
            f"--model.guidance.init_args.vgg_precision={explicit}",
        )  # fmt: skip
    assert f"VGG pass in {explicit} (vgg_precision {explicit})" in caplog.text  # the "Style guidance:" line
    (record,), (auto,), (unguided,) = (records(folder) for folder in (run, runs["guided"], runs["scale0"]))
    assert record["guidance"]["vgg_precision"] == record["guidance"]["vgg_dtype"] == explicit
    assert record["fingerprint"] != auto["fingerprint"]  # another setting: a folder of the other is not continued
    assert pixels(run, record).shape == (64, 64, 3) and all(record["guided"])
    assert record["final_style_loss"] <= unguided["final_style_loss"] * GUIDED_RATIO


class StepRecorder(DenoisingCallback):
    """A further per-step callback, added from the command line like any YAML callback."""

    calls: ClassVar[list[tuple[int, int, list[str]]]] = []

    def on_denoising_step(
        self, trainer: Any, pl_module: Any, step_index: int, timestep: int, callback_kwargs: dict[str, Any]
    ) -> None:
        StepRecorder.calls.append((step_index, timestep, sorted(callback_kwargs)))


def test_prompt_only_baseline_logs_the_same_trajectory(pipeline_dir: Path) -> None:
    StepRecorder.calls.clear()
    run = predict(
        pipeline_dir, "prompt_only", "--trainer.callbacks+=tests.diffusion.test_module.StepRecorder", config=PROMPT_ONLY
    )
    (record,) = records(run)
    assert record["prompt"].startswith("a red house by a lake, in the style of ")
    assert record["style_prompt"] and record["base_prompt"] == "a red house by a lake"
    assert record["guidance"]["scale"] == 0.0 and not any(record["guided"])
    assert len(record["style_loss"]) == STEPS and all(np.isfinite(record["style_loss"]))
    assert np.isfinite(record["final_style_loss"])
    assert [(step, t) for step, t, _ in StepRecorder.calls] == list(enumerate(record["timesteps"]))
    assert {"latents", "noise_pred", "style_loss", "x0_image", "index"} <= set(StepRecorder.calls[0][2])


def test_tiny_autoencoder_decodes_for_the_gradient(pipeline_dir: Path, tiny_vae_dir: Path) -> None:
    run = predict(
        pipeline_dir,
        "taesd",
        f"--model.tiny_vae={tiny_vae_dir}",
        "--model.guidance.init_args.decoder=tiny",
        "--model.guidance.init_args.scale=0.3",
    )
    (record,) = records(run)
    assert record["guidance"]["decoder"] == "tiny" and all(record["guided"])
    # The trajectory is measured on tiny decodes, so it falls; the output is still decoded by the full VAE.
    # Measured last/first: 0.20 with real models, 0.54 with random ones.
    assert record["style_loss"][-1] < record["style_loss"][0]
    assert pixels(run, record).shape == (64, 64, 3)


def test_bf16_mixed_precision_keeps_style_statistics_finite(pipeline_dir: Path) -> None:
    run = predict(pipeline_dir, "bf16", "--trainer.precision=bf16-mixed", "--model.guidance.init_args.scale=0.3")
    (record,) = records(run)
    assert np.isfinite(record["final_style_loss"]) and all(np.isfinite(record["style_loss"]))
    assert record["style_loss"][-1] < record["style_loss"][0]  # measured 0.17x with real models, 0.69x with random


def test_loading_a_pipeline_into_a_log_draws_no_progress_bars(
    pipeline_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Off a terminal (here: captured), diffusers' loading bar and transformers' bar nested in it would only clutter
    # the log, the nested one breaking the other's line in two.
    capfd.readouterr()
    predict(pipeline_dir, "bars", "--model.guidance=null", "--model.num_inference_steps=1")
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err


def test_offline_a_cached_hub_model_loads_at_once_and_a_missing_one_fails_at_once(
    pipeline_dir: Path, tmp_path: Path
) -> None:
    # A Hub id with the Hub unreachable (a closed local port) and HF_HUB_OFFLINE unset, as on a laptop on a train:
    # huggingface_hub would retry each request with back-off (about 23 s, a log line per try) before using its cache.
    cache = tmp_path / "hub"
    revision = "0" * 40
    shutil.copytree(pipeline_dir, cache / "models--someone--tiny-sd" / "snapshots" / revision)
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text(revision)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    for model, code in (("someone/tiny-sd", 0), ("someone/not-cached", 2)):
        args = tiny_args(pipeline_dir, model.split("/")[1], f"--model.model={model}", "--model.guidance=null")
        result = subprocess.run(
            [sys.executable, "-m", "lightning_nst", *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == code, result.stderr[-3000:]
        assert "thrown while requesting" not in result.stderr and "Retrying" not in result.stderr, result.stderr
    assert len(records(next(Path("logs/tiny-sd").glob("version_*")))) == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "Cause: the Hub cannot be reached (Connection refused) and the cache has no complete copy of "
            "'someone/not-cached'"
        )
    )


@pytest.mark.slow  # 12 s; the default suite runs two processes in test_killed_ddp_run_reruns_to_every_item_once
def test_ddp_on_two_processes_writes_every_item_once(pipeline_dir: Path) -> None:
    args = tiny_args(pipeline_dir, "ddp", "--data.seeds=[0, 1, 2, 3, 4]", "--data.batch_size=2")
    run = run_ddp([*args, "--model.num_inference_steps=2"], "ddp")
    lines = records(run)
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]
    assert sorted(line["seed"] for line in lines) == [0, 1, 2, 3, 4]
    assert {line["rank"] for line in lines} == {0, 1}
    pngs = sorted(run.glob("*.png"))
    assert [png.name for png in pngs] == sorted(line["image"] for line in lines)
    assert len({hashlib.sha256(png.read_bytes()).hexdigest() for png in pngs}) == 5
    events = EventAccumulator(str(run))  # rank 1 writes its own event file into the run folder
    events.Reload()
    assert {f"style_loss/{index:05d}" for index in range(5)} <= set(events.Tags()["scalars"])


# -- errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--data.style=[missing/style.jpg]", "data.style[0]: image file not found"),
        ("--model.scheduler=eulr", "model.scheduler: 'eulr' is not a scheduler; choose ddim, ddpm, pndm, euler"),
        ("--model.scheduler=KDPM2DiscreteScheduler", "model.scheduler: KDPM2DiscreteScheduler cannot be guided"),
        ("--model.model=/no/such/pipeline", "model.model: no such folder: /no/such/pipeline"),
        ("--model.model=nobody/no-such-pipeline", "pass a local folder instead"),
        ("--model.guidance.init_args.decoder=tiny", "model.guidance.decoder: 'tiny' needs model.tiny_vae"),
        ("--data.prompts=[]", "data.prompts: the list of prompts is empty"),
        # Found when the run sets up (the trunk is built then, not while the config is read), still before any output.
        ("--model.guidance.init_args.vgg.weights=missing.pth", "model.guidance.vgg.weights: weights file not found"),
        # Literal types: the parser's own message names the key (no hand check repeats it).
        ("--model.dtype=float8", "model.dtype: must be one of auto, float32, float16, bfloat16"),
        ("--model.guidance.init_args.decoder=big", "model.guidance.decoder: must be one of auto, vae, tiny"),
        ("--model.guidance.init_args.statistic=median", "model.guidance.statistic: must be one of gram, meanvar"),
        ("--model.guidance.init_args.vgg_precision=32", "model.guidance.vgg_precision: must be one of auto, bfloat16"),
    ],
)
def test_bad_input_gives_one_line_error(
    pipeline_dir: Path, capfd: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    message = cli_error(capfd, tiny_args(pipeline_dir, "bad", override))
    assert message.startswith("lightning-nst: error: ") and expected in message
    assert not list(Path("logs").glob("bad/version_*"))  # no run folder left behind looking like a result


def test_unsupported_pipeline_scheduler_is_named(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    kdpm2 = tmp_path / "kdpm2-pipeline"
    shutil.copytree(pipeline_dir, kdpm2)
    index = kdpm2 / "model_index.json"
    index.write_text(
        json.dumps({**json.loads(index.read_text()), "scheduler": ["diffusers", "KDPM2DiscreteScheduler"]})
    )
    message = cli_error(capfd, tiny_args(kdpm2, "kdpm2", "--model.scheduler=pipeline"))
    assert "model.scheduler: KDPM2DiscreteScheduler is not supported by the guided sampler" in message
    assert not Path("logs", "kdpm2").exists() or not any(Path("logs", "kdpm2").iterdir())
