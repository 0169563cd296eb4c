"""The study's five experiments, each a report: runs through the CLI, then figures, tables and claims."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lightning_nst.errors import NSTError
from lightning_nst.images import load_image, to_pil
from lightning_nst.losses import LayerStyleLoss, Statistic
from lightning_nst.metrics import StyleDistance
from lightning_nst.report.core import Report, ReportSettings, lbfgs
from lightning_nst.report.figures import Series, image_table, line_plot
from lightning_nst.vgg import CONV_LAYERS, LAYER_NAMES, check_layers, layer_index

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


def _fit_config(
    report: Report,
    run: str,
    objectives: list[dict[str, Any]],
    data: dict[str, Any],
    init: str = "noise",
    save_every: int = 0,
) -> dict[str, Any]:
    s = report.settings
    return {
        "trainer": report.trainer(run, max_steps=s.steps, enable_checkpointing=False),
        "model": {
            "class_path": "lightning_nst.ImageOptimization",
            "init_args": {
                "objectives": objectives,
                "vgg": asdict(s.vgg),
                "init": init,
                "init_seed": s.seed,
                "optimizer": lbfgs(),
                "snapshot_every": 0,
                "save_every": save_every,
            },
        },
        "data": {"class_path": "lightning_nst.ImageTargets", "init_args": {**data, "size": s.size}},
    }


def _style_objective(name: str, layers: list[str], statistic: Statistic, settings: ReportSettings) -> dict[str, Any]:
    weight = settings.gram_weight if statistic == "gram" else settings.meanvar_weight
    return {"name": name, "style_layers": layers, "style_weight": weight, "statistic": statistic}


class StyleMeter:
    """Style loss of image files against the style image on one definition, as the guidance measures it.

    A :class:`~lightning_nst.metrics.StyleDistance` over the report's VGG trunk; images and the style are resized to
    ``size`` on their long edge, and layers weigh ``1 / len(layers)``.
    """

    def __init__(self, report: Report, style: str, layers: Sequence[str], statistic: Statistic, size: int) -> None:
        self.size = size
        self.metric = StyleDistance(report.features, [load_image(style, size, key="style")], statistic, layers)

    @torch.no_grad()
    def __call__(self, path: Path) -> float:
        """The style loss of the image file at ``path``."""
        return float(self.metric(load_image(path, self.size, key=str(path))))


def _steps_to(values: Sequence[float], fraction: float) -> int | None:
    return next((step for step, value in enumerate(values) if value <= fraction * values[0]), None)


# -- 1. content reconstruction by layer -----------------------------------------------------------------------------


def reconstruction(settings: ReportSettings) -> Path:
    """Reconstruct the content image from noise at each layer; PSNR and SSIM by layer."""
    layers = check_layers(settings.layers or list(LAYER_NAMES), "layers")
    report = Report("reconstruction", "Content reconstruction by layer", settings, layers)
    rows, results = [], {}
    for layer in layers:
        summary = report.fit(
            layer,
            _fit_config(
                report,
                layer,
                [{"name": layer, "content_layers": [layer]}],
                {"content": settings.content},
            ),
        )
        objective = summary["objectives"][layer]
        results[layer] = objective
        metrics, initial, final = objective["metrics"], objective["initial_loss"]["total"], objective["final_loss"]
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
            row.append(_open(report.run_dir(layer) / f"{layer}.png") if layer else None)
            note.append(f"{layer} {results[layer]['metrics']['psnr']:.1f} dB" if layer else "")
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
                [results[layer]["metrics"][metric] for layer in layers if layer.startswith(kind)],
            )
            for kind in kinds
        ]
        report.figure(
            f"{metric}_by_layer.png",
            line_plot(series, "conv # (depth of the layer)", label, log_y=log),
            f"{label} of the reconstruction against the target, by depth",
        )
    _reconstruction_claims(report, layers, results)
    return report.write()


def _reconstruction_claims(report: Report, layers: list[str], results: dict[str, Any]) -> None:
    ssim = {layer: results[layer]["metrics"]["ssim"] for layer in layers}
    psnr = {layer: results[layer]["metrics"]["psnr"] for layer in layers}
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


def texture_layers(settings: ReportSettings) -> Path:
    """Gram texture synthesis from cumulative and single conv layer sets; convergence by setting."""
    report = Report("texture_layers", "Gram texture synthesis by layer set", settings, list(CONV_LAYERS))
    sets = {**CUMULATIVE, **SINGLE}
    curves: dict[str, list[float]] = {}
    common = StyleMeter(report, settings.texture, CONV_LAYERS, "gram", settings.size)
    rows = []
    for name, layers in sets.items():
        summary = report.fit(
            name,
            _fit_config(
                report, name, [_style_objective(name, layers, "gram", settings)], {"style": [settings.texture]}
            ),
        )
        _, curves[name] = report.scalars(name, f"{name}/total")
        real = sum(layer in report.features.pretrained_layers for layer in layers)
        reached = _steps_to(curves[name], settings.fraction)
        objective = summary["objectives"][name]
        rows.append(
            [
                name,
                f"{real}/{len(layers)} real",
                objective["initial_loss"]["total"],
                objective["final_loss"]["total"],
                objective["final_loss"]["total"] / objective["initial_loss"]["total"],
                reached if reached is not None else f"> {len(curves[name]) - 1}",
                common(report.run_dir(name) / f"{name}.png"),
            ]
        )
    report.table(
        f"Gram texture synthesis from noise, {settings.steps} L-BFGS steps at {settings.size} px. 'steps to "
        f"{settings.fraction:g}×' counts the steps until the loss first falls to that fraction of its initial value; "
        "'conv1-16 distance' measures every result on one definition (Gram over all 16 conv layers).",
        ["setting", "layers", "initial loss", "final loss", "final/initial", f"steps to {settings.fraction:g}×",
         "conv1-16 distance"],
        rows,
    )  # fmt: skip
    texture = to_pil(load_image(settings.texture, settings.size, key="texture"))
    cells = [[texture] + [_open(report.run_dir(name) / f"{name}.png") for name in CUMULATIVE]]
    cells.append([None] + [_open(report.run_dir(name) / f"{name}.png") for name in SINGLE])
    notes = [["texture", *CUMULATIVE], ["", *SINGLE]]
    report.figure(
        "textures.png",
        image_table(cells, ["texture", "set 1", "set 2", "set 3", "set 4"], ["cumulative", "single"], notes),
        f"Gram textures from cumulative conv layer sets (top) and single conv layers (bottom), {settings.steps} steps",
    )
    series = [Series(name, range(len(values)), [v / values[0] for v in values]) for name, values in curves.items()]
    report.figure(
        "loss_by_step.png",
        line_plot(series, "step", "style loss / initial", log_y=True),
        "Style loss against step, each setting relative to its own initial loss",
    )
    distance = {row[0]: row[-1] for row in rows}
    cumulative = [distance[name] for name in CUMULATIVE]
    steps = {row[0]: row[5] for row in rows}
    needed = {name: value if isinstance(value, int) else math.inf for name, value in steps.items()}
    report.text(
        "## The study's claims on these weights",
        "- More layers give better structure: the conv1-16 distance of the cumulative sets is "
        + ", ".join(f"{name} {distance[name]:.3g}" for name in CUMULATIVE)
        + f" → {_verdict(all(b <= a for a, b in zip(cumulative, cumulative[1:], strict=False)))} (criterion: it "
        "falls as layers are added).",
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
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    saturation = np.asarray(image.convert("HSV"), dtype=np.float64)[..., 1] / 255
    return [float(luminance.mean()), float(saturation.mean()), *(float(c) for c in rgb.reshape(-1, 3).mean(0))]


def _loss_seconds(report: Report, layers: list[str], size: int, repeats: int = 15) -> dict[str, float]:
    """Median seconds of VGG forward + style loss + backward for each statistic, interleaved in one loop."""
    features = report.features
    target = features(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)))
    losses = {
        statistic: LayerStyleLoss({layer: target[layer] for layer in layers}, statistic)
        for statistic in ("gram", "meanvar")
    }
    times: dict[str, list[float]] = {statistic: [] for statistic in losses}
    image = torch.rand(1, 3, size, size, requires_grad=True)
    for _ in range(repeats + 1):
        for statistic, loss in losses.items():
            started = time.perf_counter()
            loss(features(image)).sum().backward()
            times[statistic].append(time.perf_counter() - started)
    return {statistic: statistics.median(values[1:]) for statistic, values in times.items()}


def gram_vs_meanvar(settings: ReportSettings) -> Path:
    """Gram against mean/variance textures: look, colour statistics, convergence and cost per step."""
    layers = check_layers(settings.style_layers, "style_layers")
    report = Report("gram_vs_meanvar", "Gram against mean/variance texture synthesis", settings, layers)
    summaries, curves = {}, {}
    for statistic in ("gram", "meanvar"):
        objective = _style_objective(statistic, layers, statistic, settings)
        summaries[statistic] = report.fit(
            statistic, _fit_config(report, statistic, [objective], {"style": [settings.texture]})
        )
        _, curves[statistic] = report.scalars(statistic, f"{statistic}/total")
    texture = to_pil(load_image(settings.texture, settings.size, key="texture"))
    images = {"texture": texture, **{s: _open(report.run_dir(s) / f"{s}.png") for s in ("gram", "meanvar")}}
    report.figure(
        "textures.png",
        image_table([list(images.values())], list(images), [""], [list(images)]),
        f"The texture, and syntheses matching its Gram matrices or its channel means and variances over "
        f"{', '.join(layers)} ({settings.steps} steps, {settings.size} px)",
    )
    colours = {name: colour_statistics(image) for name, image in images.items()}
    report.table(
        "Colour statistics of the texture and of each synthesis (means over pixels, in [0, 1]).",
        ["image", "luminance", "saturation", "R", "G", "B"],
        [[name, *values] for name, values in colours.items()],
    )
    loss_seconds = _loss_seconds(report, layers, settings.size)
    rows = []
    for statistic in ("gram", "meanvar"):
        summary, values = summaries[statistic], curves[statistic]
        reached = _steps_to(values, settings.fraction)
        rows.append(
            [
                statistic,
                summary["seconds_per_step_after_first"] or summary["seconds_per_step"],
                loss_seconds[statistic],
                values[-1] / values[0],
                reached if reached is not None else f"> {len(values) - 1}",
            ]
        )
    report.table(
        f"Cost and convergence. 's/step (fit)' is each run's wall time per step after the first; 's (VGG + loss)' "
        "times VGG forward, the style loss and backward for both statistics alternately in one loop (median of 15) "
        f"on {report.features.mean.device.type}.",
        ["statistic", "s/step (fit)", "s (VGG + loss)", "final/initial loss", f"steps to {settings.fraction:g}×"],
        rows,
    )
    series = [Series(name, range(len(values)), [v / values[0] for v in values]) for name, values in curves.items()]
    report.figure(
        "loss_by_step.png",
        line_plot(series, "step", "style loss / initial", log_y=True),
        "Style loss against step, each relative to its initial loss",
    )
    gram, meanvar = colours["gram"], colours["meanvar"]
    report.text(
        "## The study's claims on these weights",
        f"- Mean/var is darker: mean luminance {meanvar[0]:.3f} (mean/var) against {gram[0]:.3f} (Gram), texture "
        f"{colours['texture'][0]:.3f} → {_verdict(meanvar[0] < gram[0])} (criterion: lower luminance than Gram).",
        f"- Mean/var is slower: {rows[1][1]:.4g} against {rows[0][1]:.4g} s/step in the fits, {rows[1][2]:.4g} against "
        f"{rows[0][2]:.4g} s in the interleaved timing → {_verdict(rows[1][2] > rows[0][2])} per step (criterion: "
        f"the interleaved timing). Steps to {settings.fraction:g}×: {rows[1][4]} (mean/var) against {rows[0][4]} "
        "(Gram).",
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
) -> dict[str, Any]:
    s = report.settings
    logger = {
        "class_path": "lightning_nst.callbacks.TrajectoryLogger",
        "init_args": {
            "preview_every": preview_every,
            "preview_steps": preview_steps,
            "save_dir": str(report.run_dir(run) / "x0"),
        },
    }
    writer = {"class_path": "lightning_nst.callbacks.GenerationWriter", "init_args": {"output_dir": None}}
    guidance = {
        "class_path": "lightning_nst.guidance.StyleGuidance",
        "init_args": {
            "scale": scale,
            "guidance_size": s.guidance_size,
            "layers": s.style_layers,
            "statistic": "gram",
            "vgg": asdict(s.vgg),
        },
    }
    return {
        "trainer": report.trainer(run, callbacks=[logger, writer]),
        "model": {
            "class_path": "lightning_nst.diffusion.GuidedDiffusion",
            "init_args": {
                "model": s.model,
                "tiny_vae": s.tiny_vae,
                "scheduler": "ddim",
                "num_inference_steps": s.sampling_steps,
                "cfg_scale": s.cfg_scale,
                "height": s.image_size,
                "width": s.image_size,
                "guidance": guidance,
            },
        },
        "data": {
            "class_path": "lightning_nst.prompts.PromptGrid",
            "init_args": {
                "prompts": [s.prompt],
                "seeds": [s.seed],
                "style": [s.style],
                "style_prompts": [style_prompt] if style_prompt else None,
                "negative_prompt": s.negative_prompt,
            },
        },
    }


def _generate(report: Report, run: str, **kwargs: Any) -> dict[str, Any]:
    (record,) = report.predict(run, _generation_config(report, run, **kwargs))
    return record


def guided_vs_nst(settings: ReportSettings) -> Path:
    """Guided sampling against Gatys NST (Gram and mean/var) started from the plain sample of the same seed."""
    layers = check_layers(settings.style_layers, "style_layers")
    content = check_layers([settings.content_layer], "content_layer")
    report = Report("guided_vs_nst", "Style-guided diffusion against neural style transfer", settings, layers + content)
    fractions = [i / settings.rows for i in range(settings.rows)]
    sample_steps = sorted({round(f * settings.sampling_steps) for f in fractions})
    nst_steps = sorted({round(f * settings.steps) for f in fractions})
    guided = _generate(report, "guided", scale=settings.guidance_scale, preview_steps=sample_steps)
    plain = _generate(report, "plain", scale=0.0)
    plain_image = report.run_dir("plain") / plain["image"]
    save_every = math.gcd(settings.steps, *nst_steps)
    for statistic in ("gram", "meanvar"):
        objective = {**_style_objective(statistic, layers, statistic, settings), "content_layers": content}
        report.fit(
            f"nst_{statistic}",
            _fit_config(
                report,
                f"nst_{statistic}",
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
        x0 = report.run_dir("guided") / "x0" / f"{guided['index']:05d}_x0_{step:03d}.png"
        snaps = [report.run_dir(f"nst_{s}") / "steps" / f"{s}_{nst_step:05d}.png" for s in ("gram", "meanvar")]
        losses = [gram(path) for path in (x0, *snaps)]
        t = guided["timesteps"][step] if step < len(guided["timesteps"]) else "end"
        cells.append([_open(path) for path in (x0, *snaps)])
        notes.append([f"L={value:.3g}" for value in losses])
        labels.append(f"{index}: step {step} / NST {nst_step}")
        rows.append([f"{step} (t={t})", losses[0], nst_step, losses[1], losses[2]])
    finals = {
        "guided": report.run_dir("guided") / guided["image"],
        "NST Gram": report.run_dir("nst_gram") / "gram.png",
        "NST mean/var": report.run_dir("nst_meanvar") / "meanvar.png",
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
    report = Report("guided_vs_prompt", "Style guidance against prompt-only styling", settings, layers)
    records = {
        "guided": _generate(report, "guided", scale=settings.guidance_scale, preview_every=1),
        "prompt-only": _generate(report, "prompt_only", scale=0.0, style_prompt=settings.style_prompt, preview_every=1),
    }
    runs = {"guided": "guided", "prompt-only": "prompt_only"}
    timesteps = records["guided"]["timesteps"]
    chosen: dict[int, int] = {}  # step -> the first timestep asked for that it is nearest to
    for target in settings.timesteps:
        chosen.setdefault(min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - target)), target)
    cells, notes, labels, rows = [], [], [], []
    for step, target in chosen.items():
        losses = [records[name]["style_loss"][step] for name in records]
        cells.append(
            [
                _open(report.run_dir(runs[name]) / "x0" / f"{records[name]['index']:05d}_x0_{step:03d}.png")
                for name in records
            ]
        )
        notes.append([f"L={value:.3g}" for value in losses])
        labels.append(f"t={timesteps[step]}")
        rows.append([target, f"{timesteps[step]} (step {step})", *losses])
    finals = [records[name]["final_style_loss"] for name in records]
    cells.append([_open(report.run_dir(runs[name]) / records[name]["image"]) for name in records])
    notes.append([f"L={value:.3g}" for value in finals])
    labels.append("final")
    rows.append(["final image", "", *finals])
    report.figure(
        "guided_vs_prompt.png",
        image_table(cells, ["guided", "prompt-only"], labels, notes),
        f"x0 previews of '{settings.prompt}' (seed {settings.seed}): style guidance (scale {settings.guidance_scale}) "
        f"against the prompt '{records['prompt-only']['prompt']}'",
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
    series = [Series(name, range(len(record["style_loss"])), record["style_loss"]) for name, record in records.items()]
    report.figure(
        "style_loss_by_step.png",
        line_plot(series, "sampling step", "style loss of x0", log_y=True),
        "Style loss of the clean prediction x0 at every sampling step",
    )
    return report.write()


EXPERIMENTS: dict[str, Callable[[ReportSettings], Path]] = {
    "reconstruction": reconstruction,
    "texture_layers": texture_layers,
    "gram_vs_meanvar": gram_vs_meanvar,
    "guided_vs_nst": guided_vs_nst,
    "guided_vs_prompt": guided_vs_prompt,
}
"""The study's experiments by name, in the study's order."""


def run(experiment: str, settings: ReportSettings) -> Path:
    """Make the report of ``experiment`` and return its ``report.md``."""
    if experiment not in EXPERIMENTS:
        raise NSTError(f"experiment: {experiment!r} is not one of {', '.join(EXPERIMENTS)}")
    settings.check()
    return EXPERIMENTS[experiment](settings)
