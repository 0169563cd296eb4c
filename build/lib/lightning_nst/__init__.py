"""lightning_nst: neural style on PyTorch Lightning."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from lightning_nst.api import stylize, texture
from lightning_nst.data import ImageTargets
from lightning_nst.errors import NSTError
from lightning_nst.losses import ContentLoss, LayerStyleLoss, StyleLoss, gram_matrix, mean_std, total_variation
from lightning_nst.metrics import StyleDistance
from lightning_nst.optimize import ImageOptimization, Objective
from lightning_nst.vgg import CONV_LAYERS, LAYER_NAMES, VGG19Features, VGGConfig
from lightning_nst.writers import ImageWriter

# Imported on first use: diffusers and transformers add seconds to every start-up, and `fit` never needs them.
_LAZY = {
    "GuidedDiffusion": "lightning_nst.diffusion",
    "StyleGuidance": "lightning_nst.guidance",
    "PromptGrid": "lightning_nst.prompts",
    "DenoisingCallback": "lightning_nst.diffusion",
    "GenerationWriter": "lightning_nst.writers",
    "TrajectoryLogger": "lightning_nst.callbacks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_nst' has no attribute {name!r}")


__all__ = [
    "CONV_LAYERS",
    "LAYER_NAMES",
    "ContentLoss",
    "DenoisingCallback",
    "GenerationWriter",
    "GuidedDiffusion",
    "ImageOptimization",
    "ImageTargets",
    "ImageWriter",
    "LayerStyleLoss",
    "NSTError",
    "Objective",
    "PromptGrid",
    "StyleDistance",
    "StyleGuidance",
    "StyleLoss",
    "TrajectoryLogger",
    "VGG19Features",
    "VGGConfig",
    "gram_matrix",
    "mean_std",
    "stylize",
    "texture",
    "total_variation",
]
__version__ = "0.1.0"
