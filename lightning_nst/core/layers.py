"""The VGG19 layer table: every layer's name, output channels and stride, without importing torch.

:mod:`lightning_nst.core.vgg` builds the network from it; the command line lists it (``lightning-nst layers``) and
checks layer names against it before a run imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from lightning_nst.core.errors import NSTError

VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip
"""``torchvision.models.vgg.cfgs["E"]``: the output channels of each convolution, ``"M"`` for a max pool."""


def _layer_names() -> tuple[str, ...]:
    names: list[str] = []
    block, index = 1, 0
    for entry in VGG19_CONFIG:
        if entry == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 0
        else:
            index += 1
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
    return tuple(names)


LAYER_NAMES: tuple[str, ...] = _layer_names()
"""All 37 modules of ``torchvision.models.vgg19().features``, in order: ``conv1_1``, ``relu1_1``, ..., ``pool5``."""

CONV_LAYERS: tuple[str, ...] = tuple(name for name in LAYER_NAMES if name.startswith("conv"))
"""The 16 convolutions; the study numbers them 1 to 16 in this order."""


def layer_index(name: str) -> int:
    """Index of a named layer in ``vgg19().features``."""
    return LAYER_NAMES.index(name)


SHALLOW_LAYERS: tuple[str, ...] = LAYER_NAMES[: LAYER_NAMES.index("relu1_2") + 1]
"""conv1_1..relu1_2: the layers an image is reconstructed from almost exactly (:func:`shallow_reconstruction`)."""


def objective_field(objective: Any, key: str) -> Any:
    """``objective.key`` of an :class:`~lightning_nst.Objective` or of its config; ``None`` where it is not set.

    The command line holds the objectives as jsonargparse namespaces before it builds them, the API as mappings.
    """
    getter = getattr(objective, "get", None)
    return getter(key, None) if callable(getter) else getattr(objective, key, None)


def shallow_reconstruction(objective: Any) -> bool:
    """Whether an objective reconstructs block-1 layers only: content terms of :data:`SHALLOW_LAYERS`, nothing else.

    ``objective`` is an :class:`~lightning_nst.Objective` or its config (a mapping or a jsonargparse namespace). Such
    objectives are matched almost exactly from an image inside ``[0, 1]``: they are the ones whose default L-BFGS is
    guarded (:mod:`lightning_nst.nst.safeguard`) and whose default precision is float32
    (:mod:`lightning_nst.cli.precision`).
    """
    layers = list(objective_field(objective, "content_layers") or [])
    plain = not objective_field(objective, "style_layers") and not objective_field(objective, "tv_weight")
    return bool(layers) and plain and all(layer in SHALLOW_LAYERS for layer in layers)


DEFAULT_STYLE_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
"""The style layers of Gatys et al. (2016): the first ReLU of each block."""


def check_layers(layers: Iterable[str], key: str = "layers") -> list[str]:
    """Return the layer names unchanged, or raise naming the first unknown one and its nearest valid names."""
    layers = list(layers)
    for name in layers:
        if name not in LAYER_NAMES:
            close = difflib.get_close_matches(str(name), LAYER_NAMES, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise NSTError(f"{key}: unknown VGG19 layer {name!r}{hint}; `lightning-nst layers` lists all 37 names")
    return layers


def _layer_geometry() -> tuple[tuple[int, int], ...]:
    channels, stride, widths = 3, 1, iter(entry for entry in VGG19_CONFIG if entry != "M")
    geometry = []
    for name in LAYER_NAMES:
        if name.startswith("conv"):
            channels = int(next(widths))
        elif name.startswith("pool"):
            stride *= 2
        geometry.append((channels, stride))
    return tuple(geometry)


LAYER_GEOMETRY: tuple[tuple[int, int], ...] = _layer_geometry()
"""``(channels, stride)`` of each layer's output, in the order of :data:`LAYER_NAMES`."""


def min_input_size(layers: Iterable[str]) -> int:
    """Smallest image side for which every layer in ``layers`` still has at least one pixel."""
    deepest = max(layer_index(name) for name in layers)
    pools = sum(1 for name in LAYER_NAMES[:deepest] if name.startswith("pool"))
    return 2**pools
