r"""The feed-forward style networks, torch only, and the record a checkpoint keeps to rebuild them.

- :class:`TransformerNet`: the image transformation network of Johnson, Alahi and Fei-Fei (2016) with instance
  normalisation (Ulyanov et al., 2016) in place of batch normalisation and nearest-neighbour upsampling followed by a
  convolution in place of transposed convolutions (no checkerboard artefacts; Odena et al., 2016), as in
  pytorch/examples ``fast_neural_style``. One network per style.
- :class:`AdaINNet`: Huang and Belongie (2017): a frozen VGG19 encoder up to ``encoder_layer`` (``relu4_1`` in the
  paper), adaptive instance normalisation of the content features to the style features' channel means and standard
  deviations, and a trained decoder that mirrors the encoder. Any style at inference.

A trained network is stored in a Lightning checkpoint: its weights under ``state_dict`` with the prefix
``network.``, and :data:`RECORD_KEY` holding :meth:`FastNetworkRecord.to_dict`, which is all
:func:`build_network` needs to rebuild it without the training module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nst.core.errors import NSTError
from lightning_nst.core.layers import LAYER_NAMES, VGG19_CONFIG, check_layers, layer_index, min_input_size
from lightning_nst.core.vgg import VGG19Features

NetworkKind = Literal["johnson", "adain"]
RECORD_KEY = "lightning_nst_network"
"""The checkpoint key of a fast network's :class:`FastNetworkRecord`."""
RECORD_FORMAT = 1


def _instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=True)


class _ConvLayer(nn.Sequential):
    """Reflection padding and a convolution, so borders are not darkened by zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> None:
        super().__init__(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(in_channels, out_channels, kernel, stride))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _ConvLayer(channels, channels, 3),
            _instance_norm(channels),
            nn.ReLU(),
            _ConvLayer(channels, channels, 3),
            _instance_norm(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _Upsample(nn.Sequential):
    """Nearest-neighbour upsampling by 2, then a convolution: Johnson's transposed convolution without checkerboards."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), _ConvLayer(in_channels, out_channels, kernel))


def _pad_to_multiple(image: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        image = F.pad(image, (0, pad_w, 0, pad_h), mode=mode)
    return image, height, width


class TransformerNet(nn.Module):
    r"""Johnson et al.'s image transformation network; RGB in ``[0, 1]`` to RGB in ``[0, 1]``, any size.

    Three convolutions (9x9, then two 3x3 of stride 2), ``residual_blocks`` residual blocks, two upsampling
    convolutions and a 9x9 output convolution, with ``width``, ``2 width`` and ``4 width`` channels (32/64/128 in
    the paper). An input whose sides are not multiples of 4 is padded by reflection and the output cropped back, so
    every image comes back at its own size.

    Note:
        The paper ends with a scaled ``tanh`` on a 0-255 image; here :math:`(\tanh(x) + 1) / 2` gives ``[0, 1]``.

    Args:
        width: Channels of the first convolution.
        residual_blocks: Number of residual blocks (5 in the paper).
    """

    def __init__(self, width: int = 32, residual_blocks: int = 5) -> None:
        super().__init__()
        if width < 1 or residual_blocks < 0:
            raise NSTError(f"network: width must be >= 1 and residual_blocks >= 0, got {width}, {residual_blocks}")
        self.width, self.residual_blocks = width, residual_blocks
        w = width
        self.encoder = nn.Sequential(
            _ConvLayer(3, w, 9), _instance_norm(w), nn.ReLU(),
            _ConvLayer(w, 2 * w, 3, 2), _instance_norm(2 * w), nn.ReLU(),
            _ConvLayer(2 * w, 4 * w, 3, 2), _instance_norm(4 * w), nn.ReLU(),
        )  # fmt: skip
        self.residuals = nn.Sequential(*(_Residual(4 * w) for _ in range(residual_blocks)))
        self.decoder = nn.Sequential(
            _Upsample(4 * w, 2 * w, 3), _instance_norm(2 * w), nn.ReLU(),
            _Upsample(2 * w, w, 3), _instance_norm(w), nn.ReLU(),
            _ConvLayer(w, 3, 9),
        )  # fmt: skip

    def forward(self, image: Tensor) -> Tensor:
        """Stylize ``(B, 3, H, W)`` images in ``[0, 1]``; the output has the input's size."""
        padded, height, width = _pad_to_multiple(image, 4)
        out = self.decoder(self.residuals(self.encoder(padded)))
        return (torch.tanh(out[..., :height, :width]) + 1) / 2


def adain(content: Tensor, style_mean: Tensor, style_std: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Adaptive instance normalisation: ``content`` features renormalised to the given per-channel statistics.

    .. math::

        \mathrm{AdaIN}(x, y) = \sigma(y) \frac{x - \mu(x)}{\sigma(x)} + \mu(y),

    with :math:`\sigma` computed as :func:`lightning_nst.core.losses.mean_std` does (population variance,
    :math:`\varepsilon` inside the root). ``style_mean``/``style_std`` are ``(B, C)``.
    """
    flat = content.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2, unbiased=False) + eps).sqrt()[..., None, None]
    return style_std[..., None, None] * (content - mean) / std + style_mean[..., None, None]


def _decoder(encoder_layer: str) -> nn.Sequential:
    """The mirror of VGG19 up to ``encoder_layer``, as the AdaIN paper's decoder (no normalisation layers).

    Each convolution is reversed as a reflection-padded 3x3 convolution with a ReLU (none after the last, which
    gives RGB) and each pool as nearest-neighbour upsampling by 2.
    """
    steps: list[tuple[int, int] | None] = []  # (in, out) channels of each convolution; None for a pool
    channels = 3
    for name, entry in zip((n for n in LAYER_NAMES if not n.startswith("relu")), VGG19_CONFIG, strict=False):
        if layer_index(name) > layer_index(encoder_layer):
            break
        if entry == "M":
            steps.append(None)
        else:
            steps.append((channels, int(entry)))
            channels = int(entry)
    layers: list[nn.Module] = []
    for step in reversed(steps):
        if step is None:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            continue
        in_channels, out_channels = step
        layers.append(_ConvLayer(out_channels, in_channels, 3))
        if in_channels != 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def adain_style_layers(encoder_layer: str) -> list[str]:
    """The layers of the AdaIN style loss: ``relu1_1``, ``relu2_1``, ... up to ``encoder_layer``'s block."""
    index = layer_index(encoder_layer)
    return [name for name in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1") if layer_index(name) <= index]


class AdaINNet(nn.Module):
    """Huang and Belongie's AdaIN style transfer network: frozen VGG19 encoder, AdaIN, trained decoder.

    The encoder's weights are part of the network's state, so a checkpoint holds everything inference needs.

    Args:
        encoder_layer: The encoder's last layer (``relu4_1`` in the paper; ``relu3_1`` with partial weights).
        weights: The encoder's VGG19 weights, as :class:`~lightning_nst.core.vgg.VGG19Features` takes them.
        fill_missing: Let a partial weights file give the uncovered layers seeded random weights.
    """

    def __init__(self, encoder_layer: str = "relu4_1", weights: str | os.PathLike[str] = "auto",
                 fill_missing: bool = False) -> None:  # fmt: skip
        super().__init__()
        check_layers([encoder_layer], "network.encoder_layer")
        if not encoder_layer.startswith("relu"):
            raise NSTError(f"network.encoder_layer: must be a ReLU layer such as relu4_1, got {encoder_layer!r}")
        self.encoder_layer = encoder_layer
        self.style_layers = adain_style_layers(encoder_layer)
        self.encoder = VGG19Features(sorted({*self.style_layers, encoder_layer}, key=layer_index), weights,
                                     fill_missing=fill_missing, key="network")  # fmt: skip
        self.decoder = _decoder(encoder_layer)

    @property
    def weights_used(self) -> str:
        """Which VGG19 weights the encoder holds, in words."""
        return self.encoder.weights_used

    def encode(self, image: Tensor) -> dict[str, Tensor]:
        """The encoder's features of ``image`` at every style layer and the encoder layer."""
        return self.encoder(image)

    def style_statistics(self, style: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and standard deviation ``(B, C)`` each of ``style``'s features at the encoder layer."""
        flat = self.encode(style)[self.encoder_layer].float().flatten(2)
        return flat.mean(dim=2), (flat.var(dim=2, unbiased=False) + 1e-5).sqrt()

    def forward(self, content: Tensor, style: Tensor, alpha: float = 1.0,
                style_weights: Sequence[float] | None = None) -> Tensor:  # fmt: skip
        """Stylize ``content`` ``(B, 3, H, W)`` with ``style`` and return images of the content's size in ``[0, 1]``.

        ``style`` is one image for all, one per content image, or with ``style_weights`` several ``(S, 3, h, w)``
        styles interpolated by mixing their feature statistics (the paper's Fig. 8). ``alpha`` in ``[0, 1]`` trades
        content for style: ``0`` decodes the content's own features.
        """
        mean, std = self.style_statistics(style)
        if style_weights is not None:
            weights = torch.as_tensor(list(style_weights), dtype=mean.dtype, device=mean.device)
            if weights.numel() != mean.shape[0]:
                raise NSTError(f"style_weights: {weights.numel()} weights for {mean.shape[0]} styles")
            weights = weights / weights.sum()
            mean, std = (weights[:, None] * mean).sum(0, keepdim=True), (weights[:, None] * std).sum(0, keepdim=True)
        return self.stylize_with_statistics(content, mean, std, alpha)

    def stylize_with_statistics(self, content: Tensor, mean: Tensor, std: Tensor, alpha: float = 1.0) -> Tensor:
        """Stylize ``content`` to style statistics at the encoder layer; images in ``[0, 1]``, float32.

        ``mean`` and ``std`` are ``(1 | B, C)`` each, as :meth:`style_statistics` gives them, so a style encoded once
        serves many images (or a mix of styles of different sizes).
        """
        padded, height, width = _pad_to_multiple(content, min_input_size([self.encoder_layer]))
        features = self.encode(padded)[self.encoder_layer].float()
        target = adain(features, mean, std)
        target = alpha * target + (1 - alpha) * features
        return self.decoder(target)[..., :height, :width].float().clamp(0, 1)


@dataclass
class FastNetworkRecord:
    """What a checkpoint keeps to rebuild a fast network without its training module (:data:`RECORD_KEY`).

    Attributes:
        kind: ``"johnson"`` (one style, :class:`TransformerNet`) or ``"adain"`` (any style, :class:`AdaINNet`).
        config: The network's constructor arguments.
        style: For ``"johnson"``, the style it was trained on (a file name, for messages and summaries).
        vgg_weights: The VGG19 weights the training losses (and AdaIN's encoder) used, in words.
        format: The record's version.
    """

    kind: NetworkKind
    config: dict[str, Any]
    style: str | None = None
    vgg_weights: str | None = None
    format: int = RECORD_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored in a checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], where: str) -> FastNetworkRecord:
        """Read a stored record; raises naming ``where`` if it is not one this version reads."""
        if not isinstance(value, Mapping) or value.get("kind") not in ("johnson", "adain"):
            raise NSTError(f"{where}: not a fast style network checkpoint (no {RECORD_KEY!r} record)")
        if value.get("format") != RECORD_FORMAT:
            raise NSTError(f"{where}: fast network record format {value.get('format')!r}; this version reads "
                           f"{RECORD_FORMAT}")  # fmt: skip
        known = {"kind", "config", "style", "vgg_weights", "format", "extra"}
        return cls(**{key: item for key, item in value.items() if key in known})


def build_network(record: FastNetworkRecord) -> nn.Module:
    """An untrained network of the record's kind and config (load its ``network.`` weights into it).

    AdaIN's encoder is built with random weights here; the checkpoint's state holds the trained encoder's weights.
    """
    if record.kind == "johnson":
        return TransformerNet(**record.config)
    config = {**record.config, "weights": "random", "fill_missing": False}
    return AdaINNet(**config)
