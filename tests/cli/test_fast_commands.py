"""The commands that only print (help, version, listings) answer without importing torch, Lightning or diffusers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "lightning", "diffusers")

# `lightning-nst ARGS` as the console script runs it (main() on sys.argv), then the heavy modules it imported.
PROGRAM = """\
import json, sys
sys.argv = ["lightning-nst", *json.loads(sys.argv[1])]
from lightning_nst.main import main
try:
    main()
finally:
    sys.stderr.write("MODULES " + json.dumps(sorted(name for name in {heavy} if name in sys.modules)) + "\\n")
"""


def _heavy_modules(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(heavy=HEAVY), json.dumps(list(args))],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the command printed nothing"
    line = next(line for line in result.stderr.splitlines() if line.startswith("MODULES "))
    return json.loads(line.removeprefix("MODULES "))


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["configs"],
        ["layers"],
        ["stylize", "--help"],
        ["texture", "--help"],
        ["generate", "--help"],
    ],
    ids=" ".join,
)
def test_printing_commands_import_no_torch_lightning_or_diffusers(args: list[str]) -> None:
    assert _heavy_modules(*args) == []


def test_the_layer_table_is_torchvisions_vgg19() -> None:
    """``lightning-nst layers`` lists the torch-free table; the network is built from torchvision's configuration."""
    from torchvision.models.vgg import cfgs

    from lightning_nst.core.layers import VGG19_CONFIG

    assert list(VGG19_CONFIG) == cfgs["E"]
