"""What ``lightning-nst`` prints: known harmless library messages filtered, a progress bar that shows small losses.

Importing this module installs the filters (:func:`quiet`), so the CLI imports it before anything builds a Trainer.
Each filter matches one known message exactly; every other warning and log line is left alone.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning's own _pytree helper still builds torch's LeafSpec; torch >= 2.10 deprecates it. Nothing to act on.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
"""``(message regex, category)`` of warnings that tell a user of ``lightning-nst`` nothing they can act on."""

_LOG_LINES: tuple[re.Pattern[str], ...] = (
    re.compile(r"💡 Tip: For seamless cloud (logging and experiment tracking|uploads and versioning), try installing"),
    re.compile(r"TPU available: False, using: 0 TPU cores$"),
    re.compile(r"HPU available: False, using: 0 HPUs$"),
)
"""Lightning's info lines that advertise other packages or report hardware this machine lacks."""

_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
"""The loggers Lightning's ``rank_zero_info`` writes through (the last is its default before Lightning sets its own)."""


class _KnownLines(logging.Filter):
    """Drop log records whose message is one of :data:`_LOG_LINES`."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in _LOG_LINES)


_FILTER = _KnownLines()


def quiet() -> None:
    """Install the filters for the known messages; calling it again changes nothing."""
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def format_metric(value: Any) -> Any:
    """A progress-bar value as text: floats in scientific notation with three significant digits.

    Style losses are often around ``1e-6``, which Lightning's fixed ``.3f`` shows as ``0.000``.
    """
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.2e}"
    return value if isinstance(value, str | int) else str(value)


class _NSTMetrics:
    """The metrics of Lightning's progress bars without ``v_num`` (the run folder is printed instead)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:  # noqa: D102
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        metrics.pop("v_num", None)
        return {name: format_metric(value) for name, value in metrics.items()}


class NSTRichProgressBar(_NSTMetrics, RichProgressBar):
    """Lightning's rich progress bar with :func:`format_metric` values and no ``v_num``."""


class NSTTQDMProgressBar(_NSTMetrics, TQDMProgressBar):
    """Lightning's tqdm progress bar with :func:`format_metric` values and no ``v_num``."""


def _is_progress_bar(entry: Any) -> bool:
    """Whether a config's ``trainer.callbacks`` entry (an instance or ``{class_path: ...}``) is a progress bar."""
    if isinstance(entry, ProgressBar):
        return True
    class_path = entry.get("class_path") if hasattr(entry, "get") else None
    if not isinstance(class_path, str):
        return False
    module, _, name = class_path.rpartition(".")
    try:
        kind = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(kind, type) and issubclass(kind, ProgressBar)


def install_progress_bar(trainer: L.Trainer, configured: Any) -> None:
    """Replace the progress bar Lightning added by default with the project's; a configured or disabled one stays.

    Args:
        trainer: The instantiated trainer.
        configured: The config's ``trainer.callbacks`` (a list, one entry or None), to tell a progress bar the user
            chose from the one Lightning added.
    """
    entries = configured if isinstance(configured, list | tuple) else [configured]
    if any(_is_progress_bar(entry) for entry in entries if entry is not None):
        return
    ours = {RichProgressBar: NSTRichProgressBar, TQDMProgressBar: NSTTQDMProgressBar}
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in ours:  # the same kind of bar as Lightning chose, so its look does not change
            trainer.callbacks[index] = ours[type(callback)]()
            return


def _layers(layers: Any) -> str:
    if isinstance(layers, Mapping):
        return ", ".join(f"{name} ({weight:g})" for name, weight in layers.items())
    return ", ".join(str(name) for name in layers)


def guidance_line(settings: Mapping[str, Any]) -> str:
    """``StyleGuidance.settings()`` as one readable line: ``scale 0.2, every step; gram on relu1_1, ...``."""
    start, end = settings["window"]
    every = settings["every_k"]
    steps = "every step" if every == 1 else f"every {every} steps"
    window = "" if (start, end) == (0.0, 1.0) else f" from {start:.0%} to {end:.0%} of the steps"
    if settings.get("recurrence"):
        start, end = settings.get("recurrence_window", (0.3, 0.7))
        window += (
            f", guided steps from {start:.0%} to {end:.0%} redone {settings['recurrence']} more time(s) (recurrence)"
        )
    if settings.get("descent_steps", 1) != 1:
        window += f", {settings['descent_steps']} descent steps each"
    size = settings["style_size"]
    style_size = "" if size == settings["guidance_size"] else f" (style images at {size} px)"
    return (
        f"scale {settings['scale']:g}{' (RMS-normalised)' if settings['normalize'] else ''}, {steps}{window}; "
        f"{settings['statistic']} on {_layers(settings['layers'])} at {settings['guidance_size']} px"
        f"{style_size}, decoder {settings['decoder']}, {settings['pooling']} pooling; "
        f"VGG19 weights: {settings['vgg_weights']}"
    )


quiet()
