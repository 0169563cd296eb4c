"""What the README promises in TensorBoard, read back from the real ``tensorboard`` server over its HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lightning_nst.main import main
from lightning_nst.outputs import FitSummary
from tests.conftest import CONFIGS
from tests.tiny_pipeline import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

FIT = "style_transfer_gram/version_0"
PREDICT = "tb_predict/version_0"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(base: str, route: str, body: dict[str, Any] | None = None, **query: str) -> Any:
    url = f"{base}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if response.headers.get_content_type() == "application/json" else raw


@pytest.fixture(scope="module")
def server(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A finished toy fit and a finished toy predict under one ``logs`` folder, served by ``tensorboard``."""
    folder = tmp_path_factory.mktemp("tensorboard")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TORCH_HOME", str(folder / "torch_home"))
        main(["fit", "-c", str(CONFIGS / "style_transfer_gram.yaml"), "--data.init_args.size=32",
              "--trainer.max_steps=3", "--model.init_args.vgg.weights=random", "--trainer.enable_progress_bar=false",
              "--model.init_args.objectives=[{name: gatys, content_layers: [relu2_1], style_layers: [relu1_1],"
              " style_weight: 1000.0}]"])  # fmt: skip
        main(tiny_args(pipeline_dir, "tb_predict", "--model.num_inference_steps=2", "--data.seeds=[0, 1]"))
    logs = folder / "logs"
    port = _free_port()
    command = [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logs), "--port", str(port),
               "--host", "127.0.0.1", "--load_fast=false", "--reload_interval=1"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if {FIT, PREDICT} <= set(_get(base, "/data/runs")):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert process.poll() is None, "tensorboard exited"
            assert time.monotonic() < deadline, "tensorboard did not list both runs within 30 s"
            time.sleep(0.3)
        yield base, logs
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_fit_run_shows_curves_inputs_results_and_hparams(server: tuple[str, Path]) -> None:
    base, logs = server
    scalars = _get(base, "/data/plugin/scalars/tags")[FIT]
    assert {"gatys/total", "gatys/best", "gatys/style_gram_relu1_1", "gatys/content_relu2_1", "loss"} <= set(scalars)
    assert "epoch" not in scalars  # a fit is one epoch: Lightning's flat epoch curve is not written
    images = _get(base, "/data/plugin/images/tags")[FIT]
    assert {"inputs/content", "inputs/style_0", "snapshot", "result"} <= set(images)
    snapshots = _get(base, "/data/plugin/images/images", run=FIT, tag="snapshot")
    assert [entry["step"] for entry in snapshots] == [0, 1, 2, 3]  # about ten a run: every step of 3
    content = _get(base, "/data/plugin/images/images", run=FIT, tag="inputs/content")
    (entry,) = content
    png = _get(base, "/data/plugin/images/individualImage?" + entry["query"].split("?", 1)[-1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vgg_weights/text_summary" in _get(base, "/data/plugin/text/tags")[FIT]  # torch's add_text adds the suffix

    experiment = _get(base, "/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = {info["name"] for info in experiment["hparamInfos"]}
    assert {"gatys/style_weight", "gatys/content_weight", "vgg_weights"} <= hparams
    metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {"final/gatys/best_loss", "final/gatys/psnr", "final/gatys/style_distance_gram"} <= metrics
    summary = FitSummary.read(logs / FIT).objectives["gatys"]
    (point,) = _get(base, "/data/plugin/scalars/scalars", run=FIT, tag="final/gatys/best_loss")
    assert point[2] == pytest.approx(summary.best_loss, rel=1e-6)


def test_predict_run_shows_previews_images_and_prompts(server: tuple[str, Path]) -> None:
    base, _ = server
    scalars = _get(base, "/data/plugin/scalars/tags")[PREDICT]
    assert {"style_loss/00000", "style_loss/00001", "final_style_loss/00001"} <= set(scalars)
    images = _get(base, "/data/plugin/images/tags")[PREDICT]
    assert {"x0/00000", "x0_table/00000", "image/00000", "image/00001"} <= set(images)
    texts = _get(base, "/data/plugin/text/tags")[PREDICT]
    assert {"prompt/00000/text_summary", "prompt/00001/text_summary"} <= set(texts)
    (text,) = _get(base, "/data/plugin/text/text", run=PREDICT, tag="prompt/00001/text_summary")
    assert "a red house by a lake" in text["text"] and "seed" in text["text"] and "cfg_scale" in text["text"]
    # Cards are grouped by the tag's first part: a few groups, whatever the number of items.
    tags = set(scalars) | set(images) | set(texts)
    assert len({tag.split("/", 1)[0] for tag in tags}) <= 8
