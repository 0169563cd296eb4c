from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision.models import VGG19_Weights, vgg19

from lightning_nst.core import vgg as vgg_module
from lightning_nst.core.errors import NSTError
from lightning_nst.core.vgg import CONV_LAYERS, LAYER_NAMES, WEIGHTS_ENV, VGG19Features, min_input_size


@pytest.fixture(scope="module")
def torchvision_features() -> nn.Sequential:
    torch.manual_seed(1)
    return vgg19(weights=None).features.eval()


@pytest.fixture
def full_weights_file(tmp_path: Path, torchvision_features: nn.Sequential) -> Path:
    path = tmp_path / "vgg19_features.pth"
    torch.save(torchvision_features.state_dict(), path)
    return path


def test_names_match_torchvision_modules(torchvision_features: nn.Sequential) -> None:
    assert len(LAYER_NAMES) == len(torchvision_features) == 37
    assert len(CONV_LAYERS) == 16
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for name, module in zip(LAYER_NAMES, torchvision_features, strict=True):
        assert isinstance(module, kinds[name[:4]]), name
    assert (LAYER_NAMES[0], LAYER_NAMES[4], LAYER_NAMES[22], LAYER_NAMES[36]) == (
        "conv1_1",
        "pool1",
        "relu4_2",
        "pool5",
    )


def test_every_layer_equals_torchvision_at_its_index(
    full_weights_file: Path, torchvision_features: nn.Sequential
) -> None:
    features = VGG19Features(LAYER_NAMES, weights=full_weights_file)
    image = torch.rand(1, 3, 32, 32)
    ours = features(image)
    transform = VGG19_Weights.IMAGENET1K_V1.transforms()
    x = (image - torch.tensor(transform.mean).view(1, 3, 1, 1)) / torch.tensor(transform.std).view(1, 3, 1, 1)
    with torch.no_grad():
        for index, module in enumerate(torchvision_features):
            x = module(x.clone())  # torchvision's ReLUs are in place
            torch.testing.assert_close(ours[LAYER_NAMES[index]], x, msg=LAYER_NAMES[index])
    assert "file" in features.weights_used and "conv1_1..pool5" in features.weights_used


def test_truncated_after_deepest_layer_and_frozen() -> None:
    features = VGG19Features(["relu1_1", "conv2_2"], weights="random")
    assert len(features.trunk) == LAYER_NAMES.index("conv2_2") + 1
    assert all(not p.requires_grad for p in features.parameters())
    out = features(torch.rand(2, 3, 16, 16, requires_grad=True))
    assert set(out) == {"relu1_1", "conv2_2"}
    # conv outputs are not overwritten by an in-place ReLU
    assert (VGG19Features(["conv1_1"], weights="random")(torch.rand(1, 3, 8, 8))["conv1_1"] < 0).any()


def test_average_pooling_and_min_size() -> None:
    features = VGG19Features(["relu3_1"], weights="random", pooling="avg")
    assert any(isinstance(m, nn.AvgPool2d) for m in features.trunk)
    assert not any(isinstance(m, nn.MaxPool2d) for m in features.trunk)
    assert min_input_size(["relu1_1"]) == 1 and min_input_size(["relu5_1"]) == 16 and features.min_input_size == 4


def test_random_weights_are_seeded() -> None:
    a = VGG19Features(["conv1_1"], weights="random", seed=3).trunk[0].weight
    b = VGG19Features(["conv1_1"], weights="random", seed=3).trunk[0].weight
    c = VGG19Features(["conv1_1"], weights="random", seed=4).trunk[0].weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_layer_names_key_and_suggests() -> None:
    with pytest.raises(NSTError, match=r"vgg\.layers: unknown VGG19 layer 'relu4_5'.*did you mean relu4_4"):
        VGG19Features(["relu4_5"], weights="random")


def test_partial_real_weights_load(partial_weights: Path) -> None:
    features = VGG19Features(["relu1_1", "relu3_1"], weights=partial_weights)
    # conv1_1 bias of the real ImageNet weights (shared/models/PROVENANCE.md)
    torch.testing.assert_close(features.trunk[0].bias[:3], torch.tensor([-0.913, 0.307, -1.306]), atol=1e-3, rtol=0)
    assert "covers conv1_1..relu3_1" in features.weights_used


def test_layer_deeper_than_partial_weights_lists_available(partial_random_weights: Path) -> None:
    with pytest.raises(NSTError) as error:
        VGG19Features(["relu4_2"], weights=partial_random_weights, key="model.vgg")
    message = str(error.value)
    assert message.startswith("model.vgg.weights:") and "relu4_2" in message and "\n" not in message
    assert "available layers: conv1_1, relu1_1, conv1_2" in message and message.count("relu3_1") >= 1
    filled = VGG19Features(["relu4_2"], weights=partial_random_weights, fill_missing=True)
    assert "random beyond relu3_1" in filled.weights_used
    assert filled.pretrained_layers[-1] == "relu3_1" and "conv3_2" not in filled.pretrained_layers
    assert VGG19Features(["relu2_1"], weights=partial_random_weights).pretrained_layers[-1] == "relu2_1"
    assert VGG19Features(["relu2_1"], weights="random").pretrained_layers == ()


def test_wrong_architecture_and_missing_file(tmp_path: Path) -> None:
    wrong = tmp_path / "resnet.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 7)).state_dict(), wrong)
    with pytest.raises(NSTError, match="is not a VGG19 features state_dict"):
        VGG19Features(["relu1_1"], weights=wrong)
    with pytest.raises(NSTError, match="weights file not found"):
        VGG19Features(["relu1_1"], weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(NSTError, match="cannot load"):
        VGG19Features(["relu1_1"], weights=garbage)


def test_whole_vgg19_state_dict_is_accepted(tmp_path: Path, torchvision_features: nn.Sequential) -> None:
    path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in torchvision_features.state_dict().items()}, path)
    features = VGG19Features(["conv1_1"], weights=path)
    torch.testing.assert_close(features.trunk[0].weight, torchvision_features[0].weight)


def _offline(*args: object, **kwargs: object) -> None:
    raise URLError("offline")


def test_auto_falls_back_to_env_file_then_random(monkeypatch: pytest.MonkeyPatch, full_weights_file: Path) -> None:
    monkeypatch.setattr(vgg_module, "_imagenet_state", _offline)
    monkeypatch.setenv(WEIGHTS_ENV, str(full_weights_file))
    assert f"chosen by auto from ${WEIGHTS_ENV}" in VGG19Features(["relu1_1"], weights="auto").weights_used
    monkeypatch.delenv(WEIGHTS_ENV)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        used = VGG19Features(["relu1_1"], weights="auto").weights_used
    assert used.startswith("random")


def test_imagenet_goes_through_torchvision_weights(
    monkeypatch: pytest.MonkeyPatch, torchvision_features: nn.Sequential
) -> None:
    calls = []

    def get_state_dict(self: VGG19_Weights, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append((self, kwargs))
        return {f"features.{k}": v for k, v in torchvision_features.state_dict().items()}

    monkeypatch.setattr(VGG19_Weights, "get_state_dict", get_state_dict)
    monkeypatch.setattr(vgg_module, "unreachable", lambda url: None)  # as online: the hub's host answers
    features = VGG19Features(["relu1_1"], weights="imagenet")
    assert calls and calls[0][0] is VGG19_Weights.IMAGENET1K_V1 and calls[0][1].get("weights_only") is True
    assert features.weights_used.startswith("imagenet (torchvision VGG19_Weights.IMAGENET1K_V1")
    torch.testing.assert_close(features.trunk[0].weight, torchvision_features[0].weight)


def test_auto_with_env_file_never_tries_to_download(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], full_weights_file: Path
) -> None:
    import torchvision.models._api

    def no_network(*args: object, **kwargs: object) -> None:
        pytest.fail("weights: auto tried the torch hub although $LIGHTNING_NST_VGG_WEIGHTS names a file")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    monkeypatch.setenv(WEIGHTS_ENV, str(full_weights_file))
    used = VGG19Features(["relu1_1"], weights="auto").weights_used
    assert f"chosen by auto from ${WEIGHTS_ENV}" in used
    assert "Downloading" not in "".join(capfd.readouterr())


def test_offline_auto_falls_back_without_trying_to_download(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        pytest.fail("the hub was asked to download while its host cannot be reached")

    monkeypatch.setattr(vgg_module, "unreachable", lambda url: "Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.warns(UserWarning, match=r"unavailable \(.*Name or service not known\).*using RANDOM weights") as seen:
        used = VGG19Features(["relu1_1"], weights="auto").weights_used
    # Worded for style transfer and guided diffusion alike
    assert "no style transfer, no style guidance" in str(seen[0].message) and "neural style" not in str(seen[0].message)
    assert used == "random (seed 0, chosen by auto: ImageNet unavailable)"
    assert "Downloading" not in "".join(capfd.readouterr())


def test_auto_prefers_cached_imagenet_over_env_file(
    monkeypatch: pytest.MonkeyPatch, full_weights_file: Path, torchvision_features: nn.Sequential
) -> None:
    cached = vgg_module._imagenet_cache_path()
    cached.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in torchvision_features.state_dict().items()}, cached)
    monkeypatch.setenv(WEIGHTS_ENV, str(full_weights_file))
    assert VGG19Features(["relu1_1"], weights="auto").weights_used.startswith("imagenet (")
