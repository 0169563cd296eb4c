"""Style-guided Stable Diffusion sampling as a LightningModule whose ``predict_step`` generates a batch."""

from __future__ import annotations

import functools
import inspect
import math
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_nst.core.errors import NSTError
from lightning_nst.diffusion.catalog import DEFAULT_MODEL, local_family
from lightning_nst.diffusion.families import FAMILIES, Family
from lightning_nst.diffusion.guidance import Sampling, StyleGuidance, guidance_line
from lightning_nst.diffusion.latents import img2img_latents, vae_input
from lightning_nst.diffusion.loading import (
    check_model_folder,
    check_size,
    load_pipeline,
    load_tiny_vae,
    model_family,
)
from lightning_nst.diffusion.loop import DenoisingLoop, Failure, note
from lightning_nst.diffusion.prompts import DataSummary, PromptGrid
from lightning_nst.diffusion.samplers import sampler

DType = Literal["auto", "float32", "float16", "bfloat16"]

MAX_SIDE = 8192
"""Largest ``model.height`` and ``model.width``: 16 times Stable Diffusion 1.x's native 512 px."""


class DenoisingCallback(Callback):
    """A Lightning callback that also sees every sampling step of :class:`~lightning_nst.GuidedDiffusion`.

    Add subclasses to ``trainer.callbacks`` in YAML like any other callback.
    """

    def on_denoising_step(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        step_index: int,
        timestep: int,
        callback_kwargs: dict[str, Any],
    ) -> dict[str, Any] | None:
        """Called after each scheduler step, with diffusers' ``callback_on_step_end`` contract.

        Args:
            trainer: The trainer.
            pl_module: The sampling module.
            step_index: Index of the step, from 0.
            timestep: The scheduler's timestep of the step.
            callback_kwargs: ``latents`` (after the step; Flux's are packed ``(B, tokens, 4C)``, which
                ``pl_module.spatial_latents`` unpacks), ``noise_pred`` (the model's prediction as the scheduler used
                it: noise, or the flow velocity for SD3 and Flux), ``index``
                (item numbers) and ``style_index``; with style guidance also ``style_loss`` ``(B,)``, ``x0_image``
                (the decoded clean prediction the loss was measured on) and ``guided``.

        Returns:
            ``None``, or a dict whose ``latents`` replace the sampler's.
        """
        return None


def _step_end(
    module: L.LightningModule, i: int, t: Tensor, kwargs: dict[str, Any], failures: list[Failure | None]
) -> Tensor:
    """The trainer's :class:`DenoisingCallback` hooks after step ``i``, with diffusers' contract.

    They may replace the latents; a replacement that is not finite fails its item, naming ``trainer.callbacks``.
    """
    trainer = module._trainer  # not .trainer, which raises for a module used without one
    latents = kwargs["latents"]
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, DenoisingCallback):
            outputs = callback.on_denoising_step(trainer, module, i, int(t), kwargs) or {}
            latents = outputs.pop("latents", latents)
            kwargs["latents"] = latents
            note(failures, latents, "trainer.callbacks", f"step {i}: the latents {type(callback).__name__} returned")
    return latents


def _check_options(
    num_inference_steps: int, cfg_scale: float, eta: float, height: int | None, width: int | None, strength: float
) -> None:
    """Raise, naming the key, for an option out of its range (dtype and decoder are Literals the CLI enforces)."""
    if num_inference_steps < 1:
        raise NSTError(f"model.num_inference_steps: must be >= 1, got {num_inference_steps}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise NSTError(f"model.cfg_scale: must be a finite number >= 0 (<= 1 turns it off), got {cfg_scale!r}")
    if not 0.0 <= eta <= 1.0:  # also refuses NaN
        raise NSTError(f"model.eta: must be in [0, 1] (0 is deterministic DDIM, 1 adds full noise), got {eta!r}")
    for key, value in (("model.height", height), ("model.width", width)):
        if value is not None and (value < 8 or value % 8 or value > MAX_SIDE):
            raise NSTError(f"{key}: must be a multiple of 8 pixels from 8 to {MAX_SIDE}, got {value}")
    if not 0.0 < strength <= 1.0:  # also refuses NaN
        raise NSTError(f"model.strength: must be in (0, 1] (1 is text-to-image), got {strength!r}")


class GuidedDiffusion(L.LightningModule):
    """Diffusion sampling with optional VGG style guidance; ``predict_step`` generates one batch of items.

    The loop follows the pipeline's ``__call__`` step by step (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` or ``FluxPipeline``, detected from the folder's
    ``model_index.json``; :mod:`lightning_nst.diffusion.families`), using the pipeline's own ``encode_prompt``,
    ``prepare_latents``, scheduler and image processor, and inserts the guidance callback between the model's
    prediction and the scheduler step, where diffusers offers no hook. Components are loaded in
    :meth:`configure_model`, so Lightning places them on the device and applies its precision.

    Args:
        model: A diffusers pipeline of Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux: a Hugging Face Hub id or a local
            folder.
        guidance: The style-guidance step; ``None`` samples without measuring or guiding style.
        tiny_vae: An ``AutoencoderTiny`` for the guidance gradient only, the family's (``madebyollin/taesd``,
            ``taesdxl``, ``taesd3``, ``taef1``); the output is always decoded with the pipeline's VAE.
        scheduler: A sampler alias (``ddim``, ``ddpm``, ``pndm``, ``euler``, ``euler_a``, ``lms``, ``heun``,
            ``dpmpp_2m``, ``dpmpp_sde``, ``unipc``, ``lcm``; ``flow_euler`` for SD3 and Flux, ``flow_heun`` for SD3;
            see :data:`~.samplers.SAMPLERS`), a diffusers scheduler class name, or ``pipeline`` (keep the pipeline's
            own); refused if style guidance cannot compute its x̂₀, it does not fit the model's family or it cannot run
            the schedule the family's pipeline sets (:func:`~.samplers.check_family`).
        num_inference_steps: Sampling steps.
        cfg_scale: Classifier-free guidance scale (diffusers' ``guidance_scale``); <= 1 turns it off. For Flux-dev it
            is the distilled guidance the transformer embeds (3.5 is the pipeline's default); FLUX.1-schnell ignores
            it, as its pipeline does.
        eta: DDIM's eta (0 is deterministic DDIM); ignored by DDPM.
        height: Image height in pixels; by default the UNet's native size.
        width: Image width in pixels; by default the UNet's native size.
        dtype: Weights' dtype; ``auto`` follows Lightning's precision (``bf16-true`` loads bfloat16, others float32).
            Style statistics are computed in float32 either way.
        variant: Weights variant to load, e.g. ``fp16`` where the repository has one.
        safety_checker: Run the pipeline's safety checker, when it has one (SD 1.x/2.x), on the final images.
        strength: img2img's strength in (0, 1], as in ``StableDiffusionImg2ImgPipeline``: with ``data.init_images``
            the init image is encoded, noised to the timestep that leaves ``int(num_inference_steps * strength)``
            steps, and denoised from there. ``1.0`` is text-to-image (pure noise; the init image sets the size only);
            where no step is left, the output is the init image's VAE round trip. Other values need init images.
        cpu_offload: diffusers' ``enable_model_cpu_offload`` (GPU only): the pipeline's models wait in CPU memory and
            each is moved to the GPU when it runs, so only one is there at a time. In the guided loop the denoiser
            and the VAE alternate every step, so each step moves both: slower, for the memory of the largest one.
        vae_slicing: Decode the batch's final images one by one (``AutoencoderKL.enable_slicing``): less memory
            for a batch; the same images.
        vae_tiling: Decode in overlapping tiles (``AutoencoderKL.enable_tiling``), for large images; tile seams
            are blended, so the images differ slightly from an untiled decode. The guidance's decode is tiled too.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        guidance: StyleGuidance | None = None,
        tiny_vae: str | None = None,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        cfg_scale: float = 7.5,
        eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        dtype: DType = "auto",
        variant: str | None = None,
        safety_checker: bool = True,
        strength: float = 1.0,
        cpu_offload: bool = False,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["guidance"])
        _check_options(num_inference_steps, cfg_scale, eta, height, width, strength)
        if guidance is not None:
            guidance.check_decoder(tiny_vae)
        self.sampler = sampler(scheduler)
        self.model_source = model
        self.guidance = guidance
        self.tiny_vae_source = tiny_vae
        self.scheduler_name = scheduler
        self.num_inference_steps = num_inference_steps
        self.cfg_scale = cfg_scale
        self.eta = eta
        self.height = height
        self.width = width
        self.dtype_name = dtype
        self.variant = variant
        self.use_safety_checker = safety_checker
        self.strength = strength
        self.cpu_offload = cpu_offload
        self.vae_slicing = vae_slicing
        self.vae_tiling = vae_tiling
        self.unet: nn.Module | None = None
        self.transformer: nn.Module | None = None
        self.vae: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        self.text_encoder_2: nn.Module | None = None
        self.text_encoder_3: nn.Module | None = None
        self.tiny_vae: nn.Module | None = None
        self.safety_checker: nn.Module | None = None
        self.pipeline: Any = None
        self.family: Family | None = None
        self.data: DataSummary | None = None
        self.num_timesteps = 0
        self._size: tuple[int, int] | None = None
        self._family_name: str | None = None

    # -- setup ----------------------------------------------------------------------------------------------------

    @property
    def scheduler(self) -> Any:
        """The pipeline's scheduler (stateful: ``set_timesteps`` runs at the start of every batch)."""
        return self._pipe().scheduler

    def _pipe(self) -> Any:
        if self.pipeline is None:
            raise RuntimeError("GuidedDiffusion.configure_model() has not run yet")
        return self.pipeline

    def _family(self) -> Family:
        self._pipe()
        assert self.family is not None
        return self.family

    @property
    def denoiser(self) -> nn.Module | None:
        """The UNet (SD, SDXL) or transformer (SD3, Flux), once loaded."""
        return self.unet if self.unet is not None else self.transformer

    def spatial_latents(self, latents: Tensor) -> Tensor:
        """The current batch's latents as ``(B, C, h, w)`` for a decoder: Flux's packed tokens unpacked."""
        if self._size is None:
            return latents
        return self._family().spatial(latents, self._size)

    def setup(self, stage: str) -> None:
        """Take what the data gives, check it and the model folder before anything heavy loads; build the VGG19."""
        data = self.trainer.datamodule if self._trainer is not None else None
        if not isinstance(data, PromptGrid):
            raise NSTError("data: GuidedDiffusion needs `data: {class_path: lightning_nst.PromptGrid, ...}`")
        self.use_data(data.summary())
        # The family from model_index.json, read locally or fetched alone for a Hub id, so that a sampler the model
        # cannot take is refused before any weight downloads; not when every item is finished (nothing loads then).
        family = local_family(self.model_source) if self.data.finished else model_family(self.model_source)
        self._family_name = family
        check_model_folder(
            self.model_source, family, self.scheduler_name, self.num_inference_steps, self.tiny_vae_source,
            self.height, self.width,
        )  # fmt: skip
        if self.cpu_offload and isinstance(self.trainer.accelerator, CPUAccelerator):
            raise NSTError("model.cpu_offload: moves each model to the GPU as it runs; on the CPU set it to false")
        if self.guidance is not None:
            # Here rather than in configure_model, whose default device and dtype (Lightning's init contexts) would
            # change the random weights of `weights: random` from one accelerator to another.
            self.guidance.configure()

    def use_data(self, data: DataSummary) -> None:
        """Check the data (:meth:`PromptGrid.summary <lightning_nst.PromptGrid.summary>`) fits the model; keep it."""
        if self.guidance is not None and not data.style_targets:
            raise NSTError("data.style: style guidance (model.guidance) needs at least one style image")
        if self.strength != 1.0 and not data.init_images:
            raise NSTError(f"model.strength: {self.strength} needs data.init_images (img2img); 1.0 is text-to-image")
        sizes = {self.init_size(image) for image in data.init_images}
        if data.batch_size > 1 and len(sizes) > 1:
            raise NSTError(
                f"data.batch_size: init images of different sizes ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))})"
                " cannot share a batch; set data.batch_size: 1"
            )
        self.data = data

    def configure_model(self) -> None:
        """Load the pipeline (and the tiny decoder) once; Lightning then moves them to the device.

        Nothing is loaded when the data has nothing left to generate (every item finished by an earlier run).
        """
        if self.pipeline is not None or (self.data is not None and self.data.finished):
            return
        torch_dtype = torch.get_default_dtype() if self.dtype_name == "auto" else getattr(torch, self.dtype_name)
        family_name = self._family_name or model_family(self.model_source)  # setup has read it
        pipe = load_pipeline(
            self.model_source, family_name, self.scheduler_name, self.num_inference_steps, torch_dtype, self.variant,
            self.use_safety_checker,
        )  # fmt: skip
        self.family = family = FAMILIES[family_name](pipe)
        if self.tiny_vae_source is not None:
            self.tiny_vae = load_tiny_vae(self.tiny_vae_source, torch_dtype, family, self.model_source)
        check_size(family.name, family.size_multiple(), self.height, self.width)
        # Registered here so Lightning moves them and applies its precision; the pipeline holds the same objects.
        # With cpu_offload they are not: accelerate's hooks (enable_model_cpu_offload, in on_predict_start) move
        # each to the GPU when it runs, and Lightning moving them all there at once would undo that.
        for name, module in family.modules().items():
            if self.cpu_offload:
                object.__setattr__(self, name, module)
            else:
                setattr(self, name, module)
        if self.vae_slicing:
            pipe.vae.enable_slicing()
        if self.vae_tiling:
            pipe.vae.enable_tiling()
        self.safety_checker = getattr(pipe, "safety_checker", None)
        for module in (*family.modules().values(), self.tiny_vae, self.safety_checker):
            if module is not None:
                module.eval().requires_grad_(False)
        self.pipeline = pipe

    def on_predict_start(self) -> None:
        """Compute the style targets once, on the device; say which VGG weights are in use and the VGG pass's dtype."""
        if self.cpu_offload and self.pipeline is not None:
            self.pipeline.enable_model_cpu_offload(device=self.device)
        vae = self.pipeline.vae if self.pipeline is not None else None
        if self.family is not None and self.family.name == "sdxl" and vae.dtype == torch.float16:
            # As StableDiffusionXLPipeline does for decoding (its VAE overflows in float16, and the guidance
            # backpropagates through it every step): float32 for good, here after Lightning's precision has
            # converted the modules. A VAE that does not need it (sdxl-vae-fp16-fix) says force_upcast: false.
            if vae.config.get("force_upcast", False):
                vae.float()
        data = self.data
        if self.family is not None and self.family.name == "flux" and data is not None and data.negative_prompt:
            rank_zero_warn("data.negative_prompt: FluxPipeline uses no negative prompt (no classifier-free guidance)")
        if self.guidance is not None and data is not None:
            # Chosen here, with the trunk on its device and converted by the precision, before the targets use it.
            self.guidance.use_precision(str(self.trainer.precision))
            self.guidance.set_styles(data.style_targets, data.style_weights)
            rank_zero_info(f"Style guidance: {guidance_line(self.guidance.run_settings())}")
        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            rank_zero_warn(
                "No prediction writer in trainer.callbacks: images are not saved; add lightning_nst.GenerationWriter"
            )

    def fingerprint_options(self) -> dict[str, Any]:
        """The options that define the images, as configured and known before the pipeline loads.

        Together with an item's prompt, seed, style and init image they make its fingerprint
        (:meth:`~lightning_nst.diffusion.prompts.GenerationItem.fingerprint`, which leaves ``strength`` out for an
        item without an init image), by which a rerun recognises the items an earlier run finished. Batching, the
        number of processes and callbacks are left out, since they do not change an image, and so is the accelerator,
        so that a batch begun on one machine can be finished on another. With guidance, the VGG19 trunk is built here
        if it was not yet: the weights in use are part of it.
        """
        return {
            "model": self.model_source,
            "variant": self.variant,
            "dtype": self.dtype_name,
            "precision": str(self.trainer.precision) if self._trainer is not None else None,
            "tiny_vae": self.tiny_vae_source,
            "scheduler": self.scheduler_name,
            "num_inference_steps": self.num_inference_steps,
            "cfg_scale": self.cfg_scale,
            "eta": self.eta,
            "height": self.height,
            "width": self.width,
            "safety_checker": self.use_safety_checker,
            # Only where set: a tiled decode changes the images; slicing and offloading do not.
            **({"vae_tiling": True} if self.vae_tiling else {}),
            "guidance": self.guidance.settings() if self.guidance is not None else None,
            "strength": self.strength,
            # DPM-SDE's noise has come from each item's seed since this key: an item made before (from torch's global
            # random state) is another image, so a folder begun then is refused rather than mixed.
            **({"sde_noise": "per item"} if self.sampler is not None and self.sampler.alias == "dpmpp_sde" else {}),
        }

    def manifest_settings(self) -> dict[str, Any]:
        """The sampling settings a manifest line records, as the loaded pipeline resolved them.

        Model, steps, scales and guidance are those of :meth:`fingerprint_options`, and so is the strength with init
        images (``None`` without); the scheduler is named by its class, the size in pixels and the dtype by the
        UNet's; the guidance adds ``vgg_dtype``, the dtype its VGG pass computed in. With init images the size of
        each item is that of its image (:meth:`init_size`).
        """
        options = self.fingerprint_options()
        img2img = self.data is not None and bool(self.data.init_images)
        guidance = self.guidance.run_settings() if self.guidance is not None else None
        return {
            **{key: options[key] for key in ("model", "num_inference_steps", "cfg_scale", "eta")},
            "guidance": guidance,
            "scheduler": type(self.scheduler).__name__,
            "size": list(self.image_size()),
            "dtype": str(self.denoiser.dtype).removeprefix("torch.") if self.denoiser is not None else self.dtype_name,
            "strength": self.strength if img2img else None,
        }

    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the generated images."""
        native = self._family().native_size()
        return self.height or native[0], self.width or native[1]

    def init_size(self, image: Tensor) -> tuple[int, int]:
        """``(height, width)`` generated from the init image ``image``: its aspect ratio, sides multiples of 8.

        Multiples of the family's :meth:`~.families.Family.size_multiple` once the pipeline is loaded
        (16 for SD3 and Flux). The long edge is the larger of ``model.height`` and ``model.width`` where either is
        set, else the image's.
        """
        height, width = image.shape[-2:]
        given = [side for side in (self.height, self.width) if side is not None]
        scale = (max(given) if given else max(height, width)) / max(height, width)
        step = max(8, self.family.size_multiple()) if self.family is not None else 8
        return tuple(min(MAX_SIDE, max(step, round(side * scale / step) * step)) for side in (height, width))  # type: ignore[return-value]

    # -- sampling -------------------------------------------------------------------------------------------------

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        r"""Generate one batch of items; see :class:`~lightning_nst.diffusion.prompts.PromptGrid` for the batch fields.

        The steps of the pipeline's ``__call__``: 0. the size (:meth:`image_size`, or the init images'; 1. the inputs
        were checked in ``__init__`` and :meth:`configure_model`), 2.-6. :meth:`_prepare`, 7. the
        :class:`~.loop.DenoisingLoop`, 8.-9. :meth:`_finish`.

        Returns:
            ``images`` ``(B, 3, H, W)`` in ``[0, 1]`` on the CPU; ``style_loss`` ``(B, steps)`` (the loss of each
            step's :math:`\hat x_0`) and ``final_style_loss`` ``(B,)`` (of the output image), or ``None`` without
            guidance; ``timesteps``; ``guided`` per step; ``nsfw`` per image or ``None``; ``seconds_per_step``;
            ``model_evaluations``, the UNet calls made (more than ``len(timesteps)`` with recurrence); ``failures``,
            per item ``None`` or the :class:`~.loop.Failure` that makes its image unusable: the first NaN or infinity
            in its noise prediction, latents, decoded image or final style loss.
        """
        self._size = self._batch_image_size(batch)
        loop, latents, timesteps = self._prepare(batch, self._size)
        started = time.perf_counter()
        latents = loop.run(latents, timesteps)
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        seconds_per_step = (time.perf_counter() - started) / max(len(timesteps), 1)
        images, nsfw, final_style_loss = self._finish(loop, latents)
        return {
            "images": images.float().cpu(),
            "style_loss": torch.stack(loop.style_losses, dim=1).cpu() if loop.style_losses else None,
            "final_style_loss": final_style_loss,
            # σ-space samplers' timesteps are floats: kept as such, integral ones (all of the VP samplers') as ints.
            "timesteps": [int(t) if float(t).is_integer() else round(float(t), 4) for t in timesteps],
            "guided": loop.guided,
            "nsfw": nsfw,
            "seconds_per_step": seconds_per_step,
            "model_evaluations": loop.model_evaluations,
            "failures": loop.failures,
        }

    def _prepare(self, batch: dict[str, Any], size: tuple[int, int]) -> tuple[DenoisingLoop, Tensor, Tensor]:
        """Steps 2-6 of the pipeline's ``__call__``: the batch's loop (prompts, step kwargs), latents and timesteps."""
        pipe, family, scheduler = self._pipe(), self._family(), self._pipe().scheduler
        # 2. Define call parameters. One CPU generator per item, so an item's noise depends on its seed only, not on
        # its batch or device.
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in batch["seed"]]
        # 3. Encode input prompt, with the family's extra conditioning
        prompts, negatives = list(batch["prompt"]), list(batch["negative_prompt"])
        condition = family.encode(prompts, negatives, self.device, self.cfg_scale, size)
        # 4. Prepare timesteps
        timesteps = family.timesteps(scheduler, self.num_inference_steps, self.device, size)
        if self.sampler is not None and self.sampler.alias == "dpmpp_sde":
            # Its Brownian noise seeds itself from torch's global random state, which the items' generators never
            # reach, so an item's image would depend on what ran before it. Given one seed per row, diffusers'
            # BatchedBrownianTree grows each item a tree of its own (set_timesteps has dropped the last batch's).
            scheduler.noise_sampler_seed = [int(seed) for seed in batch["seed"]]
        # 5. Prepare latent variables; with an init image also the timesteps its strength leaves
        latents, timesteps = self._initial_latents(batch, size, timesteps, generators, condition.dtype)
        self.num_timesteps = len(timesteps)
        # 6. Prepare extra step kwargs: eta and the items' generators where step takes them. SD3's and Flux's pipelines
        # pass none, so a stochastic_sampling FlowMatchEuler would draw from the global generator: given the items'
        # own, each item's image depends on its seed only, as with every other sampler.
        if hasattr(pipe, "prepare_extra_step_kwargs"):
            step_kwargs = pipe.prepare_extra_step_kwargs(generators, self.eta)
        else:
            accepted = inspect.signature(scheduler.step).parameters
            step_kwargs = {"generator": generators} if "generator" in accepted else {}
        sampling = Sampling(scheduler, pipe.vae, self.tiny_vae, len(timesteps), self.spatial_latents)
        loop = DenoisingLoop(
            family, self.guidance, self.cfg_scale, condition, sampling, generators, step_kwargs,
            functools.partial(_step_end, self), batch["style_index"], batch["index"],
        )  # fmt: skip
        return loop, latents, timesteps

    def _finish(self, loop: DenoisingLoop, latents: Tensor) -> tuple[Tensor, list[bool] | None, Tensor | None]:
        """8. Decode, check safety and post-process as the pipeline does; 9. the style loss of the images as written."""
        pipe, failures, size = self._pipe(), loop.failures, self._size
        assert size is not None
        latents = self._family().spatial(latents, size).to(self.vae.dtype)
        image = self.vae.decode(vae_input(self.vae, latents), return_dict=False)[0]
        note(failures, image, "trainer.precision", "the decoded image (float32 may help: --trainer.precision 32-true)")
        nsfw = None
        if hasattr(pipe, "run_safety_checker"):
            image, nsfw = pipe.run_safety_checker(image, self.device, loop.condition.dtype)
        do_denormalize = [True] * len(failures) if nsfw is None else [not flagged for flagged in nsfw]
        images = pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=do_denormalize)
        final_style_loss = None
        if self.guidance is not None:
            final_style_loss = self.guidance.style_loss(images, loop.style_index).cpu()
            note(failures, final_style_loss, "model.guidance.vgg", "the style loss of the image")
        return images, list(nsfw) if nsfw is not None else None, final_style_loss

    def _batch_image_size(self, batch: dict[str, Any]) -> tuple[int, int]:
        """``(height, width)`` of the batch's images: :meth:`image_size`, or that of its init images."""
        images = batch.get("init_pixels") or [None]
        if images[0] is None:
            return self.image_size()
        sizes = {self.init_size(image) for image in images}
        if len(sizes) > 1:  # setup refuses such a batch size; this guards the Python API
            raise NSTError("data.batch_size: init images of different sizes cannot share a batch; set it to 1")
        return next(iter(sizes))

    def _initial_latents(
        self,
        batch: dict[str, Any],
        size: tuple[int, int],
        timesteps: Tensor,
        generators: list[torch.Generator],
        dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        """The latents the loop starts from and the timesteps it runs, as the text or img2img pipeline has them.

        Without init images, or at ``strength`` 1, the pipeline's ``prepare_latents``: pure noise of ``size``;
        otherwise the batch's init images (``init_pixels``) noised as the img2img pipeline does
        (:func:`~.latents.img2img_latents`).
        """
        family, device = self._family(), self.device
        images = batch.get("init_pixels") or [None] * len(generators)
        if images[0] is None or self.strength == 1.0:
            return family.initial_noise(len(generators), size, dtype, device, generators), timesteps
        steps, strength = self.num_inference_steps, self.strength
        return img2img_latents(family, self.vae, images, size, steps, strength, generators, dtype, device)
