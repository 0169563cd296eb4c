"""Guided diffusion step on SDXL, SD3 and Flux components: components against the real CLI, and peak memory.

    python benchmarks/guided_step_families.py --families sdxl,sd3,flux --size 256 --steps 2 --items 2 --repeats 2
    python benchmarks/guided_step_families.py --families sdxl,sd3,flux --size 256 --steps 2 --memory
    (``--both``: speed, then memory, on one build per family)

As ``benchmarks/guided_step_sd15.py`` does for SD 1.5 (``--families sd15`` runs that build here too), each family's
denoiser and VAE are built from the family's real config with random weights (timing does not depend on weight
values), saved with ``save_pretrained`` into a temporary folder (one family at a time) and loaded back by both halves:

* SDXL base 1.0 ``UNet2DConditionModel`` (``unet/config.json`` of stabilityai/stable-diffusion-xl-base-1.0, as
  quoted by diffusers' SDXL conversion tests): block_out_channels (320, 640, 1280), layers_per_block 2,
  transformer_layers_per_block (1, 2, 10), attention_head_dim (5, 10, 20), cross_attention_dim 2048,
  addition_embed_type "text_time", addition_time_embed_dim 256, projection_class_embeddings_input_dim 2816,
  use_linear_projection True, sample_size 128, (DownBlock2D, CrossAttnDownBlock2D x2) / (CrossAttnUpBlock2D x2,
  UpBlock2D). Whole (2.6 B parameters): its float32 save + load stays under 16 GB here.
* SD3-medium ``SD3Transformer2DModel`` (stabilityai/stable-diffusion-3-medium-diffusers ``transformer/config.json``):
  sample_size 128, patch_size 2, in_channels 16, attention_head_dim 64, num_attention_heads 24 (1536 wide),
  joint_attention_dim 4096, caption_projection_dim 1536, pooled_projection_dim 2048, out_channels 16,
  pos_embed_max_size 192; num_layers 24 reduced to ``--sd3-layers`` (8: 669 M parameters, below SD 1.5's UNet).
* FLUX.1-dev ``FluxTransformer2DModel`` (black-forest-labs/FLUX.1-dev ``transformer/config.json``): patch_size 1,
  in_channels 64, attention_head_dim 128, num_attention_heads 24 (3072 wide), joint_attention_dim 4096,
  pooled_projection_dim 768, guidance_embeds True, axes_dims_rope (16, 56, 56); 19 double + 38 single blocks reduced
  to ``--flux-blocks`` (2 + 4: 1310 M parameters; the 11.9 B model does not fit in float32 here).

Only the depth is reduced, never a width or a per-block setting, so every block costs what it costs in the real
model: forward hooks time each transformer block, and the table gives the per-block time and the full-depth
denoiser step, extrapolated as (measured step - measured blocks + full-depth block count x per-block time).

VAEs at each family's real config: SD's 128/256/512/512 layout with 4 (SDXL: scaling 0.13025, force_upcast) or 16
latent channels without quant convs (SD3: shift 0.0609, scale 1.5305; Flux: 0.1159, 0.3611). Tiny decoders:
``AutoencoderTiny`` with the default (TAESD) layout and latent_channels 4 (taesdxl) or 16 (taesd3, taef1), as
madebyollin's configs. Text encoders are tiny (2 layers, narrow feed-forward): they run once per item, not per step;
only their output widths are the real ones, so the denoiser sees real-shaped conditioning: SDXL CLIP-L 768 + bigG
1280 = 2048 hidden, pooled 1280 (+ 6 x 256 time ids = 2816); SD3 CLIP 768 + 1280 padded to T5's 4096, pooled
2048, T5 256 tokens; Flux CLIP pooled 768, T5 4096 wide, 512 tokens (the pipelines' ``max_sequence_length``).

Components (median of ``--repeats`` rounds, interleaved): the denoiser's forward as the guided loop calls it
(``lightning_nst.diffusion.families``; classifier-free batch of 2 for SDXL and SD3, batch 1 with the distilled guidance
embedding for Flux), VAE decoder and tiny decoder forward+backward, VGG19 forward+backward to relu5_1 at the guidance
size. The product: ``lightning-nst predict -c configs/guided_<family>.yaml --trainer.precision=32-true`` through
``lightning_nst.main.main`` on the saved folder with the config's five style layers (random VGG weights); each
item's ``seconds_per_step`` comes from the manifest, the first item of each run dropped as warm-up. ``--memory``
runs one guided item per setting in a fresh process and prints its peak resident set (``VmHWM``) and
``torch.cuda.max_memory_allocated`` on a CUDA device (``--device cuda``; not needed, untested here). Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

# The settings, timers and memory readers of the SD 1.5 benchmark, which this one extends to the other families.
from benchmarks.guided_step_sd15 import (  # noqa: E402
    LAYERS,
    SETTINGS,
    build_sd15,
    load_average,
    parameters,
    peak_rss_mb,
    timed,
)
from lightning_nst.core.losses import LayerStyleLoss  # noqa: E402
from lightning_nst.core.vgg import DEFAULT_STYLE_LAYERS as DEFAULT_LAYERS  # noqa: E402
from lightning_nst.core.vgg import VGG19Features  # noqa: E402
from lightning_nst.diffusion.families import FAMILIES  # noqa: E402
from lightning_nst.diffusion.latents import decode_latents  # noqa: E402
from lightning_nst.main import main as cli_main  # noqa: E402
from tests.tiny_pipeline import sdxl_scheduler, tiny_args, tiny_t5_tokenizer, tiny_tokenizer  # noqa: E402

CONFIGS = {
    "sd15": "guided_diffusion.yaml",
    "sdxl": "guided_sdxl.yaml",
    "sd3": "guided_sd3.yaml",
    "flux": "guided_flux.yaml",
}
PIPELINES = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
}
CFG = {"sd15": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}  # the shipped configs' cfg_scale
# Transformer blocks of the real models, by the denoiser's attribute holding them.
FULL_BLOCKS = {"sd3": {"transformer_blocks": 24}, "flux": {"transformer_blocks": 19, "single_transformer_blocks": 38}}


def clip(tokenizer: Any, hidden: int, projection: int | None = None) -> CLIPTextModel:
    """A 2-layer CLIP text encoder with the real model's output width ``hidden`` (and projection)."""
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({} if projection is None else {"projection_dim": projection}),
    )
    return CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)


def t5(tokenizer: Any) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder with T5-XXL's output width 4096."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=4096,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def vae(latent_channels: int, **config: Any) -> AutoencoderKL:
    """SD's VAE layout (128/256/512/512, 2 layers per block, factor 8) with the family's latent settings."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=1024,
        **config,
    )


def build_sdxl(folder: Path, args: argparse.Namespace) -> Any:
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=tuple(args.sdxl_layers),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    tokenizer = tiny_tokenizer(folder / "clip-tokenizer")
    return StableDiffusionXLPipeline(
        vae=vae(4, scaling_factor=0.13025, force_upcast=True),
        text_encoder=clip(tokenizer, 768),
        text_encoder_2=clip(tokenizer, 1280, projection=1280),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_sd3(folder: Path, args: argparse.Namespace) -> Any:
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=args.sd3_layers,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )
    tokenizer = tiny_tokenizer(folder / "clip-tokenizer")
    t5_tokenizer = tiny_t5_tokenizer(folder / "t5-tokenizer")
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip(tokenizer, 768, projection=768),
        tokenizer=tokenizer,
        text_encoder_2=clip(tokenizer, 1280, projection=1280),
        tokenizer_2=tokenizer,
        text_encoder_3=t5(t5_tokenizer),
        tokenizer_3=t5_tokenizer,
    )


def build_flux(folder: Path, args: argparse.Namespace) -> Any:
    double, single = args.flux_blocks
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    tokenizer = tiny_tokenizer(folder / "clip-tokenizer")
    t5_tokenizer = tiny_t5_tokenizer(folder / "t5-tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler/scheduler_config.json
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip(tokenizer, 768),
        tokenizer=tokenizer,
        text_encoder_2=t5(t5_tokenizer),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def build(family: str, folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Save ``family``'s pipeline and its ``AutoencoderTiny``, random weights, under ``folder``."""
    torch.manual_seed(0)
    if family == "sd15":
        return build_sd15(folder)
    builders: dict[str, Callable[[Path, argparse.Namespace], Any]] = {
        "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux,
    }  # fmt: skip
    pipeline = builders[family](folder, args)
    pipeline.save_pretrained(folder / family, safe_serialization=True)
    del pipeline
    gc.collect()
    AutoencoderTiny(latent_channels=4 if family == "sdxl" else 16).save_pretrained(folder / "tiny")
    return folder / family, folder / "tiny"


def depth(family: str, args: argparse.Namespace) -> str:
    if family == "sdxl":
        layers = tuple(args.sdxl_layers)
        return "whole" if layers == (1, 2, 10) else f"transformer layers {layers} of (1, 2, 10)"
    if family == "sd3":
        return f"{args.sd3_layers} of 24 blocks"
    if family == "flux":
        return f"{args.flux_blocks[0]} + {args.flux_blocks[1]} of 19 + 38 blocks"
    return "whole"


class BlockTimer:
    """Seconds spent inside each listed block list of the denoiser, by forward hooks (CPU: no synchronisation)."""

    def __init__(self, denoiser: torch.nn.Module, names: list[str]) -> None:
        self.seconds = {name: 0.0 for name in names}
        self.calls = {name: 0 for name in names}
        self._started = 0.0
        for name in names:
            for block in getattr(denoiser, name):
                block.register_forward_pre_hook(self._pre)
                block.register_forward_hook(self._post(name))

    def _pre(self, *_: Any) -> None:
        self._started = time.perf_counter()

    def _post(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.seconds[name] += time.perf_counter() - self._started
            self.calls[name] += 1

        return hook

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)


def components(family: str, pipeline: Path, tiny: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of each component of a guided step, interleaved over rounds, and the per-block times."""
    device = torch.device(args.device)
    pipe = PIPELINES[family].from_pretrained(pipeline).to(device)
    name = "sd" if family == "sd15" else family
    wrapper = FAMILIES[name](pipe)
    denoiser = wrapper.denoiser.eval().requires_grad_(False)
    autoencoder = pipe.vae.eval().requires_grad_(False)
    taesd = AutoencoderTiny.from_pretrained(tiny).to(device).eval().requires_grad_(False)
    vgg = VGG19Features(DEFAULT_LAYERS, weights="random").to(device)
    style = LayerStyleLoss(vgg(torch.rand(1, 3, args.guidance_size, args.guidance_size, device=device)), "gram")
    size = (args.size, args.size)
    negatives = [""] if family != "flux" else []
    with torch.no_grad():
        condition = wrapper.encode(["a red house by a lake"], negatives, device, CFG[family], size)
    generator = [torch.Generator(device).manual_seed(0)]
    latents = wrapper.initial_noise(1, size, torch.float32, device, generator)
    spatial = wrapper.spatial(latents, size)  # Flux unpacks its tokens; the others are spatial already
    t = torch.tensor(500.0, device=device)
    blocks = FULL_BLOCKS.get(family, {})
    timer = BlockTimer(denoiser, list(blocks))
    info = {
        "denoiser_M": parameters(denoiser),
        "vae_decoder_M": parameters(autoencoder.decoder)
        + (parameters(autoencoder.post_quant_conv) if autoencoder.post_quant_conv is not None else 0.0),
        "tiny_decoder_M": parameters(taesd.decoder),
        "latents": tuple(spatial.shape),
        "denoiser_input": tuple(latents.shape),
        "condition": {k: tuple(v.shape) for k, v in condition.kwargs.items() if isinstance(v, torch.Tensor)},
    }
    print(json.dumps(info))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def denoise() -> None:
        with torch.no_grad():
            wrapper.model_output(latents, t, condition, CFG[family])
        sync()

    def decoder(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            x0 = torch.randn(spatial.shape, device=device, requires_grad=True)
            decode_latents(module, x0).mean().backward()
            sync()

        return run

    def vgg_forward_backward() -> None:
        image = torch.rand(1, 3, args.guidance_size, args.guidance_size, device=device, requires_grad=True)
        style(vgg(image)).sum().backward()
        sync()

    batch = 2 if condition.do_cfg else 1
    parts = {
        f"denoiser forward (batch {batch})": denoise,
        "VAE decoder fwd+bwd": decoder(autoencoder),
        "tiny decoder fwd+bwd": decoder(taesd),
        f"VGG fwd+bwd at {args.guidance_size} px": vgg_forward_backward,
    }
    for function in parts.values():  # warm-up
        function()
    times: dict[str, list[float]] = {part: [] for part in parts}
    block_times: dict[str, list[float]] = {block: [] for block in blocks}
    for _ in range(args.repeats):
        for part, function in parts.items():
            timer.reset()
            times[part].append(timed(function))
            if part.startswith("denoiser"):
                for block in blocks:
                    block_times[block].append(timer.seconds[block] / max(timer.calls[block], 1))
    result: dict[str, Any] = {part: statistics.median(values) for part, values in times.items()}
    per_block = {block: statistics.median(values) for block, values in block_times.items()}
    denoiser_s = result[next(iter(parts))]
    if blocks:
        counts = {block: len(getattr(denoiser, block)) for block in blocks}
        rest = denoiser_s - sum(per_block[block] * counts[block] for block in blocks)
        result["per_block"] = per_block
        result["extrapolated"] = rest + sum(per_block[block] * blocks[block] for block in blocks)
    result["info"] = info
    return result  # the components go with this frame; speed() collects them before the CLI loads its own


def cli_args(
    folder: Path, name: str, family: str, pipeline: Path, tiny: Path, setting: str, args: argparse.Namespace
) -> list[str]:
    seeds = ", ".join(str(seed) for seed in range(args.items))
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    return tiny_args(
        pipeline,
        name,
        f"--trainer.logger.init_args.save_dir={folder}",
        f"--data.seeds=[{seeds}]",
        "--trainer.precision=32-true",
        f"--trainer.accelerator={accelerator}",
        "--model.guidance.init_args.vgg.weights=random",
        f"--model.guidance.init_args.layers={LAYERS}",
        f"--model.guidance.init_args.guidance_size={args.guidance_size}",
        *(arg.format(tiny=tiny) for arg in SETTINGS[setting]),
        config=REPO / "configs" / CONFIGS[family],
        size=args.size,
        steps=args.steps,
    )


def product(
    folder: Path, name: str, family: str, pipeline: Path, tiny: Path, setting: str, args: argparse.Namespace
) -> float:
    """Median ``seconds_per_step`` of the items after the first, from one CLI run."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli_main(cli_args(folder, name, family, pipeline, tiny, setting, args))
    (manifest,) = (folder / name).glob("version_*/predictions.jsonl")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    print(f"[{family}] {setting}: s/step per item {[round(r['seconds_per_step'], 3) for r in records]}, load "
          f"{load_average()}", flush=True)  # fmt: skip
    return statistics.median(record["seconds_per_step"] for record in records[1:] or records)


def speed(family: str, folder: Path, pipeline: Path, tiny: Path, args: argparse.Namespace) -> None:
    print(f"[{family}] 1-minute load average at start: {load_average()}", flush=True)
    parts = components(family, pipeline, tiny, args)
    gc.collect()
    print(f"[{family}] components done, load {load_average()}", flush=True)
    runs: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    for round_ in range(args.cli_repeats):
        for index, setting in enumerate(SETTINGS):
            runs[setting].append(product(folder, f"{family}r{round_}s{index}", family, pipeline, tiny, setting, args))
    steps = {setting: statistics.median(values) for setting, values in runs.items()}
    print(f"[{family}] 1-minute load average at end: {load_average()}")

    info = parts.pop("info")
    per_block = parts.pop("per_block", None)
    extrapolated = parts.pop("extrapolated", None)
    names = list(parts)
    denoiser, vae_s, taesd, vgg = (parts[name] for name in names)
    print(
        f"\n### {family}: {depth(family, args)}, denoiser {info['denoiser_M']:.0f} M parameters, VAE decoder "
        f"{info['vae_decoder_M']:.1f} M, tiny decoder {info['tiny_decoder_M']:.2f} M; {args.size} px, latents "
        f"{info['latents']}, denoiser input {info['denoiser_input']}; {torch.get_num_threads()} threads; components: "
        f"medians of {args.repeats}; product: {args.steps} steps, {args.items} items (first dropped), "
        f"{args.cli_repeats} run(s) per setting\nconditioning: {info['condition']}\n"
    )
    print("| component | s |\n|---|---|")
    for name in names:
        print(f"| {name} | {parts[name]:.3f} |")
    if per_block:
        for block, seconds in per_block.items():
            print(f"| one of {block} (x{FULL_BLOCKS[family][block]} in the full model) | {seconds:.3f} |")
        print(f"| denoiser forward at full depth (extrapolated) | {extrapolated:.3f} |")
    floor = {"guided, VAE decoder": denoiser + vae_s + vgg, "guided, tiny decoder": denoiser + taesd + vgg}
    base = steps["unguided"]
    print("\n| one step of the CLI | s/step | sum of its parts | ratio | guidance overhead s |\n|---|---|---|---|---|")
    print(f"| unguided | {base:.3f} | {denoiser:.3f} (denoiser) | {base / denoiser:.2f} | - |")
    for setting in ("guided, VAE decoder", "guided, tiny decoder"):
        seconds = steps[setting]
        ratio = seconds / floor[setting]
        print(f"| {setting} | {seconds:.3f} | {floor[setting]:.3f} | {ratio:.2f} | {seconds - base:.3f} |")
    overhead_vae = steps["guided, VAE decoder"] - base
    overhead_tiny = steps["guided, tiny decoder"] - base
    print(f"\nguidance overhead, VAE / tiny decoder: {overhead_vae:.3f} / {overhead_tiny:.3f} s = "
          f"{overhead_vae / overhead_tiny:.2f}x", flush=True)  # fmt: skip


def one_item(family: str, setting: str, args: argparse.Namespace, pipeline: Path, tiny: Path) -> None:
    """Child process of --memory: one item, then print the peak resident set size."""
    baseline = peak_rss_mb()
    args.items = 1
    with tempfile.TemporaryDirectory() as temporary:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli_main(cli_args(Path(temporary), "memory", family, pipeline, tiny, setting, args))
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "cuda_peak_mb": cuda / 2**20}))


def memory(family: str, pipeline: Path, tiny: Path, args: argparse.Namespace) -> None:
    print(
        f"\n### {family} ({depth(family, args)}): peak memory of one {args.steps}-step item at {args.size} px, "
        f"each setting in a fresh process (load {load_average()})\n"
    )
    print("| setting | peak RSS MB | over imports MB | above unguided MB | cuda MB |\n|---|---|---|---|---|")
    unguided = None
    for setting in SETTINGS:
        command = [sys.executable, __file__, "--child", family, setting, str(pipeline), str(tiny)]
        command += ["--size", str(args.size), "--steps", str(args.steps), "--device", args.device]
        command += ["--guidance-size", str(args.guidance_size)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        unguided = result["peak_mb"] if unguided is None else unguided
        above = "-" if setting == "unguided" else f"{result['peak_mb'] - unguided:.0f}"
        print(
            f"| {setting} | {result['peak_mb']:.0f} | {result['peak_mb'] - result['baseline_mb']:.0f} | {above} | "
            f"{result['cuda_peak_mb']:.0f} |",
            flush=True,
        )
    print(f"load at end: {load_average()}")


def main() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sdxl,sd3,flux", help="comma-separated: sdxl, sd3, flux (and sd15)")
    parser.add_argument("--size", type=int, default=256, help="generated image side in pixels (latents: size / 8)")
    parser.add_argument("--guidance-size", type=int, default=256, help="side of the image VGG sees")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps per item")
    parser.add_argument("--items", type=int, default=2, help="items per CLI run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the component timings")
    parser.add_argument("--cli-repeats", type=int, default=1, help="CLI runs per setting, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--sdxl-layers", type=int, nargs=3, default=[1, 2, 10], help="SDXL transformer layers/block")
    parser.add_argument("--sd3-layers", type=int, default=8, help="SD3 joint blocks (SD3-medium: 24)")
    parser.add_argument("--flux-blocks", type=int, nargs=2, default=[2, 4], help="Flux double, single blocks")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (cuda: a GPU run)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of speed")
    parser.add_argument("--both", action="store_true", help="speed, then memory, on one build per family")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        family, setting, pipeline, tiny = args.child
        one_item(family, setting, args, Path(pipeline), Path(tiny))
        return
    families = [family.strip() for family in args.families.split(",") if family.strip()]
    for family in families:
        if family not in CONFIGS:
            parser.error(f"--families: {family!r} is none of {', '.join(CONFIGS)}")
    for family in families:  # one family on disk at a time: SDXL's float32 folder alone is about 11 GB
        folder = Path(tempfile.mkdtemp(prefix=f"guided-{family}-"))
        try:
            started = time.perf_counter()
            pipeline, tiny = build(family, folder, args)
            size = sum(f.stat().st_size for f in pipeline.rglob("*") if f.is_file()) / 2**30
            print(f"[{family}] built and saved ({size:.1f} GB) in {time.perf_counter() - started:.0f} s", flush=True)
            if not args.memory:
                speed(family, folder, pipeline, tiny, args)
            if args.memory or args.both:
                memory(family, pipeline, tiny, args)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
