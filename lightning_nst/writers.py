"""Writers of results: the callbacks that save what a run computed, so the modules only compute."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn import functional

from lightning_nst.errors import DivergenceError, NSTError
from lightning_nst.images import encoded, image_format, labelled_grid, png_bytes, to_uint8, write_atomic
from lightning_nst.outputs import (
    GRID,
    ITEM_FILE,
    MANIFEST,
    SUMMARY,
    FitSummary,
    GenerationRecord,
    ObjectiveRecord,
    OutputFolder,
    file_digest,
    interrupted_file,
    item_file,
    last_good_file,
    result_file,
    step_file,
)
from lightning_nst.prompts import PromptGrid

log = logging.getLogger(__name__)

# -- image optimisation (fit) ---------------------------------------------------------------------------------------


@runtime_checkable
class OptimizationModule(Protocol):
    """What :class:`ImageWriter` needs of the module: :class:`~lightning_nst.ImageOptimization` provides it.

    A protocol rather than the class, so that the module can attach a default writer (its ``configure_callbacks``)
    without the two modules importing each other.
    """

    objectives: Sequence[Any]
    vgg: Any
    device: torch.device
    inputs: dict[str, Any] | None
    content: Tensor | None
    style: list[Tensor]
    content_source: str | None
    style_sources: list[str]
    last_good: Tensor | None
    has_good: list[bool]
    best_images: Tensor | None
    best_loss: list[float]
    best_step: list[int]

    @property
    def image(self) -> Tensor | None:
        """The current images, one per objective, ``(objectives, 3, H, W)`` in ``[0, 1]``."""
        ...

    def check_finite(self, what: str) -> None:
        """Raise, saying ``what`` therefore did not happen, if an image holds NaN or infinity."""
        ...

    def results(self) -> Sequence[Any]:
        """Each objective's result (``ObjectiveResult``): the best image, its loss terms and metrics."""
        ...


def _fit_tile(image: Tensor, height: int, width: int) -> Tensor:
    """``image`` ``(1, 3, h, w)`` scaled to fit ``height`` x ``width``, keeping its aspect, centred on white."""
    h, w = image.shape[-2:]
    scale = min(height / h, width / w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = functional.interpolate(image.float(), size=size, mode="bilinear", antialias=True).clamp(0, 1)
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return functional.pad(image, (left, width - size[1] - left, top, height - size[0] - top), value=1.0)


def _source_record(source: str) -> dict[str, str | None]:
    """An input image's ``path`` (absolute, for a file) and the ``sha256`` of its bytes (``None`` for a sample)."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": file_digest(path)}
    return {"path": source, "sha256": None}


def _close_progress_bar(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
    """Have the progress bar draw its last frame now, so that a line printed next comes below it.

    Lightning tears callbacks down in list order with its own progress bar after the configured callbacks, and the
    Rich bar draws its last frame in its ``teardown``; the progress bars' teardown may run twice.
    """
    bar = trainer.progress_bar_callback
    if bar is not None:
        bar.teardown(trainer, pl_module, stage)


def _finite_floats(values: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in values.items() if math.isfinite(float(value))}


_OVERWRITE_HINT = "choose another folder or set --trainer.callbacks.init_args.overwrite true"


class ImageWriter(L.Callback):
    """Write what :class:`~lightning_nst.ImageOptimization` computes: result PNGs, a grid, ``summary.json``.

    :meth:`ImageOptimization.configure_callbacks <lightning_nst.ImageOptimization.configure_callbacks>` adds one
    with these defaults to a trainer that has none (from ``lightning-nst fit`` or Python alike); the shipped configs
    list it as the last callback, so ``--trainer.callbacks.init_args.output_dir DIR`` sets its folder, as for
    ``predict``'s writer. File names are those of :mod:`lightning_nst.outputs`.

    It refuses to start when the folder holds a finished run's results, or any file of a name it may write that it
    did not write there itself (:class:`~lightning_nst.outputs.OutputFolder`), unless ``overwrite``; it saves step
    snapshots and logs TensorBoard images while the run goes on, and keeps each objective's last finite image as
    ``<name>.last_good.png`` when a loss becomes non-finite. To TensorBoard it logs the content and style images
    once (``inputs/content``, ``inputs/style_<i>``), snapshots from step 0, the results, and at the end the
    objectives' settings as hyperparameters with their final losses and metrics (``final/<objective>/<name>``), so
    the HParams tab compares runs; a run stopped by a signal logs them too, with the best losses so far.

    With ``output``, the result of the (one) objective is also written to that image file: what ``lightning-nst
    stylize -o`` writes. The folder's record of its files (:class:`~lightning_nst.outputs.OutputFolder`) holds it
    too, so a run resumed into the same folder may replace the best image so far that ``keep_partial`` left there,
    but never a file of the user's.

    Args:
        output_dir: Where results go; by default the logger's run folder (``logs/<name>/version_<n>``), or
            ``trainer.default_root_dir`` without a logger.
        overwrite: Replace existing files of the names it writes in ``output_dir`` instead of refusing to start.
        save_every: Also save each objective's image as ``steps/<name>_<step>.png`` every this many steps, and at
            step 0 (neural-style's ``-save_iter``); 0 turns it off. A resumed run replaces the files of the steps it
            repeats.
        snapshot_every: Log the current images to TensorBoard at step 0 and every this many steps; ``None`` (the
            default) about ten times a run (every ``max_steps // 10`` steps, at least every step); 0 turns it off.
        grid_columns: Columns of the labelled grid of results.
        grid_inputs: With a single objective, show the content and style images left of the result in
            ``grid.png`` (``content | style | result``); sweeps' grids show the results only.
        output: Also write the result to this image file (PNG, JPEG, WebP, ... by its suffix); one objective only.
            Refused at the start if it exists and is not this folder's own, unless ``overwrite``.
        keep_partial: When a signal stops the run, write the best image so far to ``output`` (a resumed run into
            the same folder replaces it with the result).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        overwrite: bool = False,
        save_every: NonNegativeInt = 0,
        snapshot_every: NonNegativeInt | None = None,
        grid_columns: PositiveInt = 4,
        grid_inputs: bool = True,
        output: str | None = None,
        keep_partial: bool = False,
    ) -> None:
        if output is not None and not str(output).strip():
            raise NSTError("ImageWriter.output: is empty; name the image file to write, or leave it null")
        if output is not None:
            image_format(output, "ImageWriter.output")
        if keep_partial and output is None:
            raise NSTError("ImageWriter.keep_partial: needs ImageWriter.output, the file to keep the partial image in")
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.save_every = int(save_every)
        self.snapshot_every = None if snapshot_every is None else int(snapshot_every)
        self.grid_columns = int(grid_columns)
        self.grid_inputs = grid_inputs
        self.output = Path(output).expanduser() if output is not None else None
        self.keep_partial = keep_partial
        self.partial: Path | None = None
        """Where a stop left the best image so far (``keep_partial``), once it did."""
        self.directory = Path(output_dir).expanduser() if output_dir is not None else None
        self._folder: OutputFolder | None = None
        self._started = 0.0
        self._start_step = 0
        self._first_step_done = 0.0
        self._written = False
        self._announce: str | None = None

    @staticmethod
    def _module(pl_module: L.LightningModule) -> OptimizationModule:
        if not isinstance(pl_module, OptimizationModule):
            raise NSTError(f"ImageWriter: writes the results of ImageOptimization, not of {type(pl_module).__name__}")
        return pl_module

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the output folder."""
        self._module(pl_module)
        # Every rank: the logger's run folder is agreed on by a collective call.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self.directory = Path(self.output_dir).expanduser() if self.output_dir is not None else Path(log_dir)
        self._folder = None

    @property
    def folder(self) -> OutputFolder:
        """The output folder with its record of the files written there."""
        if self._folder is None or self._folder.directory != self.directory:
            assert self.directory is not None, "setup() resolves the folder"
            self._folder = OutputFolder(self.directory, "ImageWriter.output_dir")
        return self._folder

    def _write(self, name: str, data: bytes) -> Path:
        return self.folder.write(name, data, overwrite=self.overwrite, hint=_OVERWRITE_HINT)

    def _names(self, module: OptimizationModule) -> list[str]:
        """Every file this writer may write for ``module``'s objectives that exists in the folder now."""
        assert self.directory is not None
        names = [result_file(objective.name) for objective in module.objectives] + [GRID, SUMMARY]
        for objective in module.objectives:
            names += [interrupted_file(objective.name), last_good_file(objective.name)]
            if self.save_every:
                steps = (self.directory / step_file(objective.name, 0)).parent
                found = steps.glob(f"{glob.escape(objective.name)}_*.png")
                names += [path.relative_to(self.directory).as_posix() for path in found]
        return [name for name in names if os.path.lexists(self.directory / name)]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse to start, unless ``overwrite``, if the folder holds results or a file that is not its own.

        Results are those of a finished run (its ``summary.json``); a file that is not its own is any file of a name
        this run may write that lightning_nst did not write there (:class:`~lightning_nst.outputs.OutputFolder`),
        such as the user's. A resumed run's own snapshots and interrupted images are replaced.

        Here rather than in :meth:`setup`: Lightning's own check of a run folder (``SaveConfigCallback.setup``,
        which names ``trainer.default_root_dir``) comes first, and the module has not computed its targets yet.
        """
        self._started = time.perf_counter()
        self._start_step = trainer.global_step
        self._written, self._announce, self.partial = False, None, None
        module = self._module(pl_module)
        if self.output is not None and len(module.objectives) != 1:
            raise NSTError(
                f"ImageWriter.output: is the result file of one objective, but this run has {len(module.objectives)} "
                "(each one's result is <name>.png in the run folder)"
            )
        if self.overwrite or not trainer.is_global_zero or self.directory is None:
            return
        if self.output is not None and self.folder.foreign([self._output_name]):
            raise NSTError(
                f"ImageWriter.output: {self.output} exists and is not this run folder's partial result; choose another "
                "file or set overwrite (--overwrite for stylize and texture)"
            )
        existing = self._names(module)
        hint = _OVERWRITE_HINT
        if SUMMARY in existing:  # a finished run: its first result is named, as the user knows it
            results = [result_file(objective.name) for objective in module.objectives] + [GRID, SUMMARY]
            first = next(name for name in existing if name in results)
            raise NSTError(f"ImageWriter.output_dir: {self.directory / first} exists; {hint}")
        foreign = self.folder.foreign(existing)
        if foreign:
            raise self.folder.refusal(foreign, hint=hint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At step 0 (not on resuming): log the input images and a first snapshot, and save the step-0 images."""
        module = self._module(pl_module)
        self._started = time.perf_counter()
        self._start_step = trainer.global_step
        if trainer.global_step != 0:
            return
        experiment = self._experiment(trainer)
        if experiment is not None:
            if module.content is not None:
                experiment.add_image("inputs/content", to_uint8(module.content[0]), 0)
            for index, style in enumerate(module.style):
                experiment.add_image(f"inputs/style_{index}", to_uint8(style[0]), 0)
        if self._snapshots(trainer):
            self._log_images(trainer, module, "snapshot", module.image)
        if self.save_every:
            self._save_steps(trainer, module)

    def _snapshots(self, trainer: L.Trainer) -> int:
        """Steps between TensorBoard snapshots (0: none): ``snapshot_every``, or about ten a run."""
        if self.snapshot_every is not None:
            return self.snapshot_every
        return max(1, trainer.max_steps // 10) if trainer.max_steps and trainer.max_steps > 0 else 50

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Time the first step, log snapshots to TensorBoard and save step images."""
        module = self._module(pl_module)
        step = trainer.global_step
        if step == self._start_step + 1:
            self._first_step_done = time.perf_counter()
        every = self._snapshots(trainer)
        if every and step % every == 0:
            self._log_images(trainer, module, "snapshot", module.image)
        if self.save_every and step % self.save_every == 0:
            self._save_steps(trainer, module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the results; see :meth:`write_results`."""
        self.write_results(trainer, self._module(pl_module))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the results of a run resumed from a checkpoint at ``max_steps``, which skips the training loop.

        A fit that ends with nothing written (stopped by ``max_time`` before its loop began, say) is a failure, not
        a success: it raises, so the command exits 2.
        """
        if not self._written and trainer.global_step >= trainer.max_steps:
            self._start_step = trainer.global_step
            self.write_results(trainer, self._module(pl_module))
        if not self._written and trainer.is_global_zero and self.directory is not None:
            raise NSTError(
                f"trainer: the run ended at step {trainer.global_step} of {trainer.max_steps} before it had a result "
                "to write (trainer.max_time, max_epochs or limit_train_batches stopped it); nothing was saved"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Say where the results went, below the progress bar's last frame."""
        if self._announce is not None:
            _close_progress_bar(trainer, pl_module, stage)
            rank_zero_info(self._announce)
            self._announce = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On a non-finite loss, save each objective's last finite image and name where in the error."""
        if not isinstance(exception, DivergenceError) or not isinstance(pl_module, OptimizationModule):
            return
        if not trainer.is_global_zero or pl_module.last_good is None or self.directory is None:
            return
        kept = False
        for index, objective in enumerate(pl_module.objectives):
            if pl_module.has_good[index]:
                self._write(last_good_file(objective.name), png_bytes(pl_module.last_good[index]))
                kept = True
        exception.kept(str(self.directory) if kept else None)

    def save_interrupted(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Save each objective's current image as ``<name>.interrupted.png``; return the folder, or ``None``.

        Called when a signal stops the run (:class:`lightning_nst.cli.StopOnSignal`, on Lightning's
        ``SIGTERMException``), beside the checkpoint that resumes it. A non-finite image is not saved.
        """
        if not isinstance(pl_module, OptimizationModule) or not trainer.is_global_zero or self.directory is None:
            return None
        image = pl_module.image
        if image is None:
            return None
        saved = False
        for index, objective in enumerate(pl_module.objectives):
            if bool(torch.isfinite(image[index]).all()):
                self._write(interrupted_file(objective.name), png_bytes(image[index]))
                saved = True
        best = pl_module.best_images
        if self.keep_partial and self.output is not None and best is not None and bool(torch.isfinite(best[0]).all()):
            # The best image seen so far, as optimised (before a histogram colour mode's final matching).
            self._write(self._output_name, encoded(best[0], self.output, "ImageWriter.output"))
            self.partial = self.output
        self._log_hparams(trainer, pl_module, self._progress(trainer, pl_module))
        return self.directory if saved else None

    @property
    def _output_name(self) -> str:
        """``output`` as the folder's record names it: an absolute path, which ``folder / name`` leaves as it is."""
        assert self.output is not None
        return str(self.output.resolve())

    def _save_steps(self, trainer: L.Trainer, module: OptimizationModule) -> None:
        step = trainer.global_step
        module.check_finite(f"steps/*_{step:05d}.png were not saved")
        image = module.image
        if trainer.is_global_zero and self.directory is not None and image is not None:
            for index, objective in enumerate(module.objectives):
                self._write(step_file(objective.name, step), png_bytes(image[index]))

    @staticmethod
    def _experiment(trainer: L.Trainer) -> Any:
        """The TensorBoard ``SummaryWriter`` of rank 0, or ``None``."""
        if trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger):
            return trainer.logger.experiment
        return None

    def _log_images(self, trainer: L.Trainer, module: OptimizationModule, tag: str, images: Tensor | None) -> None:
        experiment = self._experiment(trainer)
        if experiment is not None and images is not None:
            grid = labelled_grid(images, [objective.name for objective in module.objectives], nrow=self.grid_columns)
            experiment.add_image(tag, torch.from_numpy(np.array(grid)), trainer.global_step, dataformats="HWC")

    def _grid(self, module: OptimizationModule, best: Tensor, names: list[str]) -> Any:
        """The labelled grid: ``content | style | result`` for one objective (``grid_inputs``), else the results."""
        if not self.grid_inputs or len(names) != 1:
            return labelled_grid(best, names, nrow=self.grid_columns)
        height, width = best.shape[-2:]
        tiles = [best.float().cpu()]
        labels = list(names)
        styles = module.style
        inputs = ([("content", module.content)] if module.content is not None else []) + [
            ("style" if len(styles) == 1 else f"style {index + 1}", style) for index, style in enumerate(styles)
        ]
        for label, image in reversed(inputs):
            tiles.insert(0, _fit_tile(image.cpu(), height, width))
            labels.insert(0, label)
        return labelled_grid(torch.cat(tiles), labels, nrow=len(tiles))

    @staticmethod
    def _settings(module: OptimizationModule) -> dict[str, Any]:
        """The run's settings as TensorBoard hyperparameters: weights, pooling, size and each objective's options."""
        image = module.image
        params: dict[str, Any] = {
            "vgg_weights": module.vgg.weights_used if module.vgg is not None else "",
            "pooling": module.vgg.pooling if module.vgg is not None else "",
            "image_size": "x".join(map(str, image.shape[-2:])) if image is not None else "",
        }
        for objective in module.objectives:
            params.update(
                {f"{objective.name}/{key}": value for key, value in asdict(objective).items() if key != "name"}
            )
        return params

    @staticmethod
    def _progress(trainer: L.Trainer, module: OptimizationModule) -> dict[str, float]:
        """The best losses so far of a run stopped before its results (``final/<objective>/best_loss``, ...)."""
        metrics: dict[str, float] = {"final/stopped_at_step": float(trainer.global_step)}
        for index, objective in enumerate(module.objectives):
            if index < len(module.best_loss):
                best = {"best_loss": module.best_loss[index], "best_step": module.best_step[index]}
                metrics.update({f"final/{objective.name}/{key}": v for key, v in _finite_floats(best).items()})
        return metrics

    def _log_hparams(self, trainer: L.Trainer, module: OptimizationModule, metrics: dict[str, float]) -> None:
        """The run's settings as hyperparameters with its final (or best so far) losses, for the HParams tab."""
        params = {**self._settings(module), "steps": trainer.global_step}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics)  # logs the metrics too, as scalars at step 0
            else:
                logger.log_hyperparams(params)
                logger.log_metrics(metrics, trainer.global_step)

    def write_results(self, trainer: L.Trainer, module: OptimizationModule) -> None:
        """Write each objective's best image as a PNG, a labelled grid and ``summary.json``; log them to TensorBoard.

        ``summary.json`` (:class:`~lightning_nst.outputs.FitSummary`) records, per objective, the step and loss of
        the image saved (``best_step``, ``best_loss``, its terms in ``final_loss``) and the loss of the last image
        (``last_loss``), and the content and style files (``images``). Where the results went is printed in
        :meth:`teardown`, after the progress bar.
        """
        if module.image is None or self.directory is None:
            return
        ended = time.perf_counter()
        results = module.results()
        if not trainer.is_global_zero:
            return
        out = self.directory
        records: dict[str, ObjectiveRecord] = {}
        for objective, result in zip(module.objectives, results, strict=True):
            path = self._write(result_file(objective.name), png_bytes(result.image))
            records[objective.name] = ObjectiveRecord(
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
        best = torch.cat([result.image for result in results])
        names = [objective.name for objective in module.objectives]
        self._write(GRID, png_bytes(self._grid(module, best, names)))
        own_file = None
        if self.output is not None:
            path = self._write(self._output_name, encoded(results[0].image, self.output, "ImageWriter.output"))
            own_file = {"path": str(path), "sha256": file_digest(path)}
        self._log_images(trainer, module, "result", best)
        steps = trainer.global_step
        ran = steps - self._start_step
        timed = ended - self._first_step_done if self._first_step_done and ran > 1 else None
        vgg = module.vgg
        assert vgg is not None  # results() built it
        summary = FitSummary(
            vgg_weights=vgg.weights_used,
            pooling=vgg.pooling,
            image_size=list(best.shape[-2:]),
            precision=str(trainer.precision),
            device=str(module.device),
            steps=steps,
            resumed_at_step=self._start_step or None,
            wall_time_s=round(ended - self._started, 4),
            seconds_per_step=round((ended - self._started) / max(ran, 1), 5),
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
            result_file=own_file,
        )
        self._write(SUMMARY, summary.to_json().encode())
        metrics: dict[str, float] = {}
        for name, record in summary.objectives.items():
            final = {"best_loss": record.best_loss, "last_loss": record.last_loss, "best_step": record.best_step}
            final.update({key: value for key, value in record.final_loss.items() if key != "total"})
            final.update(record.metrics)
            metrics.update({f"final/{name}/{key}": value for key, value in _finite_floats(final).items()})
        self._log_hparams(trainer, module, metrics)
        self._written = True
        written = f" and {self.output}" if self.output is not None else ""
        self._announce = f"Results: {out} ({len(records)} PNG, {GRID}, {SUMMARY}){written}"


# -- predict: GenerationWriter --------------------------------------------------------------------------------------


@runtime_checkable
class GenerationModule(Protocol):
    """What :class:`GenerationWriter` needs of the module: :class:`~lightning_nst.GuidedDiffusion` provides it."""

    def fingerprint_options(self) -> dict[str, Any]:
        """The options that define an image, known before anything is loaded: part of each item's fingerprint."""
        ...

    def manifest_settings(self) -> dict[str, Any]:
        """The sampling settings a manifest line records, as :class:`~lightning_nst.outputs.GenerationRecord` fields."""
        ...


def _generation_module(pl_module: L.LightningModule) -> GenerationModule:
    if not isinstance(pl_module, GenerationModule):
        raise NSTError(
            "model: GenerationWriter needs a module that defines fingerprint_options() and manifest_settings(), "
            "such as lightning_nst.GuidedDiffusion"
        )
    return pl_module


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class GenerationWriter(BasePredictionWriter):
    """Write each generated image as a PNG and one JSON line per image to a manifest; finish interrupted runs.

    Images are named ``{index:05d}_{prompt slug}_{seed}.png``: the index makes each name unique and the slug holds
    only ASCII letters, digits and ``-``, so no prompt can place a file outside the output folder. Each batch's
    records are appended to this process's hidden part file and flushed to disk, and only then are its PNGs written,
    each atomically (temporary file, then rename): a PNG on disk always has a record, so a run killed at any moment
    leaves no image a rerun could take for a stranger's. When prediction ends, rank 0 merges the records of the PNGs
    written into the manifest, one per item in index order, and removes the part files. A record holds the prompt,
    negative prompt, seed, style image and its content digest, sampling and guidance settings, the final style
    loss, the per-step style-loss trajectory, the image path relative to the manifest, the ``sha256`` of the PNG's
    bytes and the item's ``fingerprint``: a hash of everything that defines its image.

    An item whose sampling produced a NaN or infinity (see ``failures`` in
    :meth:`~lightning_nst.GuidedDiffusion.predict_step`) is neither written nor recorded: one error line names it,
    its file and the config key most likely at fault. The other items are finished and merged as usual, and then
    the run raises :class:`~lightning_nst.errors.NSTError` (exit status 2), so a rerun generates only the failed ones.

    A rerun into the same ``output_dir`` generates only what is missing. Items recorded in the manifest, or in part
    files a killed run left behind, whose PNG still has the recorded ``sha256`` and whose fingerprint matches the
    current config are kept; recorded items without their PNG are generated again, spread over all processes. When
    nothing is missing, the pipeline is not even loaded. Unless ``overwrite``, the writer replaces no file it did
    not write (:class:`~lightning_nst.outputs.OutputFolder`'s rule, with the manifest as the folder's record): a
    folder holding a PNG of an item's name that no record holds (the user's, or one whose manifest was deleted or
    moved), or whose bytes are not the recorded ones (edited, replaced or damaged), is refused before anything
    loads, naming the file; so is a folder holding an item made from a different prompt, seed, style (path or
    content) or sampler setting.

    The module must be a :class:`GenerationModule` (:class:`~lightning_nst.GuidedDiffusion` is): its
    ``fingerprint_options`` enter each item's fingerprint, its ``manifest_settings`` each
    :class:`~lightning_nst.outputs.GenerationRecord`.

    Args:
        output_dir: Folder of the images and the manifest; by default the logger's run folder
            (``logs/<name>/version_<n>``). A fixed folder lets a rerun of the same command finish an interrupted run.
        manifest: File name of the manifest inside ``output_dir``.
        overwrite: Generate every item again, replacing any file of the items' names and the manifest.
    """

    def __init__(self, output_dir: str | None = None, manifest: str = MANIFEST, overwrite: bool = False) -> None:
        super().__init__("batch")
        if Path(manifest).name != manifest or manifest in ("", ".", ".."):
            raise NSTError(f"GenerationWriter.manifest: must be a plain file name, got {manifest!r}")
        self.output_dir = output_dir
        self.manifest = manifest
        self.overwrite = overwrite
        self.directory: Path | None = None
        self._names: dict[int, str] = {}
        self._fingerprints: dict[int, str] = {}
        self._kept = 0
        self._failures: list[str] = []
        self._plan = ""
        # write_atomic's temporary files: ".<name>.<random>.tmp"
        self._temporary = re.compile(rf"\.({ITEM_FILE.pattern}|{re.escape(manifest)})\..+\.tmp")

    def _part(self, rank: int) -> Path:
        assert self.directory is not None
        return self.directory / f".{self.manifest}.rank{rank}.part"

    def _parts(self) -> list[Path]:
        assert self.directory is not None
        return sorted(self.directory.glob(f".{glob.escape(self.manifest)}.rank*.part"))

    @property
    def _flag(self) -> str:
        # How the shipped configs, which list the writer last, set its folder on the command line.
        return f"--trainer.callbacks.init_args.output_dir {shlex.quote(str(self.directory))}"

    def _refuse(self, problem: str) -> NSTError:
        return NSTError(
            f"GenerationWriter.output_dir: {self.directory} {problem}; choose another folder or set overwrite: true"
        )

    # -- setup: what is finished already ------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the output folder, keep the items it finished already, and have the data skip them.

        :meth:`PromptGrid.skip <lightning_nst.PromptGrid.skip>` is the one channel from the writer to the data: with
        nothing left, the data module's ``predict_dataloader`` is empty, so Lightning runs no predict step and the
        module loads no pipeline.
        """
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        self.directory = Path(self.output_dir).expanduser() if self.output_dir is not None else Path(log_dir or ".")
        if self.directory.exists() and not self.directory.is_dir():
            raise NSTError(f"GenerationWriter.output_dir: {self.directory} exists and is not a folder")
        data = trainer.datamodule
        if not isinstance(data, PromptGrid):
            raise NSTError("data: GenerationWriter needs `data: {class_path: lightning_nst.PromptGrid, ...}`")
        options = _generation_module(pl_module).fingerprint_options()
        self._names = {item.index: item_file(item.index, item.base_prompt, item.seed) for item in data.items}
        self._fingerprints = {item.index: item.fingerprint(options) for item in data.items}
        # Every rank reads the same files before anyone changes them, so all reach the same verdict: a refusal
        # stops each of them alike instead of leaving the others waiting at a barrier.
        finished = {} if self.overwrite else self._finished()
        trainer.strategy.barrier("GenerationWriter.scan")
        if trainer.is_global_zero:
            self._tidy(finished)
        trainer.strategy.barrier("GenerationWriter.tidy")
        data.skip(finished)
        self._kept = len(finished)
        self._failures = []
        total = len(data.items)
        # Said once the run is sure to start (on_predict_start) or has ended (teardown), not before the module's own
        # checks, which may still refuse the run.
        if self._kept == total:
            self._plan = f"All {total} items in {self.directory} are finished; nothing to generate"
        else:
            kept = f"; {self._kept} finished earlier are kept" if self._kept else ""
            hint = "" if self.output_dir is not None else f"; to finish it if interrupted, rerun with {self._flag}"
            self._plan = f"Generating {total - self._kept} of {total} items into {self.directory}{kept}{hint}"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say how many items this run generates, and where."""
        rank_zero_info(self._plan)
        self._plan = ""

    def _records(self, path: Path, strict: bool) -> Iterator[tuple[int, dict[str, Any], str]]:
        """``(index, record, line)`` of each record in ``path``.

        A line that is not a record is an error if ``strict``, else skipped: it is the last line of a part file that
        a killed process left half-written.
        """
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            index = record.get("index") if isinstance(record, dict) else None
            if isinstance(index, int) and not isinstance(index, bool):
                yield index, record, line
            elif strict:
                raise self._refuse(f"holds {path.name}, whose line {number} is not a record of this writer")

    def _check_record(self, index: int, record: dict[str, Any]) -> None:
        """Raise unless ``record`` is one of the current items, made from the current settings."""
        if index not in self._names:
            count = len(self._names)
            raise self._refuse(f"holds item {index}, but the data defines only {count} item{'s' * (count != 1)}")
        image = record.get("image")
        if record.get("fingerprint") != self._fingerprints[index] or image != self._names[index]:
            shown = f" ({image})" if isinstance(image, str) and ITEM_FILE.fullmatch(image) else ""
            raise self._refuse(
                f"holds item {index}{shown} made from a different prompt, seed, style or sampler setting than now"
            )

    def _finished(self) -> dict[int, str]:
        """Manifest lines of the finished items by index; raises where the folder holds a file that is not its own.

        An item is finished when a record holds it and its PNG has the recorded ``sha256``; a recorded item without
        its PNG is not. Any other PNG of an item's name (no record holds it, or its bytes are not the recorded ones)
        is not this folder's output, and is refused: :class:`~lightning_nst.outputs.OutputFolder`'s rule, with the
        manifest and the part files as the record.
        """
        assert self.directory is not None
        manifest = self.directory / self.manifest
        if manifest.exists() and not manifest.is_file():
            raise NSTError(f"GenerationWriter.manifest: {manifest} exists and is not a file")
        sources = ([(manifest, True)] if manifest.is_file() else []) + [(part, False) for part in self._parts()]
        recorded: dict[str, set[str]] = {}
        lines: dict[int, list[tuple[str, str]]] = {}
        for path, strict in sources:
            for index, record, line in self._records(path, strict):
                self._check_record(index, record)
                digest = str(record.get("sha256"))
                recorded.setdefault(self._names[index], set()).add(digest)
                lines.setdefault(index, []).append((digest, line))
        folder = OutputFolder(self.directory, "GenerationWriter.output_dir")
        names = [self._names[index] for index in sorted(self._names)]
        foreign = folder.foreign(names, recorded)
        if foreign:
            first = foreign[0]
            if first in recorded:
                why = f"is not the image {self.manifest} recorded for it (edited, replaced or damaged since)"
                hint = "move it away to generate it again, or set overwrite: true to replace it"
            elif not sources:
                why = f"has no record: {manifest} is missing (deleted or moved?)"
                hint = "put the manifest back, move the images away, or set overwrite: true to replace them"
            else:
                why = f"is not a file {self.manifest} records (a file of yours?)"
                hint = "move it away, or set overwrite: true to replace it"
            raise folder.refusal(foreign, why, hint)
        finished: dict[int, str] = {}
        for index, entries in lines.items():
            path = self.directory / self._names[index]
            if path.is_file():  # not foreign: its bytes are those of one of its records
                digest = file_digest(path)
                finished[index] = next(line for recorded_digest, line in entries if recorded_digest == digest)
        return finished

    def _tidy(self, finished: dict[int, str]) -> None:
        """Rank 0: make the manifest hold exactly the finished items; remove part and temporary files left over."""
        assert self.directory is not None
        manifest = self.directory / self.manifest
        text = "".join(finished[index] + "\n" for index in sorted(finished))
        # Only files of this writer's own names are touched: the manifest, which holds nothing but its records (a
        # stranger line is refused in _finished), is rewritten, never removed; part and temporary files it made are.
        if manifest.is_file() and manifest.read_text(encoding="utf-8", errors="replace") != text:
            write_atomic(manifest, text.encode("utf-8"), overwrite=True)
        elif text and not manifest.is_file():
            write_atomic(manifest, text.encode("utf-8"))
        for part in self._parts():
            part.unlink()
        for temporary in self.directory.glob(".*.tmp"):
            if self._temporary.fullmatch(temporary.name):
                temporary.unlink(missing_ok=True)

    # -- writing --------------------------------------------------------------------------------------------------

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append the batch's records to this rank's part file, then save their PNGs.

        Failed items (``prediction["failures"]``, or an image holding NaN or infinity) are reported and skipped.
        """
        assert self.directory is not None
        settings = _generation_module(pl_module).manifest_settings()
        trajectory = prediction.get("style_loss")
        final = prediction.get("final_style_loss")
        nsfw = prediction.get("nsfw")
        evaluations = prediction.get("model_evaluations", len(prediction["timesteps"]))
        failures = prediction.get("failures") or [None] * len(batch["index"])
        self.directory.mkdir(parents=True, exist_ok=True)  # not before: a run failing to start leaves no folder
        lines, images = [], []
        for row, index in enumerate(batch["index"]):
            name = self._names[index]
            image = prediction["images"][row]
            failure = failures[row]
            if failure is None and not torch.isfinite(image).all():
                failure = ("model", "the image is not finite")
            if failure is not None:
                key, problem = failure
                message = f"{key}: item {index} ({name}): {problem}"
                log.error(f"{message}; it is not written")
                self._failures.append(message)
                continue
            data = png_bytes(image)
            images.append((name, data))
            record = GenerationRecord(
                index=index,
                image=name,
                sha256=hashlib.sha256(data).hexdigest(),
                fingerprint=self._fingerprints[index],
                prompt=batch["prompt"][row],
                base_prompt=batch["base_prompt"][row],
                style_prompt=batch["style_prompt"][row],
                negative_prompt=batch["negative_prompt"][row],
                seed=batch["seed"][row],
                style=batch["style"][row],
                style_digest=batch["style_digest"][row],
                **{**settings, "size": list(image.shape[-2:])},  # with init images, each item has its own size
                final_style_loss=_finite(float(final[row])) if final is not None else None,
                style_loss=[_finite(v) for v in trajectory[row].tolist()] if trajectory is not None else None,
                timesteps=prediction["timesteps"],
                guided=prediction["guided"],
                nsfw=nsfw[row] if nsfw is not None else None,
                seconds_per_step=prediction["seconds_per_step"],
                rank=trainer.global_rank,
                init_image=batch["init_image"][row],
                init_image_digest=batch["init_image_digest"][row],
                model_evaluations=evaluations if evaluations != len(prediction["timesteps"]) else None,
            )
            lines.append(record.to_json() + "\n")
        # Records first, flushed to disk, then the PNGs: setup found each name free or a recorded item's missing PNG,
        # and a PNG a kill leaves behind is recorded, so a rerun keeps it rather than refusing it as a stranger's.
        if lines:
            with self._part(trainer.global_rank).open("a", encoding="utf-8") as stream:
                stream.write("".join(lines))
                stream.flush()
                os.fsync(stream.fileno())
        for name, data in images:
            try:
                write_atomic(self.directory / name, data, overwrite=True)
            except OSError as error:
                raise NSTError(
                    f"GenerationWriter.output_dir: cannot write {self.directory / name}: {error.strerror or error}"
                ) from None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Merge the finished items and every rank's new records into the manifest, once each, in item order."""
        if self.directory is None:
            return
        # Here rather than in on_predict_end: a process left without items skips the predict loop with its hooks,
        # but every process tears down.
        trainer.strategy.barrier("GenerationWriter.merge")
        _close_progress_bar(trainer, pl_module, stage)  # the Results line comes below it
        if self._plan:  # no predict loop ran: every item was finished
            rank_zero_info(self._plan)
            self._plan = ""
        recorded = self._merge() if trainer.is_global_zero else 0
        directory, self.directory = self.directory, None
        failures, self._failures = self._failures, []
        # Summed over processes (every one tears down), so each exits alike however the failed items were spread.
        count = torch.tensor(float(len(failures)), device=trainer.strategy.root_device)  # NCCL reduces CUDA only
        failed = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        if failed:
            total = len(self._names)
            key, detail = failures[0].split(": ", 1) if failures else ("GenerationWriter", "see the lines above")
            kept = f"; the {recorded} finished are in {directory}" if recorded else ""
            raise NSTError(
                f"{key}: {failed} of {total} item{'s' * (total != 1)} failed with values that are not finite and were "
                f"not written (first: {detail}){kept}; a rerun into the same folder generates only what is missing"
            )

    def _merge(self) -> int:
        """Rank 0: write the manifest from the finished and the new records; returns how many it holds."""
        assert self.directory is not None
        manifest = self.directory / self.manifest
        parts = self._parts()
        records: dict[int, str] = {}
        for path in ([manifest] if manifest.is_file() else []) + parts:
            for index, record, line in self._records(path, strict=False):
                if index in records or index not in self._names:
                    continue
                image = self.directory / self._names[index]
                # The manifest holds the items setup found finished; a part's record is written before its PNG, which
                # a failed write or a kill may have left missing.
                if image.is_file() and (path == manifest or file_digest(image) == record.get("sha256")):
                    records[index] = line
        if parts:
            text = "".join(records[index] + "\n" for index in sorted(records))
            write_atomic(manifest, text.encode("utf-8"), overwrite=True)
            for part in parts:
                part.unlink()
        new = len(records) - self._kept
        kept = f", {self._kept} kept from an earlier run" if self._kept and new else ""
        if records:
            rank_zero_info(f"Results: {self.directory} ({len(records)} PNG{kept}, {self.manifest})")
        return len(records)
