"""Batch-generation throughput of guided sampling: 1 process, 2 (DDP on CPU) and 2 nodes x 1, through the real CLI.

Usage: python benchmarks/generation_throughput.py [--items 12] [--steps 10] [--size 64] [--modes 1 2 2x1 2x1-slow]

Builds the tiny test pipeline (``tests/tiny_pipeline.py``) and runs ``python -m lightning_nst predict -c
configs/guided_diffusion.yaml`` in a subprocess with ``--trainer.devices 1``, with ``--trainer.devices 2
--trainer.strategy ddp``, and as two "nodes" of one process each started by torchrun as on a cluster
(``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr 127.0.0.1 ... --trainer.num_nodes 2``), each
once with N and once with 2N items. Throughput is N / (T(2N) - T(N)): the difference cancels the start-up (imports,
process launch, pipeline loading, rendezvous), which would otherwise dominate at this size. The idle tail is how long,
in the 2N run, the rank that wrote its last item first waited for the last one: from the times of the PNGs each rank
wrote (the manifest's ``rank``). ``2x1-slow`` is the two nodes with node 1 at about half speed: each node pinned to
a core of its own, and a busy loop on node 1's (Linux, two cores or more). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tiny_pipeline import build_tiny_pipeline, tiny_args  # noqa: E402

NAMES = {
    "1": "1",
    "2": "2 (DDP, one machine)",
    "2x1": "2 nodes x 1 (torchrun)",
    "2x1-slow": "2 nodes x 1, node 1 at half speed",
}


def _on_core(core: int) -> Callable[[], None]:
    """A ``preexec_fn`` that pins the process (and what it starts) to CPU ``core``."""
    return lambda: os.sched_setaffinity(0, {core})


def wall_time(folder: Path, name: str, pipeline: Path, items: int, mode: str, args: argparse.Namespace,
              ) -> tuple[float, float]:  # fmt: skip
    """(Seconds of the whole run, its idle tail) for ``items`` items; ``mode`` is a key of ``NAMES``."""
    seeds = ", ".join(str(seed) for seed in range(items))
    nodes = mode.startswith("2x1")
    processes = {"1": 1, "2": 2}.get(mode, 1)
    overrides = [
        f"--trainer.logger.init_args.save_dir={folder}",
        f"--trainer.devices={processes}",
        *(["--trainer.strategy=ddp"] if processes > 1 else []),
        *(["--trainer.num_nodes=2"] if nodes else []),
        f"--data.seeds=[{seeds}]",
    ]
    predict = tiny_args(pipeline, name, *overrides, size=args.size, steps=args.steps)
    if nodes:
        commands = [
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
             str(rank), "--master-addr", "127.0.0.1", "--master-port", str(args.port), "-m", "lightning_nst", *predict]
            for rank in (0, 1)
        ]  # fmt: skip
    else:
        commands = [[sys.executable, "-m", "lightning_nst", *predict]]
    threads = str(max(1, (os.cpu_count() or 1) // (2 if mode != "1" else 1)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads}
    slow = mode == "2x1-slow"
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=_on_core(1)) if slow else None
    started = time.perf_counter()
    running = [subprocess.Popen(command, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=_on_core(rank) if slow else None)
               for rank, command in enumerate(commands)]  # fmt: skip
    try:
        for process in running:
            _, err = process.communicate()
            if process.returncode:
                raise RuntimeError(f"{name}: exit {process.returncode}: {err.decode()[-2000:]}")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    elapsed = time.perf_counter() - started
    (manifest,) = (folder / name).glob("version_*/predictions.jsonl")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    if sorted(record["index"] for record in records) != list(range(items)):
        raise RuntimeError(f"{name}: expected each of {items} items once in the manifest")
    last: dict[int, float] = {}
    for record in records:
        written = (manifest.parent / record["image"]).stat().st_mtime
        last[record["rank"]] = max(last.get(record["rank"], 0.0), written)
    return elapsed, max(last.values()) - min(last.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=12, help="N; each setting also runs 2N")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--port", type=int, default=29711, help="torchrun's master port for the 2-node rows")
    parser.add_argument("--modes", nargs="+", default=list(NAMES), choices=list(NAMES))
    args = parser.parse_args()
    if "2x1-slow" in args.modes and (not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2):
        parser.error("--modes 2x1-slow: needs Linux and two cores")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        pipeline = build_tiny_pipeline(folder / "tiny-sd")
        rows = []
        for mode in args.modes:
            small, _ = wall_time(folder, f"m{mode}n1", pipeline, args.items, mode, args)
            large, idle = wall_time(folder, f"m{mode}n2", pipeline, 2 * args.items, mode, args)
            rows.append((mode, small, large, args.items / (large - small), idle))
    print(f"guided sampling, tiny pipeline, {args.size} px, {args.steps} DDIM steps; N = {args.items} items")
    print("| processes | T(N) s | T(2N) s | items/s | speed-up | idle tail s (2N) |")
    print("|---|---|---|---|---|---|")
    for mode, small, large, throughput, idle in rows:
        print(
            f"| {NAMES[mode]} | {small:.1f} | {large:.1f} | {throughput:.2f} | {throughput / rows[0][3]:.2f} | "
            f"{idle:.1f} |"
        )


if __name__ == "__main__":
    main()
