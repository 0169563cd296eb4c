"""Colour control for style transfer: luminance-only transfer, colour matching and histogram matching.

Pure torch on ``(B, 3, H, W)`` RGB tensors in ``[0, 1]``. Luminance and chroma are those of full-range YCbCr
(ITU-R BT.601 as JPEG uses it): :math:`Y = 0.299 R + 0.587 G + 0.114 B`, and Cb, Cr centred on 0.5. The methods are
those of Gatys et al. 2016, "Preserving Color in Neural Artistic Style Transfer" (arXiv 1606.05897).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_nst.core.choices import COLOR_MODES

__all__ = [
    "COLOR_MODES",
    "ColorMode",
    "chroma_difference",
    "combine_luminance",
    "gray",
    "luminance",
    "match_color",
    "match_histograms",
    "match_luminance",
    "rgb_to_ycbcr",
    "ycbcr_to_rgb",
]

ColorMode = Literal["keep", "luminance", "match", "histogram"]

_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64
)
_OFFSET = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)


def _apply(matrix: Tensor, image: Tensor) -> Tensor:
    return torch.einsum("ij,bjhw->bihw", matrix.to(image), image)


def rgb_to_ycbcr(image: Tensor) -> Tensor:
    """Full-range YCbCr (BT.601) of ``(B, 3, H, W)`` RGB in ``[0, 1]``: Y in ``[0, 1]``, Cb and Cr around 0.5."""
    return _apply(_RGB_TO_YCBCR, image) + _OFFSET.to(image).view(1, 3, 1, 1)


def ycbcr_to_rgb(image: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_ycbcr`; not clamped, so values may leave ``[0, 1]``."""
    return _apply(torch.linalg.inv(_RGB_TO_YCBCR), image - _OFFSET.to(image).view(1, 3, 1, 1))


def luminance(image: Tensor) -> Tensor:
    """Y of ``(B, 3, H, W)`` RGB, shape ``(B, 1, H, W)``."""
    return rgb_to_ycbcr(image)[:, :1]


def gray(y: Tensor) -> Tensor:
    """A ``(B, 1, H, W)`` luminance as the grey RGB image VGG sees, ``(B, 3, H, W)``."""
    return y.expand(-1, 3, -1, -1)


def match_luminance(style: Tensor, content: Tensor) -> Tensor:
    r"""Style luminance with the content luminance's mean and standard deviation (Gatys et al. 2016, Eq. 1).

    :math:`L_s' = \frac{\sigma_c}{\sigma_s} (L_s - \mu_s) + \mu_c`, over all pixels of each image, clamped to
    ``[0, 1]``. Both are ``(1, 1, H, W)`` luminances (sizes may differ).
    """
    scale = content.std() / style.std().clamp_min(1e-6)
    return ((style - style.mean()) * scale + content.mean()).clamp(0, 1)


def combine_luminance(y: Tensor, chroma_source: Tensor) -> Tensor:
    """RGB of luminance ``y`` ``(B, 1, H, W)`` with the Cb and Cr of ``chroma_source`` (RGB), clamped to ``[0, 1]``."""
    chroma = rgb_to_ycbcr(chroma_source)[:, 1:].expand(y.shape[0], -1, -1, -1)
    return ycbcr_to_rgb(torch.cat([y, chroma.to(y)], dim=1)).clamp(0, 1)


def _mean_cov(image: Tensor) -> tuple[Tensor, Tensor]:
    pixels = image.double().flatten(2)[0]  # (3, N)
    mean = pixels.mean(dim=1, keepdim=True)
    centred = pixels - mean
    return mean, centred @ centred.T / centred.shape[1]


def _sym_power(matrix: Tensor, power: float, eps: float) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(eps) ** power) @ vectors.T


def match_color(source: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Source's colours moved linearly so that their mean and covariance are the target's (Gatys et al. 2016, §2.1).

    :math:`x' = A (x - \mu_s) + \mu_t` with :math:`A = \Sigma_t^{1/2} \Sigma_s^{-1/2}`, the symmetric matrix square
    roots from the eigendecomposition (the paper's "image analogies" variant; the Cholesky variant
    :math:`L_t L_s^{-1}` gives the same mean and covariance but rotates colours more). Computed in float64 over
    ``(1, 3, H, W)`` images; eigenvalues below ``eps`` are raised to it, so a grey source does not divide by zero.
    The result is not clamped: clamping to ``[0, 1]`` (as the optimisation does) changes the statistics a little
    where colours leave the cube.
    """
    mean_s, cov_s = _mean_cov(source)
    mean_t, cov_t = _mean_cov(target)
    transform = _sym_power(cov_t, 0.5, eps) @ _sym_power(cov_s, -0.5, eps)
    pixels = source.double().flatten(2)[0]
    matched = transform @ (pixels - mean_s) + mean_t
    return matched.reshape(source.shape).to(source.dtype)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """``numpy.interp`` for increasing ``xp``: torch has no 1-D linear interpolation at arbitrary points."""
    index = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    left, right = xp[index - 1], xp[index]
    weight = ((x - left) / (right - left).clamp_min(1e-12)).clamp(0, 1)
    return fp[index - 1] + weight * (fp[index] - fp[index - 1])


def match_histograms(image: Tensor, reference: Tensor) -> Tensor:
    """Each channel of ``image`` mapped so its histogram is the reference's (as ``skimage.exposure.match_histograms``).

    Equal values stay equal: each distinct value goes to the reference value at the same cumulative frequency.
    ``(1, C, H, W)`` tensors; the sizes may differ.
    """
    out = torch.empty_like(image)
    for channel in range(image.shape[1]):
        values, inverse, counts = torch.unique(image[0, channel].double(), return_inverse=True, return_counts=True)
        ref_values, ref_counts = torch.unique(reference[0, channel].double(), return_counts=True)
        quantiles = counts.cumsum(0) / counts.sum()
        ref_quantiles = ref_counts.cumsum(0) / ref_counts.sum()
        if len(ref_values) == 1:
            mapped = ref_values.expand_as(values)
        else:
            mapped = _interp(quantiles, ref_quantiles, ref_values)
        out[0, channel] = mapped[inverse].to(image.dtype)
    return out


def chroma_difference(a: Tensor, b: Tensor) -> float:
    """Mean absolute difference of the Cb and Cr channels of two RGB images of one size, on the 0-255 scale."""
    return (rgb_to_ycbcr(a.double())[:, 1:] - rgb_to_ycbcr(b.double())[:, 1:]).abs().mean().item() * 255.0
