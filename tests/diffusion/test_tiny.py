"""`python -m lightning_nst.diffusion.tiny`: offline tiny pipelines from an installed package, without pytest,
../shared.

The wheel test (`test_wheel.py`, slow) runs the command where pytest is not installed at all.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from lightning_nst.diffusion import tiny


def files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_the_module_saves_what_build_tiny_pipeline_saves_without_pytest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `python -m lightning_nst.diffusion.tiny` as a fresh copy of the module, with pytest and the tests unimportable.
    with monkeypatch.context() as patch:
        for name in ("pytest", "_pytest", "tests"):
            patch.setitem(sys.modules, name, None)
        patch.delitem(sys.modules, "lightning_nst.diffusion.tiny")
        patch.setattr(sys, "argv", ["tiny", "--family", "sd", "tiny-sd", "--tiny-vae", "taesd"])
        runpy.run_module("lightning_nst.diffusion.tiny", run_name="__main__")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taesd", "tiny-sd"]  # nothing else written
    assert json.loads((tmp_path / "taesd" / "config.json").read_text())["latent_channels"] == 4
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    built = tiny.build_tiny_pipeline(tmp_path / "built" / "tiny-sd")  # byte-level vocabulary: no tokenizer given
    assert torch.equal(torch.rand(2), expected)  # the global random state is left alone
    assert files(tmp_path / "tiny-sd") == files(built)


def test_a_tokenizer_folder_gives_its_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vocabulary = tmp_path / "vocabulary"
    tiny.tiny_tokenizer(vocabulary)  # vocab.json, merges.txt and tokenizer_config.json: a CLIP tokenizer folder
    (vocabulary / "vocab.json").write_text(
        json.dumps({**json.loads((vocabulary / "vocab.json").read_text()), "lighthouse</w>": 514})
    )
    tiny.main(["--tokenizer", str(vocabulary), str(tmp_path / "tiny-sd")])
    saved = json.loads((tmp_path / "tiny-sd" / "text_encoder" / "config.json").read_text())
    assert saved["vocab_size"] == 515
    with pytest.raises(SystemExit) as exit_info:
        tiny.main(["--tokenizer", str(tmp_path), str(tmp_path / "other")])
    assert exit_info.value.code == 2 and "--tokenizer: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tiny.main([str(tmp_path / "tiny-sd")])  # exists
    assert "tiny-sd exists" in capsys.readouterr().err and not (tmp_path / "other").exists()
