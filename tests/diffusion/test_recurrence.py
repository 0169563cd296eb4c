"""Guidance schedule options: recurrence (time travel) with the solver's state rolled back, and x̂₀ descent steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_nst.core.images import load_image
from lightning_nst.core.vgg import VGGConfig
from lightning_nst.diffusion.catalog import SCHEDULERS
from lightning_nst.diffusion.guidance import StyleGuidance
from lightning_nst.diffusion.latents import decode_latents
from lightning_nst.diffusion.module import DenoisingCallback
from lightning_nst.diffusion.samplers import mid_step, noise_level, predict_x0, restore, scheduler_class, snapshot
from lightning_nst.main import main
from tests.conftest import cli_error
from tests.diffusion.test_guidance import _Pipeline
from tests.tiny_pipeline import STEPS, VGG, records, sd_scheduler, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

SD_CONFIG = sd_scheduler().config


def _available(name: str) -> bool:
    try:
        scheduler_class(name)
    except Exception:  # dpmpp_sde without torchsde
        return False
    return True


# The SD samplers; the flow-matching ones (flow_euler, flow_heun) sample SD3 and Flux: tests/diffusion/test_families.py.
ALIASES = [name for name in SCHEDULERS if _available(name) and not name.startswith("flow_")]
STOCHASTIC = {"ddpm", "euler_a", "lcm", "dpmpp_sde"}


def build(name: str) -> Any:
    cls, settings = scheduler_class(name)
    extra = {"noise_sampler_seed": 0} if name == "dpmpp_sde" else {}  # the same Brownian tree in both copies
    scheduler = cls.from_config(SD_CONFIG, **settings, **extra)
    scheduler.set_timesteps(8)
    return scheduler


def state_of(scheduler: Any) -> dict[str, Any]:
    """The step counters and history lengths a solver keeps between steps."""
    names = ("step_index", "lower_order_nums", "counter", "this_order", "state_in_first_order")
    state = {name: getattr(scheduler, name) for name in names if hasattr(scheduler, name)}
    for name in ("model_outputs", "timestep_list", "derivatives", "ets"):
        if hasattr(scheduler, name):
            state[name] = sum(value is not None for value in getattr(scheduler, name))
    return state


def _step(scheduler: Any, output: torch.Tensor, t: Any, sample: torch.Tensor, seed: int) -> torch.Tensor:
    kwargs = (
        {"generator": torch.Generator().manual_seed(seed)}
        if scheduler.__class__.__name__
        in (
            "DDPMScheduler",
            "EulerAncestralDiscreteScheduler",
            "LCMScheduler",
        )
        else {}
    )
    scheduler.scale_model_input(sample, t)
    return scheduler.step(output, t, sample, **kwargs, return_dict=False)[0]


@pytest.mark.parametrize("name", ALIASES)
def test_a_restored_scheduler_steps_as_if_the_step_never_happened(name: str) -> None:
    # Every evaluation: snapshot, step with some other output, restore, step with the real one. The result and the
    # solver's state must be those of a copy that only took the real steps (multistep history, step_index, Heun's
    # half-step, PNDM's ets/counter/cur_sample, LMS's derivatives, DPM-SDE's Brownian noise).
    repeated, reference = build(name), build(name)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator) * reference.init_noise_sigma
    mine = sample.clone()
    for index, t in enumerate(reference.timesteps):
        output, detour = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
        state = snapshot(repeated)
        _step(repeated, detour, t, mine, seed=1000 + index)
        restore(repeated, state)
        mine = _step(repeated, output, t, mine, seed=index)
        sample = _step(reference, output, t, sample, seed=index)
        torch.testing.assert_close(mine, sample, rtol=1e-5, atol=1e-6)
        assert state_of(repeated) == state_of(reference)
        assert mid_step(repeated) == mid_step(reference)


@pytest.mark.parametrize("name", [name for name in ALIASES if name not in ("lcm",)])
def test_noise_level_is_the_one_add_noise_gives(name: str) -> None:
    # The re-noising rule x = a·x0 + b·ε at each evaluation, against the scheduler's own forward process
    # (LCM's add_noise is DDPM's, checked through ddim and ddpm).
    scheduler = build(name)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    timesteps = scheduler.timesteps
    for position in range(len(timesteps)):
        if mid_step(scheduler) or (position and timesteps[position] == timesteps[position - 1]):
            continue  # Heun's and DPM-SDE's second evaluations and PNDM's repeated timestep: not where steps start
        a, b = noise_level(scheduler, timesteps, position)
        expected = scheduler.add_noise(x0, noise, timesteps[position : position + 1])
        torch.testing.assert_close(a * x0 + b * noise, expected, rtol=1e-4, atol=1e-4)
        if position >= 3:  # img2img runs the last timesteps only: the same evaluation has the same level
            assert noise_level(scheduler, timesteps[3:], position - 3) == (a, b)
    assert noise_level(scheduler, timesteps[3:], len(timesteps) - 3) == noise_level(
        scheduler, timesteps, len(timesteps)
    )


def test_descent_steps_lower_the_x0_loss_and_report_the_uncorrected_one() -> None:
    pipeline = _Pipeline()
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    t = pipeline.scheduler.timesteps[5]
    style = load_image("skimage:immunohistochemistry", 64)
    results, after = {}, {}
    for steps in (1, 2, 3):
        guidance = StyleGuidance(
            scale=0.05, guidance_size=32, layers=["relu1_1", "relu2_1"], vgg=VGGConfig(VGG), descent_steps=steps
        )
        guidance.set_styles([style])
        kwargs = {"latents": latents, "noise_pred": noise, "style_index": torch.tensor([0, 0])}
        with torch.no_grad():
            results[steps] = guidance(pipeline.sampling(), 5, t, kwargs)
            x0 = predict_x0(pipeline.scheduler, results[steps]["noise_pred"], latents, t)
            after[steps] = guidance.style_loss(decode_latents(pipeline.vae, x0), kwargs["style_index"])
    for steps in (2, 3):
        torch.testing.assert_close(results[steps]["style_loss"], results[1]["style_loss"])  # the uncorrected x̂₀
        torch.testing.assert_close(results[steps]["x0_image"], results[1]["x0_image"])
    assert (after[3] < after[2]).all() and (after[2] < after[1]).all() and (after[1] < results[1]["style_loss"]).all()
    # scale per descent step: each adds a unit-RMS correction times scale
    rms = (noise - results[2]["noise_pred"]).square().flatten(1).mean(1).sqrt() / 0.05
    assert ((rms > 1.0) & (rms <= 2.0 + 1e-4)).all()


def test_default_options_leave_the_recorded_settings_as_before() -> None:
    # Fingerprints of earlier runs stay valid: the new options appear only when set.
    base = StyleGuidance(layers=["relu1_1"], vgg=VGGConfig("random")).settings()
    assert not {"recurrence", "recurrence_window", "descent_steps"} & set(base)
    changed = StyleGuidance(
        layers=["relu1_1"], vgg=VGGConfig("random"), recurrence=2, recurrence_window=(0.2, 0.6), descent_steps=3
    ).settings()
    assert changed == {**base, "recurrence": 2, "recurrence_window": [0.2, 0.6], "descent_steps": 3}


def test_only_guided_steps_in_the_recurrence_window_repeat() -> None:
    guidance = StyleGuidance(recurrence=2, window=(0.0, 0.5), layers=["relu1_1"], vgg=VGGConfig("random"))
    assert [guidance.repeats(step, 10) for step in range(10)] == [0, 0, 0, 2, 2, 0, 0, 0, 0, 0]
    off = StyleGuidance(scale=0, recurrence=2, layers=["relu1_1"], vgg=VGGConfig("random"))
    assert not any(off.repeats(step, 10) for step in range(10))


# -- through the CLI, on the tiny pipeline -----------------------------------------------------------------------------


class SolverState(DenoisingCallback):
    """Records the scheduler's counters after every reported evaluation, and each batch's UNet calls."""

    steps: ClassVar[list[tuple[int, dict[str, Any]]]] = []
    evaluations: ClassVar[list[int]] = []

    def on_denoising_step(
        self, trainer: Any, pl_module: Any, step_index: int, timestep: int, callback_kwargs: dict[str, Any]
    ) -> None:
        SolverState.steps.append((step_index, state_of(pl_module.scheduler)))

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
        SolverState.evaluations.append(outputs["model_evaluations"])


Run = tuple[dict[str, Any], np.ndarray, list[tuple[int, dict[str, Any]]], int]


@pytest.fixture(scope="module")
def run(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Run]]:
    """``run(name, alias, *overrides)``: one item through ``lightning-nst predict``, with :class:`SolverState`."""
    folder = tmp_path_factory.mktemp("recurrence_runs")

    def predict(name: str, alias: str, *overrides: str) -> Run:
        SolverState.steps.clear()
        SolverState.evaluations.clear()
        callback = "--trainer.callbacks+=tests.diffusion.test_recurrence.SolverState"
        main(tiny_args(pipeline_dir, name, f"--model.scheduler={alias}", callback, *overrides))
        (version,) = Path("logs", name).glob("version_*")
        (record,) = records(version)
        with Image.open(version / record["image"]) as image:
            pixels = np.asarray(image.convert("RGB")).copy()
        (evaluations,) = SolverState.evaluations
        return record, pixels, list(SolverState.steps), evaluations

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TORCH_HOME", str(folder / "torch_home"))
        yield predict


RECURRENCE = "--model.guidance.init_args.recurrence"
WINDOW = "--model.guidance.init_args.recurrence_window"
# Model evaluations of the 6-step schedule, and the extra ones of recurrence 2 in [0.3, 0.7): DPM++/UniPC/Euler-a
# repeat evaluations 2, 3 and 4 (2 × 3 extra); Heun's 11 evaluations are pairs (0,1) (2,3) ... (10 alone), and
# the pairs starting at 4 and 6 repeat (2 × 2 × 2 extra).
EXPECTED = {"dpmpp_2m": (STEPS, 6), "unipc": (STEPS, 6), "euler_a": (STEPS, 6), "heun": (2 * STEPS - 1, 8)}


@pytest.mark.parametrize("alias", list(EXPECTED))
def test_recurrence_leaves_the_solver_where_a_plain_run_does(alias: str, run: Callable[..., Run]) -> None:
    plain, _, plain_states, plain_calls = run(f"{alias}-plain", alias, "--model.guidance.init_args.scale=0")
    guided, _, _, _ = run(f"{alias}-guided", alias)
    record, pixels, states, calls = run(f"{alias}-rec", alias, f"{RECURRENCE}=2")
    evaluations, extra = EXPECTED[alias]
    assert plain_calls == evaluations and calls == evaluations + extra
    # One entry per scheduled evaluation, the last repeat's, and the solver's counters at each where a plain run
    # has them: step_index, lower_order_nums, history lengths, Heun's half-step.
    assert states == plain_states and [step for step, _ in states] == list(range(evaluations))
    assert len(record["style_loss"]) == len(record["guided"]) == evaluations
    assert record["timesteps"] == plain["timesteps"]
    assert record["guidance"]["recurrence"] == 2
    assert record["model_evaluations"] == calls and "model_evaluations" not in plain  # the manifest counts UNet calls
    assert np.isfinite(record["style_loss"]).all() and np.isfinite(record["final_style_loss"])
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    assert record["final_style_loss"] < plain["final_style_loss"]
    assert guided["final_style_loss"] != record["final_style_loss"]  # the repeats did change the image


def test_recurrence_without_a_guided_step_in_its_window_changes_nothing(run: Callable[..., Run]) -> None:
    # Guidance on the first half, recurrence 2 on the second: no step repeats, and with descent_steps 1 the image is
    # bit for bit that of the same run without the options.
    half = "--model.guidance.init_args.window=[0.0, 0.5]"
    _, plain, _, _ = run("dpmpp-half", "dpmpp_2m", half)
    options = (f"{RECURRENCE}=2", f"{WINDOW}=[0.5, 1.0]", "--model.guidance.init_args.descent_steps=1")
    record, pixels, _, calls = run("dpmpp-half-rec", "dpmpp_2m", half, *options)
    assert calls == STEPS and record["guided"] == [True] * 3 + [False] * 3
    assert np.array_equal(pixels, plain)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (f"{RECURRENCE}=-1", "model.guidance.recurrence: must be >= 0"),
        (f"{WINDOW}=[0.5, 1.5]", "model.guidance.recurrence_window: need 0 <= start <= end <= 1, got [0.5, 1.5]"),
        (f"{WINDOW}=[0.7, 0.3]", "model.guidance.recurrence_window: need 0 <= start <= end <= 1, got [0.7, 0.3]"),
        ("--model.guidance.init_args.descent_steps=0", "model.guidance.descent_steps: must be >= 1, got 0"),
    ],
)
def test_bad_schedule_options_give_one_line_naming_the_key(
    override: str, message: str, pipeline_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    line = cli_error(capfd, tiny_args(pipeline_dir, "bad", override))
    assert line.startswith(f"lightning-nst: error: {message}")
    assert not Path("logs", "bad").exists()
