"""A tiny Stable Diffusion pipeline built from configs, as diffusers' own ``get_dummy_components()`` does."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightning_nst.diffusion import DenoisingCallback

try:
    from tests.conftest import CLIP_TOKENIZER, PARTIAL_WEIGHTS, REAL_MODELS, REPO
except ModuleNotFoundError:  # run as a script, `python tests/tiny_pipeline.py FOLDER`: tests/ is on sys.path
    from conftest import CLIP_TOKENIZER, PARTIAL_WEIGHTS, REAL_MODELS, REPO  # type: ignore[no-redef]

GUIDED = REPO / "configs" / "guided_diffusion.yaml"
# The real ImageNet weights (up to relu3_1) and CLIP vocabulary where ../shared holds both (conftest.REAL_MODELS);
# seeded random weights and a byte-level vocabulary elsewhere.
VGG = str(PARTIAL_WEIGHTS) if REAL_MODELS else "random"
LAYERS = "[relu1_1, relu2_1, relu3_1]"
STEPS = 6


def tiny_args(
    pipeline: Path, name: str, *overrides: str, config: Path = GUIDED, size: int = 64, steps: int = STEPS
) -> list[str]:
    """``lightning-nst predict`` on a shipped config, shrunk to the tiny pipeline: 64 px, 6 steps, one item.

    Overrides come last, so they win over these settings (e.g. ``--data.seeds=[0, 1, 2]``).
    """
    return [
        "predict",
        "--config",
        str(config),
        "--model.model",
        str(pipeline),
        f"--model.height={size}",
        f"--model.width={size}",
        f"--model.num_inference_steps={steps}",
        f"--model.guidance.init_args.vgg.weights={VGG}",
        f"--model.guidance.init_args.layers={LAYERS}",
        f"--model.guidance.init_args.guidance_size={size}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--data.prompts=[a red house by a lake]",
        "--data.seeds=[0]",
        *overrides,
    ]


def batch_args(pipeline: Path, out: Path | None, seeds: int, *overrides: str) -> list[str]:
    """A fast batch of ``seeds`` items (2 steps, no guidance) into the fixed folder ``out``, or the log folder."""
    return tiny_args(
        pipeline,
        "batch",
        *([f"--trainer.callbacks.init_args.output_dir={out}"] if out is not None else []),
        f"--data.seeds=[{', '.join(str(seed) for seed in range(seeds))}]",
        "--model.num_inference_steps=2",
        "--model.guidance=null",
        *overrides,
    )


def records(folder: Path, manifest: str = "predictions.jsonl") -> list[dict[str, Any]]:
    """The manifest's JSON lines."""
    return [json.loads(line) for line in (folder / manifest).read_text(encoding="utf-8").splitlines()]


def tiny_tokenizer(directory: Path) -> CLIPTokenizer:
    """The real CLIP BPE vocabulary where ``REAL_MODELS``, else a byte-level one without merges."""
    if REAL_MODELS:
        return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(directory)


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """A DDIM scheduler with Stable Diffusion 1.x's settings, as the tiny pipeline saves it."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(path: Path, prediction_type: str = "epsilon") -> Path:
    """Save a 64 px Stable Diffusion pipeline with random weights (VAE factor 2, 32×32 latents) to ``path``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    scheduler = sd_scheduler(prediction_type)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    tokenizer = tiny_tokenizer(path.parent / f"{path.name}-tokenizer")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
        )
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    torch.random.set_rng_state(generator_state)
    return path


def build_tiny_autoencoder(path: Path) -> Path:
    """Save an ``AutoencoderTiny`` matching the tiny pipeline's latents (4 channels, factor 2) to ``path``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).save_pretrained(path, safe_serialization=True)
    torch.random.set_rng_state(generator_state)
    return path


class SignalAtDenoisingStep(DenoisingCallback):
    """Send SIGTERM to this process at denoising step ``step`` of the ``item``-th batch (counted from 0)."""

    def __init__(self, item: int, step: int) -> None:
        self.item = item
        self.step = step
        self.batches = 0

    def on_predict_batch_end(self, *args: Any) -> None:  # noqa: D102
        self.batches += 1

    def on_denoising_step(self, trainer: Any, pl_module: Any, step_index: int, *args: Any) -> None:  # noqa: D102
        if self.batches == self.item and step_index == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save the tiny random Stable Diffusion pipeline of the tests.")
    parser.add_argument("folder", type=Path, help="Where to save the pipeline (must not exist yet)")
    folder = parser.parse_args().folder
    if folder.exists():
        parser.error(f"{folder} exists")
    print(build_tiny_pipeline(folder))
