"""Seeds: the range a global seed may take, checked before any work."""

from __future__ import annotations

from typing import Any

from lightning_nst.core.errors import NSTError

MAX_SEED = 2**32 - 1
"""The largest global seed: ``seed_everything`` seeds numpy too, whose seeds are 32-bit."""


def check_seed(value: Any, key: str, maximum: int = MAX_SEED) -> None:
    """Raise naming ``key`` unless ``value`` is a whole number from 0 to ``maximum`` (``True``/``False``/``None`` pass).

    ``seed_everything: true`` draws a seed and ``false`` or ``None`` sets none, as in LightningCLI.
    """
    if value is None or isinstance(value, bool):
        return
    if not isinstance(value, int) or not 0 <= value <= maximum:
        raise NSTError(f"{key}: must be a whole number from 0 to {maximum} (got {value!r})")
