"""The command line: ``LightningCLI`` for both wings, the shortcuts, the checks made before any heavy work.

Also the signals a run stops on, the messages it prints and the console (progress bars, quieted library logs).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# `from lightning_nst.cli import run` is the documented way to run a config from Python; imported on first use, so
# that the torch-free parts of the command line (help, listings, shortcuts' parsers) stay torch-free.
_PUBLIC = {
    "run": "lightning_nst.cli.lightning",
    "NSTCLI": "lightning_nst.cli.lightning",
    "InterruptedBySignal": "lightning_nst.cli.signals",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lightning_nst.cli' has no attribute {name!r}")


__all__ = ["NSTCLI", "InterruptedBySignal", "run"]
