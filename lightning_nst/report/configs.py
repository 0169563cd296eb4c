"""The report's run configs: the shipped ``configs/*.yaml`` with the report's settings as overrides.

Every block the report has no setting for (the optimizer, the sampler, the guidance schedule, the batch size) comes
from the shipped config the run stands for, so a report run is the documented command at other settings and cannot
drift from it.
"""

from __future__ import annotations

from typing import Any

import yaml

from lightning_nst.cli.shipped import configs_dir
from lightning_nst.core.errors import NSTError

CONFIGS = configs_dir()
"""The shipped configs (:func:`lightning_nst.cli.shipped.configs_dir`): the checkout's ``configs/``, or a wheel's copy.

One copy of each config, rather than defaults embedded in Python and a YAML generated from them, keeps the shipped
configs the readable source the README points at.
"""


def shipped(name: str) -> dict[str, Any]:
    """The shipped ``configs/<name>.yaml`` as plain data."""
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise NSTError(
            f"{path}: the report builds its runs from the shipped configs/{name}.yaml, which this installation lacks; "
            "reinstall lightning-nst"
        )
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def override(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied: mappings merge key by key, any other value (a list too) replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = override(merged[key], value)
        else:
            merged[key] = value
    return merged


def run_config(name: str, trainer: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The shipped config ``name`` with ``overrides`` (``model=...``, ``data=...``) and the report's ``trainer``.

    The trainer block replaces the shipped one whole: that one says where a user's run logs and checkpoints, and the
    report logs into its own folder and keeps no checkpoints.
    """
    config = shipped(name)
    config["trainer"] = trainer
    return override(config, overrides)
