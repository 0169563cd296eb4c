"""Using a trained fast network: the checkpoint contract, any image size, AdaIN's controls, folders and the export.

The checkpoints are built here as the training writes them (the contract of lightning_nst.nst.fast.networks), from
narrow seeded networks with random weights: what is tested holds for any weights.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from lightning_nst.core.color import chroma_difference, match_color
from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import load_image
from lightning_nst.nst.fast.inference import (
    EXTRA_FILE,
    FastNetwork,
    Stylizer,
    export_torchscript,
    image_files,
    load_network,
    load_torchscript,
    stylize_folder,
    stylize_images,
    stylize_video,
)
from lightning_nst.nst.fast.networks import RECORD_KEY, AdaINNet, FastNetworkRecord, TransformerNet

pytestmark = pytest.mark.usefixtures("one_thread")

JOHNSON = {"width": 8, "residual_blocks": 1}
ADAIN = {"encoder_layer": "relu2_1"}


def save_checkpoint(net: nn.Module, record: FastNetworkRecord, path: Path) -> Path:
    """A checkpoint as the training writes it: ``network.`` weights and the record, nothing else of the module."""
    torch.save(
        {
            "state_dict": {"network." + key: value for key, value in net.state_dict().items()},
            RECORD_KEY: record.to_dict(),
            "pytorch-lightning_version": lightning.__version__,
            "global_step": 0,
            "epoch": 0,
        },
        path,
    )
    return path


def johnson_net() -> TransformerNet:
    torch.manual_seed(0)
    return TransformerNet(**JOHNSON)


def adain_net() -> AdaINNet:
    torch.manual_seed(0)
    net = AdaINNet(weights="random", **ADAIN)
    # An untrained decoder's output sits below 0 and is clamped to black; its last convolution is scaled and shifted
    # so that the output spreads over [0, 1] (std about 0.1) and differences between settings show.
    last = net.decoder[-1][-1]
    with torch.no_grad():
        last.weight.mul_(5)
        last.bias.fill_(0.5)
    return net


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        "johnson": save_checkpoint(
            johnson_net(), FastNetworkRecord("johnson", JOHNSON, style="painting.png", vgg_weights="random"),
            folder / "johnson.ckpt",
        ),
        "adain": save_checkpoint(
            adain_net(), FastNetworkRecord("adain", ADAIN, vgg_weights="random"), folder / "adain.ckpt"
        ),
    }  # fmt: skip


def noise(*shape: int, seed: int = 0) -> Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def write_png(path: Path, height: int, width: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(array).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_a_checkpoint_rebuilds_the_trained_network(checkpoints: dict[str, Path]) -> None:
    content, style = noise(1, 3, 32, 32), noise(1, 3, 32, 32, seed=1)
    johnson = load_network(checkpoints["johnson"])
    assert johnson.kind == "johnson" and johnson.record.style == "painting.png" and not johnson.module.training
    assert all(not parameter.requires_grad for parameter in johnson.module.parameters())
    assert torch.equal(johnson.module(content), johnson_net().eval()(content))
    adain = load_network(checkpoints["adain"])
    assert adain.kind == "adain" and adain.path == checkpoints["adain"]
    assert torch.equal(adain.module(content, style), adain_net().eval()(content, style))


@pytest.mark.parametrize("kind", ["johnson", "adain"])
@pytest.mark.parametrize("size", [(33, 47), (17, 9), (64, 31)])
def test_inference_keeps_odd_sizes(checkpoints: dict[str, Path], kind: str, size: tuple[int, int]) -> None:
    style = noise(1, 3, 40, 40, seed=1) if kind == "adain" else None
    stylizer = Stylizer(checkpoints[kind], style, precision="32")
    out = stylizer(noise(2, 3, *size))
    assert out.shape == (2, 3, *size) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 1e-3  # an image, not a constant


def test_a_file_of_odd_size_comes_back_at_its_size(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    photo = write_png(tmp_path / "photo.png", 35, 53, seed=0)
    (out,) = stylize_images(checkpoints["johnson"], photo)
    assert out.shape == (1, 3, 35, 53)
    (smaller,) = stylize_images(checkpoints["johnson"], photo, size=27)  # --size: the long edge
    assert smaller.shape == (1, 3, 18, 27)


def _image_optimisation_checkpoint(path: Path) -> None:
    # The shape of an ImageOptimization checkpoint (lightning-nst fit/stylize): the image as a parameter, the
    # module's resume state under "lightning_nst", and no fast network record.
    torch.save(
        {
            "state_dict": {"images.0": torch.rand(1, 3, 8, 8)},
            "lightning_nst": {"version": 1},
            "hyper_parameters": {"_class_path": "lightning_nst.nst.module.ImageOptimization"},
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )


def _bad_checkpoint(kind: str, path: Path) -> str:
    """Write a bad ``--network`` file of ``kind``; return the words its refusal must hold."""
    record = FastNetworkRecord("johnson", JOHNSON).to_dict()
    weights = {"network." + key: value for key, value in johnson_net().state_dict().items()}
    if kind == "missing":
        return "checkpoint not found"
    if kind == "png":
        write_png(path, 16, 16, seed=0)
        return "is not a PyTorch checkpoint"
    if kind == "image optimisation":
        _image_optimisation_checkpoint(path)
        return "is the checkpoint of an image optimisation"
    if kind == "other lightning":
        torch.save({"state_dict": {"layer.weight": torch.ones(2)}, "hyper_parameters": {"_class_path": "my.Model"}},
                   path)  # fmt: skip
        return "is a Lightning checkpoint of my.Model without a fast network record"
    if kind == "newer format":
        torch.save({"state_dict": weights, RECORD_KEY: {**record, "format": 2}}, path)
        return "fast network record format 2; this version reads 1"
    if kind == "wrong weights":
        torch.save({"state_dict": weights, RECORD_KEY: {**record, "config": {"width": 16, "residual_blocks": 1}}}, path)
        return "holds weights that do not fit its record's johnson network"
    if kind == "no weights":
        torch.save({"state_dict": {}, RECORD_KEY: record}, path)
        return "no 'network.' weights"
    if kind == "non-finite":
        torch.save({"state_dict": {**weights, "network.encoder.1.weight": torch.full((8,), torch.nan)},
                    RECORD_KEY: record}, path)  # fmt: skip
        return "holds non-finite weights"
    if kind == "pickled object":
        torch.save({"state_dict": weights, RECORD_KEY: record, "other": Path("x")}, path)
        return "a weights-only load refuses"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["missing", "png", "image optimisation", "other lightning", "newer format", "wrong weights", "no weights",
     "non-finite", "pickled object"],
)  # fmt: skip
def test_a_file_that_is_no_trained_network_is_refused_in_one_line_naming_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.ckpt"
    words = _bad_checkpoint(kind, path)
    with pytest.raises(NSTError) as error:
        load_network(path, key="--network")
    message = str(error.value)
    assert message.startswith("--network: ") and str(path) in message and "\n" not in message
    assert words in message


def test_an_exported_file_given_as_a_checkpoint_says_so(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    exported = export_torchscript(checkpoints["johnson"], tmp_path / "model.pt")
    with pytest.raises(NSTError, match=r"model\.pt is an exported TorchScript network \(lightning-nst export\)"):
        load_network(exported)


def test_a_johnson_network_takes_no_style_and_adain_needs_one(checkpoints: dict[str, Path]) -> None:
    style = noise(1, 3, 32, 32)
    for settings in ({"style": style}, {"alpha": 0.5}, {"style_weights": [1.0]}):
        with pytest.raises(NSTError, match=r"johnson\.ckpt is a Johnson network trained on painting\.png; it takes no"):
            Stylizer(checkpoints["johnson"], **settings)  # type: ignore[arg-type]
    with pytest.raises(NSTError, match=r"adain\.ckpt is an AdaIN network; it needs a style image"):
        Stylizer(checkpoints["adain"])
    with pytest.raises(NSTError, match=r"--alpha: must be a number in \[0, 1\] \(got 1.5\)"):
        Stylizer(checkpoints["adain"], style, alpha=1.5)
    with pytest.raises(NSTError, match="--style-weights: 1 weights for 2 style images"):
        Stylizer(checkpoints["adain"], [style, style], style_weights=[1.0])


def test_the_stylizer_runs_adain_as_the_networks_forward(checkpoints: dict[str, Path]) -> None:
    """The Stylizer mixes precomputed style statistics; with one style it is AdaINNet.forward exactly."""
    network = load_network(checkpoints["adain"])
    content, style = noise(2, 3, 37, 45), noise(1, 3, 40, 32, seed=1)
    expected = network.module(content, style, alpha=0.6)
    assert torch.allclose(Stylizer(network, style, alpha=0.6, precision="32")(content), expected, atol=1e-6)


def test_adain_alpha_and_style_interpolation(checkpoints: dict[str, Path]) -> None:
    network = load_network(checkpoints["adain"])
    content = noise(1, 3, 48, 48)
    # two styles whose colour statistics differ from the content's and each other's; sizes may differ
    first, second = noise(1, 3, 40, 40, seed=1) * 0.2 + 0.7, noise(1, 3, 56, 36, seed=2) * 0.4
    styled = Stylizer(network, first, alpha=1.0, precision="32")(content)
    unstyled = Stylizer(network, first, alpha=0.0, precision="32")(content)
    assert (styled - unstyled).abs().mean() > 0.02  # measured 0.08 (21 levels) with these seeds
    weighted = Stylizer(network, [first, second], style_weights=[1, 0], precision="32")(content)
    assert torch.allclose(weighted, styled, atol=1e-6)
    mixed = Stylizer(network, [first, second], style_weights=[1, 1], precision="32")(content)
    only_second = Stylizer(network, second, precision="32")(content)
    assert (mixed - styled).abs().mean() > 1e-3 and (mixed - only_second).abs().mean() > 1e-3


def test_preserve_color(checkpoints: dict[str, Path]) -> None:
    content = noise(1, 3, 40, 40)
    content[:, 0] *= 0.3  # a content image of marked colour
    johnson = Stylizer(checkpoints["johnson"], precision="32")(content)
    kept = Stylizer(checkpoints["johnson"], preserve_color=True, precision="32")(content)
    # 0-255 levels: measured 2.2 kept (where combining clamps) and 45 without
    assert chroma_difference(kept, content) < 0.1 * chroma_difference(johnson, content)
    # AdaIN: the style's colours are matched to the content's before stylizing (the AdaIN paper's colour control)
    style = noise(1, 3, 40, 40, seed=1)
    matched = match_color(style, content).clamp(0, 1)
    network = load_network(checkpoints["adain"])
    expected = Stylizer(network, matched, precision="32")(content)
    got = Stylizer(network, style, preserve_color=True, precision="32")(content)
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got - Stylizer(network, style, precision="32")(content)).abs().mean() > 1e-3


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["johnson", "adain"])
def test_the_exported_torchscript_matches_the_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    path = export_torchscript(checkpoints[kind], tmp_path / "model.pt")
    with zipfile.ZipFile(path) as archive:  # a loader can tell what it is without this package
        (name,) = [name for name in archive.namelist() if name.endswith(f"extra/{EXTRA_FILE}")]
        extra = json.loads(archive.read(name))
    assert extra["kind"] == kind and extra["record"]["config"] == (JOHNSON if kind == "johnson" else ADAIN)
    exported = torch.jit.load(str(path))
    network = load_network(checkpoints[kind])
    for shape in ((1, 3, 64, 64), (2, 3, 41, 29)):  # the tracing size, and another that needs padding
        content = noise(*shape, seed=3)
        if kind == "johnson":
            expected, got = network.module(content), exported(content)
        else:
            styles = noise(2, 3, 36, 52, seed=4)
            expected = network.module(content, styles, alpha=0.7, style_weights=[0.25, 0.75])
            got = exported(content, styles, torch.tensor(0.7), torch.tensor([0.25, 0.75]))
        assert got.shape == expected.shape and torch.allclose(got, expected, rtol=0, atol=1e-5)
    module, read = load_torchscript(path)
    assert read == extra and isinstance(module, torch.jit.ScriptModule)


def test_an_export_never_replaces_a_file(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"mine")
    with pytest.raises(NSTError, match=r"-o: .*model\.pt exists; an export never replaces a file"):
        export_torchscript(checkpoints["johnson"], target)
    assert target.read_bytes() == b"mine"


def _photos(folder: Path) -> list[Path]:
    """Five photos: four of one size (batched together) in two folders, one of another, and a broken file."""
    paths = [write_png(folder / name, 24, 30, seed) for seed, name in enumerate(["a.png", "b.png", "sub/c.png"])]
    paths.append(write_png(folder / "sub" / "deeper" / "d.jpg", 24, 30, seed=3))
    paths.append(write_png(folder / "e.png", 33, 21, seed=4))
    (folder / "broken.png").write_bytes(b"not an image")
    return paths


def test_a_folder_is_written_once_and_a_rerun_finishes_only_what_is_missing(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    _photos(tmp_path / "photos")
    out = tmp_path / "out"
    report = stylize_folder(checkpoints["johnson"], tmp_path / "photos", out, precision="32")
    names = sorted(str(path.relative_to(out)) for path in image_files(out))
    assert names == ["a.png", "b.png", "e.png", "sub/c.png", "sub/deeper/d.png"]
    assert len(report.written) == 5 and report.existing == 0 and report.total == 6
    assert [path.name for path, _ in report.unreadable] == ["broken.png"] and "wrote 5 of 6" in report.summary(out)
    assert pixels(out / "e.png").shape == (33, 21, 3)
    stamps = {path: path.stat().st_mtime_ns for path in image_files(out)}
    (out / "b.png").unlink()
    (out / "sub" / "c.png").write_bytes(b"the user's own file")  # an output path the user filled: kept
    again = stylize_folder(checkpoints["johnson"], tmp_path / "photos", out, precision="32")
    assert again.written == [out / "b.png"] and again.existing == 4
    assert all(
        path.stat().st_mtime_ns == stamp for path, stamp in stamps.items() if path.name not in ("b.png", "c.png")
    )
    assert (out / "sub" / "c.png").read_bytes() == b"the user's own file"
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary file left
    replaced = stylize_folder(checkpoints["johnson"], tmp_path / "photos", out, overwrite=True, precision="32")
    assert len(replaced.written) == 5 and (out / "sub" / "c.png").read_bytes() != b"the user's own file"


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    write_png(tmp_path / "photos" / "a.png", 16, 16, seed=0)
    stylize_folder(checkpoints["johnson"], tmp_path / "photos", tmp_path / "photos" / "styled", suffix="jpg")
    again = stylize_folder(checkpoints["johnson"], tmp_path / "photos", tmp_path / "photos" / "styled")
    assert again.total == 1 and again.existing == 0  # the .png result is new; styled/a.jpg was not read as a photo
    assert sorted(path.name for path in (tmp_path / "photos" / "styled").iterdir()) == ["a.jpg", "a.png"]
    with Image.open(tmp_path / "photos" / "styled" / "a.jpg") as image:
        assert image.format == "JPEG"


@pytest.mark.parametrize("kind", ["johnson", "adain"])
def test_batched_folder_output_equals_one_at_a_time(checkpoints: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """Equal to float rounding: the same up to 1e-5, so at most one 8-bit level apart in a rare value.

    Measured: 7e-7 at most; one value in 2000 of one file one level apart (a convolution over a batch sums in
    another order).
    """
    _photos(tmp_path / "photos")
    style = write_png(tmp_path / "style.png", 40, 40, seed=9) if kind == "adain" else None
    network = load_network(checkpoints[kind])
    single = stylize_folder(network, tmp_path / "photos", tmp_path / "one", style, batch_size=1, precision="32")
    batched = stylize_folder(network, tmp_path / "photos", tmp_path / "four", style, batch_size=4, precision="32")
    assert len(single.written) == len(batched.written) == 5
    for path in single.written:
        difference = np.abs(pixels(path) - pixels(tmp_path / "four" / path.relative_to(tmp_path / "one")))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.005
    # and before 8-bit quantisation, to float precision
    inputs = torch.cat([load_image(tmp_path / "photos" / name) for name in ("a.png", "b.png", "sub/c.png")])
    stylizer = Stylizer(network, style, precision="32")
    one_by_one = torch.cat([stylizer(image[None]) for image in inputs])
    assert torch.allclose(stylizer(inputs), one_by_one, rtol=0, atol=1e-5)


class _NaNForBrightImages(nn.Module):
    def forward(self, image: Tensor) -> Tensor:
        return image if image.mean() < 0.5 else torch.full_like(image, torch.nan)


def test_a_non_finite_result_is_never_saved(tmp_path: Path) -> None:
    dark, bright = tmp_path / "in" / "dark.png", tmp_path / "in" / "bright.png"
    dark.parent.mkdir()
    Image.new("RGB", (16, 16), (20, 20, 20)).save(dark)
    Image.new("RGB", (16, 16), (230, 230, 230)).save(bright)
    network = FastNetwork("johnson", _NaNForBrightImages(), FastNetworkRecord("johnson", {}))
    report = stylize_folder(network, tmp_path / "in", tmp_path / "out", precision="32")
    assert report.non_finite == [bright] and report.written == [tmp_path / "out" / "dark.png"]
    assert not (tmp_path / "out" / "bright.png").exists() and not report.failed
    with pytest.raises(NSTError, match=r"content\[0\]: the network's result is not finite"):
        stylize_images(network, bright)


def test_a_folder_without_images_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NSTError, match=r"content: .*empty holds no images"):
        stylize_folder(checkpoints["johnson"], tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def write_clip(path: Path, frames: int, width: int, height: int, rate: int) -> None:
    """An MPEG-4 clip of seeded random frames, or skip the calling test where PyAV is absent."""
    av = pytest.importorskip("av", reason="PyAV is not installed (the video extra: pip install lightning-nst[video])")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = (np.random.default_rng(index).random((height, width, 3)) * 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def test_a_video_is_stylized_frame_by_frame_at_its_frame_rate(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    av = pytest.importorskip("av", reason="PyAV is not installed (the video extra: pip install lightning-nst[video])")
    source = tmp_path / "clip.mp4"
    write_clip(source, 6, 48, 32, 12)
    output = tmp_path / "styled.mp4"
    assert stylize_video(checkpoints["johnson"], source, output, precision="32") == 6
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.average_rate == 12 and len(frames) == 6 and frames[0].shape == (32, 48, 3)
    assert frames[0].std() > 1  # real pictures
    with pytest.raises(NSTError, match=r"-o: .*styled\.mp4 exists; pass --overwrite"):
        stylize_video(checkpoints["johnson"], source, output)
