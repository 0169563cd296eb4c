"""Names of diffusers models, samplers and model families, kept apart from the modules that load them.

Importing :mod:`lightning_nst.diffusion.module` imports diffusers and transformers (about a second); the report, the
``generate`` shortcut and the CLI's help only need the names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_nst.core.errors import NSTError
from lightning_nst.diffusion.samplers import SAMPLERS

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The Stable Diffusion pipeline used when none is given: Stable Diffusion 1.5, as in the shipped configs."""

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    alias: (row.class_name, dict(row.settings)) for alias, row in SAMPLERS.items()
}
"""``model.scheduler`` aliases: the diffusers class and the settings that make it the named sampler, from the sampler
table (:data:`~lightning_nst.diffusion.samplers.SAMPLERS`, which also says which family each samples). Besides these,
``pipeline`` keeps the pipeline's own scheduler and a diffusers class name (``EulerDiscreteScheduler``) names one."""

# model_index.json's `_class_name` -> family. The img2img classes hold the same components as the text-to-image ones,
# so their folders load with the text-to-image class.
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
}


def family_of_class(class_name: str, source: str, key: str = "model.model") -> str:
    """The family of a pipeline class named in ``model_index.json``; a one-line error for any other class."""
    family = PIPELINE_FAMILIES.get(class_name)
    if family is None:
        raise NSTError(
            f"{key}: {source} is a {class_name} (model_index.json); the guided sampler runs StableDiffusionPipeline "
            "(SD 1.x/2.x), StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline folders"
        )
    return family


def local_family(source: str, key: str = "model.model") -> str | None:
    """The family of a local pipeline folder from its ``model_index.json``, without loading anything.

    ``None`` for a Hub id or a folder without ``model_index.json`` (loading reports those, naming ``key``).
    """
    index = Path(source).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise NSTError(f"{key}: {index} is not a readable model_index.json: {error}") from error
    if not isinstance(class_name, str):
        raise NSTError(f"{key}: {index} names no pipeline class (_class_name)")
    return family_of_class(class_name, source, key)


FAMILY_CONFIGS: dict[str, str] = {
    "sd": "guided_diffusion",
    "sdxl": "guided_sdxl",
    "sd3": "guided_sd3",
    "flux": "guided_flux",
}
"""The shipped config of each family, at its native size, steps and sampler."""
