"""Style-guided Stable Diffusion sampling as a LightningModule whose ``predict_step`` generates a batch."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import diffusers
import huggingface_hub.constants
import lightning as L
import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, DPMSolverSDEScheduler, LCMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import deprecation_utils, is_torchsde_available
from diffusers.utils.torch_utils import randn_tensor
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from lightning_nst.core.errors import NSTError
from lightning_nst.core.net import unreachable
from lightning_nst.diffusion.catalog import DEFAULT_MODEL, FLOW_FAMILIES, SCHEDULERS, family_of_class, local_family
from lightning_nst.diffusion.families import FAMILIES, Family, missing_schedule_arguments, size_multiple
from lightning_nst.diffusion.guidance import (
    FLOW,
    SUPPORTED_SCHEDULERS,
    StyleGuidance,
    check_scheduler,
    guidance_line,
    mid_step,
    model_latents,
    noise_level,
    renoise,
    restore,
    snapshot,
    vae_input,
)
from lightning_nst.diffusion.prompts import PromptGrid

DType = Literal["auto", "float32", "float16", "bfloat16"]

MAX_SIDE = 8192
"""Largest ``model.height`` and ``model.width``: 16 times Stable Diffusion 1.x's native 512 px."""


# diffusers renamed from_pretrained's `torch_dtype` to `dtype`; the old name still works there but warns.
_DTYPE_KWARG = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _looks_like_path(source: str) -> bool:
    return Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1


@contextlib.contextmanager
def _one_loading_bar() -> Iterator[None]:
    """While a pipeline loads, diffusers' bar over its components only, and on a terminal only.

    transformers draws a bar of its own over each text encoder's weights inside diffusers' bar, which breaks that
    bar's line in two; off a terminal, tqdm's carriage returns only clutter a log.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    transformers_logging.disable_progress_bar()
    if not sys.stderr.isatty():
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            (module.enable_progress_bar if enabled else module.disable_progress_bar)()


def _load(cls: Any, source: str, key: str, marker: str, loader: str = "from_pretrained", **kwargs: Any) -> Any:
    """``cls.from_pretrained(source)``, or another ``loader``, of a local folder or a Hub id; errors name ``key``."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            raise NSTError(f"{key}: {path} is not a diffusers folder ({marker} is missing)")
        source = str(path)
    elif _looks_like_path(source):
        raise NSTError(f"{key}: no such folder: {path}")
    offline = None if path.exists() else hub_unreachable()
    if offline is not None:  # the cache only, at once, rather than huggingface_hub's retries
        kwargs["local_files_only"] = True
    try:
        with _one_loading_bar():
            return getattr(cls, loader)(source, **kwargs)
    except Exception as error:  # from_pretrained raises OSError, ValueError, hub errors, ... for unusable sources
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason if len(reason) <= 240 else reason[:240] + "..."
        if path.exists():
            raise NSTError(f"{key}: cannot load {cls.__name__} from {path}: {reason}") from error
        if offline is not None:
            reason = f"the Hub cannot be reached ({offline}) and the cache has no complete copy of {source!r}"
        raise NSTError(
            f"{key}: cannot load {source!r} from the Hugging Face Hub or its cache; offline, pass a local folder "
            f"instead (a downloaded snapshot, or a folder written by {cls.__name__}.save_pretrained). Cause: {reason}"
        ) from error


_HUB_ANSWER: dict[str, str | None] = {}


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached, or ``None``; asked once per process, never when it is offline.

    With ``HF_HUB_OFFLINE=1`` huggingface_hub reads only its cache itself. Otherwise an unreachable Hub is found at
    once here, where huggingface_hub would retry each request with back-off for about 23 s before failing, even for
    a model its cache holds.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return None
    endpoint = huggingface_hub.constants.ENDPOINT
    if endpoint not in _HUB_ANSWER:
        _HUB_ANSWER[endpoint] = unreachable(endpoint)
    return _HUB_ANSWER[endpoint]


def scheduler_class(name: str) -> tuple[type, dict[str, Any]] | None:
    """The class and extra settings ``model.scheduler: name`` builds, ``None`` for ``pipeline``; raises for others."""
    if name == "pipeline":
        return None
    class_name, settings = SCHEDULERS.get(name, (name, {}))
    if class_name == "DPMSolverSDEScheduler" and not is_torchsde_available():
        raise NSTError(f"model.scheduler: {name} (DPMSolverSDEScheduler) needs torchsde: pip install torchsde")
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise NSTError(
            f"model.scheduler: {name!r} is not a scheduler; choose {', '.join(SCHEDULERS)}, pipeline (the "
            "pipeline's own) or a diffusers scheduler class name such as EulerDiscreteScheduler"
        )
    if not issubclass(cls, SUPPORTED_SCHEDULERS):
        raise NSTError(
            f"model.scheduler: {class_name} cannot be guided: the guided sampler does not know its clean-latent "
            f"prediction x0; choose one of {', '.join(SCHEDULERS)}"
        )
    return cls, settings


def check_family_scheduler(family: str, cls: type, name: str, config: Mapping[str, Any] | None = None) -> None:
    """Raise unless the scheduler class ``cls`` (``model.scheduler: name``) samples models of ``family``.

    With ``config``, the model's own scheduler config, also unless ``cls`` can run the schedule the family's pipeline
    sets for that model (:func:`~.families.missing_schedule_arguments`), as diffusers would refuse it.
    """
    if family in FLOW_FAMILIES and not issubclass(cls, FLOW):
        flow = ", ".join(alias for alias, (class_name, _) in SCHEDULERS.items() if class_name.startswith("FlowMatch"))
        raise NSTError(
            f"model.scheduler: {name} ({cls.__name__}) samples noise-predicting models, but {family.upper()} is a "
            f"flow-matching model: choose {flow} or pipeline"
        )
    if family not in FLOW_FAMILIES and issubclass(cls, FLOW):
        raise NSTError(
            f"model.scheduler: {name} ({cls.__name__}) samples flow-matching models (SD3, Flux), not "
            f"{'SDXL' if family == 'sdxl' else 'Stable Diffusion 1.x/2.x'}"
        )
    missing = missing_schedule_arguments(family, cls, config) if config is not None else []
    if missing:
        why = {
            "sigmas": f"{FAMILIES[family].pipeline_class.__name__} sets sigmas from 1 to 1/steps",
            "mu": "the model's scheduler config sets use_dynamic_shifting, a shift that follows the image size",
        }
        raise NSTError(
            f"model.scheduler: {name} ({cls.__name__}) cannot run {family.upper()}'s own schedule: its set_timesteps "
            f"takes no {' and no '.join(missing)} ({'; '.join(why[key] for key in missing)}); choose flow_euler"
        )


def model_family(source: str) -> str:
    """The family of the pipeline ``model.model`` names, from its ``model_index.json`` (fetched for a Hub id)."""
    family = local_family(source)
    if family is not None:
        return family
    config = _load(DiffusionPipeline, source, "model.model", "model_index.json", loader="load_config")
    return family_of_class(str(config.get("_class_name")), source)


def check_steps(num_inference_steps: int, num_train_timesteps: int, model: str) -> None:
    """Raise unless the scheduler, trained over ``num_train_timesteps``, can take ``num_inference_steps`` steps."""
    if num_inference_steps > num_train_timesteps:
        raise NSTError(
            f"model.num_inference_steps: {num_inference_steps} is more than the {num_train_timesteps} timesteps the "
            f"scheduler of {model} was trained over"
        )


def _local_json(config: Path) -> dict[str, Any] | None:
    """A local component's JSON config, without loading any weights (``None`` if not known)."""
    try:
        value = json.loads(config.expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a Hub id, or unreadable: reported, naming the key, on loading
        return None
    return value if isinstance(value, dict) else None


def _local_config(config: Path, key: str) -> Any:
    """``key`` of a local component's JSON config, without loading any weights (``None`` if not known)."""
    return (_local_json(config) or {}).get(key)


def _local_int(config: Path, key: str) -> int | None:
    value = _local_config(config, key)
    return value if isinstance(value, int) else None


def check_size(family: str, multiple: int, height: int | None, width: int | None) -> None:
    """Raise unless ``model.height`` and ``model.width`` are multiples of ``multiple`` (:func:`size_multiple`)."""
    for key, value in (("model.height", height), ("model.width", width)):
        if value is not None and value % multiple:
            name = FAMILIES[family].pipeline_class.__name__
            raise NSTError(f"{key}: {name} needs a multiple of {multiple} px, got {value}")


def check_tiny_channels(tiny: str, own: int | None, channels: int | None, model: str) -> None:
    """Raise unless the tiny decoder ``tiny``, of ``own`` latent channels, decodes the ``channels`` of ``model``."""
    if own is not None and channels is not None and own != channels:
        raise NSTError(
            f"model.tiny_vae: {tiny} decodes {own}-channel latents, but the VAE of {model} has {channels}; use the "
            "family's tiny decoder (taesd for SD 1.x/2.x, taesdxl for SDXL, taesd3 for SD3, taef1 for Flux)"
        )


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


class Failure(NamedTuple):
    """Why an item of a batch failed: the config key most likely at fault, and the first value that was not finite."""

    key: str
    problem: str


def _note(failures: list[Failure | None], values: Tensor, key: str, what: str) -> None:
    """Record ``what`` as the failure of each item whose row of ``values`` holds a NaN or infinity first."""
    finite = torch.isfinite(values.detach()).flatten(1).all(dim=1) if values.ndim > 1 else torch.isfinite(values)
    rows = len(failures)
    # With classifier-free guidance the UNet batch is [unconditional; conditional]; either half fails its item.
    finite = finite.view(-1, rows).all(dim=0).tolist()
    for row, ok in enumerate(finite):
        if not ok and failures[row] is None:
            failures[row] = Failure(key, f"{what} is not finite")


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
            see :data:`SCHEDULERS`), a diffusers scheduler class name, or ``pipeline`` (keep the pipeline's own);
            refused if style guidance cannot compute its x̂₀, it does not fit the model's family or it cannot run the
            schedule the family's pipeline sets (:func:`check_family_scheduler`).
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
        # dtype is not checked by hand: it is a Literal, which the CLI's parser enforces naming model.dtype.
        if guidance is not None:
            guidance.check_decoder(tiny_vae)
        scheduler_class(scheduler)
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

    def _data(self) -> PromptGrid:
        data = self.trainer.datamodule if self._trainer is not None else None
        if not isinstance(data, PromptGrid):
            raise NSTError("data: GuidedDiffusion needs `data: {class_path: lightning_nst.PromptGrid, ...}`")
        return data

    def setup(self, stage: str) -> None:
        """Check the data fits the model before anything heavy is loaded, then build the guidance's VGG19 trunk."""
        data = self._data()
        if self.guidance is not None and not data.style_sources:
            raise NSTError("data.style: style guidance (model.guidance) needs at least one style image")
        if self.strength != 1.0 and not data.init_sources:
            raise NSTError(f"model.strength: {self.strength} needs data.init_images (img2img); 1.0 is text-to-image")
        sizes = {self.init_size(image) for image in data.init_images.values()}
        if data.batch_size > 1 and len(sizes) > 1:
            raise NSTError(
                f"data.batch_size: init images of different sizes ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))})"
                " cannot share a batch; set data.batch_size: 1"
            )
        model = Path(self.model_source)
        train_timesteps = _local_int(model / "scheduler" / "scheduler_config.json", "num_train_timesteps")
        if train_timesteps is not None:
            check_steps(self.num_inference_steps, train_timesteps, self.model_source)
        # The family from model_index.json, read locally or fetched alone for a Hub id, so that a sampler the model
        # cannot take is refused before any weight downloads; not when every item is finished (nothing loads then).
        family = local_family(self.model_source) if data.all_finished else model_family(self.model_source)
        self._family_name = family
        chosen = scheduler_class(self.scheduler_name)
        if family is not None and chosen is not None:
            schedule = _local_json(model / "scheduler" / "scheduler_config.json")
            check_family_scheduler(family, chosen[0], self.scheduler_name, schedule)
        if family is not None and self.tiny_vae_source is not None:
            own = _local_int(Path(self.tiny_vae_source) / "config.json", "latent_channels")
            channels = _local_int(model / "vae" / "config.json", "latent_channels")
            check_tiny_channels(self.tiny_vae_source, own, channels, self.model_source)
        blocks = _local_config(model / "vae" / "config.json", "block_out_channels")
        if family is not None and isinstance(blocks, list):  # else checked once the pipeline has loaded
            patch = _local_int(model / "transformer" / "config.json", "patch_size") or 1
            check_size(family, size_multiple(family, 2 ** (len(blocks) - 1), patch), self.height, self.width)
        if self.cpu_offload and isinstance(self.trainer.accelerator, CPUAccelerator):
            raise NSTError("model.cpu_offload: moves each model to the GPU as it runs; on the CPU set it to false")
        if self.guidance is not None:
            # Here rather than in configure_model, whose default device and dtype (Lightning's init contexts) would
            # change the random weights of `weights: random` from one accelerator to another.
            self.guidance.configure()

    def configure_model(self) -> None:
        """Load the pipeline (and the tiny decoder) once; Lightning then moves them to the device.

        Nothing is loaded when the data has nothing left to generate (every item finished by an earlier run).
        """
        if self.pipeline is not None:
            return
        data = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(data, PromptGrid) and data.all_finished:
            return
        torch_dtype = torch.get_default_dtype() if self.dtype_name == "auto" else getattr(torch, self.dtype_name)
        family = FAMILIES[self._family_name or model_family(self.model_source)]  # setup has read it
        extra: dict[str, Any] = (
            {"safety_checker": None, "requires_safety_checker": False}
            if family.name == "sd" and not self.use_safety_checker
            else {}
        )
        # from_pretrained's default (use_safetensors=None) loads .safetensors where present and falls back to .bin
        # files only without them, through torch.load(weights_only=True) in diffusers and transformers alike.
        pipe = _load(
            family.pipeline_class,
            self.model_source,
            "model.model",
            "model_index.json",
            variant=self.variant,
            **{_DTYPE_KWARG: torch_dtype},
            **extra,
        )
        # The pipeline's own scheduler, or the one named by model.scheduler configured from it (betas, offsets,
        # spacing); the name was checked in __init__.
        chosen = scheduler_class(self.scheduler_name)
        schedule = pipe.scheduler.config  # the model's own, which a scheduler built from it may not keep
        if chosen is not None:
            cls, settings = chosen
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **settings)
        check_family_scheduler(family.name, type(pipe.scheduler), self.scheduler_name, schedule)
        check_scheduler(pipe.scheduler)
        check_steps(self.num_inference_steps, pipe.scheduler.config.num_train_timesteps, self.model_source)
        original_steps = pipe.scheduler.config.get("original_inference_steps")
        if isinstance(pipe.scheduler, LCMScheduler) and self.num_inference_steps > original_steps:
            raise NSTError(
                f"model.num_inference_steps: {self.num_inference_steps} is more than LCMScheduler's "
                f"original_inference_steps ({original_steps})"
            )
        pipe.set_progress_bar_config(disable=True)
        if self.tiny_vae_source is not None:
            self.tiny_vae = _load(
                AutoencoderTiny, self.tiny_vae_source, "model.tiny_vae", "config.json", **{_DTYPE_KWARG: torch_dtype}
            )
            own, channels = self.tiny_vae.config.latent_channels, pipe.vae.config.latent_channels
            check_tiny_channels(self.tiny_vae_source, own, channels, self.model_source)
        self.family = family(pipe)
        check_size(family.name, self.family.size_multiple(), self.height, self.width)
        # Registered here so Lightning moves them and applies its precision; the pipeline holds the same objects.
        # With cpu_offload they are not: accelerate's hooks (enable_model_cpu_offload, in on_predict_start) move
        # each to the GPU when it runs, and Lightning moving them all there at once would undo that.
        for name, module in self.family.modules().items():
            if self.cpu_offload:
                object.__setattr__(self, name, module)
            else:
                setattr(self, name, module)
        if self.vae_slicing:
            pipe.vae.enable_slicing()
        if self.vae_tiling:
            pipe.vae.enable_tiling()
        self.safety_checker = getattr(pipe, "safety_checker", None)
        for module in (*self.family.modules().values(), self.tiny_vae, self.safety_checker):
            if module is not None:
                module.eval().requires_grad_(False)
        self.pipeline = pipe

    def on_predict_start(self) -> None:
        """Compute the style targets once, on the device, and say which VGG weights are in use."""
        if self.cpu_offload and self.pipeline is not None:
            self.pipeline.enable_model_cpu_offload(device=self.device)
        vae = self.pipeline.vae if self.pipeline is not None else None
        if self.family is not None and self.family.name == "sdxl" and vae.dtype == torch.float16:
            # As StableDiffusionXLPipeline does for decoding (its VAE overflows in float16, and the guidance
            # backpropagates through it every step): float32 for good, here after Lightning's precision has
            # converted the modules. A VAE that does not need it (sdxl-vae-fp16-fix) says force_upcast: false.
            if vae.config.get("force_upcast", False):
                vae.float()
        if self.family is not None and self.family.name == "flux" and self._data().negative_prompt:
            rank_zero_warn("data.negative_prompt: FluxPipeline uses no negative prompt (no classifier-free guidance)")
        if self.guidance is not None:
            self.guidance.set_styles(*self._data().style_targets())
            rank_zero_info(f"Style guidance: {guidance_line(self.guidance.settings())}")
        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            rank_zero_warn(
                "No prediction writer in trainer.callbacks: images are not saved; add lightning_nst.GenerationWriter"
            )

    def fingerprint_options(self) -> dict[str, Any]:
        """The options that define the images, as configured and known before the pipeline loads.

        Together with an item's prompt, seed and style they make its fingerprint, by which a rerun recognises the
        items an earlier run finished. Batching, the number of processes and callbacks are left out, since they do
        not change an image, and so is the accelerator, so that a batch begun on one machine can be finished on
        another. With guidance, the VGG19 trunk is built here if it was not yet: the weights in use are part of it.
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
            # Only with init images, so that text-to-image fingerprints stay those of earlier versions.
            **({"strength": self.strength} if self._img2img() else {}),
            # DPM-SDE's noise has come from each item's seed since this key: an item made before (from torch's global
            # random state) is another image, so a folder begun then is refused rather than mixed.
            **({"sde_noise": "per item"} if self._sde() else {}),
        }

    def _sde(self) -> bool:
        chosen = scheduler_class(self.scheduler_name)
        return chosen is not None and issubclass(chosen[0], DPMSolverSDEScheduler)

    def _img2img(self) -> bool:
        data = self.trainer.datamodule if self._trainer is not None else None
        return isinstance(data, PromptGrid) and bool(data.init_sources)

    def manifest_settings(self) -> dict[str, Any]:
        """The sampling settings a manifest line records, as the loaded pipeline resolved them.

        Model, steps, scales, guidance and strength (``None`` without init images) are those of
        :meth:`fingerprint_options`; the scheduler is named by its class, the size in pixels and the dtype by the
        UNet's. With init images the size of each item is that of its image (:meth:`init_size`).
        """
        options = self.fingerprint_options()
        return {
            **{key: options[key] for key in ("model", "num_inference_steps", "cfg_scale", "eta", "guidance")},
            "scheduler": type(self.scheduler).__name__,
            "size": list(self.image_size()),
            "dtype": str(self.denoiser.dtype).removeprefix("torch.") if self.denoiser is not None else self.dtype_name,
            "strength": options.get("strength"),
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

    def _denoising_callbacks(self) -> list[DenoisingCallback]:
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        return [callback for callback in callbacks if isinstance(callback, DenoisingCallback)]

    # -- sampling -------------------------------------------------------------------------------------------------

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        r"""Generate one batch of items; see :class:`~lightning_nst.diffusion.prompts.PromptGrid` for the batch fields.

        Returns:
            ``images`` ``(B, 3, H, W)`` in ``[0, 1]`` on the CPU; ``style_loss`` ``(B, steps)`` (the loss of each
            step's :math:`\hat x_0`) and ``final_style_loss`` ``(B,)`` (of the output image), or ``None`` without
            guidance; ``timesteps``; ``guided`` per step; ``nsfw`` per image or ``None``; ``seconds_per_step``;
            ``model_evaluations``, the UNet calls made (more than ``len(timesteps)`` with recurrence); ``failures``,
            per item ``None`` or the :class:`Failure` that makes its image unusable: the first NaN or infinity in its
            noise prediction, latents, decoded image or final style loss.
        """
        pipe, family = self._pipe(), self._family()
        scheduler = pipe.scheduler
        # 0. Default height and width (image_size, or the init image's), and 1. Check inputs: done once, in __init__
        # and configure_model
        size = self._batch_image_size(batch)
        self._size = size

        # 2. Define call parameters
        prompts, negative_prompts = list(batch["prompt"]), list(batch["negative_prompt"])
        batch_size, device = len(prompts), self.device
        # One CPU generator per item, so an item's noise depends on its seed only, not on its batch or device.
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in batch["seed"]]

        # 3. Encode input prompt, with the family's extra conditioning
        condition = family.encode(prompts, negative_prompts, device, self.cfg_scale, size)
        do_cfg = condition.do_cfg

        # 4. Prepare timesteps
        timesteps = family.timesteps(scheduler, self.num_inference_steps, device, size)
        if isinstance(scheduler, DPMSolverSDEScheduler):
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
            extra_step_kwargs = pipe.prepare_extra_step_kwargs(generators, self.eta)
        else:
            accepted = inspect.signature(scheduler.step).parameters
            extra_step_kwargs = {"generator": generators} if "generator" in accepted else {}

        # 7. Denoising loop: one UNet call and one guidance step per entry of scheduler.timesteps, as diffusers' own
        # loop does. Second-order schedulers (Heun, DPM-SDE) list a timestep for each of their two model evaluations
        # per step and keep the first half-step's state themselves, so both evaluations are guided; multistep solvers
        # (PNDM, LMS, DPM-Solver++, UniPC) store the output step() is given, the corrected one, in their history.
        # Step indices (i, num_timesteps, the guidance window and every_k) count model evaluations.
        # Recurrence (model.guidance.recurrence) repeats a whole step, i.e. all the evaluations up to the point where
        # the scheduler no longer holds a half-finished step (guidance.mid_step: Heun's and DPM-SDE's pairs, PNDM's
        # first pair), from the scheduler state snapshotted before it and the result re-noised to the step's start.
        # Only the last repeat is recorded and shown to the DenoisingCallbacks: one entry per scheduled evaluation.
        # UniPC's corrector rebuilds x_t from the previous step's sample, so there a repeat changes x_t only through the
        # model output at the re-noised x_t.
        callbacks = self._denoising_callbacks()
        failures: list[Failure | None] = [None] * batch_size
        style_losses: list[Tensor] = []
        guided: list[bool] = []
        model_evaluations = 0
        started = time.perf_counter()
        i = 0
        while i < len(timesteps):
            first = i
            repeats = self.guidance.repeats(first, len(timesteps)) if self.guidance is not None else 0
            state = snapshot(scheduler) if repeats else {}
            for repeat in range(repeats + 1):
                final = repeat == repeats
                if repeat:
                    restore(scheduler, state)
                    level, target = noise_level(scheduler, timesteps, i), noise_level(scheduler, timesteps, first)
                    latents = renoise(latents, level, target, generators)
                    _note(failures, latents, "model.guidance.recurrence", f"step {first}: the re-noised latents")
                    i = first
                while True:
                    t = timesteps[i]
                    # The model's prediction after classifier-free guidance: noise, v or x0 as the scheduler's
                    # prediction_type says; the flow velocity for SD3 and Flux. Named noise_pred, as in diffusers.
                    noise_pred = family.model_output(latents, t, condition, self.cfg_scale)
                    model_evaluations += 1
                    _note(failures, noise_pred, *self._noise_failure(i, do_cfg))

                    # 7.1 Style guidance: unlike diffusers' callback_on_step_end, this runs before the scheduler step.
                    callback_kwargs: dict[str, Any] = {
                        "latents": latents,
                        "noise_pred": noise_pred,
                        "style_index": batch["style_index"],
                        "index": batch["index"],
                    }
                    if self.guidance is not None:
                        callback_kwargs = self.guidance(self, i, t, callback_kwargs)
                        noise_pred = callback_kwargs["noise_pred"]
                        if final:
                            style_losses.append(callback_kwargs["style_loss"])
                            guided.append(callback_kwargs["guided"])
                        _note(failures, noise_pred, "model.guidance.scale", f"step {i}: the guided noise prediction")

                    # compute the previous noisy sample x_t -> x_t-1
                    latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    _note(failures, latents, "model.eta", f"step {i}: the scheduler's latents")

                    # 7.2 Step-end callbacks, with diffusers' contract: they may replace the latents.
                    callback_kwargs["latents"] = latents
                    for callback in callbacks if final else ():
                        outputs = callback.on_denoising_step(self.trainer, self, i, int(t), callback_kwargs) or {}
                        latents = outputs.pop("latents", latents)
                        callback_kwargs["latents"] = latents
                        what = f"step {i}: the latents {type(callback).__name__} returned"
                        _note(failures, latents, "trainer.callbacks", what)
                    i += 1
                    if i == len(timesteps) or not mid_step(scheduler):
                        break
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        seconds_per_step = (time.perf_counter() - started) / max(len(timesteps), 1)

        # 8. Decode, check safety and post-process as the pipeline does
        latents = family.spatial(latents, size).to(self.vae.dtype)
        image = self.vae.decode(vae_input(self.vae, latents), return_dict=False)[0]
        _note(failures, image, "trainer.precision", "the decoded image (float32 may help: --trainer.precision 32-true)")
        has_nsfw_concept = None
        if hasattr(pipe, "run_safety_checker"):
            image, has_nsfw_concept = pipe.run_safety_checker(image, device, condition.dtype)
        do_denormalize = [True] * batch_size if has_nsfw_concept is None else [not nsfw for nsfw in has_nsfw_concept]
        images = pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=do_denormalize)

        # 9. Style loss of the images as written
        final_style_loss = None
        if self.guidance is not None:
            final_style_loss = self.guidance.style_loss(images, batch["style_index"]).cpu()
            _note(failures, final_style_loss, "model.guidance.vgg", "the style loss of the image")
        return {
            "images": images.float().cpu(),
            "style_loss": torch.stack(style_losses, dim=1).cpu() if style_losses else None,
            "final_style_loss": final_style_loss,
            # σ-space samplers' timesteps are floats: kept as such, integral ones (all of the VP samplers') as ints.
            "timesteps": [int(t) if float(t).is_integer() else round(float(t), 4) for t in timesteps],
            "guided": guided,
            "nsfw": list(has_nsfw_concept) if has_nsfw_concept is not None else None,
            "seconds_per_step": seconds_per_step,
            "model_evaluations": model_evaluations,
            "failures": failures,
        }

    def _batch_image_size(self, batch: dict[str, Any]) -> tuple[int, int]:
        """``(height, width)`` of the batch's images: :meth:`image_size`, or that of its init images."""
        sources = batch.get("init_image") or [None]
        if sources[0] is None:
            return self.image_size()
        sizes = {self.init_size(self._data().init_images[source]) for source in sources}
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

        Without init images, or at ``strength`` 1, the pipeline's ``prepare_latents``: pure noise of ``size``.
        Otherwise the img2img pipeline's ``get_timesteps`` and ``prepare_latents``: the image, resized to ``size``
        (:meth:`init_size`), is encoded by the VAE (a sample of its latent distribution, drawn with the item's
        generator), scaled, and noised to the first timestep left, by ``add_noise`` (``scale_noise`` for flow
        matching). Where no timestep is left (``int(steps * strength) == 0``, which diffusers does not allow) the
        clean latents are returned, so the output is the image's VAE round trip.
        """
        family, device = self._family(), self.device
        batch_size = len(batch["seed"])
        sources = batch.get("init_image") or [None] * batch_size
        if sources[0] is None or self.strength == 1.0:
            return family.initial_noise(batch_size, size, dtype, device, generators), timesteps

        # get_timesteps: the last steps the strength leaves (times the solver's order) are run.
        scheduler = self._pipe().scheduler
        t_start = family.img2img_start(self.num_inference_steps, self.strength)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)

        # prepare_latents with an image, one generator per item
        height, width = size
        images = [self._data().init_images[source] for source in sources]
        resized = torch.cat([TF.resize(image, [height, width], antialias=True).clamp(0, 1) for image in images])
        pixels = self._pipe().image_processor.preprocess(resized, height=height, width=width)
        pixels = pixels.to(device=device, dtype=self.vae.dtype)
        encoded = torch.cat(
            [retrieve_latents(self.vae.encode(pixels[i : i + 1]), generator=generators[i]) for i in range(batch_size)]
        )
        init_latents = model_latents(self.vae, encoded).to(dtype)
        if len(timesteps) == 0:
            return family.packed(init_latents), timesteps
        noise = randn_tensor(init_latents.shape, generator=generators, device=device, dtype=dtype)
        noisy = family.add_noise(scheduler, init_latents, noise, timesteps[:1].repeat(batch_size))
        return family.packed(noisy), timesteps

    def _noise_failure(self, step_index: int, do_cfg: bool) -> tuple[str, str]:
        if do_cfg:
            return "model.cfg_scale", f"step {step_index}: the noise prediction with classifier-free guidance"
        return "model.model", f"step {step_index}: the model's prediction"
