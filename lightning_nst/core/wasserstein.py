"""The Wasserstein statistics' numerics: weighted moments, matrix square roots and quantile interpolation.

The Gaussian W2 style loss needs the square root of feature covariances, with a gradient (Newton-Schulz with a
Lyapunov backward) and without one for constant targets (float64 eigendecomposition); the sliced W loss compares
quantiles of projections with unequal sample counts. :class:`~lightning_nst.core.losses.StyleLoss` uses these.
"""

from __future__ import annotations

from typing import Any

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
NS_ITERATIONS = 20  # 12 (crowsonkb) left 0.4-1.5 % of the noise-to-texture loss at the target; see losses.StyleLoss


def sqrtm_newton_schulz(a: Tensor, iterations: int) -> Tensor:
    """Square roots of ``(..., C, C)`` symmetric positive (semi)definite matrices by coupled Newton-Schulz."""
    norm = a.square().sum(dim=(-2, -1), keepdim=True).sqrt()
    y = a / norm
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = eye.expand_as(a)
    for _ in range(iterations):
        t = (3 * eye - z @ y) / 2
        y, z = y @ t, t @ z
    return y * norm.sqrt()


class SqrtmNewtonSchulz(torch.autograd.Function):
    """Matrix square root with a Newton-Schulz backward that solves the Lyapunov equation of its gradient.

    Follows ``sqrtm_ns_lyap`` of crowsonkb/style-transfer-pytorch (from msubhransu/matrix-sqrt, Lin and Maji 2017):
    differentiating through the iterations would keep every iterate for backward. torch has no matrix square root,
    and one through ``torch.linalg.eigh`` has gradients that divide by eigenvalue gaps, unstable for the repeated
    near-zero eigenvalues of rank-deficient feature covariances.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, iterations: int) -> Tensor:  # noqa: D102
        root = sqrtm_newton_schulz(a, iterations)
        ctx.save_for_backward(root)
        ctx.iterations = iterations
        return root

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        (root,) = ctx.saved_tensors
        norm = root.square().sum(dim=(-2, -1), keepdim=True).sqrt()
        a = root / norm
        eye3 = 3 * torch.eye(root.shape[-1], dtype=root.dtype, device=root.device)
        q = grad / norm
        for i in range(ctx.iterations):
            eye_a_a = eye3 - a @ a
            q = (q @ eye_a_a - a.transpose(-2, -1) @ (a.transpose(-2, -1) @ q - q @ a)) / 2
            if i < ctx.iterations - 1:
                a = a @ eye_a_a / 2
        return q / 2, None


def sqrtm_eigh(a: Tensor) -> Tensor:
    """Accurate square root of constant symmetric PSD matrices (no gradient needed), in float64."""
    values, vectors = torch.linalg.eigh(a.double())
    return (vectors * values.clamp_min(0).sqrt()[..., None, :] @ vectors.transpose(-2, -1)).to(a.dtype)


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
