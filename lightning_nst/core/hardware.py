"""Which precision the hardware computes fast: bf16 autocast where the device has bfloat16 units, else float32.

A run whose ``trainer.precision`` is left unset takes :func:`auto_precision`: ``bf16-mixed`` on a CUDA device with
native bfloat16 (Ampere and later) and on an x86 CPU with AVX512-BF16 or AMX, ``32-true`` everywhere else, so a
setting the hardware would run slowly (bf16 emulated on an older CPU or GPU) is never chosen for the user.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["auto_precision", "cpu_has_fast_bf16", "device_type", "fast_bf16"]


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
