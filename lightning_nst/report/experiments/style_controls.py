"""``style_controls``: colour modes, a blend sweep of two styles, a two-region mask and every texture statistic."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from lightning_nst.core.color import COLOR_MODES, chroma_difference
from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import is_sample, load_image, to_pil
from lightning_nst.core.losses import STATISTICS, LayerStyleLoss
from lightning_nst.core.metrics import StyleDistance
from lightning_nst.core.vgg import check_layers
from lightning_nst.nst.data import load_mask
from lightning_nst.outputs import result_file
from lightning_nst.report.experiments.common import count_verdict, fit_config, open_rgb, style_objective, verdict
from lightning_nst.report.experiments.measures import loss_seconds, spread
from lightning_nst.report.figures import image_table
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings


def _reseed(loss: LayerStyleLoss) -> None:
    """Draw ``sliced_w``'s projections again from their seeds, so every image is measured on the same ones.

    :class:`~lightning_nst.core.losses.StyleLoss` redraws them at each call from a generator seeded once (right for
    optimisation); a measurement must not depend on how many images were measured before it.
    """
    for layer_loss in loss.losses.values():
        if layer_loss.statistic == "sliced_w":
            layer_loss.generator = torch.Generator().manual_seed(layer_loss.seed)


class StyleDistances:
    """Style distance of images to one image on every statistic, one :class:`StyleDistance` definition each.

    Over ``layers`` of the report's trunk, images and the style at the same size; ``sliced_w``'s projections are
    redrawn from their seed for every image, so its value repeats exactly.
    """

    def __init__(self, report: Report, style: torch.Tensor, layers: Sequence[str]) -> None:
        self.metrics = {
            statistic: StyleDistance(report.features, [style], statistic, layers) for statistic in STATISTICS
        }

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> dict[str, float]:
        """``{statistic: distance}`` of a ``(1, 3, H, W)`` image."""
        values = {}
        for statistic, metric in self.metrics.items():
            _reseed(metric.style_loss)
            metric.reset()
            metric.update(image)
            values[statistic] = float(metric.compute())
        return values


@torch.no_grad()
def region_distance(
    report: Report, image: torch.Tensor, style: torch.Tensor, region: torch.Tensor, layers: Sequence[str]
) -> dict[str, float]:
    """``{statistic: distance}`` of the ``region`` (a 0/1 ``(1, 1, H, W)`` mask) of ``image`` to ``style``.

    :class:`StyleDistance`'s definition with the image's statistics taken over the region only (masked features,
    normalised by the region's area), as a masked run's style loss takes them.
    """
    features, target = report.features(image), report.features(style)
    return {
        statistic: float(LayerStyleLoss({layer: target[layer] for layer in layers}, statistic, mask=region)(features))
        for statistic in STATISTICS
    }


def _rgb_mean_gap(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference of the R, G and B means of two images, on the 0-255 scale."""
    return float((image.mean(dim=(0, 2, 3)) - reference.mean(dim=(0, 2, 3))).abs().max()) * 255


def _same_image(first: str, second: str) -> bool:
    """Whether two image sources show the same picture: one file, or a sample's shipped copy and its original."""
    if is_sample(first) or is_sample(second):
        return is_sample(first) and is_sample(second) and first.split(":", 1)[1] == second.split(":", 1)[1]
    return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()


def _monotone(values: Sequence[float], rising: bool) -> bool:
    return all((b > a) if rising else (b < a) for a, b in zip(values, values[1:], strict=False))


def style_controls(settings: ReportSettings) -> Path:
    """Colour modes, a blend sweep of two styles, a two-region mask and Gram/mean-var/W2/SW textures, measured."""
    layers = check_layers(settings.style_layers, "style_layers")
    content_layers = check_layers([settings.content_layer], "content_layer")
    if _same_image(settings.second_style, settings.style):
        raise NSTError(
            f"second_style: must be another image than style, got {settings.second_style!r} and {settings.style!r}"
        )
    content = load_image(settings.content, settings.size, key="content")
    size = list(content.shape[-2:])
    styles = {
        "A": load_image(settings.style, settings.size, key="style"),
        "B": load_image(settings.second_style, settings.size, key="second_style"),
    }
    texture = load_image(settings.texture, settings.size, key="texture")
    masks = [load_mask(source, size, f"masks[{index}]") for index, source in enumerate(settings.masks)]
    weights = sorted(settings.blend_weights, reverse=True)
    title = "Style controls: colour, blends, masks and Wasserstein statistics"
    report = Report("style_controls", title, settings, layers + content_layers, runs=len(weights) + 3)
    names = {"A": settings.style, "B": settings.second_style}

    def nst(name: str, color: str = "keep") -> dict[str, Any]:
        return {**style_objective(name, layers, "gram", settings), "content_layers": content_layers, "color": color}

    report.fit(
        "colour",
        fit_config(report, "colour", "style_transfer_luminance", [nst(mode, mode) for mode in COLOR_MODES],
                    {"content": settings.content, "style": [settings.style]}, init="content"),
    )  # fmt: skip
    blend_runs = {weight: f"blend_{weight:g}" for weight in weights}
    for weight, run in blend_runs.items():
        data = {"content": settings.content, "style": [settings.style, settings.second_style],
                "style_weights": [weight, 1 - weight]}  # fmt: skip
        report.fit(run, fit_config(report, run, "style_blend", [nst("blend")], data, init="content"))
    data = {"content": settings.content, "style": [settings.style, settings.second_style], "masks": settings.masks}
    report.fit("mask", fit_config(report, "mask", "style_masks", [nst("masks")], data, init="content"))
    objectives = [style_objective(statistic, layers, statistic, settings) for statistic in STATISTICS]
    textures = report.fit(
        "textures", fit_config(report, "textures", "texture_gram", objectives, {"style": [settings.texture]})
    )

    results = {mode: report.run_dir("colour") / result_file(mode) for mode in COLOR_MODES}
    results |= {f"blend {weight:g}": report.run_dir(run) / result_file("blend") for weight, run in blend_runs.items()}
    results["mask"] = report.run_dir("mask") / result_file("masks")
    images = {name: load_image(path, key=str(path)) for name, path in results.items()}
    real = sum(layer in report.features.pretrained_layers for layer in layers)
    over = f"over {', '.join(layers)} ({real} of {len(layers)} on real weights) at {settings.size} px"

    # colour
    style_a = TF.resize(styles["A"], size, antialias=True).clamp(0, 1)
    chroma = {name: chroma_difference(image, content) for name, image in [("style A", style_a)] + [
        (mode, images[mode]) for mode in COLOR_MODES]}  # fmt: skip
    gap = {name: _rgb_mean_gap(image, content) for name, image in [("style A", style_a)] + [
        (mode, images[mode]) for mode in COLOR_MODES]}  # fmt: skip
    report.table(
        f"Colour modes of Gram NST of {settings.content} after {settings.style} ({settings.steps} L-BFGS steps from "
        f"the content, {settings.size} px; one sweep run). 'CbCr difference': mean absolute difference of the Cb and "
        "Cr channels (full-range YCbCr, BT.601) from the content image, pixel by pixel, on the 0-255 scale. "
        "'RGB mean gap': largest absolute difference of the R, G and B channel means from the content's, 0-255. "
        "The style image's row is it resized to the content's size.",
        ["image", "CbCr difference", "RGB mean gap"],
        [[name, chroma[name], gap[name]] for name in chroma],
    )

    # distances of every NST result to both styles
    meters = {key: StyleDistances(report, style, layers) for key, style in styles.items()}
    distances = {name: {key: meter(image) for key, meter in meters.items()} for name, image in images.items()}
    headers = ["result"] + [f"{statistic} → {key}" for statistic in STATISTICS for key in styles]
    report.table(
        f"Distance of each NST result to style A ({names['A']}) and style B ({names['B']}) on every statistic: "
        f"StyleDistance (the style loss, layers weighing 1/{len(layers)}, no style weight) {over}; sliced_w's "
        "projections are drawn from one seed for every image. 'blend w' weighs style A w and style B 1 - w; 'mask' "
        f"has style A on {settings.masks[0]}'s region and style B on {settings.masks[1]}'s.",
        headers,
        [[name] + [distances[name][key][statistic] for statistic in STATISTICS for key in styles] for name in images],
    )

    # mask regions
    regions = [(mask > 0.5).float() for mask in masks]
    region_rows, closer = [], []
    for index, (own, other) in enumerate((("A", "B"), ("B", "A"))):
        to = {key: region_distance(report, images["mask"], styles[key], regions[index], layers) for key in styles}
        for statistic in STATISTICS:
            closer.append(to[own][statistic] < to[other][statistic])
            region_rows.append([f"{own}'s ({settings.masks[index]})", statistic, to[own][statistic],
                                to[other][statistic], "yes" if closer[-1] else "no"])  # fmt: skip
    report.table(
        f"Each region of the mask result against each style: the StyleDistance definition {over} with the result's "
        "statistics taken over the region only (its mask > 0.5 at the result's size; masked features normalised by "
        "the region's area), the style's over all of it.",
        ["region", "statistic", "to its own style", "to the other style", "closer to its own"],
        region_rows,
    )

    # textures
    texture_meter = StyleDistances(report, texture, layers)
    texture_rows, falls = [], []
    texture_images = {}
    for statistic in STATISTICS:
        objective = textures.objectives[statistic]
        initial, final = objective.initial_loss["total"], objective.final_loss["total"]
        fall = initial / final if final else math.inf
        falls.append(fall >= 10)
        path = report.run_dir("textures") / result_file(statistic)
        texture_images[statistic] = path
        measured = texture_meter(load_image(path, key=str(path)))
        texture_rows.append([statistic, initial, final, fall, *(measured[s] for s in STATISTICS)])
    report.table(
        f"Textures of {settings.texture} from noise, one sweep run ({settings.steps} L-BFGS steps, {settings.size} "
        f"px), each objective matching one statistic {over}. 'fall' is the objective's initial / final loss (its "
        "style weight included); the distances to the texture are StyleDistance, one definition per column.",
        ["objective", "initial loss", "final loss", "fall (initial/final)",
         *(f"{statistic} distance to texture" for statistic in STATISTICS)],
        texture_rows,
    )  # fmt: skip

    # timing
    times = loss_seconds(report, layers, settings.size, settings.timing_repeats, STATISTICS)
    gram_median = spread(times["gram"])[2]
    report.table(
        f"Seconds of VGG forward + style loss + backward {over} on {report.features.mean.device.type}, each "
        f"statistic measured in one interleaved loop ({settings.timing_repeats} rounds after one warm-up; round r "
        "starts with the r-th statistic), and the median relative to Gram's.",
        ["statistic", "median s", "Q1", "Q3", "min", "max", "median / Gram"],
        [[statistic, median, q1, q3, low, high, median / gram_median]
         for statistic, (low, q1, median, q3, high) in ((s, spread(times[s])) for s in STATISTICS)],
    )  # fmt: skip

    # figures
    def pil(image: torch.Tensor) -> Image.Image:
        return to_pil(image)

    report.figure(
        "colour_modes.png",
        image_table(
            [[pil(content), pil(styles["A"]), *(open_rgb(results[mode]) for mode in COLOR_MODES)]],
            ["content", "style", *COLOR_MODES],
            ["colour"],
            [["", f"CbCr diff {chroma['style A']:.1f}", *(f"CbCr diff {chroma[mode]:.1f}" for mode in COLOR_MODES)]],
        ),
        f"Colour modes of Gram NST ({settings.steps} steps, {settings.size} px)",
        ["CbCr diff: mean absolute CbCr difference from the content, 0-255"],
    )
    blends = [f"blend {weight:g}" for weight in weights]
    report.figure(
        "blend_sweep.png",
        image_table(
            [[pil(styles["A"]), *(open_rgb(results[name]) for name in blends), pil(styles["B"])]],
            ["style A", *(f"w={weight:g}" for weight in weights), "style B"],
            ["blend"],
            [["", *(f"A {distances[n]['A']['gram']:.3g} B {distances[n]['B']['gram']:.3g}" for n in blends), ""]],
        ),
        f"Blend sweep: style A weighs w, style B 1 - w ({settings.steps} steps, {settings.size} px)",
        [f"A, B: Gram distance to style A ({names['A']}) and B ({names['B']})"],
    )
    report.figure(
        "mask.png",
        image_table(
            [[pil(content), *(pil(mask.expand(-1, 3, -1, -1)) for mask in masks), pil(styles["A"]), pil(styles["B"]),
              open_rgb(results["mask"])]],
            ["content", "mask A", "mask B", "style A", "style B", "result"],
            ["mask"],
        ),
        f"Two-region mask: style A on mask A's region, style B on mask B's ({settings.steps} steps)",
    )  # fmt: skip
    report.figure(
        "textures.png",
        image_table(
            [[pil(texture), *(open_rgb(texture_images[statistic]) for statistic in STATISTICS)]],
            ["texture", *STATISTICS],
            ["texture"],
            [["", *(f"fall {row[3]:.3g}x" for row in texture_rows)]],
        ),
        f"Textures matching each statistic ({settings.steps} steps from noise, {settings.size} px)",
        ["fall: the objective's initial / final loss"],
    )

    # claims
    steps = []
    for statistic in STATISTICS:
        steps.append(_monotone([distances[name]["A"][statistic] for name in blends], rising=True))
        steps.append(_monotone([distances[name]["B"][statistic] for name in blends], rising=False))
    report.text(
        "## The study's claims on these weights",
        f"Style layers {', '.join(layers)}: {real} of {len(layers)} on real weights. A claim counted over several "
        "cases is said to hold only when it holds on all of them, and 'not shown' when on some.",
        "",
        f"- Luminance keeps the content's chroma better than keep: CbCr difference {chroma['luminance']:.3g} against "
        f"{chroma['keep']:.3g} → {verdict(chroma['luminance'] < chroma['keep'])} (criterion: lower).",
        f"- Match brings the colour mean closer to the content than keep: RGB mean gap {gap['match']:.3g} against "
        f"{gap['keep']:.3g} → {verdict(gap['match'] < gap['keep'])} (criterion: lower).",
        f"- The blend sweep moves monotonically from style A to style B: as A's weight falls "
        f"({', '.join(f'{w:g}' for w in weights)}) the distance to A rises and the distance to B falls at every step; "
        f"{count_verdict(steps)} (cases: each statistic × each style).",
        f"- Each mask region is closer to its own style than to the other: {count_verdict(closer)} (cases: each "
        "region × each statistic).",
        "- Each texture statistic's loss falls at least 10×: "
        + ", ".join(f"{row[0]} {row[3]:.3g}×" for row in texture_rows)
        + f"; {count_verdict(falls)}.",
    )
    return report.write()
