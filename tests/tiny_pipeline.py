"""Tiny SD 1.x, SDXL, SD3 and Flux pipelines built offline from configs, as diffusers' ``get_dummy_components()``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

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


# The same prompt and seed without guidance, with scale 0 (measured, not guided) and guided: a guided run's baselines.
GUIDANCE_VARIANTS = {
    "plain": "--model.guidance=null",
    "scale0": "--model.guidance.init_args.scale=0",
    "guided": "--model.guidance.init_args.scale=0.3",
}


class BatchBound(NamedTuple):
    """How far a batched item's 8-bit image may be from the same item generated alone.

    At most ``levels`` of 255 in any value, in at most ``share`` of the values, by ``mean`` levels on average.
    """

    levels: int
    share: float
    mean: float


# The README's per-family bounds ("Batch generation"), tested at 64 px, 6 steps, guidance scale 0.3, 4 seeds, batch 4
# against 1, each family's shipped config and sampler (test_item_independence.py). Measured with real VGG weights and
# CLIP vocabulary / random ones, the worst of the 4 items (levels, share, mean): unguided every family 1, 0.02 %, 0.00
# (bound 50x the share). Guided, each step's rounding is fed back through the style gradient: SD 2, 9.7 %, 0.10 /
# 1, 0.2 %, 0.00; SDXL 4, 23 %, 0.24 / 1, 0.4 %, 0.00; Flux 12, 56 %, 0.98 / 19, 8.8 %, 0.10; SD3 64, 65 %, 1.98 /
# 65, 38 %, 0.78 (bounds about twice each, so that other CPUs' rounding has room).
BATCH_BOUNDS: dict[str, dict[str, BatchBound]] = {
    family: {"plain": BatchBound(1, 0.01, 0.01), "guided": guided}
    for family, guided in {
        "sd": BatchBound(4, 0.2, 0.25),
        "sdxl": BatchBound(8, 0.45, 0.5),
        "sd3": BatchBound(128, 0.9, 4.0),
        "flux": BatchBound(40, 0.8, 2.0),
    }.items()
}


def within(difference: np.ndarray, bound: BatchBound) -> bool:
    """Whether the absolute differences of two 8-bit images (as ints) stay within ``bound``."""
    return bool(difference.max() <= bound.levels and (difference > 0).mean() <= bound.share) and (
        difference.mean() <= bound.mean
    )


def run_ddp(args: list[str], name: str) -> Path:
    """Run ``args`` (``predict`` arguments logging under ``name``) on two CPU processes with DDP; the run folder."""
    command = [sys.executable, "-m", "lightning_nst", *args, "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = Path("logs", name).glob("version_*")
    return run


def records(folder: Path, manifest: str = "predictions.jsonl") -> list[dict[str, Any]]:
    """The manifest's JSON lines."""
    return [json.loads(line) for line in (folder / manifest).read_text(encoding="utf-8").splitlines()]


FAMILIES = ("sd", "sdxl", "sd3", "flux")
# Each family's pipeline class and the latent channels of its VAE, which the matching AutoencoderTiny shares
# (taesd / taesdxl: 4, taesd3 / taef1: 16).
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
}
LATENT_CHANNELS = {"sd": 4, "sdxl": 4, "sd3": 16, "flux": 16}


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


def tiny_t5_tokenizer(directory: Path) -> T5TokenizerFast:
    """A T5 Unigram tokenizer over the printable ASCII characters, saved to ``directory`` and loaded back.

    Built offline: transformers' ``T5TokenizerFast`` (the ``tokenizers`` Unigram model, no sentencepiece) takes the
    pieces and scores directly. Ids as T5's: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; no ``<extra_id_*>`` sentinels.
    """
    characters = [chr(code) for code in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + character, -3.0) for character in characters] + [(character, -4.0) for character in characters]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=77)
    tokenizer.save_pretrained(directory)
    return T5TokenizerFast.from_pretrained(directory)


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


def sdxl_scheduler(prediction_type: str = "epsilon") -> EulerDiscreteScheduler:
    """An Euler scheduler with SDXL base 1.0's settings."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
        prediction_type=prediction_type,
    )


@contextmanager
def _restored_rng() -> Iterator[None]:
    """Leave torch's global RNG as it was: building seeds it, and the tests' own draws must not depend on a build."""
    generator_state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(generator_state)


def _clip_text_encoder(tokenizer: CLIPTokenizer, projection_dim: int | None = None) -> CLIPTextModel:
    """A 2-layer CLIP text encoder (hidden size 32) for ``tokenizer``; with a text projection if ``projection_dim``."""
    torch.manual_seed(0)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated GELU) of width ``d_model`` for ``tokenizer``, random weights."""
    torch.manual_seed(0)
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _vae(latent_channels: int = 4, **config: Any) -> AutoencoderKL:
    """A 2-block ``AutoencoderKL`` (factor 2); ``config`` adds the family's scaling, shift and quant-conv settings."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        norm_num_groups=2,
        **config,
    )


def _sd(path: Path, prediction_type: str) -> StableDiffusionPipeline:
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
    vae = _vae()
    tokenizer = tiny_tokenizer(path.parent / f"{path.name}-tokenizer")
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=sd_scheduler(prediction_type),
        vae=vae,
        text_encoder=_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(path: Path, prediction_type: str) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    # diffusers' SDXL test UNet at our SD one's size. The added conditioning takes the six size/crop ids, each
    # embedded in 8 dimensions, and text_encoder_2's 32-dimensional pooled projection: 6 * 8 + 32 = 80.
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=2,
    )
    vae = _vae(scaling_factor=0.13025)
    tokenizer = tiny_tokenizer(path.parent / f"{path.name}-tokenizer")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_clip_text_encoder(tokenizer),
        text_encoder_2=_clip_text_encoder(tokenizer, projection_dim=32),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sdxl_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _sd3(path: Path, prediction_type: str) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    # The two CLIP encoders' 32-dimensional states are concatenated (64) and padded to T5's width, so T5 is 64 wide
    # and the transformer's joint_attention_dim 64; the pooled projections concatenate to pooled_projection_dim 64.
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=48,
    )
    vae = _vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    tokenizer = tiny_tokenizer(path.parent / f"{path.name}-tokenizer")
    t5_tokenizer = tiny_t5_tokenizer(path.parent / f"{path.name}-t5-tokenizer")
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_clip_text_encoder(tokenizer, projection_dim=32),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text_encoder(tokenizer, projection_dim=32),
        tokenizer_2=tokenizer,
        text_encoder_3=_t5_encoder(t5_tokenizer, 64),
        tokenizer_3=t5_tokenizer,
    )


def _flux(path: Path, prediction_type: str) -> FluxPipeline:
    torch.manual_seed(0)
    # Flux packs 2x2 latent patches into tokens: 16 latent channels x 4 = in_channels 64. The rotary axes split the
    # 16-dimensional heads (4 + 6 + 6); the pooled CLIP output (32) and T5's states (32) feed the projections.
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    tokenizer = tiny_tokenizer(path.parent / f"{path.name}-tokenizer")
    t5_tokenizer = tiny_t5_tokenizer(path.parent / f"{path.name}-t5-tokenizer")
    # FLUX.1-dev's scheduler: the shift grows with the image's token count between base_ and max_image_seq_len.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(t5_tokenizer, 32),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[Path, str], DiffusionPipeline]] = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}


def build_tiny_pipeline(path: Path, prediction_type: str = "epsilon", family: str = "sd") -> Path:
    """Save a 64 px pipeline of ``family`` with random weights (VAE factor 2, 32×32 latents) to ``path``.

    Args:
        path: The folder to save to (``save_pretrained``); tokenizer folders may be written next to it.
        prediction_type: The UNet families' (``sd``, ``sdxl``) scheduler target; the flow-matching ones take only
            the default.
        family: One of :data:`FAMILIES`: SD 1.x (DDIM), SDXL (Euler), SD3 or Flux-dev (flow matching). Every build
            is seeded, so two builds hold identical weights.

    Returns:
        ``path``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} is none of {', '.join(FAMILIES)}")
    if family in ("sd3", "flux") and prediction_type != "epsilon":
        raise ValueError(f"prediction_type: {family} is a flow-matching model; {prediction_type!r} does not apply")
    with _restored_rng():
        _BUILDERS[family](path, prediction_type).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_autoencoder(path: Path, latent_channels: int = 4) -> Path:
    """Save an ``AutoencoderTiny`` (factor 2) with ``latent_channels`` channels to ``path``.

    4 matches the ``sd`` and ``sdxl`` pipelines' latents (taesd, taesdxl), 16 the ``sd3`` and ``flux`` ones (taesd3,
    taef1); see :data:`LATENT_CHANNELS`.
    """
    with _restored_rng():
        torch.manual_seed(0)
        AutoencoderTiny(
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
            latent_channels=latent_channels,
        ).save_pretrained(path, safe_serialization=True)
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

    parser = argparse.ArgumentParser(description="Save a tiny random pipeline of the tests.")
    parser.add_argument("folder", type=Path, help="Where to save the pipeline (must not exist yet)")
    parser.add_argument("--family", choices=FAMILIES, default="sd", help="The pipeline's family (default: sd)")
    parser.add_argument(
        "--tiny-vae", type=Path, metavar="FOLDER", help="Also save the matching AutoencoderTiny there (must not exist)"
    )
    args = parser.parse_args()
    for folder in (args.folder, args.tiny_vae):
        if folder is not None and folder.exists():
            parser.error(f"{folder} exists")
    print(build_tiny_pipeline(args.folder, family=args.family))
    if args.tiny_vae is not None:
        print(build_tiny_autoencoder(args.tiny_vae, LATENT_CHANNELS[args.family]))
