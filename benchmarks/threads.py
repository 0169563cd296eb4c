"""Does a fit use the cores it is given? The default style transfer at 1 and 2 torch threads, side by side.

Each round runs the same fit (``configs/style_transfer_gram.yaml``, what ``lightning-nst stylize`` runs, in the
precision this machine gets by default unless ``--precision``) once per thread count, alternately, each in a fresh
process with ``OMP_NUM_THREADS`` set (torch's intra-op threads follow it). Per run: seconds per step after the first
(``summary.json``'s ``seconds_per_step_after_first``), and the CPU seconds the process used per wall second, about
the number of threads that were busy: a loop that serialised (Python-side work, logging, image copies) would
show 2 threads giving well under 2 busy cores and well under 2x the speed. Medians over ``--rounds``.

    python benchmarks/threads.py --size 256 --steps 30 --rounds 3

Not a test: a figure for ``docs/benchmarks.md``, measured with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(threads: int, args: argparse.Namespace, folder: Path) -> tuple[float, float]:
    """(seconds per step after the first, busy cores) of one fit with ``threads`` threads."""
    logs = folder / f"t{threads}-{time.monotonic_ns()}"
    command = [
        sys.executable, "-m", "lightning_nst", "fit", "-c", str(ROOT / "configs" / "style_transfer_gram.yaml"),
        "--data.init_args.size", str(args.size), "--trainer.max_steps", str(args.steps),
        "--model.init_args.vgg.weights", args.weights, "--trainer.logger.init_args.save_dir", str(logs),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if args.weights not in ("auto", "imagenet", "random"):
        command += ["--model.init_args.vgg.fill_missing", "true"]
    if args.precision:
        command += ["--trainer.precision", args.precision]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summaries = sorted(logs.rglob("summary.json"), key=lambda path: path.stat().st_mtime)
    summary = json.loads(summaries[-1].read_text())
    return float(summary["seconds_per_step_after_first"]), cpu / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--weights", default="random", help="VGG19 weights: random (default), auto or a file")
    parser.add_argument("--precision", help="trainer.precision (default: what this machine gets by default)")
    args = parser.parse_args()
    results: dict[int, list[tuple[float, float]]] = {threads: [] for threads in args.threads}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for threads in args.threads:
                results[threads].append(one_run(threads, args, Path(folder)))
    print(f"\nstyle transfer at {args.size} px, {args.steps} steps, {os.cpu_count()} CPUs, median of {args.rounds}")
    print(f"{'threads':>7} {'s/step':>8} {'busy cores':>10} {'speed-up':>8}")
    base = statistics.median(step for step, _ in results[args.threads[0]])
    for threads, runs in results.items():
        step = statistics.median(step for step, _ in runs)
        busy = statistics.median(busy for _, busy in runs)
        print(f"{threads:>7} {step:>8.3f} {busy:>10.2f} {base / step:>7.2f}x")


if __name__ == "__main__":
    main()
