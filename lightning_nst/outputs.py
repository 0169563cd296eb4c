"""Output folders and input identity: checks made before any heavy work, and content hashes of files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lightning_nst.errors import NSTError

MIN_FREE_BYTES = 64 * 2**20
"""Free space an output folder's disk must have before a run starts: enough for its images and checkpoints."""


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_digest(source: str | os.PathLike[str]) -> str:
    """What identifies an image source's content: the SHA-256 of a file, or the name of an embedded sample.

    A file edited in place gets a new digest, so results made from its old content are not mistaken for current.
    Samples (``sample:NAME`` shipped in this package, ``skimage:NAME`` in scikit-image) come with an installed
    package and are identified by name.
    """
    text = str(source)
    if text.startswith(("sample:", "skimage:")):  # images.SAMPLE_PREFIXES; outputs.py sits below images.py
        return text
    return file_digest(Path(text).expanduser())


def check_input_file(path: str | os.PathLike[str], key: str, what: str = "file") -> Path:
    """Return ``path`` if it is a regular file (or a link to one); else raise saying what it is instead.

    Only ``stat`` is used: a FIFO or device is never opened, since reading one could block forever.
    """
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise NSTError(f"{key}: {what} not found: {path}") from None
    except OSError as error:
        raise NSTError(f"{key}: cannot read {path}: {error.strerror or error}") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise NSTError(f"{key}: {path} is a folder, not a file")
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise NSTError(f"{key}: {path} is {kind}, not a regular file")


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_output_dir(path: str | os.PathLike[str], key: str, *, min_free: int = MIN_FREE_BYTES) -> Path:
    """Raise naming ``key`` unless ``path`` is, or can become, a writable folder on a disk with ``min_free`` bytes.

    Nothing is created: the nearest existing ancestor is probed with a temporary file that is removed at once, so a
    run that fails later leaves no folder behind. Probing, rather than ``os.access``, also catches read-only mounts
    and holds for root, for whom permission bits do not stop writes.
    """
    path = Path(path).expanduser()
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        what = "is not a folder" if ancestor == path else f"cannot be created: {ancestor} is not a folder"
        raise NSTError(f"{key}: {path} {what}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".lightning-nst-probe.", dir=ancestor)
    except OSError as error:
        reason = "it is read-only" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else error.strerror
        where = "" if ancestor == path else f" (in {ancestor})"
        raise NSTError(f"{key}: cannot write to {path}{where}: {reason}") from None
    os.close(handle)
    os.unlink(probe)
    free = shutil.disk_usage(ancestor).free
    if free < min_free:
        raise NSTError(
            f"{key}: the disk holding {path} has only {free / 2**20:.1f} MiB free; a run needs at least "
            f"{min_free / 2**20:.0f} MiB"
        )
    return path


def write_atomic(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` through a temporary file and a rename, so readers never see half a file.

    Raises:
        NSTError: If ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise NSTError(f"refusing to overwrite existing output {path}")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())  # the bytes reach the disk before the name does
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


FILES_RECORD = ".lightning-nst-files.jsonl"
"""The record of the files lightning_nst wrote into a folder: one JSON line ``{"file", "sha256"}`` per write."""


class OutputFolder:
    """A folder lightning_nst writes into, and the one rule for every file it writes there.

    A file is written where no file of its name exists, or where the existing file is one lightning_nst wrote into
    this folder: its current bytes are bytes a record of the folder holds for that name. Anything else, a file of the
    user's or one changed since it was written, is refused naming it, unless ``overwrite``. The record is
    :data:`FILES_RECORD`, to which :meth:`write` appends each file's digest before the file itself is written, so a
    file whose write a kill interrupted is still recognised as the folder's own; a batch of generated items passes
    its manifest's digests instead (:meth:`foreign`'s ``recorded``). Under several processes, each appends whole
    lines in single writes (``O_APPEND``), so their records do not mix.

    Args:
        directory: The folder (it need not exist yet).
        key: The config key or flag that names the folder, for errors.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str) -> None:
        self.directory = Path(directory)
        self.key = key

    def recorded(self) -> dict[str, set[str]]:
        """The digests :data:`FILES_RECORD` holds for each file name (relative to the folder)."""
        record = self.directory / FILES_RECORD
        if not record.is_file():
            return {}
        digests: dict[str, set[str]] = {}
        for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line a killed process left half-written
            if isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str):
                digests.setdefault(entry["file"], set()).add(entry["sha256"])
        return digests

    def foreign(self, names: Iterable[str], recorded: Mapping[str, Collection[str]] | None = None) -> list[str]:
        """The ``names`` that exist in the folder but are not files lightning_nst wrote there (see the class).

        Args:
            names: File names relative to the folder.
            recorded: The digests known for each name; by default those of :data:`FILES_RECORD`.
        """
        recorded = self.recorded() if recorded is None else recorded
        found = []
        for name in names:
            path = self.directory / name
            if not os.path.lexists(path):
                continue
            if path.is_symlink() or not path.is_file() or file_digest(path) not in recorded.get(name, ()):
                found.append(name)
        return found

    def refusal(self, names: Sequence[str], why: str = "", hint: str = "") -> NSTError:
        """The one-line error for the foreign files ``names``: the first named, the others counted."""
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        why = why or "is not a file lightning-nst wrote there"
        hint = hint or "move it away, or allow replacing it with overwrite"
        return NSTError(f"{self.key}: {self.directory / names[0]}{more} {why}; {hint}")

    def check(self, names: Iterable[str], *, overwrite: bool = False, hint: str = "") -> None:
        """Raise :meth:`refusal` unless every existing one of ``names`` is the folder's own (or ``overwrite``)."""
        if overwrite:
            return
        found = self.foreign(names)
        if found:
            raise self.refusal(found, hint=hint)

    def record(self, name: str, digest: str) -> None:
        """Append ``name`` with the ``digest`` of the bytes about to be written to :data:`FILES_RECORD`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"file": name, "sha256": digest}) + "\n").encode("utf-8")
        handle = os.open(self.directory / FILES_RECORD, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(handle, line)
            os.fsync(handle)
        finally:
            os.close(handle)

    def write(self, name: str, data: bytes, *, overwrite: bool = False, hint: str = "") -> Path:
        """Write ``data`` as ``name`` atomically, if the rule allows (see the class); record it first."""
        self.check([name], overwrite=overwrite, hint=hint)
        self.record(name, hashlib.sha256(data).hexdigest())
        return write_atomic(self.directory / name, data, overwrite=True)


def checkpoint_run_folder(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The run folder a checkpoint lies in as ``<run>/checkpoints/NAME.ckpt``, or ``None``.

    A run folder of lightning_nst or Lightning: it holds the run's ``config.yaml`` or ``hparams.yaml``.
    """
    path = Path(checkpoint).expanduser()
    folder = path.parent.parent
    if path.parent.name != "checkpoints":
        return None
    if not (folder / "config.yaml").is_file() and not (folder / "hparams.yaml").is_file():
        return None
    return folder


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
    result's own image file: ``{"path", "sha256"}``.
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

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> FitSummary:
        """Read ``folder/summary.json``."""
        data = json.loads((Path(folder) / SUMMARY).read_text(encoding="utf-8"))
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
        guidance: The style-guidance options (``StyleGuidance.settings``), or ``None`` without guidance.
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
    def from_dict(cls, record: Mapping[str, Any]) -> GenerationRecord:
        """The record of a parsed manifest line; raises ``KeyError`` naming a missing key, ignores unknown ones.

        The img2img keys and ``model_evaluations`` may be missing: they are then ``None``.
        """
        return cls(
            **{
                field.name: record.get(field.name) if field.name in _OPTIONAL_KEYS else record[field.name]
                for field in fields(cls)
            }
        )


_IMG2IMG_KEYS = ("init_image", "init_image_digest", "strength")
_OPTIONAL_KEYS = (*_IMG2IMG_KEYS, "model_evaluations")


def read_manifest(path: str | os.PathLike[str]) -> list[GenerationRecord]:
    """The records of a finished manifest, in file order (item order, as the writer leaves it)."""
    text = Path(path).read_text(encoding="utf-8")
    return [GenerationRecord.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]
