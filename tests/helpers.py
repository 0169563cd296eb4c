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
