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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import OutputFolder, file_digest, write_atomic
from lightning_nst.core.images import png_bytes
from lightning_nst.diffusion.prompts import PromptGrid
from lightning_nst.outputs import (
    ITEM_FILE,
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
        is not this folder's output, and is refused: :class:`~lightning_nst.core.files.OutputFolder`'s rule, with the
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
        if trainer.progress_bar_callback is not None:  # its last frame drawn now, so the Results line comes below it
            trainer.progress_bar_callback.teardown(trainer, pl_module, stage)
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
