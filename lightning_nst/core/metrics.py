"""Metrics with one definition shared by every comparison: style distance on VGG19 features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_nst.core.losses import LayerStyleLoss, Statistic, StyleLoss
from lightning_nst.core.vgg import VGG19Features


class StyleDistance(Metric):
    r"""Mean style loss of images against fixed style images.

    .. math::

        \operatorname{StyleDistance} = \frac1n \sum_{i=1}^{n} \sum_l w_l \, \mathcal{L}_l(x_i, s)

    over the :math:`n` images :math:`x_i` passed to :meth:`update` so far, where :math:`\mathcal{L}_l` is the
    per-layer :class:`~lightning_nst.core.losses.StyleLoss` (Gram, mean/std, W2 or sliced W) of the VGG19 features at
    layer :math:`l`, the style target :math:`s` blends the style images (equal weights by default), and
    :math:`w_l = 1 / L` for :math:`L`
    layers unless ``layer_weights`` says otherwise. No ``style_weight`` multiplies it; values are accumulated in
    float64. The same :class:`~lightning_nst.LayerStyleLoss` drives optimisation and guidance, so numbers from
    NST, guided diffusion and prompt-only runs are comparable when they use the same VGG weights, statistic and
    layers.

    Args:
        features: A VGG19 trunk that returns at least ``layers``.
        style_images: ``(1, 3, H, W)`` images in ``[0, 1]``; several are blended (see ``weights``). Or
            ``{layer: StyleLoss}`` whose targets are already computed from them (e.g. an optimisation's), which
            are then reused rather than computed again.
        statistic: One of :data:`~lightning_nst.core.losses.STATISTICS`.
        layers: Layers of the style loss; all of ``features.layers`` by default.
        layer_weights: ``{layer: w_l}``; equal weights summing to one by default.
        weights: Blend weights of ``style_images`` (see :class:`~lightning_nst.StyleLoss`); equal by default.
        seed: Seed of ``"sliced_w"``'s random projections, redrawn at every :meth:`update`, so its values vary
            slightly between calls; unused by the other statistics.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        features: VGG19Features,
        style_images: Sequence[Tensor] | Mapping[str, StyleLoss],
        statistic: Statistic = "gram",
        layers: Sequence[str] | None = None,
        layer_weights: Mapping[str, float] | None = None,
        weights: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        layers = list(layers or features.layers)
        self.features = features
        targets: dict[str, Sequence[Tensor] | StyleLoss]
        if isinstance(style_images, Mapping):
            targets = {layer: style_images[layer] for layer in layers}
        else:
            with torch.no_grad():
                computed = [features(image.to(features.mean.device)) for image in style_images]
            targets = {layer: [target[layer] for target in computed] for layer in layers}
        self.style_loss = LayerStyleLoss(targets, statistic, layer_weights, weights, seed=seed)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor) -> None:
        """Add ``(B, 3, H, W)`` images in ``[0, 1]``."""
        values = self.style_loss(self.features(images))
        self.total += values.detach().double().sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        """Mean style loss over all images seen."""
        return (self.total / self.count).float()
