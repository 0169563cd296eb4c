"""Shared fixtures: no test touches the network, ~/.cache or the repository's logs/.

``../shared`` (sample images, partial real VGG19 weights, the CLIP tokenizer) exists on the development machines
only. Every test and benchmark finds it through :func:`shared_file`; ``LIGHTNING_NST_HIDE_SHARED=1`` makes them
behave as on a user's fresh machine, where it does not exist.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Lightning gives its loggers a StreamHandler of sys.stderr when it is first imported. `import lightning_nst` no longer
# imports it, so without this import a test that runs it first would bind the handler to that test's captured stream,
# closed by the next test, and every later Lightning log line would print "--- Logging error ---".
import lightning  # noqa: F401
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
HIDE_SHARED_ENV = "LIGHTNING_NST_HIDE_SHARED"
SHARED_HIDDEN = os.environ.get(HIDE_SHARED_ENV, "") not in ("", "0")
SHARED = REPO.parent / "shared"


def shared_file(relative: str) -> Path | None:
    """``../shared/<relative>`` if it exists and ``$LIGHTNING_NST_HIDE_SHARED`` does not hide it, else None."""
    path = SHARED / relative
    return None if SHARED_HIDDEN or not path.exists() else path


def require_shared(relative: str) -> Path:
    """``../shared/<relative>``, or skip the calling test naming the missing file."""
    path = shared_file(relative)
    if path is None:
        hidden = f" (hidden by {HIDE_SHARED_ENV}=1)" if SHARED_HIDDEN else ""
        pytest.skip(f"../shared/{relative} is not present{hidden}")
    return path


PARTIAL_WEIGHTS_FILE = "models/vgg19_imagenet_conv1_1-conv3_1.pth"
PARTIAL_WEIGHTS = shared_file(PARTIAL_WEIGHTS_FILE)
CLIP_TOKENIZER = shared_file("models/clip-tokenizer")
# Which models the tiny pipeline and the toy reports get: the real ImageNet VGG19 weights up to relu3_1 and the
# real CLIP vocabulary where ../shared holds both, else seeded random weights and a byte-level vocabulary. Tests
# whose numbers depend on the models state a threshold measured for each.
REAL_MODELS = PARTIAL_WEIGHTS is not None and CLIP_TOKENIZER is not None
MODELS = "real" if REAL_MODELS else "random"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``gpu`` where torch sees no CUDA device, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LIGHTNING_NST_VGG_WEIGHTS", raising=False)
    monkeypatch.delenv("LIGHTNING_NST_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def partial_weights() -> Path:
    """Real ImageNet VGG19 weights for conv1_1 ... conv3_1."""
    return require_shared(PARTIAL_WEIGHTS_FILE)


@pytest.fixture
def partial_random_weights(tmp_path: Path) -> Path:
    """A file shaped like the partial real one (``vgg19().features`` conv1_1 ... conv3_1) but holding seeded random
    weights: for tests of how partial files are handled, which need no real weights and so run everywhere."""
    from lightning_nst.core.vgg import VGG19Features

    path = tmp_path / "vgg19_random_conv1_1-conv3_1.pth"
    torch.save(VGG19Features(["relu3_1"], weights="random").trunk.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-model tests.

    The tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's spinning threads can make each
    op 50x slower when the other core is busy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Stable Diffusion pipeline, saved with ``save_pretrained`` once per test module."""
    from tests.tiny_pipeline import build_tiny_pipeline  # tiny_pipeline imports this module

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random SDXL pipeline (two CLIP encoders, Euler), saved once per test module."""
    from tests.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random SD3 pipeline (two CLIP encoders and T5, 16 latent channels), saved once per test module."""
    from tests.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd3", family="sd3")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Flux-dev pipeline (CLIP and T5, packed 16-channel latents), saved once per test module."""
    from tests.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-flux", family="flux")


@pytest.fixture(scope="module")
def tiny_vae16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-channel ``AutoencoderTiny`` (factor 2) for the sd3 and flux pipelines' latents, as taesd3 / taef1."""
    from tests.tiny_pipeline import build_tiny_autoencoder

    return build_tiny_autoencoder(tmp_path_factory.mktemp("pipelines") / "tiny-taesd16", latent_channels=16)


def cli_error(capfd: pytest.CaptureFixture[str], args: list[str]) -> str:
    """The one line a CLI run that must fail printed, after checking it exits 2 without a traceback."""
    from lightning_nst.main import main

    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    stderr = capfd.readouterr().err.strip()
    assert "Traceback" not in stderr
    return stderr.splitlines()[-1]
