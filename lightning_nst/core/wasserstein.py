"""The Wasserstein statistics' numerics: weighted moments, matrix square roots and quantile interpolation.

The Gaussian W2 style loss needs the square root of the constant target covariance and the trace of the square
root of its product with the image's covariance, with a gradient (both from float64 eigendecompositions); the sliced W
loss compares quantiles of projections with unequal sample counts. :class:`~lightning_nst.core.losses.StyleLoss` uses
these.
"""

from __future__ import annotations

import torch
from torch import Tensor


def weighted_mean_cov(flat: Tensor, weights: Tensor | None, diagonal: bool) -> tuple[Tensor, Tensor]:
    """Mean ``(B, C)`` and population covariance ``(B, C, C)`` (variance ``(B, C)`` if ``diagonal``)."""
    if weights is None:
        mean = flat.mean(dim=2)
        if diagonal:
            return mean, flat.var(dim=2, unbiased=False)
        centred = flat - mean[..., None]
        return mean, centred @ centred.transpose(1, 2) / flat.shape[2]
    weights = weights[:, None, :]
    mean = (flat * weights).sum(dim=2)
    centred = flat - mean[..., None]
    if diagonal:
        return mean, (centred.square() * weights).sum(dim=2)
    return mean, (centred * weights) @ centred.transpose(1, 2)


W2_EPS = 1e-4


def sqrtm_eigh(a: Tensor) -> Tensor:
    """Accurate square root of constant symmetric PSD matrices (no gradient needed), in float64."""
    values, vectors = torch.linalg.eigh(a.double())
    return (vectors * values.clamp_min(0).sqrt()[..., None, :] @ vectors.transpose(-2, -1)).to(a.dtype)


def w2_cross_trace(root: Tensor, cov: Tensor) -> Tensor:
    r"""The W2 cross term :math:`\operatorname{tr}\bigl((R \Sigma R)^{1/2}\bigr)` of ``(..., C, C)``, in float64.

    The sum of the square roots of the eigenvalues of :math:`R \Sigma R` (``root`` :math:`R = \Sigma_s^{1/2}`,
    ``cov`` :math:`\Sigma`, both symmetric PSD), differentiable in both. Only the trace of the root is needed, and
    its gradient :math:`\tfrac12 V \operatorname{diag}(\lambda^{-1/2}) V^\top` (torch's ``eigvalsh`` backward)
    has no eigenvalue gaps, so repeated eigenvalues are harmless; the covariances' :math:`\varepsilon I` keeps
    :math:`\lambda \ge \varepsilon^2`. Newton-Schulz converges slowly on the small eigenvalues of ill-conditioned
    VGG covariances and leaves the loss high (see ``benchmarks/w2_fidelity.py``).
    """
    root = root.double()
    m = root @ cov.double() @ root
    values = torch.linalg.eigvalsh((m + m.transpose(-2, -1)) / 2)
    return values.clamp_min(0).sqrt().sum(dim=-1)


def interpolate(levels: Tensor, values: Tensor, at: Tensor) -> Tensor:
    """Piecewise-linear ``f(at)`` through ``(levels, values)`` along the last dim, constant beyond the ends."""
    index = torch.searchsorted(levels, at).clamp(1, levels.shape[-1] - 1)
    lo_level, hi_level = levels.gather(-1, index - 1), levels.gather(-1, index)
    lo_value, hi_value = values.gather(-1, index - 1), values.gather(-1, index)
    fraction = ((at - lo_level) / (hi_level - lo_level)).clamp(0, 1).to(values.dtype)
    return lo_value + fraction * (hi_value - lo_value)


def quantile_levels(weights: Tensor) -> Tensor:
    """Quantile levels (mid-points of each sample's probability mass) of sorted samples' weights, in float64."""
    weights = weights.double()
    return weights.cumsum(dim=-1) - weights / 2
