"""Bad input through the real CLI: exit status 2, one line naming the file or key, no traceback, nothing left."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_nst.cli.lightning import run
from lightning_nst.core.errors import NSTError
from lightning_nst.core.vgg import VGG19Features
from lightning_nst.main import main
from tests.conftest import CONFIGS, cli_error
from tests.core.test_images import _png_header

TEXTURE = str(CONFIGS / "texture_gram.yaml")
TRANSFER = str(CONFIGS / "style_transfer_gram.yaml")
TOY = ["--model.init_args.vgg.weights=random", "--data.init_args.size=32", "--trainer.max_steps=2"]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "ok.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "ok.jpg")
    for name in ("ok.png", "ok.jpg"):
        data = (folder / name).read_bytes()
        (folder / f"cut{Path(name).suffix}").write_bytes(data[: len(data) // 3])
    (folder / "notes.png").write_text("these are not pixels")
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    (folder / "bomb.png").write_bytes(_png_header(20000, 20000))
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7)).state_dict(), folder / "resnet.pth")
    partial = VGG19Features(["conv1_2"], weights="random").trunk.state_dict()
    torch.save(partial, folder / "partial.pth")
    (folder / "broken.yaml").write_text("model:\n  init_args: {objectives: [\n")
    return folder


CASES = {
    "missing file": (
        [TRANSFER, "--data.init_args.content=in/nope.jpg"],
        "data.content: image file not found: in/nope.jpg",
    ),
    "not an image": ([TEXTURE, "--data.init_args.style=[in/notes.png]"], "data.style[0]: not an image file"),
    "truncated png": ([TRANSFER, "--data.init_args.content=in/cut.png"], "data.content: cannot decode image"),
    "truncated jpeg": ([TEXTURE, "--data.init_args.style=[in/cut.jpg]"], "data.style[0]: cannot decode image"),
    "1x1 image": ([TRANSFER, "--data.init_args.content=in/dot.png"], "dot.png is 1x1 px; images need at least 8"),
    "smaller than pooling": (
        [TEXTURE, "--data.init_args.style=[in/ok.png]", "--data.init_args.size=8"],
        "data.style[0]: in/ok.png is 8x8 px after resizing, but the deepest layer needs at least 16 px",
    ),
    "20000 px image": (
        [TEXTURE, "--data.init_args.style=[in/bomb.png]"],
        "data.style[0]: in/bomb.png is too large to decode safely",
    ),
    "unknown layer": (
        [TEXTURE, "--model.init_args.objectives=[{name: x, style_layers: [relu2_9]}]"],
        "model.objectives[0].style_layers: unknown VGG19 layer 'relu2_9'",
    ),
    "layer deeper than weights": (
        [TEXTURE, "--model.init_args.vgg.weights=in/partial.pth"],
        "model.vgg.weights: in/partial.pth covers only layers conv1_1..pool1, but relu5_1 was requested",
    ),
    "wrong architecture": (
        [TEXTURE, "--model.init_args.vgg.weights=in/resnet.pth"],
        "model.vgg.weights: in/resnet.pth is not a VGG19 features state_dict",
    ),
    "negative weight": (
        [TEXTURE, "--model.init_args.objectives=[{name: x, style_layers: [relu1_1], tv_weight: -2}]"],
        "model.objectives[0].tv_weight: must be a finite number >= 0, got -2",
    ),
    "non-numeric weight": (
        [TEXTURE, "--model.init_args.objectives=[{name: x, style_layers: [relu1_1], style_weight: lots}]"],
        "model.objectives.style_weight: expected float",
    ),
    "negative learning rate": (
        [TEXTURE, "--model.init_args.optimizer.init_args.lr=-0.5"],
        "model.optimizer.init_args.lr: Invalid learning rate: -0.5",
    ),
    "non-numeric learning rate": (
        [TEXTURE, "--model.init_args.optimizer.init_args.lr=fast"],
        "model.optimizer.lr: expected float (got fast)",
    ),
    "malformed yaml": ([TEXTURE, "-c", "in/broken.yaml"], "--config: in/broken.yaml is not valid YAML at line 3"),
    "missing config": (["in/none.yaml"], "--config: file not found: in/none.yaml"),
    "unknown config key": (
        [TEXTURE, "--model.init_args.learning_rate=0.1"],
        "model.learning_rate: unknown option of lightning_nst.ImageOptimization",
    ),
    "unknown objective key": (
        [TEXTURE, "--model.init_args.objectives=[{name: x, style_layer: [relu1_1]}]"],
        "model.objectives.style_layer: unknown option of lightning_nst.Objective",
    ),
    "empty style list": ([TEXTURE, "--data.init_args.style=[]"], "data.style: the list of style images is empty"),
    "content layers without content": (
        [TEXTURE, "--model.init_args.objectives=[{name: x, content_layers: [relu1_1]}]"],
        "model.objectives[0] (x) has content layers: set data.content",
    ),
    "duplicate objective names": (
        [
            TEXTURE,
            "--model.init_args.objectives=[{name: a, style_layers: [relu1_1]}, {name: a, content_layers: [conv1_1]}]",
        ],
        "model.objectives[1].name: 'a' is used twice",
    ),
    "missing init image": ([TRANSFER, "--model.init_args.init=in/nope.png"], "model.init: image file not found"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: str, files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, *overrides = CASES[case][0]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", config, *TOY, *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-nst: error: ") and err.count("\n") == 0, err
    assert CASES[case][1] in err
    assert "Traceback" not in err
    assert not [path for path in Path("logs").rglob("*") if path.is_file()], "a failed run left files behind"


def test_debug_flag_shows_the_traceback(files: Path) -> None:
    from lightning_nst.core.errors import NSTError

    with pytest.raises(NSTError, match="image file not found"):
        main(["fit", "-c", TRANSFER, *TOY, "--data.init_args.content=in/nope.jpg", "--debug"])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_unusual_image_modes_are_converted(mode: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8))
    if mode == "I;16":
        image = Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16))
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("style.jpg" if mode == "CMYK" else "style.png")
    image.save(path)
    main(["fit", "-c", TEXTURE, *TOY, f"--data.init_args.style=[{path}]"])
    (result,) = Path("logs").glob("texture_gram/version_0/gram.png")
    assert Image.open(result).size == (32, 32)


class Refusing(L.LightningModule):
    """A model whose cheap validation in ``__init__`` refuses its input, as the package's modules do."""

    def __init__(self, limit: int = 1) -> None:
        super().__init__()
        raise NSTError(f"model.limit: refused in __init__ (got {limit})")


class Holding(L.LightningModule):
    """A model with an optional part: jsonargparse instantiates the part inside its Union handling."""

    def __init__(self, part: Refusing | None = None) -> None:
        super().__init__()


@pytest.mark.parametrize(
    "model",
    [
        "--model=tests.cli.test_cli_errors.Refusing",
        "--model={class_path: tests.cli.test_cli_errors.Holding, init_args: {part: {class_path: tests.cli.test_cli_errors.Refusing}}}",  # noqa: E501
    ],
)
def test_nst_error_raised_in_init_is_one_line(model: str, capfd: pytest.CaptureFixture[str]) -> None:
    assert cli_error(capfd, ["fit", model, "--trainer.logger=false"]) == (
        "lightning-nst: error: model.limit: refused in __init__ (got 1)"
    )


def test_library_use_keeps_no_state_between_runs() -> None:
    """``cli.run`` raises NSTError for bad input and nothing in the package holds on to the errors it raised."""
    raised = []
    for index in range(3):
        with pytest.raises(NSTError, match=f"in/nope{index}.jpg") as error:
            run(["fit", "-c", TRANSFER, *TOY, f"--data.init_args.content=in/nope{index}.jpg"])
        raised.append(weakref.ref(error.value))
        del error
    gc.collect()
    assert [ref() for ref in raised] == [None] * 3
    assert not [name for name, value in vars(NSTError).items() if isinstance(value, list | dict | set)]


def test_a_lost_peer_of_a_multi_process_run_is_one_line() -> None:
    import torch.distributed

    from lightning_nst.cli.messages import nst_error

    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:41234. This "
        "is typically caused by a remote worker crashing."
    )
    nccl = torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1. Original reason: timeout")
    # The run's store gone with node 0 (a process still taking its next batch from it).
    store = torch.distributed.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed.")
    for error, lost in (
        (gloo, "Connection closed by peer [10.0.0.2]:41234"),
        (nccl, "NCCL communicator was aborted on rank 1"),
        (store, "Failed to recv, got 0 bytes"),
    ):
        found = nst_error(error, ["predict"])
        assert found is not None and str(found).startswith(
            f"trainer: another process of this run ended before it ({lost})"
        )
    assert nst_error(RuntimeError("[x.cc:1] a bug"), ["predict"]) is None  # other errors keep their traceback
