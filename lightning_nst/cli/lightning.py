"""The LightningCLI of image optimisation (``fit``) and guided diffusion (``predict``); :func:`run` for libraries.

The Lightning glue only: the trainer defaults, what ``NSTCLI`` adds to LightningCLI's parse and instantiation, and
:func:`run`. How a run stops on a signal is :mod:`lightning_nst.cli.signals`; the one-line messages for bad input are
:mod:`lightning_nst.cli.messages`. :mod:`lightning_nst.main` is the user-facing ``lightning-nst`` command around it
(argv, ``--debug``, ``layers``, ``report``, one-line errors).
"""

from __future__ import annotations

import dataclasses
import importlib
import signal
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_nst.cli import console, preflight, rendezvous
from lightning_nst.cli.messages import nst_error
from lightning_nst.cli.precision import PrecisionChoice, choose_precision
from lightning_nst.cli.signals import RemoveRefusedRunFolder, StopOnSignal, resume_in_run_folder, stopped_by
from lightning_nst.cli.yaml_checks import check_subcommand_of_configs, check_yaml_files
from lightning_nst.core.seeds import check_seed
from lightning_nst.nst.checkpoint import check_checkpoint
from lightning_nst.nst.module import ImageOptimization
from lightning_nst.nst.writer import ImageWriter

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "lightning_nst", "default_hp_metric": False},
    },
    "max_steps": 500,
    "max_epochs": 1,  # ImageTargets yields max_steps items per epoch; a resumed fit lifts it (see NSTCLI)
    "log_every_n_steps": 1,
    "enable_model_summary": False,
}

DESCRIPTION = """\
Neural style with PyTorch Lightning: feature inversion, texture synthesis, Gatys style transfer (`fit`) and
VGG-style-guided Stable Diffusion (`predict`). Run `lightning-nst layers` to list the VGG19 layer names and
`lightning-nst report --help` for the study's experiments as reports.
"""

console.quiet()  # before anything builds a Trainer; the library API filters only during its calls


class NSTCLI(LightningCLI):
    """LightningCLI with the project's trainer defaults; the model and data classes come from the config."""

    def __init__(
        self, args: ArgsType = None, run: bool = True, stop: StopOnSignal | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs["parser_kwargs"] = {"description": DESCRIPTION, **kwargs.get("parser_kwargs", {})}
        self.stop = stop or StopOnSignal()
        self.resume_state: dict[str, Any] | None = None
        """The resume state of the image optimisation checkpoint ``fit --ckpt_path`` resumes, if any."""
        self.precision: PrecisionChoice | None = None
        """The precision of an image optimisation fit, and where it came from (:mod:`lightning_nst.cli.precision`)."""
        super().__init__(auto_configure_optimizers=False, seed_everything_default=0, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Add ``--node_wait``: how long a process of a multi-process run waits for the others to join it."""
        parser.add_argument(
            "--node_wait",
            type=float,
            default=rendezvous.NODE_WAIT,
            help="seconds a process of a run over several processes or nodes waits for the others before it stops "
            "with a line naming what it waited for; SIGTERM and Ctrl-C end the wait at once (default: 600)",
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``predict``: nothing here validates or tests, so ``validate``/``test`` are not offered."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "predict")}

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Parse as LightningCLI does, then let an ``objectives`` list from the command line replace the config's."""
        if isinstance(args, list):
            # LightningCLI warns when it is given args while sys.argv holds others; :func:`run` always passes the
            # list it was given (the command line itself for ``lightning-nst``, a run's for the report).
            self.config = parser.parse_args(args)
        else:
            super().parse_arguments(parser, args)
        argv = list(args) if isinstance(args, list) else sys.argv[1:] if args is None else []
        _replace_listed_objectives(self.config, argv)
        subcommand = self.config.get("subcommand")
        if subcommand:  # before LightningCLI seeds everything with it, which raises ValueError out of numpy's range
            check_seed(self.config[subcommand].get("seed_everything"), "seed_everything")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI merges the checkpoint's hyperparameters over the command line, so overrides given with
        # --ckpt_path would be ignored silently; image optimisation instead checks the checkpoint against them.
        # A private method, as Lightning 2.6 has no public way to keep the command line's values: LightningCLI's
        # __init__ calls it between the public parse_arguments and before_instantiate_classes, and nothing turns the
        # merge off (load_from_checkpoint_support only drops the instantiator that records the hyperparameters). A
        # check in either public hook would still let the merge replace the overrides; hiding ckpt_path from it there
        # would depend on this method just the same. Lightning's open pull requests #21408 (a hook that adapts the
        # checkpoint's hyperparameters) and #21455 (the command line over them) would each give a public path.
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            self.resume_state = check_checkpoint(self.config[subcommand])
            if self.resume_state is not None:
                return
        super()._parse_ckpt_path()

    def after_instantiate_classes(self) -> None:  # noqa: D102
        super().after_instantiate_classes()
        if self.subcommand == "fit" and isinstance(self.model, ImageOptimization):
            # The module would attach its default writer itself (configure_callbacks), but only once the run starts:
            # added here, it is in place for resume_in_run_folder and keeps its last images before the clean-up.
            if not any(isinstance(callback, ImageWriter) for callback in self.trainer.callbacks):
                self.trainer.callbacks.append(ImageWriter())
            for callback in self.trainer.callbacks:
                if isinstance(callback, ImageWriter) and self.precision is not None:
                    callback.precision_source = self.precision.source
        if self.subcommand in ("fit", "predict"):
            rendezvous.guard(self.trainer, self.config[self.subcommand].get("node_wait"))
            self.trainer.callbacks.append(self.stop)
            callbacks = self.config[self.subcommand].trainer.get("callbacks")
            lines = self.subcommand == "predict" and self.trainer.world_size > 1
            console.install_progress_bar(self.trainer, callbacks, lines=lines)
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path"):
            resume_in_run_folder(self.trainer, str(self.config.fit.ckpt_path), self.stop)
        if self.subcommand is not None:
            # The run folder is known here, before the run: the logger creates it once the run starts, and only
            # whether it existed before tells a folder this run made from one the user had.
            log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
            self.trainer.callbacks.append(RemoveRefusedRunFolder(log_dir))

    def before_instantiate_classes(self) -> None:
        """Turn ``inference_mode`` off for ``predict``, load checkpoints ``weights_only`` and choose a fit's precision.

        Guided sampling needs gradients, which ``inference_mode`` would forbid. ``--weights_only`` left unset would
        defer to torch's default, which has changed between releases; ``--weights_only false`` still loads a trusted
        checkpoint that holds arbitrary objects. An image optimisation's ``trainer.precision`` left unset becomes
        ``bf16-mixed`` where the device computes bfloat16 natively (:mod:`lightning_nst.cli.precision`), said in one
        line; ``predict`` keeps its config's.
        """
        config = self.config[self.subcommand]
        if self.subcommand == "predict":
            config.trainer.inference_mode = False
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True
        if self.subcommand == "fit" and config.get("ckpt_path") and config.trainer.max_epochs == 1:
            # A checkpoint taken at the end of the one epoch would end a resumed run with a larger max_steps at
            # once. Only here: with -1 everywhere, Lightning's progress bar would show "Epoch 0/-2".
            config.trainer.max_epochs = -1
        preflight.check(config, self.subcommand)
        if self.subcommand == "fit" and _is_image_optimization(config.get("model")):
            objectives = (config.model.get("init_args") or {}).get("objectives") or ()
            self.precision = choose_precision(
                config.trainer.precision, config.trainer.accelerator, self.resume_state, objectives
            )
            config.trainer.precision = self.precision.precision
            rank_zero_info(self.precision.line())


def _is_image_optimization(model: Any) -> bool:
    """Whether a config's ``model`` is :class:`ImageOptimization` or a subclass of it."""
    class_path = model.get("class_path") if isinstance(model, Namespace) else None
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        kind = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(kind, type) and issubclass(kind, ImageOptimization)


def _replace_listed_objectives(config: Namespace, argv: list[str]) -> None:
    """Give fields an ``objectives`` list on the command line leaves out their defaults, not the config's values.

    jsonargparse merges a list of dataclasses given later into the earlier one item by item, so
    ``--model.init_args.objectives=[{name: x, style_layers: [relu1_1]}]`` after a config with ``style_weight: 1e6``
    would silently keep that weight.
    """
    flags = ("--model.init_args.objectives", "--model.objectives")
    given = None
    for index, arg in enumerate(argv):
        if arg in flags and index + 1 < len(argv):
            given = argv[index + 1]
        elif arg.startswith(tuple(f"{flag}=" for flag in flags)):
            given = arg.split("=", 1)[1]
    subcommand = config.get("subcommand")
    if given is None or not subcommand:
        return
    try:
        listed = yaml.safe_load(given)
    except yaml.YAMLError:
        return
    model = config[subcommand].get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    objectives = init_args.get("objectives") if init_args is not None else None
    if not isinstance(listed, list) or not isinstance(objectives, list) or len(listed) != len(objectives):
        return
    from lightning_nst.nst.objective import Objective

    defaults = {
        field.name: field.default if field.default is not dataclasses.MISSING else field.default_factory()
        for field in dataclasses.fields(Objective)
        if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    }
    for item, objective in zip(listed, objectives, strict=True):
        if isinstance(item, dict) and isinstance(objective, Namespace):
            for name, default in defaults.items():
                if name not in item:
                    objective[name] = default


def run(args: Sequence[str], *, resume: Callable[[Path], str] | None = None) -> NSTCLI:
    """Run ``lightning-nst <args>`` (``fit``, ``predict``, ...) in this process and return the finished CLI.

    The library's entry point: it prints nothing of its own and raises instead of exiting. ``resume`` gives the
    command that resumes from a checkpoint, for the message of a stopped run, where that is not these arguments with
    ``--ckpt_path`` (``stylize``'s own command with ``--resume``).

    Raises:
        NSTError: On bad input, with the one line ``lightning-nst`` prints.
        StoppedBySignal: When SIGINT or SIGTERM stopped the run after keeping what was done, or a second signal at
            once; after SIGINT an :class:`~lightning_nst.cli.signals.InterruptedBySignal`, a ``KeyboardInterrupt`` too.
    """
    args = list(args)
    check_yaml_files(args)
    check_subcommand_of_configs(args)
    stop = StopOnSignal(args, resume)
    cli = None
    try:
        # Around the whole run, as the handlers must be in place before the trainer starts; a signal that comes
        # before the first step stops the run after it.
        with stop.handling_signals():
            cli = NSTCLI(args=args, stop=stop, parser_kwargs={"exit_on_error": False})
    except SystemExit:  # Lightning's SIGTERMException, once the stop is done
        if not stop.stopped:
            raise
    except KeyboardInterrupt as interrupt:  # Lightning's exit after it, made a KeyboardInterrupt again
        if stop.signum is None:  # not this run's: a Ctrl-C it did not take (the caller's handler) or raised in code
            raise
        second = interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) else signal.SIGINT
        name = signal.Signals(second).name
        raise stopped_by(second, f"stopped at once by a second {name}, without saving the step under way") from None
    except (ArgumentError, ValueError, MisconfigurationException, RuntimeError) as error:
        if (found := nst_error(error, args)) is None:
            raise
        raise found from error
    if stop.stopped or cli is None:  # only a stop ends the try without a CLI
        raise stopped_by(stop.signum or signal.SIGTERM, stop.message)
    return cli
