"""A frozen VGG19 trunk addressed by layer name, truncated after the deepest layer a run needs."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models import VGG19_Weights
from torchvision.models.vgg import cfgs, make_layers

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_input_file, file_digest
from lightning_nst.core.layers import (  # noqa: F401 - the layer table's names, imported from here too
    CONV_LAYERS,
    DEFAULT_STYLE_LAYERS,
    LAYER_GEOMETRY,
    LAYER_NAMES,
    check_layers,
    layer_index,
    min_input_size,
)
from lightning_nst.core.net import unreachable

WEIGHTS_ENV = "LIGHTNING_NST_VGG_WEIGHTS"
"""Environment variable naming a local weights file that ``weights: auto`` falls back to."""

Pooling = Literal["max", "avg"]


_IMAGENET = VGG19_Weights.IMAGENET1K_V1


def check_weight(value: float, key: str) -> None:
    """Raise naming ``key`` unless ``value`` is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise NSTError(f"{key}: must be a finite number >= 0, got {value!r}")


def layer_weights(layers: Sequence[str] | Mapping[str, float], key: str) -> dict[str, float]:
    """``{layer: weight}`` of a layer list (each ``1 / len(layers)``) or mapping; raises naming ``key`` if invalid.

    An empty list gives an empty mapping: whether a term may be empty is the caller's decision.
    """
    weights = dict(layers) if isinstance(layers, Mapping) else {layer: 1.0 / len(layers) for layer in layers}
    check_layers(weights, key)
    for layer, weight in weights.items():
        check_weight(weight, f"{key}.{layer}")
    return weights


def _kaiming_init(trunk: nn.Sequential) -> None:
    # make_layers leaves PyTorch's default init; torchvision.models.VGG applies this one in its constructor.
    for module in trunk:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)


def _load_problem(error: Exception) -> str:
    """Why ``torch.load`` failed, in one line (torch's own message is long and advises unsafe loading)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if "Unsupported global" in str(error):
        return "it holds Python objects besides tensors, which are not loaded for safety (weights_only)"
    return "the file is truncated or corrupt (not a complete torch.save file)"


def _read_state_dict(path: Path, key: str, *, mmap: bool = False) -> dict[str, Tensor]:
    """The VGG19 ``features`` tensors of a weights file; ``mmap`` maps them rather than reading them."""
    check_input_file(path, key, "weights file")
    if path.stat().st_size == 0:
        raise NSTError(f"{key}: {path} is empty (0 bytes); pass a state_dict saved with torch.save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise NSTError(f"{key}: cannot load {path} as a torch state_dict: {_load_problem(error)}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise NSTError(f"{key}: {path} is not a state_dict of tensors")
    # Accept the features' own state_dict ("0.weight") and a whole vgg19() state_dict ("features.0.weight").
    features = {
        name.removeprefix("features."): value for name, value in state.items() if not name.startswith("classifier.")
    }
    return features


def _check_architecture(state: Mapping[str, Tensor], reference: nn.Sequential, path: Path, key: str) -> list[int]:
    """Check each tensor against VGG19's shapes and return the conv indices the file covers."""
    expected = reference.state_dict()
    for name, value in state.items():
        if name not in expected:
            raise NSTError(f"{key}: {path} is not a VGG19 features state_dict: unexpected key {name!r}")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise NSTError(
                f"{key}: {path} is not a VGG19 features state_dict: {name!r} has shape {tuple(value.shape)}, "
                f"VGG19 needs {tuple(expected[name].shape)}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NSTError(f"{key}: the weights file holds non-finite values (NaN or inf) in {name!r}: {path}")
    return _covered_convs(state, reference)


def _covered_convs(state: Mapping[str, Tensor], reference: nn.Sequential) -> list[int]:
    """Indices of the convolutions, from the first on, whose weight and bias ``state`` holds."""
    conv_indices = [i for i, module in enumerate(reference) if isinstance(module, nn.Conv2d)]
    covered: list[int] = []
    for index in conv_indices:
        if f"{index}.weight" not in state or f"{index}.bias" not in state:
            break
        covered.append(index)
    return covered


def _not_covered(path: Path, available: Sequence[str], deepest: str, key: str) -> NSTError:
    return NSTError(
        f"{key}: {path} covers only layers {available[0]}..{available[-1]}, but {deepest} was requested; available "
        f"layers: {', '.join(available)} (or set fill_missing: true, --fill-missing for stylize, texture and "
        f"generate, for random weights beyond {available[-1]})"
    )


def check_weights_cover(weights: str | os.PathLike[str], layers: Iterable[str], fill_missing: bool, key: str) -> None:
    """Raise, before any trunk is built, if the weights file ``weights`` names covers too few of ``layers``.

    The tensors are memory-mapped, not read, so this costs next to nothing; ``auto`` is checked where it will take
    ``$LIGHTNING_NST_VGG_WEIGHTS``. A file of another architecture is named as such; an unusable one is left to
    :class:`VGG19Features`, which reads it whole.
    """
    choice = str(weights)
    if fill_missing or choice in ("random", "imagenet"):
        return
    if choice == "auto":
        fallback = os.environ.get(WEIGHTS_ENV)
        if not fallback or _imagenet_cache_path().is_file():
            return
        path, key = Path(fallback).expanduser(), WEIGHTS_ENV
    else:
        path, key = Path(choice).expanduser(), f"{key}.weights"
    try:
        features = _read_state_dict(path, key, mmap=True)
    except NSTError:  # not a usable file: the trunk names what is wrong with it when it loads
        return
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        reference = make_layers(cfgs["E"])
    covered = len(_check_architecture(features, reference, path, key))
    available = _covered_layers(list(range(covered)))
    deepest = max(layers, key=layer_index)
    if covered and layer_index(deepest) >= len(available):
        raise _not_covered(path, available, deepest, key)


def _covered_layers(covered: Sequence[int]) -> list[str]:
    """Layer names whose value depends only on the convolutions in ``covered``."""
    conv_indices = [layer_index(name) for name in CONV_LAYERS]
    limit = conv_indices[len(covered)] if len(covered) < len(conv_indices) else len(LAYER_NAMES)
    return list(LAYER_NAMES[:limit])


class VGG19Features(nn.Module):
    """VGG19 ``features`` truncated after the deepest requested layer, frozen, returning features by name.

    Inputs are RGB in ``[0, 1]``; ImageNet normalisation happens inside. ReLUs are not in-place, so a ``conv``
    output is not overwritten by the ReLU that follows it.

    Args:
        layers: Layer names to return, e.g. ``["relu1_1", "relu4_2"]``; see :data:`LAYER_NAMES`.
        weights: ``"imagenet"`` (torchvision ``VGG19_Weights.IMAGENET1K_V1`` through the torch hub cache),
            a path to a ``state_dict`` of ``vgg19().features`` (a partial file is fine for shallow layers),
            ``"random"`` (seeded), or ``"auto"``: ImageNet from the torch hub cache, else the file named by
            ``$LIGHTNING_NST_VGG_WEIGHTS`` (without trying to download), else ImageNet downloaded, else random
            with a warning.
        pooling: ``"max"`` as trained, or ``"avg"``, which Gatys et al. found gives smoother syntheses.
        seed: Seed for random weights.
        fill_missing: With a partial weights file, give the layers it does not cover seeded random weights instead
            of raising. The description in :attr:`weights_used` says so.
        key: Config key of these options, used in error messages.
        channels_last: Run the pass ``channels_last`` (``True``: on every device; ``"cuda"``: on CUDA only, NCHW
            elsewhere). cuDNN's and oneDNN's convolutions both run it faster, and the statistics read it without a
            copy.

    Attributes:
        weights_used: Which weights the trunk holds, in words, for logs and reports.
        pretrained_layers: The layers of the trunk whose values depend only on loaded (not random) weights.
    """

    def __init__(
        self,
        layers: Sequence[str],
        weights: str | os.PathLike[str] = "auto",
        pooling: Pooling = "max",
        seed: int = 0,
        fill_missing: bool = False,
        key: str = "vgg",
        channels_last: bool | Literal["cuda"] = True,
    ) -> None:
        super().__init__()
        if not layers:
            raise NSTError(f"{key}: no layers requested")
        self.layers = check_layers(layers, f"{key}.layers")
        if pooling not in ("max", "avg"):
            raise NSTError(f"{key}.pooling: must be 'max' or 'avg', got {pooling!r}")
        depth = max(layer_index(name) for name in self.layers) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = make_layers(cfgs["E"])
            _kaiming_init(full)
        state, self.weights_used = self._resolve_weights(weights, full, depth, seed, fill_missing, key)
        full.load_state_dict(state, strict=False)
        self.pretrained_layers: tuple[str, ...] = tuple(_covered_layers(_covered_convs(state, full))[:depth])
        trunk = []
        for module in full[:depth]:
            if isinstance(module, nn.ReLU):
                module = nn.ReLU(inplace=False)
            elif isinstance(module, nn.MaxPool2d) and pooling == "avg":
                module = nn.AvgPool2d(kernel_size=2, stride=2)
            trunk.append(module)
        self.trunk = nn.Sequential(*trunk)
        self.names = LAYER_NAMES[:depth]
        transform = _IMAGENET.transforms()
        self.register_buffer("mean", torch.tensor(transform.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.std).view(1, 3, 1, 1), persistent=False)
        self.pooling = pooling
        self.channels_last = channels_last
        self._trunk_last = False  # the trunk's layout now; set on the first pass (it follows the device)
        self.eval()
        self.requires_grad_(False)

    @staticmethod
    def _resolve_weights(
        weights: str | os.PathLike[str], full: nn.Sequential, depth: int, seed: int, fill_missing: bool, key: str
    ) -> tuple[dict[str, Tensor], str]:
        choice = str(weights)
        if choice == "random":
            return {}, f"random (seed {seed})"
        if choice == "imagenet":
            return _imagenet_state(f"{key}.weights"), f"imagenet (torchvision VGG19_Weights.{_IMAGENET.name})"
        if choice == "auto":
            fallback = os.environ.get(WEIGHTS_ENV)
            # A configured file is used before the hub would download (and print "Downloading: ..."); ImageNet
            # weights already in the hub cache still come first, as they cost no network.
            reason = ""
            if not fallback or _imagenet_cache_path().is_file():
                try:
                    state = _imagenet_state(f"{key}.weights")
                    return state, f"imagenet (torchvision VGG19_Weights.{_IMAGENET.name}, chosen by auto)"
                except (NSTError, OSError, RuntimeError) as error:
                    reason = str(error).removeprefix(f"{key}.weights: ").splitlines()[0] or type(error).__name__
            if fallback:
                state, description = VGG19Features._file_state(
                    Path(fallback), full, depth, seed, fill_missing, WEIGHTS_ENV
                )
                return state, f"{description}, chosen by auto from ${WEIGHTS_ENV}"
            warnings.warn(
                f"VGG19 ImageNet weights are unavailable ({reason}) and ${WEIGHTS_ENV} is unset: using RANDOM "
                f"weights (seed {seed}). Style losses measured with them do not measure style (no style transfer, "
                "no style guidance); pass a weights file to fix this.",
                UserWarning,
                stacklevel=3,
            )
            return {}, f"random (seed {seed}, chosen by auto: ImageNet unavailable)"
        return VGG19Features._file_state(Path(choice).expanduser(), full, depth, seed, fill_missing, f"{key}.weights")

    @staticmethod
    def _file_state(
        path: Path, full: nn.Sequential, depth: int, seed: int, fill_missing: bool, key: str
    ) -> tuple[dict[str, Tensor], str]:
        state = _read_state_dict(path, key)
        covered = _check_architecture(state, full, path, key)
        available = _covered_layers(covered)
        label = f"file {path.resolve()} (sha256 {file_digest(path)[:12]}"
        if not covered:
            raise NSTError(f"{key}: {path} holds no VGG19 convolution weights starting at conv1_1")
        span = f"{available[0]}..{available[-1]}"
        if depth <= len(available):
            return state, f"{label}, covers {span})"
        if not fill_missing:
            raise _not_covered(path, available, LAYER_NAMES[depth - 1], key)
        return state, f"{label}, covers {span}) + random beyond {available[-1]} (seed {seed})"

    @property
    def min_input_size(self) -> int:
        """Smallest image side that keeps at least one pixel at the deepest layer."""
        return min_input_size(self.layers)

    def _set_layout(self, cuda: bool) -> bool:
        """Put the trunk's weights in the layout of a pass on this device; return whether it is ``channels_last``.

        With ``channels_last="cuda"`` a trunk moved back to the CPU returns to NCHW, so CPU results do not depend on
        having run on a GPU before.
        """
        wanted = cuda if self.channels_last == "cuda" else bool(self.channels_last)
        if self._trunk_last != wanted:
            self.trunk.to(memory_format=torch.channels_last if wanted else torch.contiguous_format)
            self._trunk_last = wanted
        return wanted

    def forward(self, image: Tensor, layers: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Map RGB images in ``[0, 1]`` of shape ``(B, 3, H, W)`` to ``{layer: features}``.

        The pass runs ``channels_last`` (see ``channels_last``), and the features come out in that layout. Under
        ``torch.autocast`` (Lightning's ``bf16-mixed`` and ``16-mixed`` precision wrap the training step in it) the
        convolutions run in bf16/fp16, and the returned features are in that dtype: the statistics in
        :mod:`~lightning_nst.core.losses` cast them to float32 with autocast off, so Gram matrices, means and
        variances stay float32.

        Args:
            image: The images.
            layers: A subset of :attr:`layers` to return; the pass stops at the deepest of them. All by default.
        """
        wanted = set(self.layers if layers is None else layers)
        features: dict[str, Tensor] = {}
        x = (image - self.mean) / self.std
        if self._set_layout(x.is_cuda):
            x = x.contiguous(memory_format=torch.channels_last)
        for name, module in zip(self.names, self.trunk, strict=True):
            x = module(x)
            if name in wanted:
                features[name] = x
                if len(features) == len(wanted):
                    break
        return features


def _imagenet_cache_path() -> Path:
    """Where torchvision's hub keeps the ImageNet VGG19 weights once downloaded (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_IMAGENET.url).name


def _imagenet_state(key: str = "model.vgg.weights") -> dict[str, Tensor]:
    cached = _imagenet_cache_path()
    if not cached.is_file() and (reason := unreachable(_IMAGENET.url)) is not None:
        raise NSTError(
            f"{key}: the ImageNet VGG19 weights are not in the torch hub cache ({cached}) and cannot be "
            f"downloaded ({reason}); pass a weights file instead (weights: /path/to/vgg19.pth)"
        )
    try:
        state = _IMAGENET.get_state_dict(progress=True, weights_only=True)
    except Exception as error:  # URLError (an OSError) when offline; several types for a corrupt cached file
        if isinstance(error, OSError) and not cached.is_file():
            reason = str(getattr(error, "reason", "") or error).splitlines()[0]
            raise NSTError(
                f"{key}: the ImageNet VGG19 weights are not in the torch hub cache ({cached}) and cannot be "
                f"downloaded ({reason}); pass a weights file instead (weights: /path/to/vgg19.pth)"
            ) from None
        raise NSTError(
            f"{key}: the cached ImageNet VGG19 weights {cached} cannot be loaded: {_load_problem(error)}; delete "
            "that file to download them again, or pass a weights file"
        ) from None
    return {name.removeprefix("features."): value for name, value in state.items() if name.startswith("features.")}


@dataclass
class VGGConfig:
    """How to build the VGG19 trunk; see :class:`VGG19Features` for the meaning of each field."""

    weights: str = "auto"
    pooling: Pooling = "max"
    seed: int = 0
    fill_missing: bool = False

    def build(
        self, layers: Sequence[str], key: str = "model.vgg", channels_last: bool | Literal["cuda"] = True
    ) -> VGG19Features:
        """Build the frozen trunk for ``layers``."""
        return VGG19Features(
            layers, self.weights, self.pooling, self.seed, self.fill_missing, key=key, channels_last=channels_last
        )
