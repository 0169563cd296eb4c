"""Experiment 5, ``guided_vs_prompt``: style guidance against asking for the style in words."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_nst.core.vgg import check_layers
from lightning_nst.outputs import preview_file
from lightning_nst.report.experiments.common import generate, open_rgb
from lightning_nst.report.figures import Series, image_table, line_plot
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings


def guided_vs_prompt(settings: ReportSettings) -> Path:
    """Guided sampling against asking for the style in words, same prompt and seed."""
    layers = check_layers(settings.style_layers, "style_layers")
    report = Report("guided_vs_prompt", "Style guidance against prompt-only styling", settings, layers, runs=2)
    records = {
        "guided": generate(report, "guided", scale=settings.guidance_scale, preview_every=1),
        "prompt-only": generate(report, "prompt_only", scale=0.0, style_prompt=settings.style_prompt, preview_every=1),
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
            [open_rgb(report.run_dir(runs[name]) / "x0" / preview_file(records[name].index, step)) for name in records]
        )
        notes.append([f"L={value:.3g}" for value in losses])
        labels.append(f"t={timesteps[step]}")
        rows.append([target, f"{timesteps[step]} (step {step})", *losses])
    finals = [records[name].final_style_loss for name in records]
    cells.append([open_rgb(report.run_dir(runs[name]) / records[name].image) for name in records])
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
