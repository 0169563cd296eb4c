"""Using a trained fast style network: load its checkpoint, stylize images, lists, folders and videos, export it.

:func:`load_network` reads the checkpoint contract of :mod:`~lightning_nst.nst.fast.networks` (the record under
:data:`~lightning_nst.nst.fast.networks.RECORD_KEY`, the ``network.`` weights of ``state_dict``) and refuses, in one
line naming the file, anything else: a missing file, a file that is no checkpoint, an image optimisation's checkpoint,
a record of another format. :class:`Stylizer` runs the network on images of any size (each comes back at its own
size) with the style settings of its kind; :func:`stylize_folder` writes a folder of results, each file once and
atomically, and a rerun finishes only what is missing. :func:`export_torchscript` writes a TorchScript file that
runs without this package.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from lightning_nst.core.color import combine_luminance, luminance, match_color
from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_input_file, check_output_dir, write_atomic
from lightning_nst.core.hardware import device_type, fast_bf16
from lightning_nst.core.images import encoded, image_format, load_image, resize_long_edge
from lightning_nst.nst.fast.networks import (
    RECORD_KEY,
    AdaINNet,
    FastNetworkRecord,
    NetworkKind,
    TransformerNet,
    adain,
    build_network,
)

__all__ = [
    "EXTRA_FILE",
    "IMAGE_SUFFIXES",
    "STYLE_SIZE",
    "FastNetwork",
    "FolderReport",
    "Precision",
    "Stylizer",
    "export_torchscript",
    "image_files",
    "load_network",
    "load_torchscript",
    "stylize_folder",
    "stylize_images",
    "stylize_video",
]

Precision = Literal["auto", "32", "bf16"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
"""The files a folder run reads (by suffix, case-insensitive; hidden files are skipped)."""
STYLE_SIZE = 512
"""Longest edge of an AdaIN style image by default (larger ones are reduced), as pytorch-AdaIN's ``--style_size``."""
EXTRA_FILE = "lightning_nst_network.json"
"""The extra file of an exported TorchScript network: its kind, record and how to call it."""
NETWORK_PREFIX = "network."
IMAGE_OPTIMIZATION_KEY = "lightning_nst"  # lightning_nst.nst.checkpoint.RESUME_KEY; nst.checkpoint imports Lightning


@dataclass
class FastNetwork:
    """A trained fast style network, ready for inference.

    Attributes:
        kind: ``"johnson"`` (one style, trained in) or ``"adain"`` (any style image at inference).
        module: The network, in eval mode with gradients off.
        record: The record its checkpoint keeps.
        path: The checkpoint it was read from, if any.
    """

    kind: NetworkKind
    module: nn.Module
    record: FastNetworkRecord
    path: Path | None = None

    @property
    def name(self) -> str:
        """The checkpoint's path, or the kind for a network not read from a file, for messages."""
        return str(self.path) if self.path is not None else f"the {self.kind} network"

    @property
    def takes_style(self) -> bool:
        """Whether the network stylizes with a style image given at inference (AdaIN)."""
        return self.kind == "adain"

    def describe(self) -> str:
        """The network in words, e.g. ``a Johnson network trained on painting.jpg``."""
        if self.kind == "johnson":
            return f"a Johnson network trained on {self.record.style or 'one style'}"
        return f"an AdaIN network with a {self.record.config.get('encoder_layer', 'relu4_1')} encoder"


def _refuse(key: str, path: Path, problem: str) -> NSTError:
    return NSTError(f"{key}: {path} {problem}")


def _read_checkpoint(path: Path, key: str, map_location: str | torch.device) -> Any:
    """``torch.load`` with ``weights_only=True``; a file it cannot read is refused naming it and saying why."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith(f"extra/{EXTRA_FILE}") for name in names):
            raise _refuse(key, path, "is an exported TorchScript network (lightning-nst export): load it with "
                          "load_torchscript; --network takes the .ckpt it was exported from")  # fmt: skip
        if any(name.endswith("constants.pkl") for name in names):
            raise _refuse(key, path, "is a TorchScript file, not a checkpoint of a fast style network")
    else:
        with path.open("rb") as stream:
            head = stream.read(2)
        if not head.startswith(b"\x80"):  # neither torch's zip format nor its legacy pickle (protocol 2+)
            raise _refuse(key, path, "is not a PyTorch checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on legacy formats: the refusal below says what matters
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise _refuse(key, path, "holds Python objects that a weights-only load refuses, so it is not a fast style "
                      "network checkpoint (tensors and plain values only)") from None  # fmt: skip
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _refuse(key, path, f"is not a PyTorch checkpoint ({first[:160]})") from None


def _what_it_is(checkpoint: dict[str, Any]) -> str:
    """A checkpoint without a fast network record, in words."""
    hyper = checkpoint.get("hyper_parameters")
    class_path = hyper.get("_class_path") if isinstance(hyper, dict) else None
    state = checkpoint.get("state_dict")
    if IMAGE_OPTIMIZATION_KEY in checkpoint or (isinstance(state, dict) and "images.0" in state):
        return "is the checkpoint of an image optimisation (`lightning-nst fit`/`stylize` without --network)"
    if isinstance(state, dict):
        of = f" of {class_path}" if isinstance(class_path, str) else ""
        return f"is a Lightning checkpoint{of} without a fast network record ({RECORD_KEY!r})"
    return "is not a Lightning checkpoint (no 'state_dict')"


def load_network(
    path: str | os.PathLike[str], key: str = "network", map_location: str | torch.device = "cpu"
) -> FastNetwork:
    """Read a fast style network's checkpoint (the contract of :mod:`~lightning_nst.nst.fast.networks`).

    The file is read with ``torch.load(weights_only=True)``: a checkpoint runs no code when it is loaded.

    Args:
        path: The ``.ckpt`` a fast network's training wrote.
        key: The flag or argument that named it, for errors.
        map_location: Where the weights are loaded.

    Raises:
        NSTError: In one line naming the file, if it is missing, not a checkpoint, the checkpoint of something else
            (an image optimisation's, say), a record of another format, or weights that do not fit the record's
            network or are not finite.
    """
    path = check_input_file(path, key, "checkpoint")
    checkpoint = _read_checkpoint(path, key, map_location)
    if not isinstance(checkpoint, dict):
        raise _refuse(key, path, f"holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    if RECORD_KEY not in checkpoint:
        raise _refuse(key, path, f"{_what_it_is(checkpoint)}; --network takes the checkpoint of a trained fast style "
                      "network (lightning-nst fit -c fast_style_train or adain_train)")  # fmt: skip
    record = FastNetworkRecord.from_dict(checkpoint[RECORD_KEY], f"{key}: {path}")
    state = checkpoint.get("state_dict")
    weights = {
        name.removeprefix(NETWORK_PREFIX): value
        for name, value in (state.items() if isinstance(state, dict) else ())
        if isinstance(name, str) and name.startswith(NETWORK_PREFIX)
    }
    if not weights:
        raise _refuse(key, path, f"has a {record.kind} network record but no {NETWORK_PREFIX!r} weights in state_dict")
    if not isinstance(record.config, dict):
        raise _refuse(key, path, f"has a record whose config is not a mapping ({record.config!r})")
    try:
        module = build_network(record)
    except TypeError as error:
        raise _refuse(key, path, f"has a {record.kind} record whose config does not build it: {error}") from None
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise _refuse(
            key, path, f"holds weights that do not fit its record's {record.kind} network: {detail[:240]}"
        ) from None
    bad = [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise _refuse(key, path, f"holds non-finite weights ({bad[0]}); the training diverged before this checkpoint")
    module.eval().requires_grad_(False)
    return FastNetwork(record.kind, module, record, path)


def _as_network(network: FastNetwork | str | os.PathLike[str], key: str = "network") -> FastNetwork:
    return network if isinstance(network, FastNetwork) else load_network(network, key)


# -- running the network ---------------------------------------------------------------------------------------------

ImageLike = str | os.PathLike[str] | Tensor | Image.Image


def _to_tensor(image: ImageLike, size: int | None, key: str) -> Tensor:
    """A ``(1, 3, H, W)`` float tensor in ``[0, 1]`` from a source, a tensor or a PIL image, long edge ``size``."""
    if isinstance(image, Tensor):
        tensor = image if image.ndim == 4 else image.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise NSTError(f"{key}: expected an RGB image tensor (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        return resize_long_edge(tensor.float(), size)
    if isinstance(image, Image.Image):
        import torchvision.transforms.v2.functional as TF

        tensor = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True).unsqueeze(0)
        return resize_long_edge(tensor, size)
    return load_image(image, size, key=key)


def _as_list(images: ImageLike | Sequence[ImageLike] | None) -> list[ImageLike]:
    if images is None:
        return []
    if isinstance(images, str | os.PathLike | Image.Image) or (isinstance(images, Tensor) and images.ndim < 4):
        return [images]
    return list(images)


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and 0 <= alpha <= 1):
        raise NSTError(f"--alpha: must be a number in [0, 1] (got {alpha})")
    return float(alpha)


def _precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision``: ``auto`` is bf16 where the device computes it natively (:func:`fast_bf16`).

    As the optimisation's ``bf16-mixed``: the convolutions run in bfloat16 and the network's output is cast back to
    float32 before it is clamped, quantised to 8 bits and checked to be finite.
    """
    if precision not in ("auto", "32", "bf16"):
        raise NSTError(f"--precision: must be auto, 32 or bf16 (got {precision})")
    if precision == "bf16" or (precision == "auto" and fast_bf16(device)):
        return torch.bfloat16
    return None


class Stylizer:
    """A fast network with its style settings: call it on ``(B, 3, H, W)`` images to stylize them.

    The images come back at their own size (the networks pad to their stride and crop back), as float32 on the CPU.

    For an AdaIN network, ``style`` is one style image or several, mixed by ``style_weights`` (equal by default): their
    feature means and standard deviations are interpolated, as the paper's Fig. 8; ``alpha`` in ``[0, 1]`` trades the
    content's features (0) for the style's (1). The style statistics are computed once, so a folder's images share
    them. ``preserve_color`` for AdaIN matches the style images' colours to each content image's first
    (:func:`~lightning_nst.core.color.match_color`), the AdaIN paper's colour control (Sec. 7.2); for a Johnson
    network, whose style is trained in, it keeps the content's chroma and takes the result's luminance
    (:func:`~lightning_nst.core.color.combine_luminance`, Gatys et al. 2016's luminance-only transfer, applied to the
    output).

    A Johnson network is refused a style image, ``alpha`` or ``style_weights``, and an AdaIN network is refused
    without a style image, naming the checkpoint: neither would do what was asked.

    Args:
        network: The network, or the path of its checkpoint.
        style: AdaIN's style image(s): paths, ``sample:NAME``, tensors or PIL images.
        alpha: AdaIN's content-style trade-off (1 by default).
        style_weights: AdaIN's weight of each style image.
        preserve_color: Keep the content's colours (see above).
        style_size: Longest edge of the style images: larger ones are reduced to it (smaller ones are not enlarged,
            which would only blur them); ``None`` keeps their size.
        device: ``auto`` (CUDA where available, else the CPU), ``cpu``, ``cuda``, ...
        precision: ``auto`` (bf16 autocast where the device computes bfloat16 natively, else float32), ``32`` or
            ``bf16``.
    """

    def __init__(
        self,
        network: FastNetwork | str | os.PathLike[str],
        style: ImageLike | Sequence[ImageLike] | None = None,
        *,
        alpha: float | None = None,
        style_weights: Sequence[float] | None = None,
        preserve_color: bool = False,
        style_size: int | None = STYLE_SIZE,
        device: str | torch.device = "auto",
        precision: Precision = "auto",
    ) -> None:
        self.network = _as_network(network)
        styles = _as_list(style)
        name = self.network.name
        if not self.network.takes_style:
            for given, flag in ((styles, "style image"), (alpha, "--alpha"), (style_weights, "--style-weights")):
                if given is not None and given != []:
                    what = "takes no style image" if flag == "style image" else f"takes no {flag} (AdaIN only)"
                    raise NSTError(f"network: {name} is {self.network.describe()}; it {what}")
        elif not styles:
            raise NSTError(f"network: {name} is an AdaIN network; it needs a style image (stylize CONTENT STYLE "
                           "--network CKPT)")  # fmt: skip
        if style_size is not None and style_size < 1:
            raise NSTError(f"--style-size: must be an integer > 0 (got {style_size})")
        self.alpha = _check_alpha(1.0 if alpha is None else alpha)
        if style_weights is not None:
            from lightning_nst.core.losses import check_style_weights

            style_weights = check_style_weights(style_weights, len(styles), "--style-weights")
        self.weights = list(style_weights) if style_weights is not None else [1.0] * len(styles)
        self.preserve_color = preserve_color
        self.device = torch.device(device_type(device))
        self.autocast = _precision_dtype(precision, self.device)
        self.network.module.to(self.device)
        self.styles = [_to_tensor(image, None, f"style[{index}]") for index, image in enumerate(styles)]
        if style_size is not None:
            self.styles = [resize_long_edge(image, min(style_size, max(image.shape[-2:]))) for image in self.styles]
        self._statistics = None if preserve_color or not styles else self._style_statistics(self.styles)

    def _context(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @torch.no_grad()
    def _style_statistics(self, styles: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The weighted mean of the styles' AdaIN statistics ``(1, C)`` each."""
        module = self.network.module
        assert isinstance(module, AdaINNet)
        total = sum(self.weights)
        means, stds = [], []
        with self._context():
            for style in styles:
                mean, std = module.style_statistics(style.to(self.device))
                means.append(mean.float())
                stds.append(std.float())
        mean = sum(weight / total * item for weight, item in zip(self.weights, means, strict=True))
        std = sum(weight / total * item for weight, item in zip(self.weights, stds, strict=True))
        return mean, std  # type: ignore[return-value]

    @torch.no_grad()
    def _adain(self, content: Tensor, statistics: tuple[Tensor, Tensor]) -> Tensor:
        module = self.network.module
        assert isinstance(module, AdaINNet)
        with self._context():
            return module.stylize_with_statistics(content, *statistics, alpha=self.alpha)

    @torch.no_grad()
    def __call__(self, content: Tensor) -> Tensor:
        """Stylize ``(B, 3, H, W)`` (or ``(3, H, W)``) images in ``[0, 1]``; float32 on the CPU, the input's size."""
        content = _to_tensor(content, None, "content").to(self.device)
        # Only the networks run under autocast; the colour transforms stay in float32 (match_color in float64).
        if not self.network.takes_style:
            with self._context():
                out = self.network.module(content).float()
            if self.preserve_color:
                out = combine_luminance(luminance(out), content)
        elif self._statistics is not None:
            out = self._adain(content, self._statistics)
        else:  # the styles' colours matched to each content image's
            outs = []
            for image in content.split(1):
                matched = [match_color(style.to(self.device), image).clamp(0, 1) for style in self.styles]
                outs.append(self._adain(image, self._style_statistics(matched)))
            out = torch.cat(outs)
        return out.float().cpu()


def stylize_images(
    network: FastNetwork | str | os.PathLike[str],
    content: ImageLike | Sequence[ImageLike],
    style: ImageLike | Sequence[ImageLike] | None = None,
    *,
    size: int | None = None,
    **settings: Any,
) -> list[Tensor]:
    """Stylize one image or a list (paths, ``sample:NAME``, tensors or PIL images), one at a time.

    Args:
        network: The network or its checkpoint.
        content: The image(s).
        style: AdaIN's style image(s) (see :class:`Stylizer`, which takes the other ``settings``).
        size: Long edge the content images are resized to; ``None`` keeps their size.
        **settings: :class:`Stylizer`'s keyword arguments.

    Returns:
        One ``(1, 3, H, W)`` float32 image in ``[0, 1]`` per content image.

    Raises:
        NSTError: If a result is not finite (the network's weights or input overflowed).
    """
    if size is not None and size < 1:
        raise NSTError(f"--size: must be an integer > 0 (got {size})")
    stylizer = Stylizer(network, style, **settings)
    items = _as_list(content)
    results = []
    for index, item in enumerate(items):
        out = stylizer(_to_tensor(item, size, f"content[{index}]"))
        if not torch.isfinite(out).all():
            raise NSTError(f"content[{index}]: the network's result is not finite; nothing is returned for it")
        results.append(out)
    return results


# -- folders ---------------------------------------------------------------------------------------------------------


def image_files(folder: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None) -> list[Path]:
    """The image files under ``folder`` (recursive, :data:`IMAGE_SUFFIXES`, no hidden files), sorted.

    ``exclude`` is a folder left out (the output folder, when it lies inside the input folder).
    """
    root = Path(folder)
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for directory, folders, files in os.walk(root):
        here = Path(directory)
        folders[:] = sorted(f for f in folders if not f.startswith(".") and (here / f).resolve() != skip)
        found += [here / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


@dataclass
class FolderReport:
    """What a folder run did.

    Attributes:
        written: The files written.
        existing: How many results existed already and were kept (a rerun finishes only what is missing).
        unreadable: The inputs that could not be read, each with why.
        non_finite: The inputs whose result was not finite, so not saved.
        total: How many images the folder holds.
    """

    written: list[Path] = field(default_factory=list)
    existing: int = 0
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    non_finite: list[Path] = field(default_factory=list)
    total: int = 0

    @property
    def failed(self) -> bool:
        """Whether the folder holds no result after the run: nothing written, nothing there before."""
        return not self.written and not self.existing

    def summary(self, output: str | os.PathLike[str]) -> str:
        """One line: written, kept and skipped counts."""
        parts = [f"wrote {len(self.written)} of {self.total} images to {output}"]
        if self.existing:
            parts.append(f"{self.existing} existed already and were kept (--overwrite replaces them)")
        if self.unreadable:
            first, why = self.unreadable[0]
            parts.append(f"{len(self.unreadable)} unreadable skipped (first: {first}: {why})")
        if self.non_finite:
            parts.append(f"{len(self.non_finite)} with a non-finite result not saved (first: {self.non_finite[0]})")
        return "; ".join(parts)


def _folder_plan(source: Path, output: Path, suffix: str) -> list[tuple[Path, Path]]:
    """Each input with its output: the same relative path under ``output`` with ``suffix``; refuse clashes."""
    inputs = image_files(source, exclude=output)
    if not inputs:
        raise NSTError(f"content: {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    plan: dict[Path, Path] = {}
    for path in inputs:
        target = output / path.relative_to(source).with_suffix(suffix)
        if target in plan:
            raise NSTError(f"content: {plan[target]} and {path} would both be written as {target}; rename one")
        plan[target] = path
    return [(path, target) for target, path in plan.items()]


def _encode(image: Tensor, target: Path) -> bytes:
    return encoded(image, target, "-o")


def stylize_folder(
    network: FastNetwork | str | os.PathLike[str],
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    style: ImageLike | Sequence[ImageLike] | None = None,
    *,
    suffix: str = ".png",
    size: int | None = None,
    batch_size: int = 1,
    overwrite: bool = False,
    progress: Callable[[Path], None] | None = None,
    **settings: Any,
) -> FolderReport:
    """Stylize every image under ``source`` into ``output``, at the same relative paths with ``suffix``.

    Each result is written once, atomically (:func:`~lightning_nst.core.files.write_atomic`); a result that exists
    already is kept and counted, unless ``overwrite``, so a rerun finishes only what is missing. An unreadable input
    is skipped and counted, and a non-finite result is never saved. Consecutive images of one size go through the
    network ``batch_size`` at a time; the networks treat each image of a batch alone (instance normalisation), so the
    results are those of one at a time.

    Args:
        network: The network or its checkpoint.
        source: The input folder (searched recursively).
        output: The output folder.
        style: AdaIN's style image(s).
        suffix: The results' file type (``.png``, ``.jpg``, ``.webp``, ...).
        size: Long edge the images are resized to; ``None`` keeps their size.
        batch_size: Images per forward pass.
        overwrite: Replace existing results.
        progress: Called with each file written.
        **settings: :class:`Stylizer`'s keyword arguments.
    """
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if not suffix.startswith("."):
        suffix = f".{suffix}"
    image_format(f"x{suffix}", "--suffix")
    if batch_size < 1:
        raise NSTError(f"--batch-size: must be an integer > 0 (got {batch_size})")
    if size is not None and size < 1:
        raise NSTError(f"--size: must be an integer > 0 (got {size})")
    if output.exists() and not output.is_dir():
        raise NSTError(f"-o: {output} is a file; a folder of images is written into a folder")
    plan = _folder_plan(source, output, suffix)
    check_output_dir(output, "-o")
    report = FolderReport(total=len(plan))
    todo = []
    for path, target in plan:
        if target.exists() and not overwrite:
            report.existing += 1
        else:
            todo.append((path, target))
    if not todo:
        return report
    stylizer = Stylizer(network, style, **settings)
    batch: list[tuple[Path, Path, Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        results = stylizer(torch.cat([image for _, _, image in batch]))
        for (path, target, _), result in zip(batch, results.split(1), strict=True):
            if not torch.isfinite(result).all():
                report.non_finite.append(path)
                continue
            write_atomic(target, _encode(result, target), overwrite=overwrite)
            report.written.append(target)
            if progress is not None:
                progress(target)
        batch.clear()

    for path, target in todo:
        try:
            image = load_image(path, size, key="content")
        except NSTError as error:
            report.unreadable.append((path, str(error).split(": ", 1)[-1]))
            continue
        if batch and (len(batch) >= batch_size or batch[0][2].shape != image.shape):
            flush()
        batch.append((path, target, image))
    flush()
    return report


# -- video -----------------------------------------------------------------------------------------------------------


def stylize_video(
    network: FastNetwork | str | os.PathLike[str],
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    style: ImageLike | Sequence[ImageLike] | None = None,
    *,
    size: int | None = None,
    overwrite: bool = False,
    **settings: Any,
) -> int:
    """Stylize each frame of a video file into ``output``, at the input's frame rate (needs PyAV: the ``video`` extra).

    The result is H.264 (libx264, else MPEG-4 Part 2) in the container ``output``'s suffix names, in yuv420p, whose
    sides must be even: an odd side loses its last pixel. The audio is not copied. The file is written under a
    temporary name and renamed when complete; an existing ``output`` is kept unless ``overwrite``.

    Returns:
        The number of frames written.
    """
    try:
        import av
    except ImportError:
        raise NSTError("video: reading and writing video needs PyAV: pip install lightning-nst[video]") from None
    source = check_input_file(source, "content", "video file")
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise NSTError(f"-o: {output} exists; pass --overwrite to replace it")
    check_output_dir(output.parent, "-o")
    stylizer = Stylizer(network, style, **settings)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=output.suffix, dir=output.parent)
    os.close(handle)
    frames = 0
    try:
        with av.open(str(source)) as reader, av.open(temporary, "w", format=_container(output)) as writer:
            stream = reader.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 25
            encoder = None
            for frame in reader.decode(stream):
                image = _to_tensor(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1) / 255.0,
                                   size, "content")  # fmt: skip
                result = stylizer(image)
                if not torch.isfinite(result).all():
                    raise NSTError(f"content: frame {frames} of {source} gave a non-finite result; no video written")
                height, width = (side - side % 2 for side in result.shape[-2:])
                if encoder is None:
                    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                    encoder = writer.add_stream(codec, rate=rate)
                    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
                pixels = result[0, :, :height, :width].mul(255).round().clamp(0, 255).to(torch.uint8)
                video_frame = av.VideoFrame.from_ndarray(pixels.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
                writer.mux(encoder.encode(video_frame))
                frames += 1
            if encoder is None:
                raise NSTError(f"content: {source} holds no video frames")
            writer.mux(encoder.encode(None))
        if output.exists() and not overwrite:
            raise NSTError(f"-o: {output} appeared while the video was written; it is kept")
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return frames


def _container(output: Path) -> str:
    formats = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}
    if output.suffix.lower() not in formats:
        raise NSTError(f"-o: {output}: unknown video file extension {output.suffix!r} (use .mp4)")
    return formats[output.suffix.lower()]


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")
"""Inputs ``stylize --network`` treats as video files."""


# -- TorchScript export ----------------------------------------------------------------------------------------------


def _pad(image: Tensor, multiple: int) -> Tensor:
    """``networks._pad_to_multiple`` for TorchScript, so a traced network pads inputs of any size.

    It always returns a new tensor (a padding of 0 copies), so the tracer never takes the padded input for the input.
    """
    height, width = image.shape[-2], image.shape[-1]
    pad_h, pad_w = (multiple - height % multiple) % multiple, (multiple - width % multiple) % multiple
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return torch.nn.functional.pad(image, [0, pad_w, 0, pad_h], mode=mode)


def _crop_like(image: Tensor, like: Tensor) -> Tensor:
    return image[:, :, : like.shape[-2], : like.shape[-1]]


def _scripted() -> tuple[Any, Any]:
    """:func:`_pad` and :func:`_crop_like` compiled, so that tracing records their size arithmetic, not its result."""
    return torch.jit.script(_pad), torch.jit.script(_crop_like)


class _JohnsonExport(nn.Module):
    """TransformerNet.forward with the padding and cropping in TorchScript, for tracing."""

    def __init__(self, net: TransformerNet) -> None:
        super().__init__()
        self.net = net
        self.pad, self.crop_like = _scripted()

    def forward(self, image: Tensor) -> Tensor:
        out = self.net.decoder(self.net.residuals(self.net.encoder(self.pad(image, 4))))
        return (torch.tanh(self.crop_like(out, image)) + 1) / 2


class _AdaINExport(nn.Module):
    """AdaINNet.forward as ``(content, style, alpha, style_weights)`` tensors, padding in TorchScript, for tracing."""

    def __init__(self, net: AdaINNet) -> None:
        super().__init__()
        from lightning_nst.core.layers import min_input_size

        self.net = net
        self.multiple = min_input_size([net.encoder_layer])
        self.pad, self.crop_like = _scripted()

    def forward(self, content: Tensor, style: Tensor, alpha: Tensor, style_weights: Tensor) -> Tensor:
        layer = self.net.encoder_layer
        features = self.net.encode(self.pad(content, self.multiple))[layer].float()
        flat = self.net.encode(style)[layer].float().flatten(2)
        weights = (style_weights / style_weights.sum())[:, None]
        mean = (weights * flat.mean(dim=2)).sum(0, keepdim=True)
        std = (weights * (flat.var(dim=2, unbiased=False) + 1e-5).sqrt()).sum(0, keepdim=True)
        target = alpha * adain(features, mean, std) + (1 - alpha) * features
        return self.crop_like(self.net.decoder(target), content).clamp(0, 1)


@contextlib.contextmanager
def _torchscript() -> Iterator[None]:
    # torch deprecates TorchScript for torch.export, whose programs need their dynamic sizes declared and a runtime of
    # the same torch; a TorchScript file still loads in any recent torch and in C++ (libtorch), which is what an
    # export is for here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\..* is deprecated")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the padding is scripted; the rest has no branches
        yield


def _export_module(network: FastNetwork) -> tuple[torch.jit.ScriptModule, tuple[Tensor, ...], str]:
    """The traced network, an example input of another size than the tracing one, and how to call it."""
    generator = torch.Generator().manual_seed(0)
    module = network.module.cpu().float()
    if isinstance(module, TransformerNet):
        with _torchscript():
            wrapper: nn.Module = _JohnsonExport(module)
        trace_input: tuple[Tensor, ...] = (torch.rand(1, 3, 64, 64, generator=generator),)
        check_input: tuple[Tensor, ...] = (torch.rand(1, 3, 37, 53, generator=generator),)
        call = "module(content) with content (B, 3, H, W) RGB in [0, 1], any size; returns (B, 3, H, W) in [0, 1]"
    else:
        assert isinstance(module, AdaINNet)
        with _torchscript():
            wrapper = _AdaINExport(module)
        trace_input = (torch.rand(1, 3, 64, 64, generator=generator), torch.rand(1, 3, 48, 48, generator=generator),
                       torch.tensor(1.0), torch.ones(1))  # fmt: skip
        check_input = (torch.rand(2, 3, 45, 70, generator=generator), torch.rand(2, 3, 40, 56, generator=generator),
                       torch.tensor(0.7), torch.tensor([0.3, 0.7]))  # fmt: skip
        call = (
            "module(content, style, alpha, style_weights) with content (B, 3, H, W) and style (S, 3, h, w) RGB in "
            "[0, 1] of any size, alpha a 0-d tensor in [0, 1] and style_weights an (S,) tensor mixing the styles' "
            "statistics; returns (B, 3, H, W) in [0, 1]"
        )
    wrapper.eval()
    with torch.no_grad(), _torchscript():
        traced = torch.jit.trace(wrapper, trace_input, check_trace=False)
    return traced, check_input, call


def export_torchscript(
    checkpoint: FastNetwork | str | os.PathLike[str], output: str | os.PathLike[str], *, tolerance: float = 1e-5
) -> Path:
    """Write the network as a TorchScript file that runs on any image size without this package.

    The network is traced with its padding and cropping in TorchScript, so inputs of other sizes than the tracing
    one are padded and cropped as the checkpoint's network does them; before the file is written, its output on an
    input of another size is compared with the network's (within ``tolerance``). The file's extra file
    :data:`EXTRA_FILE` holds the kind, the record and how to call it (:func:`load_torchscript` reads it).

    Args:
        checkpoint: The network or its checkpoint.
        output: The file to write (``.pt``); an existing file is refused.
        tolerance: Largest absolute difference allowed between the export's output and the network's.

    Raises:
        NSTError: If ``output`` exists, or the export does not reproduce the network.
    """
    output = Path(output).expanduser()
    if not str(output).strip() or output.is_dir():
        raise NSTError(f"-o: {output} is not a file name; name the TorchScript file to write, e.g. -o model.pt")
    if output.exists():
        raise NSTError(f"-o: {output} exists; an export never replaces a file, so remove it or name another")
    check_output_dir(output.parent, "-o")
    network = _as_network(checkpoint, "checkpoint")
    traced, check_input, call = _export_module(network)
    with torch.no_grad():
        expected = (network.module(*check_input[:2], float(check_input[2]), check_input[3].tolist())
                    if network.kind == "adain" else network.module(*check_input))  # fmt: skip
        got = traced(*check_input)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=tolerance):
        difference = (got - expected).abs().max().item() if got.shape == expected.shape else math.inf
        raise NSTError(f"checkpoint: {network.name}: the traced network differs from it by {difference:.3g} on a "
                       f"{tuple(check_input[0].shape[-2:])} input; not exported")  # fmt: skip
    extra = {"kind": network.kind, "record": network.record.to_dict(), "call": call,
             "checkpoint": network.path.name if network.path is not None else None}  # fmt: skip
    buffer = io.BytesIO()
    with _torchscript():
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(extra)})
    return write_atomic(output, buffer.getvalue(), overwrite=False)


def load_torchscript(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """An exported network (:func:`export_torchscript`) and its :data:`EXTRA_FILE` (``kind``, ``record``, ``call``)."""
    path = check_input_file(path, "network", "TorchScript file")
    files = {EXTRA_FILE: ""}
    try:
        with _torchscript():
            module = torch.jit.load(str(path), map_location=map_location, _extra_files=files)
    except (RuntimeError, ValueError) as error:
        raise NSTError(f"network: {path} is not a TorchScript file ({str(error).splitlines()[0][:160]})") from None
    if not files[EXTRA_FILE]:
        raise NSTError(f"network: {path} is a TorchScript file without {EXTRA_FILE}: not exported by lightning-nst")
    return module, json.loads(files[EXTRA_FILE])
