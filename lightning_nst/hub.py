"""Names of diffusers models and samplers, kept apart from the modules that load them.

Importing :mod:`lightning_nst.diffusion` imports diffusers and transformers (about a second); the report, the
``generate`` shortcut and the CLI's help only need the names.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The Stable Diffusion pipeline used when none is given: Stable Diffusion 1.5, as in the shipped configs."""

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as Stable Diffusion 1.x configures it
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),  # SD3's and Flux's own sampler
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
"""``model.scheduler`` aliases: the diffusers class and the settings that make it the named sampler (the ``flow_``
ones for the flow-matching SD3 and Flux, the others for SD 1.x/2.x and SDXL). Besides these,
``pipeline`` keeps the pipeline's own scheduler and a diffusers class name (``EulerDiscreteScheduler``) names one.
Each is built ``from_config`` of the pipeline's scheduler, so betas, offsets and spacing stay the model's."""
