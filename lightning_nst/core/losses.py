r"""Content, style and total-variation losses: pure torch, one value per batch element.

Every loss returns a tensor of shape ``(B,)`` so that several objectives optimised together as one batch keep
separate values. Style statistics are computed in float32 with autocast off, so bf16/fp16 runs stay finite.

Notation, per batch element: a layer's ``(C, H, W)`` features are the :math:`N \times M` matrix :math:`F` with
:math:`N = C` channels and :math:`M = H W` positions, and :math:`P` are the content image's features. Gatys et al.
(2015, 2016) define :math:`L_\text{content} = \frac12 \sum_{ik} (F_{ik} - P_{ik})^2` and, per style layer,
:math:`E_l = \frac{1}{4 N^2 M^2} \sum_{ij} (G_{ij} - A_{ij})^2` with the raw Gram matrices :math:`G = F F^\top` of
the image and :math:`A` of the style image. Each docstring below gives what the code computes and its exact relation
to these; the weights that multiply each term are set per objective in :class:`lightning_nst.Objective`.

Style statistics: ``"gram"``, ``"meanvar"``, ``"w2"`` (Gaussian Wasserstein-2) and ``"sliced_w"`` (sliced
Wasserstein), see :class:`StyleLoss`. Several style images are blended as the mixture of their feature
distributions; for ``"meanvar"`` this changed the equal-weights blend in issue 16 (the mixture's standard deviation,
no longer the average of the standard deviations). Masks select regions of the image and of the style images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import total_variation as _total_variation

from lightning_nst.core.choices import STATISTICS
from lightning_nst.core.errors import NSTError
from lightning_nst.core.wasserstein import (
    W2_EPS,
    interpolate,
    quantile_levels,
    sqrtm_eigh,
    w2_cross_trace,
    weighted_mean_cov,
)

Statistic = Literal["gram", "meanvar", "w2", "sliced_w"]
_MEANVAR_EPS = 1e-5


def _fp32(features: Tensor) -> Tensor:
    return features.float()


def gram_matrix(features: Tensor) -> Tensor:
    r"""Normalised Gram matrix of ``(B, C, H, W)`` features, shape ``(B, C, C)``.

    .. math::

        \hat G_{ij} = \frac{1}{N M} \sum_{k=1}^{M} F_{ik} F_{jk}, \qquad N = C,\ M = H W.

    Note:
        Gatys et al. use the raw :math:`G = F F^\top`, so :math:`\hat G = G / (N M)`. Dividing by :math:`N M`, as
        the PyTorch tutorial does, makes style images of another size comparable; the raw Gram grows with :math:`M`.
    """
    return _Gram.apply(features, features[0].numel())


def _positions(features: Tensor) -> tuple[Tensor, bool]:
    """``(B, C, H, W)`` features as one matrix per image without a copy, and whether it is ``(B, M, C)``.

    ``channels_last`` features (what :class:`~lightning_nst.core.vgg.VGG19Features` returns) give ``(B, M, C)``,
    others ``(B, C, M)``.
    """
    last = torch.channels_last
    if features.dim() == 4 and not features.is_contiguous() and features.is_contiguous(memory_format=last):
        return features.permute(0, 2, 3, 1).flatten(1, 2), True
    return features.flatten(2), False


class _Gram(torch.autograd.Function):
    r""":math:`F F^\top / n` of ``(B, C, H, W)`` features in float32; the gradient in the features' dtype and layout.

    Autograd's own matmul backward takes two products, :math:`\bar G F` and :math:`\bar G^\top F`, and adds them;
    here it is one, :math:`(\bar G + \bar G^\top) F`: a third less of a Gram loss's matmul time. Both products read
    the features in their own layout (:func:`_positions`), so neither makes a contiguous copy, and the gradient
    leaves in the layout the convolution before it expects. Under bf16 autocast the features are bf16 and their
    gradient is rounded to bf16 anyway on its way back into the trunk, so that product runs in bf16 on the saved
    bf16 features (float32 accumulation, float32's range). fp16 features (``16-mixed``) keep a float32 product:
    fp16's range would flush the small entries of :math:`\bar G / n` to zero. The statistic itself is always
    float32.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, features: Tensor, n: int) -> Tensor:
        ctx.save_for_backward(features)
        ctx.n = n  # type: ignore[attr-defined]
        with torch.autocast(features.device.type, enabled=False):
            matrix, rows = _positions(_fp32(features))
            return (matrix.transpose(1, 2) @ matrix if rows else matrix @ matrix.transpose(1, 2)) / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (features,) = ctx.saved_tensors  # type: ignore[attr-defined]
        with torch.autocast(features.device.type, enabled=False):
            matrix, rows = _positions(features if features.dtype == torch.bfloat16 else _fp32(features))
            symmetric = ((grad + grad.transpose(1, 2)) / ctx.n).to(matrix.dtype)  # type: ignore[attr-defined]
            if rows:  # (B, M, C) @ (B, C, C), back to (B, C, H, W) as a channels_last view
                product = (matrix @ symmetric).unflatten(1, features.shape[2:]).permute(0, 3, 1, 2)
            else:
                product = (symmetric @ matrix).view_as(features)
            return product.to(features.dtype), None


def mean_std(features: Tensor, eps: float = _MEANVAR_EPS) -> Tensor:
    r"""Per-channel mean and standard deviation of ``(B, C, H, W)`` features, shape ``(B, 2, C)``.

    .. math::

        \mu_c = \frac1M \sum_{k=1}^{M} F_{ck}, \qquad
        \sigma_c = \sqrt{\frac1M \sum_{k=1}^{M} (F_{ck} - \mu_c)^2 + \varepsilon}, \qquad M = H W,

    with ``[:, 0]`` holding :math:`\mu` and ``[:, 1]`` holding :math:`\sigma`. This is Eq. 5-6 of AdaIN (Huang and
    Belongie, 2017): population variance (divided by :math:`M`, not :math:`M - 1`) and :math:`\varepsilon` inside
    the root, which keeps :math:`\sigma` differentiable where a channel is constant.

    Note:
        :math:`\sigma_c` is not the standard deviation :math:`s_c` but :math:`\sqrt{s_c^2 + \varepsilon}`: it
        exceeds :math:`s_c` by less than :math:`\sqrt{\varepsilon}` (3.2e-3 for the default 1e-5), by more than 1 %
        where :math:`s_c < 0.0223` and by 5 % where :math:`s_c \approx 0.0099`, and a constant (dead ReLU) channel
        gets :math:`\sigma_c = \sqrt{\varepsilon}`. Image and style features carry the same bias, so matching
        statistics still gives zero loss, but :math:`\sigma_c` follows :math:`s_c` less closely
        (:math:`d\sigma_c / ds_c = s_c / \sigma_c`, 0.71 at :math:`s_c = \sqrt{\varepsilon}`), so near-constant
        channels are matched more weakly. With ImageNet VGG19 on 256 px images, 0-2 of the channels of relu1_1,
        relu2_1 and relu3_1 had :math:`s_c < 0.0223` for the sample photos and paintings, 6 of 64 at relu1_1 for the
        brick texture; the median :math:`s_c` was 0.2-0.5, 1-1.7 and 2-3 at these layers.
    """
    with torch.autocast(features.device.type, enabled=False):
        wide = _fp32(features)
        positions = tuple(range(2, wide.dim()))  # not flatten(2), which copies channels_last features
        mean = wide.mean(dim=positions)
        std = (wide.var(dim=positions, unbiased=False) + eps).sqrt()
        return torch.stack([mean, std], dim=1)


def style_statistic(features: Tensor, statistic: Statistic) -> Tensor:
    """The named style statistic of ``(B, C, H, W)`` features.

    ``"gram"`` gives :func:`gram_matrix`, ``(B, C, C)``; ``"meanvar"`` gives :func:`mean_std`, ``(B, 2, C)``.
    ``"w2"`` and ``"sliced_w"`` compare distributions inside :class:`StyleLoss` and have no single statistic here.
    """
    if statistic == "gram":
        return gram_matrix(features)
    if statistic == "meanvar":
        return mean_std(features)
    if statistic in STATISTICS:
        raise ValueError(f"style statistic {statistic!r} has no fixed-size statistic; use StyleLoss")
    raise ValueError(f"unknown style statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")


def _per_sample_mse(value: Tensor, target: Tensor) -> Tensor:
    # A mean over every dimension but the first, not over flatten(1): flattening channels_last features copies them.
    return (value - target).square().mean(dim=tuple(range(1, value.dim())))


class ContentLoss(nn.Module):
    r"""Feature reconstruction loss against fixed target features ``P``, one value per batch element.

    .. math::

        \mathcal{L}_\text{content} = \frac{1}{N M} \sum_{i=1}^{N} \sum_{k=1}^{M} (F_{ik} - P_{ik})^2
        = \frac{2}{N M} L_\text{content}^\text{Gatys}.

    Note:
        Gatys et al. use :math:`\frac12 \sum (F - P)^2`; the mean keeps the weight independent of layer size.
    """

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.register_buffer("target", _fp32(target.detach()), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        """Return the loss of each batch element, shape ``(B,)``."""
        with torch.autocast(features.device.type, enabled=False):
            return _SquaredError.apply(features, self.target)


class _SquaredError(torch.autograd.Function):
    r"""Per-sample mean of :math:`(F - P)^2` in float32; the gradient in the features' dtype and layout.

    The value is autograd's ``(F.float() - P).square().mean(...)``. Autograd's backward of that chain (a mean's
    expanded gradient times the pow's) comes back contiguous (NCHW) for channels_last features, and the trunk then
    converts it at the gradient sum of that layer and before the convolution's backward: under bf16 at 256 px these
    layout copies cost more than the content term itself (about 10 ms of an 80 ms step). Here the difference is
    kept, and its gradient :math:`2 (F - P) \bar L / n` leaves in the features' layout and dtype.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, features: Tensor, target: Tensor) -> Tensor:
        difference = torch.sub(features, target)  # float32 for bf16/fp16 features (type promotion), one pass
        ctx.save_for_backward(difference)
        ctx.dtype = features.dtype  # type: ignore[attr-defined]
        return difference.square().mean(dim=tuple(range(1, difference.dim())))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (difference,) = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = (grad * (2.0 / difference[0].numel())).view(-1, *([1] * (difference.dim() - 1)))
        return (difference * scale).to(ctx.dtype), None  # type: ignore[attr-defined]


def resize_mask(mask: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Resize ``(1|B, 1, h, w)`` mask values in ``[0, 1]`` to ``size`` by area (adaptive average pooling).

    Each output pixel is the mean of the mask over the input pixels it covers, so a mask's share of the image (its
    area fraction) is kept at every layer's resolution, and a region that is non-zero somewhere stays non-zero.
    This is the average-pooling rule of Gatys et al. (2017, spatial control), not their "inside" erosion.
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask: expected shape (1|B, 1, H, W), got {tuple(mask.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(mask.shape[-2:]) == size:
        return mask.float()
    return F.adaptive_avg_pool2d(mask.float(), size)


def _check_mask(mask: Tensor, name: str) -> Tensor:
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"{name}: expected shape (1|B, 1, H, W), got {tuple(mask.shape)}")
    mask = mask.detach().float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"{name}: values must lie in [0, 1]")
    # Area pooling keeps a non-zero region non-zero, so this holds at every layer's resolution too.
    if (mask.flatten(1).sum(dim=1) <= 0).any():
        raise ValueError(f"{name}: all zero, so it selects no position to take statistics from")
    return mask


def _blend_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    values = [float(weight) for weight in weights]
    if len(values) != count:
        raise ValueError(f"weights: {len(values)} given for {count} style images")
    if any(not math.isfinite(value) or value < 0 for value in values):
        raise ValueError(f"weights: must be finite and >= 0, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError("weights: all zero; at least one style image needs a weight > 0")
    return [value / total for value in values]


def _position_weights(features: Tensor, mask: Tensor | None) -> Tensor | None:
    """``(1|B, M)`` weights of the positions, summing to 1 per image, or ``None`` for equal weights."""
    if mask is None:
        return None
    flat = resize_mask(mask.to(features.device), features.shape[-2:]).flatten(1)
    return flat / flat.sum(dim=1, keepdim=True)


def _masked_statistic(features: Tensor, statistic: str, mask: Tensor | None) -> Tensor:
    """Gram ``(B, C, C)`` or mean/std ``(B, 2, C)`` of the region ``mask`` selects (all of it for ``None``)."""
    if mask is None:
        return style_statistic(features, statistic)  # type: ignore[arg-type]
    with torch.autocast(features.device.type, enabled=False):
        flat = _fp32(features).flatten(2)
        weights = _position_weights(flat.view_as(features), mask)
        if statistic == "gram":
            return (flat * weights[:, None, :]) @ flat.transpose(1, 2) / flat.shape[1]
        mean, var = weighted_mean_cov(flat, weights, diagonal=True)
        return torch.stack([mean, (var + _MEANVAR_EPS).sqrt()], dim=1)


def feature_sums(features: Tensor, statistic: Statistic, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:meth:`StyleLoss.sums` of ``(B, C, H, W)`` features for ``statistic`` (gram, meanvar or w2), unmasked."""
    if statistic == "sliced_w":
        raise ValueError("only unmasked gram, meanvar and w2 losses are functions of feature sums")
    with torch.autocast(features.device.type, enabled=False):
        if statistic == "gram":
            wide = _fp32(features)
            return wide.sum(dim=(2, 3)), _Gram.apply(wide, 1)
        flat = _fp32(features).flatten(2)
        if shift is not None:
            flat = flat - shift.to(flat.dtype)[..., None]
        if statistic == "meanvar":
            return flat.sum(dim=2), flat.square().sum(dim=2)
        return flat.sum(dim=2), flat @ flat.transpose(1, 2)


class StyleLoss(nn.Module):
    r"""Squared distance between the style statistic of features and a fixed target, one value per batch element.

    With ``"gram"``, for the normalised Gram matrices :math:`\hat G` of :func:`gram_matrix` and the target
    :math:`\hat A`:

    .. math::

        \mathcal{L}_\text{gram} = \frac{1}{N^2} \sum_{i,j=1}^{N} (\hat G_{ij} - \hat A_{ij})^2
        = \frac{1}{N^4 M^2} \sum_{i,j} (G_{ij} - A_{ij})^2 = \frac{4}{N^2} E_l.

    With ``"meanvar"``, for :math:`(\mu, \sigma)` of :func:`mean_std` and the target :math:`(\mu_s, \sigma_s)`:

    .. math::

        \mathcal{L}_\text{meanvar} = \frac1N \sum_{c=1}^{N} (\mu_c - \mu_{s,c})^2
        + \frac1N \sum_{c=1}^{N} (\sigma_c - \sigma_{s,c})^2
        = \frac{\lVert \mu - \mu_s \rVert_2^2 + \lVert \sigma - \sigma_s \rVert_2^2}{N}.

    With ``"w2"``, the Wasserstein-2 distance between Gaussians with the features' mean :math:`\mu` and population
    covariance :math:`\Sigma` and the target's :math:`(\mu_s, \Sigma_s)`, each covariance plus
    :math:`\varepsilon I`, :math:`\varepsilon = 10^{-4}`, per channel:

    .. math::

        \mathcal{L}_\text{w2} = \frac1N \Bigl( \lVert \mu - \mu_s \rVert_2^2
        + \operatorname{tr}\bigl(\Sigma + \Sigma_s - 2 (\Sigma_s^{1/2} \Sigma \Sigma_s^{1/2})^{1/2}\bigr) \Bigr).

    As crowsonkb/style-transfer-pytorch's ``StyleLossW2``, with the same :math:`\varepsilon`. Departures: the
    constant :math:`\Sigma_s^{1/2}` is computed exactly (float64 eigendecomposition), and the cross term is the sum
    of the square roots of the eigenvalues of :math:`\Sigma_s^{1/2} \Sigma \Sigma_s^{1/2}` in float64
    (:func:`~lightning_nst.core.wasserstein.w2_cross_trace`) rather than the trace of coupled Newton-Schulz
    iterations: VGG feature covariances are ill-conditioned and the iterations converge slowly on their small
    eigenvalues. With ImageNet VGG19 (relu1_1 to relu3_1, gravel at 128 px) near convergence, 20 iterations read
    the loss 0.7 %, 1.8 % and 2.7 % high; the eigenvalues give it within 1e-5 relative of a float64 reference
    (float32 features or float64 tiled sums), and cost less on CPU (0.1 to 0.8 times 20 iterations, 64 to 512
    channels; ``benchmarks/w2_fidelity.py``). Both terms are means over channels, as there; its target blends mix
    the second raw moment, which is the same mixture as below.

    With ``"sliced_w"`` (Heitz et al. 2021), :math:`N` random unit directions :math:`\theta_p`, drawn anew at
    every call from a ``torch.Generator`` seeded once with ``seed``, project the :math:`M` feature vectors; with
    :math:`x_{p,(k)}` the sorted projections and :math:`Q_p` the target's projected quantile function,

    .. math::

        \mathcal{L}_\text{sliced\_w} = \frac1N \sum_{p=1}^{N} \frac1M \sum_{k=1}^{M}
        \Bigl(x_{p,(k)} - Q_p\bigl(\tfrac{k - 1/2}{M}\bigr)\Bigr)^2.

    :math:`Q_p` interpolates linearly between the target's sorted projections at their mid-point levels
    :math:`(j - 1/2)/M_s` (constant beyond the first and last), so for :math:`M_s = M` this is exactly the paper's
    mean squared difference of sorted projections, and other sizes are handled by interpolation, as the paper
    proposes. With masks or blends the positions carry weights :math:`p_k`: levels are the mid-points of the
    cumulative weights and the mean over :math:`k` is weighted. The paper sums over layers without normalising by
    :math:`N` and :math:`M`; here each layer's value is a mean, as for the other statistics.

    Several style images :math:`s` with blend weights :math:`w_s` (normalised to sum 1) give one target. A linear
    mix of statistics only means something where the statistic is a moment of the feature distribution, so each
    is blended as the moments of the mixture of the style images' feature distributions:

    - ``"gram"``: :math:`\hat A = \sum_s w_s \hat A^{(s)}` (second raw moments mix linearly);
    - ``"meanvar"``: :math:`\mu_s = \sum_s w_s \mu^{(s)}` and the second moment
      :math:`\sum_s w_s (v^{(s)} + \mu^{(s)2})` are mixed, then :math:`\sigma_s = \sqrt{v + \varepsilon}` with
      :math:`v = \sum_s w_s \bigl(v^{(s)} + (\mu^{(s)} - \mu_s)^2\bigr)` (the same, without the cancellation),
      :math:`v^{(s)}` the population variances;
    - ``"w2"``: the same for the mean and covariance (crowsonkb mixes the mean and second raw moment);
    - ``"sliced_w"``: the mixture distribution itself, every position of image :math:`s` weighted
      :math:`w_s / M_s` (or by its mask), whose quantiles are interpolated as above.

    Equal weights (the default) give exactly the previous average of Gram matrices. For ``"meanvar"`` they do not:
    up to this version :math:`\mu_s` and :math:`\sigma_s` were each averaged, the standard deviations rather than
    the variances, which ignores the spread between the images' means; now :math:`\sigma_s` is that of the
    mixture, at least the average :math:`\sigma`. One style image gives the same target as before.

    Masks select regions. ``target_masks`` (one per style image, or ``None`` for all of it) choose the positions of
    each style image whose statistics make the target; ``mask`` chooses the positions of the optimised image that
    are compared. Each mask is resized to the layer's resolution by area (:func:`resize_mask`), and the statistics
    of a region are those of the mask-weighted positions, normalised by the mask's area :math:`\sum_k m_k`: e.g.
    :math:`\hat G = \frac{1}{N \sum_k m_k} \sum_k m_k F_{:k} F_{:k}^\top` (equal to the Gram of the cropped
    region for a hard 0/1 mask; Gatys et al. 2017 weight features by the mask, hence the Gram by :math:`m_k^2`).

    Note:
        The Gram loss is :math:`4 E_l / N_l^2`, not :math:`E_l`: the mean over the :math:`N^2` entries adds a
        :math:`1/N^2` that Gatys et al. do not have, so at equal style weight a 512-channel layer counts
        :math:`(512/64)^2 = 64` times less, relative to its :math:`E_l`, than a 64-channel one. The relation holds
        when the style image has the image's size; otherwise :math:`\hat A` normalises by the style image's own
        :math:`M`, where Gatys et al.'s raw :math:`A` is not defined for comparison.

        AdaIN's style loss (Huang and Belongie, 2017, Eq. 12) per layer is
        :math:`\lVert \mu - \mu_s \rVert_2 + \lVert \sigma - \sigma_s \rVert_2`, plain L2 norms; this one
        squares the norms (smooth at the target) and divides by :math:`N`. There is no constant factor between them.

    Args:
        target_features: Features of the style image(s): one ``(S, C, H, W)`` tensor, or a sequence of them when
            the images differ in size; every batch element counts as one style image.
        statistic: One of :data:`STATISTICS`.
        weights: One blend weight per style image, ``>= 0``, not all zero; normalised to sum 1. ``None``: equal.
        target_masks: One ``(1, 1, h, w)`` mask in ``[0, 1]`` per style image, or ``None`` (whole image); any
            size, resized by area to each layer's resolution.
        mask: ``(1|B, 1, H, W)`` mask in ``[0, 1]`` of the optimised image's region compared; ``None``: all of it.
        seed: Seed of the generator that draws ``"sliced_w"``'s projections; unused by the other statistics.

    Raises:
        ValueError: Unknown statistic, bad weights, or a mask of another shape, outside ``[0, 1]``, or all zero.
    """

    def __init__(
        self,
        target_features: Tensor | Sequence[Tensor],
        statistic: Statistic,
        weights: Sequence[float] | None = None,
        target_masks: Sequence[Tensor | None] | None = None,
        mask: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if statistic not in STATISTICS:
            raise ValueError(f"unknown style statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        self.statistic = statistic
        self.seed = seed
        if isinstance(target_features, Tensor):
            target_features = [target_features]
        images = [features[i : i + 1].detach() for features in target_features for i in range(features.shape[0])]
        blend = _blend_weights(weights, len(images))
        if target_masks is None:
            target_masks = [None] * len(images)
        if len(target_masks) != len(images):
            raise ValueError(f"target_masks: {len(target_masks)} given for {len(images)} style images")
        masks = [None if m is None else _check_mask(m, f"target_masks[{i}]") for i, m in enumerate(target_masks)]
        self.register_buffer("mask", None if mask is None else _check_mask(mask, "mask"), persistent=False)
        chosen = [(w, f, m) for w, f, m in zip(blend, images, masks, strict=True) if w > 0]
        with torch.autocast(images[0].device.type, enabled=False):
            self._set_target(chosen)

    def _set_target(self, chosen: list[tuple[float, Tensor, Tensor | None]]) -> None:
        if self.statistic == "sliced_w":
            self._set_sliced_target(chosen)
            return
        self._mix_moments([(w, self._moments(f, m)) for w, f, m in chosen])

    def _moments(self, features: Tensor, mask: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """One style image's ``(mean, second)``: ``(None, Gram)``, ``(mean, variance)`` or ``(mean, covariance)``."""
        if self.statistic == "gram":
            return None, _masked_statistic(features, "gram", mask)
        flat = _fp32(features).flatten(2)
        return weighted_mean_cov(flat, _position_weights(_fp32(features), mask), self.statistic == "meanvar")

    def _mix_moments(self, moments: list[tuple[float, tuple[Tensor | None, Tensor]]]) -> None:
        if self.statistic == "gram":
            self.register_buffer("target", sum(w * second for w, (_, second) in moments), persistent=False)
            return
        # Mean and variance (covariance for w2) are not linear in the mixture; the mean and second raw moment
        # are. Mixing those and converting back is written as the law of total variance, which avoids the
        # cancellation of E[x^2] - E[x]^2 in fp32.
        mean = sum(w * mu for w, (mu, _) in moments)
        if self.statistic == "meanvar":
            var = sum(w * (v + (mu - mean).square()) for w, (mu, v) in moments)
            self.register_buffer("target", torch.stack([mean, (var + _MEANVAR_EPS).sqrt()], dim=1), persistent=False)
            return
        cov = sum(w * (c + (mu - mean)[..., :, None] * (mu - mean)[..., None, :]) for w, (mu, c) in moments)
        cov = cov + W2_EPS * torch.eye(cov.shape[-1], device=cov.device)
        self.register_buffer("target_mean", mean, persistent=False)
        self.register_buffer("target", cov, persistent=False)
        self.register_buffer("target_sqrt", sqrtm_eigh(cov), persistent=False)

    @classmethod
    def from_moments(
        cls,
        moments: Sequence[tuple[Tensor | None, Tensor]],
        statistic: Statistic,
        weights: Sequence[float] | None = None,
    ) -> StyleLoss:
        """A loss whose target is built from each style image's moments instead of its features.

        For a style image too large to pass through VGG whole: :func:`lightning_nst.nst.tiling.tiled_style_moments`
        accumulates them tile by tile. The target is the same as from the features, blends included.

        Args:
            moments: Per style image ``(mean, second)``, float32: ``(None, normalised Gram (1, C, C))`` for
                ``"gram"``, ``(mean (1, C), population variance (1, C))`` for ``"meanvar"``, ``(mean (1, C),
                population covariance (1, C, C))`` for ``"w2"`` (see :meth:`moments_of_sums`).
            statistic: ``"gram"``, ``"meanvar"`` or ``"w2"``.
            weights: Blend weights, as :class:`StyleLoss` takes them.

        Raises:
            ValueError: ``"sliced_w"`` (not a function of moments) or bad weights.
        """
        if statistic not in ("gram", "meanvar", "w2"):
            raise ValueError(f"only gram, meanvar and w2 targets are functions of moments, not {statistic!r}")
        loss = cls.__new__(cls)
        nn.Module.__init__(loss)
        loss.statistic, loss.seed = statistic, 0
        loss.register_buffer("mask", None, persistent=False)
        blend = _blend_weights(weights, len(moments))
        loss._mix_moments([(w, m) for w, m in zip(blend, moments, strict=True) if w > 0])
        return loss

    @staticmethod
    def moments_of_sums(
        statistic: Statistic, count: int, first: Tensor, second: Tensor, shift: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor]:
        """The float32 moments :meth:`from_moments` takes, from :meth:`sums` of ``count`` positions."""
        if statistic == "gram":
            return None, (second / (second.shape[-1] * count)).float()
        mean = first / count
        if statistic == "meanvar":
            second = second / count - mean.square()
        else:
            second = second / count - mean[..., :, None] * mean[..., None, :]
        mean = mean if shift is None else mean + shift.to(mean.dtype)
        return mean.float(), second.float()

    def _set_sliced_target(self, chosen: list[tuple[float, Tensor, Tensor | None]]) -> None:
        # sliced_w: the mixture's samples, each position weighted by its image's blend weight and mask share.
        samples, masses = [], []
        for w, f, m in chosen:
            flat = _fp32(f).flatten(2)[0]
            share = _position_weights(_fp32(f), m)
            share = torch.full_like(flat[0], 1 / flat.shape[1]) if share is None else share[0]
            samples.append(flat[:, share > 0])
            masses.append(w * share[share > 0])
        self.register_buffer("target", torch.cat(samples, dim=1), persistent=False)
        self.register_buffer("target_weights", torch.cat(masses), persistent=False)
        self.generator = torch.Generator().manual_seed(self.seed)

    def _w2(self, features: Tensor) -> Tensor:
        flat = _fp32(features).flatten(2)
        mean, cov = weighted_mean_cov(flat, _position_weights(features, self.mask), diagonal=False)
        return self._w2_of_moments(mean, cov)

    def _w2_of_moments(self, mean: Tensor, cov: Tensor) -> Tensor:
        cov = cov + W2_EPS * torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
        # The traces and their difference in float64: near convergence the loss is a small difference of them.
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(dim=1).double() + self.target.double().diagonal(
            dim1=-2, dim2=-1
        ).sum(dim=-1)
        trace = (trace - 2 * w2_cross_trace(self.target_sqrt, cov)) / cov.shape[-1]
        return (mean - self.target_mean.to(mean.dtype)).square().mean(dim=1) + trace.to(mean.dtype)

    def sums(self, features: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Sums over the positions of ``(B, C, H, W)`` features that :meth:`loss_of_sums` turns into the loss.

        ``(Σ_k (F_k - c), Σ_k (F_k - c)(F_k - c)^T)``, shapes ``(B, C)`` and ``(B, C, C)``, with the squares
        ``(B, C)`` instead of the outer products for ``"meanvar"``. The shift :math:`c` (``(B, C)``, zero if
        ``None``; always zero for ``"gram"``) keeps the variance's :math:`E[x^2] - E[x]^2` from cancelling in
        floating point. Sums of disjoint sets of positions add up to the sums of their union, which is what tiled
        optimisation (:mod:`lightning_nst.nst.tiling`) accumulates. Unmasked ``"gram"``, ``"meanvar"`` and ``"w2"``.
        """
        if self.mask is not None:
            raise ValueError("only unmasked gram, meanvar and w2 losses are functions of feature sums")
        return feature_sums(features, self.statistic, shift)

    def loss_of_sums(self, count: int, first: Tensor, second: Tensor, shift: Tensor | None = None) -> Tensor:
        """The loss ``(B,)`` of features given by :meth:`sums` over ``count`` positions, in the sums' dtype.

        Equals :meth:`forward` on those features up to rounding.
        """
        if self.statistic == "gram":
            return _per_sample_mse(second / (second.shape[-1] * count), self.target.to(second.dtype))
        mean = first / count
        if self.statistic == "meanvar":
            var = second / count - mean.square()
            mean = mean if shift is None else mean + shift.to(mean.dtype)
            statistic = torch.stack([mean, (var + _MEANVAR_EPS).sqrt()], dim=1)
            return 2 * _per_sample_mse(statistic, self.target.to(statistic.dtype))
        cov = second / count - mean[..., :, None] * mean[..., None, :]
        return self._w2_of_moments(mean if shift is None else mean + shift.to(mean.dtype), cov)

    def _sliced_w(self, features: Tensor) -> Tensor:
        flat = _fp32(features).flatten(2)
        (batch, channels, positions), device = flat.shape, flat.device
        directions = torch.randn(channels, channels, generator=self.generator)
        directions = (directions / directions.norm(dim=1, keepdim=True)).to(device)
        target, order = (directions @ self.target.float()).sort(dim=1)  # (P, M_t)
        target_levels = quantile_levels(self.target_weights.float()[order] / self.target_weights.float().sum())
        projected, order = (directions @ flat).sort(dim=2)  # (B, P, M)
        weights = _position_weights(features, self.mask)
        if weights is None:
            # Every image has the same levels, so the target's quantiles are interpolated once for the batch.
            levels = quantile_levels(torch.full((channels, positions), 1 / positions, device=device))
            return (projected - interpolate(target_levels, target, levels)).square().mean(dim=(1, 2))
        weights = weights.expand(batch, -1)[:, None, :].expand_as(projected).gather(2, order)
        quantiles = interpolate(
            target_levels.expand(batch, -1, -1).contiguous(),
            target.expand(batch, -1, -1).contiguous(),
            quantile_levels(weights).contiguous(),
        )
        return ((projected - quantiles).square() * weights).sum(dim=2).mean(dim=1)

    def forward(self, features: Tensor) -> Tensor:
        """Return the loss of each batch element, shape ``(B,)``."""
        if self.statistic in ("w2", "sliced_w"):
            with torch.autocast(features.device.type, enabled=False):
                return self._w2(features) if self.statistic == "w2" else self._sliced_w(features)
        statistic = _masked_statistic(features, self.statistic, self.mask)
        if self.statistic == "meanvar":
            # Mean and std terms are summed, each averaged over channels.
            return 2 * _per_sample_mse(statistic, self.target)
        return _per_sample_mse(statistic, self.target)


def total_variation(image: Tensor) -> Tensor:
    r"""Anisotropic (L1) total variation of ``(B, C, H, W)`` images per value, shape ``(B,)``.

    .. math::

        \mathcal{L}_\text{TV} = \frac{1}{C H W} \sum_{c=1}^{C} \Bigl( \sum_{h=1}^{H-1} \sum_{w=1}^{W}
        |x_{c,h+1,w} - x_{c,h,w}| + \sum_{h=1}^{H} \sum_{w=1}^{W-1} |x_{c,h,w+1} - x_{c,h,w}| \Bigr).

    Wraps ``torchmetrics.functional.image.total_variation``, which returns the bracketed sum; dividing by the
    number of values :math:`C H W` keeps the weight independent of image size.
    """
    return _total_variation(image.float(), reduction="none") / image[0].numel()


class LayerStyleLoss(nn.Module):
    r"""Weighted style loss over several layers, :math:`\sum_l w_l \, \mathcal{L}_l`, with targets computed once.

    :math:`\mathcal{L}_l` is the :class:`StyleLoss` of layer :math:`l`; by default :math:`w_l = 1 / L` for
    :math:`L` layers, Gatys et al.'s choice (they use :math:`w_l = 1/5` on five layers), whereas AdaIN sums its
    layers with weight 1. Layers absent from ``layer_weights`` get weight 0.

    This is the single definition of "style loss" shared by image optimisation, the :class:`StyleDistance` metric
    and diffusion guidance.

    Args:
        target_features: ``{layer: features}`` of the style image(s), as :class:`StyleLoss` takes them, or
            ``{layer: StyleLoss}`` whose targets are already computed (of the same ``statistic``).
        statistic: One of :data:`STATISTICS`.
        layer_weights: ``{layer: w_l}``; by default every layer weighs ``1 / len(layers)``.
        weights: Blend weights of the style images, as :class:`StyleLoss` takes them (for features only).
        target_masks: Masks of the style images' regions, as :class:`StyleLoss` takes them (for features only).
        mask: Region of the optimised image compared, as :class:`StyleLoss` takes it (for features only).
        seed: ``"sliced_w"``'s projection seed; layer ``i`` (in the mapping's order) uses ``seed + i``.
    """

    def __init__(
        self,
        target_features: Mapping[str, Tensor | Sequence[Tensor] | StyleLoss],
        statistic: Statistic,
        layer_weights: Mapping[str, float] | None = None,
        weights: Sequence[float] | None = None,
        target_masks: Sequence[Tensor | None] | None = None,
        mask: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        layers = list(target_features)
        if layer_weights is None:
            layer_weights = {layer: 1.0 / len(layers) for layer in layers}
        missing = set(layer_weights) - set(layers)
        if missing:
            raise ValueError(f"layer weights given for layers without targets: {sorted(missing)}")
        self.layer_weights = {layer: float(layer_weights.get(layer, 0.0)) for layer in layers}
        losses = {
            layer: target
            if isinstance(target, StyleLoss)
            else StyleLoss(target, statistic, weights, target_masks, mask, seed + index)
            for index, (layer, target) in enumerate(target_features.items())
        }
        if any(loss.statistic != statistic for loss in losses.values()):
            raise ValueError(f"every precomputed StyleLoss must use the statistic {statistic!r}")
        self.losses = nn.ModuleDict(losses)

    def per_layer(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted loss of each layer, each of shape ``(B,)``."""
        return {layer: loss(features[layer]) for layer, loss in self.losses.items()}

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum over layers, shape ``(B,)``."""
        return sum(self.layer_weights[layer] * value for layer, value in self.per_layer(features).items())


def check_style_weights(weights: Sequence[float], count: int, key: str) -> list[float]:
    """``weights`` as floats; raises naming ``key`` unless there is one finite weight >= 0 per style, not all zero."""
    weights = [float(weight) for weight in weights]
    if len(weights) != count:
        raise NSTError(f"{key}: {len(weights)} weights for {count} style images")
    if any(not math.isfinite(weight) or weight < 0 for weight in weights):
        raise NSTError(f"{key}: each weight must be a finite number >= 0, got {weights}")
    if sum(weights) <= 0:
        raise NSTError(f"{key}: all zero; give at least one style image a weight > 0")
    return weights
