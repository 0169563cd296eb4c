"""Fast style networks against optimisation: inference time, training throughput and quality, in one table each.

    python benchmarks/fast_networks.py --sizes 256 512 1024 --train-steps 40 --quality-steps 300

1. **Inference**: milliseconds per image of a trained-size network's forward pass (Johnson's TransformerNet, width
   32 and 5 residual blocks as in the paper; AdaIN with a relu4_1 encoder) at each size, batch 1, median of
   ``--repeats`` after a warm-up, in float32 and (where this device computes bfloat16 natively) bf16 autocast;
   against what ``lightning-nst stylize`` spends on one image at that size: its measured seconds per step (a real
   fit of ``configs/style_transfer_gram.yaml`` for ``--opt-steps`` steps, ``summary.json``'s
   ``seconds_per_step_after_first``) times its default step count (500). The weights do not change the time of a
   pass, so random weights are used.
2. **Training throughput**: images per second of ``lightning-nst fit -c fast_style_train`` at 1 and 2 processes
   (``--trainer.devices 2 --trainer.strategy ddp`` on the CPU), each process with ``--threads`` // processes threads,
   from the steps after the first ``--warmup-steps`` (clocked by the callback :class:`Throughput`).
3. **Quality on held-out photos**: a Johnson network trained here for ``--quality-steps`` steps on crops of the
   photos (``--photos``; by default ``../shared/data/content``'s photos, else the shipped samples, in either case
   without the held-out ones), its output on held-out photos against ``stylize``'s optimisation result of the same
   photos (``--opt-quality-steps`` steps), both scored by one definition: the Gram style loss over relu1_1..relu3_1
   and the content loss at relu2_2 (``lightning_nst.core.losses``), with the VGG weights given (``--weights``).

Not a test: figures for ``docs/benchmarks.md``, measured with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STYLIZE_STEPS = 500  # configs/style_transfer_gram.yaml's trainer.max_steps, stylize's default
SHARED = ROOT.parent / "shared"


def _shared(relative: str) -> str | None:
    path = SHARED / relative
    return str(path) if path.exists() and os.environ.get("LIGHTNING_NST_HIDE_SHARED", "") in ("", "0") else None


# -- 1. inference ---------------------------------------------------------------------------------------------------


def forward_ms(network: torch.nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int, bf16: bool) -> float:
    """Median milliseconds of one forward pass of ``network`` on ``inputs``."""
    context = torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext()
    times = []
    with torch.inference_mode(), context:
        network(*inputs)  # warm-up: oneDNN picks its kernels on the first call of each shape
        for _ in range(repeats):
            started = time.perf_counter()
            network(*inputs)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def stylize_seconds_per_step(size: int, steps: int, weights: str, folder: Path) -> float:
    """``seconds_per_step_after_first`` of a real ``stylize``-config fit at ``size`` (a fresh process)."""
    logs = folder / f"opt-{size}-{time.monotonic_ns()}"
    command = [
        sys.executable, "-m", "lightning_nst", "fit", "-c", str(ROOT / "configs" / "style_transfer_gram.yaml"),
        "--data.init_args.size", str(size), "--trainer.max_steps", str(steps),
        "--model.init_args.vgg.weights", weights, "--trainer.logger.init_args.save_dir", str(logs),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if weights not in ("auto", "imagenet", "random"):
        command += ["--model.init_args.vgg.fill_missing", "true"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
    summary = json.loads(next(logs.rglob("summary.json")).read_text())
    return float(summary["seconds_per_step_after_first"])


def inference_table(args: argparse.Namespace, folder: Path) -> None:
    from lightning_nst.core.hardware import fast_bf16
    from lightning_nst.nst.fast.networks import AdaINNet, TransformerNet

    torch.manual_seed(0)
    networks = {"johnson": TransformerNet().eval(), "adain": AdaINNet("relu4_1", weights="random").eval()}
    precisions = [False, True] if fast_bf16("cpu") else [False]
    print("\n## Inference against optimisation (ms per image, batch 1)\n")
    header = ["size", *(f"{kind} {'bf16' if bf16 else 'fp32'}" for kind in networks for bf16 in precisions)]
    header += ["stylize s/step", f"stylize s/image ({DEFAULT_STYLIZE_STEPS} steps)", "fastest network x faster"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for size in args.sizes:
        content = torch.rand(1, 3, size, size)
        style = torch.rand(1, 3, min(size, 512), min(size, 512))
        cells, fastest = [], float("inf")
        for kind, network in networks.items():
            inputs = (content,) if kind == "johnson" else (content, style)
            for bf16 in precisions:
                ms = forward_ms(network, inputs, args.repeats, bf16)
                fastest = min(fastest, ms) if kind == "johnson" else fastest
                cells.append(f"{ms:.1f}")
        per_step = stylize_seconds_per_step(size, args.opt_steps, args.weights, folder)
        per_image = per_step * DEFAULT_STYLIZE_STEPS
        cells += [f"{per_step:.3f}", f"{per_image:.1f}", f"{1000 * per_image / fastest:.0f}x (johnson)"]
        print(f"| {size} | " + " | ".join(cells) + " |", flush=True)


# -- 2. training throughput -----------------------------------------------------------------------------------------


class Throughput(L.Callback):
    """Benchmark-only: images per second over the steps after ``warmup``, all processes together, into ``path``."""

    def __init__(self, path: str, warmup: int = 5) -> None:
        self.path, self.warmup = path, warmup
        self.started: float | None = None
        self.images = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.started, self.images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.started is not None:
            images = batch["content"] if isinstance(batch, dict) else batch  # ImageFolders' batches are dicts
            self.images += len(images) * trainer.world_size

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero and self.started is not None:
            seconds = time.perf_counter() - self.started
            Path(self.path).write_text(json.dumps({"images": self.images, "seconds": seconds}))


def training_images_per_second(processes: int, args: argparse.Namespace, folder: Path) -> float:
    out = folder / f"throughput-{processes}-{time.monotonic_ns()}.json"
    command = [
        sys.executable, "-m", "lightning_nst", "fit", "-c", str(ROOT / "configs" / "fast_style_train.yaml"),
        "--trainer.max_steps", str(args.warmup_steps + args.train_steps), "--trainer.accelerator", "cpu",
        "--trainer.devices", str(processes), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(folder / "train-logs"),
        "--trainer.callbacks+=fast_networks.Throughput", f"--trainer.callbacks.init_args.path={out}",
        f"--trainer.callbacks.init_args.warmup={args.warmup_steps}",
        "--data.init_args.size", str(args.train_size), "--model.init_args.vgg.weights", args.weights,
    ]  # fmt: skip
    if processes > 1:
        command += ["--trainer.strategy", "ddp"]
    if args.weights not in ("auto", "imagenet", "random"):
        command += ["--model.init_args.vgg.fill_missing", "true"]
    threads = str(max(1, args.threads // processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": f"{ROOT / 'benchmarks'}:{ROOT}"}
    subprocess.run(command, check=True, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    return result["images"] / result["seconds"]


def training_table(args: argparse.Namespace, folder: Path) -> None:
    print(f"\n## Training throughput ({args.train_size} px crops, {args.threads} threads in all)\n")
    print("| processes | images/s | x 1 process |\n|---|---|---|")
    base = None
    for processes in args.processes:
        rate = training_images_per_second(processes, args, folder)
        base = base or rate
        print(f"| {processes} | {rate:.2f} | {rate / base:.2f} |", flush=True)


# -- 3. quality -----------------------------------------------------------------------------------------------------


def training_photos(held_out: list[str], folder: Path) -> str:
    """A folder of photos none of which is held out: ``../shared/data/content``'s, else the shipped samples'."""
    import shutil

    from lightning_nst.core.images import _shipped_file

    stems = {Path(photo.split(":", 1)[-1]).stem for photo in held_out}
    shared = _shared("data/content")
    sources = sorted(Path(shared).iterdir()) if shared else [
        _shipped_file(name, "photos") for name in ("brick", "grass", "gravel", "immunohistochemistry")
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if source.stem not in stems:
            shutil.copy(source, folder / source.name)
    return str(folder)


def quality_table(args: argparse.Namespace, folder: Path) -> None:
    from lightning_nst.core.images import load_image
    from lightning_nst.core.losses import ContentLoss, LayerStyleLoss
    from lightning_nst.core.vgg import VGG19Features

    train = folder / "quality"
    command = [
        sys.executable, "-m", "lightning_nst", "fit", "-c", str(ROOT / "configs" / "fast_style_train.yaml"),
        "--trainer.max_steps", str(args.quality_steps), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(train), "--data.init_args.style", args.style,
        "--data.init_args.size", str(args.train_size), "--model.init_args.vgg.weights", args.weights,
    ]  # fmt: skip
    command += ["--data.init_args.images", args.photos or training_photos(args.held_out, folder / "photos")]
    if args.weights not in ("auto", "imagenet", "random"):
        command += ["--model.init_args.vgg.fill_missing", "true"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_seconds = time.perf_counter() - started
    checkpoint = max(train.rglob("last.ckpt"), key=lambda path: path.stat().st_mtime)
    layers = ["relu1_1", "relu2_1", "relu3_1"]
    vgg = VGG19Features([*layers, "relu2_2"], args.weights, fill_missing=args.weights not in ("auto", "random"))
    style = load_image(args.style, args.size)
    style_loss = LayerStyleLoss({k: v for k, v in vgg(style).items() if k in layers}, "gram")
    print(f"\n## Quality on held-out photos ({args.size} px; network trained {args.quality_steps} steps in "
          f"{train_seconds:.0f} s; VGG {vgg.weights_used})\n")  # fmt: skip
    print("| photo | method | style loss | content loss | seconds |\n|---|---|---|---|---|")
    for photo in args.held_out:
        content = load_image(photo, args.size)
        content_loss = ContentLoss(vgg(content)["relu2_2"])
        outputs = {}
        for method in ("network", "optimisation"):
            out = folder / f"{method}-{Path(photo).stem}-{time.monotonic_ns()}.png"
            extra = ["--network", str(checkpoint)] if method == "network" else [args.style]
            if method == "optimisation":
                extra += ["--steps", str(args.opt_quality_steps), "--weights", args.weights]
                extra += ["--fill-missing"] if args.weights not in ("auto", "random") else []
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lightning_nst", "stylize", photo, *extra, "--size", str(args.size),
                            "-o", str(out)], check=True, cwd=folder, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
            outputs[method] = (load_image(str(out)), time.perf_counter() - started)
        for method, (image, seconds) in {"photo itself": (content, 0.0), **outputs}.items():
            features = vgg(image)
            print(f"| {Path(photo).name} | {method} | {style_loss(features).item():.4g} | "
                  f"{content_loss(features['relu2_2']).item():.4g} | {seconds:.1f} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["inference", "training", "quality"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--opt-steps", type=int, default=6, help="steps of the stylize fit that clocks its s/step")
    parser.add_argument("--weights", default=_shared("models/vgg19_imagenet_conv1_1-conv3_1.pth") or "random")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--quality-steps", type=int, default=200)
    parser.add_argument("--opt-quality-steps", type=int, default=DEFAULT_STYLIZE_STEPS)
    parser.add_argument("--style", default=_shared("data/style/starry_night.jpg") or "sample:brick")
    parser.add_argument("--photos", help="training photos folder (default: the config's)")
    parser.add_argument("--held-out", nargs="+", default=["sample:astronaut", "sample:coffee"])
    parser.add_argument("--size", type=int, default=256, help="size of the quality comparison")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; VGG weights {args.weights}")
    with tempfile.TemporaryDirectory() as folder:
        if "inference" in args.parts:
            inference_table(args, Path(folder))
        if "training" in args.parts:
            training_table(args, Path(folder))
        if "quality" in args.parts:
            quality_table(args, Path(folder))


if __name__ == "__main__":
    main()
