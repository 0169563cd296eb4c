"""Colour control: YCbCr, luminance-only transfer during optimisation, colour matching, histogram matching."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.color import (
    chroma_difference,
    combine_luminance,
    luminance,
    match_color,
    match_histograms,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)
from lightning_nst.core.images import load_image
from lightning_nst.main import main
from tests.conftest import CONFIGS
from tests.nst.test_module import fit_summary

CONTENT, STYLE = "sample:astronaut", "sample:immunohistochemistry"


def colour_stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = image.double().flatten(2)[0]
    centred = pixels - pixels.mean(1, keepdim=True)
    return pixels.mean(1), centred @ centred.T / pixels.shape[1]


def test_ycbcr_round_trips_and_has_jpeg_coefficients() -> None:
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ycbcr_to_rgb(rgb_to_ycbcr(image)), image, atol=1e-5, rtol=0)
    white = rgb_to_ycbcr(torch.ones(1, 3, 1, 1)).flatten()
    torch.testing.assert_close(white, torch.tensor([1.0, 0.5, 0.5]), atol=1e-5, rtol=0)


def test_match_color_gives_the_content_colour_mean_and_covariance() -> None:
    content = load_image(CONTENT, 48)
    style = load_image(STYLE, 48)
    matched = match_color(style, content)
    mean, cov = colour_stats(matched)
    target_mean, target_cov = colour_stats(content)
    assert (mean - target_mean).abs().max() < 1e-3
    assert (cov - target_cov).abs().max() < 1e-3
    assert (colour_stats(style)[1] - target_cov).abs().max() > 1e-2  # there was something to match


def test_match_histograms_gives_each_channel_the_reference_histogram() -> None:
    image = load_image(STYLE, 32)
    reference = load_image(CONTENT, 40)
    matched = match_histograms(image, reference)
    for channel in range(3):
        ours = np.sort(matched[0, channel].flatten().numpy())
        theirs = np.quantile(reference[0, channel].flatten().numpy(), (np.arange(ours.size) + 0.5) / ours.size)
        assert np.abs(ours - theirs).mean() < 0.01
    # Order within a channel is kept: histogram matching is monotone.
    order = image[0, 0].flatten().argsort()
    assert bool((matched[0, 0].flatten()[order].diff() >= -1e-7).all())


def test_chroma_difference_is_zero_for_same_chroma_and_255_scaled() -> None:
    image = load_image(CONTENT, 32)
    brighter = combine_luminance((luminance(image) * 0.5 + 0.25), image)
    assert chroma_difference(image, image) == 0
    assert chroma_difference(
        torch.zeros(1, 3, 4, 4), torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    ) == pytest.approx((0.168736 + 0.5) / 2 * 255, rel=1e-4)
    assert chroma_difference(brighter, image) < 2.0  # only where the new luminance pushes colours out of the cube


def run(objective: Objective, folder: Path, steps: int = 6, init: str = "content") -> tuple[ImageOptimization, dict]:
    model = ImageOptimization([objective], vgg=VGGConfig(weights="random"), init=init)
    data = ImageTargets(content=CONTENT, style=[STYLE], size=32)
    return model, fit_summary(model, data, folder, steps)[objective.name]


def nst(name: str, color: str) -> Objective:
    return Objective(
        name, content_layers=["relu2_1"], style_layers=["relu1_1", "relu2_1"], style_weight=1e4, color=color
    )


def saved(folder: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(folder / f"{name}.png"))).permute(2, 0, 1)[None].float() / 255


def test_luminance_mode_keeps_the_content_chroma_and_changes_the_luminance(tmp_path: Path) -> None:
    model, summary = run(nst("lum", "luminance"), tmp_path, init="noise")
    content = load_image(CONTENT, 32)
    out = saved(tmp_path, "lum")
    # Chroma equals the content's up to 8-bit rounding (and a little clipping where luminance leaves the gamut).
    assert chroma_difference(out, content) < 1.0
    assert (luminance(out) - luminance(content)).abs().mean() * 255 > 5.0  # the luminance is the optimised one
    assert chroma_difference(model.results()[0].image, content) < 1.0
    assert summary["final_loss"]["total"] < summary["initial_loss"]["total"]
    # What VGG saw was grey: the style targets are those of the luminance images, keyed apart from plain RGB ones.
    assert set(model.style_losses) == {"gram_relu1_1_luminance", "gram_relu2_1_luminance"}
    assert set(model.content_losses) == {"relu2_1_luminance"}


def test_keep_mode_changes_the_chroma_so_luminance_mode_is_not_trivial(tmp_path: Path) -> None:
    run(nst("keep", "keep"), tmp_path)
    assert chroma_difference(saved(tmp_path, "keep"), load_image(CONTENT, 32)) > 1.0


def test_luminance_and_keep_objectives_in_one_sweep_keep_separate_targets(tmp_path: Path) -> None:
    model = ImageOptimization([nst("keep", "keep"), nst("lum", "luminance"), nst("match", "match")],
                              vgg=VGGConfig(weights="random"), init="content")  # fmt: skip
    trainer = L.Trainer(max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ImageWriter(output_dir=str(tmp_path), snapshot_every=0)])  # fmt: skip
    trainer.fit(model, ImageTargets(content=CONTENT, style=[STYLE], size=32))
    assert {"gram_relu1_1", "gram_relu1_1_luminance", "gram_relu1_1_match"} <= set(model.style_losses)
    keep, lum = model.style_losses["gram_relu1_1"].target, model.style_losses["gram_relu1_1_luminance"].target
    assert not torch.allclose(keep, lum)
    assert all((tmp_path / f"{name}.png").is_file() for name in ("keep", "lum", "match"))


def test_histogram_mode_matches_the_result_histograms_to_the_content(tmp_path: Path) -> None:
    model, _ = run(nst("hist", "histogram"), tmp_path, steps=3)
    content = load_image(CONTENT, 32)
    out = model.results()[0].image
    for channel in range(3):
        ours = np.sort(out[0, channel].flatten().numpy())
        theirs = np.sort(content[0, channel].flatten().numpy())
        assert np.abs(ours - theirs).max() < 0.01  # equal result values (e.g. clamped) stay equal


def test_match_mode_style_targets_come_from_colour_matched_style_images(tmp_path: Path) -> None:
    model, _ = run(nst("match", "match"), tmp_path, steps=1)
    (matched,) = model.target_images("style", "match")
    mean, _ = colour_stats(matched)
    assert (mean - colour_stats(load_image(CONTENT, 32))[0]).abs().max() < 0.02  # clamped to [0, 1] afterwards


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "--model.init_args.objectives=[{name: x, style_layers: [relu1_1], color: sepia}]",
            "model.objectives.color: must be one of keep, luminance",
        ),
    ],
)
def test_bad_colour_mode_is_one_line_naming_the_key(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["fit", "-c", str(CONFIGS / "style_transfer_gram.yaml"), override, "--trainer.max_steps=1",
              "--model.init_args.vgg.weights=random", "--data.init_args.size=32"])  # fmt: skip
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-nst: error:") and message in err[0]


def test_colour_mode_without_content_is_refused_naming_the_key(tmp_path: Path) -> None:
    model = ImageOptimization([Objective("t", style_layers=["relu1_1"], color="luminance")],
                              vgg=VGGConfig(weights="random"))  # fmt: skip
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(Exception, match=r"model.objectives\[0\].color: 'luminance' needs data.content"):
        trainer.fit(model, ImageTargets(style=[STYLE], size=32))
