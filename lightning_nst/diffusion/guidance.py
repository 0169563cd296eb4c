r"""Style guidance: steer a diffusion sampler's noise prediction down the gradient of a VGG style loss.

At every model evaluation of the sampler, with latents :math:`x_t` and (classifier-free guided) noise prediction
:math:`\hat\epsilon`, the clean latents :math:`\hat x_0` are predicted as the scheduler's own ``step`` does
(:func:`~.samplers.predict_x0`): :math:`(x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon) / \sqrt{\bar\alpha_t}` for VP
samplers (DDIM, DDPM, PNDM, DPM-Solver++, UniPC, LCM) and :math:`x - \sigma\hat\epsilon` on the unscaled sample for
σ-space ones (Euler, Euler ancestral, LMS, Heun, DPM-SDE). :math:`\hat x_0` is decoded to an image and scored with
:class:`~lightning_nst.core.losses.LayerStyleLoss` against the style image. The correction is

.. math:: \tilde\epsilon = \hat\epsilon - s \, \frac{g}{\operatorname{rms}(g)}, \qquad g = \nabla_{\hat\epsilon} L

and the scheduler steps with :math:`\tilde\epsilon`. Flow-matching models (SD3, Flux) predict a velocity
:math:`v = \epsilon - x_0` instead: :math:`\hat x_0 = x_t - \sigma v`, and the correction of :math:`v` is divided by
:math:`1 - \sigma` (:func:`~.samplers.output_gain`), which is the same correction of the noise. Only
:math:`\hat x_0 \mapsto L` is differentiated: the UNet (or transformer) is not, which is what makes this cheaper
than classifier guidance through the denoiser.

One scale means one thing across samplers: the correction is in units of the noise's RMS whatever the sampler, and
a correction :math:`\delta` of :math:`\hat\epsilon` moves :math:`\hat x_0` by :math:`\sigma\delta` in σ-space and by
:math:`\sqrt{1-\bar\alpha}/\sqrt{\bar\alpha}\,\delta` in VP, the same amount at the same noise level, since
:math:`\sigma^2 = (1-\bar\alpha)/\bar\alpha` (``test_one_correction_moves_x0_alike_in_vp_and_sigma_space``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_nst.core.errors import NSTError
from lightning_nst.core.hardware import fast_bf16
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
from lightning_nst.diffusion.latents import decode_latents
from lightning_nst.diffusion.samplers import output_gain, predict_x0

Decoder = Literal["auto", "vae", "tiny"]
VGGPrecision = Literal["auto", "bfloat16", "float32"]
VGG_PRECISIONS: tuple[str, ...] = ("auto", "bfloat16", "float32")


def vgg_dtype(choice: str, device: str | torch.device, precision: str | None, trunk: torch.dtype) -> str:
    """The dtype the VGG pass computes in, by ``model.guidance.vgg_precision`` under the trainer's precision.

    ``bfloat16`` and ``float32`` are honoured as given. ``auto`` is ``bfloat16`` under ``32-true`` (or without a
    trainer, ``precision`` ``None``) where :func:`~lightning_nst.core.hardware.fast_bf16` says the device computes it
    natively, and ``float32`` where it does not; under any other precision it is what that precision runs the trunk
    in: ``bfloat16`` under ``bf16-mixed`` and ``bf16-true``, ``float16`` under ``16-mixed`` (Lightning's own fp16
    autocast, which ``auto`` does not override: ``16-mixed`` is chosen for fp16, e.g. on a GPU without fast bf16),
    the trunk's dtype under ``16-true`` or ``64-true``.

    Args:
        choice: ``auto``, ``bfloat16`` or ``float32``.
        device: The trunk's device.
        precision: ``str(trainer.precision)``, or ``None`` without a trainer.
        trunk: The dtype of the trunk's weights (Lightning's ``*-true`` precisions convert them).
    """
    if choice != "auto":
        return choice
    if precision in (None, "32-true"):
        return "bfloat16" if fast_bf16(device) else "float32"
    if str(precision).startswith("bf16"):
        return "bfloat16"
    if precision == "16-mixed":
        return "float16"
    return str(trunk).removeprefix("torch.")


def _unchanged(latents: Tensor) -> Tensor:
    return latents


class Sampling(NamedTuple):
    r"""What the guidance needs of the sampling it steers, passed in at every model evaluation.

    Attributes:
        scheduler: The scheduler, whose state says how :math:`\hat x_0` follows from the model output.
        vae: The pipeline's VAE.
        tiny_vae: The ``AutoencoderTiny`` of ``model.tiny_vae``, or ``None``.
        num_timesteps: The model evaluations of the whole sampling, for the guidance window.
        spatial: The latents as ``(B, C, h, w)`` for a decoder (Flux's packed tokens unpacked).
    """

    scheduler: Any
    vae: nn.Module
    tiny_vae: nn.Module | None
    num_timesteps: int
    spatial: Callable[[Tensor], Tensor] = _unchanged


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

    ``guidance(sampling, step_index, timestep, callback_kwargs) -> callback_kwargs`` runs between the noise
    prediction and the scheduler step. ``callback_kwargs`` holds ``latents`` (:math:`x_t`), ``noise_pred``
    (:math:`\hat\epsilon`) and ``style_index`` (which style image each sample targets); the result adds the corrected
    ``noise_pred``, the ``style_loss`` of :math:`\hat x_0` per sample, the decoded ``x0_image`` it was measured on
    and ``guided`` (whether the step was corrected). ``sampling`` (:class:`Sampling`) holds the scheduler, the
    decoders and the step count, as :class:`~lightning_nst.GuidedDiffusion` passes them.

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
            re-noise its result back to the step's starting noise level (:func:`~.samplers.renoise`, fresh noise from
            each item's generator) and take the step again, this many extra times; the scheduler's state is rolled
            back before each repeat (:func:`~.samplers.snapshot`). Each repeat costs the step's model evaluations
            again. 0 is off.
        recurrence_window: ``[start, end)`` fractions of the model evaluations where guided steps are repeated.
        descent_steps: Gradient steps on :math:`\hat x_0` per guided evaluation: each recomputes :math:`\hat x_0` from
            the corrected :math:`\tilde\epsilon`, decodes it and subtracts another ``scale`` times the RMS-normalised
            gradient, so ``scale`` is then the size of each descent step and the total correction grows up to
            ``descent_steps × scale``. The style loss and ``x0_image`` reported are those of the uncorrected
            :math:`\hat x_0`. No extra UNet call; each further descent step costs one decode and one VGG forward
            and backward pass.
        vgg_precision: What the VGG pass (forward and backward of the trunk, for the gradient and the measured loss)
            computes in: ``float32``, ``bfloat16`` (``torch.autocast``; the decoder, the style statistics, the loss,
            the gradient and the latents stay as they were) or ``auto``: ``bfloat16`` under ``trainer.precision:
            32-true`` where the device computes bfloat16 natively (CUDA Ampere and later, x86 CPUs with
            AVX512-BF16 or AMX), else what the trainer's precision runs it in (:func:`vgg_dtype`). The manifest
            records the dtype used as ``guidance.vgg_dtype``.
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
        vgg_precision: VGGPrecision = "auto",
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
        if vgg_precision not in VGG_PRECISIONS:  # the CLI's parser refuses it first; this is for the Python API
            raise NSTError(f"{key}.vgg_precision: must be one of {', '.join(VGG_PRECISIONS)}, got {vgg_precision!r}")
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
        self.vgg_precision = vgg_precision
        self.vgg_dtype: str | None = None  # what the VGG pass computes in, once use_precision() has chosen it
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
            # NCHW off CUDA: oneDNN's channels_last kernels round a batch of 4 differently enough from one item that
            # a guided SD3 item's final style loss moved 7.9 % between batch sizes (within 2 % in NCHW; README,
            # "Batch generation"), for a VGG pass that is a small part of a guided step there.
            self.vgg = self.vgg_config.build(self.layers, key="model.guidance.vgg", channels_last="cuda")
        return self.vgg

    def use_precision(self, precision: str | None = None) -> str:
        """Choose what the VGG pass computes in (:func:`vgg_dtype`) on the trunk's device; returns the dtype's name.

        :class:`~lightning_nst.GuidedDiffusion` calls it once the trunk is on its device, with ``trainer.precision``;
        otherwise the first style loss does, as without a trainer. ``float32`` under a precision that converted the
        trunk (``bf16-true``) converts it back.
        """
        vgg = self.configure()
        trunk = next(vgg.parameters()).dtype
        self.vgg_dtype = vgg_dtype(self.vgg_precision, vgg.mean.device, precision, trunk)
        if self.vgg_dtype == "float32" and trunk != torch.float32:
            vgg.float()
        return self.vgg_dtype

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """The trunk's features of ``(B, 3, H, W)`` images in ``[0, 1]``, in the dtype :meth:`use_precision` chose.

        ``bfloat16`` runs under ``torch.autocast`` (the features come out bfloat16; the style statistics cast them to
        float32); ``float32`` turns off an autocast around it (``bf16-mixed``, ``16-mixed``); other dtypes are left to
        the trainer's precision.
        """
        vgg = self.configure()
        if self.vgg_dtype is None:
            self.use_precision()
        device = vgg.mean.device.type
        context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.vgg_dtype == "bfloat16":
            context = torch.autocast(device, dtype=torch.bfloat16)
        elif self.vgg_dtype == "float32" and torch.is_autocast_enabled(device):
            context = torch.autocast(device, enabled=False)
        with context:
            return vgg(images.to(device=vgg.mean.device, dtype=next(vgg.parameters()).dtype))

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
        self.targets = nn.ModuleList()
        for index, entry in enumerate(images):
            group = [entry] if isinstance(entry, Tensor) else list(entry)
            features = [self.features(resize_long_edge(image, self.style_size)) for image in group]
            targets = {layer: [one[layer] for one in features] for layer in self.layers}
            blend = weights[index] if weights is not None else None
            self.targets.append(LayerStyleLoss(targets, self.statistic, self.layer_weights, weights=blend))

    def check_decoder(self, tiny_vae: object | None) -> None:
        """Raise if ``decoder`` is ``tiny`` but there is no tiny autoencoder (``model.tiny_vae``)."""
        if self.decoder == "tiny" and tiny_vae is None:
            raise NSTError("model.guidance.decoder: 'tiny' needs model.tiny_vae (an AutoencoderTiny folder or hub id)")

    def decoder_of(self, vae: nn.Module, tiny_vae: nn.Module | None) -> nn.Module:
        r"""The module that decodes :math:`\hat x_0` for the gradient: ``vae`` or ``tiny_vae``, as ``decoder`` says."""
        self.check_decoder(tiny_vae)
        return tiny_vae if tiny_vae is not None and self.decoder != "vae" else vae

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
            **({"vgg_precision": self.vgg_precision} if self.vgg_precision != "auto" else {}),
        }

    def run_settings(self) -> dict[str, Any]:
        """:meth:`settings` and ``vgg_dtype``, the dtype the VGG pass computes in once chosen: what a manifest holds."""
        return {**self.settings(), **({"vgg_dtype": self.vgg_dtype} if self.vgg_dtype is not None else {})}

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
        features = self.features(resize_long_edge(images, self.guidance_size))
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

    def forward(
        self, sampling: Sampling, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        r"""Measure the style loss of :math:`\hat x_0` and, on guided steps, correct ``noise_pred``."""
        latents, noise_pred = callback_kwargs["latents"], callback_kwargs["noise_pred"]
        style_index = callback_kwargs["style_index"]
        scheduler, decoder = sampling.scheduler, self.decoder_of(sampling.vae, sampling.tiny_vae)
        active = self.is_active(step_index, sampling.num_timesteps)
        spatial = sampling.spatial  # Flux's latents are packed 2x2 patches; the decoder takes them as an image
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
    """``StyleGuidance.settings()`` as one readable line: ``scale 0.2, every step; gram on relu1_1, ...``.

    With ``vgg_dtype`` (:meth:`StyleGuidance.run_settings`), it also says what the VGG pass computes in.
    """
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
    precision, ran = settings.get("vgg_precision", "auto"), settings.get("vgg_dtype")
    vgg_pass = f"; VGG pass in {ran} (vgg_precision {precision})" if ran else ""
    vgg_pass = vgg_pass or (f"; vgg_precision {precision}" if precision != "auto" else "")
    size = settings["style_size"]
    style_size = "" if size == settings["guidance_size"] else f" (style images at {size} px)"
    return (
        f"scale {settings['scale']:g}{' (RMS-normalised)' if settings['normalize'] else ''}, {steps}{window}; "
        f"{settings['statistic']} on {_layers(settings['layers'])} at {settings['guidance_size']} px"
        f"{style_size}, decoder {settings['decoder']}, {settings['pooling']} pooling; "
        f"VGG19 weights: {settings['vgg_weights']}{vgg_pass}"
    )
