"""Experiment 3, ``gram_vs_meanvar``: Gram against mean/variance textures: look, colour, convergence and cost."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_nst.core.images import is_sample, load_image, to_pil
from lightning_nst.core.vgg import check_layers
from lightning_nst.outputs import result_file
from lightning_nst.report.experiments.common import count_verdict, fit_config, open_rgb, style_objective, verdict
from lightning_nst.report.experiments.measures import colour_statistics, loss_seconds, spread, steps_to
from lightning_nst.report.figures import Series, image_table, line_plot
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings


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
            objective = style_objective(statistic, layers, statistic, settings)
            config = fit_config(report, run, f"texture_{statistic}", [objective], {"style": [source]}, seed=seed)
            summary = report.fit(run, config, seed=seed)
            _, curve = report.scalars(run, f"{statistic}/total")
            image = open_rgb(report.run_dir(run) / result_file(statistic))
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
        reached = [steps_to(r["curve"], settings.fraction) for r in (gram, meanvar)]
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
    times = loss_seconds(report, layers, settings.size, settings.timing_repeats)
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
        timing_claim = f"the alternating timing finds mean/var {timing}: {numbers} → {verdict(timing == 'slower')}"
    n = len(cases)
    report.text(
        "## The study's claims on these weights",
        f"Each claim is counted over {n} cases ({len(textures)} texture(s) × {len(settings.seeds)} seed(s) "
        f"{settings.seeds}); a claim is said to hold only when it holds on all of them, and 'not shown' when it holds "
        "on some.",
        "",
        f"- Mean/var is darker: the mean/var synthesis has lower mean luminance than the Gram one; "
        f"{count_verdict(darker)} (criterion: every case).",
        f"- Mean/var is slower per step: {timing_claim} (criterion: the interquartile ranges of the alternating "
        f"timing do not overlap). In the sequential fits mean/var took longer per step in {sum(slower_fits)} of {n} "
        "cases (not used for the verdict).",
        f"- Mean/var needs more steps to {settings.fraction:g}× of its initial loss than Gram: "
        f"{count_verdict(later)} (criterion: every case; one that never gets there counts as infinitely many).",
    )
    return report.write()
