"""The on-disk contract of a run: the files a fit and a generation write, and the records that describe them.

A fit's folder holds one PNG per objective, ``grid.png`` and ``summary.json`` (:class:`FitSummary`); a generation's
folder holds one PNG per item and ``predictions.jsonl`` (:class:`GenerationRecord`, one line per item). The names
and fields here are what a user's scripts read. Each record carries :data:`FORMAT`, the version of this contract: a
change that a reader of an earlier folder would misread comes with a new version, and a reader refuses a record of a
newer version than it knows, naming the file. Records from before the version was written read as version 0.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lightning_nst.core.errors import NSTError

FORMAT = 1
"""The version of the files and records described here (``"format"`` in ``summary.json`` and in each manifest line)."""


def check_format(record: Mapping[str, Any], where: str) -> None:
    """Refuse, naming ``where``, a record written in a newer format than this version of lightning_nst reads."""
    version = record.get("format", 0)
    if not isinstance(version, int) or version > FORMAT:
        raise NSTError(
            f"{where}: written in format {version!r} by a newer lightning_nst; this one reads format {FORMAT} and "
            "earlier (upgrade lightning_nst to read it)"
        )


# -- image optimisation results ---------------------------------------------------------------------------------------

GRID = "grid.png"
"""The labelled grid of every objective's result, in a fit's output folder."""
SUMMARY = "summary.json"
"""A fit's record of its settings, losses, metrics and input and output digests; see :class:`FitSummary`."""


def result_file(objective: str) -> str:
    """The result PNG of an objective, relative to the output folder."""
    return f"{objective}.png"


def step_file(objective: str, step: int) -> str:
    """The snapshot of an objective's image at ``step`` (``save_every``), relative to the output folder."""
    return f"steps/{objective}_{step:05d}.png"


def interrupted_file(objective: str) -> str:
    """The image an objective had when a signal stopped the run (SIGINT, SIGTERM), beside its checkpoint."""
    return f"{objective}.interrupted.png"


def last_good_file(objective: str) -> str:
    """The last finite image of an objective, kept when its loss became non-finite."""
    return f"{objective}.last_good.png"


@dataclass
class ObjectiveRecord:
    """One objective's entry of ``summary.json``.

    Attributes:
        sha256: SHA-256 of the result PNG.
        objective: The :class:`~lightning_nst.Objective` as a mapping.
        initial_loss: Loss terms at step 0 (empty for a run resumed after step 0 without them).
        final_loss: Loss terms of the image saved.
        best_step: Step of the image saved.
        best_loss: Total loss of the image saved.
        last_loss: Total loss of the last step's image.
        stopped_at_step: Step at which the objective's optimizer stopped moving the image, if it did.
        metrics: ``psnr``/``ssim`` against the content image, ``style_distance_<statistic>`` against the style.
        output: File name of the result PNG (:func:`result_file`).
    """

    sha256: str
    objective: dict[str, Any]
    initial_loss: dict[str, float]
    final_loss: dict[str, float]
    best_step: int
    best_loss: float
    last_loss: float
    stopped_at_step: int | None
    metrics: dict[str, float]
    output: str


@dataclass
class FitSummary:
    """The whole ``summary.json`` of a fit; keys and their order are those of the file.

    ``inputs`` holds the content digests that checkpoints also keep (:func:`source_digest`); ``images`` names the
    content and style images: ``{"content": {"path", "sha256"} or None, "style": [{"path", "sha256"}, ...]}``, with
    the absolute path and the SHA-256 of a file, or the source as given and ``None`` for an embedded sample.
    ``scales`` (coarse-to-fine runs only) lists each scale run: ``long_edge``, ``size`` ``[H, W]``, ``steps``,
    ``end_step`` and ``seconds``. ``result_file`` (with ``ImageWriter.output``, as ``stylize -o`` sets it) is the
    result's own image file: ``{"path", "sha256"}``. ``precision_source`` says where ``precision`` came from:
    ``auto`` (``trainer.precision`` unset, so ``lightning-nst`` chose it for the device), ``config`` (given in a config,
    on the command line or to the Trainer) or ``checkpoint`` (unset in a resumed fit: the checkpoint's); ``None`` in
    summaries written before it was recorded. ``format`` is the version of the record (:data:`FORMAT`).
    """

    vgg_weights: str
    pooling: str
    image_size: list[int]
    precision: str
    device: str
    steps: int
    resumed_at_step: int | None
    wall_time_s: float
    seconds_per_step: float
    seconds_per_step_after_first: float | None
    output_dir: str
    objectives: dict[str, ObjectiveRecord]
    grid: str
    grid_sha256: str
    inputs: dict[str, Any] | None
    images: dict[str, Any] | None = None
    scales: list[dict[str, Any]] | None = None
    result_file: dict[str, str] | None = None
    precision_source: str | None = None
    format: int = FORMAT

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> FitSummary:
        """Read ``folder/summary.json``."""
        path = Path(folder) / SUMMARY
        data = json.loads(path.read_text(encoding="utf-8"))
        check_format(data, str(path))
        data.setdefault("format", 0)
        objectives = {name: ObjectiveRecord(**record) for name, record in data.pop("objectives").items()}
        return cls(**data, objectives=objectives)


# -- generation results -----------------------------------------------------------------------------------------------

MANIFEST = "predictions.jsonl"
"""Default file name of a generation folder's manifest: one JSON line per finished item, in index order."""


def slugify(text: str, max_length: int = 40) -> str:
    """A file-name-safe slug of ``text``: ASCII letters and digits joined by ``-``, at most ``max_length`` long."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].strip("-") or "image"


ITEM_FILE = re.compile(r"\d{5,}_[a-z0-9-]+_\d+\.png")
"""What every :func:`item_file` name looks like."""


def item_file(index: int, prompt: str, seed: int) -> str:
    """The PNG of one generated item: unique by ``index``, readable by prompt slug and seed.

    The slug holds only ASCII letters, digits and ``-``, so no prompt can place a file outside the folder.
    """
    return f"{index:05d}_{slugify(prompt)}_{seed}.png"


PREVIEW_FILE = re.compile(r"(\d{5,})_x0_\d{3,}\.png")
"""What every :func:`preview_file` name looks like; the group is the item's index."""


def preview_file(index: int, step: int) -> str:
    r"""The preview of item ``index``'s clean prediction :math:`\hat x_0` at sampling step ``step``."""
    return f"{index:05d}_x0_{step:03d}.png"


@dataclass
class GenerationRecord:
    """One line of the manifest: what one finished item is and how it was made.

    Attributes:
        index: The item's number, which names its PNG.
        image: The PNG's path relative to the manifest (:func:`item_file`).
        sha256: SHA-256 of the PNG's bytes.
        fingerprint: Hash of everything that defines the image (see ``GenerationItem.fingerprint``).
        prompt: The text sent to the text encoder.
        base_prompt: The prompt as configured.
        style_prompt: Text appended to the prompt for the style image, or ``None``.
        negative_prompt: The negative prompt.
        seed: Seed of the initial latents.
        style: The style image source, or ``None``.
        style_digest: What identifies the style image's content, or ``None``.
        model: The pipeline's Hub id or folder.
        scheduler: The scheduler's class name.
        num_inference_steps: Sampling steps.
        cfg_scale: Classifier-free guidance scale.
        eta: DDIM's eta.
        size: ``[height, width]`` of the image.
        dtype: The UNet's dtype.
        guidance: The style-guidance options (``StyleGuidance.settings``) and ``vgg_dtype``, the dtype its VGG pass
            computed in (``model.guidance.vgg_precision``), or ``None`` without guidance.
        final_style_loss: Style loss of the written image, or ``None`` (no guidance, or not finite).
        style_loss: Style loss of each step's clean prediction (``None`` where not finite), or ``None``.
        timesteps: The scheduler's timestep of each step (a float for σ-space samplers whose timesteps are not whole).
        guided: Whether each step was corrected.
        nsfw: The safety checker's verdict, or ``None`` without one.
        seconds_per_step: Sampling time per step of the item's batch.
        rank: The process that generated the item.
        init_image: The image img2img started from (an absolute path for a file), or ``None`` for text-to-image.
        init_image_digest: What identifies the init image's content, or ``None``.
        strength: img2img's strength (``model.strength``), or ``None`` for text-to-image.
        model_evaluations: UNet calls made for the item's batch where they were more than its timesteps
            (``model.guidance.recurrence``), else ``None``.
        format: The version of the record (:data:`FORMAT`).

    The img2img keys and ``model_evaluations`` come last and are left out of a line where they are ``None``, which
    keeps the keys a text-to-image line always had.
    """

    index: int
    image: str
    sha256: str
    fingerprint: str
    prompt: str
    base_prompt: str
    style_prompt: str | None
    negative_prompt: str
    seed: int
    style: str | None
    style_digest: str | None
    model: str
    scheduler: str
    num_inference_steps: int
    cfg_scale: float
    eta: float
    size: list[int]
    dtype: str
    guidance: dict[str, Any] | None
    final_style_loss: float | None
    style_loss: list[float | None] | None
    timesteps: list[int | float]
    guided: list[bool]
    nsfw: bool | None
    seconds_per_step: float
    rank: int
    init_image: str | None = None
    init_image_digest: str | None = None
    strength: float | None = None
    model_evaluations: int | None = None
    format: int = FORMAT

    def to_json(self) -> str:
        """The manifest line, without its newline."""
        record = asdict(self)
        if self.init_image is None:
            for key in _IMG2IMG_KEYS:
                record.pop(key)
        if self.model_evaluations is None:
            record.pop("model_evaluations")
        return json.dumps(record)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: str = "a manifest line") -> GenerationRecord:
        """The record of a parsed manifest line; raises ``KeyError`` naming a missing key, ignores unknown ones.

        The img2img keys and ``model_evaluations`` may be missing: they are then ``None``; so may ``format``, in
        lines written before it was recorded (version 0). A line of a newer format raises :class:`NSTError`.
        """
        check_format(record, where)
        values = {
            field.name: record.get(field.name) if field.name in _OPTIONAL_KEYS else record[field.name]
            for field in fields(cls)
            if field.name != "format"
        }
        return cls(**values, format=record.get("format", 0))


_IMG2IMG_KEYS = ("init_image", "init_image_digest", "strength")
_OPTIONAL_KEYS = (*_IMG2IMG_KEYS, "model_evaluations")


def read_manifest(path: str | os.PathLike[str]) -> list[GenerationRecord]:
    """The records of a finished manifest, in file order (item order, as the writer leaves it)."""
    text = Path(path).read_text(encoding="utf-8")
    return [
        GenerationRecord.from_dict(json.loads(line), f"{path} line {number}")
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]
