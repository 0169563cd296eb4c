"""Per-evaluation levers on this machine: one VGG19 forward+backward in float32 (NCHW), channels_last, bf16 autocast
(NCHW) and torch.compile, measured alternately in one process (median of ``--repeats``).

    python benchmarks/cpu_levers.py --size 256 --layer relu3_1 --repeats 5 [--compile]

Not a test. bf16 autocast only pays on CPUs with native bf16 (AVX512-BF16 or AMX); the script prints whether this
one has them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_nst.core.vgg import VGG19Features


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return {flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {flag}" in text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--layer", default="relu3_1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (compiles first, minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vgg = VGG19Features([args.layer], weights="random", channels_last=False)  # NCHW: the float32 baseline
    last = VGG19Features([args.layer], weights="random")  # channels_last, as the product runs it
    image = torch.rand(1, 3, args.size, args.size, requires_grad=True)
    image_last = torch.rand(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    image_last.requires_grad_()

    def float32() -> None:
        vgg(image)[args.layer].sum().backward()

    def channels_last() -> None:
        last(image_last)[args.layer].sum().backward()

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = vgg(image)[args.layer]
        features.float().sum().backward()

    settings: dict[str, Callable[[], None]] = {"float32": float32, "channels_last": channels_last}
    settings["bf16 autocast"] = bf16
    if args.compile:
        compiled = torch.compile(vgg)

        def compiled_step() -> None:
            compiled(image)[args.layer].sum().backward()

        started = time.perf_counter()
        compiled_step()
        print(f"torch.compile warm-up: {time.perf_counter() - started:.1f} s")
        settings["torch.compile"] = compiled_step
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats + 1):
        for name, step in settings.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    print(f"VGG19 to {args.layer}, forward+backward at {args.size} px, {args.threads} threads")
    print(f"CPU flags: {sorted(cpu_flags())}")
    base = statistics.median(times["float32"][1:])
    print(f"{'setting':<16}{'s':>9}{'× float32':>11}")
    for name, values in times.items():
        median = statistics.median(values[1:])
        print(f"{name:<16}{median:>9.4f}{median / base:>11.2f}")


if __name__ == "__main__":
    main()
