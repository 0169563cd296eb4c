"""Loading a diffusers pipeline and its tiny decoder, and the checks that read a model folder's configs first."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from diffusers import AutoencoderTiny, DiffusionPipeline
from diffusers.utils import deprecation_utils

from lightning_nst.core.errors import NSTError
from lightning_nst.core.net import unreachable
from lightning_nst.diffusion.catalog import family_of_class, local_family
from lightning_nst.diffusion.families import FAMILIES, Family, size_multiple
from lightning_nst.diffusion.samplers import check_family, check_prediction, check_steps, sampler, scheduler_class

# diffusers renamed from_pretrained's `torch_dtype` to `dtype`; the old name still works there but warns. Whether it
# has is told by the helper the new name brought (deprecation_utils._resolve_dtype, a private name: nothing public
# says which of the two names from_pretrained takes).
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


def model_family(source: str) -> str:
    """The family of the pipeline ``model.model`` names, from its ``model_index.json`` (fetched for a Hub id)."""
    family = local_family(source)
    if family is not None:
        return family
    config = _load(DiffusionPipeline, source, "model.model", "model_index.json", loader="load_config")
    return family_of_class(str(config.get("_class_name")), source)


def _local_json(config: Path) -> dict[str, Any] | None:
    """A local component's JSON config, without loading any weights (``None`` if not known)."""
    try:
        value = json.loads(config.expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a Hub id, or unreadable: reported, naming the key, on loading
        return None
    return value if isinstance(value, dict) else None


def _local_int(config: Path, key: str) -> int | None:
    value = (_local_json(config) or {}).get(key)
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


def check_model_folder(
    source: str,
    family: str | None,
    scheduler: str,
    steps: int,
    tiny_vae: str | None,
    height: int | None,
    width: int | None,
) -> None:
    """The checks of :func:`load_pipeline` that a local model folder's JSON configs allow before any weight loads.

    ``family`` is the model's (``None`` where not known: only the step count is checked); each check the configs cannot
    answer is left to loading.
    """
    model = Path(source)
    schedule = _local_json(model / "scheduler" / "scheduler_config.json")
    row = sampler(scheduler)
    if schedule is not None:
        check_steps(steps, schedule, source)
    if family is None:
        return
    if row is not None:
        check_family(family, row, scheduler, schedule)
    vae = _local_json(model / "vae" / "config.json") or {}
    if tiny_vae is not None:
        own = _local_int(Path(tiny_vae) / "config.json", "latent_channels")
        channels = vae.get("latent_channels")
        check_tiny_channels(tiny_vae, own, channels if isinstance(channels, int) else None, source)
    blocks = vae.get("block_out_channels")
    if isinstance(blocks, list):  # else checked once the pipeline has loaded
        patch = _local_int(model / "transformer" / "config.json", "patch_size") or 1
        check_size(family, size_multiple(family, 2 ** (len(blocks) - 1), patch), height, width)


def load_pipeline(
    source: str,
    family_name: str,
    scheduler: str,
    steps: int,
    dtype: torch.dtype,
    variant: str | None = None,
    safety_checker: bool = True,
) -> Any:
    """The family's pipeline of ``source`` with the sampler ``model.scheduler`` names, after every check of it.

    The pipeline's own scheduler (``pipeline``), or the one named built ``from_config`` of it, so betas, offsets and
    spacing stay the model's; refused unless it samples the family with the model's own schedule, its prediction
    type can be guided and it can take ``steps`` steps.
    """
    family = FAMILIES[family_name]
    extra: dict[str, Any] = (
        {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" and not safety_checker else {}
    )
    # from_pretrained's default (use_safetensors=None) loads .safetensors where present and falls back to .bin
    # files only without them, through torch.load(weights_only=True) in diffusers and transformers alike.
    pipe = _load(
        family.pipeline_class, source, "model.model", "model_index.json", variant=variant, **{_DTYPE_KWARG: dtype},
        **extra,
    )  # fmt: skip
    chosen = scheduler_class(scheduler)
    schedule = pipe.scheduler.config  # the model's own, which a scheduler built from it may not keep
    if chosen is not None:
        cls, settings = chosen
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **settings)
    row = check_prediction(pipe.scheduler)
    check_family(family.name, row, scheduler, schedule)
    check_steps(steps, pipe.scheduler.config, source, row)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_tiny_vae(source: str, dtype: torch.dtype, family: Family, model: str) -> Any:
    """The ``AutoencoderTiny`` of ``model.tiny_vae``; refused unless it decodes the latents of ``family``'s VAE."""
    tiny = _load(AutoencoderTiny, source, "model.tiny_vae", "config.json", **{_DTYPE_KWARG: dtype})
    check_tiny_channels(source, tiny.config.latent_channels, family.pipe.vae.config.latent_channels, model)
    return tiny
