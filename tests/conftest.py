"""Shared fixtures: no test touches the network, ~/.cache or the repository's logs/."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED = REPO.parent / "shared"
PARTIAL_WEIGHTS = SHARED / "models" / "vgg19_imagenet_conv1_1-conv3_1.pth"


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LIGHTNING_NST_VGG_WEIGHTS", raising=False)
    monkeypatch.delenv("LIGHTNING_NST_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def shared() -> Path:
    """The read-only ../shared folder of sample data; tests using it skip where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture
def partial_weights(shared: Path) -> Path:
    """Real ImageNet VGG19 weights for conv1_1 ... conv3_1."""
    if not PARTIAL_WEIGHTS.is_file():
        pytest.skip(f"{PARTIAL_WEIGHTS} is not present")
    return PARTIAL_WEIGHTS
