"""Callbacks that tests add from YAML."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL the process once ``trainer.global_step`` reaches ``step``, as a crash or an evicted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Send ``signum`` (SIGTERM by default) to this process once ``trainer.global_step`` reaches ``step``.

    A run resumed at or after ``step`` sends nothing, so the resume command a stopped run prints, which repeats this
    callback, runs to the end. ``times: 2`` sends it twice in a row, as a second Ctrl-C before the step ends.
    """

    def __init__(self, step: int, signum: int = signal.SIGTERM, times: int = 1) -> None:
        self.step = step
        self.signum = signum
        self.times = times
        self.sent = False

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        self.sent = trainer.global_step >= self.step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class InterruptInSetup(L.Callback):
    """Raise ``KeyboardInterrupt`` in ``setup``, as a Ctrl-C that comes while the run is being set up."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        raise KeyboardInterrupt


class TouchAtStep(L.Callback):
    """Create the file ``path`` once ``trainer.global_step`` reaches ``step``: a run under way, for another process."""

    def __init__(self, path: str, step: int = 1) -> None:
        self.path = path
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        if trainer.global_step >= self.step:
            Path(self.path).touch()


class SlowSteps(L.Callback):
    """Sleep ``seconds`` after every step, so a toy fit lasts long enough for output that comes every few seconds."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        time.sleep(self.seconds)


class NaNGradientAtStep(L.Callback):
    """Make the image's gradient NaN before the optimizer step at ``step``, as an overflowing loss would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:  # noqa: D102
        if trainer.global_step == self.step:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad.fill_(float("nan"))
