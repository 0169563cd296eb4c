"""The denoising loop of one batch: model evaluations, style guidance, scheduler steps and recurrence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_nst.diffusion.families import Conditioning, Family
from lightning_nst.diffusion.guidance import Sampling, StyleGuidance
from lightning_nst.diffusion.samplers import mid_step, noise_level, renoise, restore, snapshot


class Failure(NamedTuple):
    """Why an item of a batch failed: the config key most likely at fault, and the first value that was not finite."""

    key: str
    problem: str


def note(failures: list[Failure | None], values: Tensor, key: str, what: str) -> None:
    """Record ``what`` as the failure of each item whose row of ``values`` holds a NaN or infinity first."""
    finite = torch.isfinite(values.detach()).flatten(1).all(dim=1) if values.ndim > 1 else torch.isfinite(values)
    rows = len(failures)
    # With classifier-free guidance the UNet batch is [unconditional; conditional]; either half fails its item.
    finite = finite.view(-1, rows).all(dim=0).tolist()
    for row, ok in enumerate(finite):
        if not ok and failures[row] is None:
            failures[row] = Failure(key, f"{what} is not finite")


StepEnd = Callable[[int, Tensor, dict[str, Any], list[Failure | None]], Tensor]
"""``step_end(step_index, timestep, callback_kwargs, failures) -> latents``: the step-end callbacks, which may replace
the latents (and :func:`note` the items whose replacement is not finite)."""


@dataclass
class DenoisingLoop:
    """Step 7 of the pipelines' ``__call__`` for one batch, with the style guidance between prediction and step.

    One model evaluation and one guidance step per entry of the timesteps, as diffusers' own loop does.
    Second-order schedulers (Heun, DPM-SDE) list a timestep for each of their two model evaluations per step and keep
    the first half-step's state themselves, so both evaluations are guided; multistep solvers (PNDM, LMS,
    DPM-Solver++, UniPC) store the output ``step()`` is given, the corrected one, in their history. Step indices (the
    guidance window and ``every_k``) count model evaluations.

    Recurrence (``model.guidance.recurrence``) repeats a whole step, i.e. all the evaluations up to the point where
    the scheduler no longer holds a half-finished step (:func:`~.samplers.mid_step`: Heun's and DPM-SDE's pairs,
    PNDM's first pair), from the scheduler state snapshotted before it and the result re-noised to the step's start.
    Only the last repeat is recorded and shown to the step-end callbacks: one entry per scheduled evaluation. UniPC's
    corrector rebuilds x_t from the previous step's sample, so there a repeat changes x_t only through the model
    output at the re-noised x_t.

    Attributes:
        family: The model family, whose ``model_output`` is the denoiser's prediction with classifier-free guidance.
        guidance: The style guidance, or ``None``.
        cfg_scale: ``model.cfg_scale``.
        condition: The batch's encoded prompts.
        sampling: What the guidance is given: the scheduler, the decoders, the step count.
        generators: One per item: the noise of stochastic steps and of recurrence.
        step_kwargs: Extra keyword arguments of ``scheduler.step`` (eta, the generators).
        step_end: The step-end callbacks (:data:`StepEnd`).
        style_index: Each item's style target.
        index: The items' numbers.
        failures: Per item, the first value that was not finite (:func:`note`).
        style_losses: The style loss of each evaluation's x̂₀, ``(B,)`` each, with guidance.
        guided: Whether each evaluation was guided.
        model_evaluations: The denoiser calls made, repeats included.
    """

    family: Family
    guidance: StyleGuidance | None
    cfg_scale: float
    condition: Conditioning
    sampling: Sampling
    generators: list[torch.Generator]
    step_kwargs: dict[str, Any]
    step_end: StepEnd
    style_index: Tensor
    index: list[int]
    failures: list[Failure | None] = field(default_factory=list)
    style_losses: list[Tensor] = field(default_factory=list)
    guided: list[bool] = field(default_factory=list)
    model_evaluations: int = 0

    def __post_init__(self) -> None:
        self.failures = self.failures or [None] * len(self.generators)

    def run(self, latents: Tensor, timesteps: Tensor) -> Tensor:
        """Denoise ``latents`` over ``timesteps``; returns the final latents."""
        scheduler = self.sampling.scheduler
        i = 0
        while i < len(timesteps):
            first = i
            repeats = self.guidance.repeats(first, len(timesteps)) if self.guidance is not None else 0
            saved = snapshot(scheduler) if repeats else {}
            for repeat in range(repeats + 1):
                if repeat:
                    restore(scheduler, saved)
                    level, target = noise_level(scheduler, timesteps, i), noise_level(scheduler, timesteps, first)
                    latents = renoise(latents, level, target, self.generators)
                    note(self.failures, latents, "model.guidance.recurrence", f"step {first}: the re-noised latents")
                    i = first
                while True:
                    latents = self.evaluate(latents, i, timesteps[i], final=repeat == repeats)
                    i += 1
                    if i == len(timesteps) or not mid_step(scheduler):
                        break
        return latents

    def evaluate(self, latents: Tensor, i: int, t: Tensor, final: bool = True) -> Tensor:
        """Model evaluation ``i``, its guidance, the scheduler step and the step-end callbacks; the new latents.

        Not ``final``: a repeat that recurrence takes again, neither recorded nor shown to the callbacks.
        """
        failures, scheduler = self.failures, self.sampling.scheduler
        # The model's prediction after classifier-free guidance: noise, v or x0 as the scheduler's prediction_type
        # says; the flow velocity for SD3 and Flux. Named noise_pred, as in diffusers.
        noise_pred = self.family.model_output(latents, t, self.condition, self.cfg_scale)
        self.model_evaluations += 1
        if self.condition.do_cfg:
            key, what = "model.cfg_scale", f"step {i}: the noise prediction with classifier-free guidance"
        else:
            key, what = "model.model", f"step {i}: the model's prediction"
        note(failures, noise_pred, key, what)
        # 7.1 Style guidance: unlike diffusers' callback_on_step_end, this runs before the scheduler step.
        kwargs: dict[str, Any] = {
            "latents": latents,
            "noise_pred": noise_pred,
            "style_index": self.style_index,
            "index": self.index,
        }
        if self.guidance is not None:
            kwargs = self.guidance(self.sampling, i, t, kwargs)
            noise_pred = kwargs["noise_pred"]
            if final:
                self.style_losses.append(kwargs["style_loss"])
                self.guided.append(kwargs["guided"])
            note(failures, noise_pred, "model.guidance.scale", f"step {i}: the guided noise prediction")
        # compute the previous noisy sample x_t -> x_t-1
        latents = scheduler.step(noise_pred, t, latents, **self.step_kwargs, return_dict=False)[0]
        note(failures, latents, "model.eta", f"step {i}: the scheduler's latents")
        # 7.2 Step-end callbacks, with diffusers' contract: they may replace the latents.
        kwargs["latents"] = latents
        return self.step_end(i, t, kwargs, failures) if final else latents
