from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_nst.core.losses import (
    ContentLoss,
    LayerStyleLoss,
    StyleLoss,
    gram_matrix,
    mean_std,
    style_statistic,
    total_variation,
)
from lightning_nst.core.metrics import StyleDistance

# Hand-checkable (1, C=2, H=2, W=3) features: N = 2 channels, M = 6 positions.
X = [[1.0, 2.0, 0.0, 3.0, 1.0, 2.0], [0.0, 1.0, 1.0, 2.0, 0.0, 3.0]]
Y = [[2.0, 0.0, 1.0, 1.0, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0, 1.0, 1.0]]
EPS = 1e-5


def _tensor(rows: list[list[float]], h: int = 2) -> Tensor:
    """``N x M`` nested lists as ``(1, N, h, M // h)`` features."""
    return torch.tensor(rows, dtype=torch.float64).view(1, len(rows), h, -1).float()


def _rows(features: Tensor) -> list[list[float]]:
    """The first batch element of ``(B, C, H, W)`` features as an ``N x M`` nested list."""
    return features[0].flatten(1).double().tolist()


def _raw_gram(f: list[list[float]]) -> list[list[float]]:
    return [[sum(a * b for a, b in zip(fi, fj, strict=True)) for fj in f] for fi in f]


def _gatys_e_l(f: list[list[float]], p: list[list[float]]) -> float:
    """Gatys et al.'s E_l = 1 / (4 N^2 M^2) sum_ij (G_ij - A_ij)^2 with raw Gram matrices."""
    n, m = len(f), len(f[0])
    g, a = _raw_gram(f), _raw_gram(p)
    return sum((g[i][j] - a[i][j]) ** 2 for i in range(n) for j in range(n)) / (4 * n**2 * m**2)


def _mu_sigma(f: list[list[float]], eps: float = EPS) -> tuple[list[float], list[float]]:
    """AdaIN's Eq. 5-6: population variance, eps inside the root."""
    mu = [sum(row) / len(row) for row in f]
    sigma = [math.sqrt(sum((x - m) ** 2 for x in row) / len(row) + eps) for row, m in zip(f, mu, strict=True)]
    return mu, sigma


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


def _autograd_gram_gradient(features: Tensor, weights: Tensor) -> Tensor:
    """The gradient of ``sum(weights * G)`` by autograd's own matmul backward, in float32, NCHW."""
    flat = features.detach().float().contiguous().requires_grad_(True)
    rows = flat.flatten(2)
    gram = rows @ rows.transpose(1, 2) / rows.shape[1:].numel()
    return torch.autograd.grad((weights * gram).sum(), flat)[0]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gram_gradient_is_autograds_in_float32_whatever_the_layout(layout: torch.memory_format) -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 8, 5, 7).contiguous(memory_format=layout).requires_grad_(True)
    weights = torch.randn(2, 8, 8)  # not symmetric: both halves of the product rule count
    gram = gram_matrix(features)
    (grad,) = torch.autograd.grad((weights * gram).sum(), features)
    rows = features.detach().flatten(2)
    assert torch.equal(gram, rows @ rows.transpose(1, 2) / (8 * 35))
    torch.testing.assert_close(grad, _autograd_gram_gradient(features, weights), rtol=1e-5, atol=1e-6)
    assert grad.is_contiguous(memory_format=layout), "the gradient leaves in the features' own layout"


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gram_of_bf16_features_is_float32_with_a_bf16_gradient_close_to_float32s(layout: torch.memory_format) -> None:
    torch.manual_seed(0)
    features = torch.randn(1, 16, 12, 10).contiguous(memory_format=layout).bfloat16().requires_grad_(True)
    weights = torch.randn(1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = gram_matrix(features)
        (grad,) = torch.autograd.grad((weights * gram).sum(), features)
    rows = features.detach().float().flatten(2)
    # The statistic is the float32 Gram of the bf16 values (their products are exact in float32).
    torch.testing.assert_close(gram, rows @ rows.transpose(1, 2) / (16 * 120), rtol=1e-6, atol=1e-7)
    assert gram.dtype == torch.float32 and grad.dtype == torch.bfloat16
    expected = _autograd_gram_gradient(features, weights)
    cosine = torch.nn.functional.cosine_similarity(grad.float().flatten(), expected.flatten(), dim=0)
    # Measured 0.999998 in both layouts; the product with one half of the rule only (G' F, not (G' + G'ᵀ) F) 0.76.
    assert cosine > 0.9999
    torch.testing.assert_close(grad.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert grad.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_content_loss_and_its_gradient_are_autograds_in_the_features_layout_and_dtype(
    layout: torch.memory_format, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    target = torch.randn(1, 8, 5, 7).contiguous(memory_format=layout)
    features = torch.randn(2, 8, 5, 7).contiguous(memory_format=layout).to(dtype).requires_grad_(True)
    weights = torch.tensor([0.7, -1.3])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = ContentLoss(target)(features)
        (grad,) = torch.autograd.grad((weights * loss).sum(), features)
    wide = features.detach().float().requires_grad_(True)
    expected_loss = (wide - target).square().mean(dim=(1, 2, 3))
    (expected,) = torch.autograd.grad((weights * expected_loss).sum(), wide)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected_loss.detach())
    assert grad.dtype == dtype and grad.is_contiguous(memory_format=layout), "the gradient keeps the features' form"
    torch.testing.assert_close(grad, expected.to(dtype), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-7)


def test_unknown_statistic() -> None:
    with pytest.raises(ValueError, match="unknown style statistic 'wasserstein'"):
        style_statistic(torch.rand(1, 1, 2, 2), "wasserstein")  # type: ignore[arg-type]


# -- each docstring formula, hand-computed by an independent route ------------------------------------------------


def test_gram_matrix_matches_loops_on_hand_features() -> None:
    n, m = 2, 6
    expected = [[value / (n * m) for value in row] for row in _raw_gram(X)]
    assert expected == [[19 / 12, 14 / 12], [14 / 12, 15 / 12]]
    torch.testing.assert_close(gram_matrix(_tensor(X)), torch.tensor([expected]))


def test_gram_style_loss_is_4_e_l_over_n_squared() -> None:
    # Raw Grams: G = [[19, 14], [14, 15]], A = [[7, 3], [3, 7]]; sum (G - A)^2 = 450, E_l = 450 / (4 * 4 * 36).
    e_l = _gatys_e_l(X, Y)
    assert e_l == 450 / 576
    value = StyleLoss(_tensor(Y), "gram")(_tensor(X))
    torch.testing.assert_close(value, torch.tensor([4 * e_l / 2**2]))
    assert value.item() != pytest.approx(4 * e_l)  # what README and docstring used to claim


@pytest.mark.parametrize("shape", [(3, 2, 2), (5, 3, 4), (64, 2, 3)])
def test_gram_style_loss_relation_to_e_l_for_other_widths(shape: tuple[int, int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    features, target = (torch.randint(0, 4, (1, *shape), generator=generator).float() for _ in range(2))
    n = shape[0]
    e_l = _gatys_e_l(_rows(features), _rows(target))
    torch.testing.assert_close(StyleLoss(target, "gram")(features), torch.tensor([4 * e_l / n**2]))


def test_content_loss_is_2_over_nm_times_gatys() -> None:
    n, m = 2, 6
    gatys = 0.5 * sum((x - p) ** 2 for fx, fp in zip(X, Y, strict=True) for x, p in zip(fx, fp, strict=True))
    assert gatys == 13.0
    torch.testing.assert_close(ContentLoss(_tensor(Y))(_tensor(X)), torch.tensor([2 / (n * m) * gatys]))


def test_mean_std_matches_adain_definition() -> None:
    mu, sigma = _mu_sigma(X)
    assert mu == [1.5, 7 / 6]
    torch.testing.assert_close(mean_std(_tensor(X)), torch.tensor([[mu, sigma]]))


def test_meanvar_style_loss_is_squared_adain_norms_over_n() -> None:
    n = 2
    (mu, sigma), (mu_s, sigma_s) = _mu_sigma(X), _mu_sigma(Y)
    mean_norm = math.sqrt(sum((a - b) ** 2 for a, b in zip(mu, mu_s, strict=True)))
    std_norm = math.sqrt(sum((a - b) ** 2 for a, b in zip(sigma, sigma_s, strict=True)))
    value = StyleLoss(_tensor(Y), "meanvar")(_tensor(X))
    torch.testing.assert_close(value, torch.tensor([(mean_norm**2 + std_norm**2) / n]))
    assert value.item() != pytest.approx(mean_norm + std_norm)  # AdaIN's plain L2 norms: a different quantity


def test_mean_std_eps_bias_is_as_documented() -> None:
    # Channels of population std s exactly: +-s alternating over M = 4 positions.
    stds = [0.0, 0.0099, 0.0223, 0.1, 1.0]
    features = torch.tensor([[s, -s, s, -s] for s in stds], dtype=torch.float64).view(1, 5, 2, 2)
    sigma = mean_std(features.float())[0, 1].double()
    torch.testing.assert_close(sigma, torch.tensor([math.sqrt(s**2 + EPS) for s in stds], dtype=torch.float64))
    assert sigma[0].item() == pytest.approx(math.sqrt(EPS))  # a dead channel
    assert ((sigma - torch.tensor(stds, dtype=torch.float64)) < math.sqrt(EPS)).all()
    assert sigma[1].item() / stds[1] - 1 == pytest.approx(0.05, abs=1e-3)
    assert sigma[2].item() / stds[2] - 1 == pytest.approx(0.01, abs=1e-4)
    assert sigma[4].item() / stds[4] - 1 < 1e-5
    constant = torch.full((1, 1, 2, 2), 3.0, requires_grad=True)
    StyleLoss(torch.rand(1, 1, 2, 2), "meanvar")(constant).sum().backward()
    assert constant.grad is not None and torch.isfinite(constant.grad).all()


def test_total_variation_matches_loops() -> None:
    image = torch.tensor(X + Y, dtype=torch.float64).view(1, 4, 2, 3).float() / 3  # C=4, H=2, W=3
    x = image[0].double().tolist()
    c, h, w = 4, 2, 3
    vertical = sum(abs(x[k][i + 1][j] - x[k][i][j]) for k in range(c) for i in range(h - 1) for j in range(w))
    horizontal = sum(abs(x[k][i][j + 1] - x[k][i][j]) for k in range(c) for i in range(h) for j in range(w - 1))
    torch.testing.assert_close(total_variation(image), torch.tensor([(vertical + horizontal) / (c * h * w)]))


def test_default_layer_weights_are_one_over_layer_count() -> None:
    targets = {layer: _tensor(Y) for layer in ("a", "b", "c")}
    features = {"a": _tensor(X), "b": _tensor(Y), "c": _tensor(X) * 2}
    loss = LayerStyleLoss(targets, "gram")
    assert loss.layer_weights == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    expected = sum(4 * _gatys_e_l(_rows(features[layer]), Y) / 2**2 for layer in targets) / 3
    torch.testing.assert_close(loss(features), torch.tensor([expected]))


@pytest.mark.parametrize("statistic", ["gram", "meanvar"])
def test_several_style_images_blend_as_the_mixture_of_their_features(statistic: str) -> None:
    a, b = _tensor(X), _tensor(Y)
    as_list, as_batch = StyleLoss([a, b], statistic), StyleLoss(torch.cat([a, b]), statistic)
    if statistic == "gram":
        expected = [
            [(p + q) / 2 / 12 for p, q in zip(ra, rb, strict=True)]
            for ra, rb in zip(_raw_gram(X), _raw_gram(Y), strict=True)
        ]
    else:  # the mixture's mean and second moment: sigma^2 = mean of (s^2 + mu^2) - mu_blend^2 (+ eps once)
        (mu_x, sd_x), (mu_y, sd_y) = _mu_sigma(X, eps=0.0), _mu_sigma(Y, eps=0.0)
        mu = [(a + b) / 2 for a, b in zip(mu_x, mu_y, strict=True)]
        second = [(sx**2 + mx**2 + sy**2 + my**2) / 2 for sx, mx, sy, my in zip(sd_x, mu_x, sd_y, mu_y, strict=True)]
        expected = [mu, [math.sqrt(q - m**2 + EPS) for q, m in zip(second, mu, strict=True)]]
        averaged_std = [(a + b) / 2 for a, b in zip(_mu_sigma(X)[1], _mu_sigma(Y)[1], strict=True)]
        assert not torch.allclose(as_list.target[0, 1], torch.tensor(averaged_std))  # the blend before issue 16
    torch.testing.assert_close(as_list.target, torch.tensor([expected]))
    torch.testing.assert_close(as_batch.target, as_list.target)


def test_every_loss_returns_one_value_per_batch_element() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(3, 4, 5, 6, generator=generator)
    target = torch.rand(1, 4, 5, 6, generator=generator)
    losses = {
        "content": ContentLoss(target),
        "gram": StyleLoss(target, "gram"),
        "meanvar": StyleLoss(target, "meanvar"),
        "tv": total_variation,
        "layers": lambda f: LayerStyleLoss({"a": target, "b": target * 2}, "gram", {"a": 0.3, "b": 2.0})(
            {"a": f, "b": f}
        ),
    }
    for name, loss in losses.items():
        values = loss(batch)
        assert values.shape == (3,), name
        alone = torch.cat([loss(batch[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(values, alone, msg=name)
        assert len(set(values.tolist())) == 3, name


class _IdentityFeatures(nn.Module):
    """Stands in for the VGG19 trunk: layer ``"x"`` is the image itself."""

    layers = ["x"]

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return {"x": image}


def test_style_distance_is_mean_unweighted_style_loss_over_images() -> None:
    styles = [torch.tensor(Y[0] * 2).view(1, 3, 2, 2), torch.tensor(X[0] * 2).view(1, 3, 2, 2)]
    images = torch.tensor([X[1] * 2, Y[1] * 2, X[0] + Y[0]]).view(3, 3, 2, 2)
    metric = StyleDistance(_IdentityFeatures(), styles, "gram")  # type: ignore[arg-type]
    metric.update(images[:2])
    metric.update(images[2:])
    blended = [
        [(p + q) / 2 / 12 for p, q in zip(rp, rq, strict=True)]
        for rp, rq in zip(*(_raw_gram(_rows(s)) for s in styles), strict=True)
    ]
    per_image = []
    for image in images:
        g = [[value / 12 for value in row] for row in _raw_gram(_rows(image[None]))]
        per_image.append(sum((g[i][j] - blended[i][j]) ** 2 for i in range(3) for j in range(3)) / 9)
    torch.testing.assert_close(metric.compute(), torch.tensor(sum(per_image) / 3))
