"""Which precision the hardware computes fast: bf16 autocast where the device has bfloat16 units, else float32.

A run whose ``trainer.precision`` is left unset takes :func:`auto_precision`: ``bf16-mixed`` on a CUDA device with
native bfloat16 (Ampere and later) and on an x86 CPU with AVX512-BF16 or AMX, ``32-true`` everywhere else, so a
setting the hardware would run slowly (bf16 emulated on an older CPU or GPU) is never chosen for the user.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["auto_precision", "bf16_reason", "cpu_has_fast_bf16", "device_type", "fast_bf16"]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86 AVX512-BF16 or AMX) that make bf16 autocast faster.

    torch has no public check; ``torch.cpu``'s private ones are what its own compiler asks. Where they are missing
    (another torch build), the Linux CPU flags say the same.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        return any(bool(check()) for check in checks)  # type: ignore[misc]
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def device_type(accelerator: object) -> str:
    """The device type (``cpu``, ``cuda``, ``mps``) a Trainer with ``trainer.accelerator`` runs on."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda"):
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else name
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return name


def fast_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (faster than float32), not by emulation."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return cpu_has_fast_bf16()
    return False


def auto_precision(accelerator: object) -> str:
    """``bf16-mixed`` where the accelerator's device has fast bfloat16 (:func:`fast_bf16`), else ``32-true``."""
    return "bf16-mixed" if fast_bf16(device_type(accelerator)) else "32-true"


def _cpu_bf16_units() -> list[str]:
    """The bfloat16 units torch finds on this CPU (``AVX512-BF16``, ``AMX``); empty where it cannot tell."""
    checks = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    return [unit for unit, name in checks.items() if callable(check := getattr(torch.cpu, name, None)) and check()]


def bf16_reason(device: str | torch.device, fast: bool) -> str:
    """Why ``device`` does (``fast``) or does not compute bfloat16 fast, in words for a message.

    E.g. ``this CPU has AVX512-BF16`` or ``this CPU has no AVX512-BF16 or AMX, so bf16 would be emulated and slower``.
    """
    kind = torch.device(device).type
    if kind == "cpu":
        if fast:
            units = _cpu_bf16_units()
            return f"this CPU has {' and '.join(units)}" if units else "this CPU computes bfloat16 natively"
        return "this CPU has no AVX512-BF16 or AMX, so bf16 would be emulated and slower"
    if kind == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "this GPU"
        if fast:
            return f"{name} computes bfloat16 natively"
        return f"{name} has no native bfloat16, so bf16 would be emulated and slower"
    return f"lightning-nst picks bf16 only on CUDA and on x86 CPUs with bfloat16 units, not on {kind}"
