"""The fast style networks: sizes kept, outputs in range, records that rebuild them exactly."""

from __future__ import annotations

import pytest
import torch

from lightning_nst.core.errors import NSTError
from lightning_nst.nst.fast.networks import (
    RECORD_KEY,
    AdaINNet,
    FastNetworkRecord,
    TransformerNet,
    adain,
    adain_style_layers,
    build_network,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("height", "width"), [(33, 47), (64, 64), (17, 90)])
def test_transformer_keeps_odd_sizes_and_range(height: int, width: int) -> None:
    torch.manual_seed(0)
    network = TransformerNet(width=4, residual_blocks=1)
    image = torch.rand(2, 3, height, width)
    out = network(image)
    assert out.shape == image.shape
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0


@pytest.mark.parametrize(("height", "width"), [(33, 47), (40, 21)])
def test_adain_keeps_odd_sizes(height: int, width: int) -> None:
    network = AdaINNet("relu2_1", weights="random")
    content, style = torch.rand(1, 3, height, width), torch.rand(1, 3, 24, 30)
    out = network(content, style)
    assert out.shape == content.shape and 0 <= out.min() and out.max() <= 1


def test_adain_matches_the_style_statistics() -> None:
    content = torch.randn(2, 8, 5, 7)
    mean, std = torch.randn(2, 8), torch.rand(2, 8) + 0.5
    flat = adain(content, mean, std).flatten(2)
    torch.testing.assert_close(flat.mean(2), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(2, unbiased=False).sqrt(), std, atol=1e-3, rtol=1e-3)


def test_adain_alpha_zero_decodes_the_content_features_and_weights_mix_styles() -> None:
    torch.manual_seed(0)
    network = AdaINNet("relu2_1", weights="random")
    content = torch.rand(1, 3, 32, 32)
    styles = torch.rand(2, 3, 32, 32)
    plain = network.decoder(network.encode(content)["relu2_1"]).clamp(0, 1)
    torch.testing.assert_close(network(content, styles[:1], alpha=0.0), plain)
    first = network(content, styles, style_weights=[1.0, 0.0])
    torch.testing.assert_close(first, network(content, styles[:1]))
    with pytest.raises(NSTError, match="style_weights: 3 weights for 2 styles"):
        network(content, styles, style_weights=[1, 1, 1])


def test_adain_style_layers_follow_the_encoder() -> None:
    assert adain_style_layers("relu4_1") == ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]
    assert adain_style_layers("relu3_1") == ["relu1_1", "relu2_1", "relu3_1"]


def test_network_options_are_checked() -> None:
    with pytest.raises(NSTError, match="network: width must be >= 1"):
        TransformerNet(width=0)
    with pytest.raises(NSTError, match="network.encoder_layer: must be a ReLU layer"):
        AdaINNet("conv3_1", weights="random")


@pytest.mark.parametrize("kind", ["johnson", "adain"])
def test_a_record_and_state_dict_rebuild_the_network_exactly(kind: str) -> None:
    torch.manual_seed(1)
    if kind == "johnson":
        network = TransformerNet(width=4, residual_blocks=2)
        record = FastNetworkRecord("johnson", {"width": 4, "residual_blocks": 2}, style="x.jpg")
        inputs: tuple[torch.Tensor, ...] = (torch.rand(1, 3, 29, 35),)
    else:
        network = AdaINNet("relu2_1", weights="random")
        record = FastNetworkRecord("adain", {"encoder_layer": "relu2_1"})
        inputs = (torch.rand(1, 3, 29, 35), torch.rand(1, 3, 20, 20))
    with torch.no_grad():  # a trained network's weights differ from a fresh one's
        for parameter in network.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    stored = FastNetworkRecord.from_dict(record.to_dict(), "model.ckpt")
    rebuilt = build_network(stored)
    rebuilt.load_state_dict(network.state_dict())
    torch.testing.assert_close(rebuilt(*inputs), network(*inputs), rtol=0, atol=0)


def test_a_record_of_another_kind_or_format_is_refused() -> None:
    with pytest.raises(NSTError, match=f"model.ckpt: not a fast style network checkpoint \\(no '{RECORD_KEY}'"):
        FastNetworkRecord.from_dict({"kind": "gatys"}, "model.ckpt")
    record = FastNetworkRecord("johnson", {}).to_dict() | {"format": 99}
    with pytest.raises(NSTError, match="model.ckpt: fast network record format 99"):
        FastNetworkRecord.from_dict(record, "model.ckpt")
