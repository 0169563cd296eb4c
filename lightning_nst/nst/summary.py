"""What :class:`~lightning_nst.nst.writer.ImageWriter` assembles from a fit: grid, ``summary.json``, hyperparameters.

Functions of the module's results and the run's numbers; the writer decides when and where they are written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional

from lightning_nst.core.files import file_digest
from lightning_nst.core.images import labelled_grid
from lightning_nst.outputs import GRID, FitSummary, ObjectiveRecord

__all__ = ["final_metrics", "fit_summary", "objective_record", "progress_metrics", "result_grid", "run_settings"]


def _fit_tile(image: Tensor, height: int, width: int) -> Tensor:
    """``image`` ``(1, 3, h, w)`` scaled to fit ``height`` x ``width``, keeping its aspect, centred on white."""
    h, w = image.shape[-2:]
    scale = min(height / h, width / w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = functional.interpolate(image.float(), size=size, mode="bilinear", antialias=True).clamp(0, 1)
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return functional.pad(image, (left, width - size[1] - left, top, height - size[0] - top), value=1.0)


def result_grid(
    best: Tensor, names: list[str], content: Tensor | None, styles: Sequence[Tensor], columns: int, inputs: bool
) -> Image.Image:
    """The labelled grid: ``content | style | result`` for one objective (``inputs``), else the results.

    Args:
        best: The results, ``(objectives, 3, H, W)``.
        names: The objectives' names, their labels.
        content: The content image, if any.
        styles: The style images.
        columns: Columns of a grid of results.
        inputs: Show the content and style images left of a single result.
    """
    if not inputs or len(names) != 1:
        return labelled_grid(best, names, nrow=columns)
    height, width = best.shape[-2:]
    tiles = [best.float().cpu()]
    labels = list(names)
    shown = ([("content", content)] if content is not None else []) + [
        ("style" if len(styles) == 1 else f"style {index + 1}", style) for index, style in enumerate(styles)
    ]
    for label, image in reversed(shown):
        tiles.insert(0, _fit_tile(image.cpu(), height, width))
        labels.insert(0, label)
    return labelled_grid(torch.cat(tiles), labels, nrow=len(tiles))


def _source_record(source: str) -> dict[str, str | None]:
    """An input image's ``path`` (absolute, for a file) and the ``sha256`` of its bytes (``None`` for a sample)."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": file_digest(path)}
    return {"path": source, "sha256": None}


def _finite_floats(values: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in values.items() if math.isfinite(float(value))}


def objective_record(objective: Any, result: Any, path: Path) -> ObjectiveRecord:
    """``summary.json``'s record of an objective whose result (``ObjectiveResult``) was written to ``path``."""
    return ObjectiveRecord(
        sha256=file_digest(path),
        objective=asdict(objective),
        initial_loss=result.initial_loss,
        final_loss=result.final_loss,
        best_step=result.best_step,
        best_loss=result.best_loss,
        last_loss=result.last_loss,
        stopped_at_step=result.stopped_at_step,
        metrics=result.metrics,
        output=path.name,
    )


def fit_summary(
    module: Any,
    trainer: Any,
    image_size: list[int],
    records: dict[str, ObjectiveRecord],
    out: Path,
    times: tuple[float, float, float],
    start_step: int,
    result_file: dict[str, str] | None,
    precision_source: str = "config",
) -> FitSummary:
    """``summary.json`` of a fit whose results and grid are in ``out``.

    Args:
        module: The image optimisation (``OptimizationModule``), its trunk built.
        trainer: Its trainer.
        image_size: ``[H, W]`` of the results.
        records: Each objective's :func:`objective_record`.
        out: The run folder.
        times: ``perf_counter`` seconds when this process's fit started, when its first step ended (0: unknown) and
            when it ended.
        start_step: The step the fit started (or resumed) at.
        result_file: The ``output`` file written, with its ``sha256``, if any.
        precision_source: Where ``trainer.precision`` came from: ``auto``, ``config`` or ``checkpoint``.
    """
    started, first_step_done, ended = times
    steps = trainer.global_step
    ran = steps - start_step
    timed = ended - first_step_done if first_step_done and ran > 1 else None
    vgg = module.vgg
    assert vgg is not None  # results() built it
    return FitSummary(
        vgg_weights=vgg.weights_used,
        pooling=vgg.pooling,
        image_size=image_size,
        precision=str(trainer.precision),
        device=str(module.device),
        steps=steps,
        resumed_at_step=start_step or None,
        wall_time_s=round(ended - started, 4),
        seconds_per_step=round((ended - started) / max(ran, 1), 5),
        seconds_per_step_after_first=round(timed / (ran - 1), 5) if timed else None,
        output_dir=str(out.resolve()),
        objectives=records,
        grid=GRID,
        grid_sha256=file_digest(out / GRID),
        inputs=module.inputs,
        images={
            "content": _source_record(module.content_source) if module.content_source is not None else None,
            "style": [_source_record(source) for source in module.style_sources],
        },
        scales=getattr(module, "scale_records", None),
        result_file=result_file,
        precision_source=precision_source,
    )


def run_settings(module: Any) -> dict[str, Any]:
    """The run's settings as TensorBoard hyperparameters: weights, pooling, size and each objective's options."""
    image = module.image
    params: dict[str, Any] = {
        "vgg_weights": module.vgg.weights_used if module.vgg is not None else "",
        "pooling": module.vgg.pooling if module.vgg is not None else "",
        "image_size": "x".join(map(str, image.shape[-2:])) if image is not None else "",
    }
    for objective in module.objectives:
        params.update({f"{objective.name}/{key}": value for key, value in asdict(objective).items() if key != "name"})
    return params


def progress_metrics(step: int, module: Any) -> dict[str, float]:
    """The best losses so far of a run stopped before its results (``final/<objective>/best_loss``, ...)."""
    metrics: dict[str, float] = {"final/stopped_at_step": float(step)}
    for index, objective in enumerate(module.objectives):
        if index < len(module.best_loss):
            best = {"best_loss": module.best_loss[index], "best_step": module.best_step[index]}
            metrics.update({f"final/{objective.name}/{key}": v for key, v in _finite_floats(best).items()})
    return metrics


def final_metrics(summary: FitSummary) -> dict[str, float]:
    """Each objective's final losses and metrics as ``final/<objective>/<name>``, for the HParams tab."""
    metrics: dict[str, float] = {}
    for name, record in summary.objectives.items():
        final = {"best_loss": record.best_loss, "last_loss": record.last_loss, "best_step": record.best_step}
        final.update({key: value for key, value in record.final_loss.items() if key != "total"})
        final.update(record.metrics)
        metrics.update({f"final/{name}/{key}": value for key, value in _finite_floats(final).items()})
    return metrics
