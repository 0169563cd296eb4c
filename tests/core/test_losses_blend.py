"""Blend weights and masks of StyleLoss (issue 16): every statistic takes them the same way."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_nst.core.losses import STATISTICS, LayerStyleLoss, StyleLoss, resize_mask

DETERMINISTIC = ("gram", "meanvar", "w2")  # sliced_w draws new projections at every call


def _features(seed: int, shape: tuple[int, ...] = (1, 4, 8, 8), shift: float = 0.0) -> Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 + shift


def _targets(loss: StyleLoss) -> dict[str, Tensor]:
    return {name: buffer for name, buffer in loss.named_buffers() if name.startswith("target")}


@pytest.mark.parametrize("statistic", DETERMINISTIC)
def test_blend_one_zero_gives_the_single_style(statistic: str) -> None:
    a, b = _features(0), _features(1, (1, 4, 6, 10), shift=1.0)
    single = StyleLoss(a, statistic)  # type: ignore[arg-type]
    for weights in ([1.0, 0.0], [3.0, 0.0]):
        blended = StyleLoss([a, b], statistic, weights=weights)  # type: ignore[arg-type]
        for name, value in _targets(single).items():
            torch.testing.assert_close(_targets(blended)[name], value, msg=name)
    features = _features(2, (2, 4, 8, 8))
    torch.testing.assert_close(StyleLoss([a, b], statistic, weights=[1, 0])(features), single(features))  # type: ignore[arg-type]


@pytest.mark.parametrize("statistic", DETERMINISTIC)
def test_blend_half_half_lies_between_the_two_styles(statistic: str) -> None:
    a, b = _features(0), _features(1, shift=1.0)
    half = StyleLoss([a, b], statistic, weights=[0.5, 0.5])  # type: ignore[arg-type]
    to_a, to_b = half(a).item(), half(b).item()
    # Each style is a (proper) distance away from the blend, less than the two styles are from each other.
    apart = StyleLoss(a, statistic)(b).item()  # type: ignore[arg-type]
    assert 0 < to_a < apart and 0 < to_b < apart
    # A blend weighted towards a is closer to a.
    leaning = StyleLoss([a, b], statistic, weights=[0.75, 0.25])  # type: ignore[arg-type]
    assert leaning(a).item() < to_a and leaning(b).item() > to_b


def test_gram_blend_is_the_weighted_mean_of_grams() -> None:
    a, b = _features(0), _features(1, (1, 4, 5, 7))
    blended = StyleLoss([a, b], "gram", weights=[3, 1]).target
    torch.testing.assert_close(blended, 0.75 * StyleLoss(a, "gram").target + 0.25 * StyleLoss(b, "gram").target)


def test_equal_weights_are_the_default_and_batches_count_per_image() -> None:
    a, b = _features(0), _features(1)
    for statistic in DETERMINISTIC:
        default = StyleLoss(torch.cat([a, b]), statistic)  # type: ignore[arg-type]
        explicit = StyleLoss([a, b], statistic, weights=[2.0, 2.0])  # type: ignore[arg-type]
        for name, value in _targets(default).items():
            torch.testing.assert_close(_targets(explicit)[name], value, msg=f"{statistic} {name}")


def test_meanvar_blend_is_the_mixture_of_the_features() -> None:
    # Two "images" whose mixture is exactly the concatenation of their positions (same size, equal weights).
    a, b = _features(0), _features(1, shift=3.0)
    blended = StyleLoss([a, b], "meanvar").target
    torch.testing.assert_close(blended, StyleLoss(torch.cat([a, b], dim=3), "meanvar").target)


@pytest.mark.parametrize("statistic", DETERMINISTIC)
def test_hard_masks_give_the_statistics_of_the_cropped_region(statistic: str) -> None:
    style, image = _features(0, (1, 4, 8, 8)), _features(1, (2, 4, 8, 8), shift=0.5)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:7, 1:5] = 1.0
    crop = (..., slice(2, 7), slice(1, 5))
    masked = StyleLoss([style], statistic, target_masks=[mask])  # type: ignore[arg-type]
    cropped = StyleLoss(style[crop], statistic)  # type: ignore[arg-type]
    for name, value in _targets(cropped).items():
        torch.testing.assert_close(_targets(masked)[name], value, msg=name)
    # The optimised image's mask: the region's statistics are compared, the rest is ignored.
    both = StyleLoss(style[crop], statistic, mask=mask)  # type: ignore[arg-type]
    torch.testing.assert_close(both(image), cropped(image[crop]))
    outside = image.clone()
    outside[..., 0, :] = 50.0
    torch.testing.assert_close(both(outside), both(image))


def test_masks_are_resized_by_area_to_each_layer() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :3] = 1.0
    small = resize_mask(mask, (4, 4))
    torch.testing.assert_close(small[0, 0, 0], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert small.mean().item() == pytest.approx(mask.mean().item())
    # At a coarser layer the soft mask weights the positions: a half-covered column counts half.
    features = _features(3, (1, 2, 4, 4))
    loss = StyleLoss(features, "gram", target_masks=[mask])
    weights = torch.tensor([1.0, 0.5, 0.0, 0.0]).repeat(4)
    flat = features.flatten(2)[0]
    expected = (flat * weights) @ flat.T / (2 * weights.sum())
    torch.testing.assert_close(loss.target[0], expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, "weights: 1 given for 2 style images"),
        ({"weights": [1.0, -0.5]}, "weights: must be finite and >= 0"),
        ({"weights": [0.0, 0.0]}, "weights: all zero"),
        ({"weights": [float("nan"), 1.0]}, "weights: must be finite"),
        ({"target_masks": [None]}, "target_masks: 1 given for 2 style images"),
        ({"target_masks": [None, torch.zeros(1, 1, 8, 8)]}, r"target_masks\[1\]: all zero"),
        ({"target_masks": [torch.full((1, 1, 8, 8), 2.0), None]}, r"target_masks\[0\]: values must lie in \[0, 1\]"),
        ({"mask": torch.zeros(1, 1, 8, 8)}, "mask: all zero"),
        ({"mask": torch.ones(1, 8, 8)}, r"mask: expected shape \(1\|B, 1, H, W\)"),
    ],
)
def test_bad_weights_and_masks_raise_naming_the_argument(kwargs: dict, message: str) -> None:
    for statistic in STATISTICS:
        with pytest.raises(ValueError, match=message):
            StyleLoss([_features(0), _features(1)], statistic, **kwargs)  # type: ignore[arg-type]


def test_layer_style_loss_passes_weights_and_masks_to_each_layer() -> None:
    a, b = _features(0), _features(1, shift=1.0)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1.0
    layers = LayerStyleLoss({"x": [a, b], "y": [a[..., ::2, ::2], b[..., ::2, ::2]]}, "gram", weights=[1, 0], mask=mask)
    for layer, features in (("x", a), ("y", a[..., ::2, ::2])):
        expected = StyleLoss(features, "gram", mask=mask)
        torch.testing.assert_close(layers.losses[layer].target, expected.target)
        torch.testing.assert_close(layers.losses[layer](b), expected(b))


def test_sliced_w_hard_masks_equal_the_cropped_region_with_the_same_projections() -> None:
    style, image = _features(0, (1, 4, 8, 8)), _features(1, (2, 4, 8, 8), shift=0.5)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:7, 1:5] = 1.0
    crop = (..., slice(2, 7), slice(1, 5))
    masked = StyleLoss([style, image[:1]], "sliced_w", weights=[1, 0], target_masks=[mask, None], mask=mask, seed=5)
    cropped = StyleLoss(style[crop], "sliced_w", seed=5)
    for _ in range(3):
        torch.testing.assert_close(masked(image), cropped(image[crop]))


@pytest.mark.parametrize("statistic", STATISTICS)
def test_masked_losses_give_one_value_per_batch_element(statistic: str) -> None:
    style, batch = _features(0), _features(1, (3, 4, 8, 8))
    masks = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    values = StyleLoss(style, statistic, mask=masks, seed=1)(batch)  # type: ignore[arg-type]
    alone = torch.cat(
        [StyleLoss(style, statistic, mask=masks[i : i + 1], seed=1)(batch[i : i + 1]) for i in range(3)]  # type: ignore[arg-type]
    )
    torch.testing.assert_close(values, alone)
    assert values.shape == (3,) and len(set(values.tolist())) == 3
