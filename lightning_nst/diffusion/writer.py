"""Writers of results: the callbacks that save what a run computed, so the modules only compute."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_nst.core.errors import NSTError, lost_peer
from lightning_nst.core.files import FolderLock, write_atomic
from lightning_nst.core.images import png_bytes
from lightning_nst.diffusion.manifest import GenerationFolder
from lightning_nst.diffusion.prompts import PromptGrid
from lightning_nst.outputs import (
    MANIFEST,
    GenerationRecord,
    item_file,
)

log = logging.getLogger(__name__)

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
    the run raises :class:`~lightning_nst.NSTError` (exit status 2), so a rerun generates only the failed ones.

    A rerun into the same ``output_dir`` generates only what is missing. Items recorded in the manifest, or in part
    files a killed run left behind, whose PNG still has the recorded ``sha256`` and whose fingerprint matches the
    current config are kept; recorded items without their PNG are generated again, spread over all processes. When
    nothing is missing, the pipeline is not even loaded. Unless ``overwrite``, the writer replaces no file it did
    not write (:class:`~lightning_nst.core.files.OutputFolder`'s rule, with the manifest as the folder's record): a
    folder holding a PNG of an item's name that no record holds (the user's, or one whose manifest was deleted or
    moved), or whose bytes are not the recorded ones (edited, replaced or damaged), is refused before anything
    loads, naming the file; so is a folder holding an item made from a different prompt, seed, style (path or
    content) or sampler setting.

    One run at a time writes into a folder: rank 0 holds :class:`~lightning_nst.core.files.FolderLock` from setup to
    teardown, and a second launch into the folder, with the same settings or others, is refused in one line naming
    the run that holds it, before anything loads. A killed run's lock is taken over (its process is gone, or, from
    another host, its heartbeat stopped).

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
        self.folder: GenerationFolder | None = None
        self._kept = 0
        self._failures: list[str] = []
        self._plan = ""
        self._lock: FolderLock | None = None

    @property
    def _flag(self) -> str:
        # How the shipped configs, which list the writer last, set its folder on the command line.
        return f"--trainer.callbacks.init_args.output_dir {shlex.quote(str(self.directory))}"

    # -- setup: what is finished already ------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the output folder and give it to the data, which reads what is finished; tidy its records.

        :meth:`PromptGrid.resume <lightning_nst.PromptGrid.resume>` reads the folder's records and leaves the items
        they finished out of its ``predict_dataloader``: with nothing left, it is empty, so Lightning runs no predict
        step and the module loads no pipeline.
        """
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        self.directory = Path(self.output_dir).expanduser() if self.output_dir is not None else Path(log_dir or ".")
        if self.directory.exists() and not self.directory.is_dir():
            raise NSTError(f"GenerationWriter.output_dir: {self.directory} exists and is not a folder")
        data = trainer.datamodule
        if not isinstance(data, PromptGrid):
            raise NSTError("data: GenerationWriter needs `data: {class_path: lightning_nst.PromptGrid, ...}`")
        options = _generation_module(pl_module).fingerprint_options()
        names = {item.index: item_file(item.index, item.base_prompt, item.seed) for item in data.items}
        fingerprints = {item.index: item.fingerprint(options) for item in data.items}
        self.folder = GenerationFolder(self.directory, self.manifest, names, fingerprints)
        self._lock_folder(trainer, fingerprints)
        # Every rank reads the same files before anyone changes them, so all reach the same verdict: a refusal
        # stops each of them alike instead of leaving the others waiting at a barrier.
        finished = data.resume(None if self.overwrite else self.folder)
        trainer.strategy.barrier("GenerationWriter.scan")
        if trainer.is_global_zero:
            self.folder.tidy(finished)
        trainer.strategy.barrier("GenerationWriter.tidy")
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

    def _lock_folder(self, trainer: L.Trainer, fingerprints: dict[int, str]) -> None:
        """Own the folder for this run (rank 0 takes :class:`FolderLock`); every rank refuses alike if it is held."""
        settings = hashlib.sha256("".join(sorted(fingerprints.values())).encode()).hexdigest()[:12]
        problem = None
        if trainer.is_global_zero:
            self._lock = FolderLock(self.directory, "GenerationWriter.output_dir", f"grid {settings}")
            try:
                self._lock.acquire()
            except NSTError as error:
                self._lock, problem = None, str(error)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem is not None:
            raise NSTError(problem)

    def _unlock_folder(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Give the folder up: a run that failed or was stopped writes no more."""
        self._unlock_folder()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say how many items this run generates, and where."""
        rank_zero_info(self._plan)
        self._plan = ""

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
        assert self.directory is not None and self.folder is not None
        folder = self.folder
        settings = _generation_module(pl_module).manifest_settings()
        trajectory = prediction.get("style_loss")
        final = prediction.get("final_style_loss")
        nsfw = prediction.get("nsfw")
        evaluations = prediction.get("model_evaluations", len(prediction["timesteps"]))
        failures = prediction.get("failures") or [None] * len(batch["index"])
        self.directory.mkdir(parents=True, exist_ok=True)  # not before: a run failing to start leaves no folder
        lines, images = [], []
        for row, index in enumerate(batch["index"]):
            name = folder.names[index]
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
                fingerprint=folder.fingerprints[index],
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
            with folder.part(trainer.global_rank).open("a", encoding="utf-8") as stream:
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
        trainer.datamodule.finished(len(batch["index"]))  # for the progress of a run of several processes

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Merge the finished items and every rank's new records into the manifest, once each, in item order."""
        if self.directory is None or self.folder is None:  # setup did not get as far as the folder
            self.directory = None
            return
        # Here rather than in on_predict_end: a process left without items skips the predict loop with its hooks,
        # but every process tears down.
        try:
            trainer.strategy.barrier("GenerationWriter.merge")
        except RuntimeError as error:
            if (lost := lost_peer(error)) is None:
                raise
            raise NSTError(
                f"GenerationWriter: another process of this run ended before it ({lost}); the items this process "
                f"generated are recorded in {self.directory}, and running the same command again on every node "
                "generates only the rest"
            ) from None
        if trainer.progress_bar_callback is not None:  # its last frame drawn now, so the Results line comes below it
            trainer.progress_bar_callback.teardown(trainer, pl_module, stage)
        if self._plan:  # no predict loop ran: every item was finished
            rank_zero_info(self._plan)
            self._plan = ""
        recorded = self.folder.merge(self._kept) if trainer.is_global_zero else 0
        self._unlock_folder()
        directory, self.directory = self.directory, None
        names, self.folder = len(self.folder.names), None
        failures, self._failures = self._failures, []
        # Summed over processes (every one tears down), so each exits alike however the failed items were spread.
        count = torch.tensor(float(len(failures)), device=trainer.strategy.root_device)  # NCCL reduces CUDA only
        failed = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        if failed:
            total = names
            key, detail = failures[0].split(": ", 1) if failures else ("GenerationWriter", "see the lines above")
            kept = f"; the {recorded} finished are in {directory}" if recorded else ""
            raise NSTError(
                f"{key}: {failed} of {total} item{'s' * (total != 1)} failed with values that are not finite and were "
                f"not written (first: {detail}){kept}; a rerun into the same folder generates only what is missing"
            )
