"""The study's experiments, each a report: runs through the CLI, then figures, tables and claims."""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from lightning_nst.core.color import COLOR_MODES, chroma_difference
from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import check_source, is_sample, load_image, read_image, to_pil
from lightning_nst.core.losses import STATISTICS, LayerStyleLoss, Statistic
from lightning_nst.core.metrics import StyleDistance
from lightning_nst.core.vgg import CONV_LAYERS, LAYER_NAMES, check_layers, layer_index
from lightning_nst.nst.data import load_mask
from lightning_nst.outputs import GenerationRecord, ObjectiveRecord, preview_file, result_file, step_file
from lightning_nst.report.configs import run_config, shipped
from lightning_nst.report.figures import Series, image_table, line_plot
from lightning_nst.report.folder import Report, report_folder, undone_if_refused, weights_stated_once
from lightning_nst.report.settings import ReportSettings

CUMULATIVE = {f"conv1-{n}": list(CONV_LAYERS[:n]) for n in (3, 6, 10, 16)}
SINGLE = {f"conv{n}": [CONV_LAYERS[n - 1]] for n in (1, 4, 8, 16)}


def conv_depth(layer: str) -> int:
    """The study's number of a layer: how many convolutions come before it or are it (1-16)."""
    return sum(1 for name in LAYER_NAMES[: layer_index(layer) + 1] if name.startswith("conv"))


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _verdict(holds: bool) -> str:
    return "**holds**" if holds else "**does not hold**"


def _count_verdict(held: Sequence[bool]) -> str:
    """``holds on k of n cases``, and a verdict on the claim only when it held on every case."""
    k, n = sum(held), len(held)
    verdict = "**holds**" if k == n else "**does not hold**" if k == 0 else "**not shown**"
    return f"holds on **{k} of {n}** cases → {verdict}"


def _fit_config(
    report: Report,
    run: str,
    shipped: str,
    objectives: list[dict[str, Any]],
    data: dict[str, Any],
    init: str = "noise",
    save_every: int = 0,
    seed: int | None = None,
) -> dict[str, Any]:
    """The shipped ``configs/<shipped>.yaml`` with the report's objectives, images and settings; its optimizer stays."""
    s = report.settings
    model = {
        "objectives": objectives,
        "vgg": asdict(s.vgg),
        "init": init,
        "init_seed": s.seed if seed is None else seed,
    }
    writer = {"class_path": "lightning_nst.ImageWriter", "init_args": {"snapshot_every": 0, "save_every": save_every}}
    return run_config(
        shipped,
        report.trainer(run, max_steps=s.steps, enable_checkpointing=False, callbacks=[writer]),
        model={"init_args": model},
        data={"init_args": {**data, "size": s.size}},
    )


def _style_objective(name: str, layers: list[str], statistic: Statistic, settings: ReportSettings) -> dict[str, Any]:
    weight = settings.gram_weight if statistic == "gram" else settings.meanvar_weight
    return {"name": name, "style_layers": layers, "style_weight": weight, "statistic": statistic}


class StyleMeter:
    """Style loss of image files against the style image on one definition, as the guidance measures it.

    A :class:`~lightning_nst.StyleDistance` over the report's VGG trunk; images and the style are resized to
    ``size`` on their long edge, and layers weigh ``1 / len(layers)``.
    """

    def __init__(self, report: Report, style: str, layers: Sequence[str], statistic: Statistic, size: int) -> None:
        self.size = size
        self.metric = StyleDistance(report.features, [load_image(style, size, key="style")], statistic, layers)

    @torch.no_grad()
    def __call__(self, path: str | Path) -> float:
        """The style loss of the image file (or sample) at ``path``."""
        return float(self.metric(load_image(path, self.size, key=str(path))))


def _steps_to(values: Sequence[float], fraction: float) -> int | None:
    return next((step for step, value in enumerate(values) if value <= fraction * values[0]), None)


# -- 1. content reconstruction by layer -----------------------------------------------------------------------------


def reconstruction(settings: ReportSettings) -> Path:
    """Reconstruct the content image from noise at each layer; PSNR and SSIM by layer."""
    layers = check_layers(settings.layers or list(LAYER_NAMES), "layers")
    report = Report("reconstruction", "Content reconstruction by layer", settings, layers, runs=len(layers))
    rows: list[list[Any]] = []
    results: dict[str, ObjectiveRecord] = {}
    for layer in layers:
        summary = report.fit(
            layer,
            _fit_config(
                report,
                layer,
                "content_reconstruction",
                [{"name": layer, "content_layers": [layer]}],
                {"content": settings.content},
            ),
        )
        objective = summary.objectives[layer]
        results[layer] = objective
        metrics, initial, final = objective.metrics, objective.initial_loss["total"], objective.final_loss
        rows.append(
            [
                layer,
                conv_depth(layer),
                "real" if layer in report.features.pretrained_layers else "random",
                metrics["psnr"],
                metrics["ssim"],
                final["total"] / initial if initial else math.nan,
            ]
        )
    report.table(
        f"PSNR and SSIM against the target after {settings.steps} L-BFGS steps from noise, {settings.size} px; "
        "'weights' says whether the layer's value comes from real (loaded) or random weights.",
        ["layer", "conv #", "weights", "PSNR dB", "SSIM", "final/initial loss"],
        rows,
    )
    kinds = [kind for kind in ("conv", "relu", "pool") if any(layer.startswith(kind) for layer in layers)]
    depths = sorted({conv_depth(layer) for layer in layers})
    cells: list[list[Image.Image | None]] = [
        [to_pil(load_image(settings.content, settings.size, key="content"))] + [None] * (len(kinds) - 1)
    ]
    notes = [["target"] + [""] * (len(kinds) - 1)]
    for depth in depths:
        row, note = [], []
        for kind in kinds:
            layer = next((name for name in layers if name.startswith(kind) and conv_depth(name) == depth), None)
            row.append(_open(report.run_dir(layer) / result_file(layer)) if layer else None)
            note.append(f"{layer} {results[layer].metrics['psnr']:.1f} dB" if layer else "")
        cells.append(row)
        notes.append(note)
    report.figure(
        "reconstructions.png",
        image_table(cells, kinds, ["target"] + [f"conv #{d}" for d in depths], notes),
        f"Reconstruction from noise at each layer ({settings.steps} steps, {settings.size} px)",
    )
    for metric, label, log in (("psnr", "PSNR (dB)", False), ("ssim", "SSIM", False)):
        series = [
            Series(
                kind,
                [conv_depth(layer) for layer in layers if layer.startswith(kind)],
                [results[layer].metrics[metric] for layer in layers if layer.startswith(kind)],
            )
            for kind in kinds
        ]
        report.plot(
            f"{metric}_by_layer.png",
            line_plot(series, "conv # (depth of the layer)", label, log_y=log),
            f"{label} of the reconstruction against the target, by depth",
        )
    _reconstruction_claims(report, layers, results)
    return report.write()


def _reconstruction_claims(report: Report, layers: list[str], results: dict[str, ObjectiveRecord]) -> None:
    ssim = {layer: results[layer].metrics["ssim"] for layer in layers}
    psnr = {layer: results[layer].metrics["psnr"] for layer in layers}
    shallow, deep = min(layers, key=layer_index), max(layers, key=layer_index)
    lines = [
        "## The study's claims on these weights",
        f"- Shallow layers give back the image: {shallow} reaches PSNR {psnr[shallow]:.1f} dB, SSIM "
        f"{ssim[shallow]:.3f} → {_verdict(ssim[shallow] >= 0.9)} (criterion: SSIM ≥ 0.9).",
    ]
    if deep != shallow:
        lines.append(
            f"- Deep layers give noisy contours: SSIM falls from {ssim[shallow]:.3f} ({shallow}) to {ssim[deep]:.3f} "
            f"({deep}) → {_verdict(ssim[deep] < 0.5 * ssim[shallow])} (criterion: the deepest layer's SSIM is below "
            "half the shallowest's)."
        )
    pairs = [(layer, "relu" + layer[4:]) for layer in layers if layer.startswith("conv") and "relu" + layer[4:] in psnr]
    if pairs:
        gaps = [abs(psnr[conv] - psnr[relu]) for conv, relu in pairs]
        lines.append(
            f"- conv ≈ relu at equal depth: median |ΔPSNR| over {len(pairs)} pairs is {statistics.median(gaps):.2f} dB "
            f"(largest {max(gaps):.2f} dB) → {_verdict(statistics.median(gaps) <= 3.0)} (criterion: median ≤ 3 dB)."
        )
    report.text(*lines)


# -- 2. Gram texture by layer set --------------------------------------------------------------------------------


def _luminance(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255 @ np.array([0.299, 0.587, 0.114])


def radial_spectrum(image: Image.Image, bins: int = 16) -> np.ndarray:
    """Mean power of the luminance (mean removed) in ``bins`` equal rings of spatial frequency, 0 to 0.5 cycles/pixel.

    A ring no frequency of the image falls in is NaN.
    """
    luminance = _luminance(image)
    power = np.abs(np.fft.fft2(luminance - luminance.mean())) ** 2 / luminance.size
    radius = np.hypot(
        *np.meshgrid(np.fft.fftfreq(luminance.shape[0]), np.fft.fftfreq(luminance.shape[1]), indexing="ij")
    )
    keep = (radius > 0) & (radius <= 0.5)
    ring = np.minimum((radius[keep] / 0.5 * bins).astype(int), bins - 1)
    counts = np.bincount(ring, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(ring, weights=power[keep], minlength=bins) / counts


def spectrum_distance(image: Image.Image, reference: Image.Image, bins: int = 16) -> float:
    """Mean absolute log10 ratio of the radially averaged luminance power spectra (:func:`radial_spectrum`).

    0 when the two have the same power at every scale of spatial frequency; 1 when they differ tenfold on average.
    Phase-blind: it measures the scale and contrast of the structure, not its shapes.
    """
    a, b = radial_spectrum(image, bins), radial_spectrum(reference, bins)
    both = np.isfinite(a) & np.isfinite(b)
    tiny = 1e-12  # a flat image has no power at all
    return float(np.abs(np.log10((a[both] + tiny) / (b[both] + tiny))).mean())


def colour_distance(image: Image.Image, reference: Image.Image, projections: int = 64) -> float:
    """Sliced Wasserstein-1 distance between the RGB pixel distributions, in ``[0, 1]`` units.

    The mean, over ``projections`` fixed random directions of RGB space, of the mean absolute difference between the
    two images' quantiles of the pixels projected on that direction; blind to where the pixels are.
    """
    directions = np.random.default_rng(0).normal(size=(3, projections))
    directions /= np.linalg.norm(directions, axis=0)
    levels = (np.arange(256) + 0.5) / 256
    quantiles = [
        np.quantile(np.asarray(picture.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255 @ directions, levels, 0)
        for picture in (image, reference)
    ]
    return float(np.abs(quantiles[0] - quantiles[1]).mean())


HELD_OUT = (
    "Held-out measures (optimised by no setting, and independent of the VGG weights): 'spectrum distance' is the mean "
    "absolute log10 ratio of the radially averaged power spectra of the texture's and the result's luminance "
    "(16 rings, 0-0.5 cycles/pixel): how far the scale and contrast of the structure differ, 0 for a match, 1 for "
    "tenfold on average; it is phase-blind, so it cannot tell a texture from noise with the same spectrum. "
    "'colour distance' is the sliced Wasserstein-1 distance between the RGB pixel distributions (64 directions, "
    "[0, 1] units), blind to where the pixels are. Statistics of VGG layers no setting uses were not chosen: every "
    "setting uses conv layers only, and relu and pool outputs are functions of them, so they would be held out only in "
    "part, and the conv1-16 setting matches (nearly) all of them."
)


def texture_layers(settings: ReportSettings) -> Path:
    """Gram texture synthesis from cumulative and single conv layer sets; convergence by setting."""
    sets = {**CUMULATIVE, **SINGLE}
    report = Report("texture_layers", "Gram texture synthesis by layer set", settings, list(CONV_LAYERS), len(sets))
    curves: dict[str, list[float]] = {}
    own = StyleMeter(report, settings.texture, CONV_LAYERS, "gram", settings.size)
    texture = to_pil(load_image(settings.texture, settings.size, key="texture"))
    rows = []
    for name, layers in sets.items():
        summary = report.fit(
            name,
            _fit_config(
                report,
                name,
                "texture_gram",
                [_style_objective(name, layers, "gram", settings)],
                {"style": [settings.texture]},
            ),
        )
        _, curves[name] = report.scalars(name, f"{name}/total")
        real = sum(layer in report.features.pretrained_layers for layer in layers)
        reached = _steps_to(curves[name], settings.fraction)
        objective = summary.objectives[name]
        result = report.run_dir(name) / result_file(name)
        image = _open(result)
        rows.append(
            [
                name,
                f"{real}/{len(layers)} real",
                objective.initial_loss["total"],
                objective.final_loss["total"],
                objective.final_loss["total"] / objective.initial_loss["total"],
                reached if reached is not None else f"> {len(curves[name]) - 1}",
                spectrum_distance(image, texture),
                colour_distance(image, texture),
                own(result),
            ]
        )
    report.table(
        f"Gram texture synthesis from noise, {settings.steps} L-BFGS steps at {settings.size} px. 'steps to "
        f"{settings.fraction:g}×' counts the steps until the loss first falls to that fraction of its initial value. "
        f"{HELD_OUT} 'conv1-16 Gram loss' is the conv1-16 setting's own objective up to a constant factor (Gram "
        "over all 16 conv layers, each weighing 1/16), so that setting is favoured on it by construction: it is "
        "shown, not ranked on.",
        ["setting", "layers", "initial loss", "final loss", "final/initial", f"steps to {settings.fraction:g}×",
         "spectrum distance (held out)", "colour distance (held out)", "conv1-16 Gram loss (conv1-16's objective)"],
        rows,
    )  # fmt: skip
    cells = [[texture] + [_open(report.run_dir(name) / result_file(name)) for name in CUMULATIVE]]
    cells.append([None] + [_open(report.run_dir(name) / result_file(name)) for name in SINGLE])
    notes = [["texture", *CUMULATIVE], ["", *SINGLE]]
    report.figure(
        "textures.png",
        image_table(cells, ["texture", "set 1", "set 2", "set 3", "set 4"], ["cumulative", "single"], notes),
        f"Gram textures from cumulative conv layer sets (top) and single conv layers (bottom), {settings.steps} steps",
    )
    series = [Series(name, range(len(values)), [v / values[0] for v in values]) for name, values in curves.items()]
    report.plot(
        "loss_by_step.png",
        line_plot(series, "step", "style loss / initial", log_y=True),
        "Style loss against step, each setting relative to its own initial loss",
    )
    spectrum = {row[0]: row[6] for row in rows}
    colour = {row[0]: row[7] for row in rows}
    cumulative = [spectrum[name] for name in CUMULATIVE]
    steps = {row[0]: row[5] for row in rows}
    needed = {name: value if isinstance(value, int) else math.inf for name, value in steps.items()}
    report.text(
        "## The study's claims on these weights",
        "Ranking on the held-out spectrum distance (closest to the texture first): "
        + ", ".join(f"{name} {spectrum[name]:.3g}" for name in sorted(spectrum, key=spectrum.__getitem__))
        + ". On the held-out colour distance: "
        + ", ".join(f"{name} {colour[name]:.3g}" for name in sorted(colour, key=colour.__getitem__))
        + ".",
        "",
        "- More layers give better structure: the held-out spectrum distance of the cumulative sets is "
        + ", ".join(f"{name} {spectrum[name]:.3g}" for name in CUMULATIVE)
        + f" → {_verdict(all(b <= a for a, b in zip(cumulative, cumulative[1:], strict=False)))} (criterion: it "
        "falls, or stays, each time layers are added; one texture and one seed, so a single case).",
        f"- Single deep layers converge slowly: steps to {settings.fraction:g}× are "
        + ", ".join(f"{name} {steps[name]}" for name in SINGLE)
        + f" → {_verdict(needed['conv16'] > needed['conv1'])} (criterion: conv16 needs more steps than conv1; one "
        "that never gets there counts as infinitely many).",
    )
    return report.write()


# -- 3. Gram against mean/variance ------------------------------------------------------------------------------


def colour_statistics(image: Image.Image) -> list[float]:
    """Mean luminance (Rec. 601), mean HSV saturation and the mean of R, G and B, all in ``[0, 1]``."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    luminance = _luminance(image)
    saturation = np.asarray(image.convert("HSV"), dtype=np.float64)[..., 1] / 255
    return [float(luminance.mean()), float(saturation.mean()), *(float(c) for c in rgb.reshape(-1, 3).mean(0))]


def _loss_seconds(
    report: Report,
    layers: list[str],
    size: int,
    repeats: int,
    compared: Sequence[Statistic] = ("gram", "meanvar"),
) -> dict[str, list[float]]:
    """Seconds of VGG forward + style loss + backward for each statistic, measured in turn ``repeats`` times.

    Each round times every statistic once, round ``r`` starting with the ``r``-th (modulo their number) and going on
    in order, so drift in the machine's speed and any cost of going first fall on all of them alike (for two: the
    first one first in even rounds and second in odd ones); one warm-up round is not counted.
    """
    features = report.features
    device = features.mean.device
    generator = torch.Generator().manual_seed(1)
    target = features(torch.rand(1, 3, size, size, generator=generator).to(device))
    losses = {
        statistic: LayerStyleLoss({layer: target[layer] for layer in layers}, statistic) for statistic in compared
    }
    times: dict[str, list[float]] = {statistic: [] for statistic in losses}
    image = torch.rand(1, 3, size, size, generator=generator).to(device).requires_grad_()
    order = list(losses)
    for round_ in range(repeats + 1):
        first = round_ % len(order)
        for statistic in order[first:] + order[:first]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            losses[statistic](features(image)).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[statistic].append(time.perf_counter() - started)
            image.grad = None
    return {statistic: values[1:] for statistic, values in times.items()}


def spread(values: Sequence[float]) -> tuple[float, float, float, float, float]:
    """Minimum, first quartile, median, third quartile and maximum (linear interpolation between order statistics)."""
    low, q1, median, q3, high = np.percentile(np.asarray(values, dtype=np.float64), [0, 25, 50, 75, 100])
    return float(low), float(q1), float(median), float(q3), float(high)


def timing_verdict(gram: Sequence[float], meanvar: Sequence[float]) -> str:
    """``slower``, ``faster`` (mean/var against Gram) or ``no measurable difference``.

    A difference only when the interquartile ranges of the two timings do not overlap.
    """
    _, g1, _, g3, _ = spread(gram)
    _, m1, _, m3, _ = spread(meanvar)
    return "slower" if m1 > g3 else "faster" if m3 < g1 else "no measurable difference"


def _texture_label(source: str) -> str:
    name = source.split(":", 1)[1] if is_sample(source) else Path(source).stem
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)[:40] or "texture"


def gram_vs_meanvar(settings: ReportSettings) -> Path:
    """Gram against mean/variance textures on several textures and seeds: look, colour, convergence and cost."""
    layers = check_layers(settings.style_layers, "style_layers")
    textures = {
        f"{index}-{_texture_label(source)}": (
            source,
            to_pil(load_image(source, settings.size, key=f"textures[{index}] ({source})")),
        )
        for index, source in enumerate(settings.textures)
    }
    cases = [(texture, seed) for texture in textures for seed in settings.seeds]
    title = "Gram against mean/variance texture synthesis"
    report = Report("gram_vs_meanvar", title, settings, layers, runs=2 * len(cases))  # Gram and mean/var per case
    results: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for texture, seed in cases:
        source = textures[texture][0]
        results[texture, seed] = {}
        for statistic in ("gram", "meanvar"):
            run = f"{statistic}_{texture}_seed{seed}"
            objective = _style_objective(statistic, layers, statistic, settings)
            config = _fit_config(report, run, f"texture_{statistic}", [objective], {"style": [source]}, seed=seed)
            summary = report.fit(run, config, seed=seed)
            _, curve = report.scalars(run, f"{statistic}/total")
            image = _open(report.run_dir(run) / result_file(statistic))
            results[texture, seed][statistic] = {
                "image": image,
                "colour": colour_statistics(image),
                "curve": curve,
                "seconds": summary.seconds_per_step_after_first or summary.seconds_per_step,
            }
    first = settings.seeds[0]
    report.figure(
        "textures.png",
        image_table(
            [[image, *(results[name, first][s]["image"] for s in ("gram", "meanvar"))] for name, (_, image) in
             textures.items()],
            ["texture", "gram", "meanvar"],
            list(textures),
            [
                [f"L={colour_statistics(image)[0]:.3f}"]
                + [f"L={results[name, first][s]['colour'][0]:.3f}" for s in ("gram", "meanvar")]
                for name, (_, image) in textures.items()
            ],
        ),
        f"Each texture, and syntheses matching its Gram matrices or its channel means and variances over "
        f"{', '.join(layers)} (seed {first}, {settings.steps} steps, {settings.size} px)",
        ["L: mean luminance (Rec. 601) in [0, 1]"],
    )  # fmt: skip
    colour_rows, darker = [], []
    for texture, seed in cases:
        gram, meanvar = (results[texture, seed][s]["colour"] for s in ("gram", "meanvar"))
        darker.append(meanvar[0] < gram[0])
        reference = colour_statistics(textures[texture][1])
        colour_rows.append(
            [texture, seed, reference[0], gram[0], meanvar[0], "yes" if darker[-1] else "no", reference[1], gram[1],
             meanvar[1]]
        )  # fmt: skip
    report.table(
        "Colour of each case: mean luminance (Rec. 601) and mean HSV saturation over pixels, in [0, 1], of the "
        "texture and of the Gram and mean/var syntheses; 'mean/var darker' compares the two syntheses' luminance.",
        ["texture", "seed", "luminance texture", "luminance Gram", "luminance mean/var", "mean/var darker",
         "saturation texture", "saturation Gram", "saturation mean/var"],
        colour_rows,
    )  # fmt: skip
    convergence_rows, later, slower_fits = [], [], []
    for texture, seed in cases:
        gram, meanvar = (results[texture, seed][s] for s in ("gram", "meanvar"))
        reached = [_steps_to(r["curve"], settings.fraction) for r in (gram, meanvar)]
        needed = [math.inf if value is None else value for value in reached]
        later.append(needed[1] > needed[0])
        slower_fits.append(meanvar["seconds"] > gram["seconds"])
        convergence_rows.append(
            [texture, seed, gram["curve"][-1] / gram["curve"][0], meanvar["curve"][-1] / meanvar["curve"][0],
             *(value if value is not None else f"> {len(r['curve']) - 1}" for value, r in zip(reached, (gram, meanvar),
                                                                                               strict=True)),
             gram["seconds"], meanvar["seconds"]]
        )  # fmt: skip
    report.table(
        f"Convergence of each case. 'steps to {settings.fraction:g}×' counts the steps until the loss first falls to "
        "that fraction of its initial value; 's/step' is each fit's wall time per step after the first (the fits run "
        "one after another, so these are not the timing the verdict uses).",
        ["texture", "seed", "final/initial Gram", "final/initial mean/var", f"steps to {settings.fraction:g}× Gram",
         f"steps to {settings.fraction:g}× mean/var", "s/step Gram", "s/step mean/var"],
        convergence_rows,
    )  # fmt: skip
    times = _loss_seconds(report, layers, settings.size, settings.timing_repeats)
    ratios = [m / g for g, m in zip(times["gram"], times["meanvar"], strict=True)]
    report.table(
        f"Seconds of VGG forward + style loss + backward at {settings.size} px on "
        f"{report.features.mean.device.type}, Gram and mean/var measured alternately ({settings.timing_repeats} "
        "rounds after one warm-up, which one goes first alternating), and their ratio within each round.",
        ["measure", "median", "Q1", "Q3", "min", "max"],
        [
            [name, median, q1, q3, low, high]
            for name, (low, q1, median, q3, high) in (
                ("Gram s", spread(times["gram"])), ("mean/var s", spread(times["meanvar"])),
                ("mean/var / Gram", spread(ratios)),
            )
        ],
    )  # fmt: skip
    series = [
        Series(f"{s} {texture} seed {seed}", range(len(r["curve"])), [v / r["curve"][0] for v in r["curve"]])
        for (texture, seed), result in results.items()
        if seed == first
        for s, r in result.items()
    ]
    report.plot(
        "loss_by_step.png",
        line_plot(series, "step", "style loss / initial", log_y=True),
        f"Style loss against step, each run relative to its initial loss (seed {first})",
    )
    timing = timing_verdict(times["gram"], times["meanvar"])
    g, m, r = spread(times["gram"]), spread(times["meanvar"]), spread(ratios)
    numbers = (
        f"median {m[2]:.4g} s (IQR {m[1]:.4g}-{m[3]:.4g}, range {m[0]:.4g}-{m[4]:.4g}) for mean/var against "
        f"{g[2]:.4g} s (IQR {g[1]:.4g}-{g[3]:.4g}, range {g[0]:.4g}-{g[4]:.4g}) for Gram; mean/var / Gram per round "
        f"{r[2]:.3g} (range {r[0]:.3g}-{r[4]:.3g}), mean/var the slower in {sum(v > 1 for v in ratios)} of "
        f"{len(ratios)} rounds"
    )
    if timing == "no measurable difference":
        timing_claim = f"**no measurable difference**: {numbers}"
    else:
        timing_claim = f"the alternating timing finds mean/var {timing}: {numbers} → {_verdict(timing == 'slower')}"
    n = len(cases)
    report.text(
        "## The study's claims on these weights",
        f"Each claim is counted over {n} cases ({len(textures)} texture(s) × {len(settings.seeds)} seed(s) "
        f"{settings.seeds}); a claim is said to hold only when it holds on all of them, and 'not shown' when it holds "
        "on some.",
        "",
        f"- Mean/var is darker: the mean/var synthesis has lower mean luminance than the Gram one; "
        f"{_count_verdict(darker)} (criterion: every case).",
        f"- Mean/var is slower per step: {timing_claim} (criterion: the interquartile ranges of the alternating "
        f"timing do not overlap). In the sequential fits mean/var took longer per step in {sum(slower_fits)} of {n} "
        "cases (not used for the verdict).",
        f"- Mean/var needs more steps to {settings.fraction:g}× of its initial loss than Gram: "
        f"{_count_verdict(later)} (criterion: every case; one that never gets there counts as infinitely many).",
    )
    return report.write()


# -- 4 and 5. style-guided diffusion ------------------------------------------------------------------------------


def _generation_config(
    report: Report,
    run: str,
    scale: float,
    style_prompt: str | None = None,
    preview_every: int = 0,
    preview_steps: list[int] | None = None,
    prompt: str | None = None,
    init_image: str | None = None,
    strength: float = 1.0,
) -> dict[str, Any]:
    """A shipped generation config with the report's settings.

    ``configs/guided_diffusion.yaml``; ``prompt_only_diffusion.yaml`` with a ``style_prompt``; ``guided_img2img.yaml``
    with an ``init_image``. The report sets the prompt (``settings.prompt`` unless given), images, sizes, guidance
    scale and img2img strength; the sampler, the guidance schedule and the batch size stay the shipped config's.
    """
    s = report.settings
    logger = {
        "class_path": "lightning_nst.TrajectoryLogger",
        "init_args": {
            "preview_every": preview_every,
            "preview_steps": preview_steps,
            "save_dir": str(report.run_dir(run) / "x0"),
        },
    }
    writer = {"class_path": "lightning_nst.GenerationWriter", "init_args": {"output_dir": None}}
    # Gram, whatever the shipped config says: the report's tables compare Gram style losses.
    guidance = {"scale": scale, "guidance_size": s.guidance_size, "layers": s.style_layers, "statistic": "gram"}
    guidance["vgg"] = asdict(s.vgg)
    model = {
        "model": s.model,
        "tiny_vae": s.tiny_vae,
        "num_inference_steps": s.sampling_steps,
        "cfg_scale": s.cfg_scale,
        "height": s.image_size,
        "width": s.image_size,
        "guidance": {"init_args": guidance},
    }
    data: dict[str, Any] = {
        "prompts": [prompt or s.prompt],
        "seeds": [s.seed],
        "style": [s.style],
        "negative_prompt": s.negative_prompt,
    }
    if style_prompt:
        data["style_prompts"] = [style_prompt]
    if init_image is not None:
        model["strength"] = strength
        data["init_images"] = [init_image]
    name = "prompt_only_diffusion" if style_prompt else "guided_diffusion"
    return run_config(
        "guided_img2img" if init_image is not None else name,
        report.trainer(run, callbacks=[logger, writer]),
        model={"init_args": model},
        data={"init_args": data},
    )


def _generate(report: Report, run: str, **kwargs: Any) -> GenerationRecord:
    (record,) = report.predict(run, _generation_config(report, run, **kwargs))
    return record


def guided_vs_nst(settings: ReportSettings) -> Path:
    """Guided sampling against Gatys NST (Gram and mean/var) started from the plain sample of the same seed."""
    layers = check_layers(settings.style_layers, "style_layers")
    content = check_layers([settings.content_layer], "content_layer")
    title = "Style-guided diffusion against neural style transfer"
    report = Report("guided_vs_nst", title, settings, layers + content, runs=4)  # guided, plain, NST Gram, mean/var
    fractions = [i / settings.rows for i in range(settings.rows)]
    sample_steps = sorted({round(f * settings.sampling_steps) for f in fractions})
    nst_steps = sorted({round(f * settings.steps) for f in fractions})
    guided = _generate(report, "guided", scale=settings.guidance_scale, preview_steps=sample_steps)
    plain = _generate(report, "plain", scale=0.0)
    plain_image = report.run_dir("plain") / plain.image
    save_every = math.gcd(settings.steps, *nst_steps)
    for statistic in ("gram", "meanvar"):
        objective = {**_style_objective(statistic, layers, statistic, settings), "content_layers": content}
        report.fit(
            f"nst_{statistic}",
            _fit_config(
                report,
                f"nst_{statistic}",
                f"style_transfer_{statistic}",
                [objective],
                {"content": str(plain_image), "style": [settings.style]},
                init="content",
                save_every=save_every,
            ),
        )
    meters = {
        statistic: StyleMeter(report, settings.style, layers, statistic, settings.guidance_size)
        for statistic in ("gram", "meanvar")
    }
    gram = meters["gram"]
    cells, notes, labels, rows = [], [], [], []
    for index, fraction in enumerate(fractions):
        step, nst_step = round(fraction * settings.sampling_steps), round(fraction * settings.steps)
        x0 = report.run_dir("guided") / "x0" / preview_file(guided.index, step)
        snaps = [report.run_dir(f"nst_{s}") / step_file(s, nst_step) for s in ("gram", "meanvar")]
        losses = [gram(path) for path in (x0, *snaps)]
        t = guided.timesteps[step] if step < len(guided.timesteps) else "end"
        cells.append([_open(path) for path in (x0, *snaps)])
        notes.append([f"L={value:.3g}" for value in losses])
        labels.append(f"{index}: step {step} / NST {nst_step}")
        rows.append([f"{step} (t={t})", losses[0], nst_step, losses[1], losses[2]])
    finals = {
        "guided": report.run_dir("guided") / guided.image,
        "NST Gram": report.run_dir("nst_gram") / result_file("gram"),
        "NST mean/var": report.run_dir("nst_meanvar") / result_file("meanvar"),
        "plain sample": plain_image,
    }
    final_losses = {name: {s: meter(path) for s, meter in meters.items()} for name, path in finals.items()}
    cells.append([_open(finals[name]) for name in ("guided", "NST Gram", "NST mean/var")])
    notes.append([f"L={final_losses[name]['gram']:.3g}" for name in ("guided", "NST Gram", "NST mean/var")])
    labels.append("final")
    columns = ["guided x0 preview", "NST Gram", "NST mean/var"]
    report.figure(
        "guided_vs_nst.png",
        image_table(cells, columns, labels, notes),
        f"'{settings.prompt}': guided sampling ({settings.sampling_steps} DDIM steps, scale {settings.guidance_scale}) "
        f"against NST ({settings.steps} L-BFGS steps) from the plain sample of seed {settings.seed}",
        [
            f"L: Gram style loss over {', '.join(layers)} at {settings.guidance_size} px against {settings.style}",
            f"Stable Diffusion pipeline: {settings.model}",
        ],
    )
    report.table(
        f"Style loss (Gram over {', '.join(layers)} at {settings.guidance_size} px, one definition for every cell) "
        "along the runs; NST starts from the plain sample.",
        ["sampling step", "guided x0", "NST step", "NST Gram", "NST mean/var"],
        rows,
    )
    report.table(
        "Final images on one definition each: Gram and mean/var style loss over the same layers.",
        ["image", "Gram style loss", "mean/var style loss"],
        [[name, values["gram"], values["meanvar"]] for name, values in final_losses.items()],
    )
    best = min(("guided", "NST Gram", "NST mean/var"), key=lambda name: final_losses[name]["gram"])
    report.text(
        f"Lowest final Gram style loss: {best}. The guided sample lowers the plain sample's Gram style loss "
        f"{final_losses['plain sample']['gram'] / final_losses['guided']['gram']:.3g}×."
    )
    return report.write()


def guided_vs_prompt(settings: ReportSettings) -> Path:
    """Guided sampling against asking for the style in words, same prompt and seed."""
    layers = check_layers(settings.style_layers, "style_layers")
    report = Report("guided_vs_prompt", "Style guidance against prompt-only styling", settings, layers, runs=2)
    records = {
        "guided": _generate(report, "guided", scale=settings.guidance_scale, preview_every=1),
        "prompt-only": _generate(report, "prompt_only", scale=0.0, style_prompt=settings.style_prompt, preview_every=1),
    }
    runs = {"guided": "guided", "prompt-only": "prompt_only"}
    timesteps = records["guided"].timesteps
    chosen: dict[int, int] = {}  # step -> the first timestep asked for that it is nearest to
    for target in settings.timesteps:
        chosen.setdefault(min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - target)), target)
    cells, notes, labels, rows = [], [], [], []
    for step, target in chosen.items():
        losses = [records[name].style_loss[step] for name in records]
        cells.append(
            [_open(report.run_dir(runs[name]) / "x0" / preview_file(records[name].index, step)) for name in records]
        )
        notes.append([f"L={value:.3g}" for value in losses])
        labels.append(f"t={timesteps[step]}")
        rows.append([target, f"{timesteps[step]} (step {step})", *losses])
    finals = [records[name].final_style_loss for name in records]
    cells.append([_open(report.run_dir(runs[name]) / records[name].image) for name in records])
    notes.append([f"L={value:.3g}" for value in finals])
    labels.append("final")
    rows.append(["final image", "", *finals])
    report.figure(
        "guided_vs_prompt.png",
        image_table(cells, ["guided", "prompt-only"], labels, notes),
        f"x0 previews of '{settings.prompt}' (seed {settings.seed}): style guidance (scale {settings.guidance_scale}) "
        f"against the prompt '{records['prompt-only'].prompt}'",
        [
            f"L: Gram style loss over {', '.join(layers)} at {settings.guidance_size} px against {settings.style}",
            f"Stable Diffusion pipeline: {settings.model}",
        ],
    )
    report.table(
        f"Style loss of the x0 previews (Gram over {', '.join(layers)} at {settings.guidance_size} px) at the "
        "sampler steps nearest the study's timesteps, and of the final images.",
        ["timestep asked", "timestep (step)", "guided", "prompt-only"],
        rows,
    )
    ratio = finals[1] / finals[0] if finals[0] else math.nan
    report.text(
        f"Final style loss, prompt-only / guided: **{ratio:.3g}×** "
        + (
            "(guidance matches the style image more closely)."
            if ratio > 1
            else "(the prompt alone matches it as well)."
        )
    )
    series = [Series(name, range(len(record.style_loss)), record.style_loss) for name, record in records.items()]
    report.plot(
        "style_loss_by_step.png",
        line_plot(series, "sampling step", "style loss of x0", log_y=True),
        "Style loss of the clean prediction x0 at every sampling step",
    )
    return report.write()


# -- guided img2img against NST -----------------------------------------------------------------------------------


class ContentMeter:
    """PSNR and SSIM (torchmetrics) of image files against the content image, all at one size.

    The content image is resized to ``size`` on its long edge and every image measured to exactly its height and
    width, so outputs whose sides were rounded (img2img's multiples of 8) are compared pixel for pixel.
    """

    def __init__(self, content: str, size: int) -> None:
        self.target = load_image(content, size, key="content")

    @torch.no_grad()
    def __call__(self, path: str | Path) -> tuple[float, float]:
        """``(PSNR in dB, SSIM)`` of the image file at ``path``."""
        # Decoded as the target was (a JPEG several times larger at reduced scale), so the photo is itself exactly.
        image = read_image(path, key=str(path), max_side=max(self.target.shape[-2:]))
        image = TF.resize(image, list(self.target.shape[-2:]), antialias=True).clamp(0, 1)
        psnr = peak_signal_noise_ratio(image, self.target, data_range=1.0).item()
        ssim = structural_similarity_index_measure(image, self.target, data_range=1.0).item()
        return psnr, float(ssim)


def _img2img_run(strength: float, guided: bool) -> str:
    return f"{'guided' if guided else 'unguided'}_{strength:g}"


def guided_img2img_vs_nst(settings: ReportSettings) -> Path:
    """Guided img2img of the content photo at each strength against its unguided img2img and Gatys NST (Gram)."""
    layers = check_layers(settings.style_layers, "style_layers")
    content = check_layers([settings.content_layer], "content_layer")
    strengths = sorted(settings.strengths)
    title = "Guided img2img against neural style transfer"
    report = Report("guided_img2img_vs_nst", title, settings, layers + content, runs=1 + 2 * len(strengths))
    objective = {**_style_objective("gram", layers, "gram", settings), "content_layers": content}
    report.fit(
        "nst_gram",
        _fit_config(
            report,
            "nst_gram",
            "style_transfer_gram",
            [objective],
            {"content": settings.content, "style": [settings.style]},
            init="content",
        ),
    )
    images: dict[tuple[float, bool], str] = {}  # (strength, guided) -> image file
    for strength in strengths:
        for guided in (False, True):
            run = _img2img_run(strength, guided)
            record = _generate(
                report,
                run,
                scale=settings.guidance_scale if guided else 0.0,
                prompt=settings.content_prompt,
                init_image=settings.content,
                strength=strength,
            )
            images[strength, guided] = str(report.run_dir(run) / record.image)
    style = StyleMeter(report, settings.style, layers, "gram", settings.guidance_size)
    photo = ContentMeter(settings.content, settings.guidance_size)
    nst = str(report.run_dir("nst_gram") / result_file("gram"))
    # (Gram style loss, PSNR, SSIM) by file, the photo by its source
    measured = {path: (style(path), *photo(path)) for path in [settings.content, nst, *images.values()]}
    rows = [["content photo", "", "", *measured[settings.content]], ["NST Gram", "", "", *measured[nst]]]
    for (strength, guided), path in images.items():
        rows.append(["guided img2img" if guided else "img2img", strength, settings.guidance_scale * guided,
                     *measured[path]])  # fmt: skip
    report.table(
        f"The content photo ({settings.content}) styled after {settings.style}: NST ({settings.steps} L-BFGS steps "
        f"from the photo, {settings.size} px) and img2img of '{settings.content_prompt}' (seed {settings.seed}, "
        f"the last int({settings.sampling_steps} × strength) of {settings.sampling_steps} sampling steps), unguided "
        f"(scale 0) and guided, at each strength. Style loss: Gram over {', '.join(layers)} at "
        f"{settings.guidance_size} px, one definition for every row; PSNR and SSIM against the photo at its size "
        f"at {settings.guidance_size} px (the photo's own row is the reference: PSNR infinite, shown '–').",
        ["image", "strength", "guidance scale", "Gram style loss", "PSNR dB", "SSIM"],
        rows,
    )
    pairs = [(strength, measured[images[strength, False]], measured[images[strength, True]]) for strength in strengths]
    report.table(
        "Guided against unguided img2img at each strength, same seed: the ratio of their style losses and the change "
        "of PSNR and SSIM that guidance costs.",
        ["strength", "style loss guided / unguided", "Δ PSNR dB", "Δ SSIM"],
        [[strength, g[0] / u[0] if u[0] else math.nan, g[1] - u[1], g[2] - u[2]] for strength, u, g in pairs],
    )
    cells: list[list[Image.Image | None]] = []
    notes: list[list[str]] = []
    style_image = to_pil(load_image(settings.style, settings.guidance_size, key="style"))

    def note(path: str) -> str:
        return f"L={measured[path][0]:.3g} SSIM={measured[path][2]:.2f}"

    for index, strength in enumerate(strengths):
        first = index == 0
        paths = [nst if first else None, images[strength, False], images[strength, True]]
        row = [style_image, to_pil(photo.target)] if first else [None, None]
        cells.append([*row, *(_open(Path(path)) if path else None for path in paths)])
        notes.append(["", note(settings.content) if first else "", *(note(path) if path else "" for path in paths)])
    report.figure(
        "guided_img2img_vs_nst.png",
        image_table(
            cells,
            ["style", "content photo", "NST Gram", "img2img", "guided img2img"],
            [f"strength {strength:g}" for strength in strengths],
            notes,
        ),
        f"'{settings.content_prompt}' from the content photo (seed {settings.seed}): img2img unguided and guided "
        f"(scale {settings.guidance_scale}) at each strength, against NST Gram ({settings.steps} steps)",
        [
            f"L: Gram style loss over {', '.join(layers)} at {settings.guidance_size} px against {settings.style}; "
            f"SSIM against the photo at {settings.guidance_size} px",
            f"Stable Diffusion pipeline: {settings.model}",
        ],
    )
    lower = [g[0] < u[0] for _, u, g in pairs]
    nst_style = [measured[nst][0] < g[0] for _, _, g in pairs]
    nst_ssim = [measured[nst][2] > g[2] for _, _, g in pairs]
    lines = [
        "## The study's claims on these weights",
        f"Stable Diffusion pipeline: {settings.model}. Each claim is counted over the {len(strengths)} strength(s) "
        f"{strengths}; it is said to hold only when it holds at all of them, and 'not shown' when at some.",
        "",
        "- Guided img2img lowers the style loss against unguided img2img at each strength (ratios "
        f"{', '.join(f'{g[0] / u[0]:.3g}' for _, u, g in pairs)}): {_count_verdict(lower)}.",
        f"- NST (Gram) reaches a lower style loss than guided img2img at each strength: {_count_verdict(nst_style)}.",
        f"- NST keeps more of the photo (higher SSIM, {measured[nst][2]:.3g}) than guided img2img at each strength: "
        f"{_count_verdict(nst_ssim)}.",
    ]
    if len(strengths) > 1:
        ssim = [u[2] for _, u, _ in pairs]
        falls = all(a > b for a, b in zip(ssim, ssim[1:], strict=False))
        lines.append(
            "- A higher strength keeps less of the photo: unguided img2img's SSIM "
            f"{' → '.join(f'{value:.3g}' for value in ssim)} from strength {strengths[0]:g} to {strengths[-1]:g} → "
            f"{_verdict(falls)} (criterion: it falls at each higher strength)."
        )
    report.text(*lines)
    return report.write()


# -- style controls: colour, blends, masks and Wasserstein statistics ---------------------------------------------


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
        return {**_style_objective(name, layers, "gram", settings), "content_layers": content_layers, "color": color}

    report.fit(
        "colour",
        _fit_config(report, "colour", "style_transfer_luminance", [nst(mode, mode) for mode in COLOR_MODES],
                    {"content": settings.content, "style": [settings.style]}, init="content"),
    )  # fmt: skip
    blend_runs = {weight: f"blend_{weight:g}" for weight in weights}
    for weight, run in blend_runs.items():
        data = {"content": settings.content, "style": [settings.style, settings.second_style],
                "style_weights": [weight, 1 - weight]}  # fmt: skip
        report.fit(run, _fit_config(report, run, "style_blend", [nst("blend")], data, init="content"))
    data = {"content": settings.content, "style": [settings.style, settings.second_style], "masks": settings.masks}
    report.fit("mask", _fit_config(report, "mask", "style_masks", [nst("masks")], data, init="content"))
    objectives = [_style_objective(statistic, layers, statistic, settings) for statistic in STATISTICS]
    textures = report.fit(
        "textures", _fit_config(report, "textures", "texture_gram", objectives, {"style": [settings.texture]})
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
    times = _loss_seconds(report, layers, settings.size, settings.timing_repeats, STATISTICS)
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
            [[pil(content), pil(styles["A"]), *(_open(results[mode]) for mode in COLOR_MODES)]],
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
            [[pil(styles["A"]), *(_open(results[name]) for name in blends), pil(styles["B"])]],
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
              _open(results["mask"])]],
            ["content", "mask A", "mask B", "style A", "style B", "result"],
            ["mask"],
        ),
        f"Two-region mask: style A on mask A's region, style B on mask B's ({settings.steps} steps)",
    )  # fmt: skip
    report.figure(
        "textures.png",
        image_table(
            [[pil(texture), *(_open(texture_images[statistic]) for statistic in STATISTICS)]],
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
        f"{chroma['keep']:.3g} → {_verdict(chroma['luminance'] < chroma['keep'])} (criterion: lower).",
        f"- Match brings the colour mean closer to the content than keep: RGB mean gap {gap['match']:.3g} against "
        f"{gap['keep']:.3g} → {_verdict(gap['match'] < gap['keep'])} (criterion: lower).",
        f"- The blend sweep moves monotonically from style A to style B: as A's weight falls "
        f"({', '.join(f'{w:g}' for w in weights)}) the distance to A rises and the distance to B falls at every step; "
        f"{_count_verdict(steps)} (cases: each statistic × each style).",
        f"- Each mask region is closer to its own style than to the other: {_count_verdict(closer)} (cases: each "
        "region × each statistic).",
        "- Each texture statistic's loss falls at least 10×: "
        + ", ".join(f"{row[0]} {row[3]:.3g}×" for row in texture_rows)
        + f"; {_count_verdict(falls)}.",
    )
    return report.write()


EXPERIMENTS: dict[str, Callable[[ReportSettings], Path]] = {
    "reconstruction": reconstruction,
    "texture_layers": texture_layers,
    "gram_vs_meanvar": gram_vs_meanvar,
    "guided_vs_nst": guided_vs_nst,
    "guided_vs_prompt": guided_vs_prompt,
    "guided_img2img_vs_nst": guided_img2img_vs_nst,
    "style_controls": style_controls,
}
"""The study's experiments by name, in the study's order."""

SHIPPED = {
    "reconstruction": ["content_reconstruction"],
    "texture_layers": ["texture_gram"],
    "gram_vs_meanvar": ["texture_gram", "texture_meanvar"],
    "guided_vs_nst": ["guided_diffusion", "style_transfer_gram", "style_transfer_meanvar"],
    "guided_vs_prompt": ["guided_diffusion", "prompt_only_diffusion"],
    "guided_img2img_vs_nst": ["guided_img2img", "style_transfer_gram"],
    "style_controls": ["style_transfer_luminance", "style_blend", "style_masks", "texture_gram"],
}
"""The shipped configs each experiment's runs are built from."""


IMAGES = {
    "reconstruction": ["content"],
    "texture_layers": ["texture"],
    "gram_vs_meanvar": ["textures"],
    "guided_vs_nst": ["style"],
    "guided_vs_prompt": ["style"],
    "guided_img2img_vs_nst": ["content", "style"],
    "style_controls": ["content", "style", "second_style", "texture", "masks"],
}
"""The image settings each experiment reads: checked (each file exists, each sample is known) before anything else."""


def check_images(experiment: str, settings: ReportSettings) -> None:
    """Raise naming the first image setting of ``experiment`` that is neither a file nor a known sample."""
    for key in IMAGES.get(experiment, []):
        value = getattr(settings, key)
        for index, source in enumerate(value) if isinstance(value, list) else [(None, value)]:
            check_source(source, key if index is None else f"{key}[{index}]")


def run(experiment: str, settings: ReportSettings) -> Path:
    """Make the report of ``experiment`` and return its ``report.md``.

    A report refused for bad input leaves a folder that was new or empty as it was (:func:`undone_if_refused`).
    """
    if experiment not in EXPERIMENTS:
        raise NSTError(f"experiment: {experiment!r} is not one of {', '.join(EXPERIMENTS)}")
    settings.check()
    for name in SHIPPED.get(experiment, []):
        shipped(name)  # before any run: a missing one is named at once
    check_images(experiment, settings)
    with weights_stated_once(), undone_if_refused(report_folder(experiment, settings)):
        return EXPERIMENTS[experiment](settings)
