"""``lightning_nst.stylize`` and ``lightning_nst.texture``: one call, one PIL image, no file written.

``stylize(..., network=CKPT)`` runs a trained fast style network instead of the optimisation
(:mod:`lightning_nst.nst.fast.inference`), on one content image or a list.

The settings are those of ``lightning-nst stylize``/``texture`` (the shipped configs with the same overrides,
:mod:`lightning_nst.cli.shortcuts`); the run is a plain Trainer without logger, checkpoints or writer, so nothing is
written and a notebook cell can run again. Bad input is refused before the run with the ``NSTError`` whose line
``lightning-nst`` prints; during the call, the messages the CLI drops are dropped
(:func:`~lightning_nst.cli.console.quieted`), and Ctrl-C raises ``KeyboardInterrupt`` with every signal handler as it
was.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from lightning_nst.cli import console, preflight
from lightning_nst.cli.shortcuts import stylize_config, texture_config
from lightning_nst.core.errors import NSTError

if TYPE_CHECKING:
    from lightning_nst.nst.fast.inference import FastNetwork

Source = str | os.PathLike[str]


def _run(config: dict[str, Any], progress: bool, accelerator: str, precision: str | None) -> Image.Image:
    """Check the config as ``fit`` would, then run it with the CLI's filters and every signal handler kept."""
    # fit's checks of the parsed config, on the Trainer this call builds: devices and accelerator, sources, memory
    config["trainer"].update(accelerator=accelerator, devices=1)
    if precision is not None:
        config["trainer"]["precision"] = precision
    connector = preflight.check_devices(config, "fit")
    preflight.check_image_optimization(config, getattr(getattr(connector, "strategy", None), "root_device", None))
    with console.quieted(), console.restoring_signal_handlers():
        return _fit(config, progress, accelerator)


def _module_and_data(config: dict[str, Any]) -> tuple[Any, Any]:
    """The ``ImageOptimization`` and ``ImageTargets`` of a ``fit`` config (a shortcut's, as a plain dict).

    Every ``model.init_args`` key is passed on, so the module keeps its own defaults for the keys the config leaves
    out, as ``lightning-nst fit`` builds it.
    """
    from lightning_nst.core.vgg import VGGConfig
    from lightning_nst.nst.data import ImageTargets
    from lightning_nst.nst.module import ImageOptimization
    from lightning_nst.nst.objective import Objective

    model_args = dict(config["model"]["init_args"])
    model_args["objectives"] = [Objective(**objective) for objective in model_args["objectives"]]
    if model_args.get("vgg") is not None:
        model_args["vgg"] = VGGConfig(**model_args["vgg"])
    optimizer = model_args.get("optimizer")
    if optimizer is not None:
        module_name, class_name = optimizer["class_path"].rsplit(".", 1)
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
        model_args["optimizer"] = functools.partial(optimizer_class, **optimizer.get("init_args", {}))
    return ImageOptimization(**model_args), ImageTargets(**config["data"]["init_args"])


def _fit(config: dict[str, Any], progress: bool, accelerator: str) -> Image.Image:
    """Build the config's module and data as ``fit`` would, run a Trainer that writes nothing, return the result."""
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_nst.cli.precision import choose_precision
    from lightning_nst.core.images import to_pil

    L.seed_everything(config["seed_everything"], verbose=False)
    model, data = _module_and_data(config)
    precision = choose_precision(config["trainer"].get("precision"), accelerator, objectives=model.objectives)
    rank_zero_info(precision.line("precision='{}'"))
    trainer = L.Trainer(
        max_steps=config["trainer"]["max_steps"],
        max_epochs=1,  # as `fit`: ImageTargets yields max_steps items per epoch
        accelerator=accelerator,
        devices=1,
        precision=precision.precision,  # type: ignore[arg-type]
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return to_pil(model.results()[0].image)


def _options(**values: Any) -> argparse.Namespace:
    return argparse.Namespace(logs="logs", **values)


_OPTIMISATION_DEFAULTS = {
    "steps": None, "style_weight": None, "content_weight": None, "statistic": "gram", "color": "keep",
    "optimizer": "lbfgs", "parameterization": None, "init": "content", "weights": "auto", "seed": 0,
    "progress": False, "accelerator": "auto", "precision": None,
}  # fmt: skip
"""``stylize``'s arguments that only the optimisation takes, with their defaults (``network=`` refuses others)."""


def stylize(
    content: Source | Sequence[Source],
    style: Source | Sequence[Source] | None = None,
    *,
    size: int | None = None,
    steps: int | None = None,
    style_weight: float | None = None,
    content_weight: float | None = None,
    statistic: str = "gram",
    color: str = "keep",
    style_weights: Sequence[float] | None = None,
    optimizer: str = "lbfgs",
    parameterization: str | None = None,
    init: str = "content",
    weights: str = "auto",
    seed: int = 0,
    progress: bool = False,
    accelerator: str = "auto",
    precision: str | None = None,
    network: FastNetwork | Source | None = None,
    alpha: float | None = None,
    preserve_color: bool = False,
    device: str = "auto",
) -> Image.Image | list[Image.Image]:
    """Gatys style transfer of ``content`` in the style of ``style``, as ``lightning-nst stylize`` runs it.

    With ``network``, a trained fast style network stylizes instead, as ``lightning-nst stylize --network`` does:
    ``content`` may then be a list, and only ``size``, ``style_weights``, ``precision`` and the network's own
    arguments apply.

    Args:
        content: The content image: a path, ``sample:NAME`` or ``skimage:NAME``; with ``network`` also a list of
            them (or of PIL images).
        style: The style image, or several (blended); none for a Johnson network.
        size: Long edge of the result in pixels; ``None``: 512 for the optimisation, the image's own with a network.
        steps: Optimisation steps; ``None``: the shipped config's (500).
        style_weight: Weight of the style term; ``None``: the shipped config's.
        content_weight: Weight of the content term; ``None``: the shipped config's (1).
        statistic: ``"gram"``, ``"meanvar"``, ``"w2"`` or ``"sliced_w"`` (``configs/style_transfer_<statistic>.yaml``).
        color: ``"keep"``, ``"luminance"``, ``"match"`` or ``"histogram"`` (``Objective.color``).
        style_weights: Blend weight of each style image (``data.style_weights``; AdaIN's style interpolation);
            ``None``: equal.
        optimizer: ``"lbfgs"`` (the config's) or ``"adam"``.
        parameterization: ``"pixels"``, ``"laplacian"`` or ``"fourier"`` (``model.parameterization``); ``None``:
            the config's (pixels).
        init: ``"content"``, ``"noise"`` or an image.
        weights: VGG19 weights: ``"auto"``, ``"imagenet"``, ``"random"`` (offline) or a file.
        seed: Seed of the run.
        progress: Show Lightning's progress bar.
        accelerator: Lightning's ``accelerator``.
        precision: Lightning's ``precision``; ``None``: ``bf16-mixed`` where the device computes bfloat16 natively
            (the VGG trunk in bfloat16; image, statistics and losses in float32), else ``32-true``, as
            ``lightning-nst`` chooses it. ``"32-true"`` for float32 throughout. With ``network``: ``"auto"``
            (as ``None``), ``"32"`` or ``"bf16"``.
        network: A trained fast style network: its checkpoint's path or a
            :class:`~lightning_nst.nst.fast.inference.FastNetwork`.
        alpha: With an AdaIN ``network``: content (0) to style (1) trade-off; ``None``: 1.
        preserve_color: With ``network``: keep the content's colours (see
            :class:`~lightning_nst.nst.fast.inference.Stylizer`).
        device: With ``network``: ``"auto"`` (CUDA where available), ``"cpu"``, ``"cuda"``, ...

    Returns:
        The best image seen, ``size`` pixels on its long edge. No file is written. With ``network``: the stylized
        image, or a list of them for a list of content images.
    """
    given = {
        "steps": steps, "style_weight": style_weight, "content_weight": content_weight, "statistic": statistic,
        "color": color, "optimizer": optimizer, "parameterization": parameterization, "init": init, "weights": weights,
        "seed": seed, "progress": progress, "accelerator": accelerator,
    }  # fmt: skip
    if network is not None:
        for name, value in given.items():
            if value != _OPTIMISATION_DEFAULTS[name]:
                raise NSTError(f"{name}: applies to the optimisation, not to network=; leave it out")
        return _stylize_with_network(content, style, network, size=size, style_weights=style_weights, alpha=alpha,
                                     preserve_color=preserve_color, device=device, precision=precision)  # fmt: skip
    for name, value in (("alpha", alpha), ("preserve_color", preserve_color or None), ("device", device)):
        if value is not None and not (name == "device" and value == "auto"):
            raise NSTError(f"{name}: applies to a trained network only; pass network=")
    if not isinstance(content, str | os.PathLike):
        raise NSTError("content: the optimisation stylizes one image; a list needs network=")
    if style is None:
        raise NSTError("style: the optimisation needs a style image")
    styles = [style] if isinstance(style, str | os.PathLike) else list(style)
    options = _options(
        content=content, style=styles, size=512 if size is None else size, steps=steps, style_weight=style_weight,
        content_weight=content_weight, statistic=statistic, optimizer=optimizer, parameterization=parameterization,
        init=init, weights=weights, seed=seed, color=color, style_weights=style_weights,
    )  # fmt: skip
    return _run(stylize_config(options), progress, accelerator, precision)


def _stylize_with_network(
    content: Any, style: Any, network: FastNetwork | Source, *, precision: str | None, **settings: Any
) -> Image.Image | list[Image.Image]:
    """``stylize(..., network=...)``: PIL images of a fast network's results, as ``stylize --network`` writes them."""
    from lightning_nst.core.images import to_pil
    from lightning_nst.nst.fast.inference import stylize_images

    # Lightning's names for the two precisions a network runs in are taken too
    precision = {None: "auto", "32-true": "32", "bf16-mixed": "bf16"}.get(precision, precision)
    results = stylize_images(network, content, style, precision=precision, **settings)
    images = [to_pil(result) for result in results]
    single = isinstance(content, str | os.PathLike | Image.Image)
    return images[0] if single else images


def texture(
    style: Source | Sequence[Source],
    *,
    size: int = 256,
    steps: int | None = None,
    style_weight: float | None = None,
    statistic: str = "gram",
    style_weights: Sequence[float] | None = None,
    optimizer: str = "lbfgs",
    parameterization: str | None = None,
    init: str = "noise",
    weights: str = "auto",
    seed: int = 0,
    progress: bool = False,
    accelerator: str = "auto",
    precision: str | None = None,
) -> Image.Image:
    """Texture synthesis from ``style`` (one image or several, blended), as ``lightning-nst texture`` runs it.

    The arguments are those of :func:`stylize` without a content image; the config is
    ``configs/texture_<statistic>.yaml``.

    Returns:
        The best image seen, ``size`` pixels on its long edge (that of the texture's shape). No file is written.
    """
    textures = [style] if isinstance(style, str | os.PathLike) else list(style)
    options = _options(
        texture=textures, size=size, steps=steps, style_weight=style_weight, statistic=statistic,
        optimizer=optimizer, parameterization=parameterization, init=init, weights=weights, seed=seed,
        style_weights=style_weights,
    )  # fmt: skip
    return _run(texture_config(options), progress, accelerator, precision)
