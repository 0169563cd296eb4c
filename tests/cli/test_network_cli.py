"""``lightning-nst stylize --network`` and ``lightning-nst export``: a trained fast network from the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_nst import api
from lightning_nst.core.errors import NSTError
from lightning_nst.main import main
from tests.cli.test_fast_commands import _heavy_modules
from tests.conftest import cli_error
from tests.nst.fast.test_inference import checkpoints, pixels, write_clip, write_png  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stylize_network_writes_the_image_at_its_size_and_never_overwrites(
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    write_png(tmp_path / "photo.png", 35, 51, seed=0)
    main(["stylize", "photo.png", "--network", str(checkpoints["johnson"]), "-o", "out.png"])
    assert "Wrote out.png (a Johnson network trained on painting.png)" in capfd.readouterr().out
    first = pixels(tmp_path / "out.png")
    assert first.shape == (35, 51, 3) and first.std() > 1
    line = cli_error(capfd, ["stylize", "photo.png", "--network", str(checkpoints["johnson"]), "-o", "out.png"])
    assert line == "lightning-nst: error: -o: out.png exists; pass --overwrite to replace it"
    main(["stylize", "photo.png", "--network", str(checkpoints["johnson"]), "-o", "out.png", "--overwrite",
          "--size", "20"])  # fmt: skip
    assert pixels(tmp_path / "out.png").shape == (14, 20, 3)


def test_stylize_network_refuses_an_image_optimisation_checkpoint_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint a real 2-step `lightning-nst stylize` (an image optimisation) wrote, given to --network."""
    write_png(tmp_path / "photo.png", 32, 32, seed=0)
    write_png(tmp_path / "painting.png", 32, 32, seed=1)
    main(["stylize", "photo.png", "painting.png", "-o", "run.png", "--size", "32", "--steps", "2",
          "--weights", "random"])  # fmt: skip
    checkpoint = Path("logs/run/version_0/checkpoints/last.ckpt")
    assert checkpoint.is_file()
    line = cli_error(capfd, ["stylize", "photo.png", "--network", str(checkpoint), "-o", "fast.png"])
    assert line == (
        f"lightning-nst: error: --network: {checkpoint} is the checkpoint of an image optimisation (`lightning-nst "
        "fit`/`stylize` without --network); --network takes the checkpoint of a trained fast style network "
        "(lightning-nst fit -c fast_style_train or adain_train)"
    )
    assert not (tmp_path / "fast.png").exists()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--steps", "3"], "--steps: applies to the optimisation, not to --network"),
        (["--statistic", "gram"], "--statistic: applies to the optimisation, not to --network"),
        (["--seed", "1"], "--seed: applies to the optimisation, not to --network"),
        (["--print-config"], "--print-config: applies to the optimisation, not to --network"),
        (["painting.png"], "is a Johnson network trained on painting.png; it takes no style image"),
        (["--alpha", "0.5"], "it takes no --alpha (AdaIN only)"),
        (["--size", "0"], "--size: must be an integer > 0 (got 0)"),
    ],
)
def test_options_that_do_not_apply_to_a_network_are_refused(
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    args: list[str],
    line: str,
) -> None:
    write_png(tmp_path / "photo.png", 16, 16, seed=0)
    write_png(tmp_path / "painting.png", 16, 16, seed=1)
    got = cli_error(capfd, ["stylize", "photo.png", "--network", str(checkpoints["johnson"]), "-o", "o.png", *args])
    assert line in got and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("flag", [["--alpha", "0.5"], ["--preserve-color"], ["--batch-size", "2"]])
def test_network_options_without_network_are_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    line = cli_error(capfd, ["stylize", "photo.png", "painting.png", "-o", "o.png", *flag])
    assert line == f"lightning-nst: error: {flag[0]}: applies to a trained network only; add --network CKPT"


def test_stylize_without_network_still_needs_a_style(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = cli_error(capfd, ["stylize", "photo.png", "-o", "o.png"])
    assert line == (
        "lightning-nst: error: stylize: the following arguments are required: style (see `lightning-nst stylize "
        "--help`)"
    )


def test_adain_from_the_command_line(
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    write_png(tmp_path / "photo.png", 33, 40, seed=0)
    bright = np.random.default_rng(1).random((40, 40, 3)) * 50 + np.array(
        [200, 160, 40]
    )  # far from the photo's colours
    Image.fromarray(bright.astype(np.uint8)).save(tmp_path / "a.png")
    write_png(tmp_path / "b.png", 30, 50, seed=2)
    adain = str(checkpoints["adain"])
    line = cli_error(capfd, ["stylize", "photo.png", "--network", adain, "-o", "x.png"])
    assert line.endswith(
        "adain.ckpt is an AdaIN network; it needs a style image (stylize CONTENT STYLE --network CKPT)"
    )
    for name, extra in [("one", []), ("zero", ["--alpha", "0"]), ("mix", ["--style-weights", "1", "0"])]:
        styles = ["a.png", "b.png"] if name == "mix" else ["a.png"]
        main(["stylize", "photo.png", *styles, "--network", adain, "-o", f"{name}.png", "--precision", "32", *extra])
    assert np.array_equal(pixels(tmp_path / "mix.png"), pixels(tmp_path / "one.png"))  # weights [1, 0]: one style
    assert np.abs(pixels(tmp_path / "zero.png") - pixels(tmp_path / "one.png")).mean() > 2  # alpha 0 vs 1, levels


def test_folder_in_folder_out(
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    for seed, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        write_png(tmp_path / "photos" / name, 24, 31, seed)
    johnson = str(checkpoints["johnson"])
    main(["stylize", "photos", "--network", johnson, "-o", "out", "--batch-size", "2"])
    assert "Wrote 3 of 3 images to out" in capfd.readouterr().out
    assert sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*.png")) == [
        "a.png", "b.png", "sub/c.png"
    ]  # fmt: skip
    stamp = (tmp_path / "out" / "a.png").stat().st_mtime_ns
    (tmp_path / "out" / "sub" / "c.png").unlink()
    main(["stylize", "photos", "--network", johnson, "-o", "out"])
    assert "Wrote 1 of 3 images to out; 2 existed already and were kept" in capfd.readouterr().out
    assert (tmp_path / "out" / "a.png").stat().st_mtime_ns == stamp and (tmp_path / "out" / "sub" / "c.png").exists()
    # a folder of which nothing can be read writes nothing and fails
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not an image")
    line = cli_error(capfd, ["stylize", "broken", "--network", johnson, "-o", "broken_out"])
    assert line.startswith("lightning-nst: error: content: wrote 0 of 1 images to broken_out; 1 unreadable skipped")


@pytest.mark.parametrize("kind", ["johnson", "adain"])
def test_the_api_returns_pil_images_equal_to_the_cli_output(
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    kind: str,
) -> None:
    write_png(tmp_path / "photo.png", 29, 37, seed=0)
    write_png(tmp_path / "second.png", 20, 20, seed=3)
    style = ["painting.png"] if kind == "adain" else []
    if style:
        write_png(tmp_path / "painting.png", 32, 32, seed=1)
    main(["stylize", "photo.png", *style, "--network", str(checkpoints[kind]), "-o", "cli.png"])
    image = api.stylize("photo.png", style or None, network=checkpoints[kind])
    assert isinstance(image, Image.Image) and np.array_equal(np.asarray(image), pixels(tmp_path / "cli.png"))
    images = api.stylize(["photo.png", "second.png"], style or None, network=checkpoints[kind])
    assert isinstance(images, list) and [item.size for item in images] == [(37, 29), (20, 20)]
    assert np.array_equal(np.asarray(images[0]), np.asarray(image))
    with pytest.raises(NSTError, match="steps: applies to the optimisation, not to network="):
        api.stylize("photo.png", style or None, network=checkpoints[kind], steps=3)


def test_export_from_the_command_line(
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    main(["export", str(checkpoints["johnson"]), "-o", "model.pt"])
    assert "Wrote model.pt (a Johnson network trained on painting.png" in capfd.readouterr().out
    exported = (tmp_path / "model.pt").read_bytes()
    line = cli_error(capfd, ["export", str(checkpoints["johnson"]), "-o", "model.pt"])
    assert (
        line
        == "lightning-nst: error: -o: model.pt exists; an export never replaces a file, so remove it or name another"
    )
    assert (tmp_path / "model.pt").read_bytes() == exported
    write_png(tmp_path / "photo.png", 16, 16, seed=0)
    line = cli_error(capfd, ["stylize", "photo.png", "--network", "model.pt", "-o", "o.png"])
    assert line.startswith("lightning-nst: error: --network: model.pt is an exported TorchScript network")
    line = cli_error(capfd, ["export", "photo.png", "-o", "other.pt"])
    assert line == "lightning-nst: error: checkpoint: photo.png is not a PyTorch checkpoint"


def test_export_help_imports_no_torch() -> None:
    assert _heavy_modules("export", "--help") == []


def test_a_video_from_the_command_line(
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    write_clip(Path("clip.mp4"), 3, 32, 32, 10)
    main(["stylize", "clip.mp4", "--network", str(checkpoints["johnson"]), "-o", "styled.mp4"])
    assert "Wrote styled.mp4: 3 frames" in capfd.readouterr().out
    line = cli_error(capfd, ["stylize", "clip.mp4", "--network", str(checkpoints["johnson"]), "-o", "styled.mp4"])
    assert line == "lightning-nst: error: -o: styled.mp4 exists; pass --overwrite to replace it"
