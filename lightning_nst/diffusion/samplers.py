r"""The samplers of the guided loop: one table of what each one is, and the functions that read it.

Per sampler (a ``model.scheduler`` alias, :data:`SAMPLERS`): the diffusers class and the settings that make it that
sampler, the families it samples, how its ``step`` relates the model output to :math:`\hat x_0` (its :data:`Space`),
whether one of its steps spans several model evaluations, and what its ``step`` and ``set_timesteps`` accept. The
checks, one function each, run early (on names and the model's local scheduler config, before anything loads) and
late (on the scheduler :class:`~lightning_nst.GuidedDiffusion` builds): :func:`sampler` (the name is known and can be
guided), :func:`check_family`, :func:`check_steps` and :func:`check_prediction`. The mechanics the loop needs
(:func:`predict_x0`, :func:`noise_level`, :func:`renoise`, :func:`output_gain`, :func:`mid_step`, :func:`snapshot`,
:func:`restore`) read the same table.

Nothing here imports diffusers or torch when the module is imported: :mod:`lightning_nst.diffusion.catalog`, which the
report and ``lightning-nst generate --help`` import, takes its alias list from this table.

diffusers names used here that are not its documented API, and why:

- :func:`snapshot` and :func:`restore` copy and put back a scheduler's whole ``__dict__``, private attributes included
  (``_step_index``, ``_begin_index``, Heun's ``prev_derivative``/``dt``/``sample``, UniPC's ``last_sample``, PNDM's
  ``counter``/``cur_sample``/``ets``, LMS's ``derivatives``, the multistep solvers' ``model_outputs``/
  ``lower_order_nums``/``timestep_list``), because no scheduler offers to save and restore its state, which recurrence
  needs to take a step again. DPM-SDE's ``noise_sampler`` is left in place (see :data:`_PERSISTENT_STATE`).
- DPM-SDE's ``mid_point_sigma`` and ``state_in_first_order``, and PNDM's ``counter`` and ``prk_timesteps``: where the
  scheduler stands inside a step that spans several evaluations (:func:`mid_step`, :func:`predict_x0`); diffusers
  exposes no such property.
- DPM-SDE's ``noise_sampler_seed``, set by the loop (``GuidedDiffusion.predict_step``) so that each item's Brownian
  noise comes from its own seed.
- ``final_alpha_cumprod`` of DDIM, PNDM and LCM: the noise level of the sampler's output (:func:`noise_level`).

Elsewhere in the wing: :mod:`~lightning_nst.diffusion.loading` tests for ``diffusers.utils.deprecation_utils.
_resolve_dtype`` to tell whether ``from_pretrained`` takes ``dtype`` or ``torch_dtype``. The SDXL and Flux helpers the
pipelines keep as private methods are copied into :mod:`~lightning_nst.diffusion.families`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lightning_nst.core.errors import NSTError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Space = Literal["vp_timestep", "vp_sigma", "sigma", "flow"]
r"""How a sampler's ``step`` relates the model output to :math:`\hat x_0`, and the noise level of its samples.

- ``vp_timestep``: VP at the step's timestep, :math:`\bar\alpha` = ``alphas_cumprod[t]`` (DDIM, DDPM, PNDM, whose
  timesteps repeat one entry for its warm-up, each evaluation taken at the timestep the UNet was given; LCM, whose
  step moves from :math:`c_{out}\hat x_0 + c_{skip}x_t`, its ``denoised``, which is what is guided).
- ``vp_sigma``: VP at the step's σ, :math:`\bar\alpha = 1/(1+\sigma^2)` (DPM-Solver++ and UniPC, which convert the
  output to :math:`\hat x_0` from ``sigmas[step_index]`` in ``convert_model_output`` and keep that :math:`\hat x_0`,
  from the corrected output, in their history).
- ``sigma``: :math:`\hat x_0 = x - \sigma\epsilon` on the unscaled sample (the UNet saw ``scale_model_input``'s
  :math:`x/\sqrt{\sigma^2+1}`): Euler, Euler ancestral, LMS (which keeps the corrected derivative in its history), Heun
  and DPM-SDE, at σ = ``sigmas[step_index]``; Heun's schedule interleaves the sigmas of its two evaluations, so the
  same rule holds for both, and DPM-SDE's second evaluation is at ``mid_point_sigma``. Euler's churn is off: the loop
  never passes ``s_churn``.
- ``flow``: flow matching (SD3, Flux), :math:`x_t = (1-\sigma)x_0 + \sigma\epsilon`, the model predicts the velocity
  :math:`v = \epsilon - x_0`, so :math:`\hat x_0 = x_t - \sigma v` at σ = ``sigmas[step_index]`` (FlowMatchEuler's
  ``x0`` of its stochastic step; FlowMatchHeun interleaves its sigmas as Heun does).
"""

NOISE_FAMILIES = frozenset({"sd", "sdxl"})
"""Families whose models predict noise (or v, or the sample): Stable Diffusion 1.x/2.x and SDXL."""
FLOW_FAMILIES = frozenset({"sd3", "flux"})
"""Families trained with rectified flow: the model predicts a velocity, sampled by flow-matching samplers."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Sampler:
    """One sampler the guided loop runs.

    Attributes:
        alias: Its ``model.scheduler`` name.
        class_name: The diffusers scheduler class.
        space: How its ``step`` predicts x̂₀, and its samples' noise level (:data:`Space`).
        families: The model families it samples.
        settings: Settings of ``from_config`` that make the class this sampler.
        evaluations: ``pair`` where a step spans two model evaluations (Heun, DPM-SDE, FlowMatchHeun), ``pndm`` for
            PNDM's warm-up, ``one`` otherwise (:func:`mid_step`).
        no_prediction: Prediction types its ``step`` raises ``NotImplementedError`` for.
        takes: Which of the pipelines' ``set_timesteps`` arguments ``sigmas`` and ``mu`` it accepts.
        needs: A package its ``step`` imports, not installed with diffusers.
    """

    alias: str
    class_name: str
    space: Space
    families: frozenset[str] = NOISE_FAMILIES
    settings: Mapping[str, Any] = field(default_factory=dict)
    evaluations: Literal["one", "pair", "pndm"] = "one"
    no_prediction: tuple[str, ...] = ()
    takes: frozenset[str] = frozenset()
    needs: str | None = None


SAMPLERS: dict[str, Sampler] = {
    row.alias: row
    for row in (
        Sampler("ddim", "DDIMScheduler", "vp_timestep"),
        Sampler("ddpm", "DDPMScheduler", "vp_timestep"),
        # skip_prk_steps as Stable Diffusion 1.x configures it
        Sampler("pndm", "PNDMScheduler", "vp_timestep", settings={"skip_prk_steps": True}, evaluations="pndm",
                no_prediction=("sample",)),
        Sampler("euler", "EulerDiscreteScheduler", "sigma", takes=frozenset({"sigmas"})),
        Sampler("euler_a", "EulerAncestralDiscreteScheduler", "sigma", no_prediction=("sample",)),
        Sampler("lms", "LMSDiscreteScheduler", "sigma"),
        Sampler("heun", "HeunDiscreteScheduler", "sigma", evaluations="pair"),
        Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", "vp_sigma",
                settings={"algorithm_type": "dpmsolver++", "solver_order": 2}, takes=frozenset({"mu"})),
        Sampler("dpmpp_sde", "DPMSolverSDEScheduler", "sigma", evaluations="pair", no_prediction=("sample",),
                needs="torchsde"),
        Sampler("unipc", "UniPCMultistepScheduler", "vp_sigma", takes=frozenset({"sigmas", "mu"})),
        Sampler("lcm", "LCMScheduler", "vp_timestep"),
        # SD3's and Flux's own sampler
        Sampler("flow_euler", "FlowMatchEulerDiscreteScheduler", "flow", FLOW_FAMILIES,
                takes=frozenset({"sigmas", "mu"})),
        # SD3 only: it takes neither Flux's sigmas nor a dynamic shift (check_family)
        Sampler("flow_heun", "FlowMatchHeunDiscreteScheduler", "flow", FLOW_FAMILIES, evaluations="pair"),
    )
}  # fmt: skip
"""``model.scheduler`` aliases. Besides these, ``pipeline`` keeps the pipeline's own scheduler and a diffusers class
name (``EulerDiscreteScheduler``) names one; each is built ``from_config`` of the pipeline's scheduler, so betas,
offsets and spacing stay the model's."""

_BY_CLASS: dict[str, Sampler] = {row.class_name: row for row in SAMPLERS.values()}


# -- the checks ------------------------------------------------------------------------------------------------------


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _is_diffusers_scheduler(name: str) -> bool:
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cls = getattr(diffusers, name, None)
    return isinstance(cls, type) and issubclass(cls, SchedulerMixin)


def sampler(name: str) -> Sampler | None:
    """The sampler ``model.scheduler: name`` names (an alias or a class name), ``None`` for ``pipeline``.

    Raises unless the name is known, its x̂₀ is known here and what its ``step`` needs is installed. Imports diffusers
    only to word the refusal of a name the table does not hold.
    """
    if name == "pipeline":
        return None
    row = SAMPLERS.get(name) or _BY_CLASS.get(name)
    if row is None and _is_diffusers_scheduler(name):
        raise NSTError(
            f"model.scheduler: {name} cannot be guided: the guided sampler does not know its clean-latent "
            f"prediction x0; choose one of {', '.join(SAMPLERS)}"
        )
    if row is None:
        raise NSTError(
            f"model.scheduler: {name!r} is not a scheduler; choose {', '.join(SAMPLERS)}, pipeline (the "
            "pipeline's own) or a diffusers scheduler class name such as EulerDiscreteScheduler"
        )
    if row.needs is not None and not _installed(row.needs):
        raise NSTError(f"model.scheduler: {name} ({row.class_name}) needs {row.needs}: pip install {row.needs}")
    return row


def scheduler_class(name: str) -> tuple[type, dict[str, Any]] | None:
    """The class and settings ``model.scheduler: name`` builds; ``None`` for ``pipeline`` (:func:`sampler`)."""
    row = sampler(name)
    if row is None:
        return None
    import diffusers

    return getattr(diffusers, row.class_name), dict(row.settings)


def sampler_of(scheduler: Any, key: str = "model.scheduler") -> Sampler:
    """The table's row of a scheduler object (or of a class it derives from); raises for one the table lacks."""
    for cls in type(scheduler).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    raise NSTError(
        f"{key}: {type(scheduler).__name__} is not supported by the guided sampler: its clean-latent prediction x0 is "
        f"not known here (supported: {', '.join(_BY_CLASS)})"
    )


def schedule_arguments(family: str, config: Mapping[str, Any]) -> tuple[str, ...]:
    """What ``family``'s pipeline passes ``set_timesteps`` besides the steps, for a model of scheduler ``config``.

    Nothing for SD and SDXL; ``mu``, the shift by the image's token count, where the scheduler shifts dynamically
    (SD3, Flux); and for Flux ``sigmas`` from 1 to 1/steps, unless the scheduler has ``use_flow_sigmas``.
    """
    if family not in FLOW_FAMILIES:
        return ()
    mu = ("mu",) if config.get("use_dynamic_shifting", None) else ()
    sigmas = ("sigmas",) if family == "flux" and not config.get("use_flow_sigmas", False) else ()
    return (*sigmas, *mu)


def check_family(family: str, row: Sampler, name: str, config: Mapping[str, Any] | None = None) -> None:
    """Raise unless sampler ``row`` (``model.scheduler: name``) samples models of ``family``.

    With ``config``, the model's own scheduler config, also unless the sampler can run the schedule the family's
    pipeline sets for that model (:func:`schedule_arguments`), as diffusers would refuse it.
    """
    described = f"model.scheduler: {name} ({row.class_name})"
    if family not in row.families and row.space != "flow":
        flow = ", ".join(alias for alias, other in SAMPLERS.items() if other.space == "flow")
        raise NSTError(
            f"{described} samples noise-predicting models, but {family.upper()} is a flow-matching model: choose "
            f"{flow} or pipeline"
        )
    if family not in row.families:
        kind = "SDXL" if family == "sdxl" else "Stable Diffusion 1.x/2.x"
        raise NSTError(f"{described} samples flow-matching models (SD3, Flux), not {kind}")
    missing = [key for key in schedule_arguments(family, config) if key not in row.takes] if config is not None else []
    if missing:
        pipeline = "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline"
        why = {
            "sigmas": f"{pipeline} sets sigmas from 1 to 1/steps",
            "mu": "the model's scheduler config sets use_dynamic_shifting, a shift that follows the image size",
        }
        raise NSTError(
            f"{described} cannot run {family.upper()}'s own schedule: its set_timesteps takes no "
            f"{' and no '.join(missing)} ({'; '.join(why[key] for key in missing)}); choose flow_euler"
        )


def check_steps(steps: int, config: Mapping[str, Any], model: str, row: Sampler | None = None) -> None:
    """Raise unless a scheduler of ``config`` (the sampler ``row`` where known) can take ``steps`` steps.

    No more than the ``num_train_timesteps`` it was trained over, nor, for LCM, its ``original_inference_steps``.
    Values ``config`` lacks are not checked.
    """
    train = config.get("num_train_timesteps")
    if isinstance(train, int) and steps > train:
        raise NSTError(
            f"model.num_inference_steps: {steps} is more than the {train} timesteps the scheduler of {model} was "
            "trained over"
        )
    original = config.get("original_inference_steps")
    if row is not None and row.alias == "lcm" and isinstance(original, int) and steps > original:
        raise NSTError(
            f"model.num_inference_steps: {steps} is more than LCMScheduler's original_inference_steps ({original})"
        )


def check_prediction(scheduler: Any, key: str = "model.scheduler") -> Sampler:
    r"""Raise unless style guidance can compute :math:`\hat x_0` for ``scheduler``'s prediction type; its row."""
    row = sampler_of(scheduler, key)
    if row.space == "flow":
        return row  # velocity prediction is all they know
    name = type(scheduler).__name__
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise NSTError(f"{key}: prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if prediction_type in row.no_prediction:
        raise NSTError(f"{key}: {name} does not implement prediction_type {prediction_type!r}; choose another")
    if row.space == "vp_sigma" and scheduler.config.get("use_flow_sigmas"):
        raise NSTError(f"{key}: {name} with use_flow_sigmas is a flow-matching sampler, not a Stable Diffusion one")
    return row


# -- x̂₀ and noise levels ---------------------------------------------------------------------------------------------


def _step_index(scheduler: Any, timestep: Any) -> int:
    """The index ``step`` will use for ``timestep``, found as its ``_init_step_index`` does, without setting it."""
    if scheduler.step_index is not None:
        return scheduler.step_index
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    if hasattr(timestep, "to"):
        timestep = timestep.to(scheduler.timesteps.device)
    return scheduler.index_for_timestep(timestep)


def _sigma(scheduler: Any, timestep: Any) -> Tensor:
    import torch

    if sampler_of(scheduler).alias == "dpmpp_sde" and not scheduler.state_in_first_order:
        return torch.as_tensor(scheduler.mid_point_sigma)  # its second evaluation
    return scheduler.sigmas[_step_index(scheduler, timestep)]


def predict_x0(scheduler: Any, model_output: Tensor, sample: Tensor, timestep: Any) -> Tensor:
    r"""Clean-latent prediction from the model output, as the scheduler's ``step`` computes it (:data:`Space`).

    ``pred_original_sample`` for DDIM, DDPM, Euler, Euler ancestral, LMS, Heun and DPM-SDE; the ``x0_pred`` of
    ``convert_model_output`` for DPM-Solver++ and UniPC; ``denoised`` for LCM; for PNDM, which computes none, the VP
    formula at the timestep. ``sample`` is the scheduler's (unscaled) sample, not ``scale_model_input``'s output.
    Computed in float32 and differentiable in ``model_output``; no thresholding or clipping (Stable Diffusion
    configures neither). Reads the scheduler's state, never changes it.
    """
    import torch

    row = sampler_of(scheduler)
    output, sample = model_output.float(), sample.float()
    if row.space == "flow":
        return sample - _sigma(scheduler, timestep).to(device=sample.device, dtype=torch.float32) * output
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        check_prediction(scheduler)
    if row.space == "sigma":
        sigma = _sigma(scheduler, timestep).to(device=sample.device, dtype=torch.float32)
        if prediction_type == "sample":
            return output
        if prediction_type == "epsilon":
            return sample - sigma * output
        # v: c_out·v + c_skip·x with c_out = −σ/√(σ²+1) and c_skip = 1/(σ²+1), as EulerDiscreteScheduler.step
        return output * (-sigma / (sigma**2 + 1).sqrt()) + sample / (sigma**2 + 1)
    if row.space == "vp_sigma":
        sigma = scheduler.sigmas[_step_index(scheduler, timestep)].to(device=sample.device, dtype=torch.float32)
        alpha_prod = 1 / (sigma**2 + 1)  # _sigma_to_alpha_sigma_t: α_t = 1/√(σ²+1), σ_t = σ·α_t
    else:
        alpha_prod = scheduler.alphas_cumprod[int(timestep)].to(device=sample.device, dtype=torch.float32)
    beta_prod = 1 - alpha_prod
    if prediction_type == "sample":
        x0 = output
    elif prediction_type == "epsilon":
        x0 = (sample - beta_prod.sqrt() * output) / alpha_prod.sqrt()
    else:
        x0 = alpha_prod.sqrt() * sample - beta_prod.sqrt() * output
    if row.alias == "lcm":
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
    space = sampler_of(scheduler).space
    if space == "vp_timestep":
        if position < len(timesteps):
            alpha_prod = float(scheduler.alphas_cumprod[int(timesteps[position])])
        else:
            alpha_prod = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        return math.sqrt(alpha_prod), math.sqrt(1 - alpha_prod)
    # The loop's evaluation k is the scheduler's index offset + k (img2img starts at set_begin_index's index).
    offset = len(scheduler.timesteps) - len(timesteps)
    sigma = float(scheduler.sigmas[min(offset + position, len(scheduler.sigmas) - 1)])
    if space == "flow":
        return 1 - sigma, sigma
    if space == "vp_sigma":
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
    from diffusers.utils.torch_utils import randn_tensor

    (a_prev, b_prev), (a_t, b_t) = level, target
    noise = randn_tensor(sample.shape, generator=generators, device=sample.device, dtype=sample.dtype)
    carried = a_t * b_prev / a_prev
    return (a_t / a_prev) * sample + math.sqrt(max(b_t**2 - carried**2, 0.0)) * noise


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
    if sampler_of(scheduler).space != "flow":
        return 1.0
    sigma = float(_sigma(scheduler, timestep))
    if sigma <= 0:
        return 1.0  # clean: x̂₀ does not depend on v
    return min(1 / (1 - sigma), MAX_NOISE_TO_SIGNAL / sigma) if sigma < 1 else MAX_NOISE_TO_SIGNAL / sigma


# -- steps of several evaluations, and recurrence ----------------------------------------------------------------------


def mid_step(scheduler: Any) -> bool:
    """Whether the scheduler is between the model evaluations of one step, holding the step's first half.

    Heun, DPM-SDE and FlowMatchHeun between their two evaluations; PNDM inside a Runge-Kutta warm-up step (4
    evaluations) or, with ``skip_prk_steps``, between its first two evaluations, whose outputs it averages for the
    first step.
    """
    evaluations = sampler_of(scheduler).evaluations
    if evaluations == "pair":
        return not scheduler.state_in_first_order
    if evaluations == "pndm":
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
