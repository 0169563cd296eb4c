"""The LightningCLI of image optimisation (``fit``) and guided diffusion (``predict``); :func:`run` for libraries.

:mod:`lightning_nst.main` is the user-facing ``lightning-nst`` command around it (argv, ``--debug``, ``layers``,
``report``, one-line errors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
import shutil
import signal
import sys
import threading
from argparse import ArgumentError
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_nst.cli import console, preflight
from lightning_nst.cli.yaml_checks import check_yaml_files
from lightning_nst.core.errors import DivergenceError, NSTError, StoppedBySignal
from lightning_nst.core.files import checkpoint_run_folder
from lightning_nst.core.seeds import check_seed
from lightning_nst.nst.checkpoint import check_checkpoint
from lightning_nst.nst.module import ImageOptimization
from lightning_nst.nst.writer import ImageWriter
from lightning_nst.outputs import SUMMARY

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
        super().__init__(auto_configure_optimizers=False, seed_everything_default=0, args=args, run=run, **kwargs)

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
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            if check_checkpoint(self.config[subcommand]):
                return
        super()._parse_ckpt_path()

    def after_instantiate_classes(self) -> None:  # noqa: D102
        super().after_instantiate_classes()
        if self.subcommand == "fit" and isinstance(self.model, ImageOptimization):
            # The module would attach its default writer itself (configure_callbacks), but only once the run starts:
            # added here, it is in place for resume_in_run_folder and keeps its last images before the clean-up.
            if not any(isinstance(callback, ImageWriter) for callback in self.trainer.callbacks):
                self.trainer.callbacks.append(ImageWriter())
        if self.subcommand in ("fit", "predict"):
            self.trainer.callbacks.append(self.stop)
            console.install_progress_bar(self.trainer, self.config[self.subcommand].trainer.get("callbacks"))
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path"):
            resume_in_run_folder(self.trainer, str(self.config.fit.ckpt_path), self.stop)
        if self.subcommand is not None:
            # The run folder is known here, before the run: the logger creates it once the run starts, and only
            # whether it existed before tells a folder this run made from one the user had.
            log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
            self.trainer.callbacks.append(RemoveRefusedRunFolder(log_dir))

    def before_instantiate_classes(self) -> None:
        """Turn ``inference_mode`` off for ``predict`` and load checkpoints with ``weights_only=True`` by default.

        Guided sampling needs gradients, which ``inference_mode`` would forbid. ``--weights_only`` left unset would
        defer to torch's default, which has changed between releases; ``--weights_only false`` still loads a trusted
        checkpoint that holds arbitrary objects.
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


class StopOnSignal(L.Callback):
    """Treat SIGTERM like Ctrl-C: stop after the current step (fit) or batch (predict) and keep what is done.

    Lightning's own SIGTERM handling (``trainer.received_sigterm``) stops ``fit`` without a checkpoint and exits 0,
    and does not stop ``predict`` at all; this callback stops both at a boundary where the state is whole, saves
    ``last.ckpt`` where the run's ModelCheckpoint saves (else ``<run>/checkpoints``) during ``fit``, and says in
    :attr:`message` how to resume; :func:`run` then raises :class:`~lightning_nst.core.errors.StoppedBySignal`, which
    ``lightning-nst`` prints, exiting with ``128 + signal``. A second signal interrupts at once, as Ctrl-C does.
    """

    def __init__(self, args: Sequence[str] | None = None, resume: Callable[[Path], str] | None = None) -> None:
        self.args = list(args) if args is not None else None
        """The command's arguments, for the resume command in :attr:`message`; ``None``: unknown."""
        self.resume = resume
        """The command that resumes from a checkpoint, where it is not ``args`` with ``--ckpt_path`` (a shortcut's)."""
        self.signum: int | None = None
        self.stopped = False
        self.checkpoint: Path | None = None
        self.checkpoint_dir: Path | None = None
        """Where to save ``last.ckpt`` instead of the run's ModelCheckpoint folder (a resumed run's own)."""
        self.interrupted: Path | None = None
        self.step = 0
        self.message = ""
        """What was kept and how to resume, once the run has stopped."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(signum)  # the second signal's number, for run's exit status
        self.signum = signum

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Take SIGTERM and SIGINT for the duration where Python's defaults hold them; restore every handler after.

        A default SIGTERM would kill the process mid-step and a default SIGINT raise ``KeyboardInterrupt`` wherever
        it lands; a handler the caller installed, or ``SIG_IGN`` (a background job's SIGINT), stays theirs. A run
        stopped by SIGINT ends in a ``KeyboardInterrupt`` all the same (:func:`run`), so a caller that relies on one
        (a test runner, a notebook) stops as it would have, one step later and with the step kept.
        """
        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        with console.restoring_signal_handlers():
            if threading.current_thread() is threading.main_thread():  # the only thread that may install handlers
                for signum, default in defaults.items():
                    if signal.getsignal(signum) == default:
                        signal.signal(signum, self._handle)
            yield

    def _stop(self) -> None:
        if self.signum is not None:
            self.stopped = True
            raise SIGTERMException(128 + self.signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        self._stop()

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save a resumable checkpoint (fit) or merge the finished items' records (predict)."""
        # Not on a second signal's KeyboardInterrupt, which may come in the middle of a step.
        if self.signum is None or not isinstance(exception, SIGTERMException):
            return
        self.stopped = True
        self.step = trainer.global_step
        if trainer.training:
            folder = self.checkpoint_dir
            if folder is None and isinstance(trainer.checkpoint_callback, ModelCheckpoint):
                folder = trainer.checkpoint_callback.dirpath
            folder = Path(folder) if folder else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
            self.checkpoint = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
            # All a resume needs; left unset, Lightning logs that it chose this.
            trainer.save_checkpoint(self.checkpoint, weights_only=False)
            writer = next((c for c in trainer.callbacks if isinstance(c, ImageWriter)), None)
            if writer is not None:
                self.interrupted = writer.save_interrupted(trainer, pl_module)
        elif trainer.predicting and trainer.world_size == 1:
            # Lightning skips callbacks' teardown on an exception; the writer merges its records there.
            for callback in trainer.callbacks:
                if isinstance(callback, BasePredictionWriter):
                    callback.teardown(trainer, pl_module, "predict")
        self.message = self._message(trainer)

    def _message(self, trainer: L.Trainer) -> str:
        """One line saying what was kept and how to resume."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        if self.checkpoint is not None:
            kept = f"; the current images are in {self.interrupted} as *.interrupted.png" if self.interrupted else ""
            writer = next((c for c in trainer.callbacks if isinstance(c, ImageWriter)), None)
            if writer is not None and writer.partial is not None:
                kept += f"; the best image so far is in {writer.partial}"
            if self.resume is not None:
                resume = f"resume with: {self.resume(self.checkpoint)}"
            elif self.args is None:
                resume = f"resume with the same command and --ckpt_path {shlex.quote(str(self.checkpoint))}"
            else:
                resume = f"resume with: {resume_command(self.args, self.checkpoint)}"
            return f"stopped by {name} at step {self.step}{kept}; {resume}"
        writer = next((c for c in trainer.callbacks if isinstance(c, BasePredictionWriter)), None)
        given = getattr(writer, "output_dir", None)
        if given is not None:  # the command names the folder already (generate's -o, or the config's writer)
            return f"stopped by {name}; finished items are kept in {given}: rerun the same command to generate the rest"
        folder = trainer.log_dir or "."
        return (
            f"stopped by {name}; finished items are kept in {folder}: rerun the same command with "
            f"--trainer.callbacks.init_args.output_dir {shlex.quote(str(folder))} to generate the rest"
        )


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` or ``option=VALUE`` (e.g. ``--resume CHECKPOINT``), wherever it stands."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def resume_command(args: Sequence[str], checkpoint: Path) -> str:
    """The shell command that resumes ``lightning-nst <args>`` from ``checkpoint``: the same arguments, quoted."""
    return shlex.join(["lightning-nst", *without_option(args, "--ckpt_path"), "--ckpt_path", str(checkpoint)])


def resume_in_run_folder(trainer: L.Trainer, ckpt_path: str, stop: StopOnSignal) -> None:
    """Let a run resumed from ``<run>/checkpoints/*.ckpt`` write its results into ``<run>``, if that holds none.

    The logger still starts a new version folder (TensorBoard's curves of the resumed steps), but the images of an
    interrupted run belong next to its ``*.interrupted.png``: the ImageWriter, when its ``output_dir`` is unset,
    writes into the interrupted run's folder, and a second stop saves ``last.ckpt`` back into its ``checkpoints``.
    A finished run's folder (it holds ``summary.json``) is never written into: its results stay, the new ones go to
    the new run folder. One info line says which.
    """
    writer = next((c for c in trainer.callbacks if isinstance(c, ImageWriter)), None)
    folder = checkpoint_run_folder(ckpt_path)
    if writer is None or writer.output_dir is not None or folder is None:
        return
    if (folder / SUMMARY).exists():
        rank_zero_info(f"Resuming the finished run {folder}: results go to this run's folder {trainer.log_dir}")
        return
    writer.output_dir = str(folder)
    writer.directory = folder
    stop.checkpoint_dir = Path(ckpt_path).expanduser().parent
    rank_zero_info(f"Resuming {folder}: results go there, TensorBoard logs to {trainer.log_dir}")


class RemoveRefusedRunFolder(L.Callback):
    """Remove the logger's run folder when bad input (an NSTError) stops the run, if the run made it.

    The logger creates its run folder before any setup hook, where most checks run; a run refused there must not
    leave that folder behind looking like a result. A folder that existed before, or that holds anything but the
    config, hyperparameters and TensorBoard events (a kept image), stays. The parent folders the run created
    (``logs/<name>``) are removed too, while empty.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.existed = folder is not None and folder.exists()
        self.created = [parent for parent in folder.parents if not parent.exists()] if folder is not None else []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        error = NSTError.behind(exception)
        # A diverged run was not refused: it ran, and its error names the folder of its *.last_good.png.
        if self.folder is None or self.existed or error is None or isinstance(error, DivergenceError):
            return
        if not trainer.is_global_zero:
            return
        if self.folder.is_dir() and _only_bookkeeping(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)
        for parent in self.created:  # innermost first; rmdir leaves a folder that is not empty
            with contextlib.suppress(OSError):
                parent.rmdir()


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


def _only_bookkeeping(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but the config, hyperparameters and TensorBoard events of a run."""
    for path in folder.rglob("*"):
        if path.is_file() and path.name not in ("config.yaml", "hparams.yaml"):
            if not path.name.startswith("events.out.tfevents."):
                return False
    return True


# LightningCLI's SaveConfigCallback refuses to replace the config.yaml of an earlier run with this RuntimeError.
_CONFIG_EXISTS = re.compile(r"SaveConfigCallback expected (.+) to NOT exist")
_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)')
_CLASS = re.compile(r"Problem with given class_path '([^']+)':")
_OPTION = re.compile(r"Option '([^']+)' is not accepted")
# Alternatives jsonargparse reports for every Optional/Union/path-like type, which say nothing about the mistake.
_NOISE = ("Expected a <class 'NoneType'>", "Expected a path but", "Expected a dot import path string")
_STRUCTURE = ("Does not validate against any of the", "Subtypes:", "Errors:", "Given value type:")


def condense(message: str) -> str:
    """Reduce a nested jsonargparse error to ``key.path: problem (got value)`` on one line."""
    keys: list[tuple[int, str]] = []
    cls = ""
    found: tuple[str, str] | None = None
    given = ""
    for line in message.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" -"))
        text = line.strip().lstrip("- ").strip()
        keys = [(level, key) for level, key in keys if level < indent]
        if match := _CLASS.search(text):
            cls = match.group(1)
            continue
        if match := _KEY.search(text):
            keys.append((indent, match.group(1)))
            text = match.group(2)
        if text.startswith("Given value:") and found is not None and not given:
            value = text.removeprefix("Given value:").split(". Got value:")[0].strip()
            # Not a whole class's or config's value (an inline config), only a value a user types
            given = "" if value.startswith(("NestedArg(", "Namespace(", "{")) or len(value) > 80 else value
            continue
        if not text or text.startswith(_STRUCTURE + _NOISE + ("Given value",)):
            continue
        path = ".".join(key for _, key in keys)
        if found is None or len(path) > len(found[0]):
            found, given = (path, text), ""
    if found is None:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    path, text = found
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text.split(". Got value:")[0])
    text = re.sub(r"^Expected an? ", "expected ", text)
    if match := _OPTION.search(text):
        path, text = f"{path}.{match.group(1)}".lstrip("."), f"unknown option{f' of {cls}' if cls else ''}"
    text = _plain_words(text)
    suffix = f" (got {given})" if given and given not in text else ""
    return f"{path}: {text}{suffix}" if path else f"{text}{suffix}"


_RESTRICTED = re.compile(r"^Not of type (\w+): (.*)$")
_RESTRICTIONS = {"PositiveInt": "an integer > 0", "NonNegativeInt": "an integer >= 0"}
_LITERAL = re.compile(r"^expected typing\.Literal\[(.*)\]$")


def _plain_words(text: str) -> str:
    """The rule a restricted or ``Literal`` type states, in plain words and with the value given, if jsonargparse's."""
    if match := _RESTRICTED.match(text):
        kind, detail = match.groups()
        rule = f"must be {_RESTRICTIONS.get(kind, kind)}"
        if got := re.match(r"^(\S+) does not conform", detail):
            return f"{rule} (got {got.group(1)})"
        if got := re.search(r"invalid literal for int\(\) with base 10: (.+)$", detail):
            return f"{rule} (got {got.group(1)})"
        return rule
    if match := _LITERAL.match(text):
        return "must be one of " + ", ".join(choice.strip().strip("'\"") for choice in match.group(1).split(","))
    return text


COMMANDS = ("fit", "validate", "test", "predict", "report")


def nst_error(error: BaseException, args: Sequence[str]) -> NSTError | None:
    """The one-line NSTError that stands for ``error`` raised by the CLI on ``args``, or ``None`` for a bug.

    That is an NSTError itself or one jsonargparse wrapped, Lightning's refusal of a trainer option, LightningCLI's
    refusal to overwrite an earlier run's config, and jsonargparse's own errors, condensed to the key and problem.
    """
    if found := NSTError.behind(error):
        return found
    if isinstance(error, MisconfigurationException):  # Lightning's own check of a trainer option
        return NSTError("trainer: " + " ".join(str(error).split()))
    if isinstance(error, RuntimeError):
        if not (match := _CONFIG_EXISTS.search(str(error))):
            return None
        return NSTError(
            f"trainer.default_root_dir: {match.group(1)} exists, so a run already wrote into "
            f"{Path(match.group(1)).parent}; choose another folder, or keep a logger, which makes a new "
            "version folder for every run"
        )
    if isinstance(error, ArgumentError) or (
        isinstance(error, ValueError) and "Problem with given class_path" in str(error)
    ):
        command = args[0] if args and args[0] in COMMANDS else ""
        return NSTError(f"{condense(str(error))} (see `lightning-nst {command} --help`)".replace("  ", " "))
    return None


_SUBCOMMAND_OF_MODEL = {"ImageOptimization": "fit", "GuidedDiffusion": "predict"}


def _check_subcommand_of_configs(args: Sequence[str]) -> None:
    """Refuse a config of the other subcommand (``predict -c texture_gram``) by name, before jsonargparse parses it."""
    subcommand = args[0] if args else None
    for index, arg in enumerate(args[:-1]):
        if arg not in ("-c", "--config") or args[index + 1].lstrip().startswith(("{", "[")):
            continue
        try:
            config = yaml.safe_load(Path(args[index + 1]).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # check_yaml_files has named what is wrong with it
        model = config.get("model") if isinstance(config, dict) else None
        class_path = str(model.get("class_path", "")) if isinstance(model, dict) else ""
        wanted = _SUBCOMMAND_OF_MODEL.get(class_path.rsplit(".", 1)[-1])
        if wanted is not None and subcommand in ("fit", "predict") and wanted != subcommand:
            raise NSTError(
                f"--config: {args[index + 1]} configures {class_path.rsplit('.', 1)[-1]}, which runs with "
                f"`lightning-nst {wanted}`, not {subcommand}"
            )


def run(args: Sequence[str], *, resume: Callable[[Path], str] | None = None) -> NSTCLI:
    """Run ``lightning-nst <args>`` (``fit``, ``predict``, ...) in this process and return the finished CLI.

    The library's entry point: it prints nothing of its own and raises instead of exiting. ``resume`` gives the
    command that resumes from a checkpoint, for the message of a stopped run, where that is not these arguments with
    ``--ckpt_path`` (``stylize``'s own command with ``--resume``).

    Raises:
        NSTError: On bad input, with the one line ``lightning-nst`` prints.
        StoppedBySignal: When SIGINT or SIGTERM stopped the run after keeping what was done, or a second signal at
            once; after SIGINT an :class:`InterruptedBySignal`, which is a ``KeyboardInterrupt`` too.
    """
    args = list(args)
    check_yaml_files(args)
    _check_subcommand_of_configs(args)
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


class InterruptedBySignal(StoppedBySignal, KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT): a :class:`StoppedBySignal`, and a ``KeyboardInterrupt`` for callers that stop.

    pytest stops the whole test run on it, a notebook cell its run, a script its ``except KeyboardInterrupt``.
    """


def stopped_by(signum: int, message: str) -> StoppedBySignal:
    """The exception of a run stopped by ``signum``: :class:`InterruptedBySignal` for SIGINT."""
    return (InterruptedBySignal if signum == signal.SIGINT else StoppedBySignal)(signum, message)
