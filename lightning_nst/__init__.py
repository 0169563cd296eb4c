"""lightning_nst: neural style on PyTorch Lightning.

Two wings over a core: :mod:`lightning_nst.nst` (image optimisation) and :mod:`lightning_nst.diffusion` (style-guided
sampling) stand on :mod:`lightning_nst.core`; :mod:`lightning_nst.cli` drives both. The names below are the public
API and the ``class_path`` names of the shipped configs, so a config never depends on where a class lives.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each name is imported on first use: `import lightning_nst` itself imports neither torch nor Lightning, so the
# command line's help and listings answer at once, and `fit` never imports diffusers or transformers.
_PUBLIC = {
    "stylize": "lightning_nst.api",
    "texture": "lightning_nst.api",
    "NSTError": "lightning_nst.core.errors",
    "ContentLoss": "lightning_nst.core.losses",
    "LayerStyleLoss": "lightning_nst.core.losses",
    "StyleLoss": "lightning_nst.core.losses",
    "gram_matrix": "lightning_nst.core.losses",
    "mean_std": "lightning_nst.core.losses",
    "total_variation": "lightning_nst.core.losses",
    "StyleDistance": "lightning_nst.core.metrics",
    "CONV_LAYERS": "lightning_nst.core.layers",
    "LAYER_NAMES": "lightning_nst.core.layers",
    "VGG19Features": "lightning_nst.core.vgg",
    "VGGConfig": "lightning_nst.core.vgg",
    "ImageTargets": "lightning_nst.nst.data",
    "ImageOptimization": "lightning_nst.nst.module",
    "Objective": "lightning_nst.nst.objective",
    "ImageWriter": "lightning_nst.nst.writer",
    "AdaINNet": "lightning_nst.nst.fast.networks",
    "TransformerNet": "lightning_nst.nst.fast.networks",
    "AdaINTraining": "lightning_nst.nst.fast.training",
    "FastStyleTraining": "lightning_nst.nst.fast.training",
    "ImageFolders": "lightning_nst.nst.fast.data",
    "FastNetwork": "lightning_nst.nst.fast.inference",
    "Stylizer": "lightning_nst.nst.fast.inference",
    "export_torchscript": "lightning_nst.nst.fast.inference",
    "load_network": "lightning_nst.nst.fast.inference",
    "stylize_folder": "lightning_nst.nst.fast.inference",
    "GuidedDiffusion": "lightning_nst.diffusion.module",
    "DenoisingCallback": "lightning_nst.diffusion.module",
    "StyleGuidance": "lightning_nst.diffusion.guidance",
    "PromptGrid": "lightning_nst.diffusion.prompts",
    "GenerationWriter": "lightning_nst.diffusion.writer",
    "TrajectoryLogger": "lightning_nst.diffusion.trajectory",
}

if TYPE_CHECKING:
    from lightning_nst.api import stylize, texture
    from lightning_nst.core.errors import NSTError
    from lightning_nst.core.layers import CONV_LAYERS, LAYER_NAMES
    from lightning_nst.core.losses import ContentLoss, LayerStyleLoss, StyleLoss, gram_matrix, mean_std, total_variation
    from lightning_nst.core.metrics import StyleDistance
    from lightning_nst.core.vgg import VGG19Features, VGGConfig
    from lightning_nst.diffusion.guidance import StyleGuidance
    from lightning_nst.diffusion.module import DenoisingCallback, GuidedDiffusion
    from lightning_nst.diffusion.prompts import PromptGrid
    from lightning_nst.diffusion.trajectory import TrajectoryLogger
    from lightning_nst.diffusion.writer import GenerationWriter
    from lightning_nst.nst.data import ImageTargets
    from lightning_nst.nst.fast.data import ImageFolders
    from lightning_nst.nst.fast.inference import FastNetwork, Stylizer, export_torchscript, load_network, stylize_folder
    from lightning_nst.nst.fast.networks import AdaINNet, TransformerNet
    from lightning_nst.nst.fast.training import AdaINTraining, FastStyleTraining
    from lightning_nst.nst.module import ImageOptimization
    from lightning_nst.nst.objective import Objective
    from lightning_nst.nst.writer import ImageWriter


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'lightning_nst' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "AdaINNet",
    "AdaINTraining",
    "CONV_LAYERS",
    "ContentLoss",
    "DenoisingCallback",
    "FastNetwork",
    "FastStyleTraining",
    "GenerationWriter",
    "GuidedDiffusion",
    "ImageFolders",
    "ImageOptimization",
    "ImageTargets",
    "ImageWriter",
    "LAYER_NAMES",
    "LayerStyleLoss",
    "NSTError",
    "Objective",
    "PromptGrid",
    "StyleDistance",
    "StyleGuidance",
    "StyleLoss",
    "Stylizer",
    "TrajectoryLogger",
    "TransformerNet",
    "VGG19Features",
    "VGGConfig",
    "export_torchscript",
    "gram_matrix",
    "load_network",
    "mean_std",
    "stylize",
    "stylize_folder",
    "texture",
    "total_variation",
]
