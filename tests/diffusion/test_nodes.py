"""Runs across nodes with Lightning's own launchers: torchrun with two "nodes" on this machine, and SLURM's variables
under an srun that starts its tasks here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_nst.core.files import FOLDER_LOCK, FolderLock
from lightning_nst.main import main
from lightning_nst.nst.fast.networks import RECORD_KEY
from tests.conftest import REPO, cli_error
from tests.tiny_pipeline import batch_args, records

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun_node(
    rank: int, args: list[str], port: int, *, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[str]:
    """Node ``rank`` of two, one process each, started by torchrun as on a cluster (both on this machine)."""
    return subprocess.Popen(
        [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "lightning_nst", *args, "--trainer.num_nodes=2", "--trainer.devices=1", "--node_wait=120",
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # 15 s alone, 30 s beside the rest: the default suite is at its budget
def test_two_torchrun_nodes_write_each_item_once_as_one_process_does(pipeline_dir: Path, tmp_path: Path) -> None:
    args = batch_args(pipeline_dir, tmp_path / "nodes", 5, "--data.batch_size=2", "--trainer.enable_progress_bar=true")
    nodes = [torchrun_node(rank, args, 29677, env=ENV) for rank in (0, 1)]
    outputs = []
    for node in nodes:
        output, _ = node.communicate(timeout=600)
        assert node.returncode == 0, output[-3000:]
        outputs.append(output)
    # Node 0 alone reports the progress of the whole grid, its last line once both nodes are done.
    assert re.search(r"^item 5/5 \(2 processes\), [\d.e+-]+ items/s, done in \d+:\d\d$", outputs[0], re.M), outputs[0]
    assert "item " not in outputs[1]
    one = batch_args(pipeline_dir, tmp_path / "one", 5, "--data.batch_size=2")
    done = subprocess.run([sys.executable, "-m", "lightning_nst", *one], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = records(tmp_path / "nodes")
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]  # each item once
    assert {line["rank"] for line in lines} == {0, 1}  # both nodes generated
    # The nodes take whole batches of a one-process run ([0, 1], [2, 3], [4]), so the images are the same bytes.
    for line in lines:
        assert (tmp_path / "nodes" / line["image"]).read_bytes() == (tmp_path / "one" / line["image"]).read_bytes()


def test_a_folder_another_run_writes_is_refused_before_any_work(
    pipeline_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid"
    other = FolderLock(out, "GenerationWriter.output_dir", "grid of another run")
    other.acquire()  # a run in progress (this process, alive), with other settings
    line = cli_error(capfd, batch_args(pipeline_dir, out, 2))
    assert line.startswith(f"lightning-nst: error: GenerationWriter.output_dir: {out} is being written by another run")
    assert "with other settings" in line
    assert sorted(path.name for path in out.iterdir()) == [FOLDER_LOCK]  # nothing written
    other.release()
    main(batch_args(pipeline_dir, out, 2))  # once it is done, the folder is free
    assert len(records(out)) == 2 and not (out / FOLDER_LOCK).exists()


def records_so_far(folder: Path) -> list[dict[str, object]]:
    """The records of a run that did not end: the manifest (if any) and every process's part file."""
    files = [folder / "predictions.jsonl", *folder.glob(".predictions.jsonl.rank*.part")]
    return [json.loads(line) for file in files if file.is_file() for line in file.read_text().splitlines()]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_launcher_stops_its_workers_and_a_relaunch_completes(pipeline_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "grid"
    slow_items = ["--data.batch_size=1", "--model.num_inference_steps=40", "--model.height=128", "--model.width=128"]
    args = [sys.executable, "-m", "lightning_nst", *batch_args(pipeline_dir, out, 8, *slow_items),
            "--trainer.devices=2", "--trainer.strategy=ddp"]  # fmt: skip
    launcher = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(out.glob("*.png")) and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    workers = _children(launcher.pid)
    assert list(out.glob("*.png")) and workers, "the run never began generating"
    launcher.kill()  # kill -9 of the process that launched the others
    launcher.wait()
    killed = time.monotonic()
    while any(_running(pid) for pid in workers) and time.monotonic() - killed < 2:
        time.sleep(0.1)
    # Measured: the workers ended 0.1 ms after the kill; without PR_SET_PDEATHSIG one was still generating at 2 s.
    assert not any(_running(pid) for pid in workers), "a worker outlived its launcher by 2 s"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)  # the same command again
    assert done.returncode == 0, done.stderr[-3000:]
    lines = records(out)
    assert sorted(line["index"] for line in lines) == list(range(8))  # complete, each item once
    for line in lines:
        assert hashlib.sha256((out / line["image"]).read_bytes()).hexdigest() == line["sha256"]
    assert not (out / FOLDER_LOCK).exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_one_node_leaves_the_rest_to_a_relaunch_of_both(pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    slow_items = ["--data.batch_size=1", "--model.num_inference_steps=40", "--model.height=128", "--model.width=128"]
    args = batch_args(pipeline_dir, out, 8, *slow_items)
    nodes = [torchrun_node(rank, args, 29681, env=ENV) for rank in (0, 1)]
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.png"))) < 2 and time.monotonic() < deadline and nodes[1].poll() is None:
        time.sleep(0.2)
    workers = _children(nodes[1].pid)
    assert len(list(out.glob("*.png"))) >= 2 and workers, "the run never began generating"
    nodes[1].kill()  # kill -9 of node 1's launcher, as when a machine is lost
    nodes[1].communicate()
    killed = time.monotonic()
    while any(_running(pid) for pid in workers) and time.monotonic() - killed < 2:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in workers), "node 1's worker outlived its launcher by 2 s"
    output, _ = nodes[0].communicate(timeout=300)  # node 0 takes the rest, but cannot end the run without node 1
    assert nodes[0].returncode != 0, output[-3000:]
    assert "lightning-nst: error: GenerationWriter: another process of this run ended before it (" in output
    finished = {line["index"] for line in records_so_far(out)}
    assert 0 < len(finished) < 8, output[-3000:]
    relaunched = [torchrun_node(rank, args, 29682, env=ENV) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in relaunched]
    assert [node.returncode for node in relaunched] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert f"Generating {8 - len(finished)} of 8 items" in outputs[0]  # only what was missing
    lines = records(out)
    assert sorted(line["index"] for line in lines) == list(range(8))  # complete, each item once
    for line in lines:
        assert hashlib.sha256((out / line["image"]).read_bytes()).hexdigest() == line["sha256"]
    assert sorted(path.name for path in out.glob("*.png")) == sorted(line["image"] for line in lines)
    assert not (out / FOLDER_LOCK).exists()


# srun as SLURM runs a job step on one node: every task a process with SLURM's variables, the step failing with any.
FAKE_SRUN = """#!{python}
import os, subprocess, sys
tasks = int(os.environ["SLURM_NTASKS"])
env = lambda task: {{**os.environ, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_NODEID": "0"}}
steps = [subprocess.Popen(sys.argv[1:], env=env(task)) for task in range(tasks)]
sys.exit(max(step.wait() for step in steps))
"""


@pytest.mark.slow
def test_the_sbatch_script_generates_the_grid_under_slurms_variables(pipeline_dir: Path, tmp_path: Path) -> None:
    # No SLURM cluster here: the script runs as sbatch would run it on a node, with an srun that starts its two tasks
    # on this machine, so Lightning's SLURM environment assigns the ranks.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "grid", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": "29683",
    }  # fmt: skip
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {**ENV, **slurm, "PATH": path, "OUTPUT_DIR": str(tmp_path / "grid")}
    overrides = batch_args(pipeline_dir, None, 5, "--data.batch_size=2")[3:]  # after `predict --config FILE`
    script = REPO / "docs" / "cluster" / "generate.sbatch"
    done = subprocess.run(["bash", str(script), *overrides], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stderr  # two processes of one run, which met through SLURM's variables
    lines = records(tmp_path / "grid")
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4] and {line["rank"] for line in lines} == {0, 1}


@pytest.mark.slow
def test_a_fast_network_trains_over_two_torchrun_nodes(tmp_path: Path) -> None:
    fit = [
        "fit", "-c", str(REPO / "configs" / "fast_style_train.yaml"), "--trainer.accelerator=cpu",
        "--trainer.max_steps=4", "--trainer.enable_progress_bar=false", "--data.init_args.size=64",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=2", "--model.init_args.width=8",
        "--model.init_args.vgg.weights=random",
    ]  # fmt: skip
    nodes = [torchrun_node(rank, fit, 29684, env=ENV, cwd=tmp_path) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "MEMBER: 2/2" in outputs[1]
    # One run on a shared folder: one version folder, one checkpoint, of the steps both nodes took together.
    (last,) = tmp_path.glob("logs/fast_style_train/version_*/checkpoints/last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and saved[RECORD_KEY]["kind"] == "johnson"
