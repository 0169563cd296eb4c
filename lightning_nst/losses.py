r"""Content, style and total-variation losses: pure torch, one value per batch element.

Every loss returns a tensor of shape ``(B,)`` so that several objectives optimised together as one batch keep
separate values. Style statistics are computed in float32 with autocast off, so bf16/fp16 runs stay finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import total_variation as _total_variation

Statistic = Literal["gram", "meanvar"]
STATISTICS: tuple[str, ...] = ("gram", "meanvar")


def _fp32(features: Tensor) -> Tensor:
    return features.float()


def gram_matrix(features: Tensor) -> Tensor:
    r"""Normalised Gram matrix :math:`G = F F^\top / (C H W)` of ``(B, C, H, W)`` features, shape ``(B, C, C)``.

    Note:
        Gatys et al. use the raw :math:`F F^\top`. Dividing by :math:`C H W`, as the PyTorch tutorial does, makes
        the value independent of image size and comparable across layers of different width.
    """
    with torch.autocast(features.device.type, enabled=False):
        flat = _fp32(features).flatten(2)
        return flat @ flat.transpose(1, 2) / flat.shape[1:].numel()


def mean_std(features: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Per-channel mean :math:`\mu` and standard deviation :math:`\sigma` of features, shape ``(B, 2, C)``.

    These are the statistics AdaIN (Huang and Belongie, 2017) matches; ``eps`` keeps :math:`\sigma` differentiable
    at zero.
    """
    with torch.autocast(features.device.type, enabled=False):
        flat = _fp32(features).flatten(2)
        mean = flat.mean(dim=2)
        std = (flat.var(dim=2, unbiased=False) + eps).sqrt()
        return torch.stack([mean, std], dim=1)


def style_statistic(features: Tensor, statistic: Statistic) -> Tensor:
    """The named style statistic of ``(B, C, H, W)`` features: ``"gram"`` or ``"meanvar"``."""
    if statistic == "gram":
        return gram_matrix(features)
    if statistic == "meanvar":
        return mean_std(features)
    raise ValueError(f"unknown style statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")


def _per_sample_mse(value: Tensor, target: Tensor) -> Tensor:
    return (value - target).square().flatten(1).mean(dim=1)


class ContentLoss(nn.Module):
    r"""Feature reconstruction loss :math:`\operatorname{mean}((F - P)^2)` against fixed target features ``P``.

    Note:
        Gatys et al. use :math:`\frac12 \sum (F - P)^2`; the mean keeps the weight independent of layer size.
    """

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.register_buffer("target", _fp32(target.detach()), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        """Return the loss of each batch element, shape ``(B,)``."""
        with torch.autocast(features.device.type, enabled=False):
            return _per_sample_mse(_fp32(features), self.target)


class StyleLoss(nn.Module):
    r"""Squared distance between the style statistics of features and a fixed target, averaged over entries.

    With ``"gram"`` this is :math:`\operatorname{mean}((G - A)^2)` for the normalised Gram matrices of
    :func:`gram_matrix`, i.e. 4 × the :math:`E_l` of Gatys et al. up to their :math:`N_l^2 M_l^2` normalisation.
    With ``"meanvar"`` it is :math:`\operatorname{mean}((\mu - \mu_s)^2) + \operatorname{mean}((\sigma - \sigma_s)^2)`,
    AdaIN's style loss with squared instead of plain L2 norms.

    Args:
        target_features: Features of the style image(s): one ``(S, C, H, W)`` tensor, or a sequence of them when
            the images differ in size. Several style images are blended by averaging their statistics.
        statistic: ``"gram"`` or ``"meanvar"``.
    """

    def __init__(self, target_features: Tensor | Sequence[Tensor], statistic: Statistic) -> None:
        super().__init__()
        self.statistic = statistic
        if isinstance(target_features, Tensor):
            target_features = [target_features]
        statistics = [style_statistic(features.detach(), statistic) for features in target_features]
        target = torch.cat(statistics).mean(dim=0, keepdim=True)
        self.register_buffer("target", target, persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        """Return the loss of each batch element, shape ``(B,)``."""
        statistic = style_statistic(features, self.statistic)
        if self.statistic == "meanvar":
            # Mean and std terms are summed, each averaged over channels.
            return 2 * _per_sample_mse(statistic, self.target)
        return _per_sample_mse(statistic, self.target)


def total_variation(image: Tensor) -> Tensor:
    r"""Anisotropic total variation per pixel, :math:`\frac{1}{CHW}\sum |x_{i+1,j}-x_{i,j}| + |x_{i,j+1}-x_{i,j}|`.

    Wraps ``torchmetrics.functional.image.total_variation``, which sums over pixels; dividing by their count keeps
    the weight independent of image size.
    """
    return _total_variation(image.float(), reduction="none") / image[0].numel()


class LayerStyleLoss(nn.Module):
    r"""Weighted style loss over several layers, :math:`\sum_l w_l \, \mathcal{L}_l`, with targets computed once.

    This is the single definition of "style loss" shared by image optimisation, the :class:`StyleDistance` metric
    and diffusion guidance.

    Args:
        target_features: ``{layer: features}`` of the style image(s), as :class:`StyleLoss` takes them.
        statistic: ``"gram"`` or ``"meanvar"``.
        layer_weights: ``{layer: w_l}``; by default every layer weighs ``1 / len(layers)``, as in Gatys et al.
    """

    def __init__(
        self,
        target_features: Mapping[str, Tensor | Sequence[Tensor]],
        statistic: Statistic,
        layer_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        layers = list(target_features)
        if layer_weights is None:
            layer_weights = {layer: 1.0 / len(layers) for layer in layers}
        missing = set(layer_weights) - set(layers)
        if missing:
            raise ValueError(f"layer weights given for layers without targets: {sorted(missing)}")
        self.layer_weights = {layer: float(layer_weights.get(layer, 0.0)) for layer in layers}
        self.losses = nn.ModuleDict({layer: StyleLoss(target_features[layer], statistic) for layer in layers})

    def per_layer(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted loss of each layer, each of shape ``(B,)``."""
        return {layer: loss(features[layer]) for layer, loss in self.losses.items()}

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum over layers, shape ``(B,)``."""
        return sum(self.layer_weights[layer] * value for layer, value in self.per_layer(features).items())
