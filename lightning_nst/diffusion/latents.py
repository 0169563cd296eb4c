"""Model latents and the VAE: the scaling between them, decoding to images and encoding init images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from lightning_nst.diffusion.families import Family


def _latents_mean_std(config: Any, like: Tensor) -> tuple[Tensor, Tensor] | None:
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return tuple(torch.tensor(v, device=like.device, dtype=like.dtype).view(shape) for v in (mean, std))  # type: ignore[return-value]


def vae_input(decoder: nn.Module, latents: Tensor) -> Tensor:
    """Model latents as the decoder takes them, with the decoder's own config, by the pipelines' formulas.

    ``latents · std / scaling_factor + mean`` where the config has ``latents_mean`` and ``latents_std`` (SDXL
    pipelines), else ``latents / scaling_factor + shift_factor`` (SD3, Flux; no shift for SD and ``AutoencoderTiny``).
    """
    config = decoder.config
    statistics = _latents_mean_std(config, latents)
    if statistics is not None:
        mean, std = statistics
        return latents * std / config.scaling_factor + mean
    shift = getattr(config, "shift_factor", None)
    return latents / config.scaling_factor + shift if shift else latents / config.scaling_factor


def model_latents(encoder: nn.Module, encoded: Tensor) -> Tensor:
    """The inverse of :func:`vae_input`: latents the VAE encoded (a sample of ``encode``'s) as the model's."""
    config = encoder.config
    statistics = _latents_mean_std(config, encoded)
    if statistics is not None:
        mean, std = statistics
        return (encoded - mean) * config.scaling_factor / std
    shift = getattr(config, "shift_factor", None)
    return (encoded - shift) * config.scaling_factor if shift else config.scaling_factor * encoded


def decode_latents(decoder: nn.Module, latents: Tensor) -> Tensor:
    """Decode ``(B, C, h, w)`` model latents to images in ``[0, 1]`` as the pipelines do.

    Works for ``AutoencoderKL`` and ``AutoencoderTiny`` of every family: :func:`vae_input`, ``decode``, then the image
    processor's denormalisation.
    """
    latents = vae_input(decoder, latents.to(decoder.dtype))
    return VaeImageProcessor.denormalize(decoder.decode(latents, return_dict=False)[0])


def _encode_pixels(vae: nn.Module, pixels: Tensor, generators: list[torch.Generator]) -> Tensor:
    """Model latents of preprocessed images ``(B, 3, H, W)`` in ``[-1, 1]``, as img2img pipelines' ``prepare_latents``.

    Each item's latents are a sample of the VAE's latent distribution, drawn with the item's own generator.
    """
    pixels = pixels.to(dtype=vae.dtype)
    encoded = [retrieve_latents(vae.encode(pixels[i : i + 1]), generator=generators[i]) for i in range(len(pixels))]
    return model_latents(vae, torch.cat(encoded))


def img2img_latents(
    family: Family,
    vae: nn.Module,
    images: Sequence[Tensor],
    size: tuple[int, int],
    steps: int,
    strength: float,
    generators: list[torch.Generator],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The latents and timesteps of the img2img pipeline's ``get_timesteps`` and ``prepare_latents``, one per image.

    The images ``(1, 3, H, W)``, resized to ``size``, are encoded by the VAE (a sample of its latent distribution,
    drawn with the item's generator), scaled, and noised to the first timestep the ``strength`` leaves, by
    ``add_noise`` (``scale_noise`` for flow matching). Where no timestep is left (``int(steps * strength) == 0``,
    which diffusers does not allow) the clean latents are returned, so the output is the image's VAE round trip.
    """
    # get_timesteps: the last steps the strength leaves (times the solver's order) are run.
    scheduler = family.pipe.scheduler
    t_start = family.img2img_start(steps, strength)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)

    # prepare_latents with an image, one generator per item; resized on the CPU, where the images were loaded
    height, width = size
    resized = torch.cat([TF.resize(image.cpu(), [height, width], antialias=True).clamp(0, 1) for image in images])
    pixels = family.pipe.image_processor.preprocess(resized, height=height, width=width)
    init_latents = _encode_pixels(vae, pixels.to(device=device), generators).to(dtype)
    if len(timesteps) == 0:
        return family.packed(init_latents), timesteps
    noise = randn_tensor(init_latents.shape, generator=generators, device=device, dtype=dtype)
    noisy = family.add_noise(scheduler, init_latents, noise, timesteps[:1].repeat(len(images)))
    return family.packed(noisy), timesteps
