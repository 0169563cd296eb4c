"""Experiment 4, ``guided_vs_nst``: style-guided sampling against Gatys NST from the plain sample of the same seed."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_nst.core.vgg import check_layers
from lightning_nst.outputs import preview_file, result_file, step_file
from lightning_nst.report.experiments.common import fit_config, generate, open_rgb, style_objective
from lightning_nst.report.experiments.measures import StyleMeter
from lightning_nst.report.figures import image_table
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings


def guided_vs_nst(settings: ReportSettings) -> Path:
    """Guided sampling against Gatys NST (Gram and mean/var) started from the plain sample of the same seed."""
    layers = check_layers(settings.style_layers, "style_layers")
    content = check_layers([settings.content_layer], "content_layer")
    title = "Style-guided diffusion against neural style transfer"
    report = Report("guided_vs_nst", title, settings, layers + content, runs=4)  # guided, plain, NST Gram, mean/var
    fractions = [i / settings.rows for i in range(settings.rows)]
    sample_steps = sorted({round(f * settings.sampling_steps) for f in fractions})
    nst_steps = sorted({round(f * settings.steps) for f in fractions})
    guided = generate(report, "guided", scale=settings.guidance_scale, preview_steps=sample_steps)
    plain = generate(report, "plain", scale=0.0)
    plain_image = report.run_dir("plain") / plain.image
    save_every = math.gcd(settings.steps, *nst_steps)
    for statistic in ("gram", "meanvar"):
        objective = {**style_objective(statistic, layers, statistic, settings), "content_layers": content}
        report.fit(
            f"nst_{statistic}",
            fit_config(
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
        cells.append([open_rgb(path) for path in (x0, *snaps)])
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
    cells.append([open_rgb(finals[name]) for name in ("guided", "NST Gram", "NST mean/var")])
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
