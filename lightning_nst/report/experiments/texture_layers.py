"""Experiment 2, ``texture_layers``: Gram texture synthesis by conv layer set, scored on held-out measures."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_nst.core.images import load_image, to_pil
from lightning_nst.core.vgg import CONV_LAYERS
from lightning_nst.outputs import result_file
from lightning_nst.report.experiments.common import fit_config, open_rgb, style_objective, verdict
from lightning_nst.report.experiments.measures import StyleMeter, colour_distance, spectrum_distance, steps_to
from lightning_nst.report.figures import Series, image_table, line_plot
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings

CUMULATIVE = {f"conv1-{n}": list(CONV_LAYERS[:n]) for n in (3, 6, 10, 16)}
"""The cumulative layer sets: the first 3, 6, 10 and 16 conv layers."""
SINGLE = {f"conv{n}": [CONV_LAYERS[n - 1]] for n in (1, 4, 8, 16)}
"""The single-layer sets: conv layers 1, 4, 8 and 16."""

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
"""What the table's caption says of the held-out measures."""


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
            fit_config(
                report,
                name,
                "texture_gram",
                [style_objective(name, layers, "gram", settings)],
                {"style": [settings.texture]},
            ),
        )
        _, curves[name] = report.scalars(name, f"{name}/total")
        real = sum(layer in report.features.pretrained_layers for layer in layers)
        reached = steps_to(curves[name], settings.fraction)
        objective = summary.objectives[name]
        result = report.run_dir(name) / result_file(name)
        image = open_rgb(result)
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
    cells = [[texture] + [open_rgb(report.run_dir(name) / result_file(name)) for name in CUMULATIVE]]
    cells.append([None] + [open_rgb(report.run_dir(name) / result_file(name)) for name in SINGLE])
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
        + f" → {verdict(all(b <= a for a, b in zip(cumulative, cumulative[1:], strict=False)))} (criterion: it "
        "falls, or stays, each time layers are added; one texture and one seed, so a single case).",
        f"- Single deep layers converge slowly: steps to {settings.fraction:g}× are "
        + ", ".join(f"{name} {steps[name]}" for name in SINGLE)
        + f" → {verdict(needed['conv16'] > needed['conv1'])} (criterion: conv16 needs more steps than conv1; one "
        "that never gets there counts as infinitely many).",
    )
    return report.write()
