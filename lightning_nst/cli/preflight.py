"""Checks of a parsed CLI config made before any class is instantiated: no VGG, pipeline, process or run folder yet.

Each check reads the raw config namespace, so a mistake found here costs nothing but the parse and names the config
key the user wrote.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_output_dir
from lightning_nst.core.images import check_source, source_size
from lightning_nst.core.layers import DEFAULT_STYLE_LAYERS, LAYER_GEOMETRY, LAYER_NAMES
from lightning_nst.core.vgg import check_weights_cover

BYTES_PER_FLOAT = 4
TRAINING_MODELS = ("FastStyleTraining", "AdaINTraining")
"""The ``fit`` models that train a network over a dataset, rather than optimise one image."""
MAX_STEPS = sys.maxsize
"""The most ``trainer.max_steps`` a fit can take: its data is one epoch of that many items, a length Python holds."""


def _get(namespace: Any, name: str, default: Any = None) -> Any:
    if namespace is None:
        return default
    if isinstance(namespace, Mapping):
        return namespace.get(name, default)
    return getattr(namespace, name, default)


def _class_name(component: Any) -> str:
    return str(_get(component, "class_path", "")).rsplit(".", 1)[-1]


def _components(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


# -- output folders -------------------------------------------------------------------------------------------------


def output_folders(config: Any, subcommand: str) -> Iterator[tuple[str, str]]:
    """``(key, folder)`` of every place the run will write to, as far as the config names them."""
    trainer = _get(config, "trainer")
    loggers = _get(trainer, "logger")
    root = _get(trainer, "default_root_dir")
    if root is not None or loggers is True or not _components(loggers):
        # Lightning writes into default_root_dir (the working folder by default) when no logger gives a run folder.
        yield "trainer.default_root_dir", str(root if root is not None else os.getcwd())
    for logger in _components(loggers):
        save_dir = _get(_get(logger, "init_args"), "save_dir")
        if save_dir is not None:
            yield "trainer.logger.save_dir", str(save_dir)
    for callback in _components(_get(trainer, "callbacks")):
        name, args = _class_name(callback), _get(callback, "init_args")
        for option in ("output_dir", "save_dir", "dirpath"):
            if _get(args, option) is not None:
                yield f"{name}.{option}", str(_get(args, option))


def check_outputs(config: Any, subcommand: str) -> None:
    """Raise naming the key of the first output folder that is a file, read-only or on a nearly full disk."""
    for key, folder in output_folders(config, subcommand):
        if not folder.strip():  # e.g. an unset shell variable: the empty path would mean the working folder
            raise NSTError(f"{key}: is empty; give a folder (. for the working folder)")
        check_output_dir(folder, key)


# -- devices ----------------------------------------------------------------------------------------------------------


def _connector(trainer: Any) -> Any:
    """Lightning's own resolution of accelerator, strategy and devices, made without building a Trainer."""
    # _AcceleratorConnector is private, but Lightning 2.6 resolves "auto", the strategy and their combinations, with
    # the errors named below, nowhere else. Its public parts (the accelerator registry, Accelerator.parse_devices)
    # leave the auto choice and the strategy to private helpers (device_parser's functions are private too), and the
    # public Trainer builds callbacks and logs its device lines a second time before the run's own Trainer.
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    options = {
        name: _get(trainer, name)
        for name in ("accelerator", "strategy", "devices", "num_nodes")
        if isinstance(_get(trainer, name), str | int | list)
    }
    try:
        return _AcceleratorConnector(**options)
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as error:
        text = " ".join(str(error).split()).replace("`", "")
        accelerator = options.get("accelerator", "auto")
        if "devices" in text:  # a device count or list the accelerator cannot take
            devices = options.get("devices", "auto")
            on_cpu = "cpu" in text.lower()
            hint = "; on the CPU, give a number of processes > 0 (or auto)" if on_cpu else ""
            raise NSTError(f"trainer.devices: {devices!r} cannot be used here ({text}){hint}") from None
        if "not available" in text or "backend found" in text or "accelerator" in text.lower():
            raise NSTError(
                f"trainer.accelerator: {accelerator!r} is not available on this machine ({text}); "
                "use --trainer.accelerator cpu or auto"
            ) from None
        key = "trainer.devices"
        if "strateg" in text.lower():
            key = "trainer.strategy"
        elif "node" in text:
            key = "trainer.num_nodes"
        raise NSTError(f"{key}: {text}") from None


def check_devices(config: Any, subcommand: str) -> Any:
    """Resolve the device setup as Lightning will; for an image optimisation, use one device by default, refuse more.

    Returns:
        Lightning's accelerator connector, whose ``strategy.root_device`` is the device the run will use.
    """
    trainer = _get(config, "trainer")
    # A fast network's training is an ordinary training: "auto" takes every GPU, and several processes share the data.
    optimising = subcommand == "fit" and _class_name(_get(config, "model")) not in TRAINING_MODELS
    if optimising and _get(trainer, "devices") == "auto" and _get(trainer, "strategy", "auto") == "auto":
        trainer.devices = 1  # "auto" would take every GPU of the machine, for the same one image
    connector = _connector(trainer)
    # The connector's devices before the strategy takes them (a single-device strategy keeps no list of its own).
    world = int(_get(trainer, "num_nodes", 1) or 1) * len(getattr(connector, "_parallel_devices", []) or [None])
    if optimising and world > 1:
        raise NSTError(
            f"trainer.devices: image optimisation runs on one device, but this config asks for {world} processes "
            f"(devices={_get(trainer, 'devices')!r}, num_nodes={_get(trainer, 'num_nodes', 1)!r}); every process "
            "would optimise the same image. Use --trainer.devices 1 (optimise several objectives in one run instead)"
        )
    return connector


# -- image optimisation ----------------------------------------------------------------------------------------------


def _layers(objectives: Iterable[Any]) -> list[str]:
    names: list[str] = []
    for objective in objectives or []:
        for field in ("content_layers", "style_layers"):
            layers = _get(objective, field) or []
            names += [str(name) for name in (layers.keys() if isinstance(layers, Mapping) else layers)]
    return names


def activation_bytes(layers: Iterable[str], height: int, width: int, images: int) -> int:
    """Bytes of the VGG19 activations one forward pass over ``images`` images keeps for the backward pass.

    Counts each module's output up to the deepest of ``layers`` in float32, a lower bound: the backward pass needs
    gradient buffers on top.
    """
    depth = max(LAYER_NAMES.index(name) for name in layers) + 1
    total = sum(channels * (height // stride) * (width // stride) for channels, stride in LAYER_GEOMETRY[:depth])
    return int(total + 3 * height * width) * images * BYTES_PER_FLOAT


def _memory_of(device: Any) -> tuple[int, str] | None:
    """Total memory of ``device`` in bytes and its name, if known."""
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        index = device.index if device.index is not None else 0
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    except (ValueError, OSError, AttributeError):
        return None


HALF_PRECISIONS = ("16-true", "bf16-true")
"""Precisions that would hold the image itself, and the optimizer's step, in 16 bits."""


def check_image_optimization(config: Any, device: Any = None) -> None:
    """Check ``ImageTargets`` sources, ``model.init``, ``trainer.max_steps``, the precision and the memory needed."""
    trainer = _get(config, "trainer")
    precision = str(_get(trainer, "precision"))
    if precision in HALF_PRECISIONS:
        raise NSTError(
            f"trainer.precision: {precision} would keep the image and its optimizer state in 16 bits, too coarse for "
            "small steps; use 32-true, or bf16-mixed (VGG in bfloat16, the image in float32)"
        )
    steps = _get(trainer, "max_steps")
    if not isinstance(steps, int) or steps < 1:
        raise NSTError(f"trainer.max_steps: set a positive number of optimisation steps, got {steps}")
    for name in ("max_epochs", "limit_train_batches"):
        if _get(trainer, name) in (0, 0.0):  # Lightning's value for "no training at all"
            raise NSTError(f"trainer.{name}: 0 stops the fit before its first step; leave it unset")
    if steps > MAX_STEPS:
        raise NSTError(f"trainer.max_steps: at most {MAX_STEPS} (a run of max_steps items is one epoch), got {steps}")
    data = _get(_get(config, "data"), "init_args")
    content = _get(data, "content")
    styles = _get(data, "style")
    styles = [styles] if isinstance(styles, str | os.PathLike) else list(styles or [])  # one image may stand alone
    if content is not None:
        check_source(content, "data.content")
    for index, style in enumerate(styles):
        check_source(style, f"data.style[{index}]")
    for key in ("masks", "style_masks"):
        for index, mask in enumerate(_get(data, key) or []):
            if mask is not None:
                check_source(mask, f"data.{key}[{index}]")
    model = _get(_get(config, "model"), "init_args")
    init = _get(model, "init")
    if isinstance(init, str) and init not in ("noise", "content"):
        check_source(init, "model.init")
    layers = [name for name in _layers(_get(model, "objectives")) if name in LAYER_NAMES]
    _check_vgg_weights(_get(model, "vgg"), layers, "model.vgg")
    reference = content if content is not None else (styles[0] if styles else None)
    size = _get(data, "size")
    if not layers or reference is None or (size is not None and not isinstance(size, int)):
        return
    shape = source_size(reference)
    if shape is None:
        return
    width, height = shape
    if size is not None:
        scale = size / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    images = len(_get(model, "objectives") or []) or 1
    tile = _get(model, "tile_size")
    if isinstance(tile, int) and not isinstance(tile, bool) and 0 < tile < max(width, height):
        # A tiled fit holds one tile's activations at a time (lightning_nst.nst.tiling); tile_size includes the margins.
        needed = activation_bytes(layers, min(height, tile), min(width, tile), images)
    else:
        needed = activation_bytes(layers, height, width, images)
    memory = _memory_of(device)
    if memory is not None and needed > memory[0]:
        deepest = max(layers, key=LAYER_NAMES.index)
        key = "data.size" if size is not None else "data.content" if content is not None else "data.style[0]"
        raise NSTError(
            f"{key}: a {width}x{height} px image cannot be optimised here: {images} image(s) through VGG19 up to "
            f"{deepest} need at least {needed / 2**30:.1f} GiB for activations, more than the "
            f"{memory[0] / 2**30:.1f} GiB of {memory[1]}; use a smaller data.size"
        )


def _check_vgg_weights(vgg: Any, layers: list[str], key: str) -> None:
    """A weights file that covers too few of ``layers`` (without ``fill_missing``), named before anything loads."""
    if vgg is None or not layers:
        return
    check_weights_cover(_get(vgg, "weights", "auto"), layers, bool(_get(vgg, "fill_missing", False)), key)


def check_guidance_weights(config: Any) -> None:
    """``model.guidance.vgg``'s weights file against the guidance's layers (see :func:`_check_vgg_weights`)."""
    model = _get(config, "model")
    guidance = _get(_get(model, "init_args"), "guidance")
    if _class_name(model) != "GuidedDiffusion" or guidance is None:
        return
    args = _get(guidance, "init_args")
    layers = _get(args, "layers") or list(DEFAULT_STYLE_LAYERS)
    names = [str(name) for name in (layers.keys() if isinstance(layers, Mapping) else layers) if name in LAYER_NAMES]
    _check_vgg_weights(_get(args, "vgg"), names, "model.guidance.vgg")


def check_predict_batches(config: Any) -> None:
    """Refuse ``trainer.limit_predict_batches: 0``, which would load the pipeline and generate nothing."""
    if _get(_get(config, "trainer"), "limit_predict_batches") in (0, 0.0):
        raise NSTError("trainer.limit_predict_batches: 0 generates nothing; leave it unset")


def check_img2img(config: Any) -> None:
    """Refuse a ``model.strength`` below 1 without ``data.init_images``, before the logger makes its folder."""
    model = _get(config, "model")
    strength = _get(_get(model, "init_args"), "strength")
    if _class_name(model) != "GuidedDiffusion" or not isinstance(strength, int | float) or not 0 < strength < 1:
        return  # a strength out of range is refused, naming it, when the module is built
    if not _get(_get(_get(config, "data"), "init_args"), "init_images"):
        raise NSTError(f"model.strength: {float(strength)} needs data.init_images (img2img); 1.0 is text-to-image")


def check(config: Any, subcommand: str) -> None:
    """Every check that can be made on the parsed config before instantiation."""
    connector = check_devices(config, subcommand)
    if subcommand == "predict":
        check_predict_batches(config)
        check_img2img(config)
        check_guidance_weights(config)
    if subcommand == "fit" and _class_name(_get(config, "data")) == "ImageTargets":
        device = getattr(getattr(connector, "strategy", None), "root_device", None)
        check_image_optimization(config, device)
    check_outputs(config, subcommand)
