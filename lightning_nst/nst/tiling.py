r"""Tiled loss and gradient for images larger than memory: peak memory follows the tile size, not the image size.

The image is cut into a grid of *cores* (a partition of its pixels, each core's sides multiples of the grid stride
:math:`S`, the stride of the deepest layer used: 1, 2, 4, 8 or 16 px for relu1..relu5) and each tile is a core
grown by a margin :math:`m` on every side (clipped to the image). At a layer of stride :math:`s`, a tile's *valid*
features are those of its core (core pixels divided by :math:`s`), so every feature position of the image counts
in exactly one tile. A feature's receptive field reaches :func:`reach` px before and after it; when the margin is at
least :func:`exact_margin` of the layers (and :math:`S` divides the cores, so pooling grids line up), the valid
features of a tile equal the untiled image's features at those positions (zero padding only where the tile meets
the image border, as in the untiled pass), and the tiled loss equals the untiled one up to rounding. A smaller
margin is allowed: features near a core's border then see zero padding instead of their neighbours, and a random
grid offset each step moves these seams so none stays put.

Style statistics are sums over positions (:meth:`lightning_nst.core.losses.StyleLoss.sums`), so they are accumulated
over tiles and the loss is taken of the accumulated sums, never averaged over per-tile losses. The gradient comes
from two passes over the tiles:

1. without autograd, accumulate each style layer's sums :math:`T_l = \sum_\text{tiles} T_{l,t}` (in float64), take
   the loss :math:`L(T)` and its gradient :math:`\partial L / \partial T_l` with respect to the sums;
2. per tile, a forward pass with autograd and the backward of the surrogate
   :math:`\sum_l \langle \partial L / \partial T_l, T_{l,t} \rangle` plus the tile's content loss (its share of
   the mean over all positions, against the same crop of the content target); the tile's input gradient is added
   into the full image's gradient.

By the chain rule (:math:`T_l` is linear in the tile sums) this is the exact gradient of :math:`L`, at the cost of
one extra forward pass without autograd per tile. Content-only objectives skip pass 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nst.core.errors import NSTError
from lightning_nst.core.losses import ContentLoss, Statistic, StyleLoss, feature_sums
from lightning_nst.core.vgg import LAYER_GEOMETRY, LAYER_NAMES, VGG19Features, layer_index


def reach(layer: str) -> tuple[int, int, int]:
    """``(stride, before, after)`` of a VGG19 layer: feature ``q`` sees input pixels ``[q s - before, q s + after]``.

    Each 3x3 convolution (padding 1) widens the field by one step of its input on each side, each 2x2 pooling by
    one step after.
    """
    stride, before, after = 1, 0, 0
    for name in LAYER_NAMES[: layer_index(layer) + 1]:
        if name.startswith("conv"):
            before, after = before + stride, after + stride
        elif name.startswith("pool"):
            after += stride
            stride *= 2
    assert stride == LAYER_GEOMETRY[layer_index(layer)][1]
    return stride, before, after


def grid_stride(layers: Sequence[str]) -> int:
    """The stride of the deepest of ``layers``: cores and grid offsets are multiples of it."""
    return max(reach(layer)[0] for layer in layers)


def exact_margin(layers: Sequence[str]) -> int:
    """Smallest margin (px, each side) for which tiled features equal untiled ones at every core position.

    A core's first feature needs ``before`` px before it, its last (``stride`` px before the core's end) needs
    ``after - stride + 1`` px after the core; rounded up to a multiple of :func:`grid_stride`. relu1_1: 1,
    relu2_1: 4, relu3_1: 12 (10 rounded up to 4), relu4_1: 32, relu4_2: 40, relu5_1: 80.
    """
    grid = grid_stride(layers)
    need = 0
    for layer in layers:
        stride, before, after = reach(layer)
        need = max(need, before, after - stride + 1)
    return -(-need // grid) * grid


@dataclass(frozen=True)
class Tile:
    """One tile: input rows/columns ``[top, bottom) x [left, right)`` and its core ``[r0, r1) x [c0, c1)``.

    ``height``/``width`` are the image's.
    """

    top: int
    bottom: int
    left: int
    right: int
    r0: int
    r1: int
    c0: int
    c1: int
    height: int
    width: int

    def crop(self, image: Tensor) -> Tensor:
        """The tile's pixels of a ``(B, C, H, W)`` image."""
        return image[..., self.top : self.bottom, self.left : self.right]

    def region(self, stride: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """Local (in the tile's features) and global (in the image's) rows and columns of the core at ``stride``."""
        g_r0, g_c0 = self.r0 // stride, self.c0 // stride
        g_r1 = self.r1 // stride if self.r1 < self.height else self.height // stride
        g_c1 = self.c1 // stride if self.c1 < self.width else self.width // stride
        t_r, t_c = self.top // stride, self.left // stride
        local = (slice(g_r0 - t_r, g_r1 - t_r), slice(g_c0 - t_c, g_c1 - t_c))
        return local, (slice(g_r0, g_r1), slice(g_c0, g_c1))


@dataclass(frozen=True)
class TilePlan:
    """How an image is cut: checked tile size and overlap for the layers of a run.

    Args:
        tile_size: Longest side of a tile in px (``model.tile_size``); images whose longer side exceeds it are tiled.
        overlap: Pixels adjacent tiles share (``model.tile_overlap``); each tile extends ``overlap // 2`` px,
            rounded down to a multiple of the grid stride, beyond its core on each side.
        layers: All layers the run's objectives use.

    Raises:
        NSTError: Naming ``model.tile_size`` or ``model.tile_overlap`` for a value that is not a whole number in
            range, or a tile too small to hold a core of one grid stride besides its margins.
    """

    tile_size: int
    overlap: int
    layers: tuple[str, ...]

    def __post_init__(self) -> None:
        for key, value, least in (("model.tile_size", self.tile_size, 1), ("model.tile_overlap", self.overlap, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise NSTError(f"{key}: must be a whole number >= {least}, got {value!r}")
        if self.overlap >= self.tile_size:
            raise NSTError(
                f"model.tile_overlap: {self.overlap} px must be smaller than model.tile_size ({self.tile_size} px)"
            )
        if self.core < self.stride:
            raise NSTError(
                f"model.tile_size: {self.tile_size} px is too small for layers up to {self.layers[-1]} with "
                f"model.tile_overlap {self.overlap}: a tile needs its two margins ({self.margin} px each) and a core "
                f"of at least {self.stride} px (the layers' stride), so at least {2 * self.margin + self.stride} px"
            )

    @property
    def stride(self) -> int:
        """The grid stride :math:`S`: cores and offsets are multiples of it."""
        return grid_stride(self.layers)

    @property
    def margin(self) -> int:
        """Pixels a tile extends beyond its core on each side."""
        return self.overlap // 2 // self.stride * self.stride

    @property
    def core(self) -> int:
        """Side of a full core in px."""
        return (self.tile_size - 2 * self.margin) // self.stride * self.stride

    @property
    def exact(self) -> bool:
        """Whether the margin covers the layers' receptive fields, so tiled equals untiled up to rounding."""
        return self.margin >= exact_margin(self.layers)

    def applies(self, image: Tensor) -> bool:
        """Whether an image of this shape is tiled (its longer side exceeds the tile size)."""
        return max(image.shape[-2:]) > self.tile_size

    def random_offset(self, generator: torch.Generator) -> tuple[int, int]:
        """A grid offset ``(rows, columns)``, each a multiple of the stride below the core size."""
        steps = self.core // self.stride
        drawn = torch.randint(0, steps, (2,), generator=generator).tolist()
        return drawn[0] * self.stride, drawn[1] * self.stride

    def _cores(self, size: int, offset: int) -> list[tuple[int, int]]:
        cuts = [0, *range(offset or self.core, size, self.core), size]
        return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]

    def tiles(self, height: int, width: int, offset: tuple[int, int] = (0, 0)) -> list[Tile]:
        """The tiles of a ``height x width`` image, cores shifted by ``offset`` px."""
        tiles = []
        for r0, r1 in self._cores(height, offset[0]):
            for c0, c1 in self._cores(width, offset[1]):
                top, bottom = max(0, r0 - self.margin), min(height, r1 + self.margin)
                left, right = max(0, c0 - self.margin), min(width, c1 + self.margin)
                tiles.append(Tile(top, bottom, left, right, r0, r1, c0, c1, height, width))
        return tiles


def tiled_features(
    vgg: VGG19Features, image: Tensor, layers: Sequence[str], tiles: Sequence[Tile]
) -> dict[str, Tensor]:
    """``vgg(image, layers)`` assembled tile by tile without autograd (e.g. content targets of a large image).

    Only ``layers`` are kept, each at its full size (``C x H/s x W/s`` for the layer's stride ``s``: relu4_2's 512
    channels at 1/8 of each side hold 2.7 times the image's floats); each tile's other activations are freed with it.
    """
    height, width = image.shape[-2:]
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for tile in tiles:
            features = vgg(tile.crop(image), layers)
            for layer in layers:
                stride = reach(layer)[0]
                value = features[layer]
                if layer not in out:
                    shape = (*value.shape[:2], height // stride, width // stride)
                    out[layer] = value.new_zeros(shape)
                (lr, lc), (gr, gc) = tile.region(stride)
                out[layer][..., gr, gc] = value[..., lr, lc]
    return out


class _Sums:
    """Float64 sums of one statistic's features over the tiles' valid regions, and how many positions they hold.

    Non-Gram sums are taken about the first tile's channel means (``shift``), so the variance is not the difference
    of two large sums in float32.
    """

    def __init__(self, statistic: Statistic) -> None:
        self.statistic = statistic
        self.shift: Tensor | None = None
        self.first: Tensor | None = None
        self.second: Tensor | None = None
        self.count = 0

    def add(self, value: Tensor) -> None:
        """Add the features ``(1, C, h, w)`` of one tile's valid region (none: nothing to add)."""
        if not value.numel():
            return
        if self.count == 0 and self.statistic != "gram":
            self.shift = value.float().flatten(2).mean(dim=2)
        first, second = feature_sums(value, self.statistic, self.shift)
        self.first = first.double() if self.first is None else self.first + first.double()
        self.second = second.double() if self.second is None else self.second + second.double()
        self.count += value.shape[-2] * value.shape[-1]


def tiled_style_moments(
    vgg: VGG19Features, image: Tensor, targets: Sequence[tuple[Statistic, str]], tiles: Sequence[Tile]
) -> dict[tuple[Statistic, str], tuple[Tensor | None, Tensor]]:
    """A style image's moments for :meth:`StyleLoss.from_moments`, accumulated tile by tile without autograd.

    The valid-region sums of :func:`tiled_terms`' pass 1 (float64, shifted by the first tile's mean), so no layer's
    features exist at full size; with an exact margin they equal the untiled moments up to rounding.

    Args:
        vgg: The trunk.
        image: One ``(1, 3, H, W)`` style image as VGG sees it.
        targets: ``(statistic, layer)`` pairs: ``"gram"``, ``"meanvar"`` or ``"w2"``.
        tiles: From :meth:`TilePlan.tiles`.
    """
    layers = sorted({layer for _, layer in targets}, key=layer_index)
    sums = {key: _Sums(key[0]) for key in targets}
    with torch.no_grad():
        for tile in tiles:
            features = vgg(tile.crop(image), layers)
            for (_, layer), accumulated in sums.items():
                local, _ = tile.region(reach(layer)[0])
                accumulated.add(features[layer][..., local[0], local[1]])
    return {
        key: StyleLoss.moments_of_sums(key[0], s.count, s.first, s.second, s.shift)  # type: ignore[arg-type]
        for key, s in sums.items()
    }


def tiled_terms(
    vgg: VGG19Features,
    image: Tensor,
    content: Mapping[str, tuple[float, ContentLoss]],
    style: Mapping[str, tuple[float, StyleLoss]],
    tiles: Sequence[Tile],
    gradient: bool = True,
) -> tuple[dict[str, dict[str, Tensor]], Tensor | None]:
    """The weighted content and style loss of one ``(1, 3, H, W)`` VGG input, computed tile by tile.

    Args:
        vgg: The trunk.
        image: What VGG sees; its autograd graph is not used.
        content: ``{layer: (weight, loss)}`` of the content terms.
        style: ``{layer: (weight, loss)}`` of the style terms; unmasked ``gram``, ``meanvar`` or ``w2``.
        tiles: From :meth:`TilePlan.tiles`.
        gradient: Also return the gradient of the terms' sum with respect to ``image`` (pass 2).

    Returns:
        ``({"content": {layer: value}, "style": {layer: value}}, gradient or None)``, values detached scalars.
    """
    image = image.detach()
    layers = sorted({*content, *style}, key=layer_index)
    strides = {layer: reach(layer)[0] for layer in layers}
    sums = {layer: _Sums(loss.statistic) for layer, (_, loss) in style.items()}
    squares = {layer: torch.zeros((), dtype=torch.float64, device=image.device) for layer in content}

    def valid(features: dict[str, Tensor], layer: str, tile: Tile) -> tuple[Tensor, tuple[slice, slice]]:
        local, where = tile.region(strides[layer])
        return features[layer][..., local[0], local[1]], where

    def content_share(layer: str, value: Tensor, where: tuple[slice, slice]) -> Tensor:
        target = content[layer][1].target
        return (value.float() - target[..., where[0], where[1]]).square().sum() / target[0].numel()

    if style or not gradient:
        with torch.no_grad():
            for tile in tiles:
                features = vgg(tile.crop(image), layers)
                for layer, accumulated in sums.items():
                    accumulated.add(valid(features, layer, tile)[0])
                if not gradient:
                    for layer in content:
                        value, where = valid(features, layer, tile)
                        squares[layer] += content_share(layer, value, where).double()
    style_values: dict[str, Tensor] = {}
    slopes: dict[str, tuple[Tensor, Tensor]] = {}
    for layer, (weight, loss) in style.items():
        accumulated = sums[layer]
        assert accumulated.first is not None and accumulated.second is not None, f"no tile holds {layer}"
        first, second = accumulated.first.requires_grad_(gradient), accumulated.second.requires_grad_(gradient)
        shift = None if accumulated.shift is None else accumulated.shift.double()
        with torch.enable_grad() if gradient else torch.no_grad():
            value = weight * loss.loss_of_sums(accumulated.count, first, second, shift)[0]
            if gradient:
                slope = torch.autograd.grad(value, [first, second], allow_unused=True)  # gram uses no first sums
                slopes[layer] = tuple(
                    torch.zeros_like(t) if d is None else d for t, d in zip((first, second), slope, strict=True)
                )
        style_values[layer] = value.detach().float()
    grad: Tensor | None = None
    if gradient:
        grad = torch.zeros_like(image)
        for tile in tiles:
            crop = tile.crop(image).clone().requires_grad_(True)
            with torch.enable_grad():
                features = vgg(crop, layers)
                surrogate: list[Tensor] = []
                for layer, (_, loss) in style.items():
                    value, _ = valid(features, layer, tile)
                    if value.numel():
                        first, second = loss.sums(value, sums[layer].shift)
                        surrogate.append(
                            (slopes[layer][0].float() * first).sum() + (slopes[layer][1].float() * second).sum()
                        )
                for layer, (weight, _) in content.items():
                    value, where = valid(features, layer, tile)
                    if value.numel():
                        share = content_share(layer, value, where)
                        squares[layer] += share.detach().double()
                        surrogate.append(weight * share)
                if surrogate:
                    (tile_grad,) = torch.autograd.grad(torch.stack(surrogate).sum(), crop)
                    grad[..., tile.top : tile.bottom, tile.left : tile.right] += tile_grad
    content_values = {layer: (content[layer][0] * squares[layer]).float() for layer in content}
    return {"content": content_values, "style": style_values}, grad
