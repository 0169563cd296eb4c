"""Style guidance on every supported diffusers sampler: x̂₀ as each scheduler computes it, and guided CLI runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image

from lightning_nst.diffusion import samplers
from lightning_nst.diffusion.catalog import SCHEDULERS
from lightning_nst.diffusion.samplers import predict_x0, scheduler_class
from lightning_nst.main import main
from tests.conftest import MODELS, cli_error
from tests.tiny_pipeline import GUIDANCE_VARIANTS, STEPS, records, sd_scheduler, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

# Stable Diffusion 1.x's scheduler settings, as the tiny pipeline saves them; each sampler is built from them.
SD_CONFIG = sd_scheduler().config


def _available(name: str) -> bool:
    try:
        scheduler_class(name)
    except Exception:  # dpmpp_sde without torchsde: its own test checks the message
        return False
    return True


# The SD samplers; the flow-matching ones (flow_euler, flow_heun) sample SD3 and Flux: tests/diffusion/test_families.py.
ALIASES = [name for name in SCHEDULERS if _available(name) and not name.startswith("flow_")]
Runs = dict[str, tuple[dict[str, Any], np.ndarray]]
# Guided (scale 0.3, 6 steps) over unguided final style loss, the bound each sampler must meet, for the models the
# tiny pipeline gets (conftest.MODELS); the measured ratios per sampler are in docs/benchmarks.md.
GUIDED_RATIO = {"real": 0.5, "random": 0.9}[MODELS]
SIGMA_SPACE = {"euler", "euler_a", "lms", "heun", "dpmpp_sde"}
# What each scheduler's own step returns as x̂₀ (None: it returns none, and x0_reference computes it).
OWN_X0 = {"lcm": "denoised", "dpmpp_2m": None, "unipc": None, "pndm": None}
# Prediction types a scheduler's step does not implement (check_scheduler refuses them).
UNSUPPORTED = {("euler_a", "sample"), ("dpmpp_sde", "sample"), ("pndm", "sample")}


def build(name: str, prediction_type: str = "epsilon") -> Any:
    cls, settings = scheduler_class(name)
    return cls.from_config(SD_CONFIG, **settings, prediction_type=prediction_type)


def x0_reference(scheduler: Any, name: str, output: torch.Tensor, sample: torch.Tensor, t: Any) -> torch.Tensor:
    """x̂₀ from the scheduler's own code where its step does not return it."""
    if name in ("dpmpp_2m", "unipc"):
        if scheduler.step_index is None:
            scheduler._init_step_index(t)  # what their step does first
        return scheduler.convert_model_output(output, sample=sample)  # dpmsolver++ and UniPC's predict_x0 give x0
    # PNDM: the VP formula of its _get_prev_sample, which predicts no x0 of its own.
    alpha = scheduler.alphas_cumprod[int(t)]
    if scheduler.config.prediction_type == "epsilon":
        return (sample - (1 - alpha).sqrt() * output) / alpha.sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * output
    return output


@pytest.mark.parametrize(
    ("name", "prediction_type"),
    [
        (name, prediction_type)
        for name in ALIASES
        for prediction_type in ("epsilon", "v_prediction", "sample")
        if (name, prediction_type) not in UNSUPPORTED  # refused in one line: see test_guidance.py
    ],
)
def test_x0_is_the_schedulers_own_at_every_evaluation(name: str, prediction_type: str) -> None:
    scheduler = build(name, prediction_type)
    scheduler.set_timesteps(8)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:  # every model evaluation: Heun's repeated timesteps, PNDM's warm-up
        output = torch.randn(2, 4, 8, 8, generator=generator)
        index = getattr(scheduler, "step_index", None)
        mine = predict_x0(scheduler, output, sample, t)
        assert getattr(scheduler, "step_index", None) == index  # reading x̂₀ leaves the solver's state alone
        scheduler.scale_model_input(sample, t)  # as the loop does, before the step
        if OWN_X0.get(name, "pred_original_sample") is None:
            expected = x0_reference(scheduler, name, output, sample, t)
            result = scheduler.step(output, t, sample, return_dict=False)
        else:
            result = (
                scheduler.step(output, t, sample, generator=generator)
                if name in ("ddpm", "euler_a", "lcm")
                else (scheduler.step(output, t, sample))
            )
            expected = getattr(result, OWN_X0.get(name, "pred_original_sample"))
            result = (result.prev_sample,)
        torch.testing.assert_close(mine, expected.float(), atol=1e-5, rtol=1e-5)
        sample = result[0]


def test_one_correction_moves_x0_alike_in_vp_and_sigma_space() -> None:
    # The same ε correction moves DDIM's x̂₀ (VP, sqrt(1-ᾱ)/sqrt(ᾱ)) and Euler's (σ-space, σ) by the same amount at
    # the same timestep, since σ² = (1-ᾱ)/ᾱ: so `scale` means the same displacement of x̂₀ on either.
    ddim = DDIMScheduler.from_config(SD_CONFIG)
    euler = EulerDiscreteScheduler.from_config(SD_CONFIG, timestep_spacing="leading")  # DDIM's timesteps
    ddim.set_timesteps(10)
    euler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x0, noise, correction = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    for index in (0, 4, 8):
        t = int(ddim.timesteps[index])
        alpha = ddim.alphas_cumprod[t]
        sigma = ((1 - alpha) / alpha).sqrt()
        vp_sample = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        euler_sample = vp_sample / alpha.sqrt()  # the same noisy latent in σ-space: x0 + σ·ε
        euler._step_index = euler.index_for_timestep(euler.timesteps[index])
        assert float(euler.sigmas[euler.step_index]) == pytest.approx(float(sigma), rel=1e-4)
        vp_move = predict_x0(ddim, noise + 0.2 * correction, vp_sample, t) - predict_x0(ddim, noise, vp_sample, t)
        sigma_t = euler.timesteps[index]
        sigma_move = predict_x0(euler, noise + 0.2 * correction, euler_sample, sigma_t) - predict_x0(
            euler, noise, euler_sample, sigma_t
        )
        torch.testing.assert_close(sigma_move, vp_move, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(vp_move, -0.2 * sigma * correction, rtol=1e-3, atol=1e-4)


# -- guided runs through the CLI, per sampler -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_runs(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Runs]]:
    """Per alias, on first use: the same prompt and seed with scale 0 and guided (scale 0.3).

    That scale 0 gives the image of a run without guidance, bit for bit, on every sampler, is
    test_item_independence.py's (with the same seed in other places of a run).
    """
    folder = tmp_path_factory.mktemp("sampler_runs")
    done: dict[str, Runs] = {}

    def runs(alias: str) -> Runs:
        if alias not in done:
            for variant in ("scale0", "guided"):
                override = GUIDANCE_VARIANTS[variant]
                name = f"{alias}-{variant}"
                main(tiny_args(pipeline_dir, name, f"--model.scheduler={alias}", override))
                (run,) = Path("logs", name).glob("version_*")  # in the calling test's folder (conftest._isolate)
                (record,) = records(run)
                with Image.open(run / record["image"]) as image:
                    done.setdefault(alias, {})[variant] = (record, np.asarray(image.convert("RGB")).copy())
        return done[alias]

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TORCH_HOME", str(folder / "torch_home"))
        yield runs


@pytest.mark.parametrize("alias", ALIASES)
def test_every_sampler_runs_guided_through_the_cli(alias: str, sampler_runs: Callable[[str], Runs]) -> None:
    runs = sampler_runs(alias)
    (unguided, unguided_image), (guided, guided_image) = (runs[variant] for variant in ("scale0", "guided"))
    assert guided["scheduler"] == scheduler_class(alias)[0].__name__
    # Guidance runs on every model evaluation that feeds a step: Heun's and DPM-SDE's 2 per step but the last,
    # PNDM's warm-up one.
    evaluations = {"heun": 2 * STEPS - 1, "dpmpp_sde": 2 * STEPS - 1, "pndm": STEPS + 1}.get(alias, STEPS)
    assert len(guided["timesteps"]) == len(guided["style_loss"]) == evaluations and all(guided["guided"])
    assert np.isfinite(guided["style_loss"]).all() and guided_image.shape == (64, 64, 3)
    # The manifest keeps the scheduler's timesteps, whole ones as ints (σ-space samplers' may be fractional).
    assert all(isinstance(t, int) or t % 1 for t in guided["timesteps"])
    # Measured guided/unguided final style loss with the models the tiny pipeline gets (conftest.MODELS): see
    # GUIDED_RATIO; every sampler must at least lower it.
    assert guided["final_style_loss"] < unguided["final_style_loss"] * GUIDED_RATIO
    assert not np.array_equal(guided_image, unguided_image)


def test_dpmpp_sde_without_torchsde_says_what_to_install(
    pipeline_dir: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        samplers, "_installed", lambda package: package != "torchsde"
    )  # as on a machine without the sde extra
    message = cli_error(capfd, tiny_args(pipeline_dir, "sde", "--model.scheduler=dpmpp_sde"))
    assert message == (
        "lightning-nst: error: model.scheduler: dpmpp_sde (DPMSolverSDEScheduler) needs torchsde: pip install torchsde"
    )


def test_a_scheduler_class_name_is_built_from_the_pipelines_config(pipeline_dir: Path) -> None:
    main(
        tiny_args(pipeline_dir, "byname", "--model.scheduler=UniPCMultistepScheduler", "--model.num_inference_steps=2")
    )
    (run,) = Path("logs", "byname").glob("version_*")
    (record,) = records(run)
    assert record["scheduler"] == "UniPCMultistepScheduler" and np.isfinite(record["final_style_loss"])
