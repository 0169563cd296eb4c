"""What ``lightning-nst`` prints and how a run ends on Ctrl-C.

Known harmless library messages are filtered (:func:`quiet` for the CLI's process, :func:`quieted` around a library
call), each by its exact text: every other warning and log line is left alone. The progress bar shows small losses,
and becomes plain lines where its output is no terminal (:class:`PlainProgressBar`). :func:`restoring_signal_handlers`
gives back every signal handler a run changed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from lightning_nst.core.errors import NSTError

_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning's own _pytree helper still builds torch's LeafSpec; torch >= 2.10 deprecates it. Nothing to act on.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # diffusers still passes huggingface_hub's retired `local_dir_use_symlinks` when it loads a Hub model.
    (r"The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`", UserWarning),
    # The frozen VGG trunk is in eval mode on purpose (it has no dropout or batch norm, so the mode changes nothing).
    (
        r"Found \d+ module\(s\) in eval mode at the start of training\. This may lead to unexpected behavior",
        UserWarning,
    ),
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
    """Install the filters for the known messages in this process; calling it again changes nothing.

    For ``lightning-nst``, whose process it is; a library call uses :func:`quieted`.
    """
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


@contextlib.contextmanager
def quieted() -> Iterator[None]:
    """The filters of :func:`quiet` for the duration only, so the caller's own runs still get every message.

    The eval-mode warning, for one, is about our VGG trunk inside the call, but may be news about a caller's model.
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    added = [logger for logger in loggers if _FILTER not in logger.filters]
    with warnings.catch_warnings():
        quiet()
        try:
            yield
        finally:
            for logger in added:
                logger.removeFilter(_FILTER)


@contextlib.contextmanager
def restoring_signal_handlers() -> Iterator[None]:
    """Give back every signal handler that changed inside, and a Ctrl-C that Lightning made an exit as one.

    Lightning's Trainer answers a ``KeyboardInterrupt`` by ignoring SIGINT from then on (``SIG_IGN``) and calling
    ``sys.exit(1)``; its signal connector puts the handlers back only if the interrupt came after it installed its
    own, not during setup. To a caller that relies on Ctrl-C raising ``KeyboardInterrupt`` (a test runner, a
    notebook, a script) that is an ordinary exit, after which Ctrl-C does nothing. Here the handlers are put back and
    the ``KeyboardInterrupt`` is raised again. SIGCHLD is left alone: torch's DataLoader installs its handler once
    per process and relies on it staying.
    """
    if threading.current_thread() is not threading.main_thread():  # the only thread that may install handlers
        yield
        return
    kept = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}
    before = {signum: signal.getsignal(signum) for signum in kept}
    try:
        yield
    except SystemExit as exit:
        if isinstance(exit.__context__, KeyboardInterrupt):
            raise exit.__context__ from None
        raise
    finally:
        for signum, handler in before.items():
            if handler is not None and signal.getsignal(signum) != handler:  # None: installed from C, not restorable
                signal.signal(signum, handler)


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


def _duration(seconds: float) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _items_in(batch: Any) -> int:
    """How many items a batch holds: the length of a tensor, list or (for a dict) its first field; else 1."""
    if isinstance(batch, Mapping) and batch:
        batch = next(iter(batch.values()))
    shape = getattr(batch, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    return len(batch) if isinstance(batch, list | tuple) else 1


class PlainProgressBar(_NSTMetrics, ProgressBar):
    """Progress as a plain line every ``interval`` seconds, for logs and pipes, where a bar is drawn only at the end.

    ``fit``: ``step 120/500, loss 1.23e-06, 0.52 s/step, 3:17 left``; ``predict``: ``item 3/8, 12.5 s/item, 1:02
    left``; ``predict`` in several processes: ``item 7/20 (2 processes), 0.32 items/s, 0:40 left``, the items of all
    processes (a datamodule's ``progress()``, :meth:`lightning_nst.PromptGrid.progress`), on rank 0, with its last
    line once every process is done (at teardown). A line comes after the first step or item, then at the first step
    or item boundary ``interval`` seconds after the last line, and once at the end (``done in``). Lightning's bars
    redraw one line in place, which a log keeps either as one line per update (tqdm) or only at the end (rich); this
    is Lightning's :class:`~lightning.pytorch.callbacks.ProgressBar` API with lines instead.

    Args:
        interval: Seconds between lines; ``lightning-nst`` uses this bar with 15 s where its output is not a terminal.
    """

    def __init__(self, interval: float = 15.0) -> None:
        super().__init__()
        if not (isinstance(interval, int | float) and math.isfinite(interval) and interval > 0):
            raise NSTError(f"PlainProgressBar.interval: must be a number of seconds > 0 (got {interval!r})")
        self.interval = float(interval)
        self._enabled = True
        self._unit = "step"
        self._started = self._printed_at = 0.0
        self._first = self._done = self._shown = 0
        self._total: int | float | None = None
        self._grid: Callable[[], tuple[int, int] | None] | None = None  # the run's progress, in several processes
        self._processes = 1

    def disable(self) -> None:  # noqa: D102
        self._enabled = False

    def enable(self) -> None:  # noqa: D102
        self._enabled = True

    def _begin(self, unit: str, done: int, total: int | float | None) -> None:
        self._unit, self._first, self._done, self._shown, self._total = unit, done, done, done, total
        self._started = self._printed_at = time.monotonic()

    def _advance(self, done: int, metrics: dict[str, Any], *, last: bool = False) -> None:
        """Count ``done`` and print a line if this is the first, ``interval`` has passed, or ``last``."""
        self._done = done
        now = time.monotonic()
        first = self._shown == self._first and done > self._first
        due = now - self._printed_at >= self.interval
        if not self._enabled or done == self._shown or not (first or due or last):
            return
        self._printed_at, self._shown = now, done
        per = (now - self._started) / (done - self._first)
        total = self._total
        counted = f"{done}/{total}" if isinstance(total, int) else str(done)
        if self._grid is not None:
            counted += f" ({self._processes} processes)"
        fields = [f"{self._unit} {counted}", *(f"{name} {value}" for name, value in metrics.items())]
        # A grid's speed is images per second, which adds up over processes; one process's, seconds per item.
        fields.append(f"{1 / per:.3g} {self._unit}s/s" if self._grid is not None else f"{per:.3g} s/{self._unit}")
        if last or (isinstance(total, int) and done >= total):
            fields.append(f"done in {_duration(now - self._started)}")
        elif isinstance(total, int):
            fields.append(f"{_duration(per * (total - done))} left")
        print(", ".join(fields), file=sys.stdout, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None and math.isfinite(self.total_train_batches):
            total = trainer.global_step + int(self.total_train_batches)
        self._begin("step", trainer.global_step, total)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:  # noqa: D102
        self._advance(trainer.global_step, self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._advance(trainer.global_step, self.get_metrics(trainer, pl_module), last=True)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        loaders = trainer.predict_dataloaders
        items: int | None = None
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            # Lightning wraps a predict loader's batch sampler (its _IndexBatchSamplerWrapper keeps the loader's own
            # as _batch_sampler) and gives the loader a SequentialSampler over every item, so this process's share
            # is the wrapped batch sampler's sampler; a PromptGrid in several processes is counted whole below.
            batches = getattr(loader, "batch_sampler", None)
            sampler = getattr(getattr(batches, "_batch_sampler", batches), "sampler", None)
            try:
                items = (items or 0) + len(sampler if sampler is not None else loader.sampler)
            except (AttributeError, TypeError):  # not a DataLoader of a sized sampler: count batches instead
                items = None
                break
        grid = getattr(trainer.datamodule, "progress", None)
        counts = grid() if callable(grid) else None
        self._grid, self._processes = (grid, trainer.world_size) if counts is not None else (None, 1)
        self._begin("item", *(counts or (0, items)))

    def on_predict_batch_end(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        counts = self._grid() if self._grid is not None else None
        self._advance(counts[0] if counts is not None else self._done + _items_in(batch), {})

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if self._grid is None:  # else at teardown, when every process is done
            self._advance(self._done, {}, last=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        # GenerationWriter calls this once every process of a run has written its items, then Lightning does.
        counts = self._grid() if self._grid is not None else None
        if counts is not None:
            self._advance(counts[0], {}, last=True)
        self._grid = None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


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


def install_progress_bar(trainer: L.Trainer, configured: Any, *, lines: bool = False) -> None:
    """Replace the progress bar Lightning added by default with the project's; a configured or disabled one stays.

    The project's is the same kind of bar as Lightning chose, or :class:`PlainProgressBar` where standard output,
    which Lightning's bars draw on, is not a terminal, or where ``lines``.

    Args:
        trainer: The instantiated trainer.
        configured: The config's ``trainer.callbacks`` (a list, one entry or None), to tell a progress bar the user
            chose from the one Lightning added.
        lines: Print lines even on a terminal: ``predict`` in several processes, whose progress is the run's (a
            bar's length is this process's batches, which a process only knows as it takes them).
    """
    entries = configured if isinstance(configured, list | tuple) else [configured]
    if any(_is_progress_bar(entry) for entry in entries if entry is not None):
        return
    ours = {RichProgressBar: NSTRichProgressBar, TQDMProgressBar: NSTTQDMProgressBar}
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in ours:  # the same kind of bar as Lightning chose, so its look does not change
            bar = ours[type(callback)]() if _is_terminal(sys.stdout) and not lines else PlainProgressBar()
            trainer.callbacks[index] = bar
            return
