"""Logging callbacks of the guided-diffusion predict loop: per-step TensorBoard trajectories and previews.

The hook they implement, :class:`~lightning_nst.DenoisingCallback`, belongs to the sampling loop that calls
it; the writer of the results is :class:`~lightning_nst.GenerationWriter` (also importable from here, the
path configs written before the two moved name).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import OutputFolder
from lightning_nst.core.images import labelled_grid, png_bytes, to_uint8
from lightning_nst.diffusion.module import DenoisingCallback
from lightning_nst.diffusion.prompts import PromptGrid
from lightning_nst.diffusion.writer import GenerationModule, GenerationWriter
from lightning_nst.outputs import PREVIEW_FILE, item_file, preview_file

__all__ = ["DenoisingCallback", "GenerationWriter", "TrajectoryLogger"]


def _item_text(batch: dict[str, Any], row: int, pl_module: L.LightningModule) -> str:
    """One item's prompt and settings as Markdown, for TensorBoard's text tab."""
    lines = [f"**{batch['prompt'][row]}**", ""]
    for key in ("negative_prompt", "seed", "style", "init_image"):
        if batch.get(key) is not None and batch[key][row] is not None:
            lines.append(f"- {key}: `{batch[key][row]}`")
    if isinstance(pl_module, GenerationModule):
        for key, value in pl_module.manifest_settings().items():
            lines.append(f"- {key}: `{json.dumps(value, default=str)}`")
    return "\n".join(lines)


class TrajectoryLogger(DenoisingCallback):
    r"""Log each item's style loss and timestep at every step, and previews of the decoded :math:`\hat x_0`.

    Scalars go to ``style_loss/<index>`` and ``timestep/<index>`` against the step index; every ``preview_every``
    steps (and at the last step) the clean prediction goes to ``x0/<index>``. After each batch, ``x0_table/<index>``
    holds the previews side by side labelled with step index, timestep and style loss, ``image/<index>`` the final
    image, ``final_style_loss/<index>`` its style loss and ``prompt/<index>`` (text) its prompt, seed, style image,
    init image (img2img) and sampling settings. Every tag is ``<kind>/<index>``: TensorBoard groups cards by the
    part before the first ``/``, so a batch of any size makes these seven groups, each with one card per item. Needs
    a ``TensorBoardLogger``; under DDP, ranks other than 0 write their own event files into the same run folder.

    Args:
        preview_every: Steps between previews; 0 logs scalars only (and the ``preview_steps``).
        table_columns: Columns of the preview table.
        preview_steps: Step indices previewed as well, e.g. ``[0, 10, 20, 30, 40]`` to match a study's table.
        save_dir: Also write each preview as ``{index:05d}_x0_{step:03d}.png``
            (:func:`~lightning_nst.outputs.preview_file`) into this folder. A rerun that generates an item again
            replaces the previews it wrote; a file of a preview's name that it did not write there (the folder's
            record, :class:`~lightning_nst.core.files.OutputFolder`) is refused when the run sets up.
    """

    def __init__(
        self,
        preview_every: int = 10,
        table_columns: int = 6,
        preview_steps: list[int] | None = None,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        if preview_every < 0:
            raise NSTError(f"TrajectoryLogger.preview_every: must be >= 0, got {preview_every}")
        if any(step < 0 for step in preview_steps or []):
            raise NSTError(f"TrajectoryLogger.preview_steps: step indices must be >= 0, got {preview_steps}")
        self.preview_every = preview_every
        self.table_columns = table_columns
        self.preview_steps = set(preview_steps or [])
        self.save_dir = Path(save_dir).expanduser() if save_dir is not None else None
        self._folder = OutputFolder(self.save_dir or ".", "TrajectoryLogger.save_dir")
        self._writer: Any = None
        self._own_writer = False
        self._previews: dict[int, list[tuple[int, int, float, Tensor]]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse previews' names the save folder holds files of that it did not write; find this rank's writer."""
        if self.save_dir is not None:
            data = trainer.datamodule
            items = list(data.items) if isinstance(data, PromptGrid) else []
            for item in items:
                name = item_file(item.index, item.base_prompt, item.seed)
                if PREVIEW_FILE.fullmatch(name):  # prompt "x0" and a seed of 3 digits or more
                    raise NSTError(
                        f"TrajectoryLogger.save_dir: item {item.index}'s image {name} has the name of a preview; "
                        "save previews elsewhere (save_dir) or change its prompt"
                    )
            indices = {item.index for item in items}
            found = [PREVIEW_FILE.fullmatch(path.name) for path in self._folder.directory.glob("*_x0_*.png")]
            previews = [match.group(0) for match in found if match is not None and int(match.group(1)) in indices]
            self._folder.check(previews, hint="move it away, or choose another TrajectoryLogger.save_dir")
        if not isinstance(trainer.logger, TensorBoardLogger):
            rank_zero_warn("TrajectoryLogger needs trainer.logger to be a TensorBoardLogger; it will log nothing")
            return
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        if trainer.is_global_zero:
            self._writer = trainer.logger.experiment
        elif log_dir is not None:
            self._writer = SummaryWriter(log_dir, filename_suffix=f".rank{trainer.global_rank}")
            self._own_writer = True

    def on_denoising_step(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        step_index: int,
        timestep: int,
        callback_kwargs: dict[str, Any],
    ) -> dict[str, Any] | None:
        """Log this step's scalars and, every ``preview_every`` steps, the previews."""
        if self._writer is None:
            return None
        losses, images = callback_kwargs.get("style_loss"), callback_kwargs.get("x0_image")
        last = step_index == getattr(pl_module, "num_timesteps", 0) - 1
        every = self.preview_every > 0 and (step_index % self.preview_every == 0 or last)
        preview = images is not None and (every or step_index in self.preview_steps)
        losses = losses.float().cpu().tolist() if losses is not None else None
        for row, index in enumerate(callback_kwargs["index"]):
            tag = f"{index:05d}"
            self._writer.add_scalar(f"timestep/{tag}", timestep, step_index)
            if losses is not None:
                self._writer.add_scalar(f"style_loss/{tag}", losses[row], step_index)
            if preview:
                # A failing item's preview may hold NaN, which no image format can show: it is drawn black there.
                image = torch.nan_to_num(images[row].detach().float(), 0.0).clamp(0, 1).cpu()
                self._writer.add_image(f"x0/{tag}", to_uint8(image), step_index)
                if self.save_dir is not None:
                    self._folder.write(preview_file(index, step_index), png_bytes(image))
                loss = losses[row] if losses is not None else math.nan
                self._previews.setdefault(index, []).append((step_index, timestep, loss, image))
        return None

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Log the preview tables, the final images and their style losses."""
        if self._writer is None:
            return
        steps = len(outputs["timesteps"])
        final = outputs.get("final_style_loss")
        failures = outputs.get("failures") or [None] * len(batch["index"])
        for row, index in enumerate(batch["index"]):
            tag = f"{index:05d}"
            if failures[row] is None:  # a failed item has no image; its previews still show where it went wrong
                self._writer.add_image(f"image/{tag}", to_uint8(outputs["images"][row]), steps)
            if final is not None and failures[row] is None:
                self._writer.add_scalar(f"final_style_loss/{tag}", float(final[row]), steps)
            self._writer.add_text(f"prompt/{tag}", _item_text(batch, row, pl_module), steps)
            previews = self._previews.pop(index, [])
            if previews:
                labels = [f"{step} t={t} L={loss:.3g}" for step, t, loss, _ in previews]
                grid = labelled_grid(torch.stack([image for *_, image in previews]), labels, nrow=self.table_columns)
                self._writer.add_image(f"x0_table/{tag}", np.asarray(grid), steps, dataformats="HWC")
        self._writer.flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Close this rank's own event file."""
        if self._own_writer and self._writer is not None:
            self._writer.close()
        self._writer, self._own_writer = None, False
