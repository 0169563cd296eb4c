"""The GPU check: the figures only a GPU can give, in one markdown table, within a time budget (default 8 minutes).

    python benchmarks/gpu_check.py --out docs/gpu_check.md     # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run                   # the planned rows, nothing run
    python benchmarks/gpu_check.py --smoke                     # the same code paths on a CPU in seconds

Three parts, in this order:

1. NST step. A real Lightning fit of ``ImageOptimization`` + ``ImageTargets`` (TensorBoard logger, ``ImageWriter``)
   with the shipped style-transfer objective (``configs/style_transfer_gram.yaml``: content relu4_2, style
   relu1_1..relu5_1, Gram, style weight 1e6; random VGG weights, as timing does not depend on their values), at 512
   and 1024 px, in ``32-true``, ``bf16-mixed`` and ``16-mixed`` precision, each with the VGG trunk channels_last (what
   ``VGG19Features`` does) and NCHW. These rows use Adam (lr 0.02): ``16-mixed`` has a gradient scaler,
   which L-BFGS refuses; one ``32-true`` L-BFGS row per size (the shipped optimizer) is added. Seconds per step are
   the median of the timed steps after the warm-up steps, with ``torch.cuda.synchronize()`` at each step's start
   and end; peak memory is ``torch.cuda.max_memory_allocated`` over the fit, reset before it.
2. Time to the PyTorch tutorial's loss at 512 px, through ``benchmarks/time_to_quality.py``'s ``run_reference`` and
   ``run_ours``: the tutorial's L-BFGS loop of ``benchmarks/reference.py`` against what ``lightning-nst stylize``
   runs (the pixels L-BFGS recipe of ``configs/style_transfer_gram.yaml``) and the same in ``bf16-mixed``, on the
   tutorial's objective; the target is the reference's loss after 300 evaluations. A first (calibration) run of the
   reference and a 3-step fit of ours warm the device up.
3. One guided diffusion step at Stable Diffusion 1.5 size, float16, 512 px (64x64 latents), from
   ``benchmarks/guided_step_sd15.py``'s configs with random weights (no download): the UNet forward with the
   classifier-free-guidance batch of 2, the VAE decoder forward+backward, the tiny decoder (``AutoencoderTiny``,
   TAESD's config) forward+backward, the VGG style loss forward+backward at the shipped ``guidance_size`` (256;
   ``StyleGuidance.style_loss``, VGG float32 as the product keeps it), and the whole guided step (UNet, the product's
   ``StyleGuidance`` with the VAE or the tiny decoder, the DDIM step). Each runs twice to warm up, then is timed
   over 5 calls (median) with ``torch.cuda.synchronize()``; peak memory is over those calls, with every module resident.

Before each row the script compares an estimate of its cost (grown by how much slower than estimated the rows so
far ran) with what is left of ``--budget-s``, counted from the start of the process, and prints "skipped: budget"
instead of running a row that would exceed it; an alarm stops a row still running when the budget runs out
("stopped: budget"), so the script ends within the budget plus the time to print the table. ``--smoke`` runs
every row on the CPU with tiny sizes (32 px, a tiny UNet and VAE, float32, 2-evaluation reference, one torch thread,
estimates a fifth of the real ones); there peak memory is "n/a" and the figures mean nothing. Not a test;
``tests/test_gpu_check.py`` runs ``--smoke`` and ``--dry-run``.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts the imports too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nst_step import objective  # noqa: E402  (benchmarks/ is no package)
from time_to_quality import adam, lbfgs, run_ours, run_reference  # noqa: E402

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, VGGConfig  # noqa: E402
from lightning_nst.core.images import load_image, save_image  # noqa: E402
from lightning_nst.core.vgg import VGG19Features  # noqa: E402
from tests.conftest import PARTIAL_WEIGHTS, shared_file  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
LAYOUTS = ("channels_last", "NCHW")
STARRY_NIGHT = shared_file("data/style/starry_night.jpg")


@dataclass
class Settings:
    """Sizes and counts of one mode (the real check or ``--smoke``)."""

    nst_sizes: tuple[int, ...] = (512, 1024)
    nst_warmup: int = 3
    nst_steps: int = 10
    ttq_size: int = 512
    reference_steps: int = 300
    ttq_max_steps: int = 2000
    cap: float = 10.0  # a run stops at this x the reference's time: time_to_quality.py's 3 would cut off a slow one
    image_size: int = 512
    guidance_size: int = 256
    repeats: int = 5
    dtype: torch.dtype = torch.float16
    tiny_models: bool = False
    estimate_scale: float = 1.0  # of the rows' estimates (plan)


SMOKE = Settings(
    nst_sizes=(32, 48), nst_warmup=1, nst_steps=1, ttq_size=32, reference_steps=2, ttq_max_steps=20, cap=50.0,
    image_size=32, guidance_size=32, repeats=1, dtype=torch.float32, tiny_models=True, estimate_scale=0.2,
)  # fmt: skip


@dataclass
class Row:
    """One line of the table; ``seconds`` is None for a row not measured (``note`` says why)."""

    name: str
    measure: str
    seconds: float | None = None
    peak_mib: float | None = None
    note: str = ""


@dataclass
class Plan:
    """A row to run: its name, the seconds it may take at most (the budget check) and the function that runs it."""

    name: str
    measure: str
    estimate_s: float
    run: Callable[[], list[Row]]
    extra: list[str] = field(default_factory=list)  # names of the further rows the run returns


# -- measuring -----------------------------------------------------------------------------------------------------


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if cuda() else None


@contextlib.contextmanager
def layout(name: str) -> Iterator[None]:
    """Run the VGG trunk channels_last or NCHW whatever the device.

    ``VGG19Features`` runs channels_last unless built with ``channels_last=False``, and ``ImageOptimization`` builds
    it, so the benchmark sets that choice on each trunk at its first pass for the duration of a fit.
    """
    choose = VGG19Features._set_layout

    def forced(self: VGG19Features, is_cuda: bool) -> bool:
        self.channels_last = name == "channels_last"
        return choose(self, is_cuda)

    with mock.patch.object(VGG19Features, "_set_layout", forced):
        yield


class StepClock(L.Callback):
    """Benchmark-only: the wall time of each training step, synchronized with the device at its start and end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        sync()
        self._started = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        sync()
        self.seconds.append(time.perf_counter() - self._started)


def nst_fit(size: int, precision: str, layout_name: str, optimizer: str, settings: Settings, folder: Path) -> Row:
    """Median seconds per step after the warm-up, and peak memory, of one fit."""
    name = nst_name(size, precision, layout_name, optimizer)
    model = ImageOptimization(
        [objective("transfer", "gram")],
        vgg=VGGConfig(weights="random"),
        init="content",
        optimizer=lbfgs if optimizer == "L-BFGS" else adam,
    )
    clock = StepClock()
    trainer = L.Trainer(
        max_steps=settings.nst_warmup + settings.nst_steps,
        max_epochs=-1,
        accelerator="cuda" if cuda() else "cpu",
        devices=1,
        precision=precision,
        logger=TensorBoardLogger(folder, name="gpu_check", default_hp_metric=False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock, ImageWriter(output_dir=str(folder / "out"), overwrite=True, snapshot_every=0)],
    )
    reset_peak()
    with layout(layout_name):
        trainer.fit(model, ImageTargets(content="skimage:astronaut", style=["skimage:gravel"], size=size))
    timed = clock.seconds[settings.nst_warmup :]
    note = f"median of {len(timed)} steps after {settings.nst_warmup}"
    if not cuda() and precision == "16-mixed":
        note += "; on the CPU Lightning runs 16-mixed as bf16-mixed"
    return Row(name, "s/step", statistics.median(timed), peak_mib(), note)


def nst_name(size: int, precision: str, layout_name: str, optimizer: str) -> str:
    return f"NST {size} px {precision} {layout_name} {optimizer}"


# -- time to the tutorial's loss -----------------------------------------------------------------------------------


def ttq_rows(settings: Settings, weights: str, folder: Path) -> list[Row]:
    """The reference, then ours (the stylize recipe), in 32-true and bf16-mixed, to the reference's loss."""
    size = settings.ttq_size
    images = folder / "ttq-images"
    images.mkdir()
    content = load_image("skimage:astronaut", size)
    style = torch.nn.functional.interpolate(
        load_image(str(STARRY_NIGHT) if STARRY_NIGHT else "skimage:gravel"),
        size=content.shape[-2:],
        mode="bilinear",
        antialias=True,
    )
    args = argparse.Namespace(
        device="cuda" if cuda() else "cpu",
        weights=weights,
        size=size,
        content=str(save_image(content, images / "content.png")),
        style=str(save_image(style, images / "style.png")),
        cap=settings.cap,
        max_steps=settings.ttq_max_steps,
    )
    calibration = run_reference(args, float("-inf"), settings.reference_steps)  # also the reference's warm-up
    target = args.losses[settings.reference_steps - 1]
    warmup = argparse.Namespace(**{**vars(args), "max_steps": 3})
    run_ours(warmup, {}, lbfgs, target, calibration.seconds, folder)
    reset_peak()
    reference = run_reference(args, target, settings.cap * settings.reference_steps, budget=calibration.seconds)
    budget = reference.to_target or calibration.seconds
    rows = [
        Row(
            f"tutorial loss {size} px: reference (tutorial L-BFGS)",
            "s to target",
            reference.to_target,
            peak_mib(),
            f"target {target:.4g} = its loss after {settings.reference_steps} evaluations; steps {reference.steps};"
            f" VGG weights {'random' if weights == 'random' else Path(weights).name}",
        )
    ]
    for label, kwargs in (("", {}), (" bf16-mixed", {"precision": "bf16-mixed"})):
        reset_peak()
        run = run_ours(args, kwargs, lbfgs, target, budget, folder)
        ratio = f"; {budget / run.to_target:.2f}x faster than the reference" if run.to_target else ""
        rows.append(
            Row(
                f"tutorial loss {size} px: ours (stylize recipe, L-BFGS{label})",
                "s to target",
                run.to_target,
                peak_mib(),
                f"steps {run.steps}{ratio}" if run.to_target else f"not reached; steps {run.steps}",
            )
        )
    return rows


# -- the guided diffusion step -------------------------------------------------------------------------------------


def diffusion_rows(settings: Settings) -> list[Row]:
    """Each part of a guided step, then the whole step with the VAE and with the tiny decoder."""
    from diffusers import AutoencoderTiny
    from diffusers.utils import logging as diffusers_logging
    from guided_step_sd15 import sd15_unet, sd15_vae

    from lightning_nst.diffusion.guidance import Sampling, StyleGuidance
    from lightning_nst.diffusion.latents import decode_latents
    from lightning_nst.diffusion.tiny import sd_scheduler

    diffusers_logging.set_verbosity_error()  # not the warning that casting with .to() keeps no module in float32
    device = torch.device("cuda" if cuda() else "cpu")
    dtype = settings.dtype
    torch.manual_seed(0)
    tiny: dict[str, Any] = {}
    if settings.tiny_models:
        unet_small = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
        vae_small = dict(block_out_channels=(16, 32), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip
        tiny = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                    num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)  # fmt: skip
    else:
        unet_small, vae_small = {}, {}
    with device:  # random initialisation on the device: seconds instead of a minute on the CPU
        unet = sd15_unet(**unet_small).to(dtype).eval().requires_grad_(False)
        vae = sd15_vae(**vae_small).to(dtype).eval().requires_grad_(False)
        taesd = AutoencoderTiny(**tiny).to(dtype).eval().requires_grad_(False)
    guidance = StyleGuidance(scale=0.2, decoder="vae", guidance_size=settings.guidance_size,
                             vgg=VGGConfig(weights="random"))  # fmt: skip
    guidance.configure()
    guidance.to(device)
    guidance.set_styles([load_image("skimage:gravel", settings.guidance_size).to(device)])
    tiny_guidance = StyleGuidance(scale=0.2, decoder="tiny", guidance_size=settings.guidance_size,
                                  vgg=VGGConfig(weights="random"))  # fmt: skip
    tiny_guidance.vgg, tiny_guidance.targets = guidance.vgg, guidance.targets
    steps = 50
    scheduler = sd_scheduler()
    scheduler.set_timesteps(steps, device=device)
    t = scheduler.timesteps[steps // 2]
    side = settings.image_size // 8
    latents = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    style_index = torch.zeros(1, dtype=torch.long, device=device)

    def noise_prediction() -> torch.Tensor:
        with torch.no_grad():
            output = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context, return_dict=False)[0]
        uncond, cond = output.chunk(2)
        return uncond + 7.5 * (cond - uncond)

    def decoder(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            x0 = torch.randn(1, 4, side, side, device=device, requires_grad=True)
            decode_latents(module, x0).float().mean().backward()

        return run

    def vgg_loss() -> None:
        image = torch.rand(1, 3, settings.image_size, settings.image_size, device=device, requires_grad=True)
        guidance.style_loss(image, style_index).sum().backward()

    def whole(style: StyleGuidance) -> Callable[[], None]:
        sampling = Sampling(scheduler, vae, taesd, steps)

        def run() -> None:
            kwargs = {"latents": latents, "noise_pred": noise_prediction(), "style_index": style_index, "index": [0]}
            out = style(sampling, steps // 2, t, kwargs)
            scheduler.step(out["noise_pred"], t, latents, return_dict=False)

        return run

    parts = {
        "SD 1.5 UNet forward (CFG batch 2)": noise_prediction,
        "SD 1.5 VAE decoder fwd+bwd": decoder(vae),
        "tiny decoder (AutoencoderTiny) fwd+bwd": decoder(taesd),
        f"VGG style loss fwd+bwd at {settings.guidance_size} px": vgg_loss,
        "whole guided step, VAE decoder": whole(guidance),
        "whole guided step, tiny decoder": whole(tiny_guidance),
    }
    rows = []
    for name, function in parts.items():
        function()  # warm-up
        function()
        reset_peak()
        seconds = []
        for _ in range(settings.repeats):
            sync()
            started = time.perf_counter()
            function()
            sync()
            seconds.append(time.perf_counter() - started)
        rows.append(Row(name, "s/call", statistics.median(seconds), peak_mib(), f"median of {settings.repeats}"))
    return rows


DIFFUSION_ROWS = [
    "SD 1.5 UNet forward (CFG batch 2)",
    "SD 1.5 VAE decoder fwd+bwd",
    "tiny decoder (AutoencoderTiny) fwd+bwd",
    "VGG style loss fwd+bwd at {guidance} px",
    "whole guided step, VAE decoder",
    "whole guided step, tiny decoder",
]


class OutOfBudget(Exception):
    """Raised by the alarm when the budget runs out in the middle of a row."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`OutOfBudget` in the block after ``seconds``: the estimates are bounds, this enforces them."""

    def expire(signum: int, frame: Any) -> None:
        raise OutOfBudget

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- planning and the table ----------------------------------------------------------------------------------------


def plan(settings: Settings, weights: str, folder: Path) -> list[Plan]:
    """Every row, in order, with the most seconds it is allowed to need (a generous bound for an H100)."""
    plans = []
    for size in settings.nst_sizes:
        scale = (size / 512) ** 2
        for optimizer, precisions in (("Adam", PRECISIONS), ("L-BFGS", ("32-true",))):
            for precision in precisions:
                for layout_name in LAYOUTS if optimizer == "Adam" else LAYOUTS[:1]:
                    plans.append(
                        Plan(
                            nst_name(size, precision, layout_name, optimizer),
                            "s/step",
                            (8 + 1.5 * scale) * settings.estimate_scale,
                            lambda a=(size, precision, layout_name, optimizer): [nst_fit(*a, settings, folder)],
                        )
                    )
    size = settings.ttq_size
    names = [f"tutorial loss {size} px: ours (stylize recipe, L-BFGS{label})" for label in ("", " bf16-mixed")]
    plans.append(
        Plan(f"tutorial loss {size} px: reference (tutorial L-BFGS)", "s to target", 120 * settings.estimate_scale,
             lambda: ttq_rows(settings, weights, folder), names)
    )  # fmt: skip
    names = [name.format(guidance=settings.guidance_size) for name in DIFFUSION_ROWS]
    plans.append(Plan(names[0], "s/call", 90 * settings.estimate_scale, lambda: diffusion_rows(settings), names[1:]))
    return plans


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| row | measure | seconds | peak MiB | note |", "|---|---|---|---|---|"]
    for row in rows:
        seconds = f"{row.seconds:.4g}" if row.seconds is not None else "-"
        peak = f"{row.peak_mib:.0f}" if row.peak_mib is not None else "n/a"
        lines.append(f"| {row.name} | {row.measure} | {seconds} | {peak} | {row.note} |")
    return "\n".join(lines) + "\n"


def device_line() -> str:
    if cuda():
        name = torch.cuda.get_device_name()
        return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def main() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning_nst", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the whole check may take (480)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device, seconds: the code paths only")
    parser.add_argument("--dry-run", action="store_true", help="print the planned rows and their estimates, run none")
    parser.add_argument(
        "--weights",
        default=str(PARTIAL_WEIGHTS) if PARTIAL_WEIGHTS else "random",
        help="VGG weights of the time-to-loss rows (default: ../shared's partial file, else random)",
    )
    args = parser.parse_args()
    started = STARTED
    settings = SMOKE if args.smoke else Settings()
    if args.smoke and not cuda():
        torch.set_num_threads(1)  # tiny tensors: on a busy CPU, more threads only wait on each other (seconds a step)
    if not cuda() and not args.smoke and not args.dry_run:
        sys.exit("gpu_check: no CUDA device; run with --smoke (code paths only) or --dry-run (the plan)")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        plans = plan(settings, args.weights, folder)
        if args.dry_run:
            print(f"| planned row | measure | at most s |  (budget {args.budget_s:.0f} s)\n|---|---|---|")
            for item in plans:
                print(f"| {item.name} | {item.measure} | {item.estimate_s:.0f} |")
                for extra in item.extra:
                    print(f"| {extra} | {item.measure} | (with the row above) |")
            print(f"total at most {sum(item.estimate_s for item in plans):.0f} s")
            return
        if cuda():  # so that the first row does not pay for starting CUDA and cuDNN
            print("warming up: CUDA, cuDNN and a 2-step fit", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                nst_fit(64, "32-true", "channels_last", "Adam", Settings(nst_warmup=1, nst_steps=1), folder)
        rows: list[Row] = []
        failed = False
        slower = 1.0  # how much slower than their estimates the rows so far ran; later estimates grow by it
        for item in plans:
            left = args.budget_s - (time.perf_counter() - started)
            if item.estimate_s * slower > left:
                rows += [Row(name, item.measure, note="skipped: budget") for name in [item.name, *item.extra]]
                continue
            print(f"running: {item.name} ({left:.0f} s of budget left)", file=sys.stderr, flush=True)
            began = time.perf_counter()
            try:
                with deadline(left), contextlib.redirect_stdout(io.StringIO()):
                    rows += item.run()
            except OutOfBudget:
                rows += [Row(name, item.measure, note="stopped: budget") for name in [item.name, *item.extra]]
                slower = math.inf  # nothing more fits
                continue
            except Exception as error:  # noqa: BLE001  (the other rows' figures are still worth the table)
                reason = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                rows += [Row(name, item.measure, note=reason[:200]) for name in [item.name, *item.extra]]
                failed = True
                continue
            slower = max(slower, (time.perf_counter() - began) / item.estimate_s)
    mode = "smoke (tiny sizes, figures mean nothing)" if args.smoke else "check"
    header = (
        f"GPU check ({mode}) on {device_line()}; {time.perf_counter() - started:.0f} s of a {args.budget_s:.0f} s "
        f"budget. `python benchmarks/gpu_check.py{' --smoke' if args.smoke else ''}`"
    )
    text = table(rows, header)
    print(text)
    if args.out:
        args.out.write_text(text)
    if failed:
        sys.exit("gpu_check: a row failed (see its note)")
    if any(row.seconds is not None and not math.isfinite(row.seconds) for row in rows):
        sys.exit("gpu_check: a figure is not finite")


if __name__ == "__main__":
    main()
