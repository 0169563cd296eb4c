"""Image parameterisations: what the optimizer moves, and how it decodes to the image VGG sees and the PNG shows.

``pixels`` optimises the pixels themselves (projected onto ``[0, 1]`` after each step), ``laplacian`` the levels of
a Laplacian pyramid as STROTSS (Kolkin et al., 2019) does, and ``fourier`` a 1/f-scaled spectrum in a decorrelated
colour space as in Distill's "Differentiable Image Parameterizations" (Mordvintsev et al., 2018) and lucid. Every
parameterisation is exact: ``decode(encode(x)) == x`` up to float rounding for images in ``[0, 1]`` (``fourier``:
in ``(0, 1)``, its sigmoid never reaches 0 or 1). The image size follows from the parameter's shape, so one
parameterisation object serves any size (coarse-to-fine encodes the upsampled image at each scale).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_nst.core.choices import PARAMETERIZATIONS
from lightning_nst.core.errors import NSTError

__all__ = [
    "PARAMETERIZATIONS",
    "FourierParameterization",
    "LaplacianParameterization",
    "Parameterization",
    "ParameterizationName",
    "PixelParameterization",
    "clamp_unit",
    "make_parameterization",
]

ParameterizationName = Literal["pixels", "laplacian", "fourier"]


def clamp_unit(image: Tensor) -> Tensor:
    """``image.clamp(0, 1)`` whose gradient also passes at exactly 0 and 1 (and is 0 only outside ``[0, 1]``).

    This torch's ``clamp`` passes no gradient at its bounds (``d clamp(x, 0, 1)/dx`` is 0 at ``x = 0`` and ``x = 1``),
    so every pixel that projected gradient descent put on a bound, and every saturated pixel of a content image,
    would never move again: at 128 px that froze enough of the Gatys image that L-BFGS did not reach the PyTorch
    tutorial's 300-evaluation loss in 900 steps (docs/benchmarks.md, "Time to quality").
    """
    return torch.where((image >= 0) & (image <= 1), image, image.clamp(0, 1))


class Parameterization:
    """Maps an image ``(1, 3, H, W)`` in ``[0, 1]`` to the raw parameter the optimizer moves, and back.

    Attributes:
        name: The ``model.parameterization`` value.
    """

    name: str = ""

    def encode(self, image: Tensor) -> Tensor:
        """The raw parameter that decodes to ``image`` (``(1, 3, H, W)`` in ``[0, 1]``)."""
        raise NotImplementedError

    def decode(self, parameter: Tensor) -> Tensor:
        """The image ``(1, 3, H, W)`` in ``[0, 1]`` that ``parameter`` stands for: what VGG sees and what is saved."""
        raise NotImplementedError

    def image_size(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
        """The ``(H, W)`` of the image a parameter of this ``shape`` decodes to."""
        return int(shape[-2]), int(shape[-1])

    def project_(self, parameter: Tensor) -> None:
        """After an optimizer step, keep the parameter valid in place; a no-op where any value decodes validly."""


class PixelParameterization(Parameterization):
    """The pixels themselves; ``decode`` clamps to ``[0, 1]`` and each step is projected back onto ``[0, 1]``."""

    name = "pixels"

    def encode(self, image: Tensor) -> Tensor:  # noqa: D102
        return image.clamp(0, 1).clone()

    def decode(self, parameter: Tensor) -> Tensor:  # noqa: D102
        return clamp_unit(parameter)

    def project_(self, parameter: Tensor) -> None:  # noqa: D102
        parameter.clamp_(0, 1)  # projected gradient descent: the parameter stays an image


def _pyramid_sizes(height: int, width: int, max_levels: int) -> list[tuple[int, int]]:
    """Level sizes, finest first, each half the previous (floor) as STROTSS's ``dec_lap_pyr``, down to 1 px."""
    sizes = [(height, width)]
    while len(sizes) < max_levels and min(sizes[-1]) >= 2:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes


class LaplacianParameterization(Parameterization):
    """A Laplacian pyramid, as STROTSS optimises it: band-pass levels plus a low-pass residual.

    ``encode`` is STROTSS's ``dec_lap_pyr``: ``g_0 = x``, ``g_{k+1}`` = ``g_k`` bilinearly resized to half its size
    (floor), level ``k`` = ``g_k`` minus ``g_{k+1}`` bilinearly upsampled back, and the last level is the residual
    ``g_{L-1}``. ``decode`` is its ``syn_lap_pyr``: from the coarsest level up, upsample and add the next level,
    then clamp to ``[0, 1]`` (the pyramid itself is not projected: a pixel out of range is pulled back through the
    other levels). ``levels`` counts all levels including the residual: STROTSS's ``dec_lap_pyr(x, 5)`` makes 6;
    images too small for that many halvings get fewer (the coarsest is at least 1 px). So decode(encode(x)) is x
    exactly up to rounding, and a start from noise or the content image is the same image as with pixels.

    The parameter is one tensor ``(1, 3, H, W + W // 2)``: level 0 on the left ``(H, W)``, the coarser levels
    stacked top to bottom in the right strip (their heights sum to less than ``H``). The strip's remaining cells
    are unused (zero gradient). ``H`` and ``W`` follow from the shape alone.

    Args:
        levels: Pyramid levels including the low-pass residual.
    """

    name = "laplacian"

    def __init__(self, levels: int = 6) -> None:
        self.levels = levels

    def image_size(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:  # noqa: D102
        columns = int(shape[-1])
        return int(shape[-2]), columns - columns // 3  # inverts W + W // 2 for even and odd W

    def encode(self, image: Tensor) -> Tensor:  # noqa: D102
        height, width = image.shape[-2:]
        sizes = _pyramid_sizes(height, width, self.levels)
        parameter = image.new_zeros(*image.shape[:-1], width + width // 2)
        current, row = image.clamp(0, 1), 0
        for index, size in enumerate(sizes):
            if index + 1 < len(sizes):
                smaller = F.interpolate(current, size=sizes[index + 1], mode="bilinear", align_corners=False)
                level = current - F.interpolate(smaller, size=size, mode="bilinear", align_corners=False)
            else:
                smaller, level = current, current
            if index == 0:
                parameter[..., :, :width] = level
            else:
                parameter[..., row : row + size[0], width : width + size[1]] = level
                row += size[0]
            current = smaller
        return parameter

    def decode(self, parameter: Tensor) -> Tensor:  # noqa: D102
        height, width = self.image_size(parameter.shape)
        sizes = _pyramid_sizes(height, width, self.levels)
        levels = [parameter[..., :, :width]]
        row = 0
        for size in sizes[1:]:
            levels.append(parameter[..., row : row + size[0], width : width + size[1]])
            row += size[0]
        image = levels[-1]
        for level in reversed(levels[:-1]):
            image = level + F.interpolate(image, size=level.shape[-2:], mode="bilinear", align_corners=False)
        return clamp_unit(image)


# lucid's colour decorrelation (lucid/optvis/param/color.py, color_correlation_svd_sqrt): the square root of the
# ImageNet colour covariance, normalised so its largest column has norm 1. Distill's "Differentiable Image
# Parameterizations" uses it with the Fourier basis.
_COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = _COLOR_CORRELATION_SVD_SQRT / _COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()


def _hartley(x: Tensor) -> Tensor:
    """The orthonormal 2-D discrete Hartley transform over the last two dimensions; it is its own inverse."""
    spectrum = torch.fft.fft2(x, norm="ortho")
    return spectrum.real - spectrum.imag


class FourierParameterization(Parameterization):
    """A 1/f-scaled Fourier basis in decorrelated colour, as lucid's ``fft_image`` + ``to_valid_rgb(sigmoid=True)``.

    ``decode(p) = sigmoid(C · DHT(s ⊙ p) / 4)``: ``s`` scales each frequency ``f = sqrt(fy² + fx²)`` (cycles per
    pixel) by ``1 / max(f, 1 / max(H, W))`` (lucid's ``decay_power=1``; ``DHT`` with ``norm="ortho"`` stands for
    lucid's ``irfft2d`` times ``sqrt(H W)``), ``/ 4`` is lucid's, ``C`` is lucid's normalised
    ``color_correlation_svd_sqrt`` and the sigmoid keeps every value a valid pixel. ``encode`` inverts each step
    (logit, ``C⁻¹``, ``DHT``, ``/ s``); images are first clamped to ``[1e-6, 1 - 1e-6]`` since the sigmoid never
    reaches 0 or 1, so the round trip is exact within 1e-6 for any image in ``[0, 1]``.

    Note (departure from lucid): the spectrum is held in the real Hartley form, ``Re F - Im F`` of the full
    ``fft2`` (``cas`` kernel), instead of ``rfft2``'s half spectrum. It spans the same frequencies with the same
    scale per frequency (within each pair ``±(k, l)`` the two are an orthogonal rotation of each other, so gradient
    descent and L-BFGS follow the same trajectory), but the parameter has the image's own shape ``(1, 3, H, W)``:
    an ``rfft2`` spectrum of width ``W // 2 + 1`` does not say whether ``W`` is even or odd, which lucid settles by
    padding odd widths and cropping, and that crop breaks the exact round trip.
    """

    name = "fourier"
    eps = 1e-6

    @staticmethod
    def _scale(height: int, width: int, like: Tensor) -> Tensor:
        fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
        frequency = (fy.square() + fx.square()).sqrt()
        return (1.0 / frequency.clamp(min=1.0 / max(height, width))).to(like)

    def encode(self, image: Tensor) -> Tensor:  # noqa: D102
        logits = torch.logit(image.clamp(self.eps, 1 - self.eps).double())
        decorrelated = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_COLOR.double()), logits)
        spectrum = _hartley(4.0 * decorrelated) / self._scale(*image.shape[-2:], decorrelated)
        return spectrum.to(image.dtype)

    def decode(self, parameter: Tensor) -> Tensor:  # noqa: D102
        spatial = _hartley(parameter * self._scale(*parameter.shape[-2:], parameter)) / 4.0
        return torch.sigmoid(torch.einsum("ij,bjhw->bihw", _COLOR.to(spatial), spatial))


def make_parameterization(name: str, key: str = "model.parameterization") -> Parameterization:
    """The parameterisation called ``name``; raises :class:`NSTError` naming ``key`` for an unknown one.

    Args:
        name: ``"pixels"``, ``"laplacian"`` or ``"fourier"``.
        key: The config key named in the error.
    """
    if name == "pixels":
        return PixelParameterization()
    if name == "laplacian":
        return LaplacianParameterization()
    if name == "fourier":
        return FourierParameterization()
    raise NSTError(f"{key}: must be one of {', '.join(PARAMETERIZATIONS)}, got {name!r}")
