"""``lightning-nst``: the command; bad input exits 2.

``fit``/``predict`` run through :func:`~lightning_nst.cli.lightning.run`.

``stylize``, ``texture`` and ``generate`` are shortcuts onto ``fit``/``predict`` (:mod:`lightning_nst.cli.shortcuts`;
``stylize --network`` runs a trained fast style network instead, which ``export`` writes as TorchScript),
``report`` makes the study's reports, ``layers`` lists the VGG19 layers and ``configs`` the shipped configs, which
``-c NAME`` finds by name. Errors for bad input are one line, ``lightning-nst: error: <key or file>: <problem>``,
unless ``--debug`` or ``LIGHTNING_NST_DEBUG=1`` asks for the traceback.

Only the commands that run import torch, Lightning or diffusers: ``--help``, ``--version``, ``layers``, ``configs`` and
each shortcut's and ``export``'s ``--help`` answer without them.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Sequence

from lightning_nst import __version__
from lightning_nst.cli import shipped
from lightning_nst.cli.messages import nst_error, user_errors
from lightning_nst.cli.yaml_checks import check_yaml_files
from lightning_nst.core.errors import NSTError, StoppedBySignal
from lightning_nst.core.layers import LAYER_GEOMETRY, LAYER_NAMES

DEBUG_ENV = "LIGHTNING_NST_DEBUG"
"""Set to 1 (or pass ``--debug``) to get full tracebacks instead of one-line errors."""


COMMANDS = {
    "fit": "optimise images (reconstruction, texture, style transfer) from a config: fit -c style_transfer_gram",
    "predict": "generate with style-guided Stable Diffusion from a config: predict -c guided_diffusion",
    "stylize": "style transfer with flat flags: stylize photo.jpg painting.jpg -o out.png (--network: a trained net)",
    "texture": "texture synthesis with flat flags: texture texture.jpg -o out.png",
    "generate": 'style-guided generation with flat flags: generate "a prompt" --style painting.jpg -o outdir/',
    "export": "a trained fast style network as TorchScript: export model.ckpt -o model.pt",
    "report": "run one of the study's experiments as a report",
    "layers": "list the 37 VGG19 layer names",
    "configs": "list the shipped configs (-c takes their names)",
}
"""Every command ``lightning-nst`` has, with the line ``lightning-nst --help`` gives it."""

HELP = f"""\
usage: lightning-nst [--version] [--debug] COMMAND ...

Neural style on PyTorch Lightning. `lightning-nst COMMAND --help` describes each command.

commands:
{chr(10).join(f"  {name:<10}{line}" for name, line in COMMANDS.items())}

options:
  -h, --help  show this help and exit
  --version   print the version and exit
  --debug     full tracebacks instead of one-line errors (or LIGHTNING_NST_DEBUG=1)
"""


def _help_asked(command: str, argv: Sequence[str], description: str) -> bool:
    """Print the usage of a command without arguments if ``argv`` asks for it; refuse any other argument."""
    if not argv:
        return False
    if argv[0] in ("-h", "--help"):
        print(f"usage: lightning-nst {command}\n\n{description}")
        return True
    raise NSTError(f"{command}: takes no arguments (got {' '.join(argv)})")


def print_layers(argv: Sequence[str] = ()) -> None:
    """Print every VGG19 feature module with its index, channels and stride."""
    if _help_asked("layers", argv, "List the VGG19 layer names with their index, channels and stride."):
        return
    print(f"{'index':>5}  {'name':<8} {'channels':>8} {'stride':>6}")
    for index, (name, (channels, stride)) in enumerate(zip(LAYER_NAMES, LAYER_GEOMETRY, strict=True)):
        print(f"{index:>5}  {name:<8} {channels:>8} {stride:>6}")


def print_configs(argv: Sequence[str] = ()) -> None:
    """Print the shipped configs' names with their first comment line."""
    if _help_asked("configs", argv, "List the shipped configs; `-c NAME` takes a name as well as a path."):
        return
    print(f"shipped configs in {shipped.configs_dir()} (use as -c NAME):")
    for name in shipped.names():
        print(f"  {name:<25} {shipped.first_comment(name)}")


def _command(argv: list[str]) -> None:
    """Run the command ``argv`` names."""
    command = argv[0]
    if command.startswith("-"):
        raise NSTError(f"{command}: unknown option; options go after the command (`lightning-nst COMMAND --help`)")
    if command not in COMMANDS:
        raise NSTError(f"{command}: not a command of lightning-nst; the commands are {', '.join(COMMANDS)}")
    if command in ("layers", "configs"):
        (print_layers if command == "layers" else print_configs)(argv[1:])
        return
    argv = shipped.resolve_argv(argv)
    if command in ("stylize", "texture", "generate", "export"):
        from lightning_nst.cli import shortcuts

        getattr(shortcuts, command)(argv[1:])
    elif command == "report":
        check_yaml_files(argv)
        from lightning_nst.report import main as report  # the only import of the report in the package

        report(argv[1:])
    else:
        from lightning_nst.cli.lightning import run  # torch and Lightning: only for the commands that run

        run(argv)


def _prints_its_answer(argv: Sequence[str]) -> bool:
    """Whether the command ``argv`` exists to print something: help, the version, a listing, a config."""
    asked = {"-h", "--help", "--version", "--print-config", "--print_config"}
    return not argv or argv[0] in ("layers", "configs") or any(arg.split("=", 1)[0] in asked for arg in argv)


class Interrupted(SystemExit, KeyboardInterrupt):
    """The exit after Ctrl-C: status ``128 + signal`` for the shell, and a ``KeyboardInterrupt`` for a Python caller.

    pytest, for one, counts a ``SystemExit`` raised in a test as that test's failure and goes on with the next, but
    stops the whole test run on a ``KeyboardInterrupt``.
    """


def _say(line: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under DDP every process fails or stops alike: say it once
        print(f"lightning-nst: {line}", file=sys.stderr, flush=True)


def main(args: Sequence[str] | None = None) -> None:
    """Run ``lightning-nst COMMAND ...`` on ``args`` (the command line by default); see :data:`COMMANDS`.

    Ctrl-C ends it with :class:`Interrupted`. Run on the command line (``args`` None), the process it ends then skips
    the interpreter's final garbage collection (:func:`gc.freeze`), which costs seconds with torch, Lightning and
    their ~4000 modules loaded (``docs/benchmarks.md``, "Exit after the results").
    """
    try:
        _main(args)
    finally:
        if args is None:
            # Everything alive now lives until the process ends, whose memory the system frees at once; the collector
            # would visit and free every object of every module one by one first.
            gc.freeze()


def _end_with_launcher() -> None:
    """Make a worker process started by a launcher (Lightning's, for ``--trainer.devices N``; torchrun) end with it.

    A launcher killed with ``kill -9`` cannot stop its workers, which would go on writing as orphans, also beside a
    relaunch. On Linux the kernel sends them SIGKILL when it dies (``PR_SET_PDEATHSIG``); a kill leaves nothing half
    recorded (a generation flushes its records before their PNGs). Elsewhere nothing changes.
    """
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the line above: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def _main(args: Sequence[str] | None) -> None:
    if args is None:  # a process of its own, perhaps a launcher's worker
        _end_with_launcher()
    argv = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get(DEBUG_ENV) == "1" or "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if sys.stdout is None:  # started with its standard output closed (`>&-`): Python gives it no stdout at all
        if _prints_its_answer(argv):
            _say("error: standard output is closed, so there is nowhere to print the answer")
            raise SystemExit(1)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the process's lifetime; a run's results are files
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return
    if argv[0] == "--version":
        print(f"lightning-nst {__version__}")
        return
    try:
        _command(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (`| head`) left: what it did not read is not wanted. Python would report the pipe again when it
        # flushes stdout at exit, so stdout goes to /dev/null first, as the signal module's documentation advises.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except StoppedBySignal as stop:
        _say(stop.message)
        raise (Interrupted if isinstance(stop, KeyboardInterrupt) else SystemExit)(stop.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C outside a run (while starting, between a report's runs): no traceback
        if debug:
            raise
        _say("interrupted")
        raise Interrupted(128 + signal.SIGINT) from None
    except user_errors() as error:  # evaluated once an error is raised: Lightning's own if Lightning was imported
        if debug:
            raise
        found = nst_error(error, argv)
        if found is None:
            raise
        _say(f"error: {found}")
        raise SystemExit(2) from None
