"""What an objective is: the :class:`Objective` config, its checks, its loss weights, how its colour mode sees images.

An objective names the VGG layers whose features (content) or feature statistics (style) one image must match and
how strongly (:class:`Objective`); :class:`LossWeights` turns a run's objectives into one weight per objective for
each target, keyed by the target's layer, statistic and colour variant (:func:`loss_key`). The colour modes decide
which images the targets are computed from (:func:`variant_images`), what VGG sees of the optimised image
(:func:`vgg_input`) and what is saved (:func:`render`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor

from lightning_nst.core.color import (
    COLOR_MODES,
    ColorMode,
    combine_luminance,
    gray,
    luminance,
    match_color,
    match_luminance,
)
from lightning_nst.core.errors import NSTError
from lightning_nst.core.losses import STATISTICS, Statistic
from lightning_nst.core.vgg import check_weight, layer_weights
from lightning_nst.outputs import GRID

__all__ = ["LossWeights", "Objective", "check_objectives", "loss_key", "render", "variant_images", "vgg_input"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Objective:
    """One image to optimise: which feature statistics it matches and how strongly.

    Layer lists weigh each layer ``1 / len(layers)``; a mapping ``{layer: weight}`` sets the weights explicitly.
    Losses are defined in :mod:`lightning_nst.core.losses`.

    Attributes:
        name: File-name-safe label used for the output PNG and the TensorBoard curves.
        content_layers: Layers whose features must match the content image (feature inversion, style transfer).
        content_weight: Weight of the content term.
        style_layers: Layers whose style statistic must match the style image(s).
        style_weight: Weight of the style term.
        statistic: ``"gram"`` (Gatys et al.), ``"meanvar"`` (per-channel mean and std, as in AdaIN), ``"w2"``
            (Gaussian Wasserstein-2) or ``"sliced_w"`` (sliced Wasserstein) (:class:`~lightning_nst.StyleLoss`).
        tv_weight: Weight of the total-variation smoothness term.
        color: ``"keep"`` (the style's colours), ``"luminance"`` (the objective is computed on luminance images,
            the style's luminance first matched to the content's mean and std, and the result is the optimised
            luminance with the content's chroma), ``"match"`` (the style images' colours are first matched to the
            content's mean and covariance, see :func:`lightning_nst.core.color.match_color`) or ``"histogram"`` (the
            result's channel histograms are matched to the content's after optimisation). All but ``"keep"`` need
            ``data.content``.
    """

    name: str
    content_layers: list[str] | dict[str, float] = field(default_factory=list)
    content_weight: float = 1.0
    style_layers: list[str] | dict[str, float] = field(default_factory=list)
    style_weight: float = 1.0
    statistic: Statistic = "gram"
    tv_weight: float = 0.0
    color: ColorMode = "keep"


# The images targets are computed from, per colour mode: keys of the loss modules beside statistic and layer.
STYLE_VARIANT = {"keep": "rgb", "histogram": "rgb", "luminance": "luminance", "match": "match"}
CONTENT_VARIANT = {"keep": "rgb", "histogram": "rgb", "luminance": "luminance", "match": "rgb"}


def loss_key(*parts: str) -> str:
    """ModuleDict key of a target: ``"rgb"`` variants keep the names checkpoints and metrics have always used."""
    return "_".join(part for part in parts if part != "rgb")


def check_objectives(objectives: list[Objective]) -> None:
    """Refuse, naming ``model.objectives[i]``'s key, an objective list that cannot be optimised or written."""
    if not objectives:
        raise NSTError("model.objectives: give at least one objective")
    names: set[str] = set()
    for index, objective in enumerate(objectives):
        key = f"model.objectives[{index}]"
        if not _NAME.match(objective.name):
            raise NSTError(f"{key}.name: {objective.name!r} must be 1-64 letters, digits, '_', '-' or '.'")
        # Names are compared as a case-insensitive file system (macOS, Windows) compares the files they name.
        if objective.name.casefold() in names:
            raise NSTError(f"{key}.name: {objective.name!r} is used twice (file names ignore case on some systems)")
        names.add(objective.name.casefold())
        reserved = _reserved(objective.name)
        if reserved:
            raise NSTError(f"{key}.name: {objective.name!r} would write {reserved}, a file the run writes itself")
        if not objective.content_layers and not objective.style_layers:
            raise NSTError(f"{key}: give content_layers, style_layers or both")
        if objective.statistic not in STATISTICS:
            raise NSTError(f"{key}.statistic: must be one of {', '.join(STATISTICS)}, got {objective.statistic!r}")
        if objective.color not in COLOR_MODES:
            raise NSTError(f"{key}.color: must be one of {', '.join(COLOR_MODES)}, got {objective.color!r}")
        for term in ("content_weight", "style_weight", "tv_weight"):
            check_weight(getattr(objective, term), f"{key}.{term}")


def _reserved(name: str) -> str | None:
    """The file of a run that an objective named ``name`` would write over (its PNG or its interrupted image)."""
    folded = name.casefold()
    if folded == GRID.casefold().removesuffix(".png"):
        return GRID
    for suffix, kind in ((".interrupted", "interrupted"), (".last_good", "last good")):
        if folded.endswith(suffix):
            return f"the {kind} image of objective {name[: -len(suffix)]!r}"
    return None


@dataclass
class LossWeights:
    """Each target's weight per objective (0 where an objective does not use it), and the layers they need.

    Attributes:
        content: ``{(layer, variant): [weight per objective]}``.
        style: ``{(statistic, layer, variant): [weight per objective]}``.
        tv: Each objective's total-variation weight.
        layers: Every layer a target uses, sorted by name.
    """

    content: dict[tuple[str, str], list[float]]
    style: dict[tuple[Statistic, str, str], list[float]]
    tv: list[float]
    layers: list[str]

    @classmethod
    def of(cls, objectives: list[Objective]) -> LossWeights:
        """The weights of ``objectives``; raises naming the key of a bad layer or weight."""
        content: dict[tuple[str, str], list[float]] = {}
        style: dict[tuple[Statistic, str, str], list[float]] = {}
        for index, objective in enumerate(objectives):
            key = f"model.objectives[{index}]"
            content_variant, style_variant = CONTENT_VARIANT[objective.color], STYLE_VARIANT[objective.color]
            for layer, weight in layer_weights(objective.content_layers, f"{key}.content_layers").items():
                slot = content.setdefault((layer, content_variant), [0.0] * len(objectives))
                slot[index] = objective.content_weight * weight
            for layer, weight in layer_weights(objective.style_layers, f"{key}.style_layers").items():
                target = (objective.statistic, layer, style_variant)
                style.setdefault(target, [0.0] * len(objectives))[index] = objective.style_weight * weight
        layers = sorted({*(layer for layer, _ in content), *(target[1] for target in style)})
        return cls(content, style, [objective.tv_weight for objective in objectives], layers)

    def layers_of(self, index: int) -> list[str]:
        """The layers objective ``index`` uses: its VGG pass stops at the deepest."""
        layers = [layer for (layer, _), weights in self.content.items() if weights[index] > 0]
        return layers + [layer for (_, layer, _), weights in self.style.items() if weights[index] > 0]


def render(objective: Objective, image: Tensor, content: Tensor | None) -> Tensor:
    """The colour image ``objective`` makes of a decoded ``(B, 3, H, W)`` image: what is saved and shown.

    With ``color: luminance`` it is the image's luminance with the content's chroma; otherwise the image itself.
    """
    if objective.color == "luminance" and content is not None:
        return combine_luminance(luminance(image), content.to(image.device))
    return image


def vgg_input(objective: Objective, image: Tensor) -> Tensor:
    """What VGG sees of ``objective``'s colour image: its luminance as grey RGB for ``color: luminance``."""
    return gray(luminance(image)) if objective.color == "luminance" else image


def variant_images(images: list[Tensor], content: Tensor | None, variant: str, role: str) -> list[Tensor]:
    """Target images (content for ``role="content"``, else style) as a colour variant sees them.

    ``"rgb"``: as loaded; ``"luminance"``: luminance as grey RGB, a style's first matched to the content's mean and
    std; ``"match"``: style images with the content's colour mean and covariance (clamped to ``[0, 1]``).
    """
    if variant == "luminance":
        if role == "content" or content is None:
            return [gray(luminance(image)) for image in images]
        return [gray(match_luminance(luminance(image), luminance(content))) for image in images]
    if variant == "match" and content is not None:
        return [match_color(image, content).clamp(0, 1) for image in images]
    return images
