"""How long a ``lightning-nst`` process lives on after its ``Results:`` line, with and without the frozen collector.

``lightning-nst`` (``main()`` on its own command line) calls ``gc.freeze()`` before the interpreter exits, so the
final garbage collection does not visit and free the objects of every loaded module one by one ("after"); "before"
runs the same command with ``gc.freeze`` made a no-op. Each command runs as its own process from a launcher that
does nothing else, alternately before/after, ``--repeats`` times; printed are the medians of the seconds from the
``Results:`` line to the process's end, and of the whole command. ``--load`` starts a process that keeps one more
core busy (a 1-thread matrix product loop) for the whole measurement.

    python benchmarks/exit_time.py --repeats 5            # stylize (64 px, 5 steps) and generate (tiny pipeline)
    python benchmarks/exit_time.py --repeats 5 --load     # the same with the other core busy
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAUNCH = """
import gc, sys
if sys.argv[1] == "before":
    gc.freeze = lambda: None  # the interpreter's own exit: every object freed by the final collection
sys.argv = ["lightning-nst", *sys.argv[2:]]
from lightning_nst.main import main
main()
"""

LOAD = """
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = (a @ a).clamp_(-1, 1)
"""


def once(mode: str, args: list[str], work: Path) -> tuple[float, float]:
    """Seconds from the ``Results:`` line to the end of the process, and of the whole command."""
    for name in ("out.png", "gen", "logs"):
        path = work / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, mode, *args],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    results = None
    for line in process.stderr:
        if line.startswith("Results:"):
            results = time.monotonic()
    process.wait()
    ended = time.monotonic()
    if process.returncode != 0 or results is None:
        raise SystemExit(f"{args[0]} failed ({process.returncode}) or printed no Results line")
    return ended - results, ended - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load", action="store_true", help="keep another core busy during the measurement")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        build = [sys.executable, "-m", "lightning_nst.diffusion.tiny", str(work / "tiny-sd")]
        subprocess.run(build, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        commands = {
            "stylize": ["stylize", "sample:astronaut", "sample:gravel", "-o", "out.png", "--size", "64", "--steps",
                        "5", "--weights", "random"],
            "generate": ["generate", "a red house", "--style", "sample:gravel", "-o", "gen", "--model",
                         str(work / "tiny-sd"), "--steps", "2", "--size", "64", "--weights", "random"],
        }  # fmt: skip
        load = subprocess.Popen([sys.executable, "-c", LOAD]) if options.load else None
        try:
            times: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(options.repeats):
                for name, args in commands.items():
                    for mode in ("before", "after"):
                        times.setdefault((name, mode), []).append(once(mode, args, work))
        finally:
            if load is not None:
                load.kill()
                load.wait()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores); another core busy: {options.load}")
    print(f"{'command':<9} {'exit':<7} {'Results -> exit s (median)':>27} {'runs':>26} {'whole command s':>16}")
    for (name, mode), values in times.items():
        tails = [tail for tail, _ in values]
        runs = " ".join(f"{tail:.2f}" for tail in tails)
        whole = statistics.median(total for _, total in values)
        print(f"{name:<9} {mode:<7} {statistics.median(tails):>27.2f} {runs:>26} {whole:>16.1f}")


if __name__ == "__main__":
    main()
