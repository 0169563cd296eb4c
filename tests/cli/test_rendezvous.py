"""A process of a multi-process run waits for its peers at most ``--node_wait`` seconds, and stops on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, cli_error

# A fast network's training may run over several processes; here node 0 of 2, whose node 1 never comes.
ALONE = [
    sys.executable, "-m", "lightning_nst", "fit", "-c", str(CONFIGS / "fast_style_train.yaml"),
    "--trainer.accelerator=cpu", "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.max_steps=1",
    "--data.init_args.size=32", "--data.init_args.num_workers=0", "--model.init_args.width=4",
    "--model.init_args.vgg.weights=random", "--trainer.enable_progress_bar=false",
]  # fmt: skip
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def start(tmp_path: Path, port: int, node_wait: float) -> subprocess.Popen[str]:
    env = {**ENV, "MASTER_PORT": str(port)}
    command = [*ALONE, f"--node_wait={node_wait}"]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_node_alone_gives_up_after_node_wait_in_one_line(tmp_path: Path) -> None:
    process = start(tmp_path, 29631, 2)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("lightning-nst: error: node_wait: waited 2 s for the other 1 process(es) of this run")
    assert "127.0.0.1:29631" in last and "--node_wait SECONDS" in last and "Traceback" not in output
    assert not (tmp_path / "logs").exists()  # it wrote nothing


# SIGINT takes the same path as SIGTERM (both get their default action around the wait): the slow suite has it.
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_ends_the_wait_for_peers_at_once(tmp_path: Path, signum: signal.Signals) -> None:
    process = start(tmp_path, 29632 + int(signum), 300)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:  # until it waits for its peer
        lines.append(line)
        if "MEMBER: 1/2" in line:
            break
    time.sleep(1)
    sent = time.monotonic()
    process.send_signal(signum)
    try:
        process.wait(timeout=30)
    finally:
        process.kill()  # the wait a signal did not end
    assert time.monotonic() - sent < 5, "".join(lines)
    assert process.returncode != 0


def test_a_node_wait_that_is_no_positive_number_is_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    line = cli_error(capfd, [*ALONE[3:6], "--trainer.max_steps=1", "--node_wait=0"])
    assert line == "lightning-nst: error: node_wait: must be a number of seconds > 0, got 0.0"


PEER = """
import atexit, sys, time, types
from datetime import timedelta
import torch.distributed as dist
from lightning_nst.cli import rendezvous

store, rank = sys.argv[1], int(sys.argv[2])

def meet():  # what a strategy's setup_environment does, with the timeout guard gave it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=strategy._timeout)

atexit.register(lambda: print("left" if not dist.is_initialized() else "still in its process group"))
strategy = types.SimpleNamespace(_timeout=timedelta(seconds=60), setup_environment=meet)
rendezvous.guard(types.SimpleNamespace(strategy=strategy, world_size=2), 1)
strategy.setup_environment()
time.sleep(3 * rank)  # process 1 is slower: process 0 waits 3 s at the barrier, longer than node_wait
dist.barrier()
print("met")
"""


def test_peers_wait_for_each_other_beyond_node_wait_and_leave_their_group_before_python_ends(tmp_path: Path) -> None:
    # node_wait bounds the wait for peers to meet, not a barrier's; a Gloo group left to the interpreter's
    # finalization aborts the process now and then (SIGABRT) after its work.
    command = [sys.executable, "-c", PEER, str(tmp_path / "store")]
    peers = [subprocess.Popen([*command, str(rank)], env=ENV, stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [peer.communicate(timeout=120)[0] for peer in peers]
    assert [peer.returncode for peer in peers] == [0, 0], outputs
    assert [output.split() for output in outputs] == [["met", "left"]] * 2
