"""Guided diffusion step at Stable Diffusion 1.5 size: components against the real CLI, and peak memory (CPU or CUDA).

    python benchmarks/guided_step_sd15.py --size 256 --steps 3 --items 2 --repeats 3
    python benchmarks/guided_step_sd15.py --size 256 --memory
    python benchmarks/guided_step_sd15.py --size 256 --steps 3 --items 2 --repeats 5 --vgg-precision --threads 1

Builds SD-1.5-sized components from their configs with random weights (timing does not depend on weight values):
``UNet2DConditionModel`` with SD-1.5's config (320/640/1280/1280, 2 layers per block, cross-attention 768, head dim
8, sample size 64), ``AutoencoderKL`` with SD's VAE config (128/256/512/512, 4 down/up blocks, 2 layers per block,
scaling 0.18215), ``AutoencoderTiny()`` with its default (TAESD) config and a CLIP text encoder of ViT-L/14 size
(768 wide, 12 layers, 12 heads), with the real CLIP tokenizer from ``../shared/models/clip-tokenizer``. They are saved
with ``save_pretrained`` into a temporary folder (about 4.3 GB) and loaded back by both halves of the benchmark.

Components (median of ``--repeats`` rounds, each component once per round, interleaved): UNet forward with the
classifier-free-guidance batch of 2, VAE decoder forward+backward, tiny decoder forward+backward, and VGG19 forward
+backward to relu5_1 with the Gram style loss at the guidance size. The product: ``lightning-nst predict -c
configs/guided_diffusion.yaml`` through ``lightning_nst.main.main`` on that folder, once per setting per round, with
the config's five style layers (relu1_1..relu5_1, random VGG weights) at ``--guidance-size``; each item's
``seconds_per_step`` comes from the manifest and the first item of each run is dropped as warm-up.
``--memory`` runs one guided item per setting in a fresh process and prints its peak resident set (and
``torch.cuda.max_memory_allocated`` on a CUDA device). ``--vgg-precision`` compares
``model.guidance.vgg_precision: float32`` with ``bfloat16`` instead: the guidance's VGG pass alone
(``StyleGuidance.style_loss`` forward+backward at the guidance size, medians of ``--repeats`` interleaved rounds) and
one guided step of the CLI with the decoders of ``--decoders`` (the tiny one by default, where the VGG pass is the
larger share of a step; through the VAE the step takes about 10 s more on this CPU and saves the same), side by side
in one run. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
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

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lightning_nst.core.losses import LayerStyleLoss  # noqa: E402
from lightning_nst.core.vgg import DEFAULT_STYLE_LAYERS as DEFAULT_LAYERS  # noqa: E402
from lightning_nst.core.vgg import VGG19Features, VGGConfig  # noqa: E402
from lightning_nst.diffusion.guidance import StyleGuidance  # noqa: E402
from lightning_nst.diffusion.latents import decode_latents  # noqa: E402
from lightning_nst.main import main as cli_main  # noqa: E402
from tests.tiny_pipeline import sd_scheduler, tiny_args, tiny_tokenizer  # noqa: E402

LAYERS = "[" + ", ".join(DEFAULT_LAYERS) + "]"
SETTINGS: dict[str, list[str]] = {
    "unguided": ["--model.guidance=null"],
    "guided, VAE decoder": ["--model.guidance.init_args.decoder=vae"],
    "guided, tiny decoder": ["--model.guidance.init_args.decoder=tiny", "--model.tiny_vae={tiny}"],
}


UNET_SD15: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
"""SD 1.5's ``UNet2DConditionModel`` config."""

VAE_SD15: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
"""SD 1.5's ``AutoencoderKL`` config."""


def sd15_unet(**overrides: Any) -> UNet2DConditionModel:
    """An ``UNet2DConditionModel`` of SD 1.5's config (keys in ``overrides`` replaced), random weights."""
    return UNet2DConditionModel(**{**UNET_SD15, **overrides})


def sd15_vae(**overrides: Any) -> AutoencoderKL:
    """An ``AutoencoderKL`` of SD 1.5's VAE config (keys in ``overrides`` replaced), random weights."""
    return AutoencoderKL(**{**VAE_SD15, **overrides})


def build_sd15(folder: Path) -> tuple[Path, Path]:
    """Save an SD-1.5-sized pipeline and a TAESD-sized ``AutoencoderTiny``, random weights, to ``folder``."""
    torch.manual_seed(0)
    unet = sd15_unet()
    vae = sd15_vae()
    scheduler = sd_scheduler()
    tokenizer = tiny_tokenizer(folder / "tokenizer-fallback")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # ViT-L/14's text tower, as in SD 1.5
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            max_position_embeddings=77,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "sd15", safe_serialization=True)
    AutoencoderTiny().save_pretrained(folder / "taesd", safe_serialization=True)
    return folder / "sd15", folder / "taesd"


def parameters(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def timed(function: Callable[[], None]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def components(pipeline: Path, tiny: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of each component of a guided step, interleaved over rounds."""
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(pipeline / "vae").eval().requires_grad_(False)
    taesd = AutoencoderTiny.from_pretrained(tiny).eval().requires_grad_(False)
    vgg = VGG19Features(DEFAULT_LAYERS, weights="random")
    style = LayerStyleLoss(vgg(torch.rand(1, 3, args.guidance_size, args.guidance_size)), "gram")
    print(
        f"parameters (M): unet {parameters(unet):.0f}, vae {parameters(vae):.1f} (decoder "
        f"{parameters(vae.decoder) + parameters(vae.post_quant_conv):.1f}), taesd decoder "
        f"{parameters(taesd.decoder):.2f}, vgg to relu5_1 {parameters(vgg):.1f}"
    )
    side = args.size // 8
    latents = torch.randn(2, 4, side, side)
    context = torch.randn(2, 77, 768)

    def unet_forward() -> None:
        with torch.no_grad():
            unet(latents, 500, encoder_hidden_states=context, return_dict=False)

    def decoder(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            x0 = torch.randn(1, 4, side, side, requires_grad=True)
            decode_latents(module, x0).mean().backward()

        return run

    def vgg_forward_backward() -> None:
        image = torch.rand(1, 3, args.guidance_size, args.guidance_size, requires_grad=True)
        style(vgg(image)).sum().backward()

    parts = {
        "UNet forward (CFG batch 2)": unet_forward,
        "VAE decoder fwd+bwd": decoder(vae),
        "tiny decoder fwd+bwd": decoder(taesd),
        f"VGG fwd+bwd at {args.guidance_size} px": vgg_forward_backward,
    }
    for function in parts.values():  # warm-up
        function()
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, function in parts.items():
            times[name].append(timed(function))
    return {name: statistics.median(values) for name, values in times.items()}


def cli_args(
    folder: Path, name: str, pipeline: Path, tiny: Path, setting: str, args: argparse.Namespace, *extra: str
) -> list[str]:
    seeds = ", ".join(str(seed) for seed in range(args.items))
    return tiny_args(
        pipeline,
        name,
        f"--trainer.logger.init_args.save_dir={folder}",
        f"--data.seeds=[{seeds}]",
        "--model.guidance.init_args.vgg.weights=random",
        f"--model.guidance.init_args.layers={LAYERS}",
        f"--model.guidance.init_args.guidance_size={args.guidance_size}",
        *(arg.format(tiny=tiny) for arg in SETTINGS[setting]),
        *extra,
        size=args.size,
        steps=args.steps,
    )


def product(
    folder: Path, name: str, pipeline: Path, tiny: Path, setting: str, args: argparse.Namespace, *extra: str
) -> float:
    """Median ``seconds_per_step`` of the items after the first, from one CLI run (``extra``: more overrides)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli_main(cli_args(folder, name, pipeline, tiny, setting, args, *extra))
    (manifest,) = (folder / name).glob("version_*/predictions.jsonl")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    return statistics.median(record["seconds_per_step"] for record in records[1:] or records)


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def speed(args: argparse.Namespace) -> None:
    print(f"1-minute load average at start: {load_average()}")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        started = time.perf_counter()
        pipeline, tiny = build_sd15(folder)
        print(f"built and saved the SD-1.5-sized pipeline in {time.perf_counter() - started:.0f} s")
        parts = components(pipeline, tiny, args)
        runs: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
        for round_ in range(args.cli_repeats):
            for index, setting in enumerate(SETTINGS):
                runs[setting].append(product(folder, f"r{round_}s{index}", pipeline, tiny, setting, args))
        steps = {setting: statistics.median(values) for setting, values in runs.items()}

    print(f"1-minute load average at end: {load_average()}")
    names = list(parts)
    unet, vae, taesd, vgg = (parts[name] for name in names)
    print(
        f"\nSD-1.5-sized components, random weights, {args.size} px ({args.size // 8}x{args.size // 8} latents), "
        f"guidance at {args.guidance_size} px, {torch.get_num_threads()} threads; components: medians of "
        f"{args.repeats}; product: {args.steps} DDIM steps, {args.items} items (first dropped), "
        f"{args.cli_repeats} run(s) per setting"
    )
    print(f"{'component':<34} {'s':>8}")
    for name in names:
        print(f"{name:<34} {parts[name]:>8.3f}")
    floor = {"guided, VAE decoder": unet + vae + vgg, "guided, tiny decoder": unet + taesd + vgg}
    print(f"\n{'setting (one step)':<24} {'s/step':>8} {'sum of parts':>13} {'ratio':>7} {'overhead s':>11}")
    base = steps["unguided"]
    print(f"{'unguided':<24} {base:>8.3f} {unet:>13.3f} {base / unet:>7.3f} {'-':>11}")
    for setting in ("guided, VAE decoder", "guided, tiny decoder"):
        seconds = steps[setting]
        print(
            f"{setting:<24} {seconds:>8.3f} {floor[setting]:>13.3f} {seconds / floor[setting]:>7.3f} "
            f"{seconds - base:>11.3f}"
        )
    overhead_vae = steps["guided, VAE decoder"] - base
    overhead_tiny = steps["guided, tiny decoder"] - base
    print(f"\nguidance overhead, VAE / tiny decoder: {overhead_vae:.3f} / {overhead_tiny:.3f} s = "
          f"{overhead_vae / overhead_tiny:.2f}x")  # fmt: skip


PRECISIONS = ("float32", "bfloat16")


def vgg_pass(precision: str, args: argparse.Namespace) -> Callable[[], None]:
    """One VGG pass of the guidance, as each guided step runs it: the style loss at the guidance size, forward and
    backward, with ``vgg_precision`` set to ``precision``."""
    guidance = StyleGuidance(
        guidance_size=args.guidance_size,
        layers=list(DEFAULT_LAYERS),
        vgg=VGGConfig("random"),
        vgg_precision=precision,  # type: ignore[arg-type]
    )
    guidance.set_styles([torch.rand(1, 3, args.guidance_size, args.guidance_size)])
    side = args.guidance_size
    index = torch.zeros(1, dtype=torch.long)

    def run() -> None:
        image = torch.rand(1, 3, side, side, requires_grad=True)
        guidance.style_loss(image, index).sum().backward()

    return run


def vgg_precision_speed(args: argparse.Namespace) -> None:
    """The VGG pass and the CLI's guided step with ``vgg_precision`` float32 against bfloat16, in one run."""
    print(f"1-minute load average at start: {load_average()}")
    decoders = [f"guided, {'VAE' if name == 'vae' else 'tiny'} decoder" for name in args.decoders]
    passes = {precision: vgg_pass(precision, args) for precision in PRECISIONS}
    for function in passes.values():  # warm-up
        function()
    times: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    for _ in range(args.repeats):
        for precision, function in passes.items():
            times[precision].append(timed(function))
    vgg = {precision: statistics.median(values) for precision, values in times.items()}
    steps: dict[tuple[str, str], list[float]] = {(d, p): [] for d in decoders for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        started = time.perf_counter()
        pipeline, tiny = build_sd15(folder)
        print(f"built and saved the SD-1.5-sized pipeline in {time.perf_counter() - started:.0f} s")
        for round_ in range(args.cli_repeats):
            for index, ((decoder, precision), values) in enumerate(steps.items()):
                option = f"--model.guidance.init_args.vgg_precision={precision}"
                values.append(product(folder, f"r{round_}s{index}", pipeline, tiny, decoder, args, option))
    print(f"1-minute load average at end: {load_average()}")
    print(
        f"\nSD-1.5-sized components, random weights, {args.size} px, guidance at {args.guidance_size} px with the "
        f"config's five layers (relu1_1..relu5_1, Gram), {torch.get_num_threads()} threads; VGG pass: medians of "
        f"{args.repeats}; step: {args.steps} DDIM steps, {args.items} items (first dropped), {args.cli_repeats} "
        "run(s) per setting"
    )
    print(f"{'vgg_precision':<34} {'float32 s':>10} {'bfloat16 s':>11} {'speed-up':>9} {'saved s':>8}")
    rows = {"VGG pass (style loss fwd+bwd)": vgg}
    rows |= {
        d.replace("guided", "guided step"): {p: statistics.median(steps[d, p]) for p in PRECISIONS} for d in decoders
    }
    for name, row in rows.items():
        full, half = row["float32"], row["bfloat16"]
        print(f"{name:<34} {full:>10.3f} {half:>11.3f} {full / half:>8.2f}x {full - half:>8.3f}")


def peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM on Linux, which, unlike ``ru_maxrss``, does not carry the parent's
    peak over ``fork`` + ``exec`` (the parent holds the 4 GB of components it has just built)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_item(setting: str, args: argparse.Namespace, pipeline: Path, tiny: Path) -> None:
    """Child process of --memory: one item, then print the peak resident set size."""
    baseline = peak_rss_mb()
    args.items = 1
    with tempfile.TemporaryDirectory() as temporary:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli_main(cli_args(Path(temporary), "memory", pipeline, tiny, setting, args))
    peak = peak_rss_mb()
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "cuda_peak_mb": cuda / 2**20}))


def memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        pipeline, tiny = build_sd15(Path(temporary))
        print(f"\nPeak memory of one {args.steps}-step item at {args.size} px, each setting in a fresh process")
        print(f"{'setting':<24} {'peak RSS MB':>12} {'over imports MB':>16} {'cuda MB':>8}")
        for setting in SETTINGS:
            command = [sys.executable, __file__, "--child", setting, str(pipeline), str(tiny)]
            command += ["--size", str(args.size), "--steps", str(args.steps)]
            command += ["--guidance-size", str(args.guidance_size)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(
                f"{setting:<24} {result['peak_mb']:>12.0f} {result['peak_mb'] - result['baseline_mb']:>16.0f} "
                f"{result['cuda_peak_mb']:>8.0f}"
            )


def main() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="generated image side in pixels (latents: size / 8)")
    parser.add_argument("--guidance-size", type=int, default=256, help="side of the image VGG sees")
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps per item")
    parser.add_argument("--items", type=int, default=2, help="items per CLI run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the component timings")
    parser.add_argument("--cli-repeats", type=int, default=1, help="CLI runs per setting, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of speed")
    parser.add_argument(
        "--vgg-precision", action="store_true", help="compare the guidance's VGG pass in float32 and bfloat16 instead"
    )
    parser.add_argument(
        "--decoders", nargs="+", choices=("tiny", "vae"), default=["tiny"], help="--vgg-precision: the guided steps"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        setting, pipeline, tiny = args.child
        one_item(setting, args, Path(pipeline), Path(tiny))
    elif args.memory:
        memory(args)
    elif args.vgg_precision:
        vgg_precision_speed(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
