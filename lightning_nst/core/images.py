"""Image I/O: files or embedded samples to ``[0, 1]`` float tensors and back."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.utils import make_grid

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_input_file, write_atomic

SHIPPED_PREFIX = "sample:"
"""``sample:NAME`` names a 256 px copy shipped in ``lightning_nst/samples`` (:data:`SHIPPED_SAMPLES`)."""
SKIMAGE_PREFIX = "skimage:"
"""``skimage:NAME`` names an image bundled in scikit-image at full size (:data:`SAMPLES`; the ``samples`` extra)."""
SAMPLE_PREFIXES = (SHIPPED_PREFIX, SKIMAGE_PREFIX)
"""Prefixes of sample sources, which are identified by name rather than by a file's digest."""

MIN_SIDE = 8
"""Smallest accepted side of a source image in pixels: below this an image holds no usable content or style."""

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
"""Copies of six scikit-image samples, 256 px on their long edge, and two masks, shipped with the package (provenance
in its README.md)."""

SHIPPED_SAMPLES: tuple[str, ...] = (
    "astronaut",
    "brick",
    "coffee",
    "grass",
    "gravel",
    "immunohistochemistry",
    "mask_left",
    "mask_right",
)
"""The samples in :data:`SAMPLES_DIR`, usable without scikit-image."""

# Bundled inside the scikit-image wheel, so they load offline once it is installed.
SAMPLES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "rocket",
)


def is_sample(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a sample image (``sample:NAME`` or ``skimage:NAME``) rather than a file."""
    return str(source).startswith(SAMPLE_PREFIXES)


def _shipped_file(name: str, key: str) -> Path:
    path = SAMPLES_DIR / f"{name}.jpg"
    if name not in SHIPPED_SAMPLES or not path.is_file():
        shipped = ", ".join(SHIPPED_PREFIX + sample for sample in SHIPPED_SAMPLES)
        raise NSTError(f"{key}: unknown sample '{SHIPPED_PREFIX}{name}'; the shipped ones are {shipped}")
    return path


def _skimage_data(name: str, key: str) -> object:
    """The ``skimage.data`` module for sample ``name``, or raise saying how to install it."""
    if name not in SAMPLES:
        raise NSTError(f"{key}: unknown sample '{SKIMAGE_PREFIX}{name}'; choose one of {', '.join(SAMPLES)}")
    try:
        import skimage.data
    except ImportError:
        shipped = ", ".join(SHIPPED_PREFIX + sample for sample in SHIPPED_SAMPLES)
        raise NSTError(
            f"{key}: the sample '{SKIMAGE_PREFIX}{name}' needs scikit-image: pip install lightning-nst[samples] "
            f"(shipped without it, as 256 px copies: {shipped})"
        ) from None
    return skimage.data


def _sample_image(source: str, key: str, max_side: int | None) -> Image.Image:
    if source.startswith(SHIPPED_PREFIX):
        return _decode(_shipped_file(source.removeprefix(SHIPPED_PREFIX), key), key, max_side)
    name = source.removeprefix(SKIMAGE_PREFIX)
    return Image.fromarray(getattr(_skimage_data(name, key), name)())


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, F, ...) to 8-bit RGB."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # PIL's convert("RGB") clips 16-bit and float data at 255 instead of rescaling it.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white rather than whatever colour the hidden pixels hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _decode(path: Path, key: str, max_side: int | None) -> Image.Image:
    with Image.open(path) as opened:
        width, height = opened.size
        if min(width, height) < MIN_SIDE:
            raise NSTError(f"{key}: {path} is {width}x{height} px; images need at least {MIN_SIDE} px per side")
        # A huge image is decoded at reduced scale (JPEG's DCT scaling, then PIL's box reduce) before it becomes a
        # float tensor, which would otherwise need 12 bytes per pixel.
        factor = max(width, height) // (2 * max_side) if max_side else 0
        if factor >= 2:
            opened.draft("RGB", (width // factor, height // factor))
        opened.load()
        image = ImageOps.exif_transpose(opened)
        factor = max(image.size) // (2 * max_side) if max_side else 0
        return image.reduce(factor) if factor >= 2 else image.copy()


def read_image(source: str | os.PathLike[str], *, key: str = "image", max_side: int | None = None) -> Tensor:
    """Read an image file or a sample as a ``(1, 3, H, W)`` float tensor in ``[0, 1]``.

    Args:
        source: A path, ``sample:NAME`` (:data:`SHIPPED_PREFIX`) or ``skimage:NAME`` (:data:`SKIMAGE_PREFIX`).
        key: The config key that named the source, used in error messages.
        max_side: The longer edge the caller will resize to, if known; much larger images are reduced while
            decoding, so a 20000 px photo costs little memory.

    Raises:
        NSTError: If the file is missing, not an image, cannot be decoded, is smaller than :data:`MIN_SIDE`, or
            is so large that PIL refuses it as a possible decompression bomb, or if a sample needs scikit-image
            and it is not installed.
    """
    text = str(source)
    if is_sample(text):
        image = _to_rgb(_sample_image(text, key, max_side))
    else:
        path = check_input_file(text, key, "image file")
        try:
            image = _to_rgb(_decode(path, key, max_side))
        except UnidentifiedImageError:
            raise NSTError(f"{key}: not an image file PIL can read: {path}") from None
        except Image.DecompressionBombError as error:
            raise NSTError(f"{key}: {path} is too large to decode safely ({error}); downscale it first") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise NSTError(f"{key}: cannot decode image {path}: {error}") from None
    return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True).unsqueeze(0)


def check_source(source: str | os.PathLike[str], key: str) -> None:
    """Raise unless ``source`` names a known sample or a regular file; nothing is decoded or opened."""
    text = str(source)
    if text.startswith(SHIPPED_PREFIX):
        _shipped_file(text.removeprefix(SHIPPED_PREFIX), key)
    elif text.startswith(SKIMAGE_PREFIX):
        _skimage_data(text.removeprefix(SKIMAGE_PREFIX), key)
    else:
        check_input_file(text, key, "image file")


def source_size(source: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(width, height)`` of an image source from its header alone, or ``None`` if it cannot be read."""
    text = str(source)
    try:
        if is_sample(text):
            return _sample_image(text, "image", None).size
        with Image.open(check_input_file(text, "image")) as opened:
            return opened.size
    except (NSTError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def resize_long_edge(image: Tensor, size: int | None) -> Tensor:
    """Resize so that the longer edge is ``size`` pixels, keeping the aspect ratio; ``None`` keeps the size."""
    if size is None:
        return image
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    shape = [max(1, round(height * scale)), max(1, round(width * scale))]
    return TF.resize(image, shape, antialias=True).clamp(0, 1)


def load_image(source: str | os.PathLike[str], size: int | None = None, *, key: str = "image") -> Tensor:
    """Read an image (see :func:`read_image`) and resize its longer edge to ``size``."""
    return resize_long_edge(read_image(source, key=key, max_side=size), size)


def to_uint8(image: Tensor) -> Tensor:
    """``[0, 1]`` floats as 8-bit levels, each rounded to the nearest (half to even), on the CPU.

    As diffusers' ``numpy_to_pil`` does; torchvision's ``to_pil_image`` truncates (``mul(255).byte()``), which puts
    about half of all values one level low.
    """
    return image.detach().float().clamp(0, 1).cpu().mul(255).round().to(torch.uint8)


def to_pil(image: Tensor) -> Image.Image:
    """Convert one ``(3, H, W)`` or ``(1, 3, H, W)`` tensor in ``[0, 1]`` to an 8-bit PIL image (:func:`to_uint8`)."""
    if image.ndim == 4:
        (image,) = image
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).contiguous().numpy())


def png_bytes(image: Tensor | Image.Image) -> bytes:
    """The PNG file of an image (a PIL image, or a ``(3, H, W)`` or ``(1, 3, H, W)`` tensor in ``[0, 1]``)."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def image_format(path: str | os.PathLike[str], key: str) -> str:
    """PIL's format name for the file ``path`` by its suffix (``PNG``, ``JPEG``, ...); raises naming ``key``."""
    suffix = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if suffix not in formats or formats[suffix] not in Image.SAVE:
        raise NSTError(f"{key}: {path}: unknown image file extension {Path(path).suffix!r} (use .png)")
    return formats[suffix]


def encoded(image: Tensor | Image.Image, path: str | os.PathLike[str], key: str) -> bytes:
    """The file of an image in the format ``path``'s suffix names (:func:`image_format`): PNG, JPEG, WebP, ..."""
    fmt = image_format(path, key)
    if fmt == "PNG":
        return png_bytes(image)
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    buffer = io.BytesIO()
    pil.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def save_image(image: Tensor | Image.Image, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a PNG atomically (temporary file, then rename); an existing file is kept unless ``overwrite``."""
    return write_atomic(path, png_bytes(image), overwrite=overwrite)


def labelled_grid(images: Tensor, labels: Sequence[str], *, nrow: int = 4, padding: int = 2) -> Image.Image:
    """Tile ``(N, 3, H, W)`` images with ``torchvision.utils.make_grid`` and write each label over its tile."""
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    nrow = max(1, min(nrow, len(images)))
    grid = to_pil(make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0))
    draw = ImageDraw.Draw(grid)
    height, width = images.shape[-2:]
    for index, label in enumerate(labels):
        x = padding + (index % nrow) * (width + padding)
        y = padding + (index // nrow) * (height + padding)
        box = draw.textbbox((x + 2, y + 2), label)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x + 2, y + 2), label, fill=(255, 255, 255))
    return grid
