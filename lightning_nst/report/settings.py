"""``ReportSettings``: the options of ``lightning-nst report``."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_nst.core.errors import NSTError
from lightning_nst.core.vgg import DEFAULT_STYLE_LAYERS, VGGConfig
from lightning_nst.diffusion.catalog import DEFAULT_MODEL

TEXTURES = ["sample:gravel", "sample:brick", "sample:grass", "sample:immunohistochemistry", "sample:coffee"]
"""Experiment 3's default textures: the shipped copies of five scikit-image samples, three grey and two in colour."""


@dataclass
class ReportSettings:
    """Options of ``lightning-nst report``; each experiment uses those it needs.

    The defaults are the study's full-size settings (for a GPU and ImageNet weights); ``configs/report_cpu.yaml``
    shrinks them for a CPU. The default images are the samples shipped with the package (``sample:NAME``), so a
    report needs no scikit-image; reports made before they were (``skimage:NAME``) record those in ``report.yaml``.

    Attributes:
        out: Report folder; ``reports/<experiment>`` by default.
        overwrite: Replace a report in ``out`` that was made with other settings.
        size: Long edge, in pixels, of the optimised images (experiments 1-4).
        steps: Optimisation steps of every image-optimisation run.
        vgg: VGG19 weights and pooling of every run and of the report's own style measurements.
        allow_random_weights: Make the report even when ``vgg.weights`` resolves to random weights (``random``, or
            ``auto`` with neither ImageNet nor ``$LIGHTNING_NST_VGG_WEIGHTS``); otherwise it is refused before any
            run, since its figures and verdicts would say nothing about the study. A partial weights file with
            ``fill_missing`` is not random: its figures and tables label the layers beyond it.
        content: Content image of experiment 1, and the content photo of ``guided_img2img_vs_nst``.
        texture: Texture image of experiment 2.
        textures: Texture images of experiment 3; each claim there is counted over every texture and seed.
        style: Style image of experiments 4 and 5 and of ``guided_img2img_vs_nst``; style A of ``style_controls``.
        second_style: Style B of ``style_controls`` (blends and masks), another image than ``style``.
        blend_weights: Weights of style A in ``style_controls``' blend sweep (style B gets ``1 - w``), each in
            ``[0, 1]`` and given once.
        masks: Two mask images (white = that style) of ``style_controls``' masked run: style A on the first's
            region, style B on the second's; the aspect ratio of ``content``.
        layers: Layers of experiment 1; by default all 37 (each conv with its relu, and the pools).
        style_layers: Style layers of experiments 3-5 and of the style loss all of them report.
        content_layer: Content layer of the NST runs of experiment 4.
        gram_weight: Style weight of Gram objectives.
        meanvar_weight: Style weight of mean/variance objectives.
        fraction: Experiment 2 counts the steps each layer set needs to reach this fraction of its initial loss.
        model: Stable Diffusion pipeline of experiments 4 and 5: a hub id or a local folder.
        tiny_vae: Optional ``AutoencoderTiny`` for the guidance gradient.
        prompt: Prompt of experiments 4 and 5.
        content_prompt: Prompt of ``guided_img2img_vs_nst``'s img2img runs: what the content photo shows.
        strengths: img2img strengths of ``guided_img2img_vs_nst``, each in (0, 1]; guided and unguided at each.
        style_prompt: Words appended to the prompt for the prompt-only baseline of experiment 5.
        negative_prompt: Negative prompt of every generation.
        seed: Seed of the generations (and of the noise of image optimisation).
        seeds: Noise seeds of experiment 3's syntheses, each run on every texture.
        timing_repeats: Interleaved repetitions of experiment 3's timing of VGG + loss for each statistic.
        sampling_steps: DDIM sampling steps.
        image_size: Side of the generated images, in pixels; ``null`` for the pipeline's native size. img2img
            keeps the content photo's aspect ratio with this long edge (``null``: the photo's own).
        cfg_scale: Classifier-free guidance scale.
        guidance_scale: Strength of the style guidance.
        guidance_size: Long edge the decoded images are resized to before VGG, for guidance and for every style
            loss in experiments 4 and 5 and ``guided_img2img_vs_nst``; that experiment's PSNR and SSIM are measured
            at the content photo's size at this long edge.
        rows: Rows (points in time) of the tables of experiment 4.
        timesteps: Timesteps experiment 5 shows; each is matched to the nearest step of the sampler.
        train_photos: Training photos of ``fast_vs_optimisation``'s network: a folder, or ``sample:*`` for the
            shipped samples other than the held-out photos.
        held_out: Photos ``fast_vs_optimisation`` stylizes with the network and by optimisation; never trained on
            when ``train_photos`` is ``sample:*``.
        train_steps: Training steps of ``fast_vs_optimisation``'s network.
        train_size: Side of the random crops that network trains on.
        accelerator: Lightning accelerator of every run.
        precision: Lightning precision of every run.
        progress_bar: Show Lightning's progress bars.
    """

    out: str | None = None
    overwrite: bool = False
    size: int = 256
    steps: int = 500
    vgg: VGGConfig = field(default_factory=VGGConfig)
    allow_random_weights: bool = False
    content: str = "sample:astronaut"
    texture: str = "sample:gravel"
    textures: list[str] = field(default_factory=lambda: list(TEXTURES))
    style: str = "sample:immunohistochemistry"
    second_style: str = "sample:gravel"
    blend_weights: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    masks: list[str] = field(default_factory=lambda: ["sample:mask_left", "sample:mask_right"])
    layers: list[str] | None = None
    style_layers: list[str] = field(default_factory=lambda: list(DEFAULT_STYLE_LAYERS))
    content_layer: str = "relu4_2"
    gram_weight: float = 1e6
    meanvar_weight: float = 1e3
    fraction: float = 0.01
    model: str = DEFAULT_MODEL
    tiny_vae: str | None = None
    prompt: str = "a lighthouse on a rocky coast at dusk"
    content_prompt: str = "an astronaut in a spacesuit, portrait"
    strengths: list[float] = field(default_factory=lambda: [0.5, 0.8])
    style_prompt: str = "in the style of a stained microscope slide, purple and brown blotches on white"
    negative_prompt: str = "blurry, low quality"
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    timing_repeats: int = 30
    sampling_steps: int = 50
    image_size: int | None = 512
    cfg_scale: float = 7.5
    guidance_scale: float = 0.2
    guidance_size: int = 256
    rows: int = 5
    timesteps: list[int] = field(default_factory=lambda: [999, 799, 599, 400, 200])
    train_photos: str = "sample:*"
    held_out: list[str] = field(default_factory=lambda: ["sample:astronaut", "sample:coffee"])
    train_steps: int = 2000
    train_size: int = 128
    accelerator: str = "auto"
    precision: str = "32-true"
    progress_bar: bool = True

    def check(self) -> None:
        """Raise naming the first option out of range."""
        for key in ("size", "steps", "sampling_steps", "guidance_size", "rows", "timing_repeats", "train_steps",
                    "train_size"):  # fmt: skip
            if getattr(self, key) < 1:
                raise NSTError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 < self.fraction < 1:
            raise NSTError(f"fraction: must be between 0 and 1, got {self.fraction}")
        if not self.style_layers:
            raise NSTError("style_layers: give at least one VGG19 layer")
        if not self.held_out:
            raise NSTError("held_out: give at least one photo")
        if not self.textures:
            raise NSTError("textures: give at least one texture image")
        if not self.seeds:
            raise NSTError("seeds: give at least one seed")
        if len(set(self.seeds)) < len(self.seeds):
            raise NSTError(f"seeds: each seed once, got {self.seeds}")
        if not self.strengths:
            raise NSTError("strengths: give at least one img2img strength")
        for strength in self.strengths:
            if not 0.0 < strength <= 1.0:  # also refuses NaN
                raise NSTError(f"strengths: each must be in (0, 1] (1 is text-to-image), got {strength!r}")
        if len(set(self.strengths)) < len(self.strengths):
            raise NSTError(f"strengths: each strength once, got {self.strengths}")
        if len(self.blend_weights) < 2:
            raise NSTError(f"blend_weights: give at least two weights of style, got {self.blend_weights}")
        for weight in self.blend_weights:
            if not 0.0 <= weight <= 1.0:  # also refuses NaN
                raise NSTError(f"blend_weights: each must be in [0, 1] (the weight of style), got {weight!r}")
        if len(set(self.blend_weights)) < len(self.blend_weights):
            raise NSTError(f"blend_weights: each weight once, got {self.blend_weights}")
        if len(self.masks) != 2:
            raise NSTError(f"masks: give two mask images (style's region, then second_style's), got {len(self.masks)}")
