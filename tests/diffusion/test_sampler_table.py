"""The sampler table (lightning_nst/diffusion/samplers.py) against diffusers; the helpers copied from diffusers."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from lightning_nst.core.errors import NSTError
from lightning_nst.diffusion.families import add_time_ids, latent_image_ids, pack_latents, unpack_latents
from lightning_nst.diffusion.samplers import SAMPLERS, check_steps, sampler, scheduler_class

REPO = Path(__file__).resolve().parents[2]


def test_each_row_names_a_diffusers_scheduler_and_what_its_set_timesteps_takes() -> None:
    for alias, row in SAMPLERS.items():
        cls = getattr(diffusers, row.class_name)
        assert issubclass(cls, SchedulerMixin), alias
        accepted = inspect.signature(cls.set_timesteps).parameters
        assert row.takes == {name for name in ("sigmas", "mu") if name in accepted}, alias
        assert sampler(row.class_name) is row  # a class name names the same sampler as its alias


def test_the_names_are_checked_without_diffusers() -> None:
    # The CLI's help and the report read the catalogue, which takes its aliases from the table; the name checks need
    # no diffusers either, but for wording the refusal of a name the table lacks.
    code = (
        "import sys\n"
        "from lightning_nst.diffusion.catalog import SCHEDULERS\n"
        "from lightning_nst.diffusion.samplers import SAMPLERS, check_family, check_steps, sampler\n"
        "row = sampler('flow_heun')\n"
        "check_family('sd3', row, 'flow_heun', {})\n"
        "check_steps(5, {'num_train_timesteps': 1000}, 'm', row)\n"
        "assert sampler('pipeline') is None and list(SCHEDULERS) == list(SAMPLERS)\n"
        "print(sorted(m for m in ('diffusers', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nonsense", "model.scheduler: 'nonsense' is not a scheduler; choose ddim, ddpm"),
        ("KDPM2DiscreteScheduler", "model.scheduler: KDPM2DiscreteScheduler cannot be guided"),
    ],
)
def test_an_unknown_name_is_refused_in_one_line(name: str, message: str) -> None:
    with pytest.raises(NSTError, match=f"^{message}") as refusal:
        scheduler_class(name)
    assert "\n" not in str(refusal.value)


def test_the_step_count_check_reads_what_the_config_has() -> None:
    lcm = SAMPLERS["lcm"]
    check_steps(60, {}, "m", lcm)  # nothing known: left to loading
    with pytest.raises(NSTError, match=r"^model.num_inference_steps: 60 is more than the 50 timesteps"):
        check_steps(60, {"num_train_timesteps": 50}, "m")
    with pytest.raises(NSTError, match=r"^model.num_inference_steps: 60 is more than LCMScheduler's original"):
        check_steps(60, {"num_train_timesteps": 1000, "original_inference_steps": 50}, "m", lcm)
    check_steps(60, {"num_train_timesteps": 1000, "original_inference_steps": 50}, "m", SAMPLERS["ddim"])


def test_sdxl_time_ids_equal_the_pipelines_own(sdxl_dir: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(sdxl_dir)
    projection = pipe.text_encoder_2.config.projection_dim
    for size in ((64, 64), (64, 128)):
        ours = add_time_ids(pipe.unet, size, (0, 0), size, torch.float32, projection)
        theirs = pipe._get_add_time_ids(size, (0, 0), size, torch.float32, text_encoder_projection_dim=projection)
        assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="expects an added time embedding vector"):
        add_time_ids(pipe.unet, (64, 64), (0, 0), (64, 64), torch.float32, projection + 1)


def test_flux_ids_and_packing_equal_the_pipelines_own(flux_dir: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(flux_dir)
    factor = pipe.vae_scale_factor
    for height, width in ((64, 64), (64, 96)):
        h, w = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
        ours = latent_image_ids(h // 2, w // 2, torch.device("cpu"), torch.float32)
        assert torch.equal(ours, pipe._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32))
        latents = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(0))
        packed = pack_latents(latents, 2, 16, h, w)
        assert torch.equal(packed, pipe._pack_latents(latents, 2, 16, h, w))
        assert torch.equal(
            unpack_latents(packed, height, width, factor), pipe._unpack_latents(packed, height, width, factor)
        )
        assert torch.equal(unpack_latents(packed, height, width, factor), latents)
