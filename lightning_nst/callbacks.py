"""Callbacks of the guided-diffusion predict loop: per-step hooks, TensorBoard trajectories and the output writer."""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from lightning_nst.errors import NSTError
from lightning_nst.images import labelled_grid, save_image, write_atomic


class DenoisingCallback(Callback):
    """A Lightning callback that also sees every sampling step of :class:`~lightning_nst.GuidedDiffusion`.

    Add subclasses to ``trainer.callbacks`` in YAML like any other callback.
    """

    def on_denoising_step(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        step_index: int,
        timestep: int,
        callback_kwargs: dict[str, Any],
    ) -> dict[str, Any] | None:
        """Called after each scheduler step, with diffusers' ``callback_on_step_end`` contract.

        Args:
            trainer: The trainer.
            pl_module: The sampling module.
            step_index: Index of the step, from 0.
            timestep: The scheduler's timestep of the step.
            callback_kwargs: ``latents`` (after the step), ``noise_pred`` (as the scheduler used it), ``index``
                (item numbers) and ``style_index``; with style guidance also ``style_loss`` ``(B,)``, ``x0_image``
                (the decoded clean prediction the loss was measured on) and ``guided``.

        Returns:
            ``None``, or a dict whose ``latents`` replace the sampler's.
        """
        return None


class TrajectoryLogger(DenoisingCallback):
    r"""Log each item's style loss and timestep at every step, and previews of the decoded :math:`\hat x_0`.

    Scalars go to ``style_loss/<index>`` and ``timestep/<index>`` against the step index; every ``preview_every``
    steps (and at the last step) the clean prediction goes to ``x0/<index>``. After each batch, ``x0_table/<index>``
    holds the previews side by side labelled with step index, timestep and style loss, ``image/<index>`` the final
    image and ``final_style_loss/<index>`` its style loss. Needs a ``TensorBoardLogger``; under DDP, ranks other than
    0 write their own event files into the same run folder.

    Args:
        preview_every: Steps between previews; 0 logs scalars only.
        table_columns: Columns of the preview table.
    """

    def __init__(self, preview_every: int = 10, table_columns: int = 6) -> None:
        super().__init__()
        if preview_every < 0:
            raise NSTError(f"TrajectoryLogger.preview_every: must be >= 0, got {preview_every}")
        self.preview_every = preview_every
        self.table_columns = table_columns
        self._writer: Any = None
        self._own_writer = False
        self._previews: dict[int, list[tuple[int, int, float, Tensor]]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Find the TensorBoard writer of this rank."""
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
        preview = images is not None and self.preview_every > 0 and (step_index % self.preview_every == 0 or last)
        losses = losses.float().cpu().tolist() if losses is not None else None
        for row, index in enumerate(callback_kwargs["index"]):
            tag = f"{index:05d}"
            self._writer.add_scalar(f"timestep/{tag}", timestep, step_index)
            if losses is not None:
                self._writer.add_scalar(f"style_loss/{tag}", losses[row], step_index)
            if preview:
                image = images[row].detach().float().clamp(0, 1).cpu()
                self._writer.add_image(f"x0/{tag}", image, step_index)
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
        for row, index in enumerate(batch["index"]):
            tag = f"{index:05d}"
            self._writer.add_image(f"image/{tag}", outputs["images"][row], steps)
            if final is not None:
                self._writer.add_scalar(f"final_style_loss/{tag}", float(final[row]), steps)
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


def slugify(text: str, max_length: int = 40) -> str:
    """A file-name-safe slug of ``text``: ASCII letters and digits joined by ``-``, at most ``max_length`` long."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].strip("-") or "image"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class GenerationWriter(BasePredictionWriter):
    """Write each generated image as a PNG and one JSON line per image to a manifest, from every rank.

    Images are named ``{index:05d}_{prompt slug}_{seed}.png``. Each rank appends its records to a hidden part
    file as it goes; when prediction ends, rank 0 merges the parts, ordered by item index and with any repeated item
    kept once, into the manifest and removes them. A JSON line holds the prompt, negative prompt, seed, style image,
    sampling and guidance settings, the final style loss, the per-step style-loss trajectory and the image path
    relative to the manifest.

    Args:
        output_dir: Folder of the images and the manifest; by default the logger's run folder
            (``logs/<name>/version_<n>``).
        manifest: File name of the manifest inside ``output_dir``.
        overwrite: Replace existing outputs instead of refusing to start.
    """

    def __init__(
        self, output_dir: str | None = None, manifest: str = "predictions.jsonl", overwrite: bool = False
    ) -> None:
        super().__init__("batch")
        if Path(manifest).name != manifest or manifest in ("", ".", ".."):
            raise NSTError(f"GenerationWriter.manifest: must be a plain file name, got {manifest!r}")
        self.output_dir = output_dir
        self.manifest = manifest
        self.overwrite = overwrite
        self.directory: Path | None = None

    def _part(self, rank: int) -> Path:
        assert self.directory is not None
        return self.directory / f".{self.manifest}.rank{rank}.part"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the output folder and refuse to mix with an earlier run's outputs."""
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        self.directory = Path(self.output_dir).expanduser() if self.output_dir is not None else Path(log_dir or ".")
        manifest = self.directory / self.manifest
        if manifest.exists() and not self.overwrite:
            raise NSTError(
                f"GenerationWriter.output_dir: {manifest} exists; choose another folder or set overwrite: true"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._part(trainer.global_rank).unlink(missing_ok=True)

    def file_name(self, index: int, prompt: str, seed: int) -> str:
        """The PNG name of one item: unique by ``index``, readable by prompt slug and seed."""
        return f"{index:05d}_{slugify(prompt)}_{seed}.png"

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
        """Save the batch's PNGs and append their records to this rank's part file."""
        assert self.directory is not None
        settings = pl_module.settings() if hasattr(pl_module, "settings") else {}
        trajectory = prediction.get("style_loss")
        final = prediction.get("final_style_loss")
        nsfw = prediction.get("nsfw")
        lines = []
        for row, index in enumerate(batch["index"]):
            name = self.file_name(index, batch["base_prompt"][row], batch["seed"][row])
            save_image(prediction["images"][row], self.directory / name, overwrite=self.overwrite)
            record = {
                "index": index,
                "image": name,
                "prompt": batch["prompt"][row],
                "base_prompt": batch["base_prompt"][row],
                "style_prompt": batch["style_prompt"][row],
                "negative_prompt": batch["negative_prompt"][row],
                "seed": batch["seed"][row],
                "style": batch["style"][row],
                **settings,
                "final_style_loss": _finite(float(final[row])) if final is not None else None,
                "style_loss": [_finite(v) for v in trajectory[row].tolist()] if trajectory is not None else None,
                "timesteps": prediction["timesteps"],
                "guided": prediction["guided"],
                "nsfw": nsfw[row] if nsfw is not None else None,
                "seconds_per_step": prediction["seconds_per_step"],
                "rank": trainer.global_rank,
            }
            lines.append(json.dumps(record) + "\n")
        with self._part(trainer.global_rank).open("a", encoding="utf-8") as stream:
            stream.write("".join(lines))
            stream.flush()
            os.fsync(stream.fileno())

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Merge every rank's records into the manifest, once each, in item order."""
        trainer.strategy.barrier("GenerationWriter.merge")
        if not trainer.is_global_zero or self.directory is None:
            return
        records: dict[int, str] = {}
        parts = [self._part(rank) for rank in range(trainer.world_size) if self._part(rank).exists()]
        for part in parts:
            for line in part.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    records.setdefault(json.loads(line)["index"], line)
        manifest = self.directory / self.manifest
        text = "".join(records[index] + "\n" for index in sorted(records))
        write_atomic(manifest, text.encode("utf-8"), overwrite=self.overwrite)
        for part in parts:
            part.unlink()
        rank_zero_info(f"Results: {self.directory} ({len(records)} PNG, {self.manifest})")
