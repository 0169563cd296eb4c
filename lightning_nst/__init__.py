"""lightning_nst: neural style on PyTorch Lightning."""

from lightning_nst.data import ImageTargets
from lightning_nst.errors import NSTError
from lightning_nst.losses import ContentLoss, LayerStyleLoss, StyleLoss, gram_matrix, mean_std, total_variation
from lightning_nst.metrics import StyleDistance
from lightning_nst.optimize import ImageOptimization, Objective
from lightning_nst.vgg import CONV_LAYERS, LAYER_NAMES, VGG19Features, VGGConfig

__all__ = [
    "CONV_LAYERS",
    "LAYER_NAMES",
    "ContentLoss",
    "ImageOptimization",
    "ImageTargets",
    "LayerStyleLoss",
    "NSTError",
    "Objective",
    "StyleDistance",
    "StyleLoss",
    "VGG19Features",
    "VGGConfig",
    "gram_matrix",
    "mean_std",
    "total_variation",
]
__version__ = "0.1.0"
