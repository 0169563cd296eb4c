"""Writers of results: the callbacks that save what a run computed, so the modules only compute."""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_nst.core.errors import DivergenceError, NSTError
from lightning_nst.core.files import OutputFolder, file_digest
from lightning_nst.core.images import encoded, image_format, labelled_grid, png_bytes, to_uint8
from lightning_nst.nst.summary import (
    final_metrics,
    fit_summary,
    objective_record,
    progress_metrics,
    result_grid,
    run_settings,
)
from lightning_nst.outputs import (
    GRID,
    SUMMARY,
    ObjectiveRecord,
    interrupted_file,
    last_good_file,
    result_file,
    step_file,
)

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


def _close_progress_bar(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
    """Have the progress bar draw its last frame now, so that a line printed next comes below it.

    Lightning tears callbacks down in list order with its own progress bar after the configured callbacks, and the
    Rich bar draws its last frame in its ``teardown``; the progress bars' teardown may run twice.
    """
    bar = trainer.progress_bar_callback
    if bar is not None:
        bar.teardown(trainer, pl_module, stage)


_OVERWRITE_HINT = "choose another folder or set --trainer.callbacks.init_args.overwrite true"


class ImageWriter(L.Callback):
    """Write what :class:`~lightning_nst.ImageOptimization` computes: result PNGs, a grid, ``summary.json``.

    :meth:`ImageOptimization.configure_callbacks <lightning_nst.ImageOptimization.configure_callbacks>` adds one
    with these defaults to a trainer that has none (from ``lightning-nst fit`` or Python alike); the shipped configs
    list it as the last callback, so ``--trainer.callbacks.init_args.output_dir DIR`` sets its folder, as for
    ``predict``'s writer. File names are those of :mod:`lightning_nst.outputs`.

    It refuses to start when the folder holds a finished run's results, or any file of a name it may write that it
    did not write there itself (:class:`~lightning_nst.core.files.OutputFolder`), unless ``overwrite``; it saves step
    snapshots and logs TensorBoard images while the run goes on, and keeps each objective's last finite image as
    ``<name>.last_good.png`` when a loss becomes non-finite. To TensorBoard it logs the content and style images
    once (``inputs/content``, ``inputs/style_<i>``), snapshots from step 0, the results, and at the end the
    objectives' settings as hyperparameters with their final losses and metrics (``final/<objective>/<name>``), so
    the HParams tab compares runs; a run stopped by a signal logs them too, with the best losses so far.

    With ``output``, the result of the (one) objective is also written to that image file: what ``lightning-nst
    stylize -o`` writes. The folder's record of its files (:class:`~lightning_nst.core.files.OutputFolder`) holds it
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
        self.precision_source = "config"
        """``summary.json``'s ``precision_source``: ``lightning-nst fit`` sets ``auto`` or ``checkpoint`` where it chose
        ``trainer.precision`` (:mod:`lightning_nst.cli.precision`); ``config``: as the Trainer was given it."""
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
        this run may write that lightning_nst did not write there (:class:`~lightning_nst.core.files.OutputFolder`),
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

        Called when a signal stops the run (:class:`lightning_nst.cli.signals.StopOnSignal`, on Lightning's
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
        self._log_hparams(trainer, pl_module, progress_metrics(trainer.global_step, pl_module))
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

    def _log_hparams(self, trainer: L.Trainer, module: OptimizationModule, metrics: dict[str, float]) -> None:
        """The run's settings as hyperparameters with its final (or best so far) losses, for the HParams tab."""
        params = {**run_settings(module), "steps": trainer.global_step}
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
            records[objective.name] = objective_record(objective, result, path)
        best = torch.cat([result.image for result in results])
        names = [objective.name for objective in module.objectives]
        grid = result_grid(best, names, module.content, module.style, self.grid_columns, self.grid_inputs)
        self._write(GRID, png_bytes(grid))
        own_file = None
        if self.output is not None:
            path = self._write(self._output_name, encoded(results[0].image, self.output, "ImageWriter.output"))
            own_file = {"path": str(path), "sha256": file_digest(path)}
        self._log_images(trainer, module, "result", best)
        times = (self._started, self._first_step_done, ended)
        summary = fit_summary(
            module, trainer, list(best.shape[-2:]), records, out, times, self._start_step, own_file,
            precision_source=self.precision_source,
        )  # fmt: skip
        self._write(SUMMARY, summary.to_json().encode())
        self._log_hparams(trainer, module, final_metrics(summary))
        self._written = True
        written = f" and {self.output}" if self.output is not None else ""
        self._announce = f"Results: {out} ({len(records)} PNG, {GRID}, {SUMMARY}){written}"
