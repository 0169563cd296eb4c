"""Callbacks that write a run's results: the module computes, a writer writes."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_nst.errors import NSTError
from lightning_nst.images import labelled_grid, save_image, write_atomic
from lightning_nst.optimize import DivergenceError, ImageOptimization
from lightning_nst.outputs import (
    GRID,
    SUMMARY,
    FitSummary,
    ObjectiveRecord,
    file_digest,
    last_good_file,
    result_file,
    step_file,
)

# -- image optimisation (fit) ---------------------------------------------------------------------------------------


class ImageWriter(L.Callback):
    """Write what :class:`~lightning_nst.ImageOptimization` computes: result PNGs, a grid, ``summary.json``.

    :class:`~lightning_nst.ImageOptimization` attaches one with these defaults when the trainer has none; the
    shipped configs list it as the last callback, so ``--trainer.callbacks.init_args.output_dir DIR`` sets its
    folder, as for ``predict``'s writer. File names are those of :mod:`lightning_nst.outputs`.

    It refuses to start when result files exist in the folder (unless ``overwrite``), saves step snapshots and logs
    TensorBoard images while the run goes on, and keeps each objective's last finite image as
    ``<name>.last_good.png`` when a loss becomes non-finite.

    Args:
        output_dir: Where results go; by default the logger's run folder (``logs/<name>/version_<n>``).
        overwrite: Replace existing result files in ``output_dir`` instead of refusing to start.
        save_every: Also save each objective's image as ``steps/<name>_<step>.png`` every this many steps, and at
            step 0 (neural-style's ``-save_iter``); 0 turns it off. A resumed run replaces the files of the steps it
            repeats.
        snapshot_every: Log the current images to TensorBoard every this many steps; 0 turns it off.
        grid_columns: Columns of the labelled grid of results.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        overwrite: bool = False,
        save_every: NonNegativeInt = 0,
        snapshot_every: NonNegativeInt = 50,
        grid_columns: PositiveInt = 4,
    ) -> None:
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.save_every = int(save_every)
        self.snapshot_every = int(snapshot_every)
        self.grid_columns = int(grid_columns)
        self.directory = Path(output_dir).expanduser() if output_dir is not None else None
        self._started = 0.0
        self._start_step = 0
        self._first_step_done = 0.0
        self._written = False

    @staticmethod
    def _module(pl_module: L.LightningModule) -> ImageOptimization:
        if not isinstance(pl_module, ImageOptimization):
            raise NSTError(f"ImageWriter: writes the results of ImageOptimization, not of {type(pl_module).__name__}")
        return pl_module

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the output folder."""
        self._module(pl_module)
        # Every rank: the logger's run folder is agreed on by a collective call.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self.directory = Path(self.output_dir).expanduser() if self.output_dir is not None else Path(log_dir)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse to start if the folder holds results, unless ``overwrite``.

        Here rather than in :meth:`setup`: Lightning's own check of a run folder (``SaveConfigCallback.setup``,
        which names ``trainer.default_root_dir``) comes first, and the module has not computed its targets yet.
        """
        self._started = time.perf_counter()
        self._start_step = trainer.global_step
        if self.overwrite or not trainer.is_global_zero or self.directory is None:
            return
        names = [result_file(objective.name) for objective in self._module(pl_module).objectives] + [GRID, SUMMARY]
        existing = [self.directory / name for name in names if (self.directory / name).exists()]
        if existing:
            raise NSTError(
                f"ImageWriter.output_dir: {existing[0]} exists; choose another folder or set "
                "--trainer.callbacks.init_args.overwrite true"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._started = time.perf_counter()
        self._start_step = trainer.global_step
        if self.save_every and trainer.global_step == 0:
            self._save_steps(trainer, self._module(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Time the first step, log snapshots to TensorBoard and save step images."""
        module = self._module(pl_module)
        step = trainer.global_step
        if step == self._start_step + 1:
            self._first_step_done = time.perf_counter()
        if self.snapshot_every and step % self.snapshot_every == 0:
            self._log_images(trainer, module, "snapshot", module.image)
        if self.save_every and step % self.save_every == 0:
            self._save_steps(trainer, module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the results; see :meth:`write_results`."""
        self.write_results(trainer, self._module(pl_module))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the results of a run resumed from a checkpoint at ``max_steps``, which skips the training loop."""
        if not self._written and trainer.global_step >= trainer.max_steps:
            self._start_step = trainer.global_step
            self.write_results(trainer, self._module(pl_module))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On a non-finite loss, save each objective's last finite image and name where in the error."""
        if not isinstance(exception, DivergenceError) or not isinstance(pl_module, ImageOptimization):
            return
        if not trainer.is_global_zero or pl_module.last_good is None or self.directory is None:
            return
        kept = False
        for index, objective in enumerate(pl_module.objectives):
            if pl_module.has_good[index]:
                path = self.directory / last_good_file(objective.name)
                save_image(pl_module.last_good[index], path, overwrite=True)
                kept = True
        exception.kept(str(self.directory) if kept else None)

    def _save_steps(self, trainer: L.Trainer, module: ImageOptimization) -> None:
        step = trainer.global_step
        module.check_finite(f"steps/*_{step:05d}.png were not saved")
        if trainer.is_global_zero and self.directory is not None:
            image = module.image
            for index, objective in enumerate(module.objectives):
                save_image(image[index], self.directory / step_file(objective.name, step), overwrite=True)

    def _log_images(self, trainer: L.Trainer, module: ImageOptimization, tag: str, images: Tensor) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            grid = labelled_grid(images, [objective.name for objective in module.objectives], nrow=self.grid_columns)
            trainer.logger.experiment.add_image(
                tag, torch.from_numpy(np.array(grid)), trainer.global_step, dataformats="HWC"
            )

    def write_results(self, trainer: L.Trainer, module: ImageOptimization) -> None:
        """Write each objective's best image as a PNG, a labelled grid and ``summary.json``, then say where.

        ``summary.json`` (:class:`~lightning_nst.outputs.FitSummary`) records, per objective, the step and loss of
        the image saved (``best_step``, ``best_loss``, its terms in ``final_loss``) and the loss of the last image
        (``last_loss``).
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
            path = out / result_file(objective.name)
            save_image(result.image, path, overwrite=self.overwrite)
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
        save_image(labelled_grid(best, names, nrow=self.grid_columns), out / GRID, overwrite=self.overwrite)
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
        )
        write_atomic(out / SUMMARY, summary.to_json().encode(), overwrite=self.overwrite)
        self._written = True
        rank_zero_info(f"Results: {out} ({len(records)} PNG, {GRID}, {SUMMARY})")
