"""The NST path (import, `lightning-nst fit`) imports neither diffusers nor transformers itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Records, for each import of diffusers or transformers, the first frame outside importlib that asked for it.
# torchmetrics (imported by lightning itself) imports transformers when it is installed: that importer is reported,
# and the assertion is that no lightning_nst module is among the importers.
_PROBE = r"""
import json, sys, traceback
importers = {}
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name in ("diffusers", "transformers") and name not in importers:
            frames = [f.filename for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            importers[name] = frames[-1] if frames else "?"
        return None
sys.meta_path.insert(0, Probe())
import lightning_nst, lightning_nst.nst.module, lightning_nst.nst.data, lightning_nst.core.vgg
import lightning_nst.core.losses
import lightning_nst.nst.writer, lightning_nst.api, lightning_nst.cli.lightning, lightning_nst.main
if len(sys.argv) > 1:
    from lightning_nst.main import main
    try:
        main(sys.argv[1:])
    except SystemExit as stop:
        assert not stop.code, stop.code
print(json.dumps(importers))
"""


def _importers(tmp_path: Path, *args: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ours(importers: dict[str, str]) -> dict[str, str]:
    package = str(REPO / "lightning_nst")
    return {name: where for name, where in importers.items() if where.startswith(package)}


def test_nst_imports_neither_diffusers_nor_transformers(tmp_path: Path) -> None:
    importers = _importers(tmp_path)
    assert "diffusers" not in importers
    assert _ours(importers) == {}


def test_fit_runs_without_importing_diffusers(tmp_path: Path) -> None:
    importers = _importers(
        tmp_path,
        "fit",
        "-c",
        str(REPO / "configs/texture_gram.yaml"),
        "--model.init_args.vgg.weights=random",
        "--data.init_args.size=32",
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    )
    assert "diffusers" not in importers, importers
    assert _ours(importers) == {}
    assert list(tmp_path.rglob("summary.json"))
