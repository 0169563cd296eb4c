"""The report's own measurements: style loss of image files, held-out image statistics, convergence and timing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_nst.core.images import load_image
from lightning_nst.core.losses import LayerStyleLoss, Statistic
from lightning_nst.core.metrics import StyleDistance
from lightning_nst.report.folder import Report


class StyleMeter:
    """Style loss of image files against the style image on one definition, as the guidance measures it.

    A :class:`~lightning_nst.StyleDistance` over the report's VGG trunk; images and the style are resized to
    ``size`` on their long edge, and layers weigh ``1 / len(layers)``.
    """

    def __init__(self, report: Report, style: str, layers: Sequence[str], statistic: Statistic, size: int) -> None:
        self.size = size
        self.metric = StyleDistance(report.features, [load_image(style, size, key="style")], statistic, layers)

    @torch.no_grad()
    def __call__(self, path: str | Path) -> float:
        """The style loss of the image file (or sample) at ``path``."""
        return float(self.metric(load_image(path, self.size, key=str(path))))


def steps_to(values: Sequence[float], fraction: float) -> int | None:
    """The first step at which a loss curve falls to ``fraction`` of its initial value; ``None`` if it never does."""
    return next((step for step, value in enumerate(values) if value <= fraction * values[0]), None)


def _luminance(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255 @ np.array([0.299, 0.587, 0.114])


def radial_spectrum(image: Image.Image, bins: int = 16) -> np.ndarray:
    """Mean power of the luminance (mean removed) in ``bins`` equal rings of spatial frequency, 0 to 0.5 cycles/pixel.

    A ring no frequency of the image falls in is NaN.
    """
    luminance = _luminance(image)
    power = np.abs(np.fft.fft2(luminance - luminance.mean())) ** 2 / luminance.size
    radius = np.hypot(
        *np.meshgrid(np.fft.fftfreq(luminance.shape[0]), np.fft.fftfreq(luminance.shape[1]), indexing="ij")
    )
    keep = (radius > 0) & (radius <= 0.5)
    ring = np.minimum((radius[keep] / 0.5 * bins).astype(int), bins - 1)
    counts = np.bincount(ring, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(ring, weights=power[keep], minlength=bins) / counts


def spectrum_distance(image: Image.Image, reference: Image.Image, bins: int = 16) -> float:
    """Mean absolute log10 ratio of the radially averaged luminance power spectra (:func:`radial_spectrum`).

    0 when the two have the same power at every scale of spatial frequency; 1 when they differ tenfold on average.
    Phase-blind: it measures the scale and contrast of the structure, not its shapes.
    """
    a, b = radial_spectrum(image, bins), radial_spectrum(reference, bins)
    both = np.isfinite(a) & np.isfinite(b)
    tiny = 1e-12  # a flat image has no power at all
    return float(np.abs(np.log10((a[both] + tiny) / (b[both] + tiny))).mean())


def colour_distance(image: Image.Image, reference: Image.Image, projections: int = 64) -> float:
    """Sliced Wasserstein-1 distance between the RGB pixel distributions, in ``[0, 1]`` units.

    The mean, over ``projections`` fixed random directions of RGB space, of the mean absolute difference between the
    two images' quantiles of the pixels projected on that direction; blind to where the pixels are.
    """
    directions = np.random.default_rng(0).normal(size=(3, projections))
    directions /= np.linalg.norm(directions, axis=0)
    levels = (np.arange(256) + 0.5) / 256
    quantiles = [
        np.quantile(np.asarray(picture.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255 @ directions, levels, 0)
        for picture in (image, reference)
    ]
    return float(np.abs(quantiles[0] - quantiles[1]).mean())


def colour_statistics(image: Image.Image) -> list[float]:
    """Mean luminance (Rec. 601), mean HSV saturation and the mean of R, G and B, all in ``[0, 1]``."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    luminance = _luminance(image)
    saturation = np.asarray(image.convert("HSV"), dtype=np.float64)[..., 1] / 255
    return [float(luminance.mean()), float(saturation.mean()), *(float(c) for c in rgb.reshape(-1, 3).mean(0))]


def loss_seconds(
    report: Report,
    layers: list[str],
    size: int,
    repeats: int,
    compared: Sequence[Statistic] = ("gram", "meanvar"),
) -> dict[str, list[float]]:
    """Seconds of VGG forward + style loss + backward for each statistic, measured in turn ``repeats`` times.

    Each round times every statistic once, round ``r`` starting with the ``r``-th (modulo their number) and going on
    in order, so drift in the machine's speed and any cost of going first fall on all of them alike (for two: the
    first one first in even rounds and second in odd ones); one warm-up round is not counted.
    """
    features = report.features
    device = features.mean.device
    generator = torch.Generator().manual_seed(1)
    target = features(torch.rand(1, 3, size, size, generator=generator).to(device))
    losses = {
        statistic: LayerStyleLoss({layer: target[layer] for layer in layers}, statistic) for statistic in compared
    }
    times: dict[str, list[float]] = {statistic: [] for statistic in losses}
    image = torch.rand(1, 3, size, size, generator=generator).to(device).requires_grad_()
    order = list(losses)
    for round_ in range(repeats + 1):
        first = round_ % len(order)
        for statistic in order[first:] + order[:first]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            losses[statistic](features(image)).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[statistic].append(time.perf_counter() - started)
            image.grad = None
    return {statistic: values[1:] for statistic, values in times.items()}


def spread(values: Sequence[float]) -> tuple[float, float, float, float, float]:
    """Minimum, first quartile, median, third quartile and maximum (linear interpolation between order statistics)."""
    low, q1, median, q3, high = np.percentile(np.asarray(values, dtype=np.float64), [0, 25, 50, 75, 100])
    return float(low), float(q1), float(median), float(q3), float(high)
