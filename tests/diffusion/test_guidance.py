"""Style guidance: the clean-latent prediction, the gradient step, its options and when the VGG trunk is built."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    KDPM2DiscreteScheduler,
)

from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import load_image
from lightning_nst.core.vgg import VGGConfig
from lightning_nst.diffusion import guidance as guidance_module
from lightning_nst.diffusion.guidance import Sampling, StyleGuidance, rms_normalize, vgg_dtype
from lightning_nst.diffusion.latents import decode_latents
from lightning_nst.diffusion.module import GuidedDiffusion
from lightning_nst.diffusion.samplers import check_prediction as check_scheduler
from lightning_nst.diffusion.samplers import predict_x0
from tests.conftest import PARTIAL_WEIGHTS_FILE, require_shared
from tests.tiny_pipeline import VGG

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_matches_the_scheduler(scheduler_class: type, prediction_type: str) -> None:
    scheduler = scheduler_class(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps[[0, 5, -1]]:
        expected = scheduler.step(output, t, sample, generator=generator).pred_original_sample
        torch.testing.assert_close(predict_x0(scheduler, output, sample, t), expected)


def test_schedulers_without_a_known_x0_are_refused_naming_the_reason() -> None:
    check_scheduler(DDIMScheduler())
    check_scheduler(EulerDiscreteScheduler())
    with pytest.raises(
        NSTError, match="^model.scheduler: KDPM2DiscreteScheduler is not supported by the guided sampler"
    ):
        check_scheduler(KDPM2DiscreteScheduler())
    with pytest.raises(NSTError, match="EulerAncestralDiscreteScheduler does not implement prediction_type 'sample'"):
        check_scheduler(EulerAncestralDiscreteScheduler(prediction_type="sample"))


class _Pipeline:
    """What the guidance callback needs from its pipeline: a scheduler, decoders and the step count."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.vae = AutoencoderKL(
            block_out_channels=[4, 8],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=2,
        ).requires_grad_(False)
        self.tiny_vae = None
        self.scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
        self.scheduler.set_timesteps(10)
        self.num_timesteps = 10

    def sampling(self) -> Sampling:
        """What GuidedDiffusion passes the guidance at every model evaluation."""
        return Sampling(self.scheduler, self.vae, self.tiny_vae, self.num_timesteps)


def test_one_guided_step_lowers_the_style_loss_of_x0() -> None:
    pipeline = _Pipeline()
    guidance = StyleGuidance(scale=0.05, guidance_size=32, layers=["relu1_1", "relu2_1"], vgg=VGGConfig(VGG))
    guidance.set_styles([load_image("skimage:immunohistochemistry", 64)])
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    t = pipeline.scheduler.timesteps[5]
    kwargs = {"latents": latents, "noise_pred": noise, "style_index": torch.tensor([0, 0])}
    with torch.no_grad():  # as in Lightning's predict loop: the callback must enable gradients itself
        out = guidance(pipeline.sampling(), 5, t, kwargs)
        after = guidance.style_loss(
            decode_latents(pipeline.vae, predict_x0(pipeline.scheduler, out["noise_pred"], latents, t)),
            kwargs["style_index"],
        )
    # Measured after/before: 0.83 and 0.84 with the real weights, 0.948 and 0.952 with random ones.
    assert out["guided"] and (after < out["style_loss"]).all()
    correction = (noise - out["noise_pred"]) / 0.05
    torch.testing.assert_close(correction.square().flatten(1).mean(1).sqrt(), torch.ones(2))  # unit RMS per sample
    assert out["x0_image"].shape == (2, 3, 32, 32)
    assert not any(parameter.grad is not None for parameter in pipeline.vae.parameters())


@pytest.mark.parametrize("magnitude", [1e-20, 1e-6, 1.0, 1e20])
def test_rms_normalize_gives_unit_rms_per_sample_at_any_scale(magnitude: float) -> None:
    # The style gradient is ~1e-12 on random VGG weights; its correction must still be a unit step, not 1e-12/eps.
    gradient = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gradient = gradient * torch.tensor([magnitude, 1.0, 0.0]).view(-1, 1, 1, 1)
    out = rms_normalize(gradient)
    torch.testing.assert_close(out[:2].square().flatten(1).mean(1).sqrt(), torch.ones(2))
    exact = gradient[0].double() / gradient[0].double().square().mean().sqrt()
    torch.testing.assert_close(out[0].double(), exact, rtol=1e-5, atol=1e-6)  # the direction is kept
    assert out.dtype == gradient.dtype and not out[2].any()  # an all-zero gradient stays zero, not NaN


def test_window_and_every_k_choose_the_guided_steps() -> None:
    guidance = StyleGuidance(window=(0.2, 0.8), every_k=2, layers=["relu1_1"], vgg=VGGConfig("random"))
    assert [step for step in range(10) if guidance.is_active(step, 10)] == [2, 4, 6]
    assert not any(
        StyleGuidance(scale=0, layers=["relu1_1"], vgg=VGGConfig("random")).is_active(s, 10) for s in range(10)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": (0.5, 0.2)}, "model.guidance.window"),
        ({"every_k": 0}, "model.guidance.every_k"),
        ({"layers": ["relu9_9"]}, "model.guidance.layers: unknown VGG19 layer 'relu9_9'"),
        (
            {"guidance_size": 8, "layers": ["relu5_1"]},
            "model.guidance.guidance_size: 8 px is too small for layer relu5_1",
        ),
        ({"statistic": "median"}, "model.guidance.statistic"),
        ({"vgg_precision": "16"}, "model.guidance.vgg_precision: must be one of auto, bfloat16, float32, got '16'"),
    ],
)
def test_guidance_options_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(NSTError, match=message.replace("(", r"\(").replace("[", r"\[")):
        StyleGuidance(**{"vgg": VGGConfig("random"), **kwargs})


# -- what is checked when -------------------------------------------------------------------------------------------


def test_the_vgg_trunk_is_built_on_first_use_not_in_init() -> None:
    guidance = StyleGuidance(layers=["relu1_1"], vgg=VGGConfig("missing.pth"))  # cheap: nothing is loaded yet
    assert guidance.vgg is None
    with pytest.raises(NSTError, match="^model.guidance.vgg.weights: weights file not found"):
        guidance.configure()
    built = StyleGuidance(layers=["relu1_1"], vgg=VGGConfig("random"))
    assert built.settings()["vgg_weights"] == "random (seed 0)"  # the weights in use are known once it is built
    assert built.vgg is not None and built.configure() is built.vgg  # built once


def test_tiny_decoder_without_tiny_vae_is_refused_by_one_check() -> None:
    guidance = StyleGuidance(decoder="tiny", layers=["relu1_1"], vgg=VGGConfig("random"))
    message = r"^model.guidance.decoder: 'tiny' needs model.tiny_vae \(an AutoencoderTiny folder or hub id\)$"
    with pytest.raises(NSTError, match=message):
        GuidedDiffusion(guidance=guidance)
    with pytest.raises(NSTError, match=message):  # a library caller's pipeline without one
        guidance.decoder_of(_Pipeline().vae, None)


# -- the VGG pass's precision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_auto_vgg_precision_is_bf16_where_the_device_computes_it_fast(
    monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    monkeypatch.setattr(guidance_module, "fast_bf16", lambda device: fast)
    guidance = StyleGuidance(guidance_size=32, layers=["relu1_1", "relu2_1"], vgg=VGGConfig("random"))
    guidance.set_styles([torch.rand(1, 3, 32, 32)])  # chooses on first use, as without a trainer
    expected = "bfloat16" if fast else "float32"
    assert guidance.vgg_dtype == expected and guidance.run_settings()["vgg_dtype"] == expected
    assert guidance.features(torch.rand(1, 3, 32, 32))["relu2_1"].dtype == getattr(torch, expected)
    assert guidance.style_loss(torch.rand(2, 3, 32, 32), torch.tensor([0, 0])).dtype == torch.float32
    assert "vgg_precision" not in guidance.settings()  # auto keeps the fingerprints of earlier runs
    assert guidance.use_precision("32-true") == expected  # GuidedDiffusion's call, with the trainer's precision


@pytest.mark.parametrize(
    ("choice", "precision", "trunk", "expected"),
    [
        # auto follows fast_bf16 under 32-true only; any other precision runs the trunk as the trainer does
        ("auto", "32-true", torch.float32, "bfloat16 if fast else float32"),
        ("auto", "bf16-mixed", torch.float32, "bfloat16"),
        ("auto", "bf16-true", torch.bfloat16, "bfloat16"),
        ("auto", "16-mixed", torch.float32, "float16"),  # Lightning's fp16 autocast is not overridden
        ("auto", "16-true", torch.float16, "float16"),
        ("auto", "64-true", torch.float64, "float64"),
        # explicit values are honoured under every precision and whatever the device
        ("bfloat16", "32-true", torch.float32, "bfloat16"),
        ("bfloat16", "16-mixed", torch.float32, "bfloat16"),
        ("float32", "bf16-mixed", torch.float32, "float32"),
        ("float32", "bf16-true", torch.bfloat16, "float32"),
    ],
)
@pytest.mark.parametrize("fast", [True, False])
def test_vgg_dtype_under_each_trainer_precision(
    monkeypatch: pytest.MonkeyPatch, choice: str, precision: str, trunk: torch.dtype, expected: str, fast: bool
) -> None:
    monkeypatch.setattr(guidance_module, "fast_bf16", lambda device: fast)
    if expected == "bfloat16 if fast else float32":
        expected = "bfloat16" if fast else "float32"
    assert vgg_dtype(choice, "cpu", precision, trunk) == expected


def test_explicit_vgg_precision_holds_inside_the_trainers_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guidance_module, "fast_bf16", lambda device: False)
    image = torch.rand(1, 3, 32, 32)

    def built(choice: str, precision: str | None) -> StyleGuidance:
        guidance = StyleGuidance(layers=["relu1_1"], vgg=VGGConfig("random"), vgg_precision=choice)  # type: ignore[arg-type]
        guidance.use_precision(precision)
        return guidance

    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16-mixed wraps predict_step in
        assert built("float32", "bf16-mixed").features(image)["relu1_1"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):  # 16-mixed: auto leaves the trainer's fp16 autocast alone
        assert built("auto", "16-mixed").features(image)["relu1_1"].dtype == torch.float16
        assert built("bfloat16", "16-mixed").features(image)["relu1_1"].dtype == torch.bfloat16
    assert built("bfloat16", "32-true").features(image)["relu1_1"].dtype == torch.bfloat16  # even where not fast
    # bf16-true converts the trunk to bfloat16: auto keeps it so, float32 converts it back
    for choice, expected in (("auto", torch.bfloat16), ("float32", torch.float32)):
        guidance = StyleGuidance(layers=["relu1_1"], vgg=VGGConfig("random"), vgg_precision=choice)  # type: ignore[arg-type]
        guidance.configure().to(torch.bfloat16)
        guidance.use_precision("bf16-true")
        assert next(guidance.configure().parameters()).dtype == expected
        assert guidance.features(image)["relu1_1"].dtype == expected


def _corrections(weights: str, precision: str, statistic: str) -> torch.Tensor:
    """The guidance correction of the noise prediction, over 3 seeds x 3 steps x 4 samples, with one VGG precision."""
    pipeline = _Pipeline()
    guidance = StyleGuidance(
        scale=1.0,
        guidance_size=32,
        layers=["relu1_1", "relu2_1", "relu3_1"],
        statistic=statistic,  # type: ignore[arg-type]
        vgg=VGGConfig(weights),
        vgg_precision=precision,  # type: ignore[arg-type]
    )
    guidance.set_styles([load_image("skimage:immunohistochemistry", 64)])
    corrections = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        latents, noise = torch.randn(4, 4, 16, 16, generator=generator), torch.randn(4, 4, 16, 16, generator=generator)
        for step in (1, 5, 9):
            kwargs = {"latents": latents, "noise_pred": noise, "style_index": torch.zeros(4, dtype=torch.long)}
            with torch.no_grad():
                out = guidance(pipeline.sampling(), step, pipeline.scheduler.timesteps[step], kwargs)
            assert out["noise_pred"].dtype == out["style_loss"].dtype == torch.float32  # only the VGG pass is bf16
            corrections.append(noise - out["noise_pred"])
    return torch.cat(corrections).flatten(1).double()


# Cosine similarity of the bf16 VGG pass's correction to float32's, per sample, at 32 px. Measured minimum over the
# 36 samples: random weights 0.99995 (gram), 0.9989 (meanvar), 0.9995 (w2), 0.9980 (sliced_w); the real weights of
# relu1_1-relu3_1 0.9966-0.9975 over the four statistics. Bounds keep 5x those distances from 1.
GRADIENT_COSINE = {"random": 0.99, "real": 0.98}


@pytest.mark.parametrize("weights", ["random", "real"])
@pytest.mark.parametrize("statistic", ["gram", "meanvar", "w2", "sliced_w"])
def test_the_bf16_vgg_pass_gives_float32s_guidance_direction(weights: str, statistic: str) -> None:
    path = "random" if weights == "random" else str(require_shared(PARTIAL_WEIGHTS_FILE))
    full, half = (_corrections(path, precision, statistic) for precision in ("float32", "bfloat16"))
    # By hand: torch's cosine_similarity clamps each norm to >= 1e-8, far above a random trunk's gradient.
    cosine = (full * half).sum(1) / (full.norm(dim=1) * half.norm(dim=1))
    assert cosine.min() >= GRADIENT_COSINE[weights], cosine.min()
    assert not torch.equal(full, half)  # the bf16 pass did run in bf16
