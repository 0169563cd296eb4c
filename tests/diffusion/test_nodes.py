"""Generation across nodes with Lightning's own launcher: torchrun, two "nodes" on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_nst.core.files import FOLDER_LOCK, FolderLock
from lightning_nst.main import main
from tests.conftest import REPO, cli_error
from tests.tiny_pipeline import batch_args, records

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # 15 s alone, 30 s beside the rest: the default suite is at its budget
def test_two_torchrun_nodes_write_each_item_once_as_one_process_does(pipeline_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = batch_args(pipeline_dir, tmp_path / "nodes", 5, "--data.batch_size=1")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                "29677",
                "-m",
                "lightning_nst",
                *args,
                "--trainer.num_nodes=2",
                "--trainer.devices=1",
                "--node_wait=120",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=600)
        assert node.returncode == 0, output[-3000:]
    one = batch_args(pipeline_dir, tmp_path / "one", 5, "--data.batch_size=1")
    done = subprocess.run([sys.executable, "-m", "lightning_nst", *one], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = records(tmp_path / "nodes")
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]  # each item once
    assert {line["rank"] for line in lines} == {0, 1}  # both nodes generated
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
