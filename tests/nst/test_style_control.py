"""Several styles: blend weights and spatial masks in the data module and the optimisation; their bad input."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.errors import NSTError
from lightning_nst.core.losses import StyleLoss
from lightning_nst.main import main
from tests.conftest import CONFIGS

STYLES = ["sample:gravel", "sample:immunohistochemistry"]
LAYERS = ["relu1_1", "relu2_1"]


def fit(
    data: ImageTargets, folder: Path, statistic: str = "gram", steps: int = 1, **options: object
) -> ImageOptimization:
    objective = Objective("t", style_layers=LAYERS, style_weight=1e4, statistic=statistic)  # type: ignore[arg-type]
    model = ImageOptimization([objective], vgg=VGGConfig(weights="random"), **options)  # type: ignore[arg-type]
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ImageWriter(output_dir=str(folder), snapshot_every=0)],
    )  # fmt: skip
    trainer.fit(model, data)
    return model


def targets(weights: list[float] | None, folder: Path, statistic: str = "gram") -> dict[str, torch.Tensor]:
    model = fit(ImageTargets(style=STYLES, size=32, style_weights=weights), folder, statistic)
    return {name: loss.target for name, loss in model.style_losses.items()}


def moments(target: torch.Tensor, statistic: str) -> torch.Tensor:
    if statistic == "meanvar":
        mean, std = target[:, 0], target[:, 1]
        return torch.stack([mean, std.square() + mean.square()])
    return target


@pytest.mark.parametrize("statistic", ["gram", "meanvar"])
def test_blend_weights_one_zero_give_the_single_style_and_half_half_lies_between(
    statistic: str, tmp_path: Path
) -> None:
    first = fit(ImageTargets(style=STYLES[:1], size=32), tmp_path / "a", statistic)
    alone = {name: loss.target for name, loss in first.style_losses.items()}
    one_zero = targets([1.0, 0.0], tmp_path / "b", statistic)
    zero_one = targets([0.0, 3.0], tmp_path / "c", statistic)
    half = targets([0.5, 0.5], tmp_path / "d", statistic)
    for name in alone:
        torch.testing.assert_close(one_zero[name], alone[name])
        assert not torch.allclose(zero_one[name], alone[name])
        a, b, mid = (moments(t[name], statistic) for t in (one_zero, zero_one, half))
        # Gram entries, and for meanvar the mean and second raw moment, lie between (the std of a mixture need not).
        assert bool(((mid >= torch.minimum(a, b) - 1e-6) & (mid <= torch.maximum(a, b) + 1e-6)).all())
        assert not torch.allclose(half[name], one_zero[name]) and not torch.allclose(half[name], zero_one[name])
    # Equal weights are the default blend.
    default = targets(None, tmp_path / "e", statistic)
    for name in alone:
        torch.testing.assert_close(default[name], half[name])


def write_mask(path: Path, left: bool, size: tuple[int, int] = (32, 32)) -> str:
    array = np.zeros(size[::-1], dtype=np.uint8)
    half = size[0] // 2
    if left:
        array[:, :half] = 255
    else:
        array[:, half:] = 255
    Image.fromarray(array, "L").save(path)
    return str(path)


def test_a_masked_two_style_run_gives_each_region_its_own_style(tmp_path: Path) -> None:
    masks = [write_mask(tmp_path / "left.png", True), write_mask(tmp_path / "right.png", False)]
    data = ImageTargets(content="sample:astronaut", style=STYLES, size=32, masks=masks)
    model = fit(data, tmp_path / "out", steps=40, optimizer=partial(torch.optim.Adam, lr=0.05))
    assert data.masks is not None and len(model.style_losses["gram_relu1_1"]) == 2  # one masked loss per region
    result = model.results()[0].image
    vgg = model._trunk()
    features = vgg(result, LAYERS)
    styles = [vgg(image, LAYERS) for image in model.style]
    for region, mask in enumerate(data.masks):
        other = 1 - region
        own = sum(StyleLoss(styles[region][layer], "gram", mask=mask)(features[layer]) for layer in LAYERS)
        theirs = sum(StyleLoss(styles[other][layer], "gram", mask=mask)(features[layer]) for layer in LAYERS)
        assert float(own) < 0.5 * float(theirs), region
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["objectives"]["t"]
    assert summary["final_loss"]["total"] < 0.1 * summary["initial_loss"]["total"]
    assert np.isfinite(summary["metrics"]["style_distance_gram"])


def test_overlapping_masks_are_divided_by_their_sum_and_uncovered_pixels_warned(tmp_path: Path) -> None:
    white = tmp_path / "white.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8), "L").save(white)
    data = ImageTargets(content="sample:astronaut", style=STYLES, size=32, masks=[str(white), str(white)])
    data.setup("fit")
    assert data.masks is not None
    torch.testing.assert_close(data.masks[0], torch.full((1, 1, 32, 32), 0.5))
    left = write_mask(tmp_path / "left.png", True)
    data = ImageTargets(content="sample:astronaut", style=STYLES[:1], size=32, masks=[left])
    with pytest.warns(UserWarning, match=r"data.masks: 512 of 1024 pixels are in no mask"):
        data.setup("fit")


def cli_error(capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    with pytest.raises(SystemExit) as raised:
        main(["fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--trainer.max_steps=1",
              "--model.init_args.vgg.weights=random", "--data.init_args.size=32", *overrides])  # fmt: skip
    assert raised.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-nst: error: "), lines
    return lines[0]


TWO = "--data.init_args.style=[sample:gravel, sample:immunohistochemistry]"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([TWO, "--data.init_args.style_weights=[1, -1]"], "data.style_weights: each weight must be a finite number"),
        ([TWO, "--data.init_args.style_weights=[0, 0]"], "data.style_weights: all zero"),
        ([TWO, "--data.init_args.style_weights=[1, .nan]"], "data.style_weights: each weight must be a finite number"),
        ([TWO, "--data.init_args.style_weights=[1]"], "data.style_weights: 1 weights for 2 style images"),
        ([TWO, "--data.init_args.masks=[sample:mask_left]"], "data.masks: 1 masks for 2 data.style images"),
    ],
)
def test_bad_blend_and_mask_options_are_one_line_naming_the_key(
    overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in cli_error(capsys, *overrides)


def test_a_mask_that_is_not_an_image_or_has_another_shape_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "mask.png"
    text.write_text("not a png")
    line = cli_error(capsys, TWO, f"--data.init_args.masks=[{text}, sample:mask_right]")
    assert "data.masks[0]: not an image file" in line
    wide = write_mask(tmp_path / "wide.png", True, size=(64, 32))
    line = cli_error(capsys, TWO, f"--data.init_args.masks=[sample:mask_left, {wide}]")
    assert "data.masks[1]: " in line and "another aspect ratio" in line
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(black)
    line = cli_error(capsys, TWO, f"--data.init_args.masks=[sample:mask_left, {black}]")
    assert "data.masks[1]: " in line and "all black" in line
    assert not [path for path in Path("logs").rglob("*") if path.is_file()], "a failed run left files behind"
    line = cli_error(capsys, TWO, "--data.init_args.masks=[sample:mask_left, nope.png]")
    assert "data.masks[1]: image file not found" in line


def test_style_weights_with_masks_are_refused() -> None:
    with pytest.raises(NSTError, match="data.style_weights: cannot be combined with data.masks"):
        ImageTargets(style=STYLES, style_weights=[1, 1], masks=["sample:mask_left", "sample:mask_right"])


@pytest.mark.parametrize("config", ["style_transfer_luminance", "style_blend", "style_masks"])
def test_the_style_control_configs_run_without_shared_files(config: str) -> None:
    main(["fit", "-c", str(CONFIGS / f"{config}.yaml"), "--data.init_args.size=32", "--trainer.max_steps=2",
          "--model.init_args.vgg.weights=random", "--trainer.enable_progress_bar=false"])  # fmt: skip
    (summary_file,) = Path("logs").glob(f"{config}/version_0/summary.json")
    summary = json.loads(summary_file.read_text())
    for objective in summary["objectives"].values():
        with Image.open(summary_file.parent / objective["output"]) as image:
            assert image.size == (32, 32) and np.asarray(image).std() > 2.0
        assert np.isfinite(objective["final_loss"]["total"])


# -- blends as guidance targets ---------------------------------------------------------------------------------------


def guidance_targets(images: list, weights: list | None) -> list[torch.Tensor]:
    from lightning_nst.diffusion.guidance import StyleGuidance

    guidance = StyleGuidance(layers=["relu1_1", "relu2_1"], vgg=VGGConfig("random"), style_size=32)
    guidance.set_styles(images, weights)
    return [torch.cat([loss.target.flatten() for loss in target.losses.values()]) for target in guidance.targets]


def test_guidance_blend_targets_one_zero_equal_the_single_style_and_half_half_lies_between() -> None:
    from lightning_nst.core.images import load_image

    a, b = (load_image(source, 32) for source in STYLES)
    single_a, single_b = guidance_targets([a, b], None)
    one_zero, half, zero_one = guidance_targets([[a, b]] * 3, [[1, 0], [0.5, 0.5], [0, 1]])
    torch.testing.assert_close(one_zero, single_a)
    torch.testing.assert_close(zero_one, single_b)
    assert bool(
        ((half >= torch.minimum(single_a, single_b) - 1e-6) & (half <= torch.maximum(single_a, single_b) + 1e-6)).all()
    )
    torch.testing.assert_close(half, (single_a + single_b) / 2)  # Gram matrices mix linearly


def test_prompt_grid_style_blends_make_one_target_per_blend() -> None:
    from lightning_nst.diffusion.prompts import PromptGrid

    grid = PromptGrid(prompts=["a", "b"], seeds=[0], style=STYLES, style_blends=[[3, 1], [0, 2]],
                      style_prompts=["x", "y"])  # fmt: skip
    grid.setup("predict")
    assert [item.style for item in grid.items] == [
        "0.75*sample:gravel + 0.25*sample:immunohistochemistry", "1*sample:immunohistochemistry"
    ] * 2  # fmt: skip
    assert [item.style_index for item in grid.items] == [0, 1, 0, 1]
    assert len({item.style_digest for item in grid.items}) == 2
    images, weights = grid.style_targets()
    assert weights == [[0.75, 0.25], [0.0, 1.0]] and len(images) == 2 and len(images[0]) == 2


@pytest.mark.parametrize(
    ("blends", "message"),
    [
        ([[1, -1]], r"data.style_blends\[0\]: each weight must be a finite number >= 0"),
        ([[1, 1], [0, 0]], r"data.style_blends\[1\]: all zero"),
        ([[1]], r"data.style_blends\[0\]: 1 weights for 2 style images"),
        ([[1, float("nan")]], r"data.style_blends\[0\]: each weight must be a finite number"),
        ([], r"data.style_blends: the list of blends is empty"),
    ],
)
def test_bad_style_blends_name_the_entry(blends: list, message: str) -> None:
    from lightning_nst.diffusion.prompts import PromptGrid

    with pytest.raises(NSTError, match=message):
        PromptGrid(prompts=["a"], style=STYLES, style_blends=blends)


def test_guided_generation_with_a_blend_target(pipeline_dir: Path) -> None:
    from tests.tiny_pipeline import records, tiny_args

    overrides = [f"--data.style=[{', '.join(STYLES)}]", "--data.style_blends=[[0.5, 0.5]]"]
    main(tiny_args(pipeline_dir, "blend", *overrides, size=32, steps=3))
    (run,) = Path("logs", "blend").glob("version_*")
    (record,) = records(run)
    assert record["style"] == "0.5*sample:gravel + 0.5*sample:immunohistochemistry"
    assert np.isfinite(record["final_style_loss"]) and (run / record["image"]).is_file()
