"""An image optimisation's checkpoint as a resume reads it: its digest, one-line load errors, optimizer overrides.

Lightning writes and restores the checkpoint; this module adds what a resume must be able to trust. The module's
``on_save_checkpoint`` seals each checkpoint with a SHA-256 of its content (:func:`seal`), and every load checks it
(:func:`load`, :func:`verify`), so a damaged or truncated file is refused in one line instead of resuming into a
different image. A resume applies the command line's optimizer settings to the restored optimizer state where that
state can take them (:func:`optimizer_overrides`, :func:`apply_optimizer_overrides`) and refuses the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_input_file

DIGEST_KEY = "lightning_nst_sha256"
"""The checkpoint's key for the SHA-256 of its content (:func:`content_digest`)."""

# Lightning rewrites these when it loads a checkpoint saved by another version (lightning.pytorch.utilities.migration).
_UNSEALED = frozenset({DIGEST_KEY, "pytorch-lightning_version", "legacy_pytorch-lightning_version"})


def _feed(digest: Any, value: Any) -> None:
    """Feed ``value`` to ``digest`` by type and content, so that equal checkpoints hash equal however they were built.

    Mappings are fed in key order (``repr``), dataclasses as the mapping of their fields, tensors as dtype, shape and
    bytes. A checkpoint read back with ``torch.load`` therefore hashes as the dictionary that was saved.
    """
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _feed(digest, {field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(value, str):
        digest.update(f"s{len(value)}:".encode() + value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, bytes):
        digest.update(f"b{len(value)}:".encode() + value)
    else:  # None, bool, int, float and other scalars; repr is exact for floats
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def content_digest(checkpoint: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content: every key but the digest itself and Lightning's version keys."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in checkpoint.items() if key not in _UNSEALED})
    return digest.hexdigest()


def seal(checkpoint: dict[str, Any]) -> None:
    """Record the checkpoint's :func:`content_digest` in it; the last thing done before Lightning writes it."""
    checkpoint[DIGEST_KEY] = content_digest(checkpoint)


def verify(checkpoint: Mapping[str, Any], where: str) -> None:
    """Raise naming ``where`` if the checkpoint's content is not what was sealed; one without a digest passes.

    Checkpoints saved before digests were recorded have none and are read as they are.
    """
    recorded = checkpoint.get(DIGEST_KEY)
    if recorded is not None and recorded != content_digest(checkpoint):
        raise NSTError(
            f"{where} is damaged: its content does not match the SHA-256 it was saved with; resume from another "
            "checkpoint, or start a new run without --ckpt_path"
        )


def load(path: str | os.PathLike[str], key: str = "ckpt_path") -> dict[str, Any]:
    """Read a checkpoint file as Lightning will (``weights_only``) and :func:`verify` it; errors are one line.

    Raises:
        NSTError: Naming ``key`` and the file if it is missing, not a regular file, unreadable, not a checkpoint
            (including one damaged beyond reading, such as a truncated archive), or damaged (:func:`verify`).
    """
    path = check_input_file(path, key, "checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types, for files that are not (or no longer) checkpoints
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason if len(reason) <= 160 else reason[:160] + "..."
        raise NSTError(
            f"{key}: {path} is not a readable Lightning checkpoint (a different file, or one damaged or cut short: "
            f"{reason})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise NSTError(f"{key}: {path} is not a Lightning checkpoint (no state_dict and loop state)")
    verify(checkpoint, f"{key}: {path}")
    return checkpoint


# -- optimizer settings on resume ---------------------------------------------------------------------------------

APPLIED_ON_RESUME = frozenset(
    {
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "momentum",
        "dampening",
        "nesterov",
        "maximize",
        "foreach",
        "decoupled_weight_decay",
        "max_iter",
        "max_eval",
        "tolerance_grad",
        "tolerance_change",
        "history_size",
        "line_search_fn",
    }
)
"""Optimizer settings a resume takes from the command line over the restored state: they steer the next steps only.

Any other setting whose value differs from the checkpoint's (``amsgrad``, whose extra moments the state lacks or
holds; ``capturable``, ``fused``, ``differentiable``; settings of other optimizers) is refused by name.
L-BFGS's ``history_size`` is applied by keeping the newest pairs of its history.
"""


def settings_of(factory: Any) -> tuple[str, dict[str, Any]]:
    """The class name and settings of the optimizer ``factory`` builds (its param group, ``params`` left out)."""
    optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    return type(optimizer).__name__, {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def optimizer_overrides(saved_states: Sequence[Mapping[str, Any]], fresh: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``fresh`` (:func:`settings_of`) that differ from the saved optimizer states' groups.

    Returns:
        ``{setting: (saved value, new value)}``.
    """
    changed: dict[str, Any] = {}
    for state in saved_states:
        for group in state.get("param_groups", []):
            for name, value in fresh.items():
                if name in group and not _same(group[name], value):
                    changed.setdefault(name, (group[name], value))
    return changed


def refuse_optimizer_overrides(changed: Mapping[str, Any], where: str) -> None:
    """Raise, naming the first, if ``changed`` (:func:`optimizer_overrides`) holds a setting a resume cannot apply."""
    refused = [name for name in changed if name not in APPLIED_ON_RESUME]
    if refused:
        saved, new = changed[refused[0]]
        raise NSTError(
            f"{where} was saved with model.optimizer.init_args.{refused[0]} {saved!r}, this command gives {new!r}; "
            "the restored optimizer state cannot take that change (start a new run without --ckpt_path, or give the "
            "checkpoint's value)"
        )


def apply_optimizer_overrides(saved_states: Sequence[dict[str, Any]], changed: Mapping[str, Any]) -> None:
    """Write the new values of ``changed`` into the saved optimizer states, before Lightning restores them.

    An L-BFGS history longer than a new ``history_size`` keeps its newest pairs.
    """
    for state in saved_states:
        for group in state.get("param_groups", []):
            for name, (_, new) in changed.items():
                if name in group:
                    group[name] = new
            size = group.get("history_size")
            if "history_size" in changed and isinstance(size, int):
                for param_state in (state.get("state") or {}).values():
                    for key in ("old_dirs", "old_stps", "ro"):
                        if isinstance(param_state.get(key), list):
                            param_state[key] = param_state[key][-size:]
                    if "al" in param_state:
                        param_state["al"] = [None] * size


def describe_overrides(changed: Mapping[str, Any]) -> str:
    """``model.optimizer.init_args.lr 5.0 (the checkpoint's 1.0), ...`` for the resume's info line."""
    return ", ".join(
        f"model.optimizer.init_args.{name} {new!r} (the checkpoint's {old!r})" for name, (old, new) in changed.items()
    )
