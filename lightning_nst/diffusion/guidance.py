r"""Style guidance: steer a diffusion sampler's noise prediction down the gradient of a VGG style loss.

At every model evaluation of the sampler, with latents :math:`x_t` and (classifier-free guided) noise prediction
:math:`\hat\epsilon`, the clean latents :math:`\hat x_0` are predicted as the scheduler's own ``step`` does
(:func:`predict_x0`): :math:`(x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon) / \sqrt{\bar\alpha_t}` for VP samplers
(DDIM, DDPM, PNDM, DPM-Solver++, UniPC, LCM) and :math:`x - \sigma\hat\epsilon` on the unscaled sample for σ-space
ones (Euler, Euler ancestral, LMS, Heun, DPM-SDE). :math:`\hat x_0` is decoded to an image and scored with
:class:`~lightning_nst.core.losses.LayerStyleLoss` against the style image. The correction is

.. math:: \tilde\epsilon = \hat\epsilon - s \, \frac{g}{\operatorname{rms}(g)}, \qquad g = \nabla_{\hat\epsilon} L

and the scheduler steps with :math:`\tilde\epsilon`. Flow-matching models (SD3, Flux) predict a velocity
:math:`v = \epsilon - x_0` instead: :math:`\hat x_0 = x_t - \sigma v`, and the correction of :math:`v` is divided by
:math:`1 - \sigma` (:func:`output_gain`), which is the same correction of the noise. Only
:math:`\hat x_0 \mapsto L` is differentiated: the UNet (or transformer) is not, which is what makes this cheaper
than classifier guidance through the denoiser.

One scale means one thing across samplers: the correction is in units of the noise's RMS whatever the sampler, and
a correction :math:`\delta` of :math:`\hat\epsilon` moves :math:`\hat x_0` by :math:`\sigma\delta` in σ-space and by
:math:`\sqrt{1-\bar\alpha}/\sqrt{\bar\alpha}\,\delta` in VP, the same amount at the same noise level, since
:math:`\sigma^2 = (1-\bar\alpha)/\bar\alpha` (``test_one_correction_moves_x0_alike_in_vp_and_sigma_space``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import resize_long_edge
from lightning_nst.core.losses import STATISTICS, LayerStyleLoss, Statistic
from lightning_nst.core.vgg import (
    DEFAULT_STYLE_LAYERS,
    VGG19Features,
    VGGConfig,
    layer_index,
    layer_weights,
    min_input_size,
)

Decoder = Literal["auto", "vae", "tiny"]

# How each scheduler family relates the model output to x̂₀ (the formulas of its own ``step``), and how guidance
# stays out of its state. The loop (GuidedDiffusion.predict_step) runs the UNet and the guidance once per entry of
# ``scheduler.timesteps`` and passes the corrected output to ``step``; nothing here calls a method that advances
# ``step_index`` or writes the solver's history.
# - VP at the step's timestep, ᾱ = alphas_cumprod[t]: DDIM, DDPM, PNDM (whose timesteps repeat one entry for its
#   warm-up; each evaluation is taken at the timestep the UNet was given), LCM (whose step moves from
#   c_out·x̂₀ + c_skip·x_t, its ``denoised``, which is what is guided).
# - VP at the step's σ, ᾱ = 1/(1+σ²): DPM-Solver++ (multistep) and UniPC, which convert the output to x̂₀ from
#   ``sigmas[step_index]`` in ``convert_model_output`` and keep that x̂₀, from the corrected output, in their history.
# - σ-space, x̂₀ = x − σ·ε on the unscaled sample (the UNet saw ``scale_model_input``'s x/√(σ²+1)): Euler, Euler
#   ancestral, LMS (which keeps the corrected derivative in its history), Heun and DPM-SDE. σ = sigmas[step_index];
#   Heun's schedule interleaves the sigmas of its two evaluations, so the same rule holds for both, and DPM-SDE's second
#   evaluation is at ``mid_point_sigma``. Euler's churn (σ̂ = σ(1+γ)) is off: the loop never passes ``s_churn``.
VP_TIMESTEP: tuple[type, ...] = (DDIMScheduler, DDPMScheduler, PNDMScheduler, LCMScheduler)
VP_SIGMA: tuple[type, ...] = (DPMSolverMultistepScheduler, UniPCMultistepScheduler)
SIGMA_SPACE: tuple[type, ...] = (
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    LMSDiscreteScheduler,
    HeunDiscreteScheduler,
    DPMSolverSDEScheduler,
)
# - Flow matching (SD3, Flux), x_t = (1 − σ)·x₀ + σ·ε and the model predicts the velocity v = ε − x₀, so
#   x̂₀ = x_t − σ·v with σ = sigmas[step_index], FlowMatchEuler's ``x0`` of its stochastic step; FlowMatchHeun's
#   schedule interleaves its sigmas as Heun's does, and both its evaluations take x̂₀ at sigmas[step_index].
FLOW: tuple[type, ...] = (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)
SUPPORTED_SCHEDULERS: tuple[type, ...] = VP_TIMESTEP + VP_SIGMA + SIGMA_SPACE + FLOW
"""Schedulers whose clean-latent prediction :func:`predict_x0` computes as their own ``step`` does."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Prediction types a scheduler's step raises NotImplementedError for.
_UNSUPPORTED_PREDICTIONS: dict[type, tuple[str, ...]] = {
    EulerAncestralDiscreteScheduler: ("sample",),
    DPMSolverSDEScheduler: ("sample",),
    PNDMScheduler: ("sample",),
}


def check_scheduler(scheduler: Any, key: str = "model.scheduler") -> None:
    r"""Raise unless style guidance can compute :math:`\hat x_0` for ``scheduler``."""
    name = type(scheduler).__name__
    if not isinstance(scheduler, SUPPORTED_SCHEDULERS):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS)
        raise NSTError(
            f"{key}: {name} is not supported by the guided sampler: its clean-latent prediction x0 is not known "
            f"here (supported: {names})"
        )
    if isinstance(scheduler, FLOW):
        return  # velocity prediction is all they know
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise NSTError(f"{key}: prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if prediction_type in _UNSUPPORTED_PREDICTIONS.get(type(scheduler), ()):
        raise NSTError(f"{key}: {name} does not implement prediction_type {prediction_type!r}; choose another")
    if isinstance(scheduler, VP_SIGMA) and scheduler.config.get("use_flow_sigmas"):
        raise NSTError(f"{key}: {name} with use_flow_sigmas is a flow-matching sampler, not a Stable Diffusion one")


def _step_index(scheduler: Any, timestep: Any) -> int:
    """The index ``step`` will use for ``timestep``, found as its ``_init_step_index`` does, without setting it."""
    if scheduler.step_index is not None:
        return scheduler.step_index
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    if isinstance(timestep, Tensor):
        timestep = timestep.to(scheduler.timesteps.device)
    return scheduler.index_for_timestep(timestep)


def _sigma(scheduler: Any, timestep: Any) -> Tensor:
    if isinstance(scheduler, DPMSolverSDEScheduler) and not scheduler.state_in_first_order:
        return torch.as_tensor(scheduler.mid_point_sigma)
    return scheduler.sigmas[_step_index(scheduler, timestep)]


def predict_x0(scheduler: Any, model_output: Tensor, sample: Tensor, timestep: Any) -> Tensor:
    r"""Clean-latent prediction from the model output, as the scheduler's ``step`` computes it.

    ``pred_original_sample`` for DDIM, DDPM, Euler, Euler ancestral, LMS, Heun and DPM-SDE; the ``x0_pred`` of
    ``convert_model_output`` for DPM-Solver++ and UniPC; ``denoised`` for LCM; for PNDM, which computes none, the VP
    formula at the timestep. ``sample`` is the scheduler's (unscaled) sample, not ``scale_model_input``'s output.
    Computed in float32 and differentiable in ``model_output``; no thresholding or clipping (Stable Diffusion
    configures neither). Reads the scheduler's state, never changes it.
    """
    output, sample = model_output.float(), sample.float()
    if isinstance(scheduler, FLOW):
        return sample - _sigma(scheduler, timestep).to(device=sample.device, dtype=torch.float32) * output
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise NSTError(
            f"model.scheduler: prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
        )
    if isinstance(scheduler, SIGMA_SPACE):
        sigma = _sigma(scheduler, timestep).to(device=sample.device, dtype=torch.float32)
        if prediction_type == "sample":
            return output
        if prediction_type == "epsilon":
            return sample - sigma * output
        # v: c_out·v + c_skip·x with c_out = −σ/√(σ²+1) and c_skip = 1/(σ²+1), as EulerDiscreteScheduler.step
        return output * (-sigma / (sigma**2 + 1).sqrt()) + sample / (sigma**2 + 1)
    if isinstance(scheduler, VP_SIGMA):
        sigma = scheduler.sigmas[_step_index(scheduler, timestep)].to(device=sample.device, dtype=torch.float32)
        alpha_prod = 1 / (sigma**2 + 1)  # _sigma_to_alpha_sigma_t: α_t = 1/√(σ²+1), σ_t = σ·α_t
    elif isinstance(scheduler, VP_TIMESTEP):
        alpha_prod = scheduler.alphas_cumprod[int(timestep)].to(device=sample.device, dtype=torch.float32)
    else:
        check_scheduler(scheduler)
    beta_prod = 1 - alpha_prod
    if prediction_type == "sample":
        x0 = output
    elif prediction_type == "epsilon":
        x0 = (sample - beta_prod.sqrt() * output) / alpha_prod.sqrt()
    else:
        x0 = alpha_prod.sqrt() * sample - beta_prod.sqrt() * output
    if isinstance(scheduler, LCMScheduler):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        return c_out * x0 + c_skip * sample
    return x0


def noise_level(scheduler: Any, timesteps: Tensor, position: int) -> tuple[float, float]:
    r"""``(a, b)``: the sample entering model evaluation ``position`` of ``timesteps`` is :math:`a x_0 + b\epsilon`.

    ``timesteps`` are those the loop runs (img2img runs the scheduler's last ones); ``position == len(timesteps)`` is
    the level of the sampler's output. VP at a timestep: :math:`a = \sqrt{\bar\alpha}`, :math:`b = \sqrt{1-\bar\alpha}`
    (the output at ``final_alpha_cumprod`` where the scheduler has one, else clean); DPM-Solver++ and UniPC:
    :math:`a = 1/\sqrt{1+\sigma^2}`, :math:`b = \sigma a`; σ-space: :math:`a = 1`, :math:`b = \sigma`; flow matching:
    :math:`a = 1-\sigma`, :math:`b = \sigma` (pure noise at :math:`\sigma = 1`). The level of each evaluation is the
    one its x̂₀ is computed at (:func:`predict_x0`), so a re-noised sample is what the next evaluation expects.
    """
    if isinstance(scheduler, VP_TIMESTEP):
        if position < len(timesteps):
            alpha_prod = float(scheduler.alphas_cumprod[int(timesteps[position])])
        else:
            alpha_prod = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        return math.sqrt(alpha_prod), math.sqrt(1 - alpha_prod)
    if not isinstance(scheduler, VP_SIGMA + SIGMA_SPACE + FLOW):
        check_scheduler(scheduler)
    # The loop's evaluation k is the scheduler's index offset + k (img2img starts at set_begin_index's index).
    offset = len(scheduler.timesteps) - len(timesteps)
    sigma = float(scheduler.sigmas[min(offset + position, len(scheduler.sigmas) - 1)])
    if isinstance(scheduler, FLOW):
        return 1 - sigma, sigma
    if isinstance(scheduler, VP_SIGMA):
        return 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
    return 1.0, sigma


def renoise(
    sample: Tensor, level: tuple[float, float], target: tuple[float, float], generators: list[torch.Generator]
) -> Tensor:
    r"""Take ``sample`` from noise ``level`` back up to ``target`` (both ``(a, b)`` of :func:`noise_level`).

    :math:`x_t = (a_t/a_{prev})\,x + \sqrt{b_t^2 - (a_t b_{prev}/a_{prev})^2}\,\xi`, with :math:`\xi` drawn from each
    item's generator: for VP this is FreeDoM's :math:`x_t = \sqrt{\bar\alpha_t/\bar\alpha_{t-1}}\,x_{t-1} +
    \sqrt{1-\bar\alpha_t/\bar\alpha_{t-1}}\,\xi`. ``level`` is never pure noise (:math:`a_{prev} > 0`): it is the
    level after a step; ``target`` may be (flow matching's first step, :math:`a_t = 0`).
    """
    (a_prev, b_prev), (a_t, b_t) = level, target
    noise = randn_tensor(sample.shape, generator=generators, device=sample.device, dtype=sample.dtype)
    carried = a_t * b_prev / a_prev
    return (a_t / a_prev) * sample + math.sqrt(max(b_t**2 - carried**2, 0.0)) * noise


def mid_step(scheduler: Any) -> bool:
    """Whether the scheduler is between the model evaluations of one step, holding the step's first half.

    Heun and DPM-SDE between their two evaluations; PNDM inside a Runge-Kutta warm-up step (4 evaluations) or, with
    ``skip_prk_steps``, between its first two evaluations, whose outputs it averages for the first step.
    """
    if isinstance(scheduler, (HeunDiscreteScheduler, DPMSolverSDEScheduler, FlowMatchHeunDiscreteScheduler)):
        return not scheduler.state_in_first_order
    if isinstance(scheduler, PNDMScheduler):
        if scheduler.counter < len(scheduler.prk_timesteps):
            return scheduler.counter % 4 != 0
        return bool(scheduler.config.skip_prk_steps) and scheduler.counter == 1
    return False


# Built once by step() and fixed for the whole sampling (DPM-SDE's Brownian tree): kept, not rolled back, so a repeat
# draws from the same tree instead of building another one from a new seed.
_PERSISTENT_STATE = frozenset({"noise_sampler"})


def snapshot(scheduler: Any) -> dict[str, Any]:
    """The scheduler's state, to :func:`restore` before repeating a step.

    A copy of ``scheduler.__dict__`` with each list and dict copied one level down: ``step`` replaces the tensors
    and numbers it keeps (``_step_index``, ``lower_order_nums``, Heun's ``prev_derivative``/``dt``/``sample``,
    UniPC's ``last_sample``, PNDM's ``counter``/``cur_sample``), so holding the old objects keeps their old values,
    but it mutates its history lists in place (PNDM's ``ets.append``, LMS's ``derivatives.append``/``pop``,
    DPM-Solver++'s and UniPC's ``model_outputs[i] = ...``, UniPC's ``timestep_list``), which the copies protect; the
    tensors in them are never written into. The one in-place tensor update, PNDM's Runge-Kutta
    ``cur_model_output +=``, accumulates within a step, whose start (where snapshots are taken) holds the integer 0.
    """
    return _copied({key: value for key, value in vars(scheduler).items() if key not in _PERSISTENT_STATE})


def restore(scheduler: Any, state: dict[str, Any]) -> None:
    """Put back the state :func:`snapshot` took; the snapshot stays usable for the next repeat."""
    for key in [key for key in vars(scheduler) if key not in state and key not in _PERSISTENT_STATE]:
        delattr(scheduler, key)  # set by a step after the snapshot (Heun's `sample` on its first step)
    vars(scheduler).update(_copied(state))


def _copied(state: Mapping[str, Any]) -> dict[str, Any]:
    # Exact types only: the config (a FrozenDict) and other dict subclasses are not state and must keep their class.
    return {key: type(value)(value) if type(value) in (list, dict) else value for key, value in state.items()}


def _latents_mean_std(config: Any, like: Tensor) -> tuple[Tensor, Tensor] | None:
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return tuple(torch.tensor(v, device=like.device, dtype=like.dtype).view(shape) for v in (mean, std))  # type: ignore[return-value]


def vae_input(decoder: nn.Module, latents: Tensor) -> Tensor:
    """Model latents as the decoder takes them, with the decoder's own config, by the pipelines' formulas.

    ``latents · std / scaling_factor + mean`` where the config has ``latents_mean`` and ``latents_std`` (SDXL
    pipelines), else ``latents / scaling_factor + shift_factor`` (SD3, Flux; no shift for SD and ``AutoencoderTiny``).
    """
    config = decoder.config
    statistics = _latents_mean_std(config, latents)
    if statistics is not None:
        mean, std = statistics
        return latents * std / config.scaling_factor + mean
    shift = getattr(config, "shift_factor", None)
    return latents / config.scaling_factor + shift if shift else latents / config.scaling_factor


def model_latents(encoder: nn.Module, encoded: Tensor) -> Tensor:
    """The inverse of :func:`vae_input`: latents the VAE encoded (a sample of ``encode``'s) as the model's."""
    config = encoder.config
    statistics = _latents_mean_std(config, encoded)
    if statistics is not None:
        mean, std = statistics
        return (encoded - mean) * config.scaling_factor / std
    shift = getattr(config, "shift_factor", None)
    return (encoded - shift) * config.scaling_factor if shift else config.scaling_factor * encoded


def decode_latents(decoder: nn.Module, latents: Tensor) -> Tensor:
    """Decode ``(B, C, h, w)`` model latents to images in ``[0, 1]`` as the pipelines do.

    Works for ``AutoencoderKL`` and ``AutoencoderTiny`` of every family: :func:`vae_input`, ``decode``, then the image
    processor's denormalisation.
    """
    latents = vae_input(decoder, latents.to(decoder.dtype))
    return VaeImageProcessor.denormalize(decoder.decode(latents, return_dict=False)[0])


MAX_NOISE_TO_SIGNAL = 14.6
"""Stable Diffusion's largest noise-to-signal ratio, √((1−ᾱ)/ᾱ) at t = 999 of its scaled-linear schedule."""


def output_gain(scheduler: Any, timestep: Any) -> float:
    r"""What a unit correction of the noise is in units of the model's output, so one scale means one thing.

    1 for noise-predicting samplers. Flow matching predicts :math:`v = \epsilon - x_0`, and at fixed :math:`x_t`
    a change :math:`\delta` of :math:`\epsilon` is a change :math:`\delta/(1-\sigma)` of :math:`v`, which moves
    :math:`\hat x_0` by :math:`\sigma/(1-\sigma)\,\delta`, the noise-to-signal ratio times :math:`\delta` as on
    the other samplers. That ratio is capped at :data:`MAX_NOISE_TO_SIGNAL`: at :math:`\sigma = 1` (pure noise,
    every flow sampler's first step) it is infinite.
    """
    if not isinstance(scheduler, FLOW):
        return 1.0
    sigma = float(_sigma(scheduler, timestep))
    if sigma <= 0:
        return 1.0  # clean: x̂₀ does not depend on v
    return min(1 / (1 - sigma), MAX_NOISE_TO_SIGNAL / sigma) if sigma < 1 else MAX_NOISE_TO_SIGNAL / sigma


def rms_normalize(gradient: Tensor, eps: float = 1e-12) -> Tensor:
    """Divide each sample's gradient by its root mean square, so the correction has unit RMS like the noise.

    However small the gradient, a sample that is not all zero comes out with RMS 1; an all-zero one stays zero.
    """
    flat = gradient.float().flatten(1)
    # Scaled to a largest magnitude of 1 first: squaring a gradient of ~1e-20 would underflow float32.
    flat = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rms = flat.square().mean(dim=1, keepdim=True).sqrt()
    return (flat / rms.clamp_min(eps)).view_as(gradient).to(gradient.dtype)


class StyleGuidance(nn.Module):
    r"""The style-guidance step of a sampling loop, as a callback with diffusers' contract.

    ``guidance(pipeline, step_index, timestep, callback_kwargs) -> callback_kwargs`` runs between the noise
    prediction and the scheduler step. ``callback_kwargs`` holds ``latents`` (:math:`x_t`), ``noise_pred``
    (:math:`\hat\epsilon`) and ``style_index`` (which style image each sample targets); the result adds the corrected
    ``noise_pred``, the ``style_loss`` of :math:`\hat x_0` per sample, the decoded ``x0_image`` it was measured on
    and ``guided`` (whether the step was corrected). ``pipeline`` must expose ``scheduler``, ``vae``, ``tiny_vae``
    and ``num_timesteps`` (:class:`~lightning_nst.diffusion.module.GuidedDiffusion` does).

    The style loss is measured at every step, guided or not, so a run with ``scale: 0`` is the unguided baseline
    with the same loss trajectory.

    Args:
        scale: Strength :math:`s` of the correction; 0 measures the style loss without guiding. With
            ``normalize``, it is in units of the noise's own RMS (about 1), so values of 0.05–0.5 are sensible.
        window: ``[start, end)`` fractions of the sampling steps where guidance is on, e.g. ``[0.0, 0.8]``. Steps
            here are model evaluations: Heun's two per step count as two.
        every_k: Guide every k-th step only (counted from step 0); the others are measured but not corrected.
        normalize: Divide each sample's gradient by its RMS, so one scale works across models, sizes, layers and
            statistics. Without it, ``scale`` multiplies the raw gradient and must be tuned per setting.
        decoder: Decoder of :math:`\hat x_0` for the gradient: ``vae`` (the pipeline's), ``tiny`` (the
            ``AutoencoderTiny`` given as ``model.tiny_vae``) or ``auto`` (tiny when given, else vae).
        guidance_size: Longer edge, in pixels, the decoded image is resized to before VGG; ``None`` keeps it.
        style_size: Longer edge of the style images before VGG; defaults to ``guidance_size``.
        layers: VGG19 layers of the style loss, each weighing ``1 / len(layers)``, or ``{layer: weight}``.
        statistic: ``"gram"`` (Gatys et al.), ``"meanvar"`` (per-channel mean and std, as in AdaIN), ``"w2"`` or
            ``"sliced_w"`` (:class:`~lightning_nst.core.losses.StyleLoss`).
        vgg: Weights and pooling of the VGG19 trunk, which is built (and its weights loaded) by :meth:`configure`,
            not here.
        recurrence: Recurrence ("time travel", FreeDoM, MPGD): after a guided step inside ``recurrence_window``,
            re-noise its result back to the step's starting noise level (:func:`renoise`, fresh noise from each
            item's generator) and take the step again, this many extra times; the scheduler's state is rolled back
            before each repeat (:func:`snapshot`). Each repeat costs the step's model evaluations again. 0 is off.
        recurrence_window: ``[start, end)`` fractions of the model evaluations where guided steps are repeated.
        descent_steps: Gradient steps on :math:`\hat x_0` per guided evaluation: each recomputes :math:`\hat x_0` from
            the corrected :math:`\tilde\epsilon`, decodes it and subtracts another ``scale`` times the RMS-normalised
            gradient, so ``scale`` is then the size of each descent step and the total correction grows up to
            ``descent_steps × scale``. The style loss and ``x0_image`` reported are those of the uncorrected
            :math:`\hat x_0`. No extra UNet call; each further descent step costs one decode and one VGG forward
            and backward pass.
    """

    def __init__(
        self,
        scale: float = 0.2,
        window: tuple[float, float] = (0.0, 1.0),
        every_k: int = 1,
        normalize: bool = True,
        decoder: Decoder = "auto",
        guidance_size: int | None = 256,
        style_size: int | None = None,
        layers: list[str] | dict[str, float] | None = None,
        statistic: Statistic = "gram",
        vgg: VGGConfig | None = None,
        recurrence: int = 0,
        recurrence_window: tuple[float, float] = (0.3, 0.7),
        descent_steps: int = 1,
    ) -> None:
        super().__init__()
        key = "model.guidance"
        if not math.isfinite(scale):
            raise NSTError(f"{key}.scale: must be a finite number, got {scale!r}")
        start, end = (float(value) for value in window)
        if not 0.0 <= start <= end <= 1.0:
            raise NSTError(f"{key}.window: need 0 <= start <= end <= 1, got [{start}, {end}]")
        if every_k < 1:
            raise NSTError(f"{key}.every_k: must be >= 1, got {every_k}")
        if recurrence < 0:
            raise NSTError(
                f"{key}.recurrence: must be >= 0 (extra repeats of a guided step; 0 is off), got {recurrence}"
            )
        rec_start, rec_end = (float(value) for value in recurrence_window)
        if not 0.0 <= rec_start <= rec_end <= 1.0:
            raise NSTError(f"{key}.recurrence_window: need 0 <= start <= end <= 1, got [{rec_start}, {rec_end}]")
        if descent_steps < 1:
            raise NSTError(f"{key}.descent_steps: must be >= 1, got {descent_steps}")
        # decoder is not checked by hand: it is a Literal, which the CLI's parser enforces naming the key. statistic
        # is, since LayerStyleLoss would only find it out once the trunk is built, with a message naming no key.
        if statistic not in STATISTICS:
            raise NSTError(f"{key}.statistic: must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        layers = list(DEFAULT_STYLE_LAYERS) if layers is None else layers
        if not layers:
            raise NSTError(f"{key}.layers: give at least one VGG19 layer")
        parsed = layer_weights(layers, f"{key}.layers")
        names = list(parsed)
        # A list keeps LayerStyleLoss's own 1/len weighting (and the settings recorded in manifests) as it was.
        weights = {layer: float(weight) for layer, weight in parsed.items()} if isinstance(layers, Mapping) else None
        deepest = max(names, key=layer_index)
        for name, size in (("guidance_size", guidance_size), ("style_size", style_size)):
            if size is not None and size < min_input_size(names):
                raise NSTError(
                    f"{key}.{name}: {size} px is too small for layer {deepest}, which needs at least "
                    f"{min_input_size(names)} px"
                )
        self.scale = float(scale)
        self.window = (start, end)
        self.every_k = every_k
        self.normalize = normalize
        self.decoder = decoder
        self.guidance_size = guidance_size
        self.style_size = style_size if style_size is not None else guidance_size
        self.layers = names
        self.layer_weights = weights
        self.statistic = statistic
        self.vgg_config = vgg or VGGConfig()
        self.recurrence = recurrence
        self.recurrence_window = (rec_start, rec_end)
        self.descent_steps = descent_steps
        self.vgg: VGG19Features | None = None
        self.targets = nn.ModuleList()

    # -- setup --------------------------------------------------------------------------------------------------

    def configure(self) -> VGG19Features:
        """Build the VGG19 trunk, loading its weights, unless it is built already; returns it.

        Not done in ``__init__``, so a config is checked cheaply before anything heavy is loaded.
        :class:`~lightning_nst.GuidedDiffusion` calls it in ``setup``; otherwise the first :meth:`set_styles`,
        :meth:`settings` or style loss does.
        """
        if self.vgg is None:
            self.vgg = self.vgg_config.build(self.layers, key="model.guidance.vgg")
        return self.vgg

    @torch.no_grad()
    def set_styles(
        self, images: Sequence[Tensor | Sequence[Tensor]], weights: Sequence[Sequence[float] | None] | None = None
    ) -> None:
        """Compute the target statistics of each style target, once.

        Args:
            images: One entry per target (``style_index``): a ``(1, 3, H, W)`` style image in ``[0, 1]``, or a
                sequence of them blended into one target (see :class:`~lightning_nst.core.losses.StyleLoss`).
            weights: Blend weights of each target's images (``None``: equal).
        """
        vgg = self.configure()
        device, dtype = vgg.mean.device, next(vgg.parameters()).dtype
        self.targets = nn.ModuleList()
        for index, entry in enumerate(images):
            group = [entry] if isinstance(entry, Tensor) else list(entry)
            features = [vgg(resize_long_edge(image, self.style_size).to(device=device, dtype=dtype)) for image in group]
            targets = {layer: [one[layer] for one in features] for layer in self.layers}
            blend = weights[index] if weights is not None else None
            self.targets.append(LayerStyleLoss(targets, self.statistic, self.layer_weights, weights=blend))

    def check_decoder(self, tiny_vae: object | None) -> None:
        """Raise if ``decoder`` is ``tiny`` but there is no tiny autoencoder (``model.tiny_vae``)."""
        if self.decoder == "tiny" and tiny_vae is None:
            raise NSTError("model.guidance.decoder: 'tiny' needs model.tiny_vae (an AutoencoderTiny folder or hub id)")

    def decoder_of(self, pipeline: Any) -> nn.Module:
        r"""The module that decodes :math:`\hat x_0` for the gradient."""
        tiny = getattr(pipeline, "tiny_vae", None)
        self.check_decoder(tiny)
        return tiny if tiny is not None and self.decoder != "vae" else pipeline.vae

    def settings(self) -> dict[str, Any]:
        """The options as plain values, for manifests, fingerprints and logs; builds the trunk to name its weights."""
        vgg = self.configure()
        return {
            "scale": self.scale,
            "window": list(self.window),
            "every_k": self.every_k,
            "normalize": self.normalize,
            "decoder": self.decoder,
            "guidance_size": self.guidance_size,
            "style_size": self.style_size,
            "layers": self.layer_weights or self.layers,
            "statistic": self.statistic,
            "vgg_weights": vgg.weights_used,
            "pooling": vgg.pooling,
            # Only where not the default, so that the fingerprints of earlier runs stay the same.
            **({"recurrence": self.recurrence} if self.recurrence else {}),
            **(
                {"recurrence_window": list(self.recurrence_window)}
                if self.recurrence and self.recurrence_window != (0.3, 0.7)
                else {}
            ),
            **({"descent_steps": self.descent_steps} if self.descent_steps != 1 else {}),
        }

    # -- the step -----------------------------------------------------------------------------------------------

    def is_active(self, step_index: int, num_steps: int) -> bool:
        """Whether step ``step_index`` of ``num_steps`` is corrected."""
        start, end = self.window
        return self.scale != 0 and start * num_steps <= step_index < end * num_steps and step_index % self.every_k == 0

    def repeats(self, step_index: int, num_steps: int) -> int:
        """Extra repeats of the step starting at evaluation ``step_index``: ``recurrence`` if guided and in window."""
        start, end = self.recurrence_window
        inside = start * num_steps <= step_index < end * num_steps
        return self.recurrence if inside and self.is_active(step_index, num_steps) else 0

    def style_loss(self, images: Tensor, style_index: Tensor) -> Tensor:
        """Style loss of ``(B, 3, H, W)`` images in ``[0, 1]`` against each one's style image, shape ``(B,)``.

        Images are resized to ``guidance_size`` first; the result is float32.
        """
        if not len(self.targets):
            raise RuntimeError("StyleGuidance.set_styles() must run before the style loss is measured")
        vgg = self.configure()
        image = resize_long_edge(images, self.guidance_size)
        features = vgg(image.to(next(vgg.parameters()).dtype))
        loss = torch.zeros(len(images), device=images.device, dtype=torch.float32)
        for style in style_index.unique().tolist():
            rows = (style_index == style).nonzero().squeeze(1)
            value = self.targets[style]({layer: features[layer][rows] for layer in self.layers})
            loss = loss.index_put((rows,), value.float())
        return loss

    def measure(self, decoder: nn.Module, x0: Tensor, style_index: Tensor) -> tuple[Tensor, Tensor]:
        """Decode ``x0`` and return ``(image, style_loss)``."""
        image = decode_latents(decoder, x0)
        return image, self.style_loss(image, style_index)

    def forward(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        r"""Measure the style loss of :math:`\hat x_0` and, on guided steps, correct ``noise_pred``."""
        latents, noise_pred = callback_kwargs["latents"], callback_kwargs["noise_pred"]
        style_index = callback_kwargs["style_index"]
        scheduler, decoder = pipeline.scheduler, self.decoder_of(pipeline)
        active = self.is_active(step_index, pipeline.num_timesteps)
        # Flux's latents are packed 2x2 patches; the decoder takes them as an image (GuidedDiffusion.spatial_latents).
        spatial = getattr(pipeline, "spatial_latents", None) or (lambda x0: x0)
        if active:
            for descent in range(self.descent_steps):
                with torch.enable_grad():
                    noise = noise_pred.detach().requires_grad_()
                    x0_image, x0_loss = self.measure(
                        decoder, spatial(predict_x0(scheduler, noise, latents, timestep)), style_index
                    )
                    (gradient,) = torch.autograd.grad(x0_loss.sum(), noise)
                if descent == 0:
                    image, loss = x0_image, x0_loss
                # A non-finite gradient (e.g. an fp16 overflow in the decoder) would wreck the sample: skip it instead.
                gradient = torch.where(torch.isfinite(gradient), gradient, torch.zeros_like(gradient))
                if self.normalize:
                    gradient = rms_normalize(gradient)
                noise_pred = noise_pred - self.scale * output_gain(scheduler, timestep) * gradient
        else:
            with torch.no_grad():
                x0 = spatial(predict_x0(scheduler, noise_pred, latents, timestep))
                image, loss = self.measure(decoder, x0, style_index)
        return {
            **callback_kwargs,
            "noise_pred": noise_pred,
            "style_loss": loss.detach(),
            "x0_image": image.detach(),
            "guided": active,
        }


def _layers(layers: Any) -> str:
    if isinstance(layers, Mapping):
        return ", ".join(f"{name} ({weight:g})" for name, weight in layers.items())
    return ", ".join(str(name) for name in layers)


def guidance_line(settings: Mapping[str, Any]) -> str:
    """``StyleGuidance.settings()`` as one readable line: ``scale 0.2, every step; gram on relu1_1, ...``."""
    start, end = settings["window"]
    every = settings["every_k"]
    steps = "every step" if every == 1 else f"every {every} steps"
    window = "" if (start, end) == (0.0, 1.0) else f" from {start:.0%} to {end:.0%} of the steps"
    if settings.get("recurrence"):
        start, end = settings.get("recurrence_window", (0.3, 0.7))
        window += (
            f", guided steps from {start:.0%} to {end:.0%} redone {settings['recurrence']} more time(s) (recurrence)"
        )
    if settings.get("descent_steps", 1) != 1:
        window += f", {settings['descent_steps']} descent steps each"
    size = settings["style_size"]
    style_size = "" if size == settings["guidance_size"] else f" (style images at {size} px)"
    return (
        f"scale {settings['scale']:g}{' (RMS-normalised)' if settings['normalize'] else ''}, {steps}{window}; "
        f"{settings['statistic']} on {_layers(settings['layers'])} at {settings['guidance_size']} px"
        f"{style_size}, decoder {settings['decoder']}, {settings['pooling']} pooling; "
        f"VGG19 weights: {settings['vgg_weights']}"
    )
