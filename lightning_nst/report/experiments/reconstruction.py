"""Experiment 1, ``reconstruction``: the content image reconstructed from noise at each layer; PSNR and SSIM."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from PIL import Image

from lightning_nst.core.images import load_image, to_pil
from lightning_nst.core.vgg import LAYER_NAMES, check_layers, layer_index
from lightning_nst.outputs import ObjectiveRecord, result_file
from lightning_nst.report.experiments.common import fit_config, open_rgb, verdict
from lightning_nst.report.figures import Series, image_table, line_plot
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings


def conv_depth(layer: str) -> int:
    """The study's number of a layer: how many convolutions come before it or are it (1-16)."""
    return sum(1 for name in LAYER_NAMES[: layer_index(layer) + 1] if name.startswith("conv"))


def reconstruction(settings: ReportSettings) -> Path:
    """Reconstruct the content image from noise at each layer; PSNR and SSIM by layer."""
    layers = check_layers(settings.layers or list(LAYER_NAMES), "layers")
    report = Report("reconstruction", "Content reconstruction by layer", settings, layers, runs=len(layers))
    rows: list[list[Any]] = []
    results: dict[str, ObjectiveRecord] = {}
    for layer in layers:
        summary = report.fit(
            layer,
            fit_config(
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
            row.append(open_rgb(report.run_dir(layer) / result_file(layer)) if layer else None)
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
        f"{ssim[shallow]:.3f} → {verdict(ssim[shallow] >= 0.9)} (criterion: SSIM ≥ 0.9).",
    ]
    if deep != shallow:
        lines.append(
            f"- Deep layers give noisy contours: SSIM falls from {ssim[shallow]:.3f} ({shallow}) to {ssim[deep]:.3f} "
            f"({deep}) → {verdict(ssim[deep] < 0.5 * ssim[shallow])} (criterion: the deepest layer's SSIM is below "
            "half the shallowest's)."
        )
    pairs = [(layer, "relu" + layer[4:]) for layer in layers if layer.startswith("conv") and "relu" + layer[4:] in psnr]
    if pairs:
        gaps = [abs(psnr[conv] - psnr[relu]) for conv, relu in pairs]
        lines.append(
            f"- conv ≈ relu at equal depth: median |ΔPSNR| over {len(pairs)} pairs is {statistics.median(gaps):.2f} dB "
            f"(largest {max(gaps):.2f} dB) → {verdict(statistics.median(gaps) <= 3.0)} (criterion: median ≤ 3 dB)."
        )
    report.text(*lines)
