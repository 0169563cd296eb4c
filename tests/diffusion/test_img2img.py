"""Guided img2img: ``data.init_images`` and ``model.strength`` on the tiny pipeline, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import load_image
from lightning_nst.diffusion.module import GuidedDiffusion
from lightning_nst.diffusion.prompts import PromptGrid
from lightning_nst.main import main
from lightning_nst.outputs import MANIFEST, read_manifest
from tests.conftest import CONFIGS, MODELS, cli_error
from tests.diffusion.test_writer import MANIFEST_KEYS
from tests.tiny_pipeline import records, tiny_args

IMG2IMG = CONFIGS / "guided_img2img.yaml"
PROMPT_ONLY = CONFIGS / "prompt_only_diffusion.yaml"
STEPS = 10
# Guided (scale 0.3) over unguided final style loss at strength 0.6 (6 of 10 steps run), for the models the tiny
# pipeline gets (conftest.MODELS). Measured: real VGG weights and CLIP vocabulary 0.179 (threshold 0.5, ~2.8x margin);
# random weights and byte vocabulary 0.653 (threshold 0.85, 30% margin).
GUIDED_RATIO = {"real": 0.5, "random": 0.85}[MODELS]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_init(path: Path, width: int = 48, height: int = 32, seed: int = 0) -> Path:
    """A smooth random RGB image (a photo stand-in) of ``width`` x ``height``."""
    coarse = np.random.default_rng(seed).random((height // 8, width // 8, 3)) * 255
    Image.fromarray(coarse.astype("uint8")).resize((width, height), Image.BILINEAR).save(path)
    return path


def img2img(pipeline: Path, out: Path, *overrides: str, config: Path = IMG2IMG) -> list[dict[str, Any]]:
    """Run ``predict`` on the img2img config into ``out`` and return the manifest's records."""
    main(
        tiny_args(
            pipeline,
            "img2img",
            f"--trainer.callbacks.init_args.output_dir={out}",
            *overrides,
            config=config,
            steps=STEPS,
        )
    )
    return records(out)


def png(folder: Path, record: dict[str, Any]) -> np.ndarray:
    with Image.open(folder / record["image"]) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def vae_round_trip(pipeline: Path, init: Path, size: tuple[int, int], seed: int) -> np.ndarray:
    """The init image through the pipeline's VAE alone, drawn as img2img draws it: decode(sample(encode(x)))."""
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None, requires_safety_checker=False)
    image = TF.resize(load_image(str(init)), list(size), antialias=True).clamp(0, 1)
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image, height=size[0], width=size[1])
        latents = pipe.vae.encode(pixels).latent_dist.sample(torch.Generator("cpu").manual_seed(seed))
        decoded = pipe.vae.decode(latents, return_dict=False)[0]  # scaling_factor in and out cancels
        decoded = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    return np.round(decoded * 255).astype(np.float64)


@pytest.mark.parametrize(("sides", "size"), [(["--model.height=null", "--model.width=null"], [32, 48]), ([], [40, 64])])
def test_the_output_size_follows_the_init_image(
    pipeline_dir: Path, tmp_path: Path, sides: list[str], size: list[int]
) -> None:
    init = write_init(tmp_path / "photo.png", 48, 32)
    (record,) = img2img(
        pipeline_dir, tmp_path / "out", f"--data.init_images=[{init}]", "--model.strength=0.5", *sides,
        "--model.guidance=null",
    )  # fmt: skip
    assert record["size"] == size  # 48x32 with a 64 px long edge: 64 x 42.7, rounded to 64 x 40
    with Image.open(tmp_path / "out" / record["image"]) as image:
        assert image.size == (size[1], size[0])
    assert record["init_image"] == str(init) and record["strength"] == 0.5
    assert record["init_image_digest"] == hashlib.sha256(init.read_bytes()).hexdigest()
    assert len(record["timesteps"]) == 5  # int(10 * 0.5) of the 10 steps
    # The img2img keys follow the text-to-image ones, and the typed record reads and writes the line as it is.
    assert list(record) == [*MANIFEST_KEYS, "init_image", "init_image_digest", "strength", "format"]
    (typed,) = read_manifest(tmp_path / "out" / MANIFEST)
    assert json.loads(typed.to_json()) == record and typed.strength == 0.5


def test_with_no_step_left_the_output_is_the_vae_round_trip(pipeline_dir: Path, tmp_path: Path) -> None:
    init = write_init(tmp_path / "photo.png", 48, 32)
    native = ["--model.height=null", "--model.width=null"]
    (none,) = img2img(pipeline_dir, tmp_path / "none", f"--data.init_images=[{init}]", "--model.strength=0.05", *native)
    assert none["timesteps"] == [] and none["size"] == [32, 48]
    reference = vae_round_trip(pipeline_dir, init, (32, 48), seed=0)
    assert np.abs(png(tmp_path / "none", none) - reference).max() <= 1  # 8-bit rounding
    # One step from strength 0.1 stays nearer the round trip than text-to-image at strength 1.
    (one,) = img2img(pipeline_dir, tmp_path / "one", f"--data.init_images=[{init}]", "--model.strength=0.1", *native)
    (full,) = img2img(pipeline_dir, tmp_path / "full", f"--data.init_images=[{init}]", "--model.strength=1", *native)
    assert len(one["timesteps"]) == 1 and len(full["timesteps"]) == STEPS
    near, far = psnr(png(tmp_path / "one", one), reference), psnr(png(tmp_path / "full", full), reference)
    print(f"PSNR to the VAE round trip: strength 0.1 {near:.1f} dB, strength 1.0 {far:.1f} dB")
    assert near > far + 3


def test_strength_one_is_text_to_image(pipeline_dir: Path, tmp_path: Path) -> None:
    init = write_init(tmp_path / "photo.png", 64, 64)
    (img,) = img2img(pipeline_dir, tmp_path / "img", f"--data.init_images=[{init}]", "--model.strength=1")
    main(tiny_args(pipeline_dir, "txt", f"--trainer.callbacks.init_args.output_dir={tmp_path / 'txt'}", steps=STEPS))
    (txt,) = records(tmp_path / "txt")
    assert img["sha256"] == txt["sha256"] and img["final_style_loss"] == txt["final_style_loss"]
    assert "init_image" not in txt and img["init_image"] == str(init)
    assert img["fingerprint"] != txt["fingerprint"]


def test_guidance_lowers_the_style_loss_at_the_same_strength(pipeline_dir: Path, tmp_path: Path) -> None:
    init = write_init(tmp_path / "photo.png", 48, 32)
    common = [f"--data.init_images=[{init}]", "--model.strength=0.6", "--model.height=64", "--model.width=64"]
    (guided,) = img2img(pipeline_dir, tmp_path / "guided", *common, "--model.guidance.init_args.scale=0.3")
    (unguided,) = img2img(pipeline_dir, tmp_path / "unguided", *common, "--model.guidance.init_args.scale=0")
    ratio = guided["final_style_loss"] / unguided["final_style_loss"]
    print(f"guided / unguided final style loss at strength 0.6 ({MODELS} models): {ratio:.3f}")
    assert ratio < GUIDED_RATIO
    assert guided["timesteps"] == unguided["timesteps"] and len(guided["timesteps"]) == 6


def test_the_prompt_only_baseline_takes_init_images(pipeline_dir: Path, tmp_path: Path) -> None:
    init = write_init(tmp_path / "photo.png", 48, 32)
    (record,) = img2img(
        pipeline_dir, tmp_path / "words", f"--data.init_images=[{init}]", "--model.strength=0.6", config=PROMPT_ONLY
    )
    assert record["prompt"].startswith("a red house by a lake, in the style of") and record["strength"] == 0.6
    assert record["size"] == [40, 64] and record["guided"] == [False] * 6


def test_one_init_image_for_all_prompts_or_one_per_prompt(tmp_path: Path) -> None:
    a, b = write_init(tmp_path / "a.png"), write_init(tmp_path / "b.png", seed=1)
    grid = PromptGrid(prompts=["x", "y"], seeds=[0, 1], style=["sample:gravel"], init_images=[str(a), str(b)])
    assert [item.init_image for item in grid.expand()] == [str(a), str(a), str(b), str(b)]
    grid = PromptGrid(prompts=["x", "y"], seeds=[0, 1], init_images=str(a))
    assert {item.init_image for item in grid.expand()} == {str(a)}
    with pytest.raises(NSTError, match=r"^data.init_images: give one image for all prompts or one per prompt \(2\)"):
        PromptGrid(prompts=["x", "y"], init_images=[str(a), str(b), str(a)])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--data.init_images=[missing.png]"], "data.init_images[0]: image file not found: missing.png"),
        (["--model.strength=0"], "model.strength: must be in (0, 1] (1 is text-to-image), got 0.0"),
        (["--model.strength=1.5"], "model.strength: must be in (0, 1] (1 is text-to-image), got 1.5"),
        # The CLI's parser refuses nan for a float itself; the Python API reaches the module's check (below).
        (["--model.strength=nan"], "model.strength: expected float (see `lightning-nst predict --help`)"),
        (
            ["--data.prompts=[a, b, c]", "--data.init_images=[photo.png, photo.png]"],
            "data.init_images: give one image for all prompts or one per prompt (3), got 2",
        ),
        (
            ["--data.init_images=null", "--model.strength=0.5"],
            "model.strength: 0.5 needs data.init_images (img2img); 1.0 is text-to-image",
        ),
        (
            ["--data.prompts=[a, b]", "--data.init_images=[photo.png, wide.png]", "--data.batch_size=2"],
            "data.batch_size: init images of different sizes (64x32, 64x40) cannot share a batch; "
            "set data.batch_size: 1",
        ),
    ],
)
def test_bad_img2img_input_is_one_line_naming_the_key(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    write_init(tmp_path / "photo.png", 48, 32)
    write_init(tmp_path / "wide.png", 64, 32)
    args = tiny_args(
        pipeline_dir, "bad", "--data.init_images=[photo.png]", "--model.strength=0.5",
        f"--trainer.callbacks.init_args.output_dir={tmp_path / 'out'}", *overrides, config=IMG2IMG,
    )  # fmt: skip
    assert cli_error(capfd, args) == f"lightning-nst: error: {message}"
    assert not (tmp_path / "out").exists()
    # The batch-size check needs the loaded images and runs in setup, after the logger made its (empty) folder.
    assert not any(path.is_file() for path in (tmp_path / "logs").rglob("*"))
    assert "batch_size" in message or not (tmp_path / "logs").exists()


@pytest.mark.parametrize("strength", [0.0, 1.5, math.nan, -0.1])
def test_the_module_refuses_a_strength_outside_zero_to_one(strength: float) -> None:
    with pytest.raises(NSTError, match=r"^model.strength: must be in \(0, 1\]"):
        GuidedDiffusion("some/model", None, strength=strength)


def test_a_rerun_skips_finished_items_and_a_changed_init_image_is_refused(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    init = write_init(tmp_path / "photo.png", 48, 32)
    out = tmp_path / "out"
    args = [f"--data.init_images=[{init}]", "--model.strength=0.3", "--data.seeds=[0, 1]", "--model.guidance=null"]
    first = img2img(pipeline_dir, out, *args)
    stamps = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    assert img2img(pipeline_dir, out, *args) == first  # nothing generated again: the same records and files
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")} == stamps
    base = tiny_args(pipeline_dir, "img2img", f"--trainer.callbacks.init_args.output_dir={out}", config=IMG2IMG,
                     steps=STEPS)  # fmt: skip
    refused = "made from a different prompt, seed, style or sampler setting than now"
    assert refused in cli_error(capfd, [*base, *args, "--model.strength=0.4"])
    write_init(init, 48, 32, seed=5)  # the same file, edited in place
    assert refused in cli_error(capfd, [*base, *args])
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")} == stamps
    assert (
        json.loads((out / "predictions.jsonl").read_text().splitlines()[0])["init_image_digest"]
        == first[0]["init_image_digest"]
    )


def test_generate_takes_an_init_image_and_a_strength(
    pipeline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = write_init(tmp_path / "photo.png", 48, 32)
    style = write_init(tmp_path / "painting.png", 32, 32, seed=3)
    args = ["generate", "a red house", "--style", str(style), "-o", "gen", "--model", str(pipeline_dir)]
    toy = ["--size", "64", "--steps", "4", "--weights", "random", "--init-image", str(init), "--strength", "0.5"]
    main([*args, *toy, "--print-config"])
    config = capsys.readouterr().out
    assert "strength: 0.5" in config and f"- {init}" in config and not (tmp_path / "gen").exists()
    main([*args, *toy])
    (record,) = records(tmp_path / "gen")
    assert record["init_image"] == str(init) and record["strength"] == 0.5 and record["size"] == [40, 64]
    assert len(record["timesteps"]) == 2
    assert "--strength: needs --init-image" in cli_error(capsys, [*args, "--strength", "0.5"])


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m", "heun", "unipc"])
def test_img2img_is_guided_on_every_sampler_family(pipeline_dir: Path, tmp_path: Path, scheduler: str) -> None:
    # sigma-space (euler_a), multistep VP (dpmpp_2m, unipc) and second-order (heun) samplers start mid-schedule
    # through set_begin_index and add_noise; each must stay finite and let guidance lower the style loss.
    init = write_init(tmp_path / "photo.png", 48, 32)
    common = [f"--data.init_images=[{init}]", "--model.strength=0.6", f"--model.scheduler={scheduler}"]
    (guided,) = img2img(pipeline_dir, tmp_path / "guided", *common, "--model.guidance.init_args.scale=0.3")
    (unguided,) = img2img(pipeline_dir, tmp_path / "unguided", *common, "--model.guidance.init_args.scale=0")
    assert guided["final_style_loss"] < unguided["final_style_loss"]
    assert np.isfinite(png(tmp_path / "guided", guided)).all() and guided["size"] == [40, 64]


def test_prompt_card_names_the_init_image() -> None:
    from lightning_nst.diffusion.trajectory import _item_text

    batch = {"prompt": ["a", "b"], "seed": [0, 1], "style": [None, None], "init_image": ["photo.jpg", "other.png"]}
    text = _item_text(batch, 1, L.LightningModule())
    assert "- init_image: `other.png`" in text and "style" not in text
    assert "init_image" not in _item_text({**batch, "init_image": [None, None]}, 0, L.LightningModule())
