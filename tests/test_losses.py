from __future__ import annotations

import pytest
import torch

from lightning_nst.losses import (
    ContentLoss,
    LayerStyleLoss,
    StyleLoss,
    gram_matrix,
    mean_std,
    style_statistic,
    total_variation,
)


def test_gram_matrix_formula() -> None:
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # C=2, H=1, W=2
    expected = torch.tensor([[1 + 4, 3 + 8], [3 + 8, 9 + 16]]) / (2 * 1 * 2)
    torch.testing.assert_close(gram_matrix(features), expected.view(1, 2, 2))


def test_mean_std_formula() -> None:
    features = torch.tensor([[1.0, 3.0], [2.0, 2.0]]).view(1, 2, 1, 2)
    mean, std = mean_std(features, eps=0.0)[0]
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(std, torch.tensor([1.0, 0.0]))


def test_content_loss_is_per_sample_mse_and_zero_at_target() -> None:
    target = torch.randn(1, 4, 5, 5)
    loss = ContentLoss(target)
    features = torch.stack([target[0], target[0] + 2.0])
    torch.testing.assert_close(loss(features), torch.tensor([0.0, 4.0]))


@pytest.mark.parametrize("statistic", ["gram", "meanvar"])
def test_style_loss_zero_at_target_and_passes_gradients(statistic: str) -> None:
    target = torch.rand(1, 8, 6, 6)
    loss = StyleLoss(target, statistic)
    assert loss(target).item() == pytest.approx(0.0, abs=1e-12)
    features = torch.rand(2, 8, 6, 6, requires_grad=True)
    value = loss(features)
    assert value.shape == (2,) and (value > 0).all()
    value.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_meanvar_loss_sums_mean_and_std_terms() -> None:
    target, features = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
    expected_mean, expected_std = (mean_std(features) - mean_std(target))[0].square().mean(dim=1)
    torch.testing.assert_close(StyleLoss(target, "meanvar")(features)[0], expected_mean + expected_std)


def test_gram_loss_is_mse_of_grams() -> None:
    target, features = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
    expected = (gram_matrix(features) - gram_matrix(target)).square().mean()
    torch.testing.assert_close(StyleLoss(target, "gram")(features)[0], expected)


def test_several_style_images_of_different_sizes_average_statistics() -> None:
    a, b = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 6, 8)
    loss = StyleLoss([a, b], "gram")
    torch.testing.assert_close(loss.target, (gram_matrix(a) + gram_matrix(b)) / 2)


def test_total_variation_formula() -> None:
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0, 0, 0] = 1.0  # differs from its right and lower neighbour in one channel
    torch.testing.assert_close(total_variation(image), torch.tensor([2.0 / 12]))
    assert total_variation(torch.ones(2, 3, 4, 4)).tolist() == [0.0, 0.0]


def test_layer_style_loss_weights() -> None:
    targets = {"a": torch.rand(1, 3, 4, 4), "b": torch.rand(1, 5, 2, 2)}
    features = {"a": torch.rand(2, 3, 4, 4), "b": torch.rand(2, 5, 2, 2)}
    default = LayerStyleLoss(targets, "gram")
    per_layer = default.per_layer(features)
    torch.testing.assert_close(default(features), (per_layer["a"] + per_layer["b"]) / 2)
    weighted = LayerStyleLoss(targets, "gram", {"a": 3.0})
    torch.testing.assert_close(weighted(features), 3.0 * per_layer["a"])
    with pytest.raises(ValueError, match="without targets"):
        LayerStyleLoss(targets, "gram", {"c": 1.0})


@pytest.mark.parametrize("statistic", ["gram", "meanvar"])
def test_statistics_stay_fp32_and_finite_under_bf16_autocast(statistic: str) -> None:
    # Large activations whose squares overflow fp16 and lose precision in bf16.
    features = (torch.rand(1, 16, 64, 64) * 300).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = style_statistic(features, statistic)
        loss = StyleLoss(features.float(), statistic)(features)
    assert value.dtype == torch.float32 and torch.isfinite(value).all()
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_unknown_statistic() -> None:
    with pytest.raises(ValueError, match="unknown style statistic 'wasserstein'"):
        style_statistic(torch.rand(1, 1, 2, 2), "wasserstein")  # type: ignore[arg-type]
