"""``lightning-nst``: the command. ``fit``/``predict`` run through :func:`lightning_nst.cli.run`; bad input exits 2.

``lightning-nst layers`` lists the VGG19 layers and ``lightning-nst report`` makes the study's reports; everything
else is LightningCLI's. Errors for bad input are one line, ``lightning-nst: error: <key or file>: <problem>``, unless
``--debug`` or ``LIGHTNING_NST_DEBUG=1`` asks for the traceback.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from collections.abc import Sequence

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_nst.cli import nst_error, run
from lightning_nst.errors import NSTError, StoppedBySignal
from lightning_nst.vgg import LAYER_GEOMETRY, LAYER_NAMES
from lightning_nst.yaml_checks import check_yaml_files

DEBUG_ENV = "LIGHTNING_NST_DEBUG"
"""Set to 1 (or pass ``--debug``) to get full tracebacks instead of one-line errors."""


def print_layers() -> None:
    """Print every VGG19 feature module with its index, channels and stride."""
    print(f"{'index':>5}  {'name':<8} {'channels':>8} {'stride':>6}")
    for index, (name, (channels, stride)) in enumerate(zip(LAYER_NAMES, LAYER_GEOMETRY, strict=True)):
        print(f"{index:>5}  {name:<8} {channels:>8} {stride:>6}")


def _say(line: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under DDP every process fails or stops alike: say it once
        print(f"lightning-nst: {line}", file=sys.stderr, flush=True)


def main(args: Sequence[str] | None = None) -> None:
    """Run ``lightning-nst {fit,predict,report,layers} ...`` on ``args`` (the command line by default)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get(DEBUG_ENV) == "1" or "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if argv[:1] == ["layers"]:
        print_layers()
        return
    try:
        if argv[:1] == ["report"]:
            check_yaml_files(argv)
            from lightning_nst.report import main as report  # the only import of the report in the package

            report(argv[1:])
        else:
            run(argv)
    except StoppedBySignal as stop:
        _say(stop.message)
        raise SystemExit(stop.exit_code) from None
    except (NSTError, ArgumentError, ValueError, MisconfigurationException, RuntimeError) as error:
        if debug:
            raise
        found = nst_error(error, argv)
        if found is None:
            raise
        _say(f"error: {found}")
        raise SystemExit(2) from None
