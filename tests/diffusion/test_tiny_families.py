"""The tiny SDXL, SD3 and Flux pipelines of tests/tiny_pipeline.py: saved offline, loaded back, and runnable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, FluxPipeline

from tests.conftest import REPO
from tests.tiny_pipeline import (
    LATENT_CHANNELS,
    PIPELINE_CLASSES,
    build_tiny_autoencoder,
    build_tiny_pipeline,
    tiny_t5_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ("sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def tiny_vae4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_autoencoder(tmp_path_factory.mktemp("pipelines") / "tiny-taesd")


def load(request: pytest.FixtureRequest, family: str) -> DiffusionPipeline:
    return DiffusionPipeline.from_pretrained(request.getfixturevalue(f"{family}_dir"))


def text_encoders(pipeline: DiffusionPipeline) -> list[tuple[torch.nn.Module, object]]:
    """Each (text encoder, its tokenizer) pair of the pipeline."""
    return [
        (getattr(pipeline, f"text_encoder{suffix}"), getattr(pipeline, f"tokenizer{suffix}"))
        for suffix in ("", "_2", "_3")
        if getattr(pipeline, f"text_encoder{suffix}", None) is not None
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_family_loads_back_as_its_pipeline_class(request: pytest.FixtureRequest, family: str) -> None:
    folder = request.getfixturevalue(f"{family}_dir")
    expected = PIPELINE_CLASSES[family]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == expected.__name__
    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert type(pipeline) is expected
    assert pipeline.vae.config.latent_channels == LATENT_CHANNELS[family]
    pairs = text_encoders(pipeline)
    assert len(pairs) == {"sdxl": 2, "sd3": 3, "flux": 2}[family]
    for encoder, tokenizer in pairs:
        assert encoder.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_pipeline_generates_a_finite_64px_image(request: pytest.FixtureRequest, family: str) -> None:
    pipeline = load(request, family)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a red house by a lake",
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()
    assert image.std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_matching_tiny_autoencoder_decodes_the_family_latents(request: pytest.FixtureRequest, family: str) -> None:
    pipeline = load(request, family)
    pipeline.set_progress_bar_config(disable=True)
    latents = pipeline("a red house", height=64, width=64, num_inference_steps=2, output_type="latent").images
    if isinstance(pipeline, FluxPipeline):  # Flux returns its 2x2-packed token sequence
        latents = FluxPipeline._unpack_latents(latents, 64, 64, pipeline.vae_scale_factor)
    assert latents.shape == (1, LATENT_CHANNELS[family], 32, 32)
    vae_dir = request.getfixturevalue("tiny_vae16_dir" if LATENT_CHANNELS[family] == 16 else "tiny_vae4_dir")
    with torch.no_grad():
        image = AutoencoderTiny.from_pretrained(vae_dir).decode(latents).sample
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


def test_two_builds_are_byte_identical_and_leave_the_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_pipeline(tmp_path / "a" / "tiny-sd3", family="sd3")
    assert torch.equal(torch.rand(3), expected_draw)
    second = build_tiny_pipeline(tmp_path / "b" / "tiny-sd3", family="sd3")
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert len([path for path in files if path.suffix == ".safetensors"]) == 5
    assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_t5_tokenizer_is_built_offline_with_t5_ids(tmp_path: Path) -> None:
    tokenizer = tiny_t5_tokenizer(tmp_path / "t5")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red house").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red house"


def test_unknown_family_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family: 'sd4'"):
        build_tiny_pipeline(tmp_path / "tiny", family="sd4")
    assert not any(tmp_path.iterdir())


def test_script_saves_a_family_and_its_tiny_vae(tmp_path: Path) -> None:
    pipeline, vae = tmp_path / "tiny-flux", tmp_path / "taef1"
    script = REPO / "tests" / "tiny_pipeline.py"
    command = [sys.executable, str(script), "--family", "flux", str(pipeline), "--tiny-vae", str(vae)]
    subprocess.run(
        command, check=True, capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120
    )
    assert json.loads((pipeline / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert json.loads((vae / "config.json").read_text())["latent_channels"] == 16
