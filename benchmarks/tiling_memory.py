"""Peak memory and seconds per step of tiled against untiled optimisation, and the largest size within a memory limit.

    python benchmarks/tiling_memory.py --sizes 512 1024 2048 --steps 3
    python benchmarks/tiling_memory.py --largest --limit-gb 8 --ladder 1024 1536 2048 3072 4096
    python benchmarks/tiling_memory.py --find-largest --limit-gb 8 --high 8192
    python benchmarks/tiling_memory.py --phases --sizes 2048 --steps 2 --optimizer adam

Each run is a real Lightning fit of ``ImageOptimization`` (Gatys style transfer: content relu4_2, style relu1_1..
relu5_1, Gram, L-BFGS as ``configs/style_transfer_gram.yaml``; random VGG weights, which cost the same as ImageNet
ones) in a fresh process, so its peak resident set (``ru_maxrss``) is its own; s/step is ``summary.json``'s
``seconds_per_step_after_first``. The parent polls each child's resident set and kills it once it passes
``--limit-gb`` ("over the limit"), so a size that does not fit cannot take the machine's memory. Tiled runs set the
contract's ``model.tile_size``/``model.tile_overlap``; if this build's ``ImageOptimization`` has no ``tile_size``,
the tiled rows print "not available in this build" and no number. On a CUDA device the child also reports
``torch.cuda.max_memory_allocated``.

``--find-largest`` bisects over sizes in multiples of 256 (a fresh 2-step fit per size) for the largest that stays
within ``--limit-gb``, untiled and tiled, always with Adam: L-BFGS's history (2 x history_size image-sized tensors)
is left out, since ``ImageOptimization`` refuses a history larger than the memory available before the fit.
``--phases`` reports the peak resident set of each phase of one fit (setup, targets, first step, the other steps,
results and writers, checkpoint), resetting the peak between phases (Linux ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig

STYLE = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


def tiling_available() -> bool:
    return "tile_size" in inspect.signature(ImageOptimization.__init__).parameters


OPTIMIZERS = {
    # configs/style_transfer_gram.yaml's; its history (2 x 50 image-sized tensors) is most of the memory at 2048 px
    "lbfgs": lambda params: torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=50),
    "adam": lambda params: torch.optim.Adam(params, lr=0.02),  # configs/large_print.yaml's
}


def peak_mb(reset: bool = False) -> float:
    """This process's peak resident set (VmHWM) in MB; with ``reset``, then reset it to the current one."""
    status = Path("/proc/self/status").read_text().splitlines()
    value = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return value


class Phases(L.Callback):
    """Peak resident set of each phase of a fit, the peak reset at each phase's start."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.peaks[phase] = round(peak_mb(reset=True))

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.mark("setup (images, VGG, data)")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.mark("targets (content and style)")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == 1:
            self.mark("first step")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.mark("other steps")


def child(
    size: int, steps: int, tile_size: int, tile_overlap: int, optimizer: str = "lbfgs", phases: bool = False
) -> None:
    """One fit; prints {"peak_mb", "baseline_mb", "s_per_step", "cuda_mb"} as JSON on its last line."""
    warnings.filterwarnings("ignore")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if phases:
        peak_mb(reset=True)
    recorder = Phases()
    tiling = {"tile_size": tile_size, "tile_overlap": tile_overlap} if tile_size else {}
    model = ImageOptimization(
        [Objective("gram", content_layers=["relu4_2"], style_layers=STYLE, style_weight=1e6)],
        vgg=VGGConfig(weights="random"),
        init="content",
        optimizer=OPTIMIZERS[optimizer],
        **tiling,
    )
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cuda" if cuda else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[*([recorder] if phases else []), ImageWriter(output_dir=folder, snapshot_every=0)],
        )
        trainer.fit(model, ImageTargets(content="skimage:astronaut", style=["skimage:gravel"], size=size))
        summary = json.loads((Path(folder) / "summary.json").read_text())
        if phases:
            recorder.mark("results and writers (PNG, summary.json)")
            trainer.save_checkpoint(Path(folder) / "last.ckpt")
            recorder.mark("checkpoint")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; since the last phase's reset with --phases
    peak = max([peak, *(1024 * mb for mb in recorder.peaks.values())])
    print(
        json.dumps(
            {
                "phases_mb": recorder.peaks if phases else None,
                "baseline_mb": baseline / 1024,
                "peak_mb": peak / 1024,
                "s_per_step": summary.get("seconds_per_step_after_first"),
                "cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            }
        )
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(size: int, args: argparse.Namespace, tile_size: int, optimizer: str | None = None) -> dict | str:
    """Run one child; its JSON, or why there is none ("over the limit", "timed out", "failed: ...")."""
    command = [sys.executable, __file__, "--child", str(size), str(args.steps), str(tile_size), str(args.tile_overlap)]
    command += ["--child-optimizer", optimizer or args.optimizer, *(["--child-phases"] if args.phases else [])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit = args.limit_gb * 1024
    deadline = time.monotonic() + args.timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            return f"timed out after {args.timeout_s:g} s"
        try:
            if rss_mb(process.pid) > limit:
                process.kill()
                process.wait()
                return f"over {args.limit_gb:g} GB"
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    out, err = process.communicate()
    if process.returncode:
        return f"failed: {(err.strip().splitlines() or ['?'])[-1][:80]}"
    return json.loads(out.strip().splitlines()[-1])


def row(name: str, size: int, result: dict | str) -> str:
    if isinstance(result, str):
        return f"| {name} | {size} | {result} | | | |"
    cuda = f"{result['cuda_mb']:.0f}" if result["cuda_mb"] is not None else "-"
    over = result["peak_mb"] - result["baseline_mb"]
    return f"| {name} | {size} | {result['peak_mb']:.0f} | {over:.0f} | {result['s_per_step']:.3f} | {cuda} |"


def find_largest(args: argparse.Namespace, tile_size: int) -> tuple[int | None, float | None, str]:
    """Bisect sizes in multiples of 256 in ``[--low, --high]``: the largest whose 2-step Adam fit stays in the limit.

    Returns the size, its peak MB and what the smallest refused size gave (or ``"-"``).
    """
    low, high = args.low // 256, args.high // 256  # in units of 256 px
    fits, peak, refused = None, None, "-"
    while low <= high:
        middle = (low + high) // 2
        result = measure(256 * middle, args, tile_size, optimizer="adam")
        shown = result if isinstance(result, str) else f"{result['peak_mb']:.0f} MB"
        print(f"  {256 * middle} px: {shown}", flush=True)
        if isinstance(result, str):
            high, refused = middle - 1, f"{256 * middle}: {result}"
        else:
            low, fits, peak = middle + 1, 256 * middle, result["peak_mb"]
    return fits, peak, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=3, help="steps per fit (s/step is after the first)")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--tile-overlap", type=int, default=64)
    parser.add_argument("--limit-gb", type=float, default=8.0, help="kill a run whose resident set passes this")
    parser.add_argument("--largest", action="store_true", help="find the largest size of --ladder within the limit")
    parser.add_argument("--ladder", type=int, nargs="+", default=[1024, 1536, 2048, 3072, 4096])
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="lbfgs")
    parser.add_argument("--find-largest", action="store_true", help="bisect for the largest size within the limit")
    parser.add_argument("--low", type=int, default=512, help="--find-largest: smallest size tried")
    parser.add_argument("--high", type=int, default=8192, help="--find-largest: largest size tried")
    parser.add_argument("--timeout-s", type=float, default=1800, help="kill a run that takes longer")
    parser.add_argument("--phases", action="store_true", help="peak resident set per phase of each fit")
    parser.add_argument("--only", choices=["untiled", "tiled"], help="run one of the two settings")
    parser.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-optimizer", choices=list(OPTIMIZERS), help=argparse.SUPPRESS)
    parser.add_argument("--child-phases", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, optimizer=args.child_optimizer or "lbfgs", phases=args.child_phases)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu (no CUDA device: no GPU figures)"
    optimizer = "adam (--find-largest)" if args.find_largest else args.optimizer
    print(f"device: {device}; {torch.get_num_threads()} threads; limit {args.limit_gb:g} GB resident; {optimizer}")
    settings = {"untiled": 0}
    if tiling_available():
        settings[f"tiled {args.tile_size} px, overlap {args.tile_overlap}"] = args.tile_size
    else:
        print("tiled: not available in this build (ImageOptimization has no tile_size)")
    if args.only:
        settings = {name: tile for name, tile in settings.items() if name.startswith(args.only)}
    if args.find_largest:
        print(f"largest size (multiple of 256) whose {args.steps}-step Adam fit stays within {args.limit_gb:g} GB:")
        rows = {name: find_largest(args, tile) for name, tile in settings.items()}
        print("| setting | largest size | peak MB there | smallest refused |")
        print("|---|---|---|---|")
        for name, (fits, peak, refused) in rows.items():
            print(f"| {name} | {fits or 'none'} | {f'{peak:.0f}' if peak else '-'} | {refused} |", flush=True)
        return
    if args.largest:
        print("| setting | largest size within the limit | peak MB there | next size |")
        print("|---|---|---|---|")
        for name, tile in settings.items():
            fits, peak, failed = None, None, "-"
            for size in args.ladder:
                result = measure(size, args, tile)
                if isinstance(result, str):
                    failed = f"{size}: {result}"
                    break
                fits, peak = size, result["peak_mb"]
            print(f"| {name} | {fits or 'none'} | {f'{peak:.0f}' if peak else '-'} | {failed} |", flush=True)
        return
    print("| setting | size | peak RSS MB | above imports MB | s/step | CUDA MB |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for name, tile in settings.items():
            result = measure(size, args, tile)
            print(row(name, size, result), flush=True)
            if args.phases and isinstance(result, dict):
                for phase, mb in result["phases_mb"].items():
                    print(f"|   {phase} | | {mb} | | | |", flush=True)


if __name__ == "__main__":
    main()
