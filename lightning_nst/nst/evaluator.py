"""The evaluation of a run's objectives: targets, loss terms and metrics, over whole images or tile by tile.

Which one is chosen once, from ``model.tile_size`` (:func:`make_evaluator`): an :class:`Evaluator` passes whole
images through VGG; a :class:`TiledEvaluator` goes tile by tile (:mod:`lightning_nst.nst.tiling`) wherever an image
exceeds the tile size, so memory follows the tile size, and whole elsewhere (a coarse scale, a small style image).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from lightning_nst.core.errors import NSTError
from lightning_nst.core.losses import ContentLoss, Statistic, StyleLoss, total_variation
from lightning_nst.core.metrics import StyleDistance
from lightning_nst.core.vgg import VGG19Features, layer_index, layer_weights
from lightning_nst.nst.objective import STYLE_VARIANT, LossWeights, Objective, loss_key, vgg_input
from lightning_nst.nst.tiling import Tile, TilePlan, exact_margin, tiled_features, tiled_style_moments, tiled_terms

__all__ = ["Evaluator", "TiledEvaluator", "make_evaluator", "style_term"]

Terms = dict[str, Tensor]
TargetImages = Callable[[str, str], list[Tensor]]
"""``(role, variant) -> images``: the content (``role="content"``) or style images as a colour variant sees them."""


def style_term(loss: StyleLoss | nn.ModuleList, features: Tensor) -> Tensor:
    """A layer's style loss ``(B,)``: the blended target's, or the sum of the regions' masked losses."""
    if isinstance(loss, nn.ModuleList):
        return torch.stack([region(features) for region in loss]).sum(dim=0)
    return loss(features)


class Evaluator:
    """Targets, loss terms and metrics of each objective, from whole images.

    The target losses live in the module's ``content_losses`` and ``style_losses`` (so they move with it to its
    device); the evaluator fills and reads them.

    Args:
        objectives: The run's objectives.
        weights: Their loss weights.
        trunk: Returns the VGG trunk, building it on first use.
        content_losses: The module's content targets by :func:`~lightning_nst.nst.objective.loss_key`.
        style_losses: The module's style targets by key.
        seed: ``model.init_seed``, from which a tiled evaluation draws its grid offsets.
    """

    plan: TilePlan | None = None

    def __init__(
        self,
        objectives: list[Objective],
        weights: LossWeights,
        trunk: Callable[[], VGG19Features],
        content_losses: nn.ModuleDict,
        style_losses: nn.ModuleDict,
        seed: int,
    ) -> None:
        self.objectives, self.weights, self.trunk = objectives, weights, trunk
        self.content_losses, self.style_losses, self.seed = content_losses, style_losses, seed

    def tiles(self, image: Tensor) -> bool:
        """Whether ``image`` is evaluated tile by tile."""
        return False

    def check_masks(self, masks: list[Tensor] | None) -> None:
        """Refuse ``data.masks`` where this evaluation cannot weigh positions by them."""

    # -- targets ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def compute_targets(
        self,
        images: TargetImages,
        has_content: bool,
        masks: list[Tensor] | None,
        style_masks: list[Tensor | None] | None,
        blend_weights: list[float] | None,
    ) -> None:
        """Content and style targets from the current content and style images (at the current scale).

        One VGG pass per colour variant of the images, up to the layers that variant's targets use.
        """
        if has_content and self.weights.content:
            for variant in {variant for _, variant in self.weights.content}:
                layers = [layer for layer, v in self.weights.content if v == variant]
                features = self._features(images("content", variant)[0], layers)
                for layer in layers:
                    self.content_losses[loss_key(layer, variant)] = ContentLoss(features[layer])
        for variant in {variant for _, _, variant in self.weights.style}:
            keys = [(statistic, layer) for statistic, layer, v in self.weights.style if v == variant]
            styles = images("style", variant)
            if self._style_targets_tiled(styles, keys, variant, masks, style_masks, blend_weights):
                continue
            layers = sorted({layer for _, layer in keys}, key=layer_index)
            features = [self.trunk()(image, layers) for image in styles]
            for statistic, layer in keys:
                target = [image_features[layer] for image_features in features]
                loss = _style_loss(target, statistic, masks, style_masks, blend_weights)
                self.style_losses[loss_key(statistic, layer, variant)] = loss

    def _features(self, image: Tensor, layers: list[str]) -> dict[str, Tensor]:
        """``layers``' features of a target image."""
        return self.trunk()(image, layers)

    def _style_targets_tiled(
        self,
        images: list[Tensor],
        keys: list[tuple[Statistic, str]],
        variant: str,
        masks: list[Tensor] | None,
        style_masks: list[Tensor | None] | None,
        blend_weights: list[float] | None,
    ) -> bool:
        """Set the style targets of ``keys`` tile by tile and return ``True``, or return ``False``: not tiled."""
        return False

    def generators(self) -> dict[str, torch.Generator]:
        """The style targets' own random generators by module name (sliced_w's projections)."""
        return {
            name: module.generator
            for name, module in self.style_losses.named_modules()
            if isinstance(getattr(module, "generator", None), torch.Generator)
        }

    def restore_generators(self, states: dict[str, Tensor]) -> None:
        """Set the generators to a checkpoint's ``states``: a resume draws the projections the run would have."""
        for name, generator in self.generators().items():
            if name in states:
                generator.set_state(states[name])

    # -- loss ---------------------------------------------------------------------------------------------------

    def loss(self, index: int, image: Tensor, step: int) -> Terms:
        """Weighted loss terms and their ``total`` for objective ``index`` at one image ``(1, 3, H, W)``.

        Keys are ``content_<layer>``, ``style_<statistic>_<layer>``, ``tv`` (the terms the objective uses) and
        ``total``. The VGG pass stops at the objective's deepest layer, so the value does not depend on the other
        objectives of the run.
        """
        weights = self.weights
        features = self.trunk()(vgg_input(self.objectives[index], image), weights.layers_of(index))
        terms: Terms = {}
        for (layer, variant), each in weights.content.items():
            key = loss_key(layer, variant)
            if each[index] > 0 and key in self.content_losses:
                terms[f"content_{layer}"] = each[index] * self.content_losses[key](features[layer])[0]
        for (statistic, layer, variant), each in weights.style.items():
            if each[index] > 0:
                loss = style_term(self.style_losses[loss_key(statistic, layer, variant)], features[layer])[0]
                terms[f"style_{statistic}_{layer}"] = each[index] * loss
        if weights.tv[index] > 0:
            terms["tv"] = weights.tv[index] * total_variation(image)[0]
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    def step_loss(self, index: int, image: Tensor, step: int) -> tuple[Terms, Tensor]:
        """The terms of an optimizer step's evaluation and the tensor whose backward gives the image's gradient."""
        terms = self.loss(index, image, step)
        return terms, terms["total"]

    # -- metrics ------------------------------------------------------------------------------------------------

    def metrics(self, index: int, image: Tensor, content: Tensor | None, masked: bool) -> dict[str, float]:
        """PSNR and SSIM against the content image, and the style distance, of objective ``index``'s ``image``.

        The style distance reuses the style targets.
        """
        objective = self.objectives[index]
        metrics: dict[str, float] = {}
        if objective.content_layers and content is not None:
            target = content.to(image.device)
            metrics["psnr"] = peak_signal_noise_ratio(image, target, data_range=1.0).item()
            metrics["ssim"] = self.ssim(image, target)
        if objective.style_layers:
            layers = layer_weights(objective.style_layers, "style_layers")
            variant = STYLE_VARIANT[objective.color]
            targets = {layer: self.style_losses[loss_key(objective.statistic, layer, variant)] for layer in layers}
            value = self._style_distance(vgg_input(objective, image), objective.statistic, layers, targets, masked)
            metrics[f"style_distance_{objective.statistic}"] = value
        return metrics

    def ssim(self, image: Tensor, target: Tensor) -> float:
        """Torchmetrics' SSIM of ``image`` against ``target``."""
        return structural_similarity_index_measure(image, target, data_range=1.0).item()

    def _style_distance(
        self, seen: Tensor, statistic: Statistic, layers: dict[str, float], targets: dict[str, nn.Module], masked: bool
    ) -> float:
        if not masked:
            distance = StyleDistance(self.trunk(), targets, statistic, list(layers), layers)
            distance.update(seen)
            return distance.compute().item()
        # StyleDistance has one target per layer; masked regions have one each
        features = self.trunk()(seen, list(layers))
        terms = [w * style_term(targets[layer], features[layer])[0] for layer, w in layers.items()]
        return torch.stack(terms).sum().item()


def _style_loss(
    target: list[Tensor],
    statistic: Statistic,
    masks: list[Tensor] | None,
    style_masks: list[Tensor | None] | None,
    blend_weights: list[float] | None,
) -> StyleLoss | nn.ModuleList:
    """One blended target, or with masks one masked loss per region (summed by :func:`style_term`)."""
    if masks is None:
        return StyleLoss(target, statistic, weights=blend_weights, target_masks=style_masks)
    regions = nn.ModuleList()
    style_masks = style_masks or [None] * len(target)
    for index, (features, mask, style_mask) in enumerate(zip(target, masks, style_masks, strict=True)):
        try:
            regions.append(StyleLoss(features, statistic, target_masks=[style_mask], mask=mask.to(features.device)))
        except ValueError as error:  # the mask checks in losses.py; data.py refuses the known cases first
            key = "data.style_masks" if str(error).startswith("target_masks") else "data.masks"
            raise NSTError(f"{key}[{index}]: {error}") from None
    return regions


class TiledEvaluator(Evaluator):
    """An :class:`Evaluator` that goes tile by tile over the images larger than ``plan``'s tile size.

    Args:
        plan: The tiling (``model.tile_size``, ``model.tile_overlap``).
        *args: As :class:`Evaluator`.
    """

    def __init__(self, plan: TilePlan, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.plan = plan

    def tiles(self, image: Tensor) -> bool:  # noqa: D102
        return self.plan.applies(image)

    def check_masks(self, masks: list[Tensor] | None) -> None:  # noqa: D102
        if masks is not None:
            # A masked statistic weighs positions by a mask resized to each layer's whole grid, not a sum of tiles.
            raise NSTError("model.tile_size: tiling does not support data.masks; leave one of them out")

    def _features(self, image: Tensor, layers: list[str]) -> dict[str, Tensor]:
        """The content targets keep only the content layers' features at full size, assembled tile by tile.

        (relu4_2: 512 channels at 1/8 of each side, 2.7 times the image's floats.)
        """
        if not self.plan.applies(image):
            return super()._features(image, layers)
        return tiled_features(self.trunk(), image, layers, self.plan.tiles(*image.shape[-2:]))

    def _style_targets_tiled(
        self,
        images: list[Tensor],
        keys: list[tuple[Statistic, str]],
        variant: str,
        masks: list[Tensor] | None,
        style_masks: list[Tensor | None] | None,
        blend_weights: list[float] | None,
    ) -> bool:
        """Keep only each layer's statistic, accumulated from tile sums (:func:`tiled_style_moments`).

        Where tiling applies to a style image and there are no masks; a small image of a blend is one tile.
        """
        unmasked = masks is None and not any(mask is not None for mask in style_masks or [])
        if not unmasked or not any(self.plan.applies(image) for image in images):
            return False
        moments = []
        for image in images:
            height, width = image.shape[-2:]
            whole = [Tile(0, height, 0, width, 0, height, 0, width, height, width)]
            tiles = self.plan.tiles(height, width) if self.plan.applies(image) else whole
            moments.append(tiled_style_moments(self.trunk(), image, keys, tiles))
        for statistic, layer in keys:
            target = [image_moments[statistic, layer] for image_moments in moments]
            loss = StyleLoss.from_moments(target, statistic, weights=blend_weights)
            self.style_losses[loss_key(statistic, layer, variant)] = loss
        return True

    def loss(self, index: int, image: Tensor, step: int) -> Terms:
        """:meth:`Evaluator.loss`; without autograd and over an image larger than a tile, computed tile by tile."""
        if not torch.is_grad_enabled() and self.plan.applies(image):
            return self._tiled(index, image, step, backward=False)[0]
        return super().loss(index, image, step)

    def step_loss(self, index: int, image: Tensor, step: int) -> tuple[Terms, Tensor]:
        """Tile by tile over a large image: detached terms and a surrogate whose gradient is the terms' gradient."""
        if not self.plan.applies(image):
            return super().step_loss(index, image, step)
        terms, surrogate = self._tiled(index, image, step, backward=True)
        assert surrogate is not None
        return terms, surrogate

    def _tiled(self, index: int, image: Tensor, step: int, backward: bool) -> tuple[Terms, Tensor | None]:
        """:meth:`loss`'s terms (detached), computed tile by tile, and with ``backward`` their surrogate.

        The surrogate's gradient is the terms' gradient: the image gradient of the VGG terms, pulled through
        render/decode. The grid offset is drawn from ``init_seed`` and the global step, so a resumed run draws the
        same offsets.
        """
        objective, weights = self.objectives[index], self.weights
        seen = vgg_input(objective, image)
        content = {
            layer: (each[index], self.content_losses[loss_key(layer, variant)])
            for (layer, variant), each in weights.content.items()
            if each[index] > 0 and loss_key(layer, variant) in self.content_losses
        }
        style = {
            layer: (each[index], self.style_losses[loss_key(statistic, layer, variant)])
            for (statistic, layer, variant), each in weights.style.items()
            if each[index] > 0
        }
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        tiles = self.plan.tiles(*seen.shape[-2:], self.plan.random_offset(generator))
        values, grad = tiled_terms(self.trunk(), seen, content, style, tiles, gradient=backward)
        terms = {f"content_{layer}": value for layer, value in values["content"].items()}
        terms.update({f"style_{objective.statistic}_{layer}": value for layer, value in values["style"].items()})
        surrogate = None if grad is None else (seen * grad).sum()
        if weights.tv[index] > 0:
            tv = weights.tv[index] * total_variation(image)[0]
            terms["tv"] = tv.detach()
            surrogate = None if surrogate is None else surrogate + tv
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms, surrogate

    def ssim(self, image: Tensor, target: Tensor) -> float:
        """Torchmetrics' SSIM, over bands of rows about a tile in area when tiling applies to the image.

        Its maps take 2.9 GB at 2048 px (11.7 at 4096). It is the mean of a map of local SSIMs, each from an 11 px
        Gaussian window over the reflect-padded image, so a band of rows grown by ``pad = 5`` px on each side (the
        image's own rows, or its reflection at the image's border, as in the whole pass) gives the map's rows of
        its core exactly; their sum over the bands divided by the map's size is the whole image's SSIM.
        """
        if not self.plan.applies(image):
            return super().ssim(image, target)
        pad, height = 5, image.shape[-2]
        rows = max(16, self.plan.tile_size**2 // image.shape[-1])
        total = 0.0
        for r0 in range(0, height, rows):
            r1 = min(r0 + rows, height)
            top, bottom = max(0, r0 - pad), min(height, r1 + pad)
            _, local = structural_similarity_index_measure(
                image[..., top:bottom, :], target[..., top:bottom, :], data_range=1.0, return_full_image=True
            )
            total += local[..., r0 - top : r1 - top, :].double().sum().item()
        return total / image[0].numel()

    def _style_distance(
        self, seen: Tensor, statistic: Statistic, layers: dict[str, float], targets: dict[str, nn.Module], masked: bool
    ) -> float:
        if not self.plan.applies(seen):
            return super()._style_distance(seen, statistic, layers, targets, masked)
        style = {layer: (w, targets[layer]) for layer, w in layers.items()}
        values, _ = tiled_terms(self.trunk(), seen, {}, style, self.plan.tiles(*seen.shape[-2:]), gradient=False)
        return torch.stack(list(values["style"].values())).sum().item()


def make_evaluator(
    tile_size: int | None,
    tile_overlap: int,
    objectives: list[Objective],
    weights: LossWeights,
    trunk: Callable[[], VGG19Features],
    content_losses: nn.ModuleDict,
    style_losses: nn.ModuleDict,
    seed: int,
) -> Evaluator:
    """The evaluation ``model.tile_size`` and ``model.tile_overlap`` choose; raises naming the key they cannot take."""
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0:
        raise NSTError(f"model.tile_overlap: must be a whole number >= 0, got {tile_overlap!r}")
    args = (objectives, weights, trunk, content_losses, style_losses, seed)
    if tile_size is None:
        return Evaluator(*args)
    plan = TilePlan(tile_size, tile_overlap, tuple(sorted(weights.layers, key=layer_index)))
    for index, objective in enumerate(objectives):
        if objective.statistic == "sliced_w":
            # Sorted projections are not sums over positions, so tiles cannot be accumulated into them.
            raise NSTError(
                f"model.tile_size: tiling needs a style statistic that is a sum over positions (gram, meanvar, "
                f"w2); model.objectives[{index}].statistic is sliced_w"
            )
    if not plan.exact:
        # A warning, not a refusal: an overlap that fits the layers' reach may not fit the memory a user has (each
        # tile grows by it), and the moving grid still hides the seams; but the loss is then not the untiled one,
        # by a large factor, so it must not pass as an info line.
        deepest = plan.layers[-1]
        rank_zero_warn(
            f"model.tile_overlap: {tile_overlap} px is below {2 * exact_margin(plan.layers)} px, twice the reach of "
            f"{deepest} ({exact_margin(plan.layers)} px each side), so tile borders see zero padding instead of "
            f"their neighbours and the loss and gradient are not the untiled ones (8 px with relu1_1..relu3_1, "
            "random weights: Gram loss 2.1 times, gradient 49 % off); the grid moves every step so no seam stays put",
            category=UserWarning,
        )
    return TiledEvaluator(plan, *args)
