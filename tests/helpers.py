"""Callbacks that tests add from YAML."""

from __future__ import annotations

import os
import signal
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
    callback, runs to the end.
    """

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum
        self.sent = False

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        self.sent = trainer.global_step >= self.step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class NaNGradientAtStep(L.Callback):
    """Make the image's gradient NaN before the optimizer step at ``step``, as an overflowing loss would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:  # noqa: D102
        if trainer.global_step == self.step:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad.fill_(float("nan"))
