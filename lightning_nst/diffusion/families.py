"""The model families the guided sampler runs: Stable Diffusion 1.x/2.x, SDXL, Stable Diffusion 3 and Flux.

The guided loop (:class:`~lightning_nst.GuidedDiffusion`) is the same for all of them: predict the model
output, predict the clean latents from it, decode, score, correct the output, step the scheduler. What differs is
done here, each step as the family's own diffusers pipeline does it in ``__call__``: prompt encoding and the extra
conditioning (SDXL's pooled embeddings and time ids, SD3's and Flux's pooled projections, Flux's text and image ids
and distilled guidance), the initial noise (Flux packs 2x2 latent patches into tokens), the timesteps (SD3's and
Flux's resolution-dependent shift), the denoiser call with classifier-free guidance, img2img's noising, and Flux's
packing of the latents. Their scaling around the VAE follows the VAE's own config
(:func:`~lightning_nst.diffusion.latents.vae_input`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from torch import Tensor, nn

from lightning_nst.diffusion.samplers import schedule_arguments


def size_multiple(family: str, vae_scale_factor: int, patch_size: int = 1) -> int:
    """Image sides must be multiples of this many pixels, as each pipeline's ``check_inputs`` requires.

    8 for SD and SDXL; the VAE's factor times the transformer's patch for SD3, times Flux's 2x2 packing for Flux
    (16 for the real models).
    """
    if family == "sd3":
        return vae_scale_factor * patch_size
    if family == "flux":
        return vae_scale_factor * 2
    return 8


@dataclass
class Conditioning:
    """Everything the denoiser is given besides the latents and the timestep, for one batch.

    Attributes:
        kwargs: Keyword arguments of each denoiser call (text embeddings and the family's extras), batched as the
            model input is: ``[unconditional; conditional]`` with classifier-free guidance.
        do_cfg: Whether classifier-free guidance doubles the batch.
        dtype: The dtype of the text embeddings, which the initial latents take, as in the pipelines.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    do_cfg: bool = False
    dtype: torch.dtype = torch.float32


class Family:
    """A diffusers pipeline of one family, with the steps of its ``__call__`` that the guided loop needs."""

    name = "sd"
    pipeline_class: type = StableDiffusionPipeline
    flow = False
    denoiser_name = "unet"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)

    def __init__(self, pipeline: Any) -> None:
        self.pipe = pipeline

    @property
    def denoiser(self) -> nn.Module:
        """The UNet or transformer."""
        return getattr(self.pipe, self.denoiser_name)

    def modules(self) -> dict[str, nn.Module]:
        """The pipeline's networks by attribute name (denoiser, VAE, text encoders), ``None`` ones left out."""
        names = (self.denoiser_name, "vae", *self.text_encoder_names)
        return {name: getattr(self.pipe, name) for name in names if getattr(self.pipe, name, None) is not None}

    def native_size(self) -> tuple[int, int]:
        """``(height, width)`` the model was trained at."""
        native = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        native = (native, native) if isinstance(native, int) else tuple(native)
        return native[0] * self.pipe.vae_scale_factor, native[1] * self.pipe.vae_scale_factor

    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels (:func:`size_multiple`)."""
        return size_multiple(self.name, self.pipe.vae_scale_factor, getattr(self.pipe, "patch_size", 1))

    def latent_channels(self) -> int:
        """Channels of the (unpacked) latents."""
        return self.pipe.vae.config.latent_channels

    def encode(
        self, prompts: list[str], negatives: list[str], device: torch.device, cfg_scale: float, size: tuple[int, int]
    ) -> Conditioning:
        """Encode the prompts as the pipeline does, with classifier-free guidance where ``cfg_scale > 1``."""
        unet = self.pipe.unet
        do_cfg = cfg_scale > 1 and unet.config.time_cond_proj_dim is None
        embeds, negative = self.pipe.encode_prompt(prompts, device, 1, do_cfg, negatives)
        kwargs = {
            "encoder_hidden_states": torch.cat([negative, embeds]) if do_cfg else embeds,
            **_guidance_embedding(self.pipe, cfg_scale, len(prompts), device, embeds.dtype),
        }
        return Conditioning(kwargs, do_cfg, embeds.dtype)

    def initial_noise(
        self, batch_size: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device, generators: list
    ) -> Tensor:
        """The pipeline's ``prepare_latents``: the latents sampling starts from (one generator per item)."""
        height, width = size
        return self.pipe.prepare_latents(batch_size, self.latent_channels(), height, width, dtype, device, generators)

    def timesteps(self, scheduler: Any, steps: int, device: torch.device, size: tuple[int, int]) -> Tensor:
        """Set the scheduler's timesteps for ``steps`` steps as the pipeline does; returns them."""
        return retrieve_timesteps(scheduler, steps, device)[0]

    def model_output(self, latents: Tensor, t: Tensor, condition: Conditioning, cfg_scale: float) -> Tensor:
        """The denoiser's prediction at ``latents``, combined by classifier-free guidance."""
        scheduler = self.pipe.scheduler
        model_input = torch.cat([latents] * 2) if condition.do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        output = self.pipe.unet(model_input, t, **condition.kwargs, return_dict=False)[0]
        return _cfg(output, condition.do_cfg, cfg_scale)

    def spatial(self, latents: Tensor, size: tuple[int, int]) -> Tensor:
        """The latents as ``(B, C, h, w)`` for the VAE (Flux unpacks its tokens)."""
        return latents

    def packed(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`spatial`: ``(B, C, h, w)`` latents as the denoiser takes them."""
        return latents

    def add_noise(self, scheduler: Any, clean: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Noise clean latents to timestep ``t`` (one per item), as the img2img pipeline does."""
        return scheduler.add_noise(clean, noise, t)

    def img2img_start(self, steps: int, strength: float) -> int:
        """How many of the ``steps`` the img2img pipeline skips at ``strength`` (``get_timesteps``' ``t_start``)."""
        return max(steps - min(int(steps * strength), steps), 0)


def _guidance_embedding(
    pipe: Any, cfg_scale: float, count: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """``timestep_cond`` for a UNet that embeds the guidance scale (LCM-distilled ones) instead of running CFG."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return {}
    embedding = pipe.get_guidance_scale_embedding(torch.tensor(cfg_scale - 1).repeat(count), embedding_dim=dim)
    return {"timestep_cond": embedding.to(device=device, dtype=dtype)}


def _cfg(output: Tensor, do_cfg: bool, cfg_scale: float) -> Tensor:
    if not do_cfg:
        return output
    uncond, text = output.chunk(2)
    return uncond + cfg_scale * (text - uncond)


class SDXLFamily(Family):
    """``StableDiffusionXLPipeline``: two CLIP text encoders, pooled text embeddings and size/crop time ids."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def encode(
        self, prompts: list[str], negatives: list[str], device: torch.device, cfg_scale: float, size: tuple[int, int]
    ) -> Conditioning:
        """``encode_prompt`` with both encoders, and the time ids of an uncropped image of ``size``."""
        pipe, unet = self.pipe, self.pipe.unet
        do_cfg = cfg_scale > 1 and unet.config.time_cond_proj_dim is None
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=negatives,
        )  # fmt: skip
        if pipe.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = pipe.text_encoder_2.config.projection_dim
        # original_size = target_size = the image's, no crop: the pipeline's defaults.
        time_ids = add_time_ids(pipe.unet, size, (0, 0), size, embeds.dtype, projection_dim)
        if do_cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        kwargs = {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(prompts), 1)},
            **_guidance_embedding(pipe, cfg_scale, len(prompts), device, embeds.dtype),
        }
        return Conditioning(kwargs, do_cfg, embeds.dtype)


class SD3Family(Family):
    """``StableDiffusion3Pipeline``: an MMDiT transformer predicting the flow velocity, three text encoders."""

    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    flow = True
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def latent_channels(self) -> int:  # noqa: D102
        return self.pipe.transformer.config.in_channels

    def encode(
        self, prompts: list[str], negatives: list[str], device: torch.device, cfg_scale: float, size: tuple[int, int]
    ) -> Conditioning:
        """``encode_prompt`` with the three encoders; classifier-free guidance where ``cfg_scale > 1``."""
        do_cfg = cfg_scale > 1
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negatives,
        )  # fmt: skip
        if do_cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled}, do_cfg, embeds.dtype)

    def timesteps(self, scheduler: Any, steps: int, device: torch.device, size: tuple[int, int]) -> Tensor:
        """The pipeline's: shifted by the image's token count where the scheduler shifts dynamically."""
        kwargs: dict[str, Any] = {}
        if "mu" in schedule_arguments(self.name, scheduler.config):
            patch = self.pipe.transformer.config.patch_size
            tokens = (size[0] // self.pipe.vae_scale_factor // patch) * (size[1] // self.pipe.vae_scale_factor // patch)
            kwargs["mu"] = _shift(scheduler, tokens, max_shift=1.16)
        return retrieve_timesteps(scheduler, steps, device, **kwargs)[0]

    def model_output(self, latents: Tensor, t: Tensor, condition: Conditioning, cfg_scale: float) -> Tensor:  # noqa: D102
        model_input = torch.cat([latents] * 2) if condition.do_cfg else latents
        output = self.pipe.transformer(
            hidden_states=model_input, timestep=t.expand(model_input.shape[0]), **condition.kwargs, return_dict=False
        )[0]
        return _cfg(output, condition.do_cfg, cfg_scale)

    def add_noise(self, scheduler: Any, clean: Tensor, noise: Tensor, t: Tensor) -> Tensor:  # noqa: D102
        return scheduler.scale_noise(clean, t, noise)

    def img2img_start(self, steps: int, strength: float) -> int:  # noqa: D102
        # StableDiffusion3Img2ImgPipeline.get_timesteps rounds after subtracting, unlike SD's.
        return int(max(steps - min(steps * strength, steps), 0))


class FluxFamily(SD3Family):
    """``FluxPipeline``: a transformer over packed 2x2 latent patches, CLIP + T5, distilled guidance (Flux-dev)."""

    name = "flux"
    pipeline_class = FluxPipeline
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def latent_channels(self) -> int:  # noqa: D102
        return self.pipe.transformer.config.in_channels // 4

    def encode(
        self, prompts: list[str], negatives: list[str], device: torch.device, cfg_scale: float, size: tuple[int, int]
    ) -> Conditioning:
        """``encode_prompt``; ``cfg_scale`` is Flux-dev's distilled guidance, ignored by a model without it.

        Negative prompts are not used, as in ``FluxPipeline`` without ``true_cfg_scale``.
        """
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        height, width = (2 * (side // (self.pipe.vae_scale_factor * 2)) for side in size)
        image_ids = latent_image_ids(height // 2, width // 2, device, embeds.dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full([len(prompts)], cfg_scale, device=device, dtype=torch.float32)
        kwargs = {
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled,
            "txt_ids": text_ids,
            "img_ids": image_ids,
            "guidance": guidance,
        }
        return Conditioning(kwargs, False, embeds.dtype)

    def initial_noise(
        self, batch_size: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device, generators: list
    ) -> Tensor:
        """``FluxPipeline.prepare_latents``: noise drawn ``(B, C, h, w)`` and packed into ``(B, h/2 * w/2, 4C)``."""
        latents, _ = self.pipe.prepare_latents(batch_size, self.latent_channels(), *size, dtype, device, generators)
        return latents

    def timesteps(self, scheduler: Any, steps: int, device: torch.device, size: tuple[int, int]) -> Tensor:
        """``FluxPipeline``'s: sigmas from 1 to 1/steps, shifted by the image's token count (steps ``steps``)."""
        tokens = (size[0] // self.pipe.vae_scale_factor // 2) * (size[1] // self.pipe.vae_scale_factor // 2)
        # The pipeline passes mu always; a scheduler that does not shift dynamically ignores it.
        kwargs: dict[str, Any] = {"mu": _shift(scheduler, tokens, max_shift=1.15)}
        if "sigmas" in schedule_arguments(self.name, scheduler.config):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        return retrieve_timesteps(scheduler, steps, device, **kwargs)[0]

    def model_output(self, latents: Tensor, t: Tensor, condition: Conditioning, cfg_scale: float) -> Tensor:  # noqa: D102
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        return self.pipe.transformer(hidden_states=latents, timestep=timestep, **condition.kwargs, return_dict=False)[0]

    def spatial(self, latents: Tensor, size: tuple[int, int]) -> Tensor:  # noqa: D102
        return unpack_latents(latents, size[0], size[1], self.pipe.vae_scale_factor)

    def packed(self, latents: Tensor) -> Tensor:  # noqa: D102
        batch, channels, height, width = latents.shape
        return pack_latents(latents, batch, channels, height, width)


def _shift(scheduler: Any, tokens: int, max_shift: float) -> float:
    """``calculate_shift`` with the scheduler's settings (the pipelines' defaults where it has none)."""
    config = scheduler.config
    return calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", max_shift),
    )


FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (Family, SDXLFamily, SD3Family, FluxFamily)}


# -- diffusers' private helpers, copied: the pipelines' methods of these names are not public API -------------------


def add_time_ids(
    unet: nn.Module,
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
    dtype: torch.dtype,
    projection_dim: int,
) -> Tensor:
    """SDXL's size and crop conditioning, ``(1, 6)``: ``StableDiffusionXLPipeline._get_add_time_ids``.

    Follows diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py, which also raises where the UNet
    expects an added embedding of another length.
    """
    time_ids = list(original_size + crop_top_left + target_size)
    passed = unet.config.addition_time_embed_dim * len(time_ids) + projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if expected != passed:
        raise ValueError(
            f"Model expects an added time embedding vector of length {expected}, but a vector of {passed} was "
            "created. The model has an incorrect config. Please check `unet.config.time_embedding_type` and "
            "`text_encoder_2.config.projection_dim`."
        )
    return torch.tensor([time_ids], dtype=dtype)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Position ids of ``height x width`` Flux tokens, ``(h·w, 3)``: ``FluxPipeline._prepare_latent_image_ids``.

    Follows diffusers/pipelines/flux/pipeline_flux.py: channel 1 holds the row, channel 2 the column.
    """
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def pack_latents(latents: Tensor, batch_size: int, channels: int, height: int, width: int) -> Tensor:
    """``(B, C, h, w)`` latents as Flux's tokens of 2x2 patches, ``(B, h/2 · w/2, 4C)``: ``FluxPipeline._pack_latents``.

    Follows diffusers/pipelines/flux/pipeline_flux.py.
    """
    latents = latents.view(batch_size, channels, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch_size, (height // 2) * (width // 2), channels * 4)


def unpack_latents(latents: Tensor, height: int, width: int, vae_scale_factor: int) -> Tensor:
    """The inverse of :func:`pack_latents` for an image of ``height x width`` px: ``FluxPipeline._unpack_latents``.

    Follows diffusers/pipelines/flux/pipeline_flux.py: the latent sides are the image's over the VAE's factor, rounded
    down to even, as packing needs.
    """
    batch_size, _, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch_size, channels // (2 * 2), height, width)
