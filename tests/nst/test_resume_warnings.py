"""An exact resume of `lightning-nst fit --ckpt_path` says nothing about being inexact, and is exact."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from lightning.fabric.utilities.types import _Stateful
from PIL import Image

from lightning_nst.main import main
from lightning_nst.nst.data import ImageTargets
from tests.conftest import CONFIGS

TEXTURE = ["fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--data.init_args.size=32"]
TOY = ["--model.init_args.vgg.weights=random", "--trainer.enable_progress_bar=false"]
EVERY_2 = "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {every_n_train_steps: 2, save_top_k: -1, save_last: true}}]"  # noqa: E501
RUN = Path("logs/texture_gram")


def test_the_step_loader_is_stateful_in_lightnings_sense() -> None:
    # Lightning's training epoch loop warns on a mid-epoch resume unless every train loader is _Stateful.
    data = ImageTargets(style=["skimage:gravel"], size=32)
    data.trainer = type("T", (), {"max_steps": 6})()  # type: ignore[assignment]
    loader = data.train_dataloader()
    assert isinstance(loader, _Stateful)
    assert loader.state_dict() == {}


@pytest.mark.parametrize("checkpoint", ["epoch=0-step=2.ckpt", "last.ckpt"])
def test_a_resume_warns_nothing_about_exactness_and_equals_a_straight_run(
    checkpoint: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # From step 2 of a 4-step run (mid-epoch: the loader had 4 items, the resumed one 6) and from its end.
    main([*TEXTURE, *TOY, EVERY_2, "--trainer.max_steps=4"])
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*TEXTURE, *TOY, "--trainer.max_steps=6", f"--ckpt_path={RUN / 'version_0/checkpoints' / checkpoint}"])
    err = capfd.readouterr().err
    messages = [str(w.message) for w in caught]
    for text in ("not resumable", "unreliable results"):
        assert not any(text in m for m in messages), messages
        assert text not in err, err
    main([*TEXTURE, *TOY, "--trainer.max_steps=6"])
    resumed, straight = sorted(RUN.glob("version_*/gram.png"))[-2:]
    assert resumed.parent.name == "version_1" and straight.parent.name == "version_2"
    np.testing.assert_array_equal(np.asarray(Image.open(resumed)), np.asarray(Image.open(straight)))
