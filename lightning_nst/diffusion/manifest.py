"""An output folder of generated items: the manifest that records them, the part files of running processes, the PNGs.

:class:`GenerationFolder` reads a folder to tell which items an earlier run finished (refusing files it did not
write), and writes its records: :class:`~lightning_nst.diffusion.prompts.PromptGrid` reads it to know what is left to
generate, :class:`~lightning_nst.GenerationWriter` writes into it.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import OutputFolder, file_digest, write_atomic
from lightning_nst.outputs import ITEM_FILE, check_format


class GenerationFolder:
    """The records of one output folder: ``manifest`` and the hidden part files, over the PNGs of the items.

    Args:
        directory: The output folder.
        manifest: File name of the manifest inside it.
        names: The PNG file name of each item, by index.
        fingerprints: Each item's fingerprint, by index: a record of another fingerprint was made from other settings.
    """

    def __init__(
        self, directory: Path, manifest: str, names: Mapping[int, str], fingerprints: Mapping[int, str]
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.names = dict(names)
        self.fingerprints = dict(fingerprints)
        # write_atomic's temporary files: ".<name>.<random>.tmp"
        self._temporary = re.compile(rf"\.({ITEM_FILE.pattern}|{re.escape(manifest)})\..+\.tmp")

    def refusal(self, problem: str) -> NSTError:
        """The error refusing this folder because it ``problem``."""
        return NSTError(
            f"GenerationWriter.output_dir: {self.directory} {problem}; choose another folder or set overwrite: true"
        )

    def part(self, rank: int) -> Path:
        """The part file process ``rank`` appends its records to."""
        return self.directory / f".{self.manifest}.rank{rank}.part"

    def parts(self) -> list[Path]:
        """The part files in the folder."""
        return sorted(self.directory.glob(f".{glob.escape(self.manifest)}.rank*.part"))

    def records(self, path: Path, strict: bool) -> Iterator[tuple[int, dict[str, Any], str]]:
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
                check_format(record, f"{path} line {number}")  # a newer version's folder is not continued
                yield index, record, line
            elif strict:
                raise self.refusal(f"holds {path.name}, whose line {number} is not a record of this writer")

    def check_record(self, index: int, record: dict[str, Any]) -> None:
        """Raise unless ``record`` is one of the current items, made from the current settings."""
        if index not in self.names:
            count = len(self.names)
            raise self.refusal(f"holds item {index}, but the data defines only {count} item{'s' * (count != 1)}")
        image = record.get("image")
        if record.get("fingerprint") != self.fingerprints[index] or image != self.names[index]:
            shown = f" ({image})" if isinstance(image, str) and ITEM_FILE.fullmatch(image) else ""
            raise self.refusal(
                f"holds item {index}{shown} made from a different prompt, seed, style or sampler setting than now"
            )

    def finished(self) -> dict[int, str]:
        """Manifest lines of the finished items by index; raises where the folder holds a file that is not its own.

        An item is finished when a record holds it and its PNG has the recorded ``sha256``; a recorded item without
        its PNG is not. Any other PNG of an item's name (no record holds it, or its bytes are not the recorded ones)
        is not this folder's output, and is refused: :class:`~lightning_nst.core.files.OutputFolder`'s rule, with the
        manifest and the part files as the record.
        """
        manifest = self.directory / self.manifest
        if manifest.exists() and not manifest.is_file():
            raise NSTError(f"GenerationWriter.manifest: {manifest} exists and is not a file")
        sources = ([(manifest, True)] if manifest.is_file() else []) + [(part, False) for part in self.parts()]
        recorded: dict[str, set[str]] = {}
        lines: dict[int, list[tuple[str, str]]] = {}
        for path, strict in sources:
            for index, record, line in self.records(path, strict):
                self.check_record(index, record)
                digest = str(record.get("sha256"))
                recorded.setdefault(self.names[index], set()).add(digest)
                lines.setdefault(index, []).append((digest, line))
        folder = OutputFolder(self.directory, "GenerationWriter.output_dir")
        names = [self.names[index] for index in sorted(self.names)]
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
            path = self.directory / self.names[index]
            if path.is_file():  # not foreign: its bytes are those of one of its records
                digest = file_digest(path)
                finished[index] = next(line for recorded_digest, line in entries if recorded_digest == digest)
        return finished

    def tidy(self, finished: dict[int, str]) -> None:
        """Rank 0: make the manifest hold exactly the finished items; remove part and temporary files left over."""
        manifest = self.directory / self.manifest
        text = "".join(finished[index] + "\n" for index in sorted(finished))
        # Only files of this writer's own names are touched: the manifest, which holds nothing but its records (a
        # stranger line is refused by finished()), is rewritten, never removed; part and temporary files it made are.
        if manifest.is_file() and manifest.read_text(encoding="utf-8", errors="replace") != text:
            write_atomic(manifest, text.encode("utf-8"), overwrite=True)
        elif text and not manifest.is_file():
            write_atomic(manifest, text.encode("utf-8"))
        for part in self.parts():
            part.unlink()
        for temporary in self.directory.glob(".*.tmp"):
            if self._temporary.fullmatch(temporary.name):
                temporary.unlink(missing_ok=True)

    def merge(self, kept: int) -> int:
        """Rank 0: write the manifest from the finished and the new records; returns how many it holds."""
        manifest = self.directory / self.manifest
        parts = self.parts()
        records: dict[int, str] = {}
        for path in ([manifest] if manifest.is_file() else []) + parts:
            for index, record, line in self.records(path, strict=False):
                if index in records or index not in self.names:
                    continue
                image = self.directory / self.names[index]
                # The manifest holds the items setup found finished; a part's record is written before its PNG, which
                # a failed write or a kill may have left missing.
                if image.is_file() and (path == manifest or file_digest(image) == record.get("sha256")):
                    records[index] = line
        if parts:
            text = "".join(records[index] + "\n" for index in sorted(records))
            write_atomic(manifest, text.encode("utf-8"), overwrite=True)
            for part in parts:
                part.unlink()
        new = len(records) - kept
        kept = f", {kept} kept from an earlier run" if kept and new else ""
        if records:
            rank_zero_info(f"Results: {self.directory} ({len(records)} PNG{kept}, {self.manifest})")
        return len(records)
