"""Which precision an image optimisation runs in, and the line that says which and why.

``trainer.precision`` left unset takes :func:`~lightning_nst.core.hardware.auto_precision`: ``bf16-mixed`` where the
device computes bfloat16 natively (the VGG trunk under bf16 autocast; the image, its optimizer state, the style
statistics and the losses stay float32), ``32-true`` elsewhere. A resumed fit with it unset takes the precision its
checkpoint was made with, so it goes on as it began; a value given anywhere is kept. A fit with a block-1
reconstruction among its objectives (:func:`~lightning_nst.core.layers.shallow_reconstruction`) is left float32:
bf16's rounding stops those far from the image (conv1_2 at 64 px: 25.6 dB PSNR to the content in bf16, 41.9 dB in
float32; ``docs/benchmarks.md``, "L-BFGS that keeps its progress").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning_nst.core import hardware
from lightning_nst.core.layers import objective_field, shallow_reconstruction

PrecisionSource = Literal["auto", "config", "checkpoint"]
"""Where a fit's precision came from: chosen for the device, given by the user, or the resumed checkpoint's."""

BEFORE_RECORDED = "32-true"
"""The precision of a checkpoint saved before checkpoints recorded it: the default then."""


@dataclass(frozen=True)
class PrecisionChoice:
    """A fit's precision, where it came from (``summary.json``'s ``precision_source``) and why, in words."""

    precision: str
    source: PrecisionSource
    reason: str

    def line(self, override: str = "--trainer.precision {}") -> str:
        """The console line, e.g. ``precision: bf16-mixed (chosen: this CPU has AVX512-BF16; ...)``.

        Args:
            override: How the user sets the precision, with ``{}`` for the value; named when it is not float32.
        """
        hint = f"; {override.format('32-true')} for float32" if self.precision != "32-true" else ""
        if self.source == "config":
            return f"precision: {self.precision} (as given)"
        return f"precision: {self.precision} ({self.reason}{hint})"


def choose_precision(
    given: Any,
    accelerator: Any,
    resume_state: Mapping[str, Any] | None = None,
    objectives: Iterable[Any] = (),
) -> PrecisionChoice:
    """The precision of a fit whose ``trainer.precision`` is ``given`` (``None``: unset).

    Args:
        given: The configured precision, or ``None``.
        accelerator: ``trainer.accelerator``, whose device decides an unset precision.
        resume_state: The resumed checkpoint's resume state (``checkpoint["lightning_nst"]``), if any.
        objectives: The fit's objectives (:class:`~lightning_nst.Objective` or their configs): a block-1
            reconstruction among them keeps an unset precision float32.
    """
    if given is not None:
        return PrecisionChoice(str(given), "config", "as given")
    if resume_state is not None:
        saved = resume_state.get("precision")
        if saved is None:
            reason = f"the checkpoint's: saved before checkpoints recorded it, when {BEFORE_RECORDED} was the default"
            return PrecisionChoice(BEFORE_RECORDED, "checkpoint", reason)
        return PrecisionChoice(str(saved), "checkpoint", "the checkpoint's, so the resumed run computes as it began")
    device = hardware.device_type(accelerator)
    try:
        precision = hardware.auto_precision(accelerator)
        reason = hardware.bf16_reason(device, precision == "bf16-mixed")
    except RuntimeError:  # not a device torch names (an Accelerator object, a TPU): Lightning's own default
        precision = "32-true"
        reason = f"lightning-nst picks bf16 only on CUDA and on x86 CPUs with bfloat16 units, not on {device}"
    shallow = next((o for o in objectives or () if shallow_reconstruction(o)), None)
    if precision != "32-true" and shallow is not None:
        name = objective_field(shallow, "name")
        precision = "32-true"
        reason = f"objective {name!r} reconstructs a block-1 layer, which bf16's rounding keeps far from the image"
    return PrecisionChoice(precision, "auto", f"chosen: {reason}")
