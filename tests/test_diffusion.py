"""Style-guided Stable Diffusion end to end, on a tiny random pipeline saved to disk and run through the real CLI."""

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
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nst.cli import main
from lightning_nst.diffusion import DenoisingCallback
from lightning_nst.errors import NSTError
from lightning_nst.guidance import StyleGuidance, check_scheduler, decode_latents, predict_x0, rms_normalize
from lightning_nst.images import load_image
from lightning_nst.outputs import slugify
from lightning_nst.prompts import PromptGrid
from lightning_nst.vgg import VGGConfig
from tests.conftest import CONFIGS, MODELS, REPO
from tests.tiny_pipeline import (
    GUIDED,
    STEPS,
    VGG,
    build_tiny_autoencoder,
    records,
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
    assert record["seed"] == 0 and record["style"] == "skimage:immunohistochemistry"
    assert record["scheduler"] == "DDIMScheduler" and record["num_inference_steps"] == STEPS
    assert record["size"] == [64, 64] and record["dtype"] == "float32"
    settings = record["guidance"]
    assert settings["scale"] == 0.3 and settings["normalize"] is True and settings["decoder"] == "auto"
    assert settings["layers"] == ["relu1_1", "relu2_1", "relu3_1"] and settings["statistic"] == "gram"
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
        pipeline_dir, "prompt_only", "--trainer.callbacks+=tests.test_diffusion.StepRecorder", config=PROMPT_ONLY
    )
    (record,) = records(run)
    assert record["prompt"].startswith("a red house by a lake, in the style of ")
    assert record["style_prompt"] and record["base_prompt"] == "a red house by a lake"
    assert record["guidance"]["scale"] == 0.0 and not any(record["guided"])
    assert len(record["style_loss"]) == STEPS and all(np.isfinite(record["style_loss"]))
    assert np.isfinite(record["final_style_loss"])
    assert [(step, t) for step, t, _ in StepRecorder.calls] == list(enumerate(record["timesteps"]))
    assert {"latents", "noise_pred", "style_loss", "x0_image", "index"} <= set(StepRecorder.calls[0][2])


def test_same_seed_same_image_across_batching_and_ddpm(pipeline_dir: Path) -> None:
    # The README's guarantee. At batch size 1 an item's image is the same bit for bit; batched, the UNet, VAE and VGG
    # kernels round differently, so it differs from its unbatched self by at most 1/255 in under 10% of its values
    # (measured: 0.4% and 4%).
    prompts = "--data.prompts=[a red house by a lake, a red house by a lake, a blue boat]"
    single = predict(pipeline_dir, "ddpm1", "--model.scheduler=ddpm", prompts, "--data.batch_size=1")
    batched = predict(pipeline_dir, "ddpm3", "--model.scheduler=ddpm", prompts, "--data.batch_size=3")
    alone, together = records(single), records(batched)
    assert alone[0]["scheduler"] == "DDPMScheduler"
    # The same prompt and seed, each in a batch of its own, with DDPM's per-step noise: identical images.
    assert np.array_equal(pixels(single, alone[0]), pixels(single, alone[1]))
    assert alone[0]["style_loss"] == alone[1]["style_loss"]
    assert not np.array_equal(pixels(single, alone[0]), pixels(single, alone[2]))
    for one, many in zip(alone, together, strict=True):
        difference = np.abs(pixels(single, one).astype(int) - pixels(batched, many).astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.1
        assert many["style_loss"] == pytest.approx(one["style_loss"], rel=1e-3)
    assert together[2]["style_loss"][-1] < together[2]["style_loss"][0]


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


def test_ddp_on_two_processes_writes_every_item_once(pipeline_dir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "lightning_nst",
        *tiny_args(pipeline_dir, "ddp", "--data.seeds=[0, 1, 2, 3, 4]", "--data.batch_size=2"),
        "--model.num_inference_steps=2",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = Path("logs", "ddp").glob("version_*")
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


def cli_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert "Traceback" not in stderr
    last = stderr.splitlines()[-1]
    assert last.startswith("lightning-nst: error: ")
    return last


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--data.style=[missing/style.jpg]", "data.style[0]: image file not found"),
        ("--model.scheduler=euler", "model.scheduler: 'euler' is not supported; choose ddim, ddpm or pipeline"),
        ("--model.model=/no/such/pipeline", "model.model: no such folder: /no/such/pipeline"),
        ("--model.model=nobody/no-such-pipeline", "pass a local folder instead"),
        ("--model.guidance.init_args.decoder=tiny", "model.guidance.decoder: 'tiny' needs model.tiny_vae"),
        ("--data.prompts=[]", "data.prompts: the list of prompts is empty"),
    ],
)
def test_bad_input_gives_one_line_error(
    pipeline_dir: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    assert expected in cli_error(capsys, tiny_args(pipeline_dir, "bad", override))
    assert not list(Path("logs").glob("bad/version_*"))  # no run folder left behind looking like a result


def test_unsupported_pipeline_scheduler_is_named(
    pipeline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    euler = tmp_path / "euler-pipeline"
    shutil.copytree(pipeline_dir, euler)
    index = euler / "model_index.json"
    index.write_text(
        json.dumps({**json.loads(index.read_text()), "scheduler": ["diffusers", "EulerDiscreteScheduler"]})
    )
    message = cli_error(capsys, tiny_args(euler, "euler", "--model.scheduler=pipeline"))
    assert "model.scheduler: EulerDiscreteScheduler is not supported" in message
    assert not Path("logs", "euler").exists() or not any(Path("logs", "euler").iterdir())


# -- units ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_matches_the_scheduler(scheduler_class: type, prediction_type: str) -> None:
    scheduler = scheduler_class(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps[[0, 5, -1]]:
        expected = scheduler.step(output, t, sample, generator=generator).pred_original_sample
        torch.testing.assert_close(predict_x0(scheduler, output, sample, t), expected)


def test_only_ddim_and_ddpm_are_accepted() -> None:
    check_scheduler(DDIMScheduler())
    with pytest.raises(NSTError, match="EulerDiscreteScheduler is not supported"):
        check_scheduler(EulerDiscreteScheduler())


class _Pipeline:
    """What the guidance callback needs from its pipeline: a scheduler, decoders and the step count."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.vae = AutoencoderKL(
            block_out_channels=[4, 8],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=2,
        ).requires_grad_(False)
        self.tiny_vae = None
        self.scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
        self.scheduler.set_timesteps(10)
        self.num_timesteps = 10


def test_one_guided_step_lowers_the_style_loss_of_x0() -> None:
    pipeline = _Pipeline()
    guidance = StyleGuidance(scale=0.05, guidance_size=32, layers=["relu1_1", "relu2_1"], vgg=VGGConfig(VGG))
    guidance.set_styles([load_image("skimage:immunohistochemistry", 64)])
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    t = pipeline.scheduler.timesteps[5]
    kwargs = {"latents": latents, "noise_pred": noise, "style_index": torch.tensor([0, 0])}
    with torch.no_grad():  # as in Lightning's predict loop: the callback must enable gradients itself
        out = guidance(pipeline, 5, t, kwargs)
        after = guidance.style_loss(
            decode_latents(pipeline.vae, predict_x0(pipeline.scheduler, out["noise_pred"], latents, t)),
            kwargs["style_index"],
        )
    # Measured after/before: 0.83 and 0.84 with the real weights, 0.948 and 0.952 with random ones.
    assert out["guided"] and (after < out["style_loss"]).all()
    correction = (noise - out["noise_pred"]) / 0.05
    torch.testing.assert_close(correction.square().flatten(1).mean(1).sqrt(), torch.ones(2))  # unit RMS per sample
    assert out["x0_image"].shape == (2, 3, 32, 32)
    assert not any(parameter.grad is not None for parameter in pipeline.vae.parameters())


@pytest.mark.parametrize("magnitude", [1e-20, 1e-6, 1.0, 1e20])
def test_rms_normalize_gives_unit_rms_per_sample_at_any_scale(magnitude: float) -> None:
    # The style gradient is ~1e-12 on random VGG weights; its correction must still be a unit step, not 1e-12/eps.
    gradient = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gradient = gradient * torch.tensor([magnitude, 1.0, 0.0]).view(-1, 1, 1, 1)
    out = rms_normalize(gradient)
    torch.testing.assert_close(out[:2].square().flatten(1).mean(1).sqrt(), torch.ones(2))
    exact = gradient[0].double() / gradient[0].double().square().mean().sqrt()
    torch.testing.assert_close(out[0].double(), exact, rtol=1e-5, atol=1e-6)  # the direction is kept
    assert out.dtype == gradient.dtype and not out[2].any()  # an all-zero gradient stays zero, not NaN


def test_window_and_every_k_choose_the_guided_steps() -> None:
    guidance = StyleGuidance(window=(0.2, 0.8), every_k=2, layers=["relu1_1"], vgg=VGGConfig("random"))
    assert [step for step in range(10) if guidance.is_active(step, 10)] == [2, 4, 6]
    assert not any(
        StyleGuidance(scale=0, layers=["relu1_1"], vgg=VGGConfig("random")).is_active(s, 10) for s in range(10)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": (0.5, 0.2)}, "model.guidance.window"),
        ({"every_k": 0}, "model.guidance.every_k"),
        ({"layers": ["relu9_9"]}, "model.guidance.layers: unknown VGG19 layer 'relu9_9'"),
        (
            {"guidance_size": 8, "layers": ["relu5_1"]},
            "model.guidance.guidance_size: 8 px is too small for layer relu5_1",
        ),
        ({"statistic": "median"}, "model.guidance.statistic"),
    ],
)
def test_guidance_options_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(NSTError, match=message.replace("(", r"\(").replace("[", r"\[")):
        StyleGuidance(**{"vgg": VGGConfig("random"), **kwargs})


# -- data and file names --------------------------------------------------------------------------------------------


def test_prompt_grid_expands_prompts_styles_and_seeds(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n")
    grid = PromptGrid(
        prompts=["a fox"],
        prompts_file=str(prompts),
        seeds=[3, 4],
        style=["skimage:brick", "skimage:grass"],
        style_prompts=["in brick", "in grass"],
    )
    grid.setup("predict")
    items = grid.items
    assert len(items) == 3 * 2 * 2 and [item.index for item in items] == list(range(12))
    assert [(item.base_prompt, item.style_index, item.seed) for item in items[:4]] == [
        ("a fox", 0, 3),
        ("a fox", 0, 4),
        ("a fox", 1, 3),
        ("a fox", 1, 4),
    ]
    assert items[-1].prompt == "a dog, in grass" and items[-1].style == "skimage:grass"
    assert len(grid.style_images) == 2 and grid.style_images[0].shape[:2] == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, "data.prompts: the list of prompts is empty"),
        ({"prompts": ["a"], "style": []}, "data.style: the list of style images is empty"),
        ({"prompts": ["a"], "style": ["nope.png"]}, "data.style[0]: image file not found"),
        ({"prompts": ["a"], "seeds": []}, "data.seeds: the list of seeds is empty"),
        ({"prompts": ["a"], "style": ["skimage:brick"], "style_prompts": []}, "data.style_prompts: give one entry"),
        ({"prompts_file": "missing.txt"}, "data.prompts_file: file not found"),
    ],
)
def test_prompt_grid_errors_name_the_key(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(NSTError) as error:
        PromptGrid(**kwargs).setup("predict")
    assert message in str(error.value)


def test_file_names_from_prompts_are_safe() -> None:
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("Crème brûlée / at noon") == "creme-brulee-at-noon"
    assert slugify("日本語") == "image"
    long = slugify("word " * 100)
    assert len(long) <= 40 and not long.endswith("-")
