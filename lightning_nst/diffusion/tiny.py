"""Tiny random SD 1.x, SDXL, SD3 and Flux pipelines, built offline from configs as diffusers' own tests build them.

For trying ``generate`` and the diffusion reports without a download (their images are noise: random weights), and
for the tests. ``python -m lightning_nst.diffusion.tiny [--family sd|sdxl|sd3|flux] DIR`` saves one with
``save_pretrained``;
``--tiny-vae DIR`` also saves the matching ``AutoencoderTiny``. The CLIP tokenizer is a byte-level vocabulary without
merges unless ``--tokenizer`` names a tokenizer folder (e.g. ``openai/clip-vit-large-patch14``'s files); the T5 one
is a Unigram vocabulary over the printable ASCII characters. Every build is seeded: two builds with the same
tokenizer are byte-identical, and the global random state is left as it was.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

FAMILIES = ("sd", "sdxl", "sd3", "flux")
"""The families a tiny pipeline is built for: SD 1.x (DDIM), SDXL (Euler), SD3 and Flux-dev (flow matching)."""
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
}
"""Each family's diffusers pipeline class."""
LATENT_CHANNELS = {"sd": 4, "sdxl": 4, "sd3": 16, "flux": 16}
"""The latent channels of each family's VAE, which the matching ``AutoencoderTiny`` shares (taesd and taesdxl: 4,
taesd3 and taef1: 16)."""


TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
"""A CLIP tokenizer folder holds one of these (a slow tokenizer's vocabulary, or a fast one's whole)."""


def tiny_tokenizer(directory: Path, vocabulary: Path | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer: the one saved in the folder ``vocabulary``, else a byte-level one without merges.

    The byte-level one is written to ``directory`` and loaded back from it; with ``vocabulary`` nothing is written.
    """
    if vocabulary is not None:
        return CLIPTokenizer.from_pretrained(vocabulary)
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
    """Leave torch's global RNG as it was: building seeds it, and a caller's own draws must not depend on a build."""
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


def _sd(tokenizer: CLIPTokenizer, scratch: Path, prediction_type: str) -> StableDiffusionPipeline:
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


def _sdxl(tokenizer: CLIPTokenizer, scratch: Path, prediction_type: str) -> StableDiffusionXLPipeline:
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


def _sd3(tokenizer: CLIPTokenizer, scratch: Path, prediction_type: str) -> StableDiffusion3Pipeline:
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
    t5_tokenizer = tiny_t5_tokenizer(scratch / "t5-tokenizer")
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


def _flux(tokenizer: CLIPTokenizer, scratch: Path, prediction_type: str) -> FluxPipeline:
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
    t5_tokenizer = tiny_t5_tokenizer(scratch / "t5-tokenizer")
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


_BUILDERS: dict[str, Callable[[CLIPTokenizer, Path, str], DiffusionPipeline]] = {
    "sd": _sd,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
}


def build_tiny_pipeline(
    path: Path, prediction_type: str = "epsilon", family: str = "sd", tokenizer: Path | None = None
) -> Path:
    """Save a 64 px pipeline of ``family`` with random weights (VAE factor 2, 32×32 latents) to ``path``.

    Args:
        path: The folder to save to (``save_pretrained``); nothing is written anywhere else.
        prediction_type: The UNet families' (``sd``, ``sdxl``) scheduler target; the flow-matching ones take only
            the default.
        family: One of :data:`FAMILIES`: SD 1.x (DDIM), SDXL (Euler), SD3 or Flux-dev (flow matching). Every build
            is seeded, so two builds with the same tokenizer hold identical weights.
        tokenizer: A CLIP tokenizer folder whose vocabulary the text encoders get; ``None``: a byte-level one.

    Returns:
        ``path``.

    Raises:
        ValueError: For an unknown family, or a prediction type a flow-matching family does not take, before
            anything is written.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} is none of {', '.join(FAMILIES)}")
    if family in ("sd3", "flux") and prediction_type != "epsilon":
        raise ValueError(f"prediction_type: {family} is a flow-matching model; {prediction_type!r} does not apply")
    with _restored_rng(), tempfile.TemporaryDirectory(prefix="lightning-nst-tiny-") as scratch:
        clip = tiny_tokenizer(Path(scratch) / "tokenizer", tokenizer)
        _BUILDERS[family](clip, Path(scratch), prediction_type).save_pretrained(path, safe_serialization=True)
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


def main(args: Sequence[str] | None = None) -> None:
    """``python -m lightning_nst.diffusion.tiny [--family F] [--tiny-vae DIR] [--tokenizer DIR] FOLDER``: save it."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_nst.diffusion.tiny",
        description="Save a tiny diffusers pipeline with random weights, built offline (its images are noise): for "
        "trying `lightning-nst generate --model FOLDER` and the diffusion reports without a download.",
    )
    parser.add_argument("folder", type=Path, help="where to save the pipeline (must not exist yet)")
    parser.add_argument("--family", choices=FAMILIES, default="sd", help="the pipeline's family (default: sd)")
    parser.add_argument(
        "--tiny-vae", type=Path, metavar="FOLDER", help="also save the matching AutoencoderTiny there (must not exist)"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        metavar="FOLDER",
        help="a CLIP tokenizer folder (vocab.json, merges.txt) to use instead of the byte-level vocabulary",
    )
    parsed = parser.parse_args(args)
    for folder in (parsed.folder, parsed.tiny_vae):
        if folder is not None and folder.exists():
            parser.error(f"{folder} exists")
    if parsed.tokenizer is not None and not any((parsed.tokenizer / name).is_file() for name in TOKENIZER_FILES):
        parser.error(f"--tokenizer: {parsed.tokenizer} holds no {' or '.join(TOKENIZER_FILES)} (a tokenizer folder)")
    print(build_tiny_pipeline(parsed.folder, family=parsed.family, tokenizer=parsed.tokenizer))
    if parsed.tiny_vae is not None:
        print(build_tiny_autoencoder(parsed.tiny_vae, LATENT_CHANNELS[parsed.family]))


if __name__ == "__main__":
    main()
